"""Shared fixtures: a small demo data directory and a trained step-5 run on it."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import generate_demo_data  # noqa: E402
import step5_train_rms  # noqa: E402

SMALL_DEMO = [
    "--n_prompts",
    "260",
    "--n_splits",
    "10",
    "--emb_dim",
    "48",
    "--seed",
    "1",
    "--n_test_prompts",
    "6",
    "--n_test_responses",
    "40",
]
# A small run_all.sh configuration (a few seconds on the demo it generates).
SMALL_RUN_ALL = {
    "N_SAMPLE": "100",
    "ENSEMBLE_NUMBER": "2",
    "TRAINING_EPOCHS": "2",
    "DISTILL_EPOCHS": "3",
    "DEMO_PROMPTS": "300",
    "EVAL_PROMPTS": "200",
    "DEMO_EMB_DIM": "32",
    "DEMO_TEST_PROMPTS": "4",
    "DEMO_TEST_RESPONSES": "12",
    "THREADS": "1",  # tiny models gain nothing from threads; in-process checks compare at one thread
}


# The smallest run_all.sh setup (every step starts within seconds), for driver and signal tests.
TINY_RUN_ALL = {
    "N_SAMPLE": "40",
    "ENSEMBLE_NUMBER": "1",
    "TRAINING_EPOCHS": "1",
    "DISTILL_EPOCHS": "1",
    "DEMO_PROMPTS": "120",
    "EVAL_PROMPTS": "60",
    "DEMO_EMB_DIM": "8",
    "DEMO_TEST_PROMPTS": "2",
    "DEMO_TEST_RESPONSES": "6",
}


def run_failing(main, argv, capsys) -> str:
    """Run a step's CLI expecting bad input: exit status 2 and exactly one stderr line."""
    from cli import run_cli

    capsys.readouterr()  # drop output of earlier calls
    with pytest.raises(SystemExit) as exc:
        run_cli(main, argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ")
    return err


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("demo") / "data"
    generate_demo_data.main(["--output_dir", str(path), *SMALL_DEMO])
    return path


@pytest.fixture
def demo_copy(demo_dir, tmp_path) -> Path:
    """A private, mutable copy of the demo directory."""
    path = tmp_path / "data"
    shutil.copytree(demo_dir, path)
    return path


STEP5_FAST = [
    "--n_sample",
    "120",
    "--ensemble_number",
    "2",
    "--training_epochs",
    "3",
    "--batch_size",
    "32",
    "--min_val_pairs",  # members stop early on their 12 validation pairs (the default needs 20)
    "0",
    "--seed",  # last: tests replace its value
    "3",
]


@pytest.fixture(scope="session")
def trained_run(demo_dir, tmp_path_factory) -> Path:
    """Output directory of a small step-5 run on the demo data (do not modify; copy it)."""
    out = tmp_path_factory.mktemp("run") / "out"
    step5_train_rms.main(["--data_dir", str(demo_dir), "--output_dir", str(out), *STEP5_FAST])
    return out


# STEP5_FAST with LightGBM classifier members (a few boosting rounds).
# Half the dimensions per tree: the default tenth of D=48 is 4 of them.
STEP5_LGBM = ["--rm_model", "lgbm", "--rm_objective", "clf", "--lgbm_n_estimators", "60", "--lgbm_patience", "10",
              "--lgbm_feature_fraction", "0.5"]  # fmt: skip


@pytest.fixture(scope="session")
def lgbm_run(demo_dir, tmp_path_factory) -> Path:
    """Output directory of a small step-5 run with LightGBM members (do not modify; copy it)."""
    out = tmp_path_factory.mktemp("lgbm_run") / "out"
    step5_train_rms.main(["--data_dir", str(demo_dir), "--output_dir", str(out), *STEP5_LGBM, *STEP5_FAST])
    return out


@pytest.fixture(scope="session")
def distilled_run(trained_run, tmp_path_factory) -> Path:
    """Step 7 on a copy of the shared step-5 run (for step 8's cases; do not modify, copy it)."""
    import step7_isotonic_distillation

    out = tmp_path_factory.mktemp("distilled") / "out"
    shutil.copytree(trained_run, out)
    step7_isotonic_distillation.main(["--output_dir", str(out), "--distill_epochs", "2", "--batch_size", "64"])
    return out


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from threads, and on a busy machine OpenMP spinning costs 10x."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Tiny policy, embedding and reward models with a local tokenizer (tests/tiny_models.py)."""
    from tiny_models import build_tiny_setup

    return build_tiny_setup(tmp_path_factory.mktemp("tiny_models"))

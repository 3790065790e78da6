"""Bad input to every CPU script and run_all.sh: exit status 2, one line, no partial artifact.

Each case builds its input in a private folder (copies of the shared demo data and step-5 run),
runs one script, and checks: exit status 2; exactly one stderr line, with no traceback, that names
the input and what was expected (the case's fragments); every watched folder (outputs, and data
the script may write to) holds exactly the files it held before, at the same sizes and mtimes.
Cases marked ``subprocess`` run ``sys.executable script.py`` for real instead of ``main()``
in-process, so each script's ``__main__`` path is covered too; run_all.sh gets ``PYTHON`` set to the
same interpreter (its default, ``python3`` on PATH, may be another Python without the packages).
"""

from __future__ import annotations

import fcntl
import json
import os
import resource
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, SMALL_RUN_ALL, run_failing

import convert_embeddings
import generate_demo_data
import step5_train_rms
import step6_eval_rms
import step7_isotonic_distillation
import step8_validate_distillation
from networks import MLP, save_checkpoint

MAINS = {
    "generate_demo_data.py": generate_demo_data.main,
    "step5_train_rms.py": step5_train_rms.main,
    "step6_eval_rms.py": step6_eval_rms.main,
    "step7_isotonic_distillation.py": step7_isotonic_distillation.main,
    "step8_validate_distillation.py": step8_validate_distillation.main,
    "convert_embeddings.py": convert_embeddings.main,
}
# A small valid run_all.sh configuration; each case breaks one thing.
RUN_ALL_ENV = {**SMALL_RUN_ALL, "TRAINING_EPOCHS": "1", "DISTILL_EPOCHS": "1"}
D = 48  # embedding size of the shared demo data (conftest.SMALL_DEMO)


@dataclass
class Case:
    script: str
    argv: list[str]
    expected: list[str]  # fragments of the one stderr line
    watched: list[Path]  # folders whose files must be unchanged
    env: dict[str, str] = field(default_factory=dict)  # run_all.sh only
    absent: list[Path] = field(default_factory=list)  # folders that must not even be created
    subprocess: bool = False
    lock: Path | None = None  # a folder held locked (flock) while the script runs
    file_size_limit: int | None = None  # RLIMIT_FSIZE in bytes (subprocess): writes beyond it fail with EFBIG
    # The same script run again with the input fixed (argv, or env for run_all.sh): must exit 0.
    recovery: list[str] | dict[str, str] | None = None
    fix: Callable[[], None] = lambda: None  # repairs a damaged input before the recovery run


class Workspace:
    """Private copies of the shared demo data and runs, and helpers to break them."""

    def __init__(self, tmp: Path, demo: Path, run: Path, distilled: Path, lgbm: Path):
        self.tmp, self.demo, self._run, self._distilled, self._lgbm = tmp, demo, run, distilled, lgbm

    def data_copy(self) -> Path:
        return self._copy(self.demo, "data")

    def run_copy(self) -> Path:
        return self._copy(self._run, "run")

    def distilled_copy(self) -> Path:
        return self._copy(self._distilled, "distilled")

    def lgbm_copy(self) -> Path:
        """A step-5 run with LightGBM members (conftest's lgbm_run)."""
        return self._copy(self._lgbm, "lgbm")

    def _copy(self, source: Path, name: str) -> Path:
        target = self.tmp / name
        shutil.copytree(source, target)
        return target

    def regular_file(self) -> Path:
        """A regular file: no folder can be created under it (unlike permission bits, this stops root too)."""
        path = self.tmp / "a_file"
        path.write_text("not a folder\n")
        return path

    def checkpoint(self, name: str, state: dict) -> Path:
        path = self.tmp / name
        torch.save(state, path)
        return path

    def member(self, run: Path, index: int) -> Path:
        return run / json.loads((run / "orm_manifest.json").read_text())["checkpoints"][index]

    def repo(self, embeddings: np.ndarray, rewards: np.ndarray) -> Path:
        """A repository folder in the original authors' kn layout: (K, N, D) embeddings, (K, N) rewards."""
        repo = self.tmp / "repo"
        repo.mkdir(exist_ok=True)
        np.save(repo / "EMBD_hh-rlhf-helpful-gpt4_gemma2b_gemma7b_train.npy", embeddings, allow_pickle=True)
        np.save(repo / "REWARD_hh-rlhf-helpful-gpt4_rmmistral7b_gemma7b_train.npy", rewards, allow_pickle=True)
        return repo


def truncate(path: Path, n_bytes: int) -> Path:
    path.write_bytes(path.read_bytes()[:n_bytes])
    return path


def edit_lines(path: Path, edit: Callable[[list[str]], None]) -> Path:
    lines = path.read_text().splitlines()
    edit(lines)
    path.write_text("\n".join(lines) + "\n")
    return path


def edit_json(path: Path, edit: Callable[[dict], None]) -> Path:
    record = json.loads(path.read_text())
    edit(record)
    path.write_text(json.dumps(record))
    return path


def mlp_state(dim: int, hidden=(1024, 512)) -> dict:
    return MLP(dim, hidden, generator=torch.Generator().manual_seed(0)).state_dict()


# --------------------------------------------------------------------------------------------
# The cases
# --------------------------------------------------------------------------------------------
def run_all_case(
    w: Workspace,
    expected: list[str],
    settings_error: bool = True,
    data: Path | None = None,
    output: Path | None = None,
    **env,
) -> Case:
    data, output = data or w.tmp / "data", output or w.tmp / "out"
    return Case(
        "run_all.sh",
        [],
        expected,
        [data, output],
        env={"DATA_DIR": str(data), "OUTPUT_DIR": str(output), **env},
        absent=[data, output] if settings_error else [],
    )


def settings_case(variable: str, value: str, message: str) -> Callable[[Workspace], Case]:
    def make(w: Workspace) -> Case:
        return run_all_case(w, [f"run_all.sh: error: {message}"], **{variable: value})

    make.__name__ = f"run_all_{variable}_{value}"
    return make


# The messages are the steps' own parsers' (settings.py parses every step's flags before any work).
RUN_ALL_SETTINGS = [
    settings_case("RM_OBJECTIVE", "foo", "RM_OBJECTIVE: invalid choice: 'foo' (choose from 'bt', 'clf')"),
    settings_case("N_SAMPLE", "-3", "N_SAMPLE: expected a positive integer, got '-3'"),
    settings_case("N_SAMPLE", "ten", "N_SAMPLE: expected a positive integer, got 'ten'"),
    settings_case(
        "N_SAMPLE",
        "99999999999999999999",
        "N_SAMPLE: expected a positive integer up to 2147483647, got '99999999999999999999'",
    ),
    settings_case("ENSEMBLE_NUMBER", "0", "ENSEMBLE_NUMBER: expected a positive integer, got '0'"),
    settings_case("ANNOTATION_QUALITY", "nan", "ANNOTATION_QUALITY: expected a finite number, got 'nan'"),
    settings_case("CONSIDER_FIRST_N", "-3", "--consider_first_n (CONSIDER_FIRST_N) must be > 0, -1 or -2, got -3"),
    settings_case("TASK", "funny", "TASK: invalid choice: 'funny' (choose from 'harmless', 'helpful')"),
    settings_case("N_PAIRS", "0", "N_PAIRS: expected a positive integer, got '0'"),
    settings_case("PAIR_MODE", "cross", "PAIR_MODE: invalid choice: 'cross' (choose from 'xprompt', 'same')"),
    settings_case("REPLACEMENT", "yes", "REPLACEMENT: expected 1, 0, replacement_true or replacement_false, got 'yes'"),
    settings_case("SPLIT_SEED", "x", "SPLIT_SEED: expected a non-negative integer seed, got 'x'"),
    settings_case("EVAL_PROMPTS", "-5", "EVAL_PROMPTS: expected a positive integer, got '-5'"),
    settings_case("DEMO_PROMPTS", "0", "DEMO_PROMPTS: expected a positive integer, got '0'"),
    settings_case("LEARNING_RATE", "0", "LEARNING_RATE: expected a positive number, got '0'"),
    settings_case("DISTILL_LEARNING_RATE", "-0.1", "DISTILL_LEARNING_RATE: expected a positive number, got '-0.1'"),
    settings_case("SEED", "1.5", "SEED: expected a non-negative integer seed, got '1.5'"),
    settings_case("SEED", "-1", "SEED: expected a non-negative integer seed, got '-1'"),
    settings_case(
        "SEED", "4294967296", "SEED: expected a non-negative integer seed up to 4294967295, got '4294967296'"
    ),
    settings_case("LEARNING_RATE", "1e999", "LEARNING_RATE: expected a finite number, got '1e999'"),
    settings_case("LEARNING_RATE", "1e-400", "LEARNING_RATE: expected a positive number, got '1e-400'"),
    settings_case("ANNOTATION_QUALITY", "-1e400", "ANNOTATION_QUALITY: expected a finite number, got '-1e400'"),
    settings_case("DEMO_TEST_PROMPTS", "-1", "DEMO_TEST_PROMPTS: expected an integer >= 0, got '-1'"),
    settings_case("FORCE", "yes", "FORCE: expected 0 or 1, got 'yes'"),
    settings_case(
        "EARLY_STOPPING", "early", "EARLY_STOPPING: invalid choice: 'early' (choose from 'member', 'pooled', 'none')"
    ),
    settings_case("STOP_METRIC", "auc", "STOP_METRIC: invalid choice: 'auc' (choose from 'loss', 'accuracy')"),
    settings_case("MIN_VAL_PAIRS", "-1", "MIN_VAL_PAIRS: expected an integer >= 0, got '-1'"),
    settings_case("WEIGHT_DECAY", "-0.1", "WEIGHT_DECAY: expected a number >= 0, got '-0.1'"),
    settings_case("WEIGHT_DECAY", "1e999", "WEIGHT_DECAY: expected a finite number, got '1e999'"),
    settings_case("BAGGING", "yes", "BAGGING: expected 0 or 1, got 'yes'"),
    settings_case("STANDARDIZE", "2", "STANDARDIZE: expected 0 or 1, got '2'"),
    settings_case("LAST_STEP", "4", "LAST_STEP: invalid choice: 4 (choose from 5, 6, 7, 8)"),
]


def run_all_output_under_file(w):
    output = w.regular_file() / "out"
    return run_all_case(w, [f"OUTPUT_DIR '{output}' is not a writable directory"], output=output)


def run_all_data_under_file(w):
    data = w.regular_file() / "data"
    return run_all_case(
        w, [f"DATA_DIR '{data}' is not a directory that can be created"], settings_error=False, data=data
    )


def run_all_output_in_use(w):
    if shutil.which("flock") is None:
        pytest.skip("run_all.sh locks OUTPUT_DIR only where util-linux's flock is installed")
    output = w.tmp / "out"
    output.mkdir()
    case = run_all_case(
        w, [f"OUTPUT_DIR '{output}' is in use by another run_all.sh"], settings_error=False, output=output
    )
    case.lock = output
    return case


def run_all_splits_of_different_d(w):
    data = w.data_copy()
    (data / "demo_config.json").unlink()  # real data: used as it is, not regenerated
    np.save(data / "EMBD-TRAIN-split_4.npy", np.zeros((260, D - 1), np.float32))
    return run_all_case(
        w,
        [
            f"error: {data / 'EMBD-TRAIN-split_4.npy'}: shape (260, {D - 1}) differs from "
            f"EMBD-TRAIN-split_0.npy's (260, {D})"
        ],
        settings_error=False,
        data=data,
    )


# --- generate_demo_data.py ---
def demo_one_split(w):
    out = w.tmp / "data"
    return Case(
        "generate_demo_data.py",
        ["--output_dir", str(out), "--n_splits", "1"],
        ["--n_splits must be at least 2"],
        [out],
        subprocess=True,
    )


def demo_negative_test_prompts(w):
    out = w.tmp / "data"
    return Case(
        "generate_demo_data.py",
        ["--output_dir", str(out), "--n_test_prompts", "-1"],
        ["argument --n_test_prompts: expected an integer >= 0, got '-1'"],
        [out],
    )


def demo_output_under_file(w):
    out = w.regular_file() / "data"
    return Case(
        "generate_demo_data.py",
        ["--output_dir", str(out), "--n_prompts", "30"],
        [f"--output_dir {out}: cannot create directory (Not a directory)"],
        [out.parent.parent],
    )


def demo_over_real_data(w):
    data = w.data_copy()
    (data / "demo_config.json").unlink()
    return Case(
        "generate_demo_data.py",
        ["--output_dir", str(data), "--n_prompts", "30"],
        [f"--output_dir {data} holds embedding data that is not a demo; refusing to overwrite it"],
        [data],
    )


# --- step5_train_rms.py ---
def step5(
    w: Workspace,
    expected: list[str],
    *flags: str,
    data: Path | None = None,
    out: Path | None = None,
    subprocess: bool = False,
) -> Case:
    data, out = data or w.demo, out or w.tmp / "out"
    return Case(
        "step5_train_rms.py",
        ["--data_dir", str(data), "--output_dir", str(out), "--ensemble_number", "1", "--training_epochs", "1", *flags],
        expected,
        [out, data],
        subprocess=subprocess,
    )


def step5_unknown_objective(w):
    return step5(w, ["argument --rm_objective: invalid choice: 'foo'"], "--rm_objective", "foo", subprocess=True)


def step5_non_numeric_n_sample(w):
    return step5(w, ["argument --n_sample: expected a positive integer, got 'ten'"], "--n_sample", "ten")


def step5_negative_n_sample(w):
    return step5(w, ["argument --n_sample: expected a positive integer, got '-3'"], "--n_sample", "-3")


def step5_zero_ensemble(w):
    return step5(w, ["argument --ensemble_number: expected a positive integer, got '0'"], "--ensemble_number", "0")


def step5_nan_annotation_quality(w):
    return step5(
        w, ["argument --annotation_quality: expected a finite number, got 'nan'"], "--annotation_quality", "nan"
    )


def step5_consider_first_n_zero(w):
    return step5(w, ["--consider_first_n must be > 0, -1 or -2, got 0"], "--consider_first_n", "0")


def step5_n_sample_leaves_too_few(w):
    return step5(
        w, ["--n_sample (N_SAMPLE) 250 + --eval_prompts (EVAL_PROMPTS) 130 exceed the 260 prompts"], "--n_sample", "250"
    )


def step5_eval_pool_too_small(w):
    return step5(w, ["--eval_prompts (EVAL_PROMPTS) 10: need at least 20"], "--eval_prompts", "10")


def step5_n_pairs_exceed_candidates(w):
    return step5(
        w,
        [
            "--n_pairs (N_PAIRS) 10 exceeds the 2 candidate responses per prompt",
            "raise --consider_first_n (CONSIDER_FIRST_N)",
        ],
        "--n_pairs",
        "10",
    )


def step5_truncated_npy(w):
    data = w.data_copy()
    path = truncate(data / "EMBD-TRAIN-split_1.npy", 1000)
    return step5(w, [f"cannot read embeddings {path}"], data=data)


def step5_object_npy(w):
    data = w.data_copy()
    path = data / "EMBD-TRAIN-split_0.npy"
    np.save(path, np.array([{"a": 1}] * 260, dtype=object), allow_pickle=True)
    return step5(
        w,
        [f"cannot read embeddings {path} (expected a .npy file of float32 or float16 numbers)", "Python objects"],
        data=data,
    )


def step5_int_npy(w):
    data = w.data_copy()
    path = data / "EMBD-TRAIN-split_2.npy"
    np.save(path, np.zeros((260, D), np.int64))
    return step5(w, [f"{path}: expected float32 or float16 embeddings, got int64"], data=data)


def step5_3d_npy(w):
    data = w.data_copy()
    path = data / "EMBD-TRAIN-split_0.npy"
    np.save(path, np.zeros((260, D, 1), np.float32))
    return step5(w, [f"{path}: expected a 2-D (N, D) array, got shape (260, {D}, 1)"], data=data)


def step5_rewards_missing_line(w):
    data = w.data_copy()
    path = edit_lines(data / "rewards_split_1.json", lambda lines: lines.pop(100))
    return step5(w, [f"{path}: 259 rewards, expected 260 (rows of EMBD-TRAIN-split_1.npy)"], data=data)


def step5_splits_of_different_d(w):
    data = w.data_copy()
    path = data / "EMBD-TRAIN-split_5.npy"
    np.save(path, np.zeros((260, D - 1), np.float32))
    return step5(w, [f"{path}: shape (260, {D - 1}) differs from EMBD-TRAIN-split_0.npy's (260, {D})"], data=data)


def step5_output_under_file(w):
    out = w.regular_file() / "out"
    return step5(w, [f"--output_dir {out}: cannot create directory (Not a directory)"], out=out)


def step5_output_in_proc(w):
    out = Path("/proc/no_such_dir")  # /proc refuses mkdir, even for root
    return step5(w, [f"--output_dir {out}: cannot create directory"], out=out)


# --- step6_eval_rms.py ---
def step6(
    w: Workspace,
    expected: list[str],
    *flags: str,
    run: Path | None = None,
    data: Path | None = None,
    subprocess: bool = False,
) -> Case:
    run = run or w.run_copy()
    argv = ["--output_dir", str(run), *(["--data_dir", str(data)] if data else []), *flags]
    return Case("step6_eval_rms.py", argv, expected, [run, *([data] if data else [])], subprocess=subprocess)


def step6_foreign_checkpoint(w):
    run = w.run_copy()
    path = w.member(run, 1)
    torch.save(torch.nn.Linear(D, 1).state_dict(), path)  # another architecture's state_dict
    return step6(w, [f"{path}: not an MLP checkpoint (expected keys ['fc1.bias', 'fc1.weight'"], run=run)


def step6_member_of_another_architecture(w):
    run = w.run_copy()
    path = w.member(run, 1)
    torch.save(mlp_state(D, (16, 8)), path)
    return step6(w, [f"{path}: layers {D}->16->8->1 differ from {w.member(run, 0).name}'s {D}->1024->512->1"], run=run)


def step6_test_set_of_other_d(w):
    data = w.data_copy()
    for k in range(40):
        np.save(data / f"EMBD-TEST-split_{k}.npy", np.zeros((6, 16), np.float32))
    return step6(
        w,
        [
            f"{data / 'EMBD-TEST-split_0.npy'}: test embeddings have D=16, the training embeddings "
            f"(EMBD-TRAIN-split_0.npy) D={D}"
        ],
        data=data,
    )


def step6_truncated_test_npy(w):
    data = w.data_copy()
    path = truncate(data / "EMBD-TEST-split_3.npy", 100)
    return step6(w, [f"cannot read embeddings {path}"], data=data)


def step6_test_rewards_missing_line(w):
    data = w.data_copy()
    path = edit_lines(data / "rewards_test_split_2.json", lambda lines: lines.pop())
    return step6(w, [f"{path}: 5 rewards, expected 6"], data=data)


def step6_nan_annotation_quality(w):
    return step6(
        w, ["argument --annotation_quality: expected a finite number, got 'nan'"], "--annotation_quality", "nan"
    )


def step6_corrupt_manifest(w):
    run = w.run_copy()
    path = truncate(run / "orm_manifest.json", 40)
    return step6(w, [f"ORM manifest (run step5_train_rms.py first) {path} is not readable JSON"], run=run)


def step6_zero_bon_draws(w):
    return step6(w, ["argument --bon_draws: expected a positive integer, got '0'"], "--bon_draws", "0", subprocess=True)


# --- step7_isotonic_distillation.py ---
def step7(
    w: Workspace,
    expected: list[str],
    *flags: str,
    run: Path | None = None,
    data: Path | None = None,
    subprocess: bool = False,
) -> Case:
    run = run or w.run_copy()
    argv = ["--output_dir", str(run), *(["--data_dir", str(data)] if data else []), "--distill_epochs", "1", *flags]
    return Case(
        "step7_isotonic_distillation.py", argv, expected, [run, *([data] if data else [])], subprocess=subprocess
    )


def step7_teacher_of_other_embedding_size(w):
    path = w.checkpoint("teacher16.ckpt", mlp_state(16))
    return step7(
        w, [f"{path}: checkpoint expects embeddings of size D=16, data has D={D}"], "--teacher_ckpt", str(path)
    )


def step7_corrupt_teacher(w):
    path = w.tmp / "corrupt.ckpt"
    path.write_bytes(b"PK\x03\x04 truncated zip")
    return step7(w, [f"{path}: not a readable weights-only PyTorch checkpoint"], "--teacher_ckpt", str(path))


def step7_teachers_of_two_architectures(w):
    run = w.run_copy()
    small = w.checkpoint("small.ckpt", mlp_state(D, (8, 4)))
    return step7(
        w,
        [f"{small}: layers {D}->8->4->1 differ from", f"{D}->1024->512->1"],
        "--teacher_ckpt",
        str(w.member(run, 0)),
        str(small),
        run=run,
    )


def step7_unknown_isotonic_variant(w):
    return step7(w, ["argument --isotonic_variant: invalid choice: 'magic'"], "--isotonic_variant", "magic")


def step7_one_cv_fold(w):
    return step7(w, ["--cv_folds must be at least 2, got 1"], "--cv_folds", "1", subprocess=True)


def step7_float64_npy(w):
    data = w.data_copy()
    path = data / "EMBD-TRAIN-split_9.npy"
    np.save(path, np.zeros((260, D), np.float64))
    return step7(w, [f"{path}: expected float32 or float16 embeddings, got float64"], data=data)


def step7_reward_string_value(w):
    data = w.data_copy()
    path = edit_lines(data / "rewards_split_3.json", lambda lines: lines.__setitem__(7, '{"reward": "high"}'))
    return step7(w, [f"{path} line 8: reward must be a finite number, got 'high'"], data=data)


def step7_negative_seed(w):
    return step7(w, ["argument --student_seed: expected a non-negative integer seed, got '-1'"], "--student_seed", "-1")


# --- step8_validate_distillation.py ---
def step8(
    w: Workspace,
    expected: list[str],
    *flags: str,
    run: Path | None = None,
    data: Path | None = None,
    subprocess: bool = False,
) -> Case:
    run = run or w.distilled_copy()
    argv = ["--output_dir", str(run), *(["--data_dir", str(data)] if data else []), *flags]
    return Case(
        "step8_validate_distillation.py", argv, expected, [run, *([data] if data else [])], subprocess=subprocess
    )


def step8_decreasing_x_thresholds(w):
    run = w.distilled_copy()
    path = edit_json(
        run / "isotonic_student_map.json", lambda record: record.update(x_thresholds=record["x_thresholds"][::-1])
    )
    return step8(w, [f"{path}: x_thresholds must be strictly increasing"], run=run)


def step8_decreasing_y_thresholds(w):
    run = w.distilled_copy()
    path = edit_json(
        run / "isotonic_teacher_map.json", lambda record: record.update(y_thresholds=record["y_thresholds"][::-1])
    )
    return step8(w, [f"{path}: y_thresholds are not monotone non-decreasing"], run=run)


def step8_truncated_map_json(w):
    run = w.distilled_copy()
    path = truncate(run / "isotonic_teacher_map.json", 30)
    return step8(
        w,
        [f"teacher isotonic map (run step7_isotonic_distillation.py) (JSON sidecar) {path} is not readable JSON"],
        run=run,
    )


# Under the student's own name (the student map names the checkpoint it was fitted on, and step 8
# checks the maps before it reads a checkpoint whose scores the cache lacks).
STUDENT_NAME = "distilled_rm_helpful_bt.ckpt"


def step8_foreign_student(w):
    (w.tmp / "foreign").mkdir()
    path = w.checkpoint(f"foreign/{STUDENT_NAME}", {"weight": torch.zeros(1, D), "bias": torch.zeros(1)})
    return step8(w, [f"{path}: not an MLP checkpoint"], "--student_ckpt", str(path))


def step8_student_of_other_embedding_size(w):
    path = w.tmp / "student64" / STUDENT_NAME
    path.parent.mkdir()
    save_checkpoint(MLP(64, generator=torch.Generator().manual_seed(0)), path)
    return step8(
        w, [f"{path}: checkpoint expects embeddings of size D=64, data has D={D}"], "--student_ckpt", str(path)
    )


def step8_object_test_npy(w):
    data = w.data_copy()
    path = data / "EMBD-TEST-split_7.npy"
    np.save(path, np.array([None] * 6, dtype=object), allow_pickle=True)
    return step8(w, [f"cannot read embeddings {path}"], data=data)


def step8_map_of_another_teacher(w):
    run = w.distilled_copy()
    member = w.member(run, 0)
    return step8(
        w,
        [f"{run / 'isotonic_teacher_map.json'} was fitted on teacher", member.name, "pass step 7's --teacher_ckpt"],
        "--teacher_ckpt",
        str(member),
        run=run,
    )


def step8_zero_calibration_bins(w):
    return step8(
        w,
        ["argument --calibration_bins: expected a positive integer, got '0'"],
        "--calibration_bins",
        "0",
        subprocess=True,
    )


# --- convert_embeddings.py ---
def convert(
    w: Workspace, expected: list[str], repo: Path | None, *flags: str, out: Path | None = None, subprocess: bool = False
) -> Case:
    out = out or w.tmp / "converted"
    argv = [*(["--embd_dir", str(repo)] if repo else []), "--output_dir", str(out), *flags]
    return Case("convert_embeddings.py", argv, expected, [out, *([repo] if repo else [])], subprocess=subprocess)


def valid_repo_arrays(n_prompts=5, n_responses=3, dim=4):
    rng = np.random.default_rng(0)
    return (
        rng.standard_normal((n_responses, n_prompts, dim)).astype(np.float32),
        rng.standard_normal((n_responses, n_prompts)).astype(np.float32),
    )


def convert_output_under_file(w):
    out = w.regular_file() / "converted"
    return convert(
        w, [f"--output_dir {out}: cannot create directory (Not a directory)"], w.repo(*valid_repo_arrays()), out=out
    )


def convert_object_embeddings(w):
    embeddings, rewards = valid_repo_arrays()
    repo = w.repo(embeddings.astype(object), rewards)
    return convert(
        w,
        [
            f"cannot read embeddings {repo / 'EMBD_hh-rlhf-helpful-gpt4_gemma2b_gemma7b_train.npy'} "
            "(expected a .npy file of float32 or float16 numbers)",
            "Python objects",
        ],
        repo,
    )


def convert_int_embeddings(w):
    embeddings, rewards = valid_repo_arrays()
    repo = w.repo(embeddings.astype(np.int32), rewards)
    return convert(
        w,
        [
            f"{repo / 'EMBD_hh-rlhf-helpful-gpt4_gemma2b_gemma7b_train.npy'}: expected float32 or "
            f"float16 embeddings, got int32"
        ],
        repo,
    )


def convert_string_rewards(w):
    embeddings, rewards = valid_repo_arrays()
    repo = w.repo(embeddings, rewards.astype(str))
    return convert(
        w,
        [
            f"{repo / 'REWARD_hh-rlhf-helpful-gpt4_rmmistral7b_gemma7b_train.npy'}: expected "
            f"real-valued rewards, got dtype <U"
        ],
        repo,
    )


def convert_truncated_rewards(w):
    repo = w.repo(*valid_repo_arrays())
    path = truncate(repo / "REWARD_hh-rlhf-helpful-gpt4_rmmistral7b_gemma7b_train.npy", 140)
    return convert(w, [f"cannot read rewards {path} (expected a .npy file of real numbers)"], repo)


def convert_zero_max_prompts(w):
    return convert(
        w,
        ["argument --max_prompts: expected a positive integer, got '0'"],
        w.repo(*valid_repo_arrays()),
        "--max_prompts",
        "0",
        subprocess=True,
    )


# --- new classes: seeds and numbers out of range, divergence, damaged artifacts, write errors ---
def step5_negative_seed(w):
    return step5(
        w, ["argument --seed: expected a non-negative integer seed, got '-1'"], "--seed", "-1", subprocess=True
    )


def step5_huge_ensemble(w):
    return step5(
        w,
        ["argument --ensemble_number: expected a positive integer up to 2147483647, got '99999999999'"],
        "--ensemble_number",
        "99999999999",
    )


def step5_learning_rate_beyond_float_range(w):
    return step5(w, ["argument --learning_rate: expected a finite number, got '1e999'"], "--learning_rate", "1e999")


def step5_val_fraction_one(w):
    return step5(
        w, ["argument --val_fraction: expected a number strictly between 0 and 1, got '1'"], "--val_fraction", "1"
    )


def step5_unknown_early_stopping(w):
    return step5(w, ["argument --early_stopping: invalid choice: 'early'"], "--early_stopping", "early")


def step5_negative_weight_decay(w):
    return step5(w, ["argument --weight_decay: expected a number >= 0, got '-1'"], "--weight_decay", "-1")


def step5_negative_min_val_pairs(w):
    return step5(w, ["argument --min_val_pairs: expected an integer >= 0, got '-2'"], "--min_val_pairs", "-2")


def step5_pooled_diverges(w):
    case = step5(
        w,
        [
            "error: ORM members diverged (best pooled validation loss",
            "lower --learning_rate (LEARNING_RATE in run_all.sh), now 10",
        ],
        "--learning_rate",
        "10",
        "--n_sample",
        "120",
        "--early_stopping",
        "pooled",
        "--ensemble_number",
        "2",
    )
    case.recovery = [arg if arg != "10" else "0.001" for arg in case.argv]
    return case


def step5_diverges(w):
    case = step5(
        w,
        [
            "error: ORM member 0 diverged (best validation loss",
            "more than 2x the untrained model's",
            "lower --learning_rate (LEARNING_RATE in run_all.sh), now 10",
        ],
        "--min_val_pairs",  # early stopping on the 12 validation pairs (one epoch: the training loss cannot tell)
        "0",
        "--learning_rate",
        "10",
        "--n_sample",
        "120",
        subprocess=True,
    )
    case.recovery = case.argv[:-4] + ["--n_sample", "120"]
    return case


def step5_file_size_limit(w):
    """A full disk or a file-size limit while a checkpoint is written: one line naming the file."""
    out = w.tmp / "out"
    case = step5(
        w, [f"error: cannot write {out}/XPrompt_mlp_bt_0_seed6_", ".ckpt: File too large"], out=out, subprocess=True
    )
    case.file_size_limit, case.recovery = 100_000, case.argv
    return case


def demo_negative_seed(w):
    out = w.tmp / "data"
    return Case(
        "generate_demo_data.py",
        ["--output_dir", str(out), "--seed", "-1"],
        ["argument --seed: expected a non-negative integer seed, got '-1'"],
        [out],
        absent=[out],
    )


def step6_negative_eval_seed(w):
    return step6(w, ["argument --eval_seed: expected a non-negative integer seed, got '-5'"], "--eval_seed", "-5")


def step6_manifest_without_config(w):
    run = w.run_copy()
    path = edit_json(run / "orm_manifest.json", lambda record: record.pop("config"))
    case = step6(w, [f"{path}: key 'config' must be an object, got nothing"], run=run)
    case.recovery = ["--output_dir", str(run)]
    case.fix = lambda: shutil.copy(w._run / "orm_manifest.json", path)
    return case


def step6_partition_with_a_string_role(w):
    run = w.run_copy()
    path = edit_json(run / "prompt_split.json", lambda record: record.update(held_out="all"))
    return step6(w, [f"{path}: key 'held_out' must be a list of integer prompt ids, got \"all\""], run=run)


def step6_partition_with_nested_ids(w):
    run = w.run_copy()
    path = edit_json(run / "prompt_split.json", lambda record: record.update(held_out=[record["held_out"]]))
    return step6(w, [f"{path}: key 'held_out' must be a list of integer prompt ids, got [["], run=run)


def step6_plot_beyond_file_size_limit(w):
    """JSON and plot are written together: a write error in either leaves neither (and no traceback)."""
    run = w.run_copy()
    step6_eval_rms.main(["--output_dir", str(run), "--bon_draws", "5"])  # scores cached; then drop the results
    for name in ("eval_results_bt.json", "eval_best_of_n_bt.png", "training_curves_bt.png"):
        (run / name).unlink()
    case = step6(w, [f"error: cannot write {run}/", ": File too large"], "--bon_draws", "5", run=run, subprocess=True)
    case.file_size_limit, case.recovery = 40_000, case.argv
    return case


def step6_manifest_member_without_numeric_history(w):
    run = w.run_copy()
    path = edit_json(run / "orm_manifest.json", lambda record: record.update(members=[1]))
    return step6(
        w,
        [f"{path}: key 'members' must be a list of member records with numeric per-epoch histories, got [1]"],
        run=run,
    )


def step7_manifest_config_is_a_list(w):
    run = w.run_copy()
    path = edit_json(run / "orm_manifest.json", lambda record: record.update(config=[1, 2]))
    return step7(w, [f"{path}: key 'config' must be an object, got [1, 2]"], run=run)


def step7_manifest_seed_is_a_string(w):
    run = w.run_copy()
    path = edit_json(run / "orm_manifest.json", lambda record: record["config"].update(seed="6"))
    return step7(w, [f"{path}: key 'config' -> 'seed' must be a non-negative integer seed, got \"6\""], run=run)


def step7_student_diverges(w):
    case = step7(
        w,
        [
            "error: student diverged (best validation loss",
            "lower --student_learning_rate (DISTILL_LEARNING_RATE in run_all.sh), now 10",
        ],
        "--student_learning_rate",
        "10",
        subprocess=True,
    )
    case.recovery = case.argv[:-2]
    return case


def step8_manifest_checkpoints_of_wrong_type(w):
    run = w.distilled_copy()
    path = edit_json(run / "orm_manifest.json", lambda record: record.update(checkpoints=5))
    return step8(w, [f"{path}: key 'checkpoints' must be a non-empty list of checkpoint file names, got 5"], run=run)


def step8_manifest_checkpoint_outside_the_folder(w):
    run = w.distilled_copy()
    path = edit_json(run / "orm_manifest.json", lambda record: record.update(checkpoints=["../x.ckpt"]))
    return step8(w, [f"{path}: key 'checkpoints' must be a non-empty list of checkpoint file names"], run=run)


def step8_seed_beyond_range(w):
    return step8(
        w,
        ["argument --eval_seed: expected a non-negative integer seed up to 4294967295, got '4294967296'"],
        "--eval_seed",
        "4294967296",
    )


def run_all_learning_rate_10_diverges(w):
    data = w.data_copy()
    (data / "demo_config.json").unlink()  # real data: used as it is
    case = run_all_case(
        w,
        ["error: ORM member 0 diverged", "lower --learning_rate (LEARNING_RATE in run_all.sh), now 10"],
        settings_error=False,
        data=data,
        LEARNING_RATE="10",
        EVAL_PROMPTS="100",
        MIN_VAL_PAIRS="0",
    )
    case.recovery = {"LEARNING_RATE": "0.001"}
    return case


def nan_state(dim: int) -> dict:
    """A checkpoint whose weights hold NaN (a corrupted file that torch still reads)."""
    state = mlp_state(dim)
    state["fc2.weight"][3, 5] = float("nan")
    return state


def step6_member_with_nan_weights(w):
    run = w.run_copy()
    path = w.member(run, 1)
    torch.save(nan_state(D), path)
    return step6(w, [f"{path}: non-finite weights (NaN or inf) in fc2.weight; the checkpoint is damaged"], run=run)


def step6_member_whose_scores_overflow(w):
    run = w.run_copy()
    path = w.member(run, 0)
    state = mlp_state(D)
    state["fc3.weight"].fill_(3e38)  # finite weights, scores beyond float32
    torch.save(state, path)
    return step6(
        w, [f"{path}: non-finite scores (the weights overflow float32 on these embeddings)"], run=run, subprocess=True
    )


def step7_teacher_with_nan_weights(w):
    path = w.checkpoint("nan_teacher.ckpt", nan_state(D))
    return step7(w, [f"{path}: non-finite weights (NaN or inf) in fc2.weight"], "--teacher_ckpt", str(path))


def step8_student_with_nan_weights(w):
    path = w.tmp / "nan_student" / STUDENT_NAME
    path.parent.mkdir()
    torch.save(nan_state(D), path)
    return step8(w, [f"{path}: non-finite weights (NaN or inf) in fc2.weight"], "--student_ckpt", str(path))


def step6_test_set_out_of_order(w):
    data = w.data_copy()
    low, high = (data / f"rewards_test_split_{k}.json" for k in (0, 39))
    low_text, high_text = low.read_text(), high.read_text()
    low.write_text(high_text)
    high.write_text(low_text)
    return step6(w, [f"prompt 0 (line 1) is not sorted ascending by reward across splits: {low} has"], data=data)


def step5_rewards_not_utf8(w):
    data = w.data_copy()
    path = data / "rewards_split_3.json"
    path.write_bytes(path.read_bytes().replace(b'{"reward"', b'{"r\xe9ward"', 1))
    return step5(w, [f"rewards file {path} line 1: not UTF-8 text (byte 0xe9 at offset 3)"], data=data, subprocess=True)


def step5_every_pair_ties(w):
    data = w.data_copy()
    for path in data.glob("rewards_split_*.json"):
        path.write_text('{"reward": 0.5}\n' * 260)
    return step5(
        w, ["all 100 training pairs tie in golden reward", "nothing to train on"], "--n_sample", "100", data=data
    )


def run_all_run_state_unwritable(w):
    """A records folder that cannot be made (a file in its place: stops root too, unlike permissions)."""
    data, out = w.data_copy(), w.tmp / "out"
    (data / "demo_config.json").unlink()  # real data: used as it is
    out.mkdir()
    (out / ".run_state").write_text("a file where the records' folder goes\n")
    return run_all_case(
        w,
        [f"error: {out}/.run_state/step5.json: Not a directory"],
        settings_error=False,
        data=data,
        output=out,
        EVAL_PROMPTS="100",
    )


# --- LightGBM members (step 5 --rm_model lgbm) ---
def step5_unknown_rm_model(w):
    return step5(w, ["argument --rm_model: invalid choice: 'xgboost'"], "--rm_model", "xgboost")


def step6_damaged_lgbm_member(w):
    run = w.lgbm_copy()
    path = w.member(run, 1)
    text = path.read_text()
    at = text.index("leaf_value=") + len("leaf_value=") + 1  # one digit of a leaf's value
    path.write_text(text[:at] + ("7" if text[at] != "7" else "3") + text[at + 1 :])
    return step6(w, [f"{path}: sha256 differs from the one step 5 recorded in the manifest"], run=run)


def step6_truncated_lgbm_member_without_a_recorded_hash(w):
    run = w.lgbm_copy()
    path = w.member(run, 0)
    edit_json(run / "orm_manifest.json", lambda m: [member.pop("sha256") for member in m["members"]])
    text = path.read_text()
    path.write_text(text[: text.index("Tree=1") + 40])  # cut inside a tree: LightGBM's parser would abort
    return step6(w, [f"{path}: incomplete LightGBM model (truncated or damaged"], run=run, subprocess=True)


def step7_lgbm_teacher_with_a_line_cut_out_of_a_tree(w):
    run = w.lgbm_copy()
    path = w.tmp / "teacher.txt"
    text = w.member(run, 0).read_text()
    start = text.index("Tree=0")
    cut = text.index("\nshrinkage=", start)  # one line of tree 0 gone: the later trees move
    path.write_text(text[:cut] + text[text.index("\n", cut + 1) :])
    return step7(
        w, [f"{path}: damaged LightGBM model (tree 1 is not where its header puts it)"], "--teacher_ckpt", str(path),
        run=run, subprocess=True,
    )  # fmt: skip


def step7_foreign_lgbm_teacher(w):
    path = w.checkpoint("foreign.txt", mlp_state(D))  # a torch checkpoint under a LightGBM model's suffix
    return step7(w, [f"{path}: not a LightGBM text model"], "--teacher_ckpt", str(path))


def step7_lgbm_teacher_of_other_embedding_size(w):
    import lightgbm as lgb

    rng = np.random.default_rng(0)
    rows = rng.normal(size=(200, 16))
    params = {"objective": "binary", "verbosity": -1, "num_threads": 1, "deterministic": True}
    booster = lgb.train(params, lgb.Dataset(rows, (rows[:, 0] > 0).astype(float)), 3)
    path = w.tmp / "teacher16.txt"
    path.write_text(booster.model_to_string())
    return step7(w, [f"{path}: model expects embeddings of size D=16, data has D={D}"], "--teacher_ckpt", str(path))


NEW_CASES = [
    step5_every_pair_ties,
    step5_rewards_not_utf8,
    run_all_run_state_unwritable,
    step5_unknown_rm_model,
    step6_damaged_lgbm_member,
    step6_truncated_lgbm_member_without_a_recorded_hash,
    step7_lgbm_teacher_with_a_line_cut_out_of_a_tree,
    step7_foreign_lgbm_teacher,
    step7_lgbm_teacher_of_other_embedding_size,
    step6_test_set_out_of_order,
    step6_member_with_nan_weights,
    step6_member_whose_scores_overflow,
    step7_teacher_with_nan_weights,
    step8_student_with_nan_weights,
    step5_negative_seed,
    step5_huge_ensemble,
    step5_learning_rate_beyond_float_range,
    step5_val_fraction_one,
    step5_diverges,
    step5_unknown_early_stopping,
    step5_negative_weight_decay,
    step5_negative_min_val_pairs,
    step5_pooled_diverges,
    step5_file_size_limit,
    demo_negative_seed,
    step6_negative_eval_seed,
    step6_manifest_without_config,
    step6_manifest_member_without_numeric_history,
    step6_partition_with_a_string_role,
    step6_partition_with_nested_ids,
    step6_plot_beyond_file_size_limit,
    step7_manifest_config_is_a_list,
    step7_manifest_seed_is_a_string,
    step7_student_diverges,
    step8_manifest_checkpoints_of_wrong_type,
    step8_manifest_checkpoint_outside_the_folder,
    step8_seed_beyond_range,
    run_all_learning_rate_10_diverges,
]


CASES = [
    *RUN_ALL_SETTINGS,
    run_all_output_under_file,
    run_all_data_under_file,
    run_all_output_in_use,
    run_all_splits_of_different_d,
    demo_one_split,
    demo_negative_test_prompts,
    demo_output_under_file,
    demo_over_real_data,
    step5_unknown_objective,
    step5_non_numeric_n_sample,
    step5_negative_n_sample,
    step5_zero_ensemble,
    step5_nan_annotation_quality,
    step5_consider_first_n_zero,
    step5_n_sample_leaves_too_few,
    step5_eval_pool_too_small,
    step5_n_pairs_exceed_candidates,
    step5_truncated_npy,
    step5_object_npy,
    step5_int_npy,
    step5_3d_npy,
    step5_rewards_missing_line,
    step5_splits_of_different_d,
    step5_output_under_file,
    step5_output_in_proc,
    step6_foreign_checkpoint,
    step6_member_of_another_architecture,
    step6_test_set_of_other_d,
    step6_truncated_test_npy,
    step6_test_rewards_missing_line,
    step6_nan_annotation_quality,
    step6_corrupt_manifest,
    step6_zero_bon_draws,
    step7_teacher_of_other_embedding_size,
    step7_corrupt_teacher,
    step7_teachers_of_two_architectures,
    step7_unknown_isotonic_variant,
    step7_one_cv_fold,
    step7_float64_npy,
    step7_reward_string_value,
    step7_negative_seed,
    step8_decreasing_x_thresholds,
    step8_decreasing_y_thresholds,
    step8_truncated_map_json,
    step8_foreign_student,
    step8_student_of_other_embedding_size,
    step8_object_test_npy,
    step8_map_of_another_teacher,
    step8_zero_calibration_bins,
    convert_output_under_file,
    convert_object_embeddings,
    convert_int_embeddings,
    convert_string_rewards,
    convert_truncated_rewards,
    convert_zero_max_prompts,
    *NEW_CASES,
]


# --------------------------------------------------------------------------------------------
# The check
# --------------------------------------------------------------------------------------------
def listing(folder: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime_ns) of every file under ``folder``, hidden ones included ({} if absent)."""
    if not folder.is_dir():
        return {}
    return {
        path.relative_to(folder).as_posix(): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in folder.rglob("*")
        if path.is_file()
    }


def run_script(
    case: Case, cwd: Path, argv: list[str], env: dict[str, str], file_size_limit: int | None = None
) -> subprocess.CompletedProcess:
    if case.script == "run_all.sh":
        command = ["bash", str(ROOT / "run_all.sh")]
        env = {**os.environ, "PYTHON": sys.executable, **RUN_ALL_ENV, **env}
    else:
        command = [sys.executable, str(ROOT / case.script), *argv]
        env = dict(os.environ)

    def limit_file_size():  # Python ignores SIGXFSZ, so a write past the limit fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    return subprocess.run(
        command,
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=limit_file_size if file_size_limit else None,
    )


def run_subprocess(case: Case, cwd: Path) -> str:
    """Run the script for real; return its one stderr line after checking status and traceback."""
    proc = run_script(case, cwd, case.argv, case.env, case.file_size_limit)
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.mark.parametrize("make_case", CASES, ids=lambda make: make.__name__)
def test_bad_input_exits_2_with_one_line_and_no_artifact(
    make_case, demo_dir, trained_run, distilled_run, lgbm_run, tmp_path, capsys
):
    case = make_case(Workspace(tmp_path, demo_dir, trained_run, distilled_run, lgbm_run))
    before = {folder: listing(folder) for folder in case.watched}
    lock = None
    if case.lock is not None:
        lock = os.open(case.lock, os.O_RDONLY)
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        if case.subprocess or case.script == "run_all.sh":
            err = run_subprocess(case, tmp_path)
        else:
            err = run_failing(MAINS[case.script], case.argv, capsys)
    finally:
        if lock is not None:
            os.close(lock)
    for fragment in case.expected:
        assert fragment in err, err
    for folder, files in before.items():
        assert listing(folder) == files, f"{folder} changed"
    for folder in case.absent:
        assert not folder.exists(), f"{folder} was created"
    if case.recovery is not None:  # the same command with the input fixed succeeds
        case.fix()
        if isinstance(case.recovery, dict):
            proc = run_script(case, tmp_path, [], {**case.env, **case.recovery})
        else:
            proc = run_script(case, tmp_path, case.recovery, {})
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr


def test_the_matrix_covers_every_cpu_script_and_run_all():
    prefixes = {make.__name__.split("_")[0] for make in CASES}
    assert prefixes == {"run", "demo", "step5", "step6", "step7", "step8", "convert"}
    assert len(CASES) >= 20

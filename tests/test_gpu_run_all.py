"""RUN_GPU_STEPS=1 bash run_all.sh end to end on the CPU: tiny local models -> steps 1-4 -> 5-8."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT

sys.path.insert(0, str(ROOT / "tests"))
from tiny_models import build_tiny_setup


def gpu_env(tiny, root) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHON": sys.executable,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "RUN_GPU_STEPS": "1",
        "MODEL_NAME": str(tiny["policy-lm"]),
        "EMBED_MODEL_NAME": str(tiny["embed-left"]),
        "GOLDEN_RM": str(tiny["golden-rm"]),
        "SFT_TRAIN_FILE": str(tiny["train_prompts"]),
        "SFT_MAX_STEPS": "2",
        "TRAIN_PROMPTS_FILE": str(tiny["train_prompts"]),
        "TEST_PROMPTS_FILE": str(tiny["test_prompts"]),
        "N_TRAIN_SAMPLES": "4",
        "N_TEST_SAMPLES": "5",
        "GEN_MAX_LEN": "12",
        "GEN_BACKEND": "transformers",
        "RM_INPUT_FORMAT": "raw",
        "TP_SIZE": "1",
        "N_SAMPLE": "5",
        "ENSEMBLE_NUMBER": "2",
        "DISTILL_EPOCHS": "2",
        "DATA_DIR": str(root / "data"),
        "OUTPUT_DIR": str(root / "out"),
    }


def data_files(root: Path) -> dict[str, bytes]:
    """The data directory's files (embedding_info names the run's folder: written ROOT)."""
    return {p.name: p.read_bytes().replace(str(root).encode(), b"ROOT") for p in (root / "data").iterdir()}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_setup(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def one_machine_run(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("one_machine")
    proc = subprocess.run(
        ["bash", str(ROOT / "run_all.sh")], env=gpu_env(tiny, root), capture_output=True, text=True, timeout=900
    )
    return root, proc


def test_gpu_path_flows_into_steps_5_to_8(one_machine_run):
    root, proc = one_machine_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    for step in (
        "step 1",
        "step 2 (train)",
        "step 2 (test)",
        "step 3 (train)",
        "step 3.5",
        "step 4",
        "step 5",
        "step 6",
        "step 7",
        "step 8",
    ):
        assert f"[{step} took" in proc.stdout
    manifest = json.loads((root / "out" / "orm_manifest.json").read_text())
    assert manifest["data"]["n_splits"] == 4 and manifest["data"]["n_prompts"] == 30
    results = json.loads((root / "out" / "eval_results_bt.json").read_text())
    assert results["test"]["n_responses"] == 6 * 5


def test_printed_job_lines_reproduce_the_one_machine_data(tiny, one_machine_run, tmp_path):
    """PRINT_JOBS=lines with NUM_SHARDS=3 (the one-machine run cut the prompts into step 2's default 5
    shards), run line by line: the same data directory, then run_all.sh's steps 5-8 on it (to step 5
    here, LAST_STEP=5)."""
    env = {**gpu_env(tiny, tmp_path), "NUM_SHARDS": "3", "PRINT_JOBS": "lines", "LAST_STEP": "5"}
    proc = subprocess.run(["bash", str(ROOT / "run_all.sh")], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    lines = proc.stdout.splitlines()
    stages = [line for line in lines if line.startswith("# ")]
    assert [stage.split(":")[0] for stage in stages] == [
        "# step 1",
        "# step 2",
        "# step 3",
        "# step 3.5",
        "# step 4",
        "# step 4 --merge",
        "# steps 5-8 on the CPU",
    ]
    commands = [line for line in lines if not line.startswith("# ")]
    assert len(commands) == 1 + 2 * 3 + 2 * 3 + 1 + 3 + 1 + 1
    assert sum("step2_gen_sample.py" in c and "--num_shards 3 --shard_index 2" in c for c in commands) == 2
    env = {key: value for key, value in os.environ.items() if key != "PRINT_JOBS"}
    env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    for command in commands:  # as a scheduler would, stage after stage (here one at a time)
        step = subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True, timeout=600)
        assert step.returncode == 0, command + step.stderr[-2000:]
    assert "[step 5 took" in step.stdout and "LAST_STEP=5" in step.stdout
    assert data_files(tmp_path) == data_files(one_machine_run[0])
    assert len([name for name in data_files(tmp_path) if name.startswith("EMBD-")]) == 4 + 5


def test_printed_slurm_script_chains_the_arrays(tiny, tmp_path):
    env = {**gpu_env(tiny, tmp_path), "NUM_SHARDS": "4", "PRINT_JOBS": "slurm"}
    proc = subprocess.run(["bash", str(ROOT / "run_all.sh")], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    jobs = [line for line in proc.stdout.splitlines() if "=$(sbatch" in line]
    options = [line.split(" --wrap ")[0].split("--parsable ")[1] for line in jobs]
    assert options == [
        "$GPU_OPTS --job-name=step1",
        "$GPU_OPTS --job-name=step2_train --array=0-3 --dependency=afterok:$step1",
        "$GPU_OPTS --job-name=step2_test --array=0-3 --dependency=afterok:$step1",
        "$GPU_OPTS --job-name=step3_train --array=0-3 --dependency=afterok:$step2_train:$step2_test",
        "$GPU_OPTS --job-name=step3_test --array=0-3 --dependency=afterok:$step2_train:$step2_test",
        "$CPU_OPTS --job-name=step3_5 --dependency=afterok:$step3_train:$step3_test",
        "$GPU_OPTS --job-name=step4 --array=0-3 --dependency=afterok:$step3_5",
        "$CPU_OPTS --job-name=step4_merge --dependency=afterok:$step4",
        "$CPU_OPTS --job-name=steps5_8 --dependency=afterok:$step4_merge",
    ]
    assert all("--shard_index" not in line for line in jobs)  # each array task's index is SLURM's
    assert "--merge --num_shards 4" in jobs[7] and "--num_shards 4" in jobs[6]
    assert not (tmp_path / "out").exists() and not (tmp_path / "data").exists()


def test_gpu_variables_are_validated_before_any_work(tmp_path):
    for name, value, fragment in (
        ("RM_INPUT_FORMAT", "jinja", "RM_INPUT_FORMAT: invalid choice: 'jinja' (choose from 'raw', 'chat_template')"),
        ("TP_SIZE", "0", "TP_SIZE: expected a positive integer, got '0'"),
    ):
        env = {
            **os.environ,
            "RUN_GPU_STEPS": "1",
            name: value,
            "OUTPUT_DIR": str(tmp_path / "out"),
            "DATA_DIR": str(tmp_path / "data"),
        }
        proc = subprocess.run(["bash", str(ROOT / "run_all.sh")], env=env, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and fragment in proc.stderr, proc.stderr
        assert not (tmp_path / "out").exists() and not (tmp_path / "data").exists()

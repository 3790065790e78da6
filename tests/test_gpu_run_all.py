"""RUN_GPU_STEPS=1 bash run_all.sh end to end on the CPU: tiny local models -> steps 1-4 -> 5-8."""

import json
import os
import subprocess
import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "tests"))
from tiny_models import build_tiny_setup


def test_gpu_path_flows_into_steps_5_to_8(tmp_path):
    tiny = build_tiny_setup(tmp_path / "tiny")
    env = {
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
        "DATA_DIR": str(tmp_path / "data"),
        "OUTPUT_DIR": str(tmp_path / "out"),
    }
    proc = subprocess.run(["bash", str(ROOT / "run_all.sh")], env=env, capture_output=True, text=True, timeout=900)
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
    manifest = json.loads((tmp_path / "out" / "orm_manifest.json").read_text())
    assert manifest["data"]["n_splits"] == 4 and manifest["data"]["n_prompts"] == 30
    results = json.loads((tmp_path / "out" / "eval_results_bt.json").read_text())
    assert results["test"]["n_responses"] == 6 * 5


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

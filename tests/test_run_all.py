"""run_all.sh end to end on a small demo (its bad settings: test_bad_input_matrix.py; resuming: test_run_state.py)."""

import json
import os
import re
import subprocess
import sys

from conftest import ROOT, SMALL_RUN_ALL

import rm_data
import run_folder
import summarize_runs


def run_all(tmp_path, **env):
    full_env = {
        **os.environ,
        "PYTHON": sys.executable,
        "DATA_DIR": str(tmp_path / "data"),
        "OUTPUT_DIR": str(tmp_path / "out"),
        **SMALL_RUN_ALL,
        **env,
    }
    return subprocess.run(["bash", str(ROOT / "run_all.sh")], env=full_env, capture_output=True, text=True, timeout=600)


def test_run_all_demo_end_to_end(tmp_path):
    proc = run_all(tmp_path, CONSIDER_FIRST_N="-1", RM_OBJECTIVE="clf")
    assert proc.returncode == 0, proc.stderr[-2000:]
    manifest = json.loads((tmp_path / "out" / "orm_manifest.json").read_text())
    assert manifest["config"]["consider_first_n"] == -1 and manifest["config"]["rm_objective"] == "clf"
    results = json.loads((tmp_path / "out" / "eval_results_clf.json").read_text())
    assert results["held_out"]["n_prompts"] == 40 and results["test"]["n_prompts"] == 4
    assert "held-out prompts: 40 prompts, 400 responses" in proc.stdout
    assert "step6: held-out ensemble-mean Spearman" in proc.stdout
    # The demo has a fixed size: another N_SAMPLE or SEED keeps data/; one that does not fit beside
    # the evaluation pool is one line naming both variables.
    data_files = {path: path.stat().st_mtime_ns for path in (tmp_path / "data").iterdir()}
    proc = run_all(tmp_path, N_SAMPLE="50", SEED="8", OUTPUT_DIR=str(tmp_path / "out2"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert {path: path.stat().st_mtime_ns for path in (tmp_path / "data").iterdir()} == data_files
    proc = run_all(tmp_path, N_SAMPLE="101", OUTPUT_DIR=str(tmp_path / "out3"))
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        "error: --n_sample (N_SAMPLE) 101 + --eval_prompts (EVAL_PROMPTS) 200 exceed "
        "the 300 prompts of the data; lower --n_sample (N_SAMPLE) to at most 100 or --eval_prompts "
        "(EVAL_PROMPTS) to at most 199, or use more prompts"
    )


def test_run_all_on_published_embeddings(tmp_path):
    """USE_REPO_EMBD=1: a small synthetic repository folder is converted, then steps 5-8 run."""
    repo = tmp_path / "repo"
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks" / "make_synthetic_repo.py"),
            "--output_dir",
            str(repo),
            "--n_prompts",
            "320",
            "--n_responses",
            "6",
            "--emb_dim",
            "24",
            "--n_test_prompts",
            "5",
            "--n_test_responses",
            "30",
            "--task",
            "harmless",
            "--gen_model",
            "gemma2b",
        ],
        check=True,
        capture_output=True,
    )
    env = {
        "USE_REPO_EMBD": "1",
        "TASK": "harmless",
        "GEN_PREF_MODEL": "gemma2b",
        "EMBD_REPO_DIR": str(repo),
        "MAX_PROMPTS": "300",
    }
    proc = run_all(tmp_path, **env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    conversion = json.loads((tmp_path / "data" / "conversion.json").read_text())
    assert conversion["status"] == "complete"
    assert conversion["sets"]["train"]["n_prompts"] == 300 and conversion["sets"]["test"]["n_responses"] == 30
    manifest = json.loads((tmp_path / "out" / "orm_manifest.json").read_text())
    assert manifest["data"]["n_prompts"] == 300 and manifest["data"]["n_splits"] == 6
    results = json.loads((tmp_path / "out" / "eval_results_bt.json").read_text())
    assert results["test"]["n_prompts"] == 5 and results["test"]["n_responses"] == 150
    # A rerun finds the conversion up to date.
    proc = run_all(tmp_path, **env)
    assert proc.returncode == 0 and "up to date" in proc.stdout


def test_the_bash_scripts_spell_file_names_as_run_folder_does():
    """run_all.sh and run_sweep.sh name a few artifacts by hand: each is a constant of run_folder.py
    (or of the data folder, or run_sweep.sh's list of failed cells)."""
    known = {value for name, value in vars(run_folder).items() if name.endswith("_FILE")}
    known |= {rm_data.DEMO_CONFIG_FILE, summarize_runs.FAILED_CELLS.name}
    for script in ("run_all.sh", "run_sweep.sh"):
        text = (ROOT / script).read_text()
        spelled = set(re.findall(r"[\w.-]+\.(?:json|txt|ckpt|joblib)\b", text)) - {"cells.txt"}  # a usage example
        assert spelled <= known, (script, spelled - known)
        assert run_folder.MANIFEST_FILE in spelled, script

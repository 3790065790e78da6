"""Edges beyond bad input: undefined metrics, a backwards teacher, a corrupt score cache, Ctrl-C in a
step, run_all.sh started from another directory, waiting for a locked DATA_DIR and stopped by
SIGTERM, and steps 6 and 7 side by side. (Bad input: test_bad_input_matrix.py; in-place data edits:
test_run_state.py.)"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, STEP5_FAST
from processes import tagged, tagged_pids

import step5_train_rms
import step6_eval_rms
import step7_isotonic_distillation
import step8_validate_distillation
from calibration import fit_isotonic
from rm_data import write_rewards_jsonl
from run_folder import SCORE_CACHE_DIR
from step7_isotonic_distillation import check_teacher


def strict_json(path: Path) -> dict:
    """Parse JSON refusing NaN and Infinity, as any strict reader would."""

    def refuse(constant):
        raise AssertionError(f"{path} holds {constant}")

    return json.loads(path.read_text(), parse_constant=refuse)


def test_undefined_metrics_are_null_with_a_reason_and_n_a_in_tables(demo_copy, tmp_path, capsys):
    """Golden rewards all equal on every prompt the evaluation uses and a one-prompt test set: no NaN
    anywhere, a reason beside each null. (The ORM's training prompts keep a spread: where every
    training pair ties, step 5 refuses to train.)"""
    from rm_data import make_partition

    n_sample = int(STEP5_FAST[STEP5_FAST.index("--n_sample") + 1])
    orm_train = make_partition(260, n_sample, 0)["orm_train"]
    for k in range(10):
        rewards = np.ones(260)
        rewards[orm_train] = k  # ascending across splits, as the data contract wants
        write_rewards_jsonl(demo_copy / f"rewards_split_{k}.json", rewards)
    for path in demo_copy.glob("*-TEST-split_*.npy"):
        np.save(path, np.load(path)[:1])
    for path in demo_copy.glob("rewards_test_split_*.json"):
        write_rewards_jsonl(path, np.ones(1))
    out = str(tmp_path / "out")
    step5_train_rms.main(["--data_dir", str(demo_copy), "--output_dir", out, *STEP5_FAST])
    step6_eval_rms.main(["--output_dir", out, "--bon_draws", "5"])
    printed = capsys.readouterr().out
    results = strict_json(Path(out) / "eval_results_bt.json")
    held = results["held_out"]["ranking"]["ensemble_mean"]
    assert held["spearman_per_prompt"]["mean"] is None
    assert held["spearman_per_prompt"]["reason"] == "every prompt has constant golden rewards or predictions"
    assert held["spearman_global"] is None and "all equal" in held["spearman_global_reason"]
    assert held["pairwise_accuracy_same_prompt"]["accuracy"] is None
    test = results["test"]
    assert test["n_prompts"] == 1
    assert test["ranking"]["ensemble_mean"]["pairwise_accuracy_cross_prompt"] == {
        "accuracy": None,
        "reason": "needs at least 2 prompts",
        "n_pairs": 0,
        "n_prompts": 1,
        "n_responses": 40,
    }
    assert set(test["best_of_n"]["curves"]["ensemble_mean"]["stderr"]) == {None}
    assert test["best_of_n"]["stderr_reason"] == "a standard error over prompts needs at least 2 prompts"
    assert "n/a" in printed and "nan" not in printed
    assert (Path(out) / "eval_best_of_n_bt.png").stat().st_size > 0

    # The isotonic map of constant rewards is a constant: step 7 says so on stderr and in its JSON.
    step7_isotonic_distillation.main(["--output_dir", out, "--distill_epochs", "2", "--batch_size", "64"])
    err = capsys.readouterr().err
    assert "warning: the teacher's isotonic map is a constant (1)" in err
    check = strict_json(Path(out) / "distillation_config.json")["teacher_check"]
    assert check["isotonic_levels"] == 1 and check["calibration_spearman_per_prompt"] is None
    assert len(check["warnings"]) == 1

    step8_validate_distillation.main(["--output_dir", out, "--bon_draws", "5"])
    printed = capsys.readouterr().out
    validation = strict_json(Path(out) / "validation_results.json")
    fidelity = validation["held_out"]["distillation_fidelity"]
    assert fidelity["relative_mse"] is None and fidelity["relative_mse_reason"] == "Teacher+Isotonic is constant"
    assert validation["held_out"]["variants"]["Teacher+Isotonic"]["spearman_global"] is None
    assert "n/a" in printed and "nan" not in printed
    assert (Path(out) / "validation_table.txt").read_text() in printed + "\n"


def test_a_backwards_teacher_is_reported():
    rng = np.random.default_rng(0)
    gold = rng.standard_normal((20, 8))
    teacher = -gold + 0.01 * rng.standard_normal(gold.shape)
    imap, _ = fit_isotonic(teacher, gold, "centered")
    check = check_teacher(teacher, gold, imap)
    assert check["calibration_spearman_per_prompt"] < -0.9
    assert any("ranks the calibration prompts backwards (per-prompt Spearman -0.9" in w for w in check["warnings"])
    good = check_teacher(gold, gold, fit_isotonic(gold, gold, "centered")[0])
    assert good["warnings"] == [] and good["calibration_spearman_per_prompt"] == pytest.approx(1.0)


def test_a_corrupt_score_cache_entry_is_a_miss_and_is_recomputed(trained_run, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(trained_run, out)
    argv = ["--output_dir", str(out), "--bon_draws", "5"]
    step6_eval_rms.main(argv)
    expected = (out / "eval_results_bt.json").read_bytes()
    entries = sorted((out / SCORE_CACHE_DIR).glob("scores_*.npy"))
    assert [path.name.split("_")[1] for path in entries] == ["test", "train"]
    good = {path: path.read_bytes() for path in entries}
    entries[0].write_bytes(good[entries[0]][:200])  # truncated
    np.save(entries[1], np.zeros((2, 3), np.float32))  # readable, but of the wrong shape
    step6_eval_rms.main(argv)
    assert (out / "eval_results_bt.json").read_bytes() == expected
    assert {path: path.read_bytes() for path in entries} == good  # recomputed and rewritten


def wait_for_line(process: subprocess.Popen, fragment: str, timeout: float = 240) -> list[str]:
    """Lines of ``process.stdout`` up to the first that contains ``fragment``."""
    lines, deadline = [], time.monotonic() + timeout
    for line in process.stdout:
        lines.append(line)
        if fragment in line:
            return lines
        assert time.monotonic() < deadline, f"no {fragment!r} in {lines[-20:]}"
    raise AssertionError(f"the process ended without printing {fragment!r}: {lines[-20:]}")


def test_ctrl_c_in_a_step_is_one_line_without_traceback(demo_dir, tmp_path):
    out = tmp_path / "out"
    process = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "step5_train_rms.py"),
            "--data_dir",
            str(demo_dir),
            "--output_dir",
            str(out),
            "--n_sample",
            "120",
            "--ensemble_number",
            "50",
            "--training_epochs",
            "30",
            "--seed",
            "3",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for_line(process, "label flip rate")  # imports done, training under way
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 130
    assert err.strip() == "interrupted by SIGINT; nothing half-written was kept"
    assert not out.exists() or not any(out.iterdir())  # members are saved only once all have trained


def run_all_env(**env) -> dict:
    small = {
        "N_SAMPLE": "60",
        "ENSEMBLE_NUMBER": "2",
        "TRAINING_EPOCHS": "2",
        "DISTILL_EPOCHS": "2",
        "DEMO_PROMPTS": "160",
        "EVAL_PROMPTS": "100",
        "DEMO_EMB_DIM": "32",
        "DEMO_TEST_PROMPTS": "3",
        "DEMO_TEST_RESPONSES": "12",
    }
    return {**os.environ, "PYTHON": sys.executable, **small, **env}


def start_run_all(cwd: Path, **env) -> subprocess.Popen:
    """run_all.sh in the background; ``.tag`` names its process tree (tests/processes.py)."""
    tagged_env, tag = tagged(run_all_env(**env))
    process = subprocess.Popen(
        ["bash", str(ROOT / "run_all.sh")],
        cwd=cwd,
        env=tagged_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    process.tag = tag
    return process


def assert_unlocked(folder: Path) -> None:
    """Nothing (no orphaned step) holds run_all.sh's lock on ``folder`` once run_all.sh has exited."""
    handle = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(handle)


@pytest.mark.skipif(shutil.which("flock") is None, reason="run_all.sh locks folders with util-linux's flock")
def test_run_all_from_another_directory_waits_for_data_and_stops_on_sigterm(tmp_path):
    """Relative OUTPUT_DIR/DATA_DIR are the caller's; a locked DATA_DIR is waited for; SIGTERM to
    run_all.sh alone stops the running step too (exit 143, one line, no lock left); a rerun resumes."""
    caller = tmp_path / "caller"
    (caller / "data").mkdir(parents=True)
    env = {"OUTPUT_DIR": "out", "DATA_DIR": "data"}
    # Another run is writing the data: this one waits, and SIGTERM ends the wait.
    holder = os.open(caller / "data", os.O_RDONLY)
    fcntl.flock(holder, fcntl.LOCK_EX)
    process = start_run_all(caller, **env)
    wait_for_line(process, f"Waiting for another run_all.sh that is writing DATA_DIR '{caller}/data'")
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    os.close(holder)
    assert process.returncode == 143, err
    assert (
        err.strip() == "run_all.sh: stopped by SIGTERM during the wait for DATA_DIR; run the same command "
        "again to resume"
    )
    # Again, stopped in the middle of step 5: the step stops with it.
    process = start_run_all(caller, **env)
    wait_for_line(process, "label flip rate")
    process.send_signal(signal.SIGTERM)  # to run_all.sh alone, as a scheduler would
    _, err = process.communicate(timeout=60)
    assert process.returncode == 143, err
    assert (
        err.strip() == "run_all.sh: stopped by SIGTERM during Step 5: train the ORM ensemble; run the same "
        "command again to resume"
    )
    assert_unlocked(caller / "out")
    assert (caller / "data" / "demo_config.json").is_file() and not (ROOT / "out").exists()
    assert not (caller / "out" / "orm_manifest.json").exists()
    # The rerun finishes the job where the caller asked.
    process = start_run_all(caller, **env)
    out, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-3000:]
    assert "demo data in" in out or "up to date" in out
    assert (caller / "out" / "validation_results.json").is_file()


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="lists processes through /proc")
def test_steps_6_and_7_run_side_by_side_and_stop_together(tmp_path):
    """Step 7 runs beside step 6: SIGTERM reaches both (143, one line, no step left running); a
    failed step 6 stops step 7 (only step 6's error is shown); step 7's output follows step 6's."""
    out = tmp_path / "out"
    env = {"OUTPUT_DIR": str(out), "DATA_DIR": str(tmp_path / "data")}
    process = start_run_all(tmp_path, **env)
    wait_for_line(process, "=== Step 6")
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 143, err
    assert err.strip() == "run_all.sh: stopped by SIGTERM during steps 6 and 7; run the same command again to resume"
    assert tagged_pids(process.tag) == []
    assert not any((out / ".run_state").glob("step[67].json"))
    # Step 6 cannot write its results: its one line, status 2, and step 7 is not reported.
    (out / "eval_results_bt.json").mkdir()
    process = start_run_all(tmp_path, **env)
    stdout, err = process.communicate(timeout=600)
    assert (
        process.returncode == 2
        and err.strip().startswith("error: cannot write ")
        and len(err.strip().splitlines()) == 1
    ), err
    assert "=== Step 7" not in stdout and tagged_pids(process.tag) == []
    (out / "eval_results_bt.json").rmdir()
    process = start_run_all(tmp_path, **env, FORCE="1")  # step 7 may have finished before step 6 failed
    stdout, err = process.communicate(timeout=600)
    assert process.returncode == 0, err[-3000:]
    step6, step7, step8 = (stdout.index(f"=== Step {n}") for n in (6, 7, 8))
    assert step6 < stdout.index("step6: held-out") < step7 < stdout.index("step7: teacher isotonic") < step8


# A demo generator paused half-way through its rewrite: after the training splits, before the test
# splits and the config, until a line arrives on its stdin.
PAUSED_WRITER = """
import sys
import generate_demo_data as demo
write_set = demo.write_set
def paused(out_dir, kind, *args):
    write_set(out_dir, kind, *args)
    if kind == "train":
        print("paused", flush=True)
        sys.stdin.readline()
demo.write_set = paused
demo.main(sys.argv[1:])
"""


def test_a_hand_run_step_waits_for_a_rewrite_and_reads_the_new_data_whole(tmp_path):
    """A data folder being rewritten still holds the old data, whole; step 5 started by hand meanwhile
    waits (one line naming the writer's pid and command), then trains on the new data, whole; and a
    writer leaves the folder alone while a reader holds it."""
    import generate_demo_data
    from data_folder import hold_shared
    from rm_data import fingerprint, load_embedding_set

    data = tmp_path / "data"
    demo = ["--output_dir", str(data), "--n_prompts", "260", "--emb_dim", "16", "--n_test_prompts", "4"]
    generate_demo_data.main([*demo, "--seed", "1"])
    old_files = {p.name: p.read_bytes() for p in data.iterdir()}
    writer = subprocess.Popen(
        [sys.executable, "-c", PAUSED_WRITER, *demo, "--seed", "2"],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    reader = None
    try:
        assert wait_for_line(writer, "paused")[0].startswith("regenerating the demo data")
        assert {p.name: p.read_bytes() for p in data.iterdir()} == old_files  # the old demo, whole
        out = tmp_path / "out"
        reader = subprocess.Popen(
            [sys.executable, "step5_train_rms.py", "--data_dir", str(data), "--output_dir", str(out), *STEP5_FAST],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        first = reader.stderr.readline()
        assert first.startswith(f"waiting for {data}: pid {writer.pid} (python") and first.endswith(
            "is writing it\n"
        ), first
        assert reader.poll() is None
        writer.stdin.write("go\n")
        writer.stdin.flush()
        assert writer.wait(timeout=120) == 0, writer.stderr.read()
        _, err = reader.communicate(timeout=300)
        assert reader.returncode == 0, err
    finally:
        for process in (writer, reader):
            if process is not None and process.poll() is None:
                process.kill()
    new = load_embedding_set(data)
    assert new.n_splits == 10 and load_embedding_set(data, "test").n_splits == 100
    manifest = json.loads((out / "orm_manifest.json").read_text())
    assert manifest["data"]["fingerprint"] == fingerprint(new)
    assert json.loads((data / "demo_config.json").read_text())["seed"] == 2
    assert not list(tmp_path.glob(".data.new.*"))
    # a reader holds the folder (this process, since load_embedding_set): a writer changes nothing
    hold_shared(data)
    before = {p.name: p.stat().st_ino for p in data.iterdir()}
    result = subprocess.run(
        [sys.executable, "generate_demo_data.py", *demo, "--seed", "3"], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 2
    assert result.stderr == (
        f"error: --output_dir {data} holds demo data made with other settings (--seed 2 -> 3) and another run is "
        "reading it; wait for that run, or set another --output_dir for these settings\n"
    )
    assert {p.name: p.stat().st_ino for p in data.iterdir()} == before

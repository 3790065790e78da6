"""run_all.sh and run_sweep.sh as drivers: folder locks, a driver killed under its steps,
one folder spelled two ways, shared data, demo shapes, Ctrl-C at exit, variables named in errors,
misspelt settings, duplicate sweep seeds. (Resuming: test_run_state.py; SIGTERM and waiting for
DATA_DIR: test_edges.py; bad settings: test_bad_input_matrix.py.)"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, TINY_RUN_ALL, run_failing
from processes import tagged, tagged_pids

import cli
import convert_embeddings
import generate_demo_data
import rm_data
import run_variables

needs_flock = pytest.mark.skipif(shutil.which("flock") is None, reason="run_all.sh locks folders with flock")
needs_proc = pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="lists processes through /proc")
# The smallest run_all.sh setup: step 5 takes a few seconds on a busy machine.
QUICK = {
    **TINY_RUN_ALL,
    "LAST_STEP": "5",
    "OMP_NUM_THREADS": "1",
}
# A step 5 that trains long enough to be killed in the middle.
LONG_STEP5 = {"ENSEMBLE_NUMBER": "50", "TRAINING_EPOCHS": "30", "N_SAMPLE": "40"}


def env_for(**env) -> dict:
    return {**os.environ, "PYTHON": sys.executable, **QUICK, **env}


def run_all(cwd: Path, timeout: float = 600, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(ROOT / "run_all.sh")], cwd=cwd, env=env_for(**env), capture_output=True, text=True, timeout=timeout
    )


def start_run_all(cwd: Path, **env) -> subprocess.Popen:
    """run_all.sh in the background; ``.tag`` names its process tree (tests/processes.py)."""
    tagged_env, tag = tagged(env_for(**env))
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


def wait_for_line(process: subprocess.Popen, fragment: str, timeout: float = 300) -> None:
    deadline, lines = time.monotonic() + timeout, []
    for line in process.stdout:
        lines.append(line)
        if fragment in line:
            return
        assert time.monotonic() < deadline, f"no {fragment!r} in {lines[-20:]}"
    raise AssertionError(f"the run ended without printing {fragment!r}: {lines[-20:]} {process.stderr.read()}")


def lock_state(folder: Path) -> str:
    """'free', 'shared' (others read it) or 'exclusive', as another process's flock sees ``folder``."""
    handle = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return "free"
        except BlockingIOError:
            pass
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return "shared"
        except BlockingIOError:
            return "exclusive"
    finally:
        os.close(handle)


def wait_until_stopped(process: subprocess.Popen, out: Path, fragment: str = "", timeout: float = 120) -> None:
    """Poll until no process of ``process``'s tree (whose command line contains ``fragment``) runs;
    meanwhile OUTPUT_DIR must stay locked. Only the test's own tree: other runs of the pipeline may
    run on the machine."""
    deadline = time.monotonic() + timeout
    while tagged_pids(process.tag, fragment):
        assert lock_state(out) == "exclusive", "OUTPUT_DIR was released while a step still runs"
        assert time.monotonic() < deadline, "the step kept running after its driver was killed"
        time.sleep(0.1)


def wait_until_free(out: Path, timeout: float = 10) -> None:
    """Poll until OUTPUT_DIR's lock is free. An exiting process drops its command line (which
    ``tagged_pids`` reads) before the kernel closes its files, so on a loaded machine the lock it
    holds can outlive its name by a moment."""
    deadline = time.monotonic() + timeout
    while lock_state(out) != "free":
        assert time.monotonic() < deadline, "OUTPUT_DIR stayed locked after the run's processes had stopped"
        time.sleep(0.05)


# --------------------------------------------------------------------------------------------
# Folders: OUTPUT_DIR = DATA_DIR, one folder spelled several ways
# --------------------------------------------------------------------------------------------
@needs_flock
def test_output_dir_may_be_data_dir_and_any_spelling_is_the_same_folder(tmp_path):
    """OUTPUT_DIR = DATA_DIR runs (it used to wait for its own lock forever); the same folder given
    relative with a trailing slash, with '..', or absolute is one folder: nothing reruns, and the
    paths recorded are the canonical one."""
    (tmp_path / "runs").mkdir()
    proc = run_all(tmp_path, timeout=300, OUTPUT_DIR="runs/x", DATA_DIR="runs/x/")
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = tmp_path / "runs" / "x"
    manifest = json.loads((folder / "orm_manifest.json").read_text())
    assert manifest["data"]["data_dir"] == manifest["config"]["data_dir"] == str(folder.resolve())
    before = (folder / "orm_manifest.json").read_bytes()
    for cwd, output, data in ((tmp_path, "runs/x/", str(folder)), (folder, str(folder), "../../runs/x/.")):
        proc = run_all(cwd, timeout=300, OUTPUT_DIR=output, DATA_DIR=data)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "[step 5 up to date]" in proc.stdout, proc.stdout[-2000:]
    assert (folder / "orm_manifest.json").read_bytes() == before


# --------------------------------------------------------------------------------------------
# A driver killed under its step; a step killed under its driver
# --------------------------------------------------------------------------------------------
@needs_flock
@needs_proc
def test_a_killed_driver_stops_its_step_and_keeps_the_lock_until_then(tmp_path):
    """kill -9 of run_all.sh alone: its step stops (it watches its parent) instead of writing on,
    and OUTPUT_DIR stays locked until no process of the run is left; during the steps DATA_DIR is
    locked shared (other runs may read it, none may rewrite it)."""
    out, data = tmp_path / "out", tmp_path / "data"
    process = start_run_all(tmp_path, OUTPUT_DIR=str(out), DATA_DIR=str(data), **LONG_STEP5)
    wait_for_line(process, "label flip rate")  # step 5 is training
    assert lock_state(data) == "shared" and lock_state(out) == "exclusive"
    process.kill()
    process.wait(timeout=60)
    wait_until_stopped(process, out)
    wait_until_free(out)
    assert not (out / "orm_manifest.json").exists() and not (out / ".run_state" / "step5.json").exists()


@needs_flock
@needs_proc
def test_a_killed_wrapper_is_one_line_and_its_step_stops(tmp_path):
    """kill -9 of run_state.py (the step's wrapper): run_all.sh says which step died of which signal,
    in one line (not bash's source of its subshell), and the step stops instead of writing on."""
    out = tmp_path / "out"
    process = start_run_all(tmp_path, OUTPUT_DIR=str(out), DATA_DIR=str(tmp_path / "data"), **LONG_STEP5)
    wait_for_line(process, "label flip rate")
    (wrapper,) = tagged_pids(process.tag, "run_state.py run --output_dir")
    os.kill(wrapper, signal.SIGKILL)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 137
    assert err.strip() == (
        "run_all.sh: SIGKILL stopped Step 5: train the ORM ensemble (exit status 137); "
        "run the same command again to resume"
    )
    wait_until_stopped(process, out, "step5_train_rms.py")
    assert not (out / "orm_manifest.json").exists()


# --------------------------------------------------------------------------------------------
# Shared DATA_DIR
# --------------------------------------------------------------------------------------------
@needs_flock
def test_data_read_by_another_run_is_never_regenerated(tmp_path, capsys):
    """While another run reads DATA_DIR (a shared lock), a run with the same demo settings proceeds
    at once, and one with other DEMO_* settings stops with one line instead of regenerating it."""
    data = tmp_path / "data"
    assert run_all(tmp_path, DATA_DIR=str(data), DATA_ONLY="1").returncode == 0
    files = {path.name: path.stat().st_mtime_ns for path in data.iterdir()}
    reader = os.open(data, os.O_RDONLY)
    fcntl.flock(reader, fcntl.LOCK_SH)
    try:
        proc = run_all(tmp_path, timeout=120, DATA_DIR=str(data), DATA_ONLY="1")
        assert proc.returncode == 0 and "Waiting" not in proc.stdout, proc.stderr
        proc = run_all(tmp_path, timeout=120, DATA_DIR=str(data), DATA_ONLY="1", DEMO_PROMPTS="130")
        # generate_demo_data.py run by hand checks the lock itself.
        demo = ["--output_dir", str(data), "--n_prompts", "130", "--emb_dim", "8", "--n_test_prompts", "2"]
        err = run_failing(generate_demo_data.main, [*demo, "--n_test_responses", "6"], capsys)
        assert "holds demo data made with other settings" in err and "another run is reading it" in err
    finally:
        os.close(reader)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"error: --output_dir (DATA_DIR) {data} holds demo data made with other settings "
        "(--n_prompts (DEMO_PROMPTS) 120 -> 130) and another run is reading it; wait for that run, or set "
        "another --output_dir (DATA_DIR) for these settings"
    )
    assert {path.name: path.stat().st_mtime_ns for path in data.iterdir()} == files


def test_demo_data_of_another_shape_is_regenerated_with_a_line_saying_so(tmp_path):
    """DEMO_N_SPLITS sets K; demo data of another K is not overwritten silently."""
    data = tmp_path / "data"
    demo = ["--output_dir", str(data), "--n_prompts", "120", "--emb_dim", "8", "--n_test_prompts", "2"]
    generate_demo_data.main([*demo, "--n_test_responses", "6", "--n_splits", "3"])
    files = {path.name: path.stat().st_mtime_ns for path in data.iterdir()}
    proc = run_all(tmp_path, DATA_DIR=str(data), DATA_ONLY="1", DEMO_N_SPLITS="3")
    assert proc.returncode == 0 and "up to date" in proc.stdout, proc.stderr
    assert {path.name: path.stat().st_mtime_ns for path in data.iterdir()} == files
    proc = run_all(tmp_path, DATA_DIR=str(data), DATA_ONLY="1")
    assert proc.returncode == 0, proc.stderr
    assert f"regenerating the demo data in {data}: its settings changed (--n_splits (DEMO_N_SPLITS) 3 -> 10)" in (
        proc.stdout
    )
    assert len(list(data.glob("EMBD-TRAIN-split_*.npy"))) == 10
    proc = run_all(tmp_path, DATA_DIR=str(data), DATA_ONLY="1", DEMO_N_SPLITS="1")
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "run_all.sh: error: --n_splits (DEMO_N_SPLITS) must be at least 2 (responses to compare per prompt)"
    )


def test_a_failed_conversion_leaves_no_empty_folders(tmp_path):
    data, out = tmp_path / "data_new", tmp_path / "out_new"
    proc = run_all(
        tmp_path, USE_REPO_EMBD="1", EMBD_REPO_DIR=str(tmp_path / "missing"), DATA_DIR=str(data), OUTPUT_DIR=str(out)
    )
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not data.exists() and not out.exists()


# --------------------------------------------------------------------------------------------
# Messages: variables named, misspelt settings, sh, Ctrl-C at exit
# --------------------------------------------------------------------------------------------
def test_errors_of_a_step_under_run_all_name_the_variables(tmp_path):
    proc = run_all(tmp_path, DATA_DIR=str(tmp_path / "data"), OUTPUT_DIR=str(tmp_path / "out"), N_SAMPLE="1")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "error: --pair_mode (PAIR_MODE) xprompt needs --n_sample (N_SAMPLE) >= 2"
    step7_flags = run_variables.flag_variables("step7_isotonic_distillation.py")
    assert step7_flags["--student_learning_rate"] == "DISTILL_LEARNING_RATE" and "--learning_rate" not in step7_flags
    assert run_variables.flag_variables("step5_train_rms.py")["--learning_rate"] == "LEARNING_RATE"
    assert run_variables.flag_variables("step2_gen_sample.py")["--n_samples"] == ""  # two variables set it: not named
    assert run_variables.name_variables("--distill_epochs (TRAINING_EPOCHS) 3", "step7_isotonic_distillation.py") == (
        "--distill_epochs (DISTILL_EPOCHS) 3"
    )


def test_the_eval_prompts_advice_respects_its_minimum():
    with pytest.raises(cli.InputError) as err:
        rm_data.make_partition(300, 290, 0, rm_data.MIN_EVAL_PROMPTS)
    assert str(err.value).endswith("lower --n_sample (N_SAMPLE) to at most 280, or use more prompts")
    with pytest.raises(cli.InputError) as err:
        rm_data.make_partition(300, 101, 0, 200)
    assert "lower --n_sample (N_SAMPLE) to at most 100 or --eval_prompts (EVAL_PROMPTS) to at most 199" in str(
        err.value
    )


def test_misspelt_settings_are_warned_about(tmp_path):
    proc = run_all(tmp_path, NSAMPLE="5", n_sample="5", SEEDS="1 2", RM_OBJECTIVE="foo")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "run_all.sh: warning: NSAMPLE is not a run_all.sh setting and is ignored; did you mean N_SAMPLE?",
        "run_all.sh: warning: n_sample is not a run_all.sh setting and is ignored; did you mean N_SAMPLE?",
        "run_all.sh: error: RM_OBJECTIVE: invalid choice: 'foo' (choose from 'bt', 'clf')",
    ]


@pytest.mark.parametrize("script", ["run_all.sh", "run_sweep.sh"])
def test_sh_is_refused_in_one_line(script):
    sh = shutil.which("sh")
    if sh is None or subprocess.run([sh, "-c", 'test -n "${BASH_VERSION:-}"']).returncode == 0:
        pytest.skip("sh is bash here")
    proc = subprocess.run([sh, str(ROOT / script)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"{script}: error: run it with bash (bash {script}), not sh"
    assert os.stat(ROOT / script).st_mode & stat.S_IXUSR


@pytest.mark.parametrize("how", ["interrupted", "finished"])
def test_an_interrupt_during_exit_prints_nothing_more(tmp_path, how):
    """Ctrl-C reaches a step again (forwarded by run_all.sh and run_state.py) while it exits, after
    an interrupt or after finishing: a signal that lands in an atexit callback (torch registers some)
    prints no traceback, and counts: a finished script then exits with 130 and the one line too."""
    script = tmp_path / "step.py"
    script.write_text(
        "import atexit, os, signal, sys, time\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from cli import run_cli\n"
        "def late_signal():\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    time.sleep(0.2)\n"
        "def main(argv):\n"
        "    atexit.register(late_signal)\n"
        f"    {'raise KeyboardInterrupt' if how == 'interrupted' else 'pass'}\n"
        "run_cli(main)\n"
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stderr.strip()) == (130, "interrupted by SIGINT; nothing half-written was kept")


def test_duplicate_sweep_seeds_run_once(tmp_path):
    env = {**os.environ, "SEEDS": "1 2 1", "SWEEP": "objective", "PRINT": "1", "SWEEP_DIR": str(tmp_path)}
    proc = subprocess.run(["bash", str(ROOT / "run_sweep.sh")], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "run_sweep.sh: note: SEEDS lists a seed more than once; running each once: 1 2"
    cells = [line.split("OUTPUT_DIR=")[1].split()[0] for line in proc.stdout.splitlines()]
    assert len(cells) == 4 and len(set(cells)) == 4  # bt and clf x seeds 1 and 2


def test_a_conversion_in_use_is_not_redone(tmp_path, capsys):
    """convert_embeddings.py --in_use (run_all.sh's flag while other runs read DATA_DIR): an up-to-date
    conversion passes, one that would rewrite the folder is one line and leaves it as it was."""
    repo, data = tmp_path / "repo", tmp_path / "data"
    sizes = [
        "--n_prompts",
        "30",
        "--n_responses",
        "3",
        "--emb_dim",
        "8",
        "--n_test_prompts",
        "0",
        "--gen_model",
        "gemma7b",
    ]
    subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "make_synthetic_repo.py"), "--output_dir", str(repo), *sizes],
        check=True,
        capture_output=True,
    )
    argv = ["--embd_dir", str(repo), "--gen_model", "gemma7b", "--output_dir", str(data)]
    convert_embeddings.main(argv)
    files = {path.name: path.stat().st_mtime_ns for path in data.iterdir()}
    convert_embeddings.main([*argv, "--in_use"])
    err = run_failing(convert_embeddings.main, [*argv, "--in_use", "--max_prompts", "20"], capsys)
    assert err == (
        f"error: --output_dir {data} must be converted again (conversion.json does not match the sources and "
        "options) but another run is reading it; wait for that run, or set another --output_dir"
    )
    assert {path.name: path.stat().st_mtime_ns for path in data.iterdir()} == files


@needs_proc
@pytest.mark.parametrize("how", ["SIGTERM", "SIGKILL"])
def test_a_stopped_sweep_stops_its_cells(tmp_path, how):
    """SIGTERM to run_sweep.sh alone (a scheduler's): the running cell stops cleanly (its run_all.sh
    says so in the cell's log), no further cell starts, and the sweep ends with one line. After
    kill -9 of run_sweep.sh its watcher stops the cells the same way."""
    sweep = tmp_path / "sweeps"
    env, tag = tagged(
        env_for(
            NAME="objective",
            GRID="RM_OBJECTIVE=bt",
            SEEDS="1 2",
            JOBS="1",
            SWEEP_DIR=str(sweep),
            DATA_DIR=str(tmp_path / "data"),
            **LONG_STEP5,
        )
    )
    process = subprocess.Popen(
        ["bash", str(ROOT / "run_sweep.sh")], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    log = sweep / "objective" / "logs" / "RM_OBJECTIVE=bt,SEED=1.log"
    deadline = time.monotonic() + 300
    while not (log.is_file() and "label flip rate" in log.read_text()):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.1)
    process.send_signal(getattr(signal, how))
    _, err = process.communicate(timeout=120)
    if how == "SIGTERM":
        assert process.returncode == 143, err
        assert err.strip() == "run_sweep.sh: stopped by SIGTERM; run the same command again to finish the sweep"
    deadline = time.monotonic() + 120
    while tagged_pids(tag):
        assert time.monotonic() < deadline, "a cell kept running after the sweep was stopped"
        time.sleep(0.1)
    # The cell's run_all.sh names no sweep path on its command line: once its step has gone it may
    # still be writing its line, so wait for the line (within the deadline) rather than read once.
    while "run_all.sh: stopped by SIGTERM during Step 5" not in log.read_text():
        assert time.monotonic() < deadline, log.read_text()[-2000:]
        time.sleep(0.1)
    assert not (sweep / "objective" / "RM_OBJECTIVE=bt,SEED=2").exists()


def test_a_sweep_folder_spelled_another_way_is_the_same_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    env = {**os.environ, "SEEDS": "1", "SWEEP": "objective", "PRINT": "1", "SWEEP_DIR": "sub/../sweeps/"}
    proc = subprocess.run(
        ["bash", str(ROOT / "run_sweep.sh")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    cells = [line.split("OUTPUT_DIR=")[1].split()[0] for line in proc.stdout.splitlines()]
    assert cells == [
        str(tmp_path.resolve() / "sweeps" / "objective" / f"RM_OBJECTIVE={o},SEED=1") for o in ("bt", "clf")
    ]


@needs_flock
def test_gpu_steps_do_not_start_on_data_another_run_reads(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    reader = os.open(data, os.O_RDONLY)
    fcntl.flock(reader, fcntl.LOCK_SH)
    try:
        proc = run_all(tmp_path, timeout=120, RUN_GPU_STEPS="1", DATA_DIR=str(data), OUTPUT_DIR=str(tmp_path / "out"))
    finally:
        os.close(reader)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (
        f"run_all.sh: error: DATA_DIR '{data}' is in use by another run_all.sh, and steps 1-4 would rewrite it; "
        "wait for that run or set another DATA_DIR"
    )
    assert not (tmp_path / "out").exists()

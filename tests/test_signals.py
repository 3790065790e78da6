"""Every signal lands, at any moment: SIGINT, SIGTERM and SIGHUP sent at a sweep of delays (0 to 1 s)
into steps 5-8 and into run_all.sh. Each trial must end with the signal's status and one line (or,
where the signal came after the script had printed its result, status 0 and nothing), no process of
its tree left, and no temporary file of an atomic write (``.NAME.*.tmp``) or of run_state.py
(``.stepN.writes``) left behind. The steps are started as run_state.py starts them under run_all.sh:
with the signals blocked until their handlers are in place (interrupts.py)."""

from __future__ import annotations

import ast
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import ROOT, STEP5_FAST, TINY_RUN_ALL
from processes import tagged, tagged_pids, wait_until_gone

pytestmark = pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="watches processes through /proc")

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
DELAYS = (0.0, 0.005, 0.02, 0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0)
STEPS = {
    "5": "step5_train_rms.py",
    "6": "step6_eval_rms.py",
    "7": "step7_isotonic_distillation.py",
    "8": "step8_validate_distillation.py",
}
TRIAL_THREADS = 2


@pytest.fixture(autouse=True)
def signals_as_on_a_terminal():
    """A process inherits an ignored signal: under ``nohup`` SIGHUP is ignored (and interrupts.py rightly
    leaves it so: test_nohup_keeps_sighup_ignored), and a shell without job control starts a background
    command (``cmd &``) with SIGINT ignored, which bash then cannot trap. These tests send the signals a
    terminal sends, so their children start from the default dispositions, however pytest was started
    (a Python handler in this process is reset to the default in a child at exec)."""
    previous = {signal.SIGHUP: signal.signal(signal.SIGHUP, signal.SIG_DFL)}
    previous[signal.SIGINT] = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    for signum, handler in previous.items():
        signal.signal(signum, handler)


def step_argv(step: str, data: Path, out: Path) -> list[str]:
    if step == "5":
        return ["--data_dir", str(data), "--output_dir", str(out), *STEP5_FAST]
    if step == "7":
        return ["--output_dir", str(out), "--distill_epochs", "2", "--batch_size", "64"]
    return ["--output_dir", str(out)]


def start_blocked(argv: list[str], env: dict, cwd: Path | None = None) -> subprocess.Popen:
    """Start ``argv`` with SIGINT, SIGTERM and SIGHUP blocked (the child inherits this thread's mask)."""
    blocked = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        return subprocess.Popen(argv, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, blocked)


def signal_trial(
    process: subprocess.Popen, signum: int, delay: float, result_prefix: bytes
) -> tuple[int, str, bool, bool]:
    """Send ``signum`` to ``process`` after ``delay`` s; return its status, its stderr, whether it had
    printed its result line (``result_prefix``) before the signal was sent, and whether it had a
    handler for the signal then."""
    lines: list[tuple[float, bytes]] = []

    def read_stdout() -> None:
        for line in process.stdout:
            lines.append((time.monotonic(), line))

    reader = threading.Thread(target=read_stdout, daemon=True)
    reader.start()
    time.sleep(delay)
    caught = signal_caught(process.pid, signum)
    sent = time.monotonic()
    process.send_signal(signum)
    err = process.stderr.read().decode(errors="replace")
    process.wait(timeout=120)
    reader.join(timeout=60)
    finished_before = any(when < sent and line.startswith(result_prefix) for when, line in lines)
    return process.returncode, err, finished_before, caught


def assert_outcome(what: str, status: int, err: str, finished_before: bool, signum: int, message: str) -> None:
    if status == 0:
        assert finished_before and err == "", f"{what}: the signal was lost (status 0): {err[-2000:]}"
    else:
        assert (status, err.strip()) == (128 + signum, message), f"{what}: status {status}, stderr {err[-2000:]!r}"
        assert len(err.splitlines()) == 1, f"{what}: {err!r}"


def assert_no_leftovers(what: str, folder: Path) -> None:
    leftovers = [str(p) for p in folder.rglob(".*") if p.name.endswith((".tmp", ".writes"))]
    assert leftovers == [], f"{what}: {leftovers}"


@pytest.fixture(scope="module")
def prepared(demo_dir, distilled_run) -> dict:
    return {"data": demo_dir, "run": distilled_run}


# Started by hand (signals not blocked): SIGTERM and SIGHUP at fewer delays. Before the interpreter runs
# the script's first line (its first ~20 ms) they end it as the system's default does (status 128 + N
# as a shell sees it, no message); from that line on they are handled.
HAND_TRIALS = (
    (0.0, signal.SIGTERM),
    (0.02, signal.SIGHUP),
    (0.1, signal.SIGTERM),
    (0.3, signal.SIGHUP),
    (0.7, signal.SIGTERM),
)


@pytest.mark.parametrize("step", sorted(STEPS))
def test_a_signal_at_any_moment_stops_a_step_with_one_line(step, prepared, tmp_path):
    """Each delay once, the three signals in turn, started as run_state.py starts a step (10 trials),
    then 5 trials started by hand; two at a time."""
    script = STEPS[step]
    trials = [(delay, SIGNALS[i % len(SIGNALS)], True) for i, delay in enumerate(DELAYS)]
    trials += [(delay, signum, False) for delay, signum in HAND_TRIALS]

    def trial(index: int) -> None:
        delay, signum, blocked = trials[index]
        what = f"step {step}, {signal.Signals(signum).name} after {delay} s ({'blocked' if blocked else 'by hand'})"
        out = tmp_path / f"trial{index}"
        if step != "5":
            shutil.copytree(prepared["run"], out)
        env, tag = tagged({**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
        env.pop("RUN_ALL_REPORTS_INTERRUPTS", None)
        argv = [sys.executable, str(ROOT / script), *step_argv(step, prepared["data"], out)]
        if blocked:
            process = start_blocked(argv, env)
        else:
            process = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        status, err, finished, caught = signal_trial(process, signum, delay, f"step{step}:".encode())
        message = f"interrupted by {signal.Signals(signum).name}; nothing half-written was kept"
        if status == -signum:
            assert not blocked and not caught and err == "", f"{what}: killed with its handler in place: {err!r}"
        else:
            assert_outcome(what, status, err, finished, signum, message)
        assert tagged_pids(tag) == [], what
        if out.exists():
            assert_no_leftovers(what, out)

    with ThreadPoolExecutor(TRIAL_THREADS) as pool:
        list(pool.map(trial, range(len(trials))))


@pytest.fixture(scope="module")
def run_all_data(tmp_path_factory) -> Path:
    """Demo data for the run_all.sh trials, made once (each trial only reads it)."""
    folder = tmp_path_factory.mktemp("signals")
    env = {**os.environ, "PYTHON": sys.executable, **QUICK_RUN_ALL, "DATA_DIR": str(folder / "data")}
    subprocess.run(["bash", str(ROOT / "run_all.sh")], cwd=folder, env={**env, "DATA_ONLY": "1"}, check=True)
    return folder / "data"


# A run_all.sh run of a few seconds: every step starts within the first seconds.
QUICK_RUN_ALL = {**TINY_RUN_ALL, "THREADS": "1"}


def test_a_signal_at_any_moment_stops_run_all_with_one_line(run_all_data, tmp_path):
    """Into run_all.sh alone (a scheduler's signal): each delay once, the three signals in turn. Before
    bash has read its trap lines (its first milliseconds) a signal ends it as the system's default
    does: status 128 + N as a shell sees it, no message, and nothing started."""
    env = {**os.environ, "PYTHON": sys.executable, **QUICK_RUN_ALL, "DATA_DIR": str(run_all_data)}

    def trial(index: int) -> None:
        delay, signum = DELAYS[index], SIGNALS[index % len(SIGNALS)]
        name = signal.Signals(signum).name
        what = f"run_all.sh, {name} after {delay} s"

        def interrupt(process: subprocess.Popen, _tag: str) -> bool:
            time.sleep(delay)
            trapped = signal_caught(process.pid, signum)
            process.send_signal(signum)
            return trapped

        trapped, status, _, err = run_all_trial(what, env, tmp_path / f"trial{index}", interrupt)
        if status == -signum:
            assert not trapped and err == "", f"{what}: killed although its trap was set: {err!r}"
        else:
            assert status == 128 + signum, f"{what}: status {status}, {err[-2000:]!r}"
            lines = err.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith(f"run_all.sh: stopped by SIG{name[3:]} during "), what
            assert lines[0].endswith("; run the same command again to resume"), what

    with ThreadPoolExecutor(TRIAL_THREADS) as pool:
        list(pool.map(trial, range(len(DELAYS))))


def run_all_trial(
    what: str, env: dict, out: Path, interrupt: Callable[[subprocess.Popen, str], object], new_session: bool = False
) -> tuple[object, int, bytes, str]:
    """Start run_all.sh writing into ``out`` (its processes tagged) and signal it by ``interrupt(process,
    tag)``; once it has ended, check that no process of its tree and no temporary file is left. Returns
    what ``interrupt`` returned, run_all.sh's status, its stdout and its stderr."""
    trial_env, tag = tagged({**env, "OUTPUT_DIR": str(out)})
    process = subprocess.Popen(
        ["bash", str(ROOT / "run_all.sh")],
        cwd=out.parent,
        env=trial_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=new_session,
    )
    interrupted = interrupt(process, tag)
    stdout, err = process.communicate(timeout=120)
    wait_until_gone(tag, timeout=30)
    if out.exists():
        assert_no_leftovers(what, out)
    return interrupted, process.returncode, stdout, err.decode(errors="replace")


def signal_caught(pid: int, signum: int) -> bool:
    """Whether process ``pid`` has a handler (a bash trap) for ``signum`` now (/proc/PID/status SigCgt)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
    return bool(caught >> (signum - 1) & 1)


def test_a_step_interrupted_as_it_starts_stops_the_run(run_all_data, tmp_path):
    """Step 6 interrupted as it starts, at delays from 0 to 0.2 s: by Ctrl-C (SIGINT to the whole
    process group, as a terminal sends it) or by SIGTERM to its processes (run_state.py's wrapper and
    the step, as ``pkill -f step6_eval_rms.py`` sends it). run_all.sh stops with the signal's status
    and one line; step 8 never runs."""
    env = {**os.environ, "PYTHON": sys.executable, **QUICK_RUN_ALL, "DATA_DIR": str(run_all_data), "LAST_STEP": "8"}

    def trial(index: int, delay: float) -> None:
        signum = (signal.SIGINT, signal.SIGTERM)[index % 2]
        name = signal.Signals(signum).name
        what = f"step 6, {name} after {delay} s"

        def interrupt(process: subprocess.Popen, tag: str) -> None:
            deadline = time.monotonic() + 300
            while not (targets := tagged_pids(tag, "step6_eval_rms.py")):
                assert process.poll() is None and time.monotonic() < deadline, f"{what}: step 6 never started"
                time.sleep(0.002)
            time.sleep(delay)
            if signum == signal.SIGINT:
                os.killpg(process.pid, signum)
            for pid in targets + tagged_pids(tag, "step6_eval_rms.py") if signum == signal.SIGTERM else []:
                try:
                    os.kill(pid, signum)
                except ProcessLookupError:
                    pass

        _, status, stdout, err = run_all_trial(what, env, tmp_path / f"trial{index}", interrupt, new_session=True)
        assert status == 128 + signum, f"{what}: status {status}: {err[-2000:]!r}"
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("run_all.sh: ") and name in lines[0], f"{what}: {err!r}"
        assert lines[0].endswith("run the same command again to resume"), what
        assert b"=== Step 8" not in stdout, what

    for index, delay in enumerate((0.0, 0.01, 0.03, 0.06, 0.1, 0.2)):
        trial(index, delay)


@pytest.mark.parametrize("where", ["import", "destructor", "exit", "converted", "converted_import"])
def test_a_signal_where_python_cannot_raise_it_still_counts(where, tmp_path):
    """A SIGTERM that lands in an import (before run_cli), in a destructor (where Python prints
    "Exception ignored" and runs on), in an atexit callback after the script finished, or where a
    library turns it into another error (numpy's C extension import interrupted raises ImportError),
    in main or in an import: one line, status 143, nothing after it runs."""
    script = tmp_path / "step.py"
    script.write_text(
        "import interrupts\n"
        "import atexit, gc, os, signal, sys, time\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "def sigterm():\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(0.2)\n"
        "def converted():\n"
        "    try:\n"
        "        sigterm()\n"
        "    except BaseException as exc:\n"
        "        raise ImportError('PyCapsule_Import could not import module') from exc\n"
        "class Doomed:\n"
        "    def __del__(self):\n"
        "        sigterm()\n"
        + ("sigterm()\n" if where == "import" else "")
        + ("converted()\n" if where == "converted_import" else "")
        + "from cli import run_cli\n"
        "def main(argv):\n"
        + ("    Doomed()\n    gc.collect()\n" if where == "destructor" else "")
        + ("    atexit.register(sigterm)\n" if where == "exit" else "")
        + ("    converted()\n" if where == "converted" else "")
        + "    time.sleep(0.1)\n"
        "    print('ran on')\n"
        "run_cli(main)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RUN_ALL_REPORTS_INTERRUPTS", None)
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, env=env)
    assert (proc.returncode, proc.stderr.strip()) == (143, "interrupted by SIGTERM; nothing half-written was kept")
    assert ("ran on" in proc.stdout) == (where == "exit")


SCRIPTS = sorted(
    path.name for path in ROOT.glob("*.py") if "run_cli(" in path.read_text() and path.name not in ("cli.py",)
)


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_handles_signals_before_its_other_imports(script):
    """The first statement after the docstring and ``from __future__`` is ``import interrupts``."""
    tree = ast.parse((ROOT / script).read_text())
    body = [node for node in tree.body if not (isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant))]
    if isinstance(body[0], ast.ImportFrom) and body[0].module == "__future__":
        body = body[1:]
    assert isinstance(body[0], ast.Import) and [alias.name for alias in body[0].names] == ["interrupts"], script


def test_the_handlers_are_in_place_before_numpy_loads():
    """Imported by a script, interrupts.py installs its handlers at once (SIGHUP too)."""
    code = (
        "import interrupts, signal, sys\n"
        "print(all(signal.getsignal(s) is interrupts._on_signal for s in interrupts.SIGNALS), 'numpy' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.stdout.split() == ["True", "False"], proc.stderr


def test_nohup_keeps_sighup_ignored():
    """Started with SIGHUP ignored (nohup), a script keeps ignoring it; SIGINT and SIGTERM are still handled."""
    code = (
        "import interrupts, signal\n"
        "print(signal.getsignal(signal.SIGHUP) is signal.SIG_IGN,\n"
        "      signal.getsignal(signal.SIGTERM) is interrupts._on_signal)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN),
    )
    assert proc.stdout.split() == ["True", "True"], proc.stderr

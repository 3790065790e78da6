"""run_all.sh and run_sweep.sh as drivers (issue 24): folder locks, a driver killed under its steps,
one folder spelled two ways, shared data, demo shapes, Ctrl-C at exit, variables named in errors,
misspelt settings, duplicate sweep seeds. (Resuming: test_run_state.py; SIGTERM and waiting for
DATA_DIR: test_edges.py; bad settings: test_bad_input_matrix.py.)"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys

import pytest
from conftest import ROOT

import cli
import rm_data


@pytest.mark.parametrize("script", ["run_sweep.sh"])
def test_sh_is_refused_in_one_line(script):
    sh = shutil.which("sh")
    if sh is None or subprocess.run([sh, "-c", 'test -n "${BASH_VERSION:-}"']).returncode == 0:
        pytest.skip("sh is bash here")
    proc = subprocess.run([sh, str(ROOT / script)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"{script}: error: run it with bash (bash {script}), not sh"
    assert os.stat(ROOT / script).st_mode & stat.S_IXUSR


def test_duplicate_sweep_seeds_run_once(tmp_path):
    env = {**os.environ, "SEEDS": "1 2 1", "SWEEP": "objective", "PRINT": "1", "SWEEP_DIR": str(tmp_path)}
    proc = subprocess.run(["bash", str(ROOT / "run_sweep.sh")], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip() == "run_sweep.sh: note: SEEDS lists a seed more than once; running each once: 1 2"
    cells = [line.split("OUTPUT_DIR=")[1].split()[0] for line in proc.stdout.splitlines()]
    assert len(cells) == 4 and len(set(cells)) == 4  # bt and clf x seeds 1 and 2


def test_the_eval_prompts_advice_respects_its_minimum():
    with pytest.raises(cli.InputError) as err:
        rm_data.make_partition(300, 290, 0, rm_data.MIN_EVAL_PROMPTS)
    assert str(err.value).endswith("lower --n_sample (N_SAMPLE) to at most 280, or use more prompts")
    with pytest.raises(cli.InputError) as err:
        rm_data.make_partition(300, 101, 0, 200)
    assert "lower --n_sample (N_SAMPLE) to at most 100 or --eval_prompts (EVAL_PROMPTS) to at most 199" in str(
        err.value
    )


def test_an_interrupt_during_exit_prints_nothing_more(tmp_path):
    """Ctrl-C reaches a step again (forwarded by run_all.sh and run_state.py) while it exits: a
    signal that lands in an atexit callback (torch registers some) must not print a traceback."""
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
        "    raise KeyboardInterrupt\n"
        "run_cli(main)\n"
    )
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 130
    assert proc.stderr.strip() == "interrupted by SIGINT; nothing half-written was kept"

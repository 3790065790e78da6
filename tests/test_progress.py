"""progress.py: long loops log their progress where stderr is not a terminal (a log file)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

from conftest import ROOT

import progress


def test_a_loop_logs_lines_when_stderr_is_not_a_terminal(monkeypatch, caplog):
    monkeypatch.setenv(progress.INTERVAL_ENV, "0")
    with caplog.at_level(logging.INFO, logger="progress"):
        assert list(progress.progress(range(3), "scoring", unit="batch")) == [0, 1, 2]
    lines = [record.getMessage() for record in caplog.records]
    assert [line.split(" in ")[0] for line in lines] == [
        "scoring: 1/3 batch (33 %)",
        "scoring: 2/3 batch (67 %)",
        "scoring: 3/3 batch (100 %)",
    ]
    assert lines[-1].endswith(", done")
    caplog.clear()
    monkeypatch.setenv(progress.INTERVAL_ENV, "3600")  # a short loop logs nothing
    with caplog.at_level(logging.INFO, logger="progress"):
        assert list(progress.progress(iter([5, 6]), "scoring")) == [5, 6]
    assert caplog.records == []
    assert list(progress.progress([1], "off", enabled=False)) == [1]


def test_a_build_logged_to_a_file_shows_progress(tmp_path):
    """generate_demo_data.py with its output in a file (no terminal): progress lines in the log."""
    env = {**os.environ, progress.INTERVAL_ENV: "0"}
    argv = [sys.executable, str(ROOT / "generate_demo_data.py"), "--output_dir", str(tmp_path / "data")]
    argv += ["--n_prompts", "120", "--n_splits", "3", "--emb_dim", "8", "--n_test_prompts", "0"]
    with open(tmp_path / "build.log", "w") as log_file:
        proc = subprocess.run(argv, env=env, stdout=log_file, stderr=subprocess.STDOUT, timeout=120)
    assert proc.returncode == 0
    text = (tmp_path / "build.log").read_text()
    assert "progress: demo train splits: 1/3 split (33 %)" in text
    assert "progress: demo train splits: 3/3 split (100 %)" in text

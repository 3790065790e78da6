"""A test's own processes: it starts them with a tag in their environment, which every process they
start inherits (whatever its parent, even once reparented), so the test watches its own process tree
and never another run of the pipeline on the same machine. Linux (/proc)."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

TAG_VARIABLE = "PIPELINE_TEST_TAG"


def tagged(env: dict) -> tuple[dict, str]:
    """``env`` with a fresh tag, and the tag."""
    tag = uuid.uuid4().hex
    return {**env, TAG_VARIABLE: tag}, tag


def tagged_pids(tag: str, fragment: str = "") -> list[int]:
    """Running processes (not zombies) started with ``tag`` whose command line contains ``fragment``."""
    marker = f"{TAG_VARIABLE}={tag}".encode()
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if marker not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):  # gone, or another user's
            continue
        if fragment in cmdline and state != "Z":
            found.append(int(entry.name))
    return found


def wait_until_gone(tag: str, fragment: str = "", timeout: float = 60) -> None:
    """Poll until no process of the tree named by ``tag`` (and ``fragment``) runs."""
    deadline = time.monotonic() + timeout
    while pids := tagged_pids(tag, fragment):
        assert time.monotonic() < deadline, f"processes {pids} of the test's tree kept running"
        time.sleep(0.05)

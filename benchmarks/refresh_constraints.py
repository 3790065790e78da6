"""Rewrite constraints.txt with the versions installed here of everything requirements-dev.txt pulls in.

    python3 benchmarks/refresh_constraints.py

Run it after upgrading a package and passing `.ci/run`: pip resolves the requirement closure
(`pip install --dry-run --ignore-installed --report`, nothing is installed), and each package of it
is pinned at the version installed in this environment, the one the tests just passed with.
"""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEADER = """\
# Versions CI tested (python 3.11): install with -c constraints.txt to reproduce them, e.g.
#   pip install torch==2.13.0 && pip install -r requirements-dev.txt -c constraints.txt
# Refresh after a tested upgrade: python3 benchmarks/refresh_constraints.py (README, "Tests and benchmarks").
"""


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--dry-run", "--ignore-installed"]
            + ["-r", str(ROOT / "requirements-dev.txt"), "--report", str(report)],
            check=True,
        )
        names = {item["metadata"]["name"] for item in json.loads(report.read_text())["install"]}
    pins = []
    for name in sorted(names, key=str.lower):
        try:  # a platform-conditional dependency (tzdata on Linux) may not be installed
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
        pins.append(f"{name}=={version.split('+')[0]}")  # torch's "+cpu": the constraint names the release
    (ROOT / "constraints.txt").write_text(HEADER + "\n".join(pins) + "\n")
    print(f"constraints.txt: {len(pins)} packages pinned")


if __name__ == "__main__":
    main()

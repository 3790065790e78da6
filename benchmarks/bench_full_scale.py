"""Steps 5-8 on a published-size setup in bounded memory: time and peak RSS of every step.

    python3 benchmarks/bench_full_scale.py                 # full size: ~23 GB of disk, ~1 hour on 2 cores
    python3 benchmarks/bench_full_scale.py --scale 0.05    # the same pipeline at 5% of the prompts

Generates a synthetic repository setup of the published shape (train 40000 prompts x 10 responses
x 2048, test 2000 x 500 x 2048, float32; the reward a fixed nonlinear function of the embedding) in
a temporary folder, converts it with convert_embeddings.py, and runs steps 5-8 with
N_SAMPLE=10000 ENSEMBLE_NUMBER=10 (scaled with --scale). Each command runs as its own process;
its wall time and peak resident memory (``ru_maxrss`` of that child, from ``os.wait4``) are
printed against the 2 GB target.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET_GB = 2.0


def command(script: str, **flags: object) -> list[str]:
    """``python3 SCRIPT --name value ...`` with this interpreter, the flags in the order given."""
    return [sys.executable, script, *(arg for name, value in flags.items() for arg in (f"--{name}", str(value)))]


def run_measured(name: str, cmd: list[str]) -> tuple[str, float, float]:
    """Run ``cmd``; print and return (name, wall seconds, the child's own peak RSS in GB)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{name} failed ({proc.returncode}):\n{output[-3000:]}")
    peak_gb = usage.ru_maxrss / 2**20  # Linux reports KiB
    last = [line for line in output.splitlines() if line.startswith(("step", "converted", "demo"))]
    print(
        f"{name:<26}{seconds:>9.1f} s{peak_gb:>9.2f} GB  {'ok' if peak_gb < TARGET_GB else 'OVER'}"
        f"  {last[-1][:100] if last else ''}",
        flush=True,
    )
    return name, seconds, peak_gb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of prompts (1.0: published size)")
    parser.add_argument("--work_dir", help="folder for the ~23 GB of files (default: a temp dir)")
    parser.add_argument("--ensemble_number", type=int, default=10)
    parser.add_argument("--training_epochs", type=int, default=2)
    parser.add_argument("--keep", action="store_true", help="keep the generated files")
    args = parser.parse_args()
    n_train, n_test = int(40000 * args.scale), max(2, int(2000 * args.scale))
    n_sample = int(10000 * args.scale)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench_full_scale_"))
    repo, data, out = work / "repo", work / "data", work / "out"
    print(
        f"setup: train {n_train} x 10 x 2048, test {n_test} x 500 x 2048 float32, N_SAMPLE={n_sample}, "
        f"ENSEMBLE_NUMBER={args.ensemble_number}, TRAINING_EPOCHS={args.training_epochs}; files in {work}"
    )
    print(f"{'command':<26}{'wall':>11}{'peak RSS':>12}  (target < {TARGET_GB:.0f} GB per step)")
    commands = {
        "make synthetic repo": command(
            "benchmarks/make_synthetic_repo.py",
            output_dir=repo,
            n_prompts=n_train,
            n_test_prompts=n_test,
            task="harmless",
            gen_model="gemma2b",
        ),
        "convert_embeddings": command(
            "convert_embeddings.py", embd_dir=repo, task="harmless", gen_model="gemma2b", output_dir=data
        ),
        "step5 train": command(
            "step5_train_rms.py",
            data_dir=data,
            output_dir=out,
            task="harmless",
            n_sample=n_sample,
            ensemble_number=args.ensemble_number,
            training_epochs=args.training_epochs,
        ),
        "step6 eval": command("step6_eval_rms.py", output_dir=out),
        "step7 calibrate+distil": command("step7_isotonic_distillation.py", output_dir=out),
        "step8 validate": command("step8_validate_distillation.py", output_dir=out),
    }
    try:
        rows = [run_measured(name, cmd) for name, cmd in commands.items()]
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    steps = [r for r in rows if r[0].startswith("step")]
    print(f"steps 5-8: {sum(r[1] for r in steps):.0f} s in total; max peak RSS {max(r[2] for r in steps):.2f} GB")


if __name__ == "__main__":
    main()

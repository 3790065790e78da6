"""Resumable steps for run_all.sh: skip a step whose last successful run still stands.

    python3 run_state.py run --output_dir OUT --step 5 --data_dir DATA [--force] -- CMD ...
    python3 run_state.py run --output_dir OUT --step 6 --after 5 [--force] -- CMD ...

``run`` runs CMD (one step script) unless ``OUT/.run_state/step{N}.json`` records a finished run
with the same key (:func:`main` lists its ingredients) and every output it recorded still has the
recorded sha256; then it prints ``[step N up to date]`` (docs/resuming.md). The key chains
the previous step's key and output hashes, so a step rerun only because one of its own outputs was
changed or deleted leaves later steps up to date when it reproduces its outputs byte for byte.

On a run the old record is deleted first and CMD runs with ``artifacts.WRITE_LOG_ENV`` naming a
file to which its atomic writers append every path they complete; on success the files it wrote
(but :data:`NOT_OUTPUTS`) are hashed into the new record, written last. So two steps may run side
by side (run_all.sh runs 6 and 7 together) and each records only its own files, and a step killed
at any point leaves no record. The first step of a run (no ``--after``) first removes the temporary
files of interrupted atomic writes (``.NAME.*.tmp``) under OUT; later steps do not, as a step
beside them may be writing.

Standard library only (the atomic writers of ``artifacts``), so the check costs a fraction of a
step's start-up.
"""

from __future__ import annotations

import interrupts  # first: signals are handled from here on

# isort: split
import ast
import hashlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from artifacts import WRITE_LOG_ENV, file_sha256, json_sha256, remove_leftover_temps, write_json
from cli import PARENT_PID_ENV, ArgumentParser, InputError, run_cli

STATE_DIR = ".run_state"
# Folders of OUTPUT_DIR that hold no step outputs: the records, and run_folder.SCORE_CACHE_DIR, scores
# that step 6 writes and later steps reuse when they would compute the same ones (a hit or a miss
# gives the same results, so whether a rerun found the cache must not change its record).
NOT_OUTPUTS = (STATE_DIR, "score_cache")
# Bump when the record format or the key's ingredients change: every step then reruns once.
RECORD_VERSION = 2
# The data files of rm_data.FILE_PATTERNS (train and test embeddings and rewards).
DATA_FILE = re.compile(r"(EMBD-(TRAIN|TEST)-split|rewards(_test)?_split)_\d+\.(npy|json)\Z")


def parse_args(argv=None):
    parser = ArgumentParser(prog="run_state.py", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command_name", required=True)
    run = commands.add_parser("run", help="run a step unless its record says it is up to date")
    run.add_argument("--output_dir", required=True, help="the steps' output folder; records go in its .run_state/")
    run.add_argument("--step", required=True, help="step number, e.g. 5 (record step5.json, label 'step 5')")
    run.add_argument("--after", help="the step whose record this one depends on, e.g. 4")
    run.add_argument(
        "--data_dir",
        help="data folder whose stat key (its data files' stat information) goes into the key (the "
        "first step's; later steps inherit it through --after)",
    )
    run.add_argument("--force", action="store_true", help="run even if the record says up to date")
    run.add_argument("command", nargs="+", help="the step's command line (after --)")
    return parser.parse_args(argv)


# --------------------------------------------------------------------------------------------
# Hashes
# --------------------------------------------------------------------------------------------
def data_stat_key(data_dir: str | os.PathLike) -> str:
    """sha256 over the stat info (size, mtime_ns, inode) of every embedding and reward file, as build
    tools do: any rewrite, copy, touch or in-place edit of a data file reruns the steps. Never fails
    (an unreadable folder has the key of no files; the step itself reports the problem). Not the
    data fingerprint (``rm_data.fingerprint``), a hash of sampled content that step 5 records."""
    stats = {}
    try:
        entries = list(os.scandir(data_dir))
    except OSError:
        entries = []
    for entry in entries:
        if DATA_FILE.match(entry.name):
            try:
                stat = entry.stat()
            except OSError:
                continue
            stats[entry.name] = [stat.st_size, stat.st_mtime_ns, stat.st_ino]
    return json_sha256(stats)  # sorted keys


def code_hashes(command: Sequence[str]) -> dict[str, str]:
    """sha256 of the command's .py script and of the modules beside it that it imports, transitively."""
    script = next((Path(arg) for arg in command if arg.endswith(".py") and Path(arg).is_file()), None)
    if script is None:
        return {}
    hashes, todo = {}, [script]
    while todo:
        path = todo.pop()
        if path.name in hashes:
            continue
        source = path.read_bytes()
        hashes[path.name] = hashlib.sha256(source).hexdigest()
        try:
            tree = ast.parse(source)
        except SyntaxError:  # the step will fail and say so
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            todo += [module for name in modules if (module := script.parent / f"{name.split('.')[0]}.py").is_file()]
    return dict(sorted(hashes.items()))


# --------------------------------------------------------------------------------------------
# Records
# --------------------------------------------------------------------------------------------
def record_path(output_dir: Path, step: str) -> Path:
    return output_dir / STATE_DIR / f"step{step}.json"


def read_record(path: Path) -> dict | None:
    """A step's record, or None if absent or not a record (a damaged record means: rerun)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if (
        not isinstance(record, dict)
        or not isinstance(record.get("outputs"), dict)
        or not isinstance(record.get("inputs"), dict)
    ):
        return None
    return record


def chain_digest(record: dict | None) -> str:
    """What a later step's key takes from this record: its key and its outputs' hashes."""
    return "missing" if record is None else json_sha256({"key": record.get("key"), "outputs": record["outputs"]})


def stale_reason(record: dict | None, inputs: dict, key: str, output_dir: Path) -> str | None:
    """Why the step must run (None: its recorded run still stands)."""
    if record is None:
        return "no record of a finished run"
    if record.get("key") != key:
        changed = [name for name in inputs if record["inputs"].get(name) != inputs[name]]
        labels = {
            "argv": "its command line",
            "code": "its code",
            "data_fingerprint": "the data",
            "after": "the previous step's outputs",
            "version": "the record format",
        }
        return "changed: " + ", ".join(labels.get(name, name) for name in changed or ["key"])
    for name, digest in record["outputs"].items():
        path = output_dir / name
        if not path.is_file():
            return f"{name} is missing"
        if file_sha256(path) != digest:
            return f"{name} changed since the step wrote it"
    return None


def written_outputs(write_log: Path, output_dir: Path) -> list[str]:
    """The files under OUT but :data:`NOT_OUTPUTS` that the step wrote (the paths its atomic writers
    appended to ``write_log``), relative to OUT and sorted."""
    try:
        lines = write_log.read_text().splitlines()
    except FileNotFoundError:
        return []
    root, names = output_dir.resolve(), set()
    for line in lines:
        path = Path(line)
        if path.is_relative_to(root) and path.is_file():
            name = path.relative_to(root)
            if name.parts[0] not in NOT_OUTPUTS:
                names.add(name.as_posix())
    return sorted(names)


def run_command(command: Sequence[str], write_log: Path) -> int:
    """Run the step, its atomic writers logging to ``write_log``; return its status (128 + signal if killed).

    SIGINT, SIGTERM and SIGHUP received meanwhile are forwarded to the step (run_all.sh forwards them
    here), which stops cleanly; this process waits for it, so it never leaves the step running alone.
    The step starts with those signals blocked and unblocks them once its handlers are in place
    (interrupts.py), so one that arrives while its interpreter starts waits for them instead of being
    lost or printing a traceback. The step stops by itself if this process dies (``cli.watch_parent``),
    and it inherits the descriptors of run_all.sh's folder locks (``close_fds=False``; descriptors
    Python opens are not inheritable), so no lock is released while the step still writes.
    """
    env = {**os.environ, WRITE_LOG_ENV: str(write_log.resolve()), PARENT_PID_ENV: str(os.getpid())}
    process, pending = None, []

    def forward(signum: int, _frame) -> None:
        if process is None:
            pending.append(signum)
        else:
            process.send_signal(signum)

    forward_signals = [s for s in interrupts.SIGNALS if signal.getsignal(s) != signal.SIG_IGN]
    handlers = {signum: signal.signal(signum, forward) for signum in forward_signals}
    try:
        if pending:  # stopped before the step started
            return 128 + pending[0]
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, interrupts.SIGNALS)  # the child inherits the mask
        try:
            process = subprocess.Popen(list(command), env=env, close_fds=False)
        except OSError as err:
            raise InputError(f"cannot run {command[0]}: {err.strerror or err}") from None
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, blocked)
        for signum in pending:
            process.send_signal(signum)
        status = process.wait()
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)
    return 128 - status if status < 0 else status


def main(argv=None) -> int:
    args = parse_args(argv)
    output_dir = Path(args.output_dir)
    label, path = f"step {args.step}", record_path(output_dir, args.step)
    previous = read_record(record_path(output_dir, args.after)) if args.after else None
    inputs = {
        "version": RECORD_VERSION,
        "step": args.step,
        "argv": args.command,
        "code": code_hashes(args.command),
        # The data stat key, under the name records have always given it (renamed, every record would be stale).
        "data_fingerprint": data_stat_key(args.data_dir) if args.data_dir else None,
        "after": chain_digest(previous) if args.after else None,
    }
    key = json_sha256(inputs)
    if not args.after and output_dir.is_dir():  # the first step: no other step is writing yet
        remove_leftover_temps(output_dir, recursive=True)
    record = read_record(path)
    reason = "FORCE=1" if args.force else stale_reason(record, inputs, key, output_dir)
    if reason is None:
        print(f"[{label} up to date]", flush=True)
        return 0
    if record is not None:
        print(f"{label}: running again ({reason})", flush=True)
    path.unlink(missing_ok=True)  # a record exists only for a finished run
    write_log = path.with_name(f".{path.stem}.writes")
    try:
        write_log.parent.mkdir(parents=True, exist_ok=True)
        write_log.write_text("")
        start = time.perf_counter()
        status = run_command(args.command, write_log)
        if status != 0:
            return status
        seconds = time.perf_counter() - start
        outputs = {name: file_sha256(output_dir / name) for name in written_outputs(write_log, output_dir)}
    finally:
        write_log.unlink(missing_ok=True)
    write_json(
        path, {"step": args.step, "key": key, "inputs": inputs, "outputs": outputs, "seconds": round(seconds, 3)}
    )
    print(f"[{label} took {seconds:.1f} s]", flush=True)
    return 0


if __name__ == "__main__":
    run_cli(lambda argv: sys.exit(main(argv)))

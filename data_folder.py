"""Who may read or write a data folder (DATA_DIR) and when: one lock, and a rewrite swapped in whole.

Readers (steps 5-8, through ``rm_data.load_embedding_set``) hold the folder's lock shared until their
process exits; writers (the demo generator, the conversion, step 4, the AlpacaEval builder) hold it
exclusively and never write into the folder itself: :func:`rewritten_data_dir` gives them a staging
folder beside it, and the finished staging folder is exchanged with the old one in one rename. So a
reader that finds the folder sees the old data or the new, never a mix, whether or not it locks, and
a writer killed at any moment leaves the old data as it was.

The lock is ``flock`` on the folder itself, as ``run_all.sh`` takes it (``flock DATA_DIR``): under
run_all.sh (``cli.RUN_ALL_ENV``) the script holds it for its steps, which take no lock of their own
(a second lock would wait on its own). A rewrite gives the path a new folder, so whoever takes the
lock checks afterwards that the folder it locked is still the one at the path, and otherwise locks
again. A process that has to wait says so once, naming who holds the lock (pid and command).

Standard library only.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from cli import RUN_ALL_ENV, InputError

# Per-split files (embeddings, rewards and any per-response sidecar): ``..._split_{k}.npy|json``;
# test-set files carry ``TEST`` or ``_test_`` in their names.
SPLIT_FILE = re.compile(r".*split_\d+\.(npy|json)\Z")
# A temporary file that a killed atomic write left in the folder (artifacts.atomic_path's name).
LEFTOVER_TEMP = re.compile(r"\..+\.[^.]+\.tmp\Z")
RENAME_EXCHANGE = 2  # renameat2 flag (linux/fs.h)
AT_FDCWD = -100
# Shared locks this process holds until it exits, by (device, inode) of the folder.
_SHARED: dict[tuple[int, int], int] = {}


def split_files(*kinds: str) -> Callable[[str], bool]:
    """Whether a file name is a per-split file of one of ``kinds`` ('train', 'test')."""

    def matches(name: str) -> bool:
        if not SPLIT_FILE.match(name):
            return False
        kind = "test" if ("TEST" in name or "_test_split" in name) else "train"
        return kind in kinds

    return matches


# --------------------------------------------------------------------------------------------
# The lock
# --------------------------------------------------------------------------------------------
def lock_holders(path: Path) -> str:
    """'pid N (command)' of the processes holding a lock on folder ``path`` (from /proc; Linux), or
    'another process' where that cannot be told."""
    try:
        stat = os.stat(path)
        key = f"{os.major(stat.st_dev):02x}:{os.minor(stat.st_dev):02x}:{stat.st_ino}"
        with open("/proc/locks") as handle:
            pids = {int(f[4]) for line in handle if len(f := line.split()) > 5 and f[1] == "FLOCK" and f[5] == key}
    except (OSError, ValueError):
        return "another process"
    pids.discard(os.getpid())
    if not all(Path(f"/proc/{pid}").exists() for pid in pids):
        pids = _pids_holding(stat) or pids  # a lock outlives its taker when a child inherited it (run_all.sh's flock)
    named = [f"pid {pid} ({_command(pid)})" for pid in sorted(pids)[:3]]
    return ", ".join(named) or "another process"


def _pids_holding(stat: os.stat_result) -> set[int]:
    """Pids of the processes (other than this one) with a descriptor open on the file of ``stat``."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            for fd in (entry / "fd").iterdir():
                target = os.stat(fd)
                if (target.st_dev, target.st_ino) == (stat.st_dev, stat.st_ino):
                    found.add(int(entry.name))
                    break
        except OSError:
            continue
    return found


def _command(pid: int) -> str:
    try:
        words = Path(f"/proc/{pid}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
    except OSError:
        return "gone"
    text = " ".join(
        Path(w.decode(errors="replace")).name if i == 0 else w.decode(errors="replace") for i, w in enumerate(words)
    )
    return " ".join(text.split())[:200] or "?"  # one line, even for a `python -c` script


def _lock(path: Path, mode: int, doing: str) -> int:
    """A descriptor of folder ``path`` locked with ``mode`` (LOCK_SH or LOCK_EX), waiting if need be
    (one line on stderr naming the holder); re-taken if the folder was swapped while it waited."""
    said = False
    while True:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as err:
            raise InputError(f"cannot open data folder {path}: {err.strerror or err}") from None
        try:
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
            except BlockingIOError:
                if not said:
                    print(f"waiting for {path}: {lock_holders(path)} is {doing} it", file=sys.stderr, flush=True)
                    said = True
                fcntl.flock(fd, mode)
            current = os.stat(path)
        except BaseException:
            os.close(fd)
            raise
        locked = os.fstat(fd)
        if (locked.st_dev, locked.st_ino) == (current.st_dev, current.st_ino):
            return fd
        os.close(fd)  # a writer swapped a new folder in while this waited: lock that one


def hold_shared(data_dir: str | os.PathLike) -> None:
    """Hold ``data_dir`` shared until this process exits (a reader), waiting for a writer to finish.
    Under run_all.sh nothing: the script holds the lock for its steps."""
    if os.environ.get(RUN_ALL_ENV):
        return
    path = Path(data_dir)
    try:
        stat = os.stat(path)
    except OSError:
        return  # the loader reports the missing folder
    if (stat.st_dev, stat.st_ino) in _SHARED:
        return
    fd = _lock(path, fcntl.LOCK_SH, "writing")
    locked = os.fstat(fd)
    _SHARED[(locked.st_dev, locked.st_ino)] = fd


def _release_own(path: Path) -> None:
    """Drop this process's own shared hold on ``path`` (a writer after readers in one process: tests)."""
    with contextlib.suppress(OSError):
        stat = os.stat(path)
        if (fd := _SHARED.pop((stat.st_dev, stat.st_ino), None)) is not None:
            os.close(fd)


@contextlib.contextmanager
def data_dir_claim(path: Path) -> Iterator[bool]:
    """Hold data folder ``path`` exclusively while the block runs and yield True; yield False (holding
    it shared) when other processes read it, so the data must stay as it is. A writer is waited for.

    Under run_all.sh, which holds the lock itself and passes ``--in_use`` to the writers while other
    runs read the folder, this yields True without locking (a second lock would wait on its own)."""
    if os.environ.get(RUN_ALL_ENV):
        yield True
        return
    _release_own(path)
    fd = _lock(path, fcntl.LOCK_SH, "writing")
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # an upgrade: no reader but this one
            exclusive = True
        except BlockingIOError:
            fcntl.flock(fd, fcntl.LOCK_SH)  # a failed upgrade may have dropped the shared lock
            exclusive = False
        yield exclusive
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------
# The rewrite
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def rewritten_data_dir(data_dir: Path, replaces: Callable[[str], bool]) -> Iterator[Path]:
    """Yield an empty staging folder beside ``data_dir`` for the new data; when the block succeeds,
    swap it in whole. Hold :func:`data_dir_claim` (exclusive) around it.

    The entries of ``data_dir`` that the staging folder lacks and ``replaces`` does not claim (the
    other set's splits, a demo config, a run's outputs, anything of the user's; not the temporary
    files of killed atomic writes) are moved across first, so only the rewritten files change. The
    swap is one ``renameat2(RENAME_EXCHANGE)``; where
    the file system lacks it, two renames (a reader in between finds no folder, never a mix). A
    failure leaves ``data_dir`` untouched and no staging folder. ``data_dir`` is resolved first: a
    symlinked folder's target is rewritten and the link kept.
    """
    target = Path(data_dir).resolve()
    for leftover in target.parent.glob(f".{target.name}.new.*"):  # of a killed rewrite (this one holds the lock)
        shutil.rmtree(leftover, ignore_errors=True)
    try:
        staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.new."))
    except OSError as err:
        raise InputError(
            f"cannot write {data_dir}: a rewrite is built beside it, in {target.parent}: {err.strerror or err}"
        ) from None
    moved: list[str] = []
    try:
        staging.chmod(target.stat().st_mode & 0o7777)  # mkdtemp makes it private; keep the folder's mode
        yield staging
        for entry in sorted(os.listdir(target)):
            if not os.path.lexists(staging / entry) and not replaces(entry) and not LEFTOVER_TEMP.match(entry):
                os.rename(target / entry, staging / entry)
                moved.append(entry)
        _exchange(staging, target)
        moved.clear()  # they are in place now; what staging holds is the old folder
    except OSError as err:
        raise InputError(f"cannot write {data_dir}: {err.strerror or err}") from None
    finally:
        for entry in moved:  # the swap failed: give the old folder back what was moved out of it
            with contextlib.suppress(OSError):
                os.rename(staging / entry, target / entry)
        shutil.rmtree(staging, ignore_errors=True)


def _exchange(staging: Path, target: Path) -> None:
    """Put ``staging`` at ``target`` and the old ``target`` at ``staging``."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except AttributeError:
        renameat2 = None
    if renameat2 is not None:
        if renameat2(AT_FDCWD, os.fsencode(staging), AT_FDCWD, os.fsencode(target), RENAME_EXCHANGE) == 0:
            return
        if ctypes.get_errno() not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()), str(target))
    old = staging.with_name(staging.name + ".old")
    os.rename(target, old)
    os.rename(staging, target)
    os.rename(old, staging)


@contextlib.contextmanager
def exclusive_rewrite(data_dir: Path, replaces: Callable[[str], bool], flag: str = "--data_dir") -> Iterator[Path]:
    """:func:`rewritten_data_dir` under :func:`data_dir_claim`, for a writer that has nothing to do
    when readers hold the folder: refused in one line naming them."""
    with data_dir_claim(data_dir) as exclusive:
        if not exclusive:
            raise InputError(f"{flag} {data_dir} is being read by {lock_holders(data_dir)}; wait for it to finish")
        with rewritten_data_dir(data_dir, replaces) as staging:
            yield staging

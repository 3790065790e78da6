"""Reading and writing artifacts: JSON objects, atomic writers, leftover-temporary cleanup, file hashes.

Every artifact is written to a temporary file beside its target and renamed onto it only when
complete (README, "Reproducibility and safety"), so a failed or interrupted write leaves the
previous file, or none, never half of one. Standard library at import (numpy where an array is
written or a file sampled), so run_state.py's up-to-date checks start fast.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import sys
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from cli import InputError

if TYPE_CHECKING:
    import numpy as np

SAMPLE_BLOCK = 1 << 16
_UMASK = os.umask(0)
os.umask(_UMASK)
# run_state.py names a file here for the step it runs: each completed write appends its path, so
# the step's record lists what it wrote, even while another step writes beside it.
WRITE_LOG_ENV = "RUN_STATE_WRITE_LOG"


STDOUT = "-"


def output_target(path: str | os.PathLike, flag: str = "") -> Path | None:
    """Where an output named ``path`` goes, by the one rule every writer follows: None for ``-``
    (standard output); the file a symlink points to, for a symlink (written through: the link stays,
    its target is replaced); ``path`` itself when it is a regular file or absent. A directory, a
    device, a FIFO or a socket is not ours to replace: one :class:`InputError` naming ``flag`` (or
    the path alone)."""
    if os.fspath(path) == STDOUT:
        return None
    path = Path(path)
    name = f"{flag} {path}" if flag else str(path)
    try:
        target = path.resolve() if path.is_symlink() else path
    except (OSError, RuntimeError) as err:  # a symlink loop
        raise InputError(f"cannot write {name}: {err}") from None
    try:
        mode = os.stat(target).st_mode
    except FileNotFoundError:
        return target
    except OSError as err:
        raise InputError(f"cannot write {name}: {err.strerror or err}") from None
    if stat.S_ISREG(mode):
        return target
    kind = "a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a device or socket"
    via = f" (a symlink to {target})" if target != path else ""
    raise InputError(
        f"cannot write {name}{via}: it is {kind}, not a file to replace (use - for standard output)"
        if kind != "a directory"
        else f"cannot write {name}{via}: it is a directory"
    )


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (``.NAME.*.tmp``); rename it onto ``path`` only if the
    block succeeds. ``path`` follows :func:`output_target`: ``-`` sends the finished file's bytes to
    standard output, a symlink is written through, anything but a regular file is refused.

    An OS error while the block writes (a full disk, a file-size limit, a read-only or forbidden
    folder: ENOSPC, EFBIG, EROFS, EACCES) becomes one :class:`InputError` naming ``path``.
    """
    target = output_target(path)
    if target is None:
        with tempfile.TemporaryDirectory() as folder:
            yield Path(folder) / "stdout"
            sys.stdout.flush()
            with open(Path(folder) / "stdout", "rb") as handle:
                shutil.copyfileobj(handle, sys.stdout.buffer)
            sys.stdout.buffer.flush()
        return
    path = target
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise InputError(f"cannot write {path}: {err.strerror or err}") from None
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the usual mode
        os.replace(tmp, path)
        if log := os.environ.get(WRITE_LOG_ENV):
            with open(log, "a") as handle:
                handle.write(f"{path.resolve()}\n")
    except OSError as err:
        raise InputError(f"cannot write {path}: {err.strerror or err}") from None
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_paths(*paths: str | os.PathLike) -> Iterator[list[Path]]:
    """:func:`atomic_path` for files that belong together (a JSON result and its plots): all are
    renamed into place only if the block succeeds, so a failure while writing any of them leaves none."""
    with ExitStack() as stack:
        yield [stack.enter_context(atomic_path(path)) for path in paths]


def remove_leftover_temps(folder: str | os.PathLike, names: Iterable[str] = ("*",), recursive: bool = False) -> None:
    """Delete the temporary files that killed atomic writes left for targets matching ``names``
    (glob patterns) in ``folder`` (and its subfolders if ``recursive``)."""
    folder = Path(folder)
    for name in names:
        for path in (folder.rglob if recursive else folder.glob)(f".{name}.*.tmp"):
            if path.is_file():
                path.unlink(missing_ok=True)


def json_text(obj: object) -> str:
    """``obj`` as indented strict JSON with stable key order (NaN and inf are refused)."""
    return json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n"


def read_text(path: str | os.PathLike, name: str) -> str:
    """The UTF-8 text of a file the user gave: the one reader of text inputs, so a missing or
    unreadable file, or a byte that is not UTF-8, is one :class:`InputError` naming ``name`` (the
    flag and file, e.g. ``--input in.jsonl``) and, for a bad byte, its line."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise InputError(f"{name}: file not found") from None
    except OSError as err:
        raise InputError(f"cannot read {name}: {err.strerror or err}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        raise InputError(
            f"{name} line {line}: not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start})"
        ) from None


def read_json(path: str | os.PathLike, what: str) -> dict:
    """The JSON object in ``path``; a missing or unreadable file, or other JSON, is an InputError naming ``what``."""
    path = Path(path)
    if not os.path.lexists(path):
        raise InputError(f"{what} not found: {path}")
    try:
        obj = json.loads(read_text(path, f"{what} {path}"))
    except ValueError as err:
        raise InputError(f"{what} {path} is not readable JSON ({err})") from None
    if not isinstance(obj, dict):
        raise InputError(f"{what} {path} must hold a JSON object")
    return obj


def write_json(path: str | os.PathLike, obj: object) -> None:
    """Write ``obj`` as :func:`json_text`, atomically."""
    write_text(path, json_text(obj))


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    """``np.save`` atomically (through a file handle, so no ``.npy`` suffix is appended)."""
    import numpy as np

    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.save(handle, array, allow_pickle=False)


def file_sha256(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def json_sha256(obj: object) -> str:
    """Hex sha256 of ``obj`` as JSON with sorted keys: a key for a record or a set of ids."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def sampled_blocks(path: str | os.PathLike, n_blocks: int, block: int = SAMPLE_BLOCK) -> Iterator[bytes]:
    """``n_blocks`` evenly spaced ``block``-byte blocks of a file, first and last included: the sample
    a fingerprint hashes where hashing the whole file (10 GB of embeddings) would cost more than the
    step it guards."""
    import numpy as np

    size = os.stat(path).st_size
    with open(path, "rb") as handle:
        for offset in np.linspace(0, max(size - block, 0), n_blocks).astype(np.int64):
            handle.seek(int(offset))
            yield handle.read(block)


def ensure_writable_dir(path: str | os.PathLike, flag: str = "--output_dir") -> Path:
    """Create ``path`` if needed and check it is a writable directory, before any work starts."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise InputError(f"{flag} {path}: cannot create directory ({err.strerror or err})") from None
    if not path.is_dir() or not os.access(path, os.W_OK | os.X_OK):
        raise InputError(f"{flag} {path}: not a writable directory")
    return path

"""Command-line plumbing shared by every step script: input errors, exit codes, flag types, logging.

Bad input raises :class:`InputError` anywhere in the code; :func:`run_cli` turns it into one line
on stderr and exit status 2 (README, "Pipeline"). Scripts validate everything before writing any
artifact, and write artifacts atomically (``artifacts.atomic_path``), so a failed run leaves none.
Ctrl-C, SIGTERM and SIGHUP end a script with one line and status 130 / 143 / 129, after the atomic
writers have removed their temporary files (interrupts.py). Flags are validated at the door by the argparse types below.

Under run_all.sh (:data:`RUN_ALL_ENV` set), a step also stops as if by SIGTERM when the process
that started it dies (:func:`watch_parent`), and an error's flags are named with the run_all.sh
variables that set them (``run_variables.name_variables``).
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import gc
import logging
import math
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from typing import TextIO, TypeVar

import interrupts
from interrupts import RUN_ALL_ENV, Interrupted
from run_variables import name_variables

# Sizes (counts, dimensions) above this are refused: no array here can hold 2**31 rows, and
# run_all.sh's bash arithmetic stays far from overflow.
MAX_SIZE = 2**31 - 1
# Seeds feed numpy's SeedSequence, torch.Generator.manual_seed and sklearn's random_state; the
# range all of them accept (and that run_all.sh checks) is 0 .. 2**32 - 1.
MAX_SEED = 2**32 - 1
# --dtype's choices (add_dtype_arg), the dtypes llm_models.py loads models in: here, beside the flag,
# so that steps 1-4 answer --help and flag errors without torch.
DTYPE_NAMES = ("float32", "bfloat16", "float16")
# True once run_cli runs a script that owns its process (argv None): process-wide settings (flushing
# denormals, networks.flush_denormals) are then the step's to make; a caller's process (tests, a
# library user calling main) keeps its own.
OWNS_PROCESS = False
# RUN_ALL_ENV (interrupts.py) is set by run_all.sh for everything it starts: it reports an interrupted
# step itself, and its users know the variables, not the flags.
# The pid of the process that started this one (run_all.sh exports its own, run_state.py sets its own
# for its step): if that process dies, this one stops instead of writing on alone.
PARENT_PID_ENV = "RUN_ALL_PARENT_PID"
PARENT_POLL_SECONDS = 0.2


class InputError(ValueError):
    """A user-facing problem with an input file, flag or environment variable."""


def _own_signal(err: BaseException) -> int | None:
    """In a caller's process: the signal an :class:`Interrupted` or KeyboardInterrupt stands for."""
    if isinstance(err, Interrupted) and err.args:
        return err.args[0]
    return signal.SIGINT if isinstance(err, KeyboardInterrupt) else None


def _raise_interrupted(signum: int, _frame) -> None:
    # In-process callers (tests): one signal is enough, as in a script (interrupts.py).
    for other in interrupts.SIGNALS:
        signal.signal(other, signal.SIG_IGN)
    raise Interrupted(signum)


def watch_parent() -> None:
    """If :data:`PARENT_PID_ENV` names this process's parent, send this process SIGTERM once that
    parent has died (it is then reparented), so a step whose driver was killed (``kill -9`` of
    run_all.sh or of run_state.py) stops cleanly instead of writing on alone. A thread polling
    ``os.getppid`` works on every POSIX system, unlike Linux's ``PR_SET_PDEATHSIG``."""
    try:
        parent = int(os.environ.get(PARENT_PID_ENV, ""))
    except ValueError:
        return
    if parent <= 1:
        return
    if os.getppid() != parent:  # the parent died before we looked, or another process started this one
        if not _alive(parent):
            os.kill(os.getpid(), signal.SIGTERM)
        return

    def poll() -> None:
        while os.getppid() == parent:
            threading.Event().wait(PARENT_POLL_SECONDS)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=poll, name="watch-parent", daemon=True).start()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def for_user(message: str) -> str:
    """``message`` as the user should read it: under run_all.sh, with the variables named."""
    return name_variables(message, sys.argv[0]) if os.environ.get(RUN_ALL_ENV) else message


def run_cli(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> None:
    """Run ``main(argv)``; report an :class:`InputError`, or an ``OSError`` about a file, as one
    stderr line and exit with 2.

    Ctrl-C (SIGINT), SIGTERM and SIGHUP stop the script with one line (no traceback) and status 130 /
    143 / 129 whenever they arrive (interrupts.py); running out of memory (a size flag far too large) is
    one line and status 2. A script (``argv`` None) that finishes enters interrupts.py's exit phase.
    """
    global OWNS_PROCESS
    owns = argv is None
    OWNS_PROCESS = OWNS_PROCESS or owns
    # At exit Python's last garbage collection walks every object torch, scikit-learn and matplotlib
    # created (~0.3-0.7 s per step process); frozen, they are skipped. Files are closed by then.
    atexit.register(gc.freeze)
    handlers = {}
    main_thread = threading.current_thread() is threading.main_thread()
    if main_thread and owns:
        interrupts.install()  # (already done by the script's first import)
    elif main_thread:  # a caller's process: the same handling while main runs, then its own handlers back
        for signum in interrupts.SIGNALS:
            handlers[signum] = signal.signal(signum, _raise_interrupted)
    if main_thread:
        watch_parent()
    status = 1  # an unexpected exception: Python prints its traceback
    try:
        main(argv)
        status = 0
    except BaseException as err:
        signum = interrupts.signal_behind(err) if owns else _own_signal(err)
        if signum is not None:
            status = 128 + signum
            if owns:
                interrupts.exiting(status)
            if not os.environ.get(RUN_ALL_ENV):
                print(interrupts.message(signum), file=sys.stderr)
            sys.exit(status)
        if isinstance(err, SystemExit):
            status = err.code if isinstance(err.code, int) else 0 if err.code is None else 1
            raise
        if isinstance(err, InputError):
            status = 2
            print(f"error: {for_user(str(err))}", file=sys.stderr)
            sys.exit(2)
        if isinstance(err, MemoryError):
            status = 2
            print(f"error: out of memory ({err or 'a size flag is too large for this machine'})", file=sys.stderr)
            sys.exit(2)
        if isinstance(err, OSError) and err.filename is not None:  # without a file: a bug, worth its traceback
            # A file or folder the run cannot use (an unwritable .run_state/, a full disk, a folder that
            # vanished): the shared readers and writers name theirs; this names any other.
            status = 2
            where = f"{err.filename} -> {err.filename2}" if err.filename2 else err.filename
            print(f"error: {for_user(f'{where}: {err.strerror or err}')}", file=sys.stderr)
            sys.exit(2)
        raise
    finally:
        if owns:
            # From here a signal only sets the exit status (interrupts.py): one landing in an atexit
            # callback (torch registers some) or in the interpreter's shutdown prints nothing.
            interrupts.exiting(status)
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


LOG_LEVELS = ("DEBUG", "INFO", "WARNING")


def setup_logging(stream: TextIO | None = None) -> None:
    """Progress logs go to stdout (or ``stream``: stderr where stdout carries a result, as
    ``--output -`` does), so stderr carries only errors (and tqdm bars on a terminal, progress.py).

    ``LOG_LEVEL=DEBUG`` in the environment adds per-epoch training and validation losses.
    """
    level = os.environ.get("LOG_LEVEL", "INFO").upper()
    if level not in LOG_LEVELS:
        raise InputError(f"LOG_LEVEL must be one of {', '.join(LOG_LEVELS)}, got {level!r}")
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
        stream=stream or sys.stdout,
    )


class ArgumentParser(argparse.ArgumentParser):
    """argparse with errors raised as :class:`InputError` (one line, exit 2, callable in-process)."""

    def error(self, message: str) -> None:
        raise InputError(f"{self.prog}: {message}")


Config = TypeVar("Config")


def from_flags(cls: type[Config], args: argparse.Namespace, prefix: str = "", **given) -> Config:
    """The dataclass ``cls`` built by keyword from parsed flags: each field from the flag named
    ``prefix`` + field (``--lgbm_num_leaves`` for ``num_leaves`` with prefix ``lgbm_``), or from ``given``
    where the flag has another name or the value is no flag. The dataclass declares no defaults, so a
    setting's default lives in its parser only; a field with neither is an AttributeError."""
    names = [field.name for field in dataclasses.fields(cls)]
    return cls(**{name: getattr(args, prefix + name) for name in names if name not in given}, **given)


def add_dtype_arg(parser) -> None:
    """``--dtype`` of the scripts that run transformers models (``llm_models.pick_dtype`` reads it)."""
    parser.add_argument(
        "--dtype",
        choices=("auto", *DTYPE_NAMES),
        default="auto",
        help="compute dtype (auto: bf16 on GPUs that support it, fp16 on older GPUs, fp32 "
        "on CPU); outputs are stored as float32 whatever it is",
    )


# --------------------------------------------------------------------------------------------
# argparse types: every numeric flag of every script goes through one of these
# --------------------------------------------------------------------------------------------
def _integer(text: str, low: int, high: int, what: str) -> int:
    """``int(text)`` in low..high; ``what`` names the expectation (with ``high`` added when exceeded)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
    if value < low:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
    if value > high:
        raise argparse.ArgumentTypeError(f"expected {what} up to {high}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """argparse type: a size, an integer in 1 .. :data:`MAX_SIZE`."""
    return _integer(text, 1, MAX_SIZE, "a positive integer")


def non_negative_int(text: str) -> int:
    """argparse type: a size that may be 0, an integer in 0 .. :data:`MAX_SIZE`."""
    return _integer(text, 0, MAX_SIZE, "an integer >= 0")


def random_seed(text: str) -> int:
    """argparse type: a random seed, an integer in 0 .. :data:`MAX_SEED`."""
    return _integer(text, 0, MAX_SEED, "a non-negative integer seed")


def zero_one(text: str) -> int:
    """argparse type: a switch, 0 or 1."""
    if text not in ("0", "1"):
        raise argparse.ArgumentTypeError(f"expected 0 or 1, got {text!r}")
    return int(text)


def finite_number(value: object) -> bool:
    """Whether a value read from JSON is a number a float holds finitely (not a bool, nan, inf or 10**400)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and abs(value) <= sys.float_info.max


def finite_float(text: str) -> float:
    """argparse type: a finite float (rejects nan, inf and numbers beyond float range such as 1e999)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """argparse type: a finite float > 0 (1e-999, which rounds to 0, is refused)."""
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a finite float >= 0."""
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def fraction(text: str) -> float:
    """argparse type: a float strictly between 0 and 1."""
    value = finite_float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a number strictly between 0 and 1, got {text!r}")
    return value

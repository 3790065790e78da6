"""Ctrl-C, SIGTERM and SIGHUP end a script with one line and status 128 + N, whenever they arrive.

Every script imports this module first, before numpy or torch, so that a signal that lands while they
import is handled like one that lands later (``import interrupts  # noqa: F401`` then ``# isort: split``).
Imported by a script run as ``__main__``, it installs handlers for SIGINT, SIGTERM and SIGHUP (SIGHUP
is left alone where it was ignored at start, as under ``nohup``). The first signal raises
:class:`Interrupted` in the main thread, which unwinds like KeyboardInterrupt: the atomic writers remove
their temporary files, and ``cli.run_cli`` prints the line. Later signals are only noted: Ctrl-C
reaches a step from the terminal and again forwarded by its parents.

A signal never goes astray:
- one that lands in an import (torch's, say, at a script's start or inside a step) is raised once the
  import is over: raised inside it, it could pass through a C extension's initialisation, which may
  abort the process instead of unwinding;
- one that lands before ``run_cli`` runs is reported by :func:`sys.excepthook`;
- one whose exception Python cannot raise (it landed in a destructor or a callback, where Python prints
  "Exception ignored in ...") is raised again at the next opportunity, silently;
- once ``run_cli`` has finished, signals are noted and the exit status becomes 128 + N at the end of
  the interpreter's exit (the last ``atexit`` callback), unless the script already failed.
A process started with these signals blocked (run_state.py starts the steps so) receives any that
arrived meanwhile as soon as the handlers are in place; a script started otherwise is exposed only
during the interpreter's own start, before its first line runs.

Standard library only: it must cost nothing before the heavy imports.
"""

from __future__ import annotations

import _thread
import atexit
import os
import signal
import sys
import time

# Set by run_all.sh for everything it starts: it reports an interrupted step itself (a step run by it
# then prints nothing more).
RUN_ALL_ENV = "RUN_ALL_REPORTS_INTERRUPTS"
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

received: int | None = None  # the first signal handled, if any
_raising = True  # False once the script is exiting: signals are then only noted
_exit_status: int | None = None  # the status run_cli is exiting with
_installed = False
_in_hook = False  # the main thread is in _unraisablehook


class Interrupted(BaseException):
    """SIGINT, SIGTERM or SIGHUP received, the signal number its argument: unwinds like
    KeyboardInterrupt, so atomic writes clean up."""


_MAIN_THREAD = _thread.get_ident()  # scripts import this module first, in their main thread
_deferred = False  # a signal that landed in an import waits for it to finish


def _in_import(frame) -> bool:
    """Whether ``frame`` runs inside an import (a module's code, or what its initialisation calls)."""
    while frame is not None:
        if frame.f_code.co_filename.startswith("<frozen importlib._bootstrap"):
            return True
        frame = frame.f_back
    return False


def _on_signal(signum: int, frame) -> None:
    global received, _deferred
    if received is not None:
        return
    if _raising and _in_import(frame):
        # An exception raised here could pass through a C extension's initialisation, which may abort
        # the process rather than unwind (torch's does: std::terminate, status -6): raise it once the
        # import is over, from a thread that watches the main thread's frames.
        if not _deferred:
            _deferred = True
            _thread.start_new_thread(_send_after_import, (signum,))
        return
    received = signum
    if _raising:
        raise Interrupted(signum)


def _send_after_import(signum: int) -> None:
    global _deferred
    while _in_import(sys._current_frames().get(_MAIN_THREAD)):
        time.sleep(0.001)
    _deferred = False
    os.kill(os.getpid(), signum)


def message(signum: int) -> str:
    return f"interrupted by {signal.Signals(signum).name}; nothing half-written was kept"


def report(signum: int) -> None:
    """The one line, unless run_all.sh reports the interrupt itself."""
    if not os.environ.get(RUN_ALL_ENV):
        print(message(signum), file=sys.stderr, flush=True)


def _exit_now(signum: int) -> None:
    report(signum)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):
            pass
    os._exit(128 + signum)


def signal_behind(err: BaseException) -> int | None:
    """The signal that ``err`` stands for: an :class:`Interrupted` or KeyboardInterrupt, or any error
    raised while a signal is pending (an interrupted import of a C extension surfaces as ImportError,
    an interrupted read as OSError); None for an error of its own."""
    if isinstance(err, Interrupted) and err.args:
        return err.args[0]
    if received is not None:
        return received
    return signal.SIGINT if isinstance(err, KeyboardInterrupt) else None


def _excepthook(exc_type, exc, traceback) -> None:
    signum = signal_behind(exc)  # before run_cli: in an import
    if signum is not None:
        _exit_now(signum)
    _previous_excepthook(exc_type, exc, traceback)


def _unraisablehook(unraisable) -> None:
    global received, _in_hook
    if not isinstance(unraisable.exc_value, (Interrupted, KeyboardInterrupt)):
        _previous_unraisablehook(unraisable)
        return
    signum = received
    if _raising and signum is not None:
        # Raise it again where it can unwind: a thread sends it once this hook has returned (sent from
        # here, its handler would run, and raise, inside the hook).
        _in_hook = True
        received = None
        _thread.start_new_thread(_send_after_hook, (signum,))
        _in_hook = False  # the last statement: no signal is handled between it and the return


def _send_after_hook(signum: int) -> None:
    while _in_hook:
        time.sleep(0.001)
    os.kill(os.getpid(), signum)


def _at_exit() -> None:
    """The last atexit callback: a signal noted after run_cli finished still sets the exit status."""
    global _raising
    _raising = False
    if received is not None and not _exit_status:
        _exit_now(received)


_previous_excepthook = sys.excepthook
_previous_unraisablehook = sys.unraisablehook


def install() -> None:
    """Handle SIGINT, SIGTERM and SIGHUP from now on in this process (idempotent; main thread only)."""
    global _installed
    if _installed:
        return
    _installed = True
    for signum in SIGNALS:
        if signum == signal.SIGHUP and signal.getsignal(signum) == signal.SIG_IGN:
            continue  # nohup: the user asked to survive the terminal's hang-up
        signal.signal(signum, _on_signal)
    sys.excepthook = _excepthook
    sys.unraisablehook = _unraisablehook
    atexit.register(_at_exit)  # registered first, so it runs last
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)  # deliver what arrived while they were blocked


def exiting(status: int) -> None:
    """The script is exiting with ``status``: from now on a signal only sets the exit status to 128 + N
    (when ``status`` is 0), and nothing more is raised."""
    global _raising, _exit_status
    _raising, _exit_status = False, status


def _imported_by_main() -> bool:
    frame = sys._getframe(2)  # above this function and this module's own code
    while frame is not None and frame.f_code.co_filename.startswith("<frozen importlib"):
        frame = frame.f_back
    return frame is not None and frame.f_globals.get("__name__") == "__main__"


if _imported_by_main():
    install()

"""Progress of long loops: a tqdm bar on a terminal, periodic log lines in a log file.

Every long loop (embedding, scoring, conversion, demo data, training members, generation) wraps its
iterable in :func:`progress`. When stderr is a terminal it shows a tqdm bar; otherwise (a log file, a
cluster job) it logs one line every ``PROGRESS_SECONDS`` seconds (default 30) through ``logging``
(stdout, ``cli.setup_logging``), and a last line when a loop that logged took that long.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

INTERVAL_ENV = "PROGRESS_SECONDS"
DEFAULT_INTERVAL = 30.0
log = logging.getLogger("progress")
T = TypeVar("T")


def progress(
    iterable: Iterable[T], desc: str, total: int | None = None, unit: str = "it", enabled: bool = True
) -> Iterable[T]:
    """``iterable``, reporting its progress as the module says (nothing when not ``enabled``)."""
    if not enabled:
        return iterable
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)
    if sys.stderr.isatty():
        from tqdm import tqdm

        return tqdm(iterable, desc=desc, total=total, unit=unit, leave=False)
    return _logged(iterable, desc, total, unit, interval())


def interval() -> float:
    """Seconds between log lines: ``PROGRESS_SECONDS`` if it is a number >= 0, else the default."""
    try:
        seconds = float(os.environ.get(INTERVAL_ENV, DEFAULT_INTERVAL))
    except ValueError:
        return DEFAULT_INTERVAL
    return seconds if seconds >= 0 else DEFAULT_INTERVAL


def _logged(iterable: Iterable[T], desc: str, total: int | None, unit: str, every: float) -> Iterator[T]:
    start = last = time.monotonic()
    done, logged = 0, False
    for item in iterable:
        yield item
        done += 1
        now = time.monotonic()
        if now - last >= every and (total is None or done < total):
            log.info(_line(desc, done, total, unit, now - start))
            last, logged = now, True
    if logged:
        log.info(_line(desc, done, total, unit, time.monotonic() - start))


def _line(desc: str, done: int, total: int | None, unit: str, elapsed: float) -> str:
    if not total:
        return f"{desc}: {done} {unit} in {elapsed:.0f} s"
    left = elapsed / done * (total - done) if done else 0.0
    ending = "done" if done >= total else f"about {left:.0f} s left"
    return f"{desc}: {done}/{total} {unit} ({100 * done / total:.0f} %) in {elapsed:.0f} s, {ending}"

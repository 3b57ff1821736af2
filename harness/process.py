"""What every process of the harness shares about stopping and writing state: the graceful interrupt (Ctrl-C once:
finish the current trial, then stop; twice, or SIGTERM: stop now), whether a process id still lives, and atomic writes
of the small JSON state files a kill must never leave half-written. Below the stages: a trial, a stage and a study all
check the same interrupt."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)
STOP = threading.Event()  # set by the first Ctrl-C: stop at the next trial's end or stage boundary


class Interrupted(KeyboardInterrupt):
    """A graceful stop: what was finished is kept and the study can be resumed."""


def atomic_json(path: str | Path, obj) -> None:
    """Write JSON so that a kill at any moment leaves the old file or the new one, never a truncated one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


@contextlib.contextmanager
def graceful_interrupts() -> Iterator[None]:
    """Ctrl-C once asks the study to stop after the current trial; a second Ctrl-C stops at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    STOP.clear()
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum, frame):
        if STOP.is_set():
            raise KeyboardInterrupt("second Ctrl-C")
        STOP.set()
        print(
            "Ctrl-C: finishing the current trial, then stopping; Ctrl-C again to stop now", file=sys.stderr, flush=True
        )

    signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        STOP.clear()


def check_interrupt() -> None:
    """At a point where stopping loses nothing (a trial has ended, a stage is done): stop if Ctrl-C asked to."""
    if STOP.is_set():
        raise Interrupted("stopped after Ctrl-C")


def pid_alive(pid: int) -> bool:
    """Whether a process of this host runs under `pid` (someone else's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

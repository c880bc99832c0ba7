"""Bounds on running someone else's code in the test process.

``time_limit`` gives one example a wall-clock limit: an implementation that
never returns fails with where it hung, instead of hanging the session.
Both exceptions here derive from ``BaseException``, so that hypothesis
neither shrinks nor replays the example (a replay would hang again, or find
the rank pool gone and report the run as flaky).
"""

from __future__ import annotations

import signal
import threading
import traceback
from contextlib import contextmanager

# Seconds one in-process example of a property may take (``--example-timeout``);
# a normal example takes well under 2 s, even on 2 busy cores.  On a GPU the
# first example of a format compiles its kernels, with a test worker per
# core compiling at once (an H200 run with a cold kernel cache had examples
# past 60 s that passed): three minutes there before an example counts as hung.
EXAMPLE_TIMEOUT = 60.0
GPU_EXAMPLE_TIMEOUT = 180.0


def example_timeout() -> float:
    """The default limit of one example on the running backend."""
    from dsv4shard import backend

    return EXAMPLE_TIMEOUT if backend.name() == "cpu" else GPU_EXAMPLE_TIMEOUT


class Hung(BaseException):
    """An example ran past its time limit; the message says where it was."""


class RanksLost(BaseException):
    """The rank pool died or hung (a rank killed, or a job past its time);
    the message carries every rank's stderr."""


def where(frame) -> str:
    """The innermost frame of ``frame``'s stack outside this package's own
    machinery (the code under test), and the innermost frame."""
    stack = traceback.extract_stack(frame)
    if not stack:
        return "an unknown place"
    inner = stack[-1]
    text = f"{inner.filename}:{inner.lineno} in {inner.name}"
    for entry in reversed(stack):
        if "/dsv4shard/" not in entry.filename and "/hypothesis/" not in entry.filename:
            if entry is not inner:
                text += f" (called from {entry.filename}:{entry.lineno} in {entry.name})"
            break
    return text


@contextmanager
def time_limit(seconds: float | None, what: str):
    """Raise :class:`Hung` inside the block once ``seconds`` have passed.

    SIGALRM in the main thread: a Python-level wait (``time.sleep``, a busy
    loop, a blocking read) is interrupted at once; a call inside a C
    extension is interrupted when it returns to Python.  Elsewhere (a
    thread that is not the main one, a platform without SIGALRM) no limit
    applies."""
    usable = (seconds and seconds > 0 and hasattr(signal, "setitimer")
              and threading.current_thread() is threading.main_thread())
    if not usable:
        yield
        return

    def on_alarm(signum, frame):
        raise Hung(f"{what} did not finish within {seconds:g} s (hung): it was at "
                   f"{where(frame)}")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def limited(fn, seconds: float | None, what: str | None = None):
    """``fn`` with each call under :func:`time_limit` (same name, for the
    property table's reproducers)."""
    import functools

    @functools.wraps(fn)
    def call(*args, **kwargs):
        with time_limit(seconds, what or f"{fn.__name__} on one example"):
            return fn(*args, **kwargs)

    return call

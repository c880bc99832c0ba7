"""A pytest plugin that writes every test's outcome, and each failure's
report, to a file the moment it is known: ``-p dsv4shard.testing.streamlog``
with ``DSV4SHARD_STREAM_LOG=PATH``.  On a slow backend a run cut short by a
time limit still leaves what it found (pytest prints failures only at the end).
Each line says when (seconds since the session started) and on which xdist
worker, and when each worker was ready: where a slow run's time went.
"""

from __future__ import annotations

import os
import time

import pytest

_PATH = os.environ.get("DSV4SHARD_STREAM_LOG")
_START = time.monotonic()


def _write(text: str) -> None:
    with open(_PATH, "a") as f:
        f.write(text)


def _when() -> str:
    return f"at {time.monotonic() - _START:.0f} s"


@pytest.hookimpl(optionalhook=True)
def pytest_testnodeready(node):
    if _PATH:
        _write(f"READY {node.gateway.id} {_when()}\n")


def pytest_runtest_logreport(report):
    if not _PATH or (report.when != "call" and not report.failed and not report.skipped):
        return
    if os.environ.get("PYTEST_XDIST_WORKER"):  # the controller writes what workers report
        return
    node = getattr(report, "node", None)
    worker = f" {node.gateway.id}" if node is not None else ""
    _write(f"{report.outcome.upper()} {report.nodeid} ({report.when}, "
           f"{report.duration:.1f} s,{worker} {_when()})\n")
    if report.failed:
        _write(_clipped(str(report.longrepr)) + "\n\n")


def _clipped(text: str, head: int = 12000, tail: int = 6000) -> str:
    """A failure's text, its opening (what failed, first) and its end (the
    case and reproducer) kept where it is long."""
    if len(text) <= head + tail:
        return text
    return f"{text[:head]}\n  [... {len(text) - head - tail} characters ...]\n{text[-tail:]}"

"""A pytest plugin that writes every test's outcome, and each failure's
report, to a file the moment it is known: ``-p dsv4shard.testing.streamlog``
with ``DSV4SHARD_STREAM_LOG=PATH``.  On a slow backend a run cut short by a
time limit still leaves what it found (pytest prints failures only at the end).
"""

from __future__ import annotations

import os

_PATH = os.environ.get("DSV4SHARD_STREAM_LOG")


def pytest_runtest_logreport(report):
    if not _PATH or (report.when != "call" and not report.failed and not report.skipped):
        return
    if os.environ.get("PYTEST_XDIST_WORKER"):  # the controller writes what workers report
        return
    with open(_PATH, "a") as f:
        f.write(f"{report.outcome.upper()} {report.nodeid} ({report.when}, "
                f"{report.duration:.1f} s)\n")
        if report.failed:
            text = str(report.longrepr)
            f.write(text[-4000:] + "\n\n")

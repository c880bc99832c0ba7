"""What this process runs: the installed versions of Python and the
packages a verdict depends on (a report's identity, a rank's preflight,
``dsv4shard --version``)."""

from __future__ import annotations

import platform


def installed(dist: str) -> str:
    """The installed version of distribution ``dist``, or "not installed"."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "not installed"


def running() -> dict[str, str]:
    return {"python": platform.python_version(), "mlx": installed("mlx"),
            "mlx_lm": installed("mlx-lm"), "dsv4shard": installed("dsv4shard")}

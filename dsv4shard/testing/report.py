"""Failure messages: what went wrong, the drawn case, and a one-line reproducer."""

from __future__ import annotations

import shlex

from dsv4shard.impl import spec_of


def reproducer(prop, case, **impl) -> str:
    """A shell line that reruns ``prop`` on ``case`` (and the named
    implementations) through ``python -m dsv4shard.testing.repro``."""
    module = prop.__module__.rsplit(".", 1)[-1]
    parts = ["python", "-m", "dsv4shard.testing.repro", f"{module}.{prop.__name__}", repr(case)]
    for key, value in impl.items():
        parts.append(f"--{key.replace('_', '-')}={spec_of(value)}")
    return shlex.join(parts)


def fail(prop, case, message: str, **impl):
    """Raise an AssertionError naming the property, the problem, the case."""
    raise AssertionError(
        f"{prop.__name__}: {message}\n  case: {case!r}\n  reproduce: "
        f"{reproducer(prop, case, **impl)}"
    )

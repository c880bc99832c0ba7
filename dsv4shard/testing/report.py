"""Failure messages: what went wrong, the drawn case, and a one-line reproducer.

Every failure of a property is raised through :func:`judged`, the suite's
one attribution hook (the engine's runner calls it too, for failures raised
elsewhere): on a device other than ``mx.cpu`` it reruns the case on
``mx.cpu`` and replays the MLX operations it recorded, and turns a failure
that is MLX's into a :class:`~dsv4shard.engine.outcome.BackendDefect`
(``dsv4shard.attribution``).  On ``mx.cpu`` it changes nothing and costs
nothing.
"""

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


def judged(prop, case, error: BaseException, **impl) -> BaseException:
    """The exception a failure of ``prop(case, **impl)`` raises: ``error``,
    or the BackendDefect it is when MLX's kernel on this device, not the
    implementation, is at fault."""
    from dsv4shard.attribution import attribute

    return attribute(prop, case, impl, error)


def fail(prop, case, message: str, **impl):
    """Raise an AssertionError naming the property, the problem, the case
    (or the BackendDefect it is, see :func:`judged`)."""
    raise judged(prop, case, AssertionError(
        f"{prop.__name__}: {message}\n  case: {case!r}\n  reproduce: "
        f"{reproducer(prop, case, **impl)}"
    ), **impl)

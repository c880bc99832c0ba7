"""What a property run can end in, and the exceptions that say so.

A property reports through exceptions, never through return values:

- :class:`Departure` (an ``AssertionError``): the implementation departs
  from the reference; the message is the one-line diagnosis.
- :class:`NotApplicable`: there is nothing to check here (the variant has no
  ``shard()``, the backend cannot run the format); the message says why.
- ``NotImplementedError`` raised by the implementation under test: it
  declines the configuration (documented contract); the verdict is DECLINED,
  never a failure, unless the configuration is one DeepSeek-V4 needs.
- :class:`BackendDefect`: MLX's kernel on this device disagrees with
  ``mx.cpu`` on the same arrays; the failure is the backend's, not the
  implementation's.

Anything else an implementation raises is a failure of the implementation.
"""

from __future__ import annotations

PASS = "PASS"  # every example agreed, each comparison strong enough to trust
WEAK = "WEAK"  # every example agreed, but a comparison's bound missed its power target
FAIL = "FAIL"  # a required property departs
DEPARTS = "DEPARTS"  # an informational property departs: reported, never fatal
SKIP = "SKIP"  # nothing to check (reason given)
DECLINED = "DECLINED"  # the implementation raised NotImplementedError for every example
BACKEND = "BACKEND"  # an MLX kernel on this device disagrees with mx.cpu
ERROR = "ERROR"  # the harness itself could not run the property

STATUSES = (PASS, WEAK, FAIL, DEPARTS, SKIP, DECLINED, BACKEND, ERROR)
PASSING = (PASS, WEAK)  # every example agreed (WEAK: not to be relied on)


class Departure(AssertionError):
    """The implementation departs from the reference; the message is the diagnosis."""


class Minor(Departure):
    """A departure measured and found within what one bfloat16 rounding of
    the output does (e.g. a combine rounded once more than DeepSeek's): the
    verdict is DEPARTS with its size, even for a required property."""


class Weak(str):
    """A passing example's detail from a comparison whose bound missed its
    power target (median bound / |expected| above ``tolerance.TARGETS``):
    a wrong answer a few percent off could have passed it.  A verdict with
    one such example is WEAK, never a plain PASS, and counts as no evidence
    (a failure beyond a weak bound is still a failure)."""


def carried(text: str, *notes: str) -> str:
    """``text`` as a :class:`Weak` detail when any of the ``notes`` it was
    built from is one: a detail wrapping a weak comparison's note stays weak."""
    return Weak(text) if any(isinstance(n, Weak) for n in notes) else text


class NotApplicable(Exception):
    """Nothing to check; the message says why."""


class BackendDefect(AssertionError):
    """An MLX operation on this device disagrees with ``mx.cpu`` on the same arrays."""


def one_line(text) -> str:
    return " ".join(str(text).split())


def first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def is_skip(error: BaseException) -> bool:
    """NotApplicable, or pytest's skip (properties of the suite may call
    ``pytest.skip`` where the backend cannot run a case)."""
    if isinstance(error, NotApplicable):
        return True
    return type(error).__name__ == "Skipped" and any(
        c.__module__.startswith("_pytest") for c in type(error).__mro__)

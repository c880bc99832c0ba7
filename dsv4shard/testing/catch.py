"""Run a property against a known-bad implementation and insist it fails.

A property that a broken implementation passes is itself broken; every
property in the suite is therefore also run here, against its mutants,
through the engine's one runner (``dsv4shard.engine.run``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from dsv4shard.engine import outcome as o
from dsv4shard.engine.records import Property, of_function
from dsv4shard.engine.run import run

# The ``ci`` hypothesis profile's max_examples (conftest.py): a mutant must be
# caught within the examples the default run gives a property.
CI_EXAMPLES = 20


class MutantSurvived(AssertionError):
    """The property passed every example drawn for a known-bad implementation."""

    def __init__(self, message: str, examples: int = 0):
        super().__init__(message)
        self.examples = examples  # how many it passed


@dataclass(frozen=True)
class Kill:
    """How a property caught a mutant."""

    examples: int  # examples run up to and including the first failure
    seconds: float
    error: str  # the first line of what the property raised


def record_for(prop) -> Property:
    """The table's record of ``prop``, or (a test's own property function)
    an unlisted record for it."""
    if isinstance(prop, Property):
        return prop
    try:
        return of_function(prop)
    except KeyError:
        return Property(prop.__name__, prop, lambda: None, "", "", "")


def assert_caught(prop, strategy, *, max_examples: int = CI_EXAMPLES, **impl) -> Kill:
    """Draw cases from ``strategy``, call ``prop(case, **impl)`` and return the
    first failure; raise :class:`MutantSurvived` if there is none.

    The ``ci`` profile's semantics: derandomized, no example database,
    ``CI_EXAMPLES`` examples.  Shrinking is skipped: the question is only
    whether the property fails.  A property that skips (where the backend
    cannot run the case) skips the caller too: never a catch.
    """
    import pytest

    record = record_for(prop)
    # Every departure counts as a catch here, informational ones too.
    record = replace(record, required=True, examples=None)
    verdict = run(record, impl, examples=max_examples, shrink=False, cases=strategy)
    if verdict.status in (o.FAIL, o.BACKEND):
        return Kill(verdict.examples, verdict.seconds, verdict.detail)
    if verdict.status == o.SKIP:
        pytest.skip(verdict.detail)
    if verdict.status == o.ERROR:
        raise RuntimeError(f"{record.name}: {verdict.detail}")
    raise MutantSurvived(
        f"{record.name} passed {verdict.examples} examples against "
        f"{ {k: getattr(v, '__name__', v) for k, v in impl.items()} }"
        + (f" (declined: {'; '.join(verdict.declined)})" if verdict.declined else ""),
        verdict.examples)

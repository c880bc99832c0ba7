"""Run a property against a known-bad implementation and insist it fails.

A property that a broken implementation passes is itself broken; every
property in the suite is therefore also run here, against its mutants.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import HypothesisException

# The ``ci`` hypothesis profile's max_examples (conftest.py): a mutant must be
# caught within the examples the default run gives a property.
CI_EXAMPLES = 25


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


def assert_caught(prop, strategy, *, max_examples: int = CI_EXAMPLES, **impl) -> Kill:
    """Draw cases from ``strategy``, call ``prop(case, **impl)`` and return the
    first failure; raise :class:`MutantSurvived` if there is none.

    The ``ci`` profile's semantics: derandomized, no example database,
    ``CI_EXAMPLES`` examples.  Shrinking is skipped: the question is only
    whether the property fails.  A property that skips (pytest's skip, where
    the backend cannot run the case) skips the caller too: never a catch.
    """
    count = 0
    first_error: list[BaseException] = []

    @settings(
        max_examples=max_examples,
        phases=[Phase.explicit, Phase.generate],
        database=None,
        deadline=None,
        derandomize=True,
        suppress_health_check=list(HealthCheck),
        report_multiple_bugs=False,
    )
    @given(case=strategy)
    def run(case):
        nonlocal count
        count += 1
        try:
            prop(case, **impl)
        except HypothesisException:
            raise
        except Exception as error:  # a crash is a catch too
            first_error.append(error)
            raise

    start = time.perf_counter()
    try:
        run()
    except HypothesisException:
        raise
    except BaseException as error:
        if not first_error:
            raise
        del error
        message = str(first_error[0]).strip().splitlines() or [type(first_error[0]).__name__]
        return Kill(count, time.perf_counter() - start, message[0])
    raise MutantSurvived(
        f"{getattr(prop, '__name__', prop)} passed {count} examples against "
        f"{ {k: getattr(v, '__name__', v) for k, v in impl.items()} }", count
    )

"""Every known-bad implementation is caught by the property named for it."""

import pytest

from dsv4shard.testing.catch import assert_caught
from dsv4shard.testing.mutants import catalogue

MUTANTS = catalogue()


@pytest.mark.parametrize("mutant", MUTANTS, ids=[m.name for m in MUTANTS])
def test_mutant_is_caught(mutant):
    assert_caught(mutant.prop, mutant.strategy(), **mutant.impl)

"""The unfused MLX block against the float64 reference."""

import pytest
from hypothesis import given

from dsv4shard.backend import unsupported
from dsv4shard.testing import strategies as s
from dsv4shard.testing.properties import unfused
from reference.quantization import QuantFormat


@given(case=s.moe_cases())
def test_switch_glu_matches_reference(case):
    unfused.switch_glu_matches_reference(case)


@given(case=s.moe_cases())
def test_moe_matches_reference(case):
    unfused.moe_matches_reference(case)


@given(case=s.moe_cases())
def test_sorted_matches_unsorted(case):
    unfused.sorted_matches_unsorted(case)


@given(case=s.moe_cases())
def test_moe_matches_reference_at_extremes(case):
    unfused.moe_matches_reference_at_extremes(case)


@given(case=s.moe_cases())
def test_router_matches_reference_on_exact_inputs(case):
    unfused.router_matches_reference_on_exact_inputs(case)


GLOBAL_SCALE = QuantFormat("nvfp4", 16, 4, global_scale=True)


@pytest.mark.skipif(bool(unsupported(GLOBAL_SCALE, "float32")),
                    reason=str(unsupported(GLOBAL_SCALE, "float32")))
@given(case=s.moe_cases(formats=[GLOBAL_SCALE]))
def test_moe_matches_reference_with_global_scale(case):
    unfused.moe_matches_reference(case)

"""What the running backend cannot compute, shown rather than assumed.

Each case ``dsv4shard.backend.unsupported`` names is run here as a strict
xfail: the day MLX fixes it, the test reports XPASS as a failure and the
exclusion is dropped.
"""

import pytest
from hypothesis import given, settings

from dsv4shard import backend
from dsv4shard.testing import strategies as s
from dsv4shard.testing.properties import unfused
from reference.quantization import QuantFormat

MXFP8 = QuantFormat("mxfp8", 32, 8)


@pytest.mark.skipif(backend.name() != "cpu", reason="a defect of MLX's CPU build")
@pytest.mark.xfail(strict=True, reason=str(backend.unsupported(MXFP8, "float16")))
@settings(max_examples=50)
@given(case=s.moe_cases(formats=[MXFP8]).map(
    lambda c: c.__class__(**{**c.__dict__, "dtype": "float16", "activation_scale": 30.0})))
def test_cpu_mxfp8_float16_overflows(case):
    unfused.switch_glu_matches_reference(case)


MXFP4 = QuantFormat("mxfp4", 32, 4)


@pytest.mark.skipif(backend.name() != "cpu", reason="a defect of MLX's CPU build")
@pytest.mark.xfail(strict=True, reason=str(backend.float16_code_overflow(MXFP4, "float16")))
@settings(max_examples=50)
@given(case=s.moe_cases(formats=[MXFP4]).map(lambda c: c.__class__(**{
    **c.__dict__, "dtype": "float16", "activation_scale": 30.0,
    "config": c.config.__class__(**{**c.config.__dict__, "swiglu_limit": 0.0})})))
def test_cpu_float_formats_float16_overflow_unclipped(case):
    unfused.switch_glu_matches_reference(case)


AFFINE_G128 = QuantFormat("affine", 128, 4)


@pytest.mark.skipif(backend.name() != "cuda", reason="a defect of MLX's CUDA build")
@pytest.mark.xfail(reason=str(backend.unsupported(AFFINE_G128, "float32")))
@settings(max_examples=10)
@given(case=s.moe_cases(formats=[AFFINE_G128]))
def test_cuda_affine_group_128(case):
    unfused.moe_matches_reference(case)

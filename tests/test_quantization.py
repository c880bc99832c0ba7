"""MLX's quantization formats: the NumPy reference against mx.quantize /
mx.dequantize, and the known-bad dequantizers it must catch."""

import re
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given

import reference.quantization as q
from dsv4shard.testing.catch import assert_caught
from dsv4shard.testing.mutants import quantization as mutants
from dsv4shard.testing.properties import quantization as props
from dsv4shard.testing.strategies import QuantCase, quant_cases


@given(case=quant_cases())
def test_dequantize_matches_mlx(case):
    props.dequantize_matches_mlx(case)


@given(case=quant_cases())
def test_quantize_round_trip(case):
    props.quantize_round_trip(case)


@given(case=quant_cases())
def test_quantize_matches_mlx(case):
    props.quantize_matches_mlx(case)


@given(case=quant_cases())
def test_pack_unpack_inverse(case):
    props.pack_unpack_inverse(case)


@given(case=quant_cases())
def test_dequantize_to_another_dtype_matches_mlx(case):
    """``scales_dtype`` apart from ``dtype``: MLX computes in the scales' dtype
    and only then casts to the dtype asked for."""
    if case.fmt.mode != "affine":
        return
    quantized = props.stored_in(props.mlx_quantize(case.fmt, props.make_matrix(case)),
                                case.scales_dtype)
    for dtype in props.MX_DTYPES:
        want = props.mlx_dequantize(quantized, case, dtype)
        got = q.dequantize(*quantized[:3], case.fmt, dtype=dtype,
                           scales_dtype=case.scales_dtype)
        assert props.same_bits(got, want).all(), (case, dtype)


MUTANTS = sorted(name for name in vars(mutants) if name.startswith("dequantize_"))
# The round trip sees only float32 output, so it can catch only mutants that
# break the structure, not the rounding.
STRUCTURAL = ["dequantize_group_off_by_one", "dequantize_scales_biases_swapped",
              "dequantize_global_scale_divided"]


@pytest.mark.parametrize("name", MUTANTS)
def test_mutant_caught_by_dequantize_matches_mlx(name):
    assert_caught(props.dequantize_matches_mlx, quant_cases(),
                  dequantize=getattr(mutants, name))


@pytest.mark.parametrize("name", STRUCTURAL)
def test_mutant_caught_by_round_trip(name):
    assert_caught(props.quantize_round_trip, quant_cases(), dequantize=getattr(mutants, name))


def test_failure_message_reproduces():
    """The last line of a failure is a shell command rerunning the same failure."""
    case = QuantCase(q.QuantFormat("affine", 32, 4), (2, 64), 1.0, "float32", seed=7)
    with pytest.raises(AssertionError) as failure:
        props.dequantize_matches_mlx(case, dequantize=mutants.dequantize_scales_biases_swapped)
    message = str(failure.value)
    assert "dequantize_matches_mlx" in message.splitlines()[0]
    code = re.search(r'python -c "(.*)"$', message).group(1)
    with pytest.raises(AssertionError) as again:
        exec(code, {})
    assert str(again.value) == message


def test_reference_imports_no_mlx():
    code = "import sys, reference; print('mlx' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False", out.stderr


def test_e4m3_codec_matches_mlx():
    """All 256 codes decode as mx.from_fp8; float32 values near every code
    (ties, saturation, subnormals, inf, NaN) encode as mx.to_fp8."""
    codes = np.arange(256, dtype=np.uint8)
    want = props.to_numpy(mx.from_fp8(mx.array(codes), mx.float32))
    assert props.same_bits(q.e4m3_to_float(codes), want).all()
    finite = q.e4m3_to_float(codes)
    finite = finite[np.isfinite(finite)]
    probes = np.concatenate([finite, finite * (1 + 2.0**-5), finite * (1 + 2.0**-4),
                             finite * (1 + 2.0**-4 + 2.0**-20), [464.0, 470.0, 480.0, 1e9],
                             [np.inf, -np.inf, np.nan, 2.0**-10, 2.0**-10 * 3, -0.0]])
    probes = probes.astype(np.float32)
    got = q.float_to_e4m3(probes)
    want = np.array(mx.to_fp8(mx.array(probes)))
    same = props.same_e4m3_codes(got, want)  # any NaN code is a NaN (CUDA flips its sign)
    if mx.default_device() != mx.cpu:
        # MLX's CUDA to_fp8 encodes a NaN input with a code of its own (seen
        # on an H200): NaN's encoding is the backend's; every number's is not.
        same |= np.isnan(probes)
    assert same.all(), probes[~same]


def test_e2m1_ties_go_to_the_smaller_magnitude():
    """MLX 0.32.4's CPU quantize: nearest table entry, first one on a tie."""
    x = np.array([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, -0.75, -0.1, -0.0, 7.0, -7.0])
    want = [0, 1, 2, 3, 4, 5, 6, 9, 0, 0, 7, 15]
    assert q.float_to_e2m1(x).tolist() == want


@pytest.mark.parametrize("bits, index", [(3, 10), (5, 6), (6, 5)])
def test_non_power_of_two_bits_cross_words(bits, index):
    """3, 5, 6 bits: one little-endian bit stream, so the code at bits 30..
    has its low 2 bits at the top of word 0 and the rest at the bottom of word 1."""
    codes = np.zeros(32, dtype=np.uint32)
    codes[index] = 2**bits - 1
    words = q.pack(codes, bits)
    assert words[0] == 0xC0000000 and words[1] == 2 ** (bits - 2) - 1
    assert not words[2:].any()

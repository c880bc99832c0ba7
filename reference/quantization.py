"""MLX's quantization formats, written out in NumPy.

Every format stores a matrix row by row in groups of ``group_size`` values
along the last axis; each group shares one scale (and, for ``affine``, one
bias).  The quantized values are packed into little-endian ``uint32`` words.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

__all__ = [  # what ``from reference.quantization import *`` (and ``reference``) exports
    "AFFINE_BITS", "AFFINE_GROUPS", "QUANT_FORMATS", "QuantFormat", "Quantized",
    "pack", "unpack", "dequantize", "quantize",
    "e2m1_to_float", "e4m3_to_float", "e8m0_to_float",
    "float_to_e2m1", "float_to_e4m3", "float_to_e8m0", "round_to_bfloat16",
]


@dataclass(frozen=True)
class QuantFormat:
    """One MLX quantization format: ``mode``, ``group_size``, ``bits``.

    ``global_scale`` is only meaningful for ``nvfp4``: each expert (each 2-D
    matrix) then carries one extra float32 scale.
    """

    mode: str
    group_size: int
    bits: int
    global_scale: bool = False

    @property
    def name(self) -> str:
        suffix = "-gs" if self.global_scale else ""
        return f"{self.mode}-g{self.group_size}-b{self.bits}{suffix}"


# Every format MLX 0.32 accepts: affine (bits x groups), and the float formats with
# their fixed group and bits.
AFFINE_BITS = (2, 3, 4, 5, 6, 8)
AFFINE_GROUPS = (32, 64, 128)
QUANT_FORMATS = (
    tuple(QuantFormat("affine", g, b) for g in AFFINE_GROUPS for b in AFFINE_BITS)
    + (
        QuantFormat("mxfp4", 32, 4),
        QuantFormat("mxfp8", 32, 8),
        QuantFormat("nvfp4", 16, 4),
        QuantFormat("nvfp4", 16, 4, global_scale=True),
    )
)


# ---------------------------------------------------------------------------
# Bit packing
# ---------------------------------------------------------------------------


def pack(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack ``bits``-bit codes along the last axis into little-endian uint32 words.

    MLX writes a row of codes as one little-endian bit stream: code ``i``
    occupies stream bits ``[i * bits, (i + 1) * bits)``, lowest bit first, and
    word ``j`` holds stream bits ``[32 j, 32 j + 32)``.  For 2, 4 and 8 bits no
    code crosses a word.  For 3, 5 and 6 bits MLX's kernels read packs of 3, 5
    and 3 bytes holding 8, 8 and 4 codes; those packs are pieces of the same
    stream, so codes there cross byte and word boundaries.
    """
    values = np.asarray(values).astype(np.uint64)
    *lead, count = values.shape
    if (count * bits) % 32:
        raise ValueError(f"{count} codes of {bits} bits do not fill whole uint32 words")
    if np.any(values >> np.uint64(bits)):
        raise ValueError(f"a code does not fit in {bits} bits")
    stream = bits_of(values, bits).reshape(*lead, count * bits // 32, 32)
    return from_bits(stream)


def unpack(words: np.ndarray, bits: int, count: int | None = None) -> np.ndarray:
    """The first ``count`` ``bits``-bit codes of each row of packed words (all
    of them when ``count`` is None), as uint32: the inverse of :func:`pack`."""
    words = np.asarray(words, dtype=np.uint32)
    *lead, n_words = words.shape
    if count is None:
        count = n_words * 32 // bits
    stream = bits_of(words, 32).reshape(*lead, n_words * 32)
    return from_bits(stream[..., : count * bits].reshape(*lead, count, bits))


def bits_of(values: np.ndarray, bits: int) -> np.ndarray:
    """Each value's lowest ``bits`` bits, lowest first, along a new last axis."""
    shifts = np.arange(bits, dtype=np.uint64)
    return (values.astype(np.uint64)[..., None] >> shifts) & np.uint64(1)


def from_bits(bit_rows: np.ndarray) -> np.ndarray:
    """The inverse of :func:`bits_of`: the last axis' bits, lowest first, as uint32."""
    shifts = np.arange(bit_rows.shape[-1], dtype=np.uint64)
    return (bit_rows.astype(np.uint64) << shifts).sum(axis=-1).astype(np.uint32)


# ---------------------------------------------------------------------------
# The small float formats: decoders (codes -> float64) and encoders
# ---------------------------------------------------------------------------

E2M1_MAGNITUDES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
E2M1_MAX = 6.0
E4M3_MAX = 448.0


def e2m1_to_float(codes: np.ndarray) -> np.ndarray:
    """FP4 E2M1: sign, 2 exponent bits (bias 1), 1 mantissa bit; no inf/NaN."""
    codes = np.asarray(codes).astype(np.int64)
    magnitude = E2M1_MAGNITUDES[codes & 0x7]
    return np.where(codes & 0x8, -magnitude, magnitude)


def e4m3_to_float(codes: np.ndarray) -> np.ndarray:
    """FP8 E4M3 "fn": sign, 4 exponent bits (bias 7, subnormals), 3 mantissa
    bits; no inf, and S.1111.111 (0x7F, 0xFF) is NaN, as MLX 0.32.4 decodes it."""
    codes = np.asarray(codes).astype(np.int64)
    exponent = (codes >> 3) & 0xF
    eighths = (codes & 0x7).astype(np.float64)
    normal = (1.0 + eighths / 8) * np.exp2(exponent - 7.0)
    subnormal = eighths / 8 * 2.0**-6
    magnitude = np.where(exponent == 0, subnormal, normal)
    magnitude = np.where((codes & 0x7F) == 0x7F, np.nan, magnitude)
    return np.where(codes & 0x80, -magnitude, magnitude)


def e8m0_to_float(codes: np.ndarray) -> np.ndarray:
    """FP8 E8M0: an unsigned power of two, 2**(code - 127).

    The OCP MX spec makes 0xFF a NaN; MLX computes ``2 ** (code - 127)`` in the
    output dtype, where 0xFF's 2**128 overflows to inf.  We return 2**128 and
    let the rounding to the output dtype overflow the same way.
    """
    codes = np.asarray(codes).astype(np.int64)
    return np.exp2(codes - 127.0)


def float_to_e2m1(x: np.ndarray) -> np.ndarray:
    """E2M1 code nearest to ``x``, as MLX 0.32.4's CPU ``mx.quantize`` picks it:
    the first entry of the 16-code table at the least float32 distance.

    The table lists +0, 0.5, ..., 6 before -0, -0.5, ..., -6, so a tie goes to
    the smaller magnitude (0.75 -> 0.5: not round-to-even, which MLX's GPU
    encoder ``fp4_e2m1`` uses), and whatever rounds to zero, negative or not,
    is +0.  Magnitudes beyond 6 saturate, until they are so large (about
    2**26) that every float32 distance is equal and +0 wins; NaN (a zero nvfp4
    scale's 0 / 0) is code 0 as well.
    """
    x = np.asarray(x, dtype=np.float32)
    table = e2m1_to_float(np.arange(16)).astype(np.float32)
    with np.errstate(invalid="ignore"):
        distance = np.abs(x[..., None] - table)
    return np.argmin(np.nan_to_num(distance, nan=0.0), axis=-1).astype(np.uint8)


def float_to_e4m3(x: np.ndarray) -> np.ndarray:
    """E4M3 code of ``x`` as MLX's ``to_fp8`` gives it: round to nearest even,
    saturating at +-448 (never to the NaN code); inf and NaN saturate too.
    ``x`` is first rounded to float32, which is what MLX converts from.
    """
    x = np.asarray(x, dtype=np.float32).astype(np.float64)
    magnitude = np.abs(x)
    # Subnormals (below 2**-6) count steps of 2**-9; 8 steps carry into the
    # first normal code (0x08) by themselves.
    subnormal = np.rint(magnitude / 2.0**-9)
    # Normals 1.mmm * 2**e count eighths of 2**e, 8 to 16; 16 eighths carry
    # into the next exponent by themselves.
    _, frexp_exponent = np.frexp(np.maximum(magnitude, 2.0**-6))
    exponent = frexp_exponent - 1
    eighths = np.rint(magnitude / np.exp2(exponent - 3.0))
    normal = (exponent + 7) * 8 + (eighths - 8)
    code = np.where(magnitude < 2.0**-6, subnormal, normal)
    code = np.where(np.isnan(x), 0x7E, np.minimum(code, 0x7E))
    return (code.astype(np.int64) | np.where(np.signbit(x), 0x80, 0)).astype(np.uint8)


def float_to_e8m0(x: np.ndarray) -> np.ndarray:
    """E8M0 code of the smallest power of two >= ``x`` (finite, >= 0): MLX 0.32.4
    rounds the MX group scale up, so that no element of the group saturates.

    Zero has no power of two; MLX gives it code 127 (a scale of 1).  Below
    2**-127 we clip to code 0, where MLX 0.32.4's CPU path wraps the code
    modulo 256 (a group whose max |w| is under about 2**-118 gets a huge
    scale back): the one place our quantize departs from MLX on purpose.
    """
    x = np.asarray(x, dtype=np.float64)
    mantissa, exponent = np.frexp(x)  # x = mantissa * 2**exponent, mantissa in [0.5, 1)
    ceil_log2 = np.where(mantissa == 0.5, exponent - 1, exponent)
    code = np.where(x > 0, ceil_log2 + 127, 127)
    return np.clip(code, 0, 254).astype(np.uint8)


# ---------------------------------------------------------------------------
# MLX's arithmetic: float32, rounded to float16 / bfloat16 after each op
# ---------------------------------------------------------------------------

FLOAT_DTYPES = ("float32", "float16", "bfloat16")


def round_to_bfloat16(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16, round to nearest even on the bits (NumPy has no
    bfloat16), kept in float32: add 0x7FFF plus the kept lowest bit, cut the
    low half."""
    x = np.asarray(x, dtype=np.float32)
    bits = x.view(np.uint32).astype(np.uint64)
    kept_lsb = (bits >> np.uint64(16)) & np.uint64(1)
    rounded = (bits + np.uint64(0x7FFF) + kept_lsb) & np.uint64(0xFFFF0000)
    return np.where(np.isnan(x), np.float32(np.nan), rounded.astype(np.uint32).view(np.float32))


def round_to(x: np.ndarray, dtype: str) -> np.ndarray:
    """``x`` rounded to ``dtype``, held in float32 (all three dtypes' values
    are float32 values)."""
    with np.errstate(over="ignore"):
        x = np.asarray(x).astype(np.float32)
        if dtype == "float32":
            return x
        if dtype == "float16":
            return x.astype(np.float16).astype(np.float32)
    if dtype == "bfloat16":
        return round_to_bfloat16(x)
    raise ValueError(f"dtype must be one of {FLOAT_DTYPES}, got {dtype!r}")


def multiply_in(a: np.ndarray, b: np.ndarray, dtype: str) -> np.ndarray:
    """``a * b`` as MLX computes it in ``dtype``: in float32, then rounded.
    (For these operands the float32 product is exact, so that is one rounding.)"""
    with np.errstate(over="ignore", invalid="ignore"):
        return round_to(np.asarray(a, np.float32) * np.asarray(b, np.float32), dtype)


def add_in(a: np.ndarray, b: np.ndarray, dtype: str) -> np.ndarray:
    """``a + b`` as MLX computes it in ``dtype``: in float32, then rounded."""
    with np.errstate(over="ignore", invalid="ignore"):
        return round_to(np.asarray(a, np.float32) + np.asarray(b, np.float32), dtype)


# ---------------------------------------------------------------------------
# Groups
# ---------------------------------------------------------------------------


def grouped(x: np.ndarray, group_size: int) -> np.ndarray:
    """[..., n] -> [..., n / group_size, group_size]."""
    *lead, n = x.shape
    return x.reshape(*lead, n // group_size, group_size)


def ungrouped(x: np.ndarray) -> np.ndarray:
    """[..., groups, group_size] -> [..., groups * group_size]."""
    return x.reshape(*x.shape[:-2], x.shape[-2] * x.shape[-1])


def per_matrix(value, ndim: int) -> np.ndarray:
    """A per-matrix float32 value (a scalar, or one per leading index, e.g.
    per expert) shaped to broadcast against a grouped [..., O, groups, group]
    array of ``ndim`` dimensions."""
    value = np.asarray(value, dtype=np.float32)
    if value.size == 1:
        return value.reshape(())
    return value.reshape(value.shape + (1,) * (ndim - value.ndim))


# ---------------------------------------------------------------------------
# Dequantization
# ---------------------------------------------------------------------------


def dequantize(
    weight: np.ndarray,
    scales: np.ndarray,
    biases: np.ndarray | None,
    fmt: QuantFormat,
    global_scale=None,
    dtype: str = "float32",
    scales_dtype: str | None = None,
    fma: bool = False,
) -> np.ndarray:
    """Exactly what ``mx.dequantize(weight, scales, biases, fmt.group_size,
    fmt.bits, fmt.mode, global_scale=..., dtype=dtype)`` returns (MLX 0.32.4),
    as float64.

    ``weight``: packed uint32 [..., O, I * bits / 32].  ``scales``, ``biases``:
    [..., O, I / group_size]; for ``affine``, their values, which MLX stores
    in ``scales_dtype`` (default ``dtype``, as MLX's output then defaults to
    the scales' dtype); for the float formats, uint8 codes and no biases.
    ``global_scale`` (nvfp4 only): a scalar, or one per leading index.

    ``fma``: affine's ``scale * q + bias`` as a fused multiply-add, the way
    a backend that contracts multiply and add computes it (MLX's CUDA
    build); the default is MLX's CPU arithmetic, a multiply and an add each
    rounded.  The float formats have no add; ``fma`` changes nothing there.
    """
    if fmt.mode == "affine":
        return dequantize_affine(weight, scales, biases, fmt, dtype, scales_dtype or dtype, fma)
    if global_scale is not None and fmt.mode != "nvfp4":
        raise ValueError(f"only nvfp4 takes a global scale, not {fmt.mode}")
    return dequantize_float(weight, scales, fmt, global_scale, dtype)


def dequantize_affine(weight, scales, biases, fmt, dtype, scales_dtype,
                      fma: bool = False) -> np.ndarray:
    """``scale * q + bias`` per group.  MLX's CPU multiplies, then adds, as
    two ops in the scales' dtype (each rounded to it, no fused multiply-add),
    and only then casts to ``dtype``.  With ``fma``: ``scale * q + bias``
    exact, rounded once to float32, then to the scales' dtype (one rounding
    for float32 scales), then cast to ``dtype``."""
    codes = grouped(unpack(weight, fmt.bits).astype(np.float32), fmt.group_size)
    scale = round_to(scales, scales_dtype)[..., None]
    bias = round_to(biases, scales_dtype)[..., None]
    if fma:
        values = round_to(fused_multiply_add(codes, scale, bias), scales_dtype)
    else:
        values = add_in(multiply_in(codes, scale, scales_dtype), bias, scales_dtype)
    return round_to(ungrouped(values), dtype).astype(np.float64)


def fused_multiply_add(a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
    """``a * b + c`` rounded once to float32 (to nearest, ties to even), for
    float32 operands whose product ``a * b`` fits a float64 exactly (a code
    of at most 8 bits times a float32 scale does).

    The float64 sum ``hi`` may itself be rounded; the exact sum is ``hi +
    lo`` (Knuth's two-sum).  Rounding ``hi`` to float32 is then right,
    except when ``hi`` lies exactly half-way between two float32 values and
    ``lo`` is not 0: the exact sum is then off the tie, on ``lo``'s side.
    """
    with np.errstate(over="ignore", invalid="ignore"):
        product = np.asarray(a, np.float64) * np.asarray(b, np.float64)
        addend = np.broadcast_to(np.asarray(c, np.float64), product.shape)
        hi = product + addend
        virtual = hi - product
        lo = (product - (hi - virtual)) + (addend - virtual)
        nearest = hi.astype(np.float32)
        # The float32 neighbour of ``nearest`` on hi's side, and the tie between them.
        other = np.nextafter(nearest, np.where(hi > nearest, np.float32(np.inf),
                                               np.float32(-np.inf)))
        tie = (nearest.astype(np.float64) + other.astype(np.float64)) / 2
    on_tie = (hi == tie) & (hi != nearest) & (lo != 0) & np.isfinite(nearest) \
        & np.isfinite(other)
    side = np.where(lo > 0, np.maximum(nearest, other), np.minimum(nearest, other))
    return np.where(on_tie, side, nearest)


def dequantize_float(weight, scales, fmt, global_scale, dtype) -> np.ndarray:
    """``element * group scale`` in ``dtype``: MLX rounds the decoded elements
    and scales to ``dtype`` first, so with float16 an e8m0 scale below 2**-24
    is 0 and one of 2**16 or more is inf."""
    codes = grouped(unpack(weight, fmt.bits), fmt.group_size)
    decode = e2m1_to_float if fmt.bits == 4 else e4m3_to_float
    elements = round_to(decode(codes), dtype)
    scale = round_to(group_scale(scales, fmt), dtype)[..., None]
    if global_scale is None:
        return ungrouped(multiply_in(elements, scale, dtype)).astype(np.float64)
    # nvfp4's tensor scale: MLX multiplies each group scale by
    # global_scale / (448 * 6).  The global scale is float32 and type
    # promotion wins over ``dtype``: from here on all is float32, and so is
    # the result, whatever ``dtype`` asked for.
    decode_factor = per_matrix(global_scale, codes.ndim) / np.float32(E4M3_MAX * E2M1_MAX)
    scale = multiply_in(scale, decode_factor, "float32")
    return ungrouped(multiply_in(elements, scale, "float32")).astype(np.float64)


def group_scale(scales: np.ndarray, fmt: QuantFormat) -> np.ndarray:
    """The float formats' group scales: e4m3 for nvfp4, e8m0 for mxfp4/mxfp8."""
    if fmt.mode == "nvfp4":
        return e4m3_to_float(scales)
    return e8m0_to_float(scales)


# ---------------------------------------------------------------------------
# Quantization
# ---------------------------------------------------------------------------


class Quantized(NamedTuple):
    """What ``mx.quantize`` returns, plus the nvfp4 global scale it was given."""

    weight: np.ndarray  # uint32 [..., O, I * bits / 32]
    scales: np.ndarray  # float32 values (affine) or uint8 codes, [..., O, I / group]
    biases: np.ndarray | None  # float32 [..., O, I / group], affine only
    global_scale: np.ndarray | None  # float32, one per matrix, nvfp4 only


def quantize(w: np.ndarray, fmt: QuantFormat, global_scale=None) -> Quantized:
    """Quantize ``w`` [..., O, I] (as float32) the way ``mx.quantize`` does on
    MLX 0.32.4's CPU, bit for bit (but see :func:`float_to_e8m0`).

    For nvfp4 with ``fmt.global_scale``, a missing ``global_scale`` defaults to
    each matrix's max |w| (:func:`nvfp4_global_scale`), as MLX's tests pick it.
    """
    w = np.asarray(w, dtype=np.float32)
    if w.shape[-1] % fmt.group_size:
        raise ValueError(f"last axis {w.shape[-1]} is not a multiple of {fmt.group_size}")
    if fmt.mode == "affine":
        return quantize_affine(w, fmt)
    if fmt.mode == "nvfp4":
        if fmt.global_scale and global_scale is None:
            global_scale = nvfp4_global_scale(w)
        return quantize_nvfp4(w, fmt, global_scale)
    return quantize_mx(w, fmt)


def quantize_affine(w: np.ndarray, fmt: QuantFormat) -> Quantized:
    """Per group, ``q = round((w - bias) / scale)`` (ties to even), clipped to
    ``[0, 2**bits - 1]``, everything in float32 as MLX's CPU kernel does it.

    MLX refines the definition (``scale = (max - min) / (2**bits - 1)``,
    ``bias = min``) in two ways, which we follow to match it bit for bit:

    * the bias is the endpoint of larger magnitude, so that it is exact, and
      the scale is negative when that endpoint is the max;
    * the scale is then stretched to ``edge / round(edge / scale)`` so that a
      code lands exactly on 0.0.  When the stretch shrinks the scale, the far
      endpoint can sit up to one step past the last code and is clipped
      there: such elements are off by up to one step, not half a step.
    """
    n_bins = np.float32(2**fmt.bits - 1)
    groups = grouped(w, fmt.group_size)
    w_max = groups.max(axis=-1)
    w_min = groups.min(axis=-1)
    min_is_edge = np.abs(w_min) > np.abs(w_max)
    # A constant group would get a zero scale; MLX floors it at 1e-7.
    step = np.maximum((w_max - w_min) / n_bins, np.float32(1e-7))
    scale = np.where(min_is_edge, step, -step)
    edge = np.where(min_is_edge, w_min, w_max)
    zero_code = np.rint(edge / scale)
    with np.errstate(divide="ignore", invalid="ignore"):
        scale = np.where(zero_code != 0, edge / zero_code, scale)
    bias = np.where(zero_code != 0, edge, np.float32(0))
    codes = np.rint((groups - bias[..., None]) / scale[..., None])
    codes = np.clip(codes, 0, n_bins).astype(np.uint32)
    return Quantized(pack(ungrouped(codes), fmt.bits), scale, bias, None)


def quantize_mx(w: np.ndarray, fmt: QuantFormat) -> Quantized:
    """mxfp4 / mxfp8: per group of 32, the smallest power-of-two scale that
    brings the group's max |w| within the element format's max (6 for e2m1,
    448 for e4m3), then each scaled element to its nearest code."""
    element_max = np.float32(E2M1_MAX if fmt.bits == 4 else E4M3_MAX)
    groups = grouped(w, fmt.group_size)
    group_max = np.abs(groups).max(axis=-1, keepdims=True)
    scale_codes = float_to_e8m0(group_max / element_max)  # float32 division, as MLX
    scaled = groups / e8m0_to_float(scale_codes).astype(np.float32)
    return Quantized(pack_elements(scaled, fmt), scale_codes[..., 0], None, None)


def quantize_nvfp4(w: np.ndarray, fmt: QuantFormat, global_scale=None) -> Quantized:
    """nvfp4: per group of 16, an e4m3 scale (max |w| / 6, to nearest even),
    then each scaled element to its nearest e2m1 code.

    With a global scale g the e4m3 scales are stored multiplied by
    ``448 * 6 / g`` (g = max |w| then spans e4m3's whole range), and
    dequantizing multiplies them by ``g / (448 * 6)``.  All in float32.
    """
    groups = grouped(w, fmt.group_size)
    encode_factor = np.float32(1)
    if global_scale is not None:
        global_scale = np.asarray(global_scale, dtype=np.float32)
        encode_factor = np.float32(E4M3_MAX * E2M1_MAX) / per_matrix(global_scale, groups.ndim)
    group_max = np.abs(groups).max(axis=-1, keepdims=True)
    scale_codes = float_to_e4m3(group_max / np.float32(E2M1_MAX) * encode_factor)
    scale = e4m3_to_float(scale_codes).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        scaled = groups / scale * encode_factor  # an all-zero group: 0 / 0, code 0
    return Quantized(pack_elements(scaled, fmt), scale_codes[..., 0], None, global_scale)


def pack_elements(scaled: np.ndarray, fmt: QuantFormat) -> np.ndarray:
    """Encode scaled elements [..., groups, group] to e2m1 / e4m3 and pack them."""
    encode = float_to_e2m1 if fmt.bits == 4 else float_to_e4m3
    return pack(ungrouped(encode(scaled)), fmt.bits)


def nvfp4_global_scale(w: np.ndarray) -> np.ndarray:
    """Each matrix's max |w|, float32 (a scalar for a 2-D ``w``)."""
    return np.abs(np.asarray(w, dtype=np.float32)).max(axis=(-2, -1))

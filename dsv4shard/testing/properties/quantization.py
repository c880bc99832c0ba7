"""Properties of MLX's quantization formats, against ``reference.quantization``.

Each property takes a drawn ``QuantCase`` and ``dequantize``, the NumPy
dequantizer under check (``reference.dequantize`` unless a known-bad twin from
``dsv4shard.testing.mutants.quantization`` is passed).  The matrix comes from
``np.random.default_rng(case.seed)``, so a printed case reruns exactly.

Exactness per backend: the reference is MLX's CPU arithmetic, and the
dequantizer under check is compared bit for bit with ``mx.dequantize`` on
``mx.cpu`` (present in every MLX build), so every known-bad dequantizer is
caught on every backend.  On another device (a GPU) the device's own
``mx.dequantize`` / ``mx.quantize`` is compared with the reference in the
arithmetic that device uses (a fused multiply-add, on MLX's CUDA build),
found once per process by :func:`backend_arithmetic`: bit for bit where one
of the reference's arithmetics matches, else within the ulps measured
there, stated in the failure.  A device departing beyond that raises
:class:`~dsv4shard.engine.outcome.BackendDefect`: it is MLX's, not the
dequantizer's.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

import reference.quantization as q
from dsv4shard.engine.outcome import BackendDefect
from dsv4shard.testing.strategies import QuantCase

MX_DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


# ---------------------------------------------------------------------------
# The drawn matrix, and MLX's side
# ---------------------------------------------------------------------------


def make_matrix(case: QuantCase) -> np.ndarray:
    """The case's float32 matrix: normal values times ``case.scale``."""
    rng = np.random.default_rng(case.seed)
    return (rng.standard_normal(case.shape) * case.scale).astype(np.float32)


def matrices(x: np.ndarray) -> np.ndarray:
    """[..., O, X] -> [M, O, X]: MLX takes one global scale per call, so
    global-scale formats go through MLX one matrix at a time."""
    return x.reshape(-1, *x.shape[-2:])


def to_numpy(a: mx.array) -> np.ndarray:
    """Any MLX float array as float64 (via float32, exact for all three dtypes)."""
    return np.array(a.astype(mx.float32, stream=mx.cpu)).astype(np.float64)


def mlx_quantize(fmt: q.QuantFormat, w: np.ndarray, stream=mx.cpu) -> q.Quantized:
    """``mx.quantize`` of float32 ``w`` on ``stream`` (default ``mx.cpu``, the
    arithmetic the reference is; None: the default device), as NumPy (affine
    scales and biases float32, the float formats' scales uint8 codes).
    Global-scale formats go one matrix at a time, each with its max |w| as
    global scale."""
    if not fmt.global_scale:
        weight, scales, biases = mlx_quantize_rows(fmt, w.reshape(-1, w.shape[-1]),
                                                   stream=stream)
        return q.Quantized(weight.reshape(*w.shape[:-1], -1), scales.reshape(*w.shape[:-1], -1),
                           None if biases is None else biases.reshape(*w.shape[:-1], -1), None)
    global_scale = q.nvfp4_global_scale(matrices(w))
    parts = [mlx_quantize_rows(fmt, m, g, stream)
             for m, g in zip(matrices(w), global_scale, strict=True)]
    weight = np.stack([p[0] for p in parts]).reshape(*w.shape[:-1], -1)
    scales = np.stack([p[1] for p in parts]).reshape(*w.shape[:-1], -1)
    return q.Quantized(weight, scales, None, global_scale.reshape(w.shape[:-2]))


def mlx_quantize_rows(fmt: q.QuantFormat, rows: np.ndarray, global_scale=None, stream=mx.cpu):
    """``mx.quantize`` of a 2-D float32 matrix: weight, scales, biases or None.

    MLX 0.32.4's CPU fp4 quantize packs codes 32 at a time across rows and
    raises unless the matrix has a multiple of 32 elements (nvfp4 with an odd
    number of groups in all); rows are quantized independently, so we pad
    with zero rows and drop them again.
    """
    pad = 0
    while (len(rows) + pad) * rows.shape[-1] % 32:
        pad += 1
    padded = np.concatenate([rows, np.zeros((pad, rows.shape[-1]), np.float32)])
    if global_scale is not None:
        global_scale = mx.array(global_scale)
    out = mx.quantize(mx.array(padded), fmt.group_size, fmt.bits, fmt.mode,
                      global_scale=global_scale, stream=stream)
    weight, scales, *biases = (np.array(a)[: len(rows)] for a in out)
    return weight, scales, biases[0] if biases else None


def stored_in(quantized: q.Quantized, dtype: str) -> q.Quantized:
    """Affine scales and biases cast by MLX to ``dtype``, as a model stored in
    that dtype holds them, returned as float64 values."""
    if quantized.biases is None:
        return quantized
    scales, biases = (to_numpy(mx.array(a).astype(MX_DTYPES[dtype], stream=mx.cpu))
                      for a in (quantized.scales, quantized.biases))
    return quantized._replace(scales=scales, biases=biases)


def mlx_dequantize(quantized: q.Quantized, case: QuantCase, dtype: str | None,
                   stream=mx.cpu) -> np.ndarray:
    """``mx.dequantize`` of NumPy ``quantized`` as float64, on ``stream``
    (default ``mx.cpu``, the arithmetic the reference is; None: the default
    device); ``dtype`` None is MLX's default (the scales' dtype, for
    affine).  Affine scales and biases go to MLX in ``case.scales_dtype``."""
    fmt = case.fmt
    weight, scales, biases, global_scale = quantized
    out = None if dtype is None else MX_DTYPES[dtype]
    stored = MX_DTYPES[case.scales_dtype] if fmt.mode == "affine" else mx.uint8
    if global_scale is None:
        matrix = mlx_dequantize_rows(fmt, weight.reshape(-1, weight.shape[-1]),
                                     scales.reshape(-1, scales.shape[-1]),
                                     None if biases is None else biases.reshape(-1, biases.shape[-1]),
                                     None, stored, out, stream)
        return matrix.reshape(*weight.shape[:-1], -1)
    parts = [mlx_dequantize_rows(fmt, w, s, None, g, stored, out, stream)
             for w, s, g in zip(matrices(weight), matrices(scales), np.ravel(global_scale),
                                 strict=True)]
    return np.stack(parts).reshape(*weight.shape[:-1], -1)


def mlx_dequantize_rows(fmt, weight, scales, biases, global_scale, stored, out,
                        stream=mx.cpu) -> np.ndarray:
    """``mx.dequantize`` of 2-D NumPy arrays, as float64.  Like its quantize,
    MLX 0.32.4's CPU fp4 dequantize needs a multiple of 32 elements: we pad
    zero rows and drop them again."""
    pad = 0
    while (len(weight) + pad) * scales.shape[-1] * fmt.group_size % 32:
        pad += 1

    def padded(a, dtype):
        a = np.concatenate([a, np.zeros((pad, a.shape[-1]), a.dtype)])
        return mx.array(a).astype(dtype, stream=mx.cpu)

    got = mx.dequantize(
        padded(weight, mx.uint32), padded(scales, stored),
        None if biases is None else padded(biases, stored), fmt.group_size, fmt.bits, fmt.mode,
        global_scale=None if global_scale is None else mx.array(np.float32(global_scale)),
        dtype=out, stream=stream,
    )
    return to_numpy(got)[: len(weight)]


# ---------------------------------------------------------------------------
# Failure messages
# ---------------------------------------------------------------------------


def reproducer(prop, case: QuantCase, dequantize) -> str:
    """A shell line rerunning ``prop`` on ``case`` with this ``dequantize``."""
    imports = ("from dsv4shard.testing.properties.quantization import *; "
               "from dsv4shard.testing.strategies import *; "
               "from reference.quantization import QuantFormat")
    call = f"{prop.__name__}({case!r})"
    if dequantize is not q.dequantize:
        module = dequantize.__module__
        imports += f"; import {module}"
        call = f"{prop.__name__}({case!r}, dequantize={module}.{dequantize.__qualname__})"
    return f'python -c "{imports}; {call}"'


def fail(prop, case: QuantCase, dequantize, message: str):
    """Raise an AssertionError: the property and the problem on its first line,
    then the case and a one-line reproducer (through the attribution hook of
    ``dsv4shard.testing.report``, like every failure of the suite)."""
    from dsv4shard.testing.report import judged

    raise judged(prop, case, AssertionError(
        f"{prop.__name__}: {message}\n  case: {case!r}\n"
        f"  reproduce: {reproducer(prop, case, dequantize)}"
    ), dequantize=dequantize)


def same_bits(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    """Elementwise: the same float (NaN matches NaN; +0 does not match -0)."""
    equal = (got == want) & (np.signbit(got) == np.signbit(want))
    return equal | (np.isnan(got) & np.isnan(want))


def same_e4m3_codes(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    """Elementwise: the same e4m3 code, where any NaN code (0x7F, 0xFF)
    matches any other: MLX's CUDA ``to_fp8`` encodes NaN with the other sign
    bit than its CPU."""
    got, want = np.asarray(got, np.uint8), np.asarray(want, np.uint8)
    return (got == want) | (((got & 0x7F) == 0x7F) & ((want & 0x7F) == 0x7F))


def worst(mask_bad: np.ndarray, distance: np.ndarray) -> tuple[int, ...]:
    """Index of the worst bad element: the largest distance, NaN counting as inf."""
    distance = np.where(np.isnan(distance), np.inf, distance)
    flat = np.argmax(np.where(mask_bad, distance, -1.0))
    return tuple(int(i) for i in np.unravel_index(flat, mask_bad.shape))


def describe(index, quantized: q.Quantized, fmt: q.QuantFormat) -> str:
    """The stored code, scale (and bias) behind element ``index``."""
    *lead, column = index
    group = (*lead, column // fmt.group_size)
    code = q.unpack(quantized.weight, fmt.bits)[index]
    text = f"code {code}, scale {quantized.scales[group].item()!r}"
    if quantized.biases is not None:
        text += f", bias {quantized.biases[group].item()!r}"
    return text + f" (group {group})"


# ---------------------------------------------------------------------------
# Properties
# ---------------------------------------------------------------------------


def dequantize_matches_mlx(case: QuantCase, dequantize=q.dequantize) -> None:
    """MLX quantizes the case's matrix; ``dequantize`` of MLX's weight, scales
    and biases equals ``mx.dequantize`` on ``mx.cpu`` bit for bit: for affine
    in MLX's default output dtype (the scales' dtype), for the float formats
    in each of float32, float16 and bfloat16 (nvfp4's global scale included).
    On another device, that device's ``mx.dequantize`` equals the reference
    in the device's arithmetic (:func:`device_dequantize_matches`)."""
    fmt = case.fmt
    quantized = stored_in(mlx_quantize(fmt, make_matrix(case)), case.scales_dtype)
    dtypes = [None] if fmt.mode == "affine" else list(MX_DTYPES)
    for dtype in dtypes:
        want = mlx_dequantize(quantized, case, dtype)
        got = dequantize(*quantized[:3], fmt, global_scale=quantized.global_scale,
                         dtype=dtype or case.scales_dtype)
        if got.shape != want.shape:
            fail(dequantize_matches_mlx, case, dequantize,
                 f"shape {got.shape}, mx.dequantize's {want.shape}")
        bad = ~same_bits(np.asarray(got, np.float64), want)
        if bad.any():
            i = worst(bad, np.abs(got - want))
            fail(dequantize_matches_mlx, case, dequantize,
                 f"{bad.sum()} of {bad.size} elements differ from mx.dequantize "
                 f"(dtype={dtype or case.scales_dtype}); worst at {i}: got {got[i].item()!r}, "
                 f"MLX {want[i].item()!r}; {describe(i, quantized, fmt)}")
    if _on_device():
        device_dequantize_matches(quantized, case)


# ---------------------------------------------------------------------------
# The running device's own arithmetic
# ---------------------------------------------------------------------------


def _on_device() -> bool:
    """A device other than mx.cpu runs (a GPU, or the attribution's simulated one)."""
    from dsv4shard.attribution import device_under_test

    return device_under_test() is not None


@dataclass(frozen=True)
class Arithmetic:
    """How the device's mx.dequantize of one format family and dtype
    matches the reference: with or without a fused multiply-add, bit for
    bit (``ulps`` 0) or within ``ulps`` at most."""

    fma: bool
    ulps: float

    def describe(self) -> str:
        how = "a fused multiply-add" if self.fma else "a multiply, then an add"
        if not self.ulps:
            return f"the reference with {how} matches this device bit for bit"
        return (f"no arithmetic of the reference matches this device bit for bit; with {how} "
                f"it is within {self.ulps:g} ulps on the session's probe")


def family(fmt: q.QuantFormat, dtype: str) -> tuple[str, str]:
    """The key of :func:`backend_arithmetic`: affine by the scales' dtype
    (MLX computes in it), the float formats by the output dtype."""
    return (fmt.name if fmt.mode != "affine" else "affine", dtype)


PROBE_FORMATS = (q.QuantFormat("affine", 32, 4), q.QuantFormat("affine", 64, 8),
                 q.QuantFormat("affine", 128, 3), q.QuantFormat("mxfp4", 32, 4),
                 q.QuantFormat("mxfp8", 32, 8), q.QuantFormat("nvfp4", 16, 4),
                 q.QuantFormat("nvfp4", 16, 4, global_scale=True))


@functools.lru_cache(maxsize=None)
def backend_arithmetic(device: str) -> dict[tuple[str, str], Arithmetic]:
    """Measured once per process and device: for each format family and
    dtype, which arithmetic of the reference (multiply then add, or fused
    multiply-add) the device's ``mx.dequantize`` matches, bit for bit or in
    the fewest ulps (the most any probe showed), on fixed probe matrices."""
    seen: dict[tuple[str, str], dict[bool, float]] = {}
    for fmt in PROBE_FORMATS:
        for dtype in MX_DTYPES:
            scales_dtype = dtype if fmt.mode == "affine" else "float32"
            outs = list(MX_DTYPES) if fmt.mode == "affine" else [dtype]
            worst_of = seen.setdefault(family(fmt, dtype), {})
            for seed, scale in ((1, 1.0), (2, 37.0), (3, 1e-3)):
                case = QuantCase(fmt, (3, 8, 4 * fmt.group_size), scale, scales_dtype, seed)
                quantized = stored_in(mlx_quantize(fmt, make_matrix(case)), scales_dtype)
                for out in outs:
                    got = mlx_dequantize(quantized, case, out, stream=None)
                    for fma in ((False, True) if fmt.mode == "affine" else (False,)):
                        want = q.dequantize(*quantized[:3], fmt,
                                            global_scale=quantized.global_scale, dtype=out,
                                            scales_dtype=scales_dtype, fma=fma)
                        distance = float(np.max(_ulps(got, want, result_dtype(fmt, out))))
                        worst_of[fma] = max(worst_of.get(fma, 0.0), distance)
    found = {}
    for key, worst_of in seen.items():
        distance, fma = min((d, f) for f, d in worst_of.items())
        found[key] = Arithmetic(fma, distance)
    return found


def result_dtype(fmt: q.QuantFormat, dtype: str) -> str:
    """The dtype mx.dequantize returns: a global scale promotes to float32."""
    return "float32" if fmt.global_scale else dtype


def _ulps(got, want, dtype) -> np.ndarray:
    from dsv4shard.attribution import ulps

    return ulps(got, want, dtype)


def device_dequantize_matches(quantized: q.Quantized, case: QuantCase) -> None:
    """The device's ``mx.dequantize`` (every output dtype) equals the
    reference in the arithmetic :func:`backend_arithmetic` found for this
    device, within the ulps it measured (0 where one matches bit for bit).
    A departure is MLX's: :class:`BackendDefect`."""
    from dsv4shard.attribution import OpCase, device_under_test, replay_line

    device = device_under_test()
    fmt = case.fmt
    arithmetic = backend_arithmetic(device)
    for dtype in MX_DTYPES:
        key = family(fmt, case.scales_dtype if fmt.mode == "affine" else dtype)
        how = arithmetic.get(key, Arithmetic(False, 0.0))
        got = mlx_dequantize(quantized, case, dtype, stream=None)
        want = q.dequantize(*quantized[:3], fmt, global_scale=quantized.global_scale,
                            dtype=dtype, scales_dtype=case.scales_dtype, fma=how.fma)
        distance = _ulps(got, want, result_dtype(fmt, dtype))
        bad = distance > how.ulps
        if bad.any():
            i = worst(bad, distance)
            op = OpCase("dequantize", dtype if fmt.mode != "affine" else case.scales_dtype, (),
                        case.shape, fmt.mode, fmt.bits, fmt.group_size, fmt.global_scale)
            raise BackendDefect(
                f"dequantize_matches_mlx: backend defect, not the dequantizer's: MLX's "
                f"dequantize on {device} ({fmt.name}, scales {case.scales_dtype}, output "
                f"{dtype}) departs from the reference: {bad.sum()} of {bad.size} elements more "
                f"than {how.ulps:g} ulps off, worst {distance[i]:g} ulps at {i}: device "
                f"{got[i].item()!r}, reference {want[i].item()!r} ({how.describe()})\n"
                f"  case: {case!r}\n  op alone: {replay_line(op)}")


def quantize_round_trip(case: QuantCase, dequantize=q.dequantize) -> None:
    """``reference.quantize`` then ``dequantize`` (float32) lands every element
    within half a step of w: on the representable value nearest to it, given
    its group's scale (and bias).  Elements past the ends of the group's grid
    are clipped to the end; how far past they may lie is the format's
    scale-choice rule, checked by :func:`grid_overshoot_bound`."""
    fmt = case.fmt
    w = make_matrix(case).astype(np.float64)
    quantized = q.quantize(w, fmt)
    got = dequantize(*quantized[:3], fmt, global_scale=quantized.global_scale)
    problem = round_trip_problem(w, quantized, got, fmt)
    if problem:
        fail(quantize_round_trip, case, dequantize, problem)


def round_trip_problem(w: np.ndarray, quantized: q.Quantized, got: np.ndarray,
                       fmt: q.QuantFormat) -> str | None:
    """What is wrong with ``got`` (``quantized`` of ``w``, dequantized), or
    None: an element off its nearest grid value, or a group's grid missing
    its values by more than the format allows."""
    grid = grid_values(quantized, fmt)  # [..., O, groups, n_values]
    grid_w = q.grouped(w, fmt.group_size)
    nearest = np.abs(grid_w[..., None] - grid[..., None, :]).min(axis=-1)
    # float32 arithmetic: a few ulps of the group's magnitude.
    slack = 2.0**-20 * np.abs(grid).max(axis=-1, keepdims=True) + 1e-30
    error = np.abs(q.grouped(got, fmt.group_size) - grid_w)
    bad = error > nearest + slack
    if bad.any():
        i = worst(bad, error - nearest)
        i_flat = (*i[:-2], i[-2] * fmt.group_size + i[-1])
        return (f"{bad.sum()} of {bad.size} elements not on their nearest grid value; worst "
                f"at {i_flat}: w {w[i_flat].item()!r} came back {got[i_flat].item()!r}, nearest "
                f"is {nearest[i].item()!r} away; {describe(i_flat, quantized, fmt)}")
    lo, hi = grid.min(axis=-1), grid.max(axis=-1)
    overshoot = np.maximum(grid_w.max(axis=-1) - hi, lo - grid_w.min(axis=-1))
    allowed = grid_overshoot_bound(quantized, fmt, w) + slack[..., 0]
    bad = overshoot > allowed
    if bad.any():
        i = worst(bad, overshoot - allowed)
        return (f"group {i}: its grid [{lo[i].item()!r}, {hi[i].item()!r}] misses its values by "
                f"{overshoot[i].item()!r}, more than the {allowed[i].item()!r} that {fmt.mode} "
                f"allows")
    return None


def grid_values(quantized: q.Quantized, fmt: q.QuantFormat) -> np.ndarray:
    """Every value each group can represent, float64 [..., O, groups, n_codes]."""
    codes = np.arange(2**fmt.bits)
    if fmt.mode == "affine":
        return quantized.biases[..., None] + quantized.scales[..., None] * codes
    decode = q.e2m1_to_float if fmt.bits == 4 else q.e4m3_to_float
    elements = decode(codes)
    elements = elements[~np.isnan(elements)]
    return effective_scale(quantized, fmt)[..., None] * elements


def effective_scale(quantized: q.Quantized, fmt: q.QuantFormat) -> np.ndarray:
    """The float formats' real group scale, float64 [..., O, groups]."""
    scale = q.group_scale(quantized.scales, fmt)
    if quantized.global_scale is not None:
        global_scale = np.asarray(quantized.global_scale, np.float64)
        scale = scale * q.per_matrix(global_scale, scale.ndim) / (q.E4M3_MAX * q.E2M1_MAX)
    return scale


def grid_overshoot_bound(quantized: q.Quantized, fmt: q.QuantFormat, w) -> np.ndarray:
    """How far a group's values may lie past its grid, per group:

    * affine: one step |scale|.  MLX stretches the scale so a code lands on
      0.0, which can leave the far endpoint up to a step past the last code.
    * mxfp4 / mxfp8: nothing; the power-of-two scale is rounded up.
    * nvfp4: the e4m3 scale is the nearest to max |w| / 6 (in units of
      global_scale / (448 * 6)), so max |w| lies at most 6 half e4m3 steps
      past the grid's end (all of it, if the scale rounds to 0).
    """
    if fmt.mode == "affine":
        return np.abs(quantized.scales)
    scale = effective_scale(quantized, fmt)
    if fmt.mode != "nvfp4":
        return np.zeros_like(scale)
    unit = np.ones_like(scale)
    if quantized.global_scale is not None:
        unit = unit * q.per_matrix(quantized.global_scale, scale.ndim) / (q.E4M3_MAX * q.E2M1_MAX)
    group_max = np.abs(q.grouped(w, fmt.group_size)).max(axis=-1)
    return q.E2M1_MAX * e4m3_half_step(group_max / q.E2M1_MAX / unit) * unit


def e4m3_half_step(x: np.ndarray) -> np.ndarray:
    """Half the gap between the e4m3 values around magnitude ``x``; past 448
    (saturated) the whole distance to 448."""
    _, exponent = np.frexp(np.maximum(x, 2.0**-6))
    gap = np.exp2(exponent - 1 - 3.0)  # normals: eighths of 2**floor(log2 x)
    return np.where(x > q.E4M3_MAX, x - q.E4M3_MAX, gap / 2)


def quantize_matches_mlx(case: QuantCase, dequantize=q.dequantize) -> None:
    """``reference.quantize`` gives ``mx.quantize``'s weight, scales and biases
    on ``mx.cpu`` bit for bit (float32 scales and biases; MLX 0.32.4).  On
    another device, that device's ``mx.quantize`` quantizes as well as the
    reference does (:func:`device_quantize_matches`): its kernels may break
    ties another way.  ``dequantize`` is unused: the signature is the suite's."""
    fmt = case.fmt
    w = make_matrix(case)
    got = q.quantize(w, fmt)
    want = mlx_quantize(fmt, w)
    for name in ("weight", "scales", "biases", "global_scale"):
        a, b = getattr(got, name), getattr(want, name)
        if a is None and b is None:
            continue
        if a is None or b is None or np.shape(a) != np.shape(b):
            fail(quantize_matches_mlx, case, dequantize,
                 f"{name}: shape {np.shape(a)}, mx.quantize's {np.shape(b)}")
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        bad = ~same_bits(a, b)
        if bad.any():
            i = worst(bad, np.abs(a - b))
            fail(quantize_matches_mlx, case, dequantize,
                 f"{name}: {bad.sum()} of {bad.size} differ from mx.quantize's; worst at "
                 f"{i}: {a[i].item()!r}, MLX {b[i].item()!r}")
    if _on_device():
        device_quantize_matches(w, got, case)


def device_quantize_matches(w: np.ndarray, reference: q.Quantized, case: QuantCase) -> None:
    """The device's ``mx.quantize`` of ``w`` (``reference``: the reference's
    quantization of it), read back by the reference's
    dequantizer, lands every element on its nearest grid value (within the
    slack of float32 arithmetic) and each group's grid where the format's
    scale rule puts it: the round trip's criteria.  Words that differ from
    the reference's (ties broken the other way) are counted in a failure's
    message, never failed on.  A departure is MLX's: :class:`BackendDefect`."""
    from dsv4shard.attribution import OpCase, device_under_test, replay_line

    device = device_under_test()
    fmt = case.fmt
    got = mlx_quantize(fmt, w, stream=None)
    back = q.dequantize(*got[:3], fmt, global_scale=got.global_scale)
    problem = round_trip_problem(w.astype(np.float64), got, back, fmt)
    if problem:
        differ = int(np.count_nonzero(got.weight != reference.weight))
        op = OpCase("quantize", "float32", (), case.shape, fmt.mode, fmt.bits, fmt.group_size,
                    fmt.global_scale)
        raise BackendDefect(
            f"quantize_matches_mlx: backend defect, not the quantizer's: MLX's quantize on "
            f"{device} ({fmt.name}) quantizes worse than the reference: {problem} "
            f"({differ} of {got.weight.size} words differ from the reference's)\n"
            f"  case: {case!r}\n  op alone: {replay_line(op)}")


def pack_unpack_inverse(case: QuantCase, dequantize=q.dequantize) -> None:
    """``unpack(pack(codes)) == codes`` for random codes of the case's shape,
    ``pack(unpack(words)) == words`` for random words, and MLX reads packed
    codes back as themselves (affine, scale 1, bias 0).
    ``dequantize`` is unused: the signature is the suite's."""
    bits = case.fmt.bits
    rng = np.random.default_rng(case.seed)
    codes = rng.integers(0, 2**bits, size=case.shape, dtype=np.uint32)
    words = q.pack(codes, bits)
    if words.shape != (*case.shape[:-1], case.shape[-1] * bits // 32):
        fail(pack_unpack_inverse, case, dequantize, f"pack gave shape {words.shape}")
    back = q.unpack(words, bits, case.shape[-1])
    if not np.array_equal(back, codes):
        i = tuple(np.argwhere(back != codes)[0])
        fail(pack_unpack_inverse, case, dequantize,
             f"unpack(pack(codes)) at {i}: {back[i]} for code {codes[i]}")
    random_words = rng.integers(0, 2**32, size=words.shape, dtype=np.uint64).astype(np.uint32)
    again = q.pack(q.unpack(random_words, bits), bits)
    if not np.array_equal(again, random_words):
        i = tuple(np.argwhere(again != random_words)[0])
        fail(pack_unpack_inverse, case, dequantize,
             f"pack(unpack(words)) at {i}: {again[i]:#010x} for word {random_words[i]:#010x}")
    group = q.AFFINE_GROUPS[0]
    if case.shape[-1] % group == 0:
        ones = mx.ones((*case.shape[:-1], case.shape[-1] // group))
        read = np.array(mx.dequantize(mx.array(words), ones, mx.zeros_like(ones), group, bits))
        if not np.array_equal(read, codes):
            i = tuple(np.argwhere(read != codes)[0])
            fail(pack_unpack_inverse, case, dequantize,
                 f"MLX reads code {read[i]} at {i} where {codes[i]} was packed")

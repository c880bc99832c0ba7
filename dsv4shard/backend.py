"""What the running MLX backend can compute, and why not when it cannot.

Every known defect or limitation of an MLX kernel is one record of
:data:`DEFECTS`: whose kernel (``cpu``: MLX's CPU code, also reachable as
``mx.cpu`` inside a GPU build; ``cuda``), the operations, what goes wrong,
the experts' formats and dtypes the drawn cases leave out because of it
(or that the properties guard against by construction), which cases of
``dsv4shard doctor``'s map it explains, and the probe that shows it.
``tests/test_backend_defects.py`` runs every probe as a strict xfail, so a
fixed MLX turns it red and the record can go.  ``dsv4shard doctor`` says
which records to add.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable

import mlx.core as mx

from reference.quantization import QuantFormat


def name() -> str:
    if mx.default_device() == mx.cpu:
        return "cpu"
    if mx.metal.is_available():
        return "metal"
    return "cuda"


# Backends whose float32 matmuls round their operands to TF32 (10-bit
# mantissas): MLX's CUDA build multiplies float32 matrices on tensor cores.
TF32_BACKENDS = ("cuda",)


# Backends that compile a kernel the first time a process meets its
# template: MLX's CUDA build compiles each quantized or gathered matmul
# (dtype x row tile x bits x group x mode x path) with NVRTC, about 30 s
# apiece on an H200 (benchmarks/results/gpu-h200.md, run 15: the first
# evaluations of a cold run took 578.6 s in all, their repeats 13.8 s).
# Metal's kernels come built with MLX; the CPU build compiles nothing.
COMPILING_BACKENDS = ("cuda",)


def compiles_kernels(where: str | None = None) -> bool:
    """Whether ``where`` (default: the running backend) compiles each kernel
    on first use, at a cost that the set of drawn cases must bound
    (``strategies.KERNEL_SET``)."""
    return (where or name()) in COMPILING_BACKENDS


def tf32_matmuls(where: str | None = None) -> bool:
    """Whether float32 matmuls on ``where`` (default: the running backend)
    round their operands to TF32."""
    return (where or name()) in TF32_BACKENDS


def model_device() -> str:
    """Where the whole-model comparisons (a tiny Model sharded against
    unsharded) run: on the default device, unless its float32 matmuls round
    their operands to TF32 (MLX's CUDA build), whose 2^-11 leaves every seed
    of a tiny Model within reach of a discrete decision's flip (an expert's
    top-k, a ceil, an fp8 code): there on ``mx.cpu``, in exact float32.  The
    sharding logic they check does not depend on the device; the MoE block's
    kernels are checked on the default device by the block properties."""
    return "cpu" if tf32_matmuls() else "default"


def model_device_note(device: str) -> str:
    """What a whole-model check's detail says of where it ran ("" on the
    default device)."""
    return "; run on mx.cpu: this device's float32 matmuls round to TF32" \
        if device == "cpu" else ""


@contextmanager
def on_model_device(device: str | None = None):
    """Run the block under :func:`model_device` (or ``device``, as a rank
    job names it): ``mx.cpu`` made the default device meanwhile."""
    device = device or model_device()
    if device != "cpu" or mx.default_device() == mx.cpu:
        yield
        return
    before = mx.default_device()
    mx.set_default_device(mx.cpu)
    try:
        yield
    finally:
        mx.set_default_device(before)


FLOAT_FORMATS = ("mxfp4", "nvfp4", "mxfp8")


@dataclass(frozen=True)
class Defect:
    """One defect (or limitation) of one backend's kernels."""

    key: str
    backend: str  # whose kernels: "cpu" or "cuda"
    ops: tuple[str, ...]  # the MLX operations
    kind: str  # unsupported (raises), wrong, overflow (inf), nan, launch, hang
    reason: str  # one sentence; ``{dtype}`` is filled in
    # The experts' formats and dtypes it touches: drawn cases leave them out
    # (``unsupported``), or, with ``guard``, the properties keep clear of it
    # by construction (``float16_code_overflow``).  None: neither.
    experts: Callable[[QuantFormat | None, str], bool] | None
    # The cases of the doctor's map (``dsv4shard.attribution.OpCase``) it explains.
    case: Callable[[Any], bool]
    # OpCase fields of the probe: the cases that show it today.
    probe: tuple[dict, ...]
    guard: bool = False
    # The contraction lengths K (hidden or intermediate size) it touches in a
    # format: drawn cases leave those sizes out (``cuts_contraction``), the
    # format itself stays.  None: no such restriction.
    contractions: Callable[[QuantFormat | None, int], bool] | None = None
    # The experts (format) whose sorted path it touches: drawn cases keep
    # n_tokens * top_k below mlx-lm's sort threshold there (``cuts_sorting``),
    # so those experts are judged on the unsorted path.  None: no such cut.
    sorting: Callable[[QuantFormat | None], bool] | None = None

    def because(self, dtype: str = "") -> str:
        return self.reason.format(dtype=dtype)



def _is(case, op=None, mode=None, dtype=None, **fields) -> bool:
    if op is not None and case.op not in ((op,) if isinstance(op, str) else op):
        return False
    if mode is not None and case.mode not in ((mode,) if isinstance(mode, str) else mode):
        return False
    if dtype is not None and case.dtype not in ((dtype,) if isinstance(dtype, str) else dtype):
        return False
    return all(getattr(case, k) == v for k, v in fields.items())


def _gather(op, dtype, fmt=None, tokens=3, n=64, k=64, sort=False, x_scale=1.0,
            x_axis_view=False):
    """A probe: a gather op as SwitchGLU calls it (4 experts, k = 2)."""
    x_shape, indices = ((tokens * 2, 1, k), (tokens * 2,)) if sort else \
        ((tokens, 1, 1, k), (tokens, 2))
    fields = dict(op=op, dtype=dtype, x_shape=x_shape, indices_shape=indices,
                  sorted_indices=sort, x_scale=x_scale,
                  w_shape=(4, k, n) if op == "gather_mm" else (4, n, k),
                  x_axis_view=x_axis_view)
    if fmt is not None:
        fields.update(mode=fmt.mode, bits=fmt.bits, group_size=fmt.group_size,
                      global_scale=fmt.global_scale)
    return fields


def _qmm(dtype, fmt, tokens, n=64, k=64):
    return dict(op="quantized_matmul", dtype=dtype, x_shape=(tokens, k), w_shape=(n, k),
                mode=fmt.mode, bits=fmt.bits, group_size=fmt.group_size)


MXFP4 = QuantFormat("mxfp4", 32, 4)
MXFP8 = QuantFormat("mxfp8", 32, 8)
NVFP4 = QuantFormat("nvfp4", 16, 4)
NVFP4_GS = QuantFormat("nvfp4", 16, 4, global_scale=True)
AFFINE_8_G64 = QuantFormat("affine", 64, 8)
AFFINE_4_G64 = QuantFormat("affine", 64, 4)
AFFINE_4_G128 = QuantFormat("affine", 128, 4)

DEFECTS: tuple[Defect, ...] = (
    Defect(
        "cpu-gather-mm-float32-only", "cpu", ("gather_mm",), "unsupported",
        "MLX's CPU gather_mm runs only in float32, not {dtype}",
        experts=lambda quant, dtype: quant is None and dtype != "float32",
        case=lambda c: _is(c, "gather_mm") and c.dtype != "float32",
        probe=(_gather("gather_mm", "float16"), _gather("gather_mm", "bfloat16"))),
    Defect(
        "cpu-gather-qmm-global-scale", "cpu", ("gather_qmm",), "unsupported",
        "MLX's CPU gather_qmm has no nvfp4 global scale (GPU only)",
        experts=lambda quant, dtype: quant is not None and quant.global_scale,
        case=lambda c: _is(c, "gather_qmm", global_scale=True),
        probe=(_gather("gather_qmm", "float32", NVFP4_GS),)),
    Defect(
        "cpu-mxfp8-float16-inf", "cpu", ("gather_qmm",), "overflow",
        "MLX's CPU gather_qmm overflows to inf for mxfp8 in float16 "
        "(it sums unscaled codes in float16)",
        experts=lambda quant, dtype: (quant is not None and quant.mode == "mxfp8"
                                      and dtype == "float16"),
        case=lambda c: _is(c, "gather_qmm", "mxfp8", "float16"),
        probe=(_gather("gather_qmm", "float16", MXFP8, k=256, x_scale=30.0),)),
    Defect(
        "cpu-float16-code-overflow", "cpu", ("gather_qmm",), "overflow",
        "MLX's CPU gather_qmm sums unscaled float-format codes in float16: "
        "inf once |x| * max|code| * group passes 65504",
        experts=lambda quant, dtype: (dtype == "float16" and quant is not None
                                      and quant.mode in FLOAT_FORMATS),
        case=lambda c: _is(c, "gather_qmm", FLOAT_FORMATS, "float16"),
        probe=(_gather("gather_qmm", "float16", MXFP4, k=256, x_scale=3000.0),
               _gather("gather_qmm", "float16", NVFP4, k=256, x_scale=3000.0)),
        guard=True),
    Defect(
        "cuda-gather-qmm-global-scale-float16-nan", "cuda", ("gather_qmm",), "nan",
        "MLX's CUDA gather_qmm with an nvfp4 global scale returns NaN in float16 "
        "once activations reach ~30, the true output in range (seen on H200)",
        experts=lambda quant, dtype: (quant is not None and quant.global_scale
                                      and dtype == "float16"),
        case=lambda c: _is(c, "gather_qmm", dtype="float16", global_scale=True),
        probe=(_gather("gather_qmm", "float16", NVFP4_GS, x_scale=30.0),
               _gather("gather_qmm", "float16", NVFP4_GS, tokens=40, sort=True,
                       x_scale=30.0))),
    Defect(
        "cuda-affine-group-128", "cuda", ("quantized_matmul", "gather_qmm"), "wrong",
        "MLX's CUDA affine group-128 kernels: QuantizedLinear returns wrong "
        "values and the sorted gather_qmm fails to launch (seen on H200)",
        experts=lambda quant, dtype: (quant is not None and quant.mode == "affine"
                                      and quant.group_size == 128),
        case=lambda c: (_is(c, ("quantized_matmul", "gather_qmm"), "affine")
                        and c.group_size == 128),
        probe=tuple(_qmm("float32", AFFINE_4_G128, t, k=128) for t in (1, 3, 8, 32))
        + (_gather("gather_qmm", "float32", AFFINE_4_G128, tokens=40, k=128, sort=True),)),
    Defect(
        "cuda-quantized-matmul-affine-group-64", "cuda", ("quantized_matmul",), "wrong",
        "MLX's CUDA quantized_matmul (affine, group 64, one group a row: K = 64) returns "
        "wrong rows, NaN or inf for x of 2 to 64 rows, in float32, float16 and bfloat16: 8 "
        "bits, x of 3 rows, a 64x64 weight, float32, gave a relative error of 1.0 against "
        "mx.cpu on the same arrays, 1 row exact; 4 and 8 bits in float16 gave inf and 1.8, "
        "4 bits in bfloat16 wrong values; K = 128 is right; in later runs the 8-bit "
        "float32 case did not return within 40-60 s (seen on H200)",
        experts=None,
        case=lambda c: (_is(c, "quantized_matmul", "affine") and c.group_size == 64
                        and c.x_shape[-1] == 64 and c.tokens > 1),
        # The float16 and bfloat16 probes answer (wrong) at once; the float32
        # one may not return at all, so it comes last: a hang costs the
        # probe's whole timeout.
        probe=(dict(_qmm("float16", AFFINE_4_G64, 3), x_scale=0.3),
               dict(_qmm("float16", AFFINE_8_G64, 64), x_scale=0.36),
               dict(_qmm("float16", AFFINE_4_G64, 64), x_scale=0.41),
               dict(_qmm("bfloat16", AFFINE_4_G64, 3), x_scale=0.34),
               dict(_qmm("bfloat16", AFFINE_4_G64, 3), x_scale=0.57),
               _qmm("float32", AFFINE_8_G64, 3)),
        contractions=lambda quant, k: (quant is not None and quant.mode == "affine"
                                       and quant.group_size == 64 and k == 64)),
    Defect(
        "cuda-gather-mm-sorted", "cuda", ("gather_mm",), "wrong",
        "MLX's CUDA gather_mm with sorted_indices returns wrong rows when x's size-1 "
        "axis is a view (mx.expand_dims, x[:, None, :], a NumPy view): relative error "
        "1.2-1.4 against NumPy in float32 and bfloat16, on every call and every seed "
        "tried, the weight a transposed view (as SwitchLinear passes it) or "
        "contiguous; the same x made contiguous (a reshape) is right to TF32 "
        "rounding, as is unsorted; through the block, dense experts sorted at 66 "
        "rows departed with 1.16 on every run (seen on H200)",
        experts=None,
        # The probes: x exactly as the failing calls built it on the H200.
        case=lambda c: _is(c, "gather_mm") and c.sorted_indices and c.x_axis_view,
        probe=(_gather("gather_mm", "float32", tokens=8, n=72, k=64, sort=True,
                       x_axis_view=True),
               _gather("gather_mm", "bfloat16", tokens=8, n=64, k=64, sort=True,
                       x_axis_view=True),
               _gather("gather_mm", "float16", tokens=8, n=64, k=64, sort=True,
                       x_axis_view=True)),
        sorting=lambda quant: quant is None),
    Defect(
        "cuda-to-fp8-nan", "cuda", ("to_fp8",), "wrong",
        "MLX's CUDA to_fp8 encodes a NaN input as a code that is not NaN, in float32, "
        "float16 and bfloat16; every number, out of range and +-inf included, encodes "
        "as on mx.cpu (the doctor's probe row with NaN departs, the others agree; "
        "seen on H200)",
        experts=None,
        case=lambda c: _is(c, "to_fp8"),
        probe=tuple(dict(op="to_fp8", dtype=d) for d in ("float32", "float16", "bfloat16"))),
)


def rows(backend: str | None = None) -> list[Defect]:
    """The records of ``backend``'s kernels (all of them with None)."""
    return [d for d in DEFECTS if backend is None or d.backend == backend]


def by_key(key: str) -> Defect:
    for d in DEFECTS:
        if d.key == key:
            return d
    raise KeyError(f"no defect record {key!r}; records: {', '.join(d.key for d in DEFECTS)}")


def known(case, backend: str) -> Defect | None:
    """The record that explains a departure of ``backend``'s kernel on a
    doctor case, or None (a row to add)."""
    for d in rows(backend):
        if d.case(case):
            return d
    return None


def _reason(says: Callable[[Defect], bool], dtype: str = "") -> str | None:
    """The reason of the first record of the running backend that ``says``
    so, or None."""
    for d in rows(name()):
        if says(d):
            return d.because(dtype)
    return None


def unsupported(quant: QuantFormat | None, dtype: str) -> str | None:
    """Why this backend cannot run experts in ``quant`` and ``dtype``, or None:
    the reason of the first record of the running backend that leaves them
    out (tests/test_backend_defects.py probes each)."""
    return _reason(lambda d: not d.guard and d.experts is not None and d.experts(quant, dtype),
                   dtype)


def cuts_contraction(quant: QuantFormat | None, k: int) -> str | None:
    """Why this backend cannot multiply experts in ``quant`` over a
    contraction of ``k`` (a hidden or intermediate size), or None: drawn
    cases leave such sizes out, and keep the format."""
    return _reason(lambda d: d.contractions is not None and d.contractions(quant, k))


def cuts_sorting(quant: QuantFormat | None) -> str | None:
    """Why this backend's sorted path is wrong for experts in ``quant`` (None:
    dense), or None: drawn cases stay below mlx-lm's sort threshold there."""
    return _reason(lambda d: d.sorting is not None and d.sorting(quant))


def float16_code_overflow(quant: QuantFormat | None, dtype: str) -> str | None:
    """Why large activations overflow this backend's float16 float-format
    kernels, or None: MLX's CPU gather_qmm sums x times the unscaled
    mxfp4/nvfp4/mxfp8 codes of a group in float16 and returns inf once that
    passes 65504, although the true output is in range.  A clipped SwiGLU
    keeps |h| <= L^2 and stays clear of it; unclipped, large activations do
    not, so the strategies keep them small there."""
    return _reason(lambda d: d.guard and d.experts is not None and d.experts(quant, dtype),
                   dtype)

"""Whose failure is it: the code under test's, or MLX's kernel on this device?

When a property fails on a device other than ``mx.cpu`` (a GPU), the same
case is run again twice in the same process:

1. on ``mx.cpu`` (``mx.set_default_device(mx.cpu)``): the whole-property
   view.  A property that passes there and fails on the device points at the
   backend; one that fails there too is the implementation's.
2. on the device, with a :class:`Recorder` wrapping the MLX operations the
   properties rely on (``quantized_matmul``, ``gather_qmm`` sorted and
   unsorted, ``gather_mm``, ``dequantize``, ``quantize``, ``from_fp8``,
   ``to_fp8``, ``matmul`` and ``@``, ``distributed.all_sum``): every call's
   arrays and result are kept, and each call is then replayed alone with
   ``stream=mx.cpu`` on the very same arrays.  Where the device's result
   departs from the CPU's beyond a tight bound, and from the NumPy reference
   of that operation more than the CPU's does, that operation is named.

Before either, the failing run's own calls are checked the same way: while
a test or an example runs on the device, :func:`flight_recording` keeps its
latest calls unevaluated, as the computation made them, so that a kernel
that answers wrong once (a race) and right on every rerun is still named.

:func:`attribute` turns the failure into a :class:`BackendDefect` when the
property passes on ``mx.cpu`` and the device departs (naming the operation,
its mode, bits, group, dtype, shapes and error, with a reproducer of that
operation alone), and otherwise leaves it the implementation's, with a note
of what the rerun showed (a defect seen besides it is never hidden).  It is
called from the one place a failure is raised (``dsv4shard.testing.report``,
used by the property functions, and the engine's runner for everything
else).  On ``mx.cpu`` it returns at once: nothing is rerun.

An :class:`OpCase` is one operation on seeded arrays: the reproducer of a
named operation, and the unit of ``dsv4shard doctor``'s map.

    python -m dsv4shard.attribution replay 'OpCase(op="quantized_matmul", ...)'
    python -m dsv4shard.attribution replay /tmp/dsv4shard-attribution/<op>-<hash>.npz

:func:`simulated_defect` stands in for a defective kernel on MLX's CPU
build: it makes the CPU play a device whose chosen operation answers wrong,
so that the attribution itself is tested as the mutants test properties.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import math
import os
import shlex
import sys
import tempfile
import types
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import mlx.core as mx
import numpy as np

import reference.quantization as q
from dsv4shard.engine.outcome import BackendDefect
from dsv4shard.testing.tolerance import TF32, UNIT_ROUNDOFF

# ---------------------------------------------------------------------------
# The operations, their parameters as MLX names them
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class OpSpec:
    name: str
    owner: Any  # the module the function lives in
    attr: str
    params: tuple[str, ...]  # positional-or-keyword, in order
    positional: int  # how many leading parameters are positional-only
    keyword_only: tuple[str, ...] = ()


OPS: dict[str, OpSpec] = {s.name: s for s in (
    OpSpec("quantized_matmul", mx, "quantized_matmul",
           ("x", "w", "scales", "biases", "transpose", "group_size", "bits", "mode"), 2),
    OpSpec("gather_qmm", mx, "gather_qmm",
           ("x", "w", "scales", "biases", "lhs_indices", "rhs_indices", "transpose",
            "group_size", "bits", "mode", "global_scale"), 2, ("sorted_indices",)),
    OpSpec("gather_mm", mx, "gather_mm", ("a", "b", "lhs_indices", "rhs_indices"), 2,
           ("sorted_indices",)),
    OpSpec("dequantize", mx, "dequantize",
           ("w", "scales", "biases", "group_size", "bits", "mode", "global_scale", "dtype"), 1),
    OpSpec("quantize", mx, "quantize", ("w", "group_size", "bits", "mode"), 1,
           ("global_scale",)),
    OpSpec("from_fp8", mx, "from_fp8", ("x", "dtype"), 1),
    OpSpec("to_fp8", mx, "to_fp8", ("x",), 1),
    OpSpec("matmul", mx, "matmul", ("a", "b"), 2),
    OpSpec("all_sum", mx.distributed, "all_sum", ("x",), 1, ("group",)),
)}

# MLX's defaults for a mode's group size and bits (None in a call).
MODE_DEFAULTS = {"affine": (64, 4), "mxfp4": (32, 4), "mxfp8": (32, 8), "nvfp4": (16, 4)}
QUANTIZED_OPS = ("quantized_matmul", "gather_qmm", "dequantize", "quantize")
MATMUL_OPS = ("quantized_matmul", "gather_qmm", "gather_mm", "matmul")

DTYPE_NAMES = {mx.float32: "float32", mx.float16: "float16", mx.bfloat16: "bfloat16"}
MX_DTYPES = {v: k for k, v in DTYPE_NAMES.items()}


def bind(op: str, args: tuple, kwargs: dict) -> dict:
    """A call's arguments by parameter name (``stream`` left out)."""
    spec = OPS[op]
    params = dict(zip(spec.params, args))
    params.update({k: v for k, v in kwargs.items() if k != "stream"})
    return params


def call(op: str, params: dict, fn: Callable | None = None, stream=None):
    """Call ``op`` (or ``fn``, the function a recorder wrapped) with
    ``params``; on ``stream`` when given."""
    spec = OPS[op]
    fn = fn or getattr(spec.owner, spec.attr)
    names = spec.params[: spec.positional]
    args = [params[n] for n in names]
    kwargs = {k: v for k, v in params.items() if k not in names}
    if stream is not None:
        kwargs["stream"] = stream
    return fn(*args, **kwargs)


def quant_params(params: dict) -> tuple[str, int, int]:
    mode = params.get("mode") or "affine"
    group, bits = MODE_DEFAULTS.get(mode, (64, 4))
    return mode, params.get("group_size") or group, params.get("bits") or bits


def is_cpu(stream) -> bool:
    if stream is None:
        return False
    device = getattr(stream, "device", stream)
    return device == mx.cpu


# ---------------------------------------------------------------------------
# State: which device is under test, whether we are inside a rerun
# ---------------------------------------------------------------------------

_STATE = types.SimpleNamespace(
    trusted=False,  # inside the rerun on mx.cpu: simulated defects are off
    judging=False,  # inside attribute(): a nested failure is raised as it is
    simulated=[],  # ops with a simulated defect (tests only)
    flight=None,  # the Recorder of the example now running (flight_recording)
    flight_paused=False,  # inside unrecorded(): nothing is kept
)


def device_under_test() -> str | None:
    """The device whose failures are attributed, or None: on ``mx.cpu``
    there is nothing to tell apart (and nothing is rerun)."""
    if _STATE.trusted:
        return None
    if _STATE.simulated:
        return "simulated device"
    if mx.default_device() == mx.cpu:
        return None
    from dsv4shard import backend

    return backend.name()


@contextmanager
def flight_recording():
    """Keep the MLX calls of the example now running, unevaluated, so that a
    failure is judged on the failing run's own arrays, not only on a rerun's:
    a kernel that answers wrong once (a race) and right on replay is still
    named.  Off the device under test (``mx.cpu``) it records nothing.  A
    recording already running is cleared and goes on (one example, one
    record)."""
    if _STATE.flight is not None:
        _STATE.flight.clear()
        yield
        return
    if device_under_test() is None:
        yield
        return
    recorder = Recorder(keep=True, max_elements=1 << 24, lazy=True)
    _STATE.flight = recorder
    try:
        with recorder:
            yield
    finally:
        _STATE.flight = None


@contextmanager
def unrecorded():
    """Nothing made inside is kept by :func:`flight_recording`: for a
    property that counts the references to arrays, or MLX's active memory,
    which a kept array would change."""
    paused = _STATE.flight_paused
    _STATE.flight_paused = True
    try:
        yield
    finally:
        _STATE.flight_paused = paused


def _flown() -> list[Call]:
    """The calls of the failing run (flight_recording), handed over once."""
    if _STATE.flight is None:
        return []
    calls = list(_STATE.flight.calls)
    _STATE.flight.clear()
    return calls


@contextmanager
def on_cpu():
    """Run on ``mx.cpu`` (the trusted device) inside this block."""
    previous, trusted = mx.default_device(), _STATE.trusted
    mx.set_default_device(mx.cpu)
    _STATE.trusted = True
    try:
        yield
    finally:
        mx.set_default_device(previous)
        _STATE.trusted = trusted


@contextmanager
def simulated_defect(op: str, perturb: Callable, when: Callable[[dict], bool] | None = None):
    """Inside this block, MLX's ``op`` answers ``perturb(result, params)``
    (where ``when(params)`` holds; ``params``: the call's arguments by name),
    except on ``mx.cpu``: on a call with
    ``stream=mx.cpu`` and inside the whole-property rerun on the CPU.  The
    running CPU build then plays a device with a defective ``op``, for tests
    of the attribution; nothing else uses it."""
    spec = OPS[op]
    original = getattr(spec.owner, spec.attr)

    def defective(*args, **kwargs):
        out = original(*args, **kwargs)
        if _STATE.trusted or is_cpu(kwargs.get("stream")):
            return out
        params = bind(op, args, kwargs)
        if when is not None and not when(params):
            return out
        return perturb(out, params)

    setattr(spec.owner, spec.attr, defective)
    _STATE.simulated.append(op)
    try:
        yield
    finally:
        _STATE.simulated.remove(op)
        setattr(spec.owner, spec.attr, original)


# ---------------------------------------------------------------------------
# The recorder
# ---------------------------------------------------------------------------


@dataclass
class Call:
    """One recorded call: what was called, on which arrays, what it returned."""

    op: str
    fn: Callable
    params: dict
    out: Any


def signature(op: str, params: dict) -> tuple:
    """What a call was, without its values: op, array shapes and dtypes,
    the other arguments."""
    parts = []
    for name, value in sorted(params.items()):
        if isinstance(value, mx.array):
            parts.append((name, tuple(value.shape), str(value.dtype)))
        elif isinstance(value, (bool, int, float, str, type(None))):
            parts.append((name, value))
        else:
            parts.append((name, type(value).__name__))
    return (op, tuple(parts))


class Recorder:
    """Wraps the operations of :data:`OPS` (and ``mx.array.__matmul__``)
    while active.  Every call made off ``mx.cpu`` adds its signature; with
    ``keep`` (and outside the CPU rerun) also its arrays and evaluated
    result, up to ``max_elements`` in all.  Calls traced inside
    ``mx.compile`` (their arrays cannot be evaluated) are skipped."""

    def __init__(self, keep: bool = True, max_elements: int = 1 << 25, lazy: bool = False):
        self.keep = keep
        self.max_elements = max_elements
        # lazy: keep the arrays as the computation made them, unevaluated, so
        # that recording does not change how it runs (flight_recording).
        self.lazy = lazy
        self.kept = 0
        self.calls: list[Call] = []
        self.signatures: list[tuple] = []
        self._restore: list[tuple] = []

    def clear(self) -> None:
        self.kept = 0
        self.calls.clear()
        self.signatures.clear()

    def note(self, op: str, fn: Callable, args: tuple, kwargs: dict, out) -> None:
        if is_cpu(kwargs.get("stream")) or (self.lazy and (_STATE.judging
                                                             or _STATE.flight_paused)):
            return
        params = bind(op, args, kwargs)
        if not self.lazy:  # a rerun's path, compared with the other device's
            self.signatures.append(signature(op, params))
        if not self.keep or _STATE.trusted:
            return
        if not self.lazy:
            try:
                mx.eval(out)
            except Exception:  # noqa: BLE001 - a traced call (mx.compile): nothing to keep
                return
        size = _elements(out, params)
        if self.lazy:  # the latest calls: the failing example's, when one fails
            while self.calls and self.kept + size > self.max_elements:
                dropped = self.calls.pop(0)
                self.kept -= _elements(dropped.out, dropped.params)
        if self.kept + size > self.max_elements:
            return
        self.kept += size
        self.calls.append(Call(op, fn, params, out))

    def _wrap(self, op: str, fn: Callable, replay: Callable | None = None) -> Callable:
        """``fn`` recording its calls; ``replay`` (default ``fn``) is what a
        replay on mx.cpu calls."""
        def recorded(*args, **kwargs):
            out = fn(*args, **kwargs)
            try:
                self.note(op, replay or fn, args, kwargs, out)
            except Exception:  # noqa: BLE001 - the record never breaks the code it watches
                if not self.lazy:
                    raise
            return out

        recorded.__wrapped__ = fn
        return recorded

    def __enter__(self):
        plain_matmul = mx.matmul
        for spec in OPS.values():
            fn = getattr(spec.owner, spec.attr)
            self._restore.append((spec.owner, spec.attr, fn))
            setattr(spec.owner, spec.attr, self._wrap(spec.name, fn))
        matmul = mx.array.__matmul__
        self._restore.append((mx.array, "__matmul__", matmul))
        recorded = self._wrap("matmul", matmul, replay=plain_matmul)
        mx.array.__matmul__ = lambda a, b: recorded(a, b)
        return self

    def __exit__(self, *exc):
        for owner, attr, fn in reversed(self._restore):
            setattr(owner, attr, fn)
        self._restore.clear()
        return False


def _elements(out, params: dict) -> int:
    """The elements a kept call holds: its result's and its arrays'."""
    return sum(a.size for a in _arrays(out)) + sum(
        v.size for v in params.values() if isinstance(v, mx.array))


def _arrays(out) -> list:
    if isinstance(out, mx.array):
        return [out]
    if isinstance(out, (tuple, list)):
        return [a for o in out for a in _arrays(o)]
    return []


# ---------------------------------------------------------------------------
# Comparing one operation's results: device, mx.cpu, NumPy reference
# ---------------------------------------------------------------------------


def to_numpy(a) -> np.ndarray:
    """A float64 (or integer) NumPy copy of an MLX array; bfloat16 widens exactly."""
    if isinstance(a, np.ndarray):
        return a
    if mx.issubdtype(a.dtype, mx.floating):
        return np.array(a.astype(mx.float32, stream=mx.cpu)).astype(np.float64)
    return np.array(a)


def dtype_name(dtype) -> str:
    return DTYPE_NAMES.get(dtype, str(dtype).removeprefix("mlx.core."))


def unit_roundoff(dtype: str) -> float:
    return UNIT_ROUNDOFF.get(dtype, UNIT_ROUNDOFF["float32"])


def tolerances(op: str, dtype: str, k: int) -> tuple[float, float]:
    """(device against mx.cpu, either against the NumPy reference), relative
    to the row's scale (:func:`reference_of`).  Matmuls: each result rounded
    to ``dtype`` and its weights dequantized in it (4 u), float32 inputs on
    tensor cores in TF32 (each product off by up to 2**-10; twice that
    allowed), accumulation in float32 (8 sqrt(K) ulps);
    against the reference, accumulation in ``dtype`` itself is allowed too
    (4 u sqrt(K)).  Element-wise operations: 2 u."""
    u = unit_roundoff(dtype)
    if op in MATMUL_OPS:
        pair = 4 * u + 4 * TF32 + 8 * math.sqrt(k) * UNIT_ROUNDOFF["float32"]
        return pair, pair + 4 * u * math.sqrt(k)
    if op == "to_fp8":
        return 2.0**-4, 2.0**-4
    if op == "quantize":  # on the error beyond the reference quantizer's own
        return 4 * u + 2.0**-20, 4 * u + 2.0**-20
    return 2 * u, 2 * u


def row_error(got: np.ndarray, want: np.ndarray, scale: np.ndarray) -> tuple[float, int, int]:
    """(worst relative error, its row, rows): per row of the last axis, the
    largest |got - want| over the row's scale; NaN matches NaN and an inf
    the same inf, anything else non-finite on one side only counts as inf."""
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    if got.shape != want.shape:
        return math.inf, 0, 1
    if got.size == 0:
        return 0.0, 0, 0
    width = got.shape[-1] if got.ndim else 1
    g, w = got.reshape(-1, width), want.reshape(-1, width)
    s = np.broadcast_to(np.asarray(scale, np.float64), got.shape).reshape(-1, width)
    with np.errstate(invalid="ignore", over="ignore"):
        same = (g == w) | (np.isnan(g) & np.isnan(w))
        finite = np.isfinite(g) & np.isfinite(w)
        diff = np.where(same, 0.0, np.where(finite, np.abs(g - w), np.inf))
        row_scale = np.where(np.isfinite(s), np.abs(s), 0.0).max(axis=1)
        per_row = diff.max(axis=1) / np.maximum(row_scale, 1e-30)
    worst = int(np.argmax(per_row))
    return float(per_row[worst]), worst, len(per_row)


def _fmt_of(params: dict, global_scale=None) -> q.QuantFormat:
    mode, group, bits = quant_params(params)
    gs = params.get("global_scale") if global_scale is None else global_scale
    return q.QuantFormat(mode, group, bits, gs is not None)


def _dequantized(params: dict, w_key: str, dtype: str | None, fma: bool = False) -> np.ndarray:
    """The NumPy reference's dequantization of a call's packed weight, in
    ``dtype`` (None: MLX's default, the scales' dtype for affine and
    bfloat16 for the float formats)."""
    fmt = _fmt_of(params)
    scales = params["scales"]
    scales_dtype = dtype_name(scales.dtype) if fmt.mode == "affine" else None
    biases = params.get("biases")
    gs = params.get("global_scale")
    return q.dequantize(to_numpy(params[w_key]), to_numpy(scales),
                        None if biases is None else to_numpy(biases), fmt,
                        global_scale=None if gs is None else to_numpy(gs),
                        dtype=dtype or scales_dtype or "bfloat16", scales_dtype=scales_dtype,
                        fma=fma)


def _gathered(x: np.ndarray, w_t: np.ndarray, lhs, rhs) -> np.ndarray:
    """``x[lhs] @ w_t[rhs]^T`` with the batch broadcasting of gather_mm /
    gather_qmm: x [..., M, K], w_t [..., N, K], indices over each's batch."""
    xb = x.reshape(-1, *x.shape[-2:])
    wb = w_t.reshape(-1, *w_t.shape[-2:])
    lhs = np.arange(len(xb)).reshape(x.shape[:-2]) if lhs is None else to_numpy(lhs)
    rhs = np.arange(len(wb)).reshape(w_t.shape[:-2]) if rhs is None else to_numpy(rhs)
    lhs, rhs = np.broadcast_arrays(lhs.astype(np.int64), rhs.astype(np.int64))
    out = np.einsum("bmk,bnk->bmn", xb[lhs.ravel()], wb[rhs.ravel()])
    return out.reshape(*lhs.shape, *out.shape[-2:])


def reference_of(op: str, params: dict, out_dtype: str | None):
    """(value, scale, K): the NumPy float64 reference of one call, the
    per-element scale its error is measured against (|x| @ |W| for a
    matmul, |value| otherwise) and the dot length; None where there is no
    reference (all_sum across ranks)."""
    if op == "dequantize":
        asked = params.get("dtype")
        value = _dequantized(params, "w", None if asked is None else dtype_name(asked))
        return value, np.abs(value), 1
    if op in ("quantized_matmul", "gather_qmm"):
        x = params["x"]
        w = _dequantized(params, "w", dtype_name(x.dtype))
        if not params.get("transpose", True):
            w = np.swapaxes(w, -1, -2)
        xv = to_numpy(x)
        if op == "quantized_matmul":
            return xv @ np.swapaxes(w, -1, -2), np.abs(xv) @ np.abs(np.swapaxes(w, -1, -2)), \
                xv.shape[-1]
        lhs, rhs = params.get("lhs_indices"), params.get("rhs_indices")
        return (_gathered(xv, w, lhs, rhs), _gathered(np.abs(xv), np.abs(w), lhs, rhs),
                xv.shape[-1])
    if op == "gather_mm":
        a, b = to_numpy(params["a"]), np.swapaxes(to_numpy(params["b"]), -1, -2)
        lhs, rhs = params.get("lhs_indices"), params.get("rhs_indices")
        return _gathered(a, b, lhs, rhs), _gathered(np.abs(a), np.abs(b), lhs, rhs), a.shape[-1]
    if op == "matmul":
        a, b = to_numpy(params["a"]), to_numpy(params["b"])
        return a @ b, np.abs(a) @ np.abs(b), a.shape[-1]
    if op == "from_fp8":
        value = q.round_to(q.e4m3_to_float(to_numpy(params["x"])), out_dtype or "bfloat16")
        return value.astype(np.float64), np.abs(value), 1
    if op == "to_fp8":
        x = to_numpy(params["x"])
        return q.e4m3_to_float(q.float_to_e4m3(x)), np.abs(x), 1
    if op == "all_sum":
        group = params.get("group")
        if group is not None and group.size() > 1:
            return None
        x = to_numpy(params["x"])
        return x, np.abs(x), 1
    return None


def _value_of(op: str, out) -> np.ndarray:
    """A result as the values it stands for (to_fp8's codes decoded)."""
    if op == "to_fp8":
        return q.e4m3_to_float(to_numpy(out))
    return to_numpy(out)


@dataclass
class Measure:
    """One call compared three ways; errors relative to the row's scale."""

    op: str
    dtype: str
    device_cpu: float | None = None  # device against mx.cpu
    device_ref: float | None = None  # device against the NumPy reference
    cpu_ref: float | None = None  # mx.cpu against the NumPy reference
    row: int = 0  # the worst row of the device's departure (or the CPU's)
    rows: int = 0
    tol_pair: float = 0.0
    tol_ref: float = 0.0
    device_error: str = ""  # what the device raised
    cpu_error: str = ""  # what mx.cpu raised
    note: str = ""  # exactness of dequantize, ...

    @property
    def device_departs(self) -> bool:
        if self.device_error:
            return not self.cpu_error
        if self.device_cpu is not None and not self.cpu_error:
            return self.device_cpu > self.tol_pair and (
                self.device_ref is None
                or self.device_ref > max(2 * (self.cpu_ref or 0.0), self.tol_pair))
        return self.device_ref is not None and self.device_ref > self.tol_ref

    @property
    def cpu_departs(self) -> bool:
        if self.cpu_error:
            return True
        return self.cpu_ref is not None and self.cpu_ref > self.tol_ref

    def to_dict(self) -> dict:
        """JSON-ready: a non-finite error is written as a string ("inf", "nan")."""
        d = asdict(self)
        d.update(device_departs=self.device_departs, cpu_departs=self.cpu_departs)
        return {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v)
                for k, v in d.items()}


def measure(op: str, params: dict, device_out=None, cpu_out=None, *, device_error: str = "",
            cpu_error: str = "") -> Measure:
    """Compare a call's result on the device (None where the device is the
    CPU itself) and on ``mx.cpu`` with each other and with the NumPy reference."""
    if op == "quantize":
        return _measure_quantize(params, device_out, cpu_out, device_error, cpu_error)
    first = device_out if device_out is not None else cpu_out
    dtype = dtype_name(first.dtype) if isinstance(first, mx.array) else "float32"
    m = Measure(op, dtype, device_error=device_error, cpu_error=cpu_error)
    try:
        ref = reference_of(op, params, dtype if op == "from_fp8" else None)
    except Exception as error:  # noqa: BLE001 - a reference we cannot build is no reference
        ref, m.note = None, f"no NumPy reference ({type(error).__name__}: {error})"
    k = ref[2] if ref is not None else _dot_length(op, params)
    m.tol_pair, m.tol_ref = tolerances(op, dtype, k)
    dev = None if device_out is None or device_error else _value_of(op, device_out)
    cpu = None if cpu_out is None or cpu_error else _value_of(op, cpu_out)
    scale = ref[1] if ref is not None else np.abs(cpu if cpu is not None else dev)
    if ref is not None and dev is not None:
        m.device_ref, m.row, m.rows = row_error(dev, ref[0], scale)
    if ref is not None and cpu is not None:
        m.cpu_ref, row, rows = row_error(cpu, ref[0], scale)
        if dev is None:
            m.row, m.rows = row, rows
    if dev is not None and cpu is not None:
        m.device_cpu, m.row, m.rows = row_error(dev, cpu, scale)
    if op == "dequantize" and ref is not None:
        asked = params.get("dtype")
        m.note = _exactness(params, None if asked is None else dtype_name(asked), dtype,
                            dev if dev is not None else cpu, ref[0])
    return m


def _dot_length(op: str, params: dict) -> int:
    x = params.get("x", params.get("a"))
    return int(x.shape[-1]) if op in MATMUL_OPS and isinstance(x, mx.array) else 1


def ulps(got: np.ndarray, want: np.ndarray, dtype: str) -> np.ndarray:
    """Elementwise distance in units in the last place of ``dtype`` (values
    held as float64; NaN against NaN is 0, against a number inf)."""
    got = np.asarray(got, np.float64)
    want = np.asarray(want, np.float64)
    if dtype == "float16":
        a, b = got.astype(np.float16).view(np.int16), want.astype(np.float16).view(np.int16)
        a, b = a.astype(np.int64), b.astype(np.int64)
        top = 0x8000
    else:
        a = got.astype(np.float32).view(np.int32).astype(np.int64)
        b = want.astype(np.float32).view(np.int32).astype(np.int64)
        top = 0x80000000
        if dtype == "bfloat16":
            a, b, top = a >> 16, b >> 16, 0x8000
    # Sign-magnitude to a monotonic integer line.
    a = np.where(a < 0, -(a + top), a)
    b = np.where(b < 0, -(b + top), b)
    distance = np.abs(a - b).astype(np.float64)
    nan_g, nan_w = np.isnan(got), np.isnan(want)
    distance = np.where(nan_g & nan_w, 0.0, distance)
    return np.where(nan_g ^ nan_w, np.inf, distance)


def _exactness(params: dict, asked: str | None, dtype: str, got: np.ndarray | None,
               plain: np.ndarray) -> str:
    """How ``got`` (a dequantize result in ``dtype``) matches the reference:
    bit for bit with its separate multiply and add, or with a fused
    multiply-add, or within a measured number of ulps."""
    if got is None or got.shape != plain.shape:
        return ""
    affine = (params.get("mode") or "affine") == "affine"
    if not ulps(got, plain, dtype).any():
        return "bit-exact with the reference" + (
            " (multiply, then add)" if affine else "")
    if affine:
        fused = _dequantized(params, "w", asked, fma=True)
        if not ulps(got, fused, dtype).any():
            return "bit-exact with the reference's fused multiply-add"
    distance = ulps(got, plain, dtype)
    return f"{int(np.count_nonzero(distance))} of {distance.size} elements off, at most " \
           f"{np.max(distance):g} ulps"


def _measure_quantize(params, device_out, cpu_out, device_error, cpu_error) -> Measure:
    """mx.quantize: each result dequantized by the reference, and measured by
    how far it lands from the input (tie breaks may differ between kernels:
    only a worse quantization departs)."""
    w = params["w"]
    dtype = dtype_name(w.dtype)
    m = Measure("quantize", dtype, device_error=device_error, cpu_error=cpu_error)
    m.tol_pair, m.tol_ref = tolerances("quantize", dtype, 1)  # on the excess error below
    values = to_numpy(w)
    gs = params.get("global_scale")
    fmt = _fmt_of(params, gs)
    scale = np.abs(values)

    def back(out) -> np.ndarray:
        weight, scales, *biases = out
        s_dtype = dtype_name(scales.dtype) if fmt.mode == "affine" else None
        return q.dequantize(to_numpy(weight), to_numpy(scales),
                            to_numpy(biases[0]) if biases else None, fmt,
                            global_scale=None if gs is None else to_numpy(gs), dtype="float32",
                            scales_dtype=s_dtype)

    ref = q.quantize(values.astype(np.float32), fmt,
                     global_scale=None if gs is None else to_numpy(gs))
    ref_err = row_error(q.dequantize(*ref[:3], fmt, global_scale=ref.global_scale), values,
                        scale)[0]
    dev = cpu = None
    if device_out is not None and not device_error:
        dev = back(device_out)
        m.device_ref, m.row, m.rows = row_error(dev, values, scale)
    if cpu_out is not None and not cpu_error:
        cpu = back(cpu_out)
        m.cpu_ref, row, rows = row_error(cpu, values, scale)
        if dev is None:
            m.row, m.rows = row, rows
    if dev is not None and cpu is not None:
        m.device_cpu = row_error(dev, cpu, scale)[0]
    # Quantization error itself is no departure; only more of it than the
    # reference quantizer's (or the CPU's) is.
    m.note = f"the reference quantizer's own error {ref_err:.3g}"
    if m.device_ref is not None:
        worse = m.device_ref - 1.5 * max(ref_err, m.cpu_ref or 0.0)
        m.device_ref = max(worse, 0.0)
        if cpu is not None:
            m.device_cpu = m.device_ref
    if m.cpu_ref is not None:
        m.cpu_ref = max(m.cpu_ref - 1.5 * ref_err, 0.0)
    return m


# ---------------------------------------------------------------------------
# OpCase: one operation on seeded arrays (reproducer, and the doctor's unit)
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class OpCase:
    """One MLX operation on arrays made from ``seed``.

    ``x_shape``: the activations (quantized_matmul [M, K]; gather ops
    unsorted [T, 1, 1, K], sorted [T*k, 1, K]); ``w_shape``: the weight as
    values, before packing ([..., N, K]; gather_mm's b [E, K, N];
    quantize / dequantize the matrix itself); ``indices_shape``: the gather
    ops' rhs_indices (sorted when ``sorted_indices``).  Activations are
    normal times ``x_scale``; weights normal over sqrt(K), quantized by the
    NumPy reference (bit for bit MLX's CPU quantizer), affine scales and
    biases stored in ``dtype`` as a model holds them.  ``x_axis_view``
    (gather ops): x's size-1 axes are given to its rows [R, K] by
    ``mx.expand_dims``, a view whose stride there is not the contiguous one
    (as ``x[:, None, :]`` is), rather than x made contiguous in its shape:
    MLX's CUDA sorted gather_mm reads the two differently."""

    op: str
    dtype: str = "float32"
    x_shape: tuple = ()
    w_shape: tuple = ()
    mode: str | None = None
    bits: int | None = None
    group_size: int | None = None
    global_scale: bool = False
    indices_shape: tuple | None = None
    sorted_indices: bool = False
    x_scale: float = 1.0
    seed: int = 0
    x_axis_view: bool = False

    @property
    def fmt(self) -> q.QuantFormat | None:
        if self.mode is None:
            return None
        return q.QuantFormat(self.mode, self.group_size, self.bits, self.global_scale)

    @property
    def tokens(self) -> int:
        """Tokens (rows of x) the case stands for."""
        if self.op == "quantized_matmul":
            return int(np.prod(self.x_shape[:-1])) if self.x_shape else 0
        if self.op in ("gather_qmm", "gather_mm") and self.indices_shape:
            if self.sorted_indices:
                return int(np.prod(self.indices_shape))
            return int(self.indices_shape[0])
        return int(self.x_shape[0]) if self.x_shape else 0

    @property
    def label(self) -> str:
        op = self.op + (" sorted" if self.sorted_indices else "")
        made = "(x's size-1 axis a view)" if self.x_axis_view else ""
        return " ".join(p for p in (op, format_name(self.fmt), self.dtype, made) if p)

    def shapes(self) -> str:
        parts = []
        if self.x_shape:
            parts.append(f"x {tuple(self.x_shape)}")
        if self.w_shape:
            parts.append(f"w {tuple(self.w_shape)}")
        if self.indices_shape:
            parts.append(f"indices {tuple(self.indices_shape)}")
        return ", ".join(parts)


def format_name(fmt: q.QuantFormat | None) -> str:
    if fmt is None:
        return ""
    if fmt.mode == "affine":
        return f"affine {fmt.bits}-bit group {fmt.group_size}"
    return fmt.mode + (" with global scale" if fmt.global_scale else "")


def _cpu(a: np.ndarray, dtype=None) -> mx.array:
    out = mx.array(a)
    if dtype is not None:
        out = out.astype(dtype, stream=mx.cpu)
    mx.eval(out)
    return out


def _packed(case: OpCase, w: np.ndarray) -> dict:
    """The reference's quantization of ``w``, as MLX arrays."""
    fmt = case.fmt
    quantized = q.quantize(w, fmt)
    scales_dtype = MX_DTYPES[case.dtype] if fmt.mode == "affine" else None
    out = {"w": _cpu(quantized.weight), "scales": _cpu(quantized.scales, scales_dtype),
           "biases": None if quantized.biases is None else _cpu(quantized.biases, scales_dtype),
           "group_size": fmt.group_size, "bits": fmt.bits, "mode": fmt.mode}
    if quantized.global_scale is not None:
        out["global_scale"] = _cpu(np.asarray(quantized.global_scale, np.float32))
    return out


def _fp8_probes() -> np.ndarray:
    finite = q.e4m3_to_float(np.arange(256))
    finite = finite[np.isfinite(finite)]
    probes = np.concatenate([finite, finite * (1 + 2.0**-5), finite * (1 + 2.0**-4),
                             [464.0, 470.0, 480.0, 1e9, np.inf, -np.inf, np.nan, -0.0]])
    probes = probes.astype(np.float32)
    pad = (-len(probes)) % 32
    return np.concatenate([probes, np.zeros(pad, np.float32)]).reshape(-1, 32)


def _weights(case: OpCase) -> np.ndarray:
    """The case's weight values: normal over sqrt(K), from the seed's own stream."""
    k = case.w_shape[-2] if case.op == "gather_mm" else case.w_shape[-1]
    rng = np.random.default_rng([case.seed, 1])
    return (rng.standard_normal(case.w_shape) / math.sqrt(k)).astype(np.float32)


@functools.lru_cache(maxsize=8)
def _packed_weights(case: OpCase) -> dict:
    return _packed(case, _weights(case))


def make_params(case: OpCase) -> dict:
    """The arrays and arguments of ``case``, built on ``mx.cpu``."""
    dtype = MX_DTYPES.get(case.dtype, mx.float32)
    if case.op == "from_fp8":
        return {"x": _cpu(np.arange(256, dtype=np.uint8).reshape(8, 32)), "dtype": dtype}
    if case.op == "to_fp8":
        return {"x": _cpu(_fp8_probes() * case.x_scale, dtype)}
    x = indices = None
    if case.x_shape:
        rng = np.random.default_rng([case.seed, 2])
        values = (rng.standard_normal(case.x_shape) * case.x_scale).astype(np.float32)
        if case.x_axis_view:  # the rows [R, K], their size-1 axes inserted as a view
            rows = _cpu(values.reshape(case.x_shape[0], case.x_shape[-1]), dtype)
            # On the default stream, left to the op's own evaluation: as the
            # calls MLX's CUDA build got wrong made it.
            x = mx.expand_dims(rows, tuple(range(1, len(case.x_shape) - 1)))
        else:
            x = _cpu(values, dtype)
    if case.indices_shape is not None:
        rng = np.random.default_rng([case.seed, 3])
        idx = rng.integers(0, case.w_shape[0], case.indices_shape)
        if case.sorted_indices:
            idx = np.sort(idx.ravel()).reshape(case.indices_shape)
        indices = _cpu(idx.astype(np.uint32))
    if case.op == "quantize":
        w = _weights(case)
        params = {"w": _cpu(w, dtype), "group_size": case.group_size, "bits": case.bits,
                  "mode": case.mode}
        if case.global_scale:
            params["global_scale"] = _cpu(np.abs(w).max().astype(np.float32))
        return params
    if case.op == "matmul":
        return {"a": x, "b": _cpu(_weights(case), dtype)}
    if case.op == "gather_mm":
        # As mlx-lm's SwitchLinear passes it: the [E, N, K] weight's transposed
        # view, not a contiguous [E, K, N] array (the kernels differ).
        stored = _cpu(np.ascontiguousarray(_weights(case).swapaxes(-1, -2)), dtype)
        b = mx.swapaxes(stored, -1, -2, stream=mx.cpu)
        mx.eval(b)
        return {"a": x, "b": b, "rhs_indices": indices, "sorted_indices": case.sorted_indices}
    # The packed weight depends on the format, dtype, shape and seed only.
    packed = _packed_weights(OpCase(case.op if case.op == "dequantize" else "quantized",
                                    case.dtype, (), tuple(case.w_shape), case.mode, case.bits,
                                    case.group_size, case.global_scale, seed=case.seed))
    if case.op == "dequantize":
        return {**packed, "dtype": dtype}
    if case.op == "quantized_matmul":
        return {"x": x, **packed, "transpose": True}
    if case.op == "gather_qmm":
        return {"x": x, **packed, "rhs_indices": indices, "transpose": True,
                "sorted_indices": case.sorted_indices}
    raise ValueError(f"no seeded arrays for {case.op!r}")


def strides(a: mx.array) -> tuple[int, ...] | None:
    """``a``'s strides in elements as MLX holds it (after evaluation), or
    None where they cannot be read."""
    try:
        mx.eval(a)
        view = memoryview(a)
        return tuple(v // view.itemsize for v in view.strides)
    except Exception:  # noqa: BLE001 - a layout we cannot read is not reported
        return None


def row_major(shape) -> tuple[int, ...]:
    out, step = [], 1
    for n in reversed(tuple(shape)):
        out.append(step)
        step *= n
    return tuple(reversed(out))


def layout_note(a: mx.array) -> str:
    """`` strides (..)`` where ``a`` is not laid out row-major, size-1 axes
    included (MLX's CUDA sorted gather_mm reads x by such a stride)."""
    held = strides(a)
    return "" if held is None or held == row_major(a.shape) else f" strides {held}"


def axis_view(x) -> bool:
    """Whether a size-1 axis of ``x`` (before its last) has a stride that
    is not the row-major one: OpCase.x_axis_view."""
    held = strides(x) if isinstance(x, mx.array) else None
    if held is None:
        return False
    want = row_major(x.shape)
    return any(n == 1 and held[i] != want[i] for i, n in enumerate(x.shape[:-1]))


def case_of(op: str, params: dict) -> OpCase | None:
    """The OpCase of a recorded call: the same op, format, dtype and shapes
    (the values are the seed's, not the call's)."""
    try:
        mode = bits = group = None
        x = params.get("x", params.get("a"))
        if op in QUANTIZED_OPS:
            mode, group, bits = quant_params(params)
        w = params.get("w", params.get("b"))
        w_shape = tuple(w.shape) if isinstance(w, mx.array) else ()
        if op in ("quantized_matmul", "gather_qmm", "dequantize") and w_shape:
            w_shape = (*w_shape[:-1], w_shape[-1] * 32 // bits)
        if op in ("quantize", "dequantize"):
            if op == "quantize":
                dtype = params["w"].dtype
            else:
                dtype = params.get("dtype") or (
                    params["scales"].dtype if mode == "affine" else mx.bfloat16)
            dtype = dtype_name(dtype) if dtype in DTYPE_NAMES else "float32"
            x_shape = ()
        else:
            dtype = dtype_name(x.dtype)
            x_shape = tuple(x.shape)
        rhs = params.get("rhs_indices")
        x_scale = 1.0
        if isinstance(x, mx.array) and mx.issubdtype(x.dtype, mx.floating) and x.size:
            std = float(np.std(to_numpy(x)))
            x_scale = float(f"{std:.2g}") if math.isfinite(std) and std > 0 else 1.0
        return OpCase(op, dtype, x_shape, w_shape, mode, bits, group,
                      params.get("global_scale") is not None,
                      tuple(rhs.shape) if isinstance(rhs, mx.array) else None,
                      bool(params.get("sorted_indices", False)), x_scale,
                      x_axis_view=op in ("gather_mm", "gather_qmm") and axis_view(x))
    except Exception:  # noqa: BLE001 - a call we cannot describe gets no seeded reproducer
        return None


def replay_line(case: OpCase) -> str:
    """``python -m dsv4shard.attribution replay "OpCase(...)"``: one shell line."""
    text = repr(case)
    if any(ch in text for ch in '"$`\\!'):
        return shlex.join(["python", "-m", "dsv4shard.attribution", "replay", text])
    return f'python -m dsv4shard.attribution replay "{text}"'



# ---------------------------------------------------------------------------
# Running one operation three ways
# ---------------------------------------------------------------------------


def _evaluated(out):
    mx.eval(out)
    return out


def run_three_ways(op: str, params: dict, fn: Callable | None = None,
                   device_out=None) -> Measure:
    """The op on the default device (unless ``device_out`` is given, or the
    default device is the CPU), on ``mx.cpu``, and in NumPy, compared."""
    device_error = cpu_error = ""
    on_device = device_under_test() is not None
    if device_out is None and on_device:
        try:
            device_out = _evaluated(call(op, params, fn))
        except Exception as error:  # noqa: BLE001 - what the device raised is the finding
            device_error = f"{type(error).__name__}: {error}"
    try:
        cpu_out = _evaluated(call(op, params, fn, stream=mx.cpu))
    except Exception as error:  # noqa: BLE001
        cpu_out, cpu_error = None, f"{type(error).__name__}: {error}"
    return measure(op, params, device_out if on_device else None, cpu_out,
                   device_error=device_error, cpu_error=cpu_error)


def run_case(case: OpCase) -> Measure:
    return run_three_ways(case.op, make_params(case))


# ---------------------------------------------------------------------------
# Findings: a recorded call the device got wrong
# ---------------------------------------------------------------------------


@dataclass
class Finding:
    op: str
    params: dict = field(repr=False)
    measure: Measure
    case: OpCase | None
    arrays: str = ""  # the .npz holding the call's arrays

    @property
    def key(self) -> tuple:
        return signature(self.op, self.params)

    def describe(self) -> str:
        """``quantized_matmul (affine 8-bit group 64, float32, x (3, 64), w
        (64, 16) uint32)``: relative error ..."""
        m = self.measure
        what = [self.label()]
        shapes = ", ".join(
            f"{n} {tuple(v.shape)}" + ("" if mx.issubdtype(v.dtype, mx.floating)
                                       else f" {dtype_name(v.dtype)}") + layout_note(v)
            for n, v in self.params.items()
            if isinstance(v, mx.array) and n != "global_scale" and v.ndim > 0)
        if shapes:
            what.append(shapes)
        text = f"{self.op} ({'; '.join(what)})"
        if m.device_error:
            return f"{text}: raised {m.device_error} where mx.cpu did not"
        error = m.device_cpu if m.device_cpu is not None else m.device_ref
        against = "mx.cpu" if m.device_cpu is not None else "the NumPy reference"
        text += f": relative error {error:.3g} against {against} (worst row {m.row} of {m.rows}"
        if m.cpu_ref is not None:
            text += f"; mx.cpu {m.cpu_ref:.2g} from the NumPy reference"
        if m.cpu_error:
            text += f"; mx.cpu cannot run it: {m.cpu_error}"
        return text + ")"

    def label(self) -> str:
        parts = []
        if self.op in QUANTIZED_OPS:
            mode, group, bits = quant_params(self.params)
            parts.append(format_name(q.QuantFormat(mode, group, bits,
                                                   self.params.get("global_scale") is not None)))
        if self.params.get("sorted_indices"):
            parts.append("sorted indices")
        parts.append(self.measure.dtype)
        return ", ".join(parts)

    def reproducers(self) -> list[str]:
        lines = []
        if self.case is not None:
            lines.append(f"op alone: {replay_line(self.case)}")
        if self.arrays:
            lines.append("these arrays: " + shlex.join(
                ["python", "-m", "dsv4shard.attribution", "replay", self.arrays]))
        return lines


def check_call(c: Call) -> Finding | None:
    """Replay a recorded call on ``mx.cpu``: a Finding where the device departs."""
    m = run_three_ways(c.op, c.params, c.fn, device_out=c.out)
    if not m.device_departs:
        return None
    return Finding(c.op, c.params, m, case_of(c.op, c.params))


def findings_of(calls: list[Call]) -> list[Finding]:
    """The departing calls, one per signature (the worst), worst first."""
    by_key: dict = {}
    for c in calls:
        try:
            found = check_call(c)
        except Exception:  # noqa: BLE001 - a call we cannot replay names nothing
            continue
        if found is None:
            continue
        old = by_key.get(found.key)
        if old is None or _severity(found) > _severity(old):
            by_key[found.key] = found
    return sorted(by_key.values(), key=_severity, reverse=True)


def _severity(f: Finding) -> float:
    m = f.measure
    if m.device_error:
        return math.inf
    value = m.device_cpu if m.device_cpu is not None else m.device_ref
    return value if value is not None and not math.isnan(value) else math.inf


# ---------------------------------------------------------------------------
# Saving and replaying a call's arrays
# ---------------------------------------------------------------------------


def attribution_dir() -> str:
    return os.environ.get("DSV4SHARD_ATTRIBUTION_DIR") or os.path.join(
        tempfile.gettempdir(), "dsv4shard-attribution")


def save_arrays(op: str, params: dict) -> str:
    """Write a call's arrays and arguments to an .npz; its path."""
    arrays, meta = {}, {"op": op, "params": {}}
    for name, value in params.items():
        if isinstance(value, mx.array):
            arrays[name] = np.array(value.astype(mx.float32, stream=mx.cpu)) \
                if value.dtype == mx.bfloat16 else np.array(value)
            meta["params"][name] = {"array": str(value.dtype).removeprefix("mlx.core.")}
        elif isinstance(value, mx.Dtype):
            meta["params"][name] = {"dtype": str(value).removeprefix("mlx.core.")}
        elif isinstance(value, (bool, int, float, str, type(None))):
            meta["params"][name] = {"value": value}
    blob = json.dumps(meta, sort_keys=True).encode()
    digest = hashlib.sha256(blob)
    for name in sorted(arrays):
        digest.update(arrays[name].tobytes())
    folder = attribution_dir()
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{op}-{digest.hexdigest()[:12]}.npz")
    np.savez(path, __meta__=np.frombuffer(blob, np.uint8), **arrays)
    return path


def load_arrays(path: str) -> tuple[str, dict]:
    data = np.load(path)
    meta = json.loads(bytes(data["__meta__"]).decode())
    params = {}
    for name, info in meta["params"].items():
        if "array" in info:
            params[name] = _cpu(data[name], getattr(mx, info["array"]))
        elif "dtype" in info:
            params[name] = getattr(mx, info["dtype"])
        else:
            params[name] = info["value"]
    return meta["op"], params


# ---------------------------------------------------------------------------
# The whole property, rerun: the hook
# ---------------------------------------------------------------------------


@dataclass
class Rerun:
    status: str  # pass, fail, skip, declined, error
    error: BaseException | None = None
    signatures: list = field(default_factory=list)
    calls: list = field(default_factory=list)


def _rerun(prop: Callable, case, impl: dict, *, cpu: bool) -> Rerun:
    from hypothesis.errors import UnsatisfiedAssumption

    from dsv4shard.engine.outcome import is_skip

    recorder = Recorder(keep=not cpu)
    status, error = "pass", None
    with on_cpu() if cpu else contextlib.nullcontext():
        with recorder:
            try:
                prop(case, **impl)
            except (KeyboardInterrupt, SystemExit):
                raise
            except AssertionError as e:
                status, error = "fail", e
            except NotImplementedError as e:
                status, error = "declined", e
            except UnsatisfiedAssumption as e:
                status, error = "skip", e
            except BaseException as e:  # noqa: BLE001 - whatever the rerun ends in is data
                status, error = ("skip" if is_skip(e) else "error"), e
    return Rerun(status, error, recorder.signatures, recorder.calls)


def _first_line(error: BaseException | None) -> str:
    text = str(error).strip().splitlines() if error is not None else []
    return text[0] if text else type(error).__name__


def _mark(error: BaseException) -> BaseException:
    try:
        error._dsv4shard_attributed = True
    except Exception:  # noqa: BLE001 - an exception without a __dict__ stays unmarked
        pass
    return error


def _note(error: BaseException, text: str) -> None:
    if hasattr(error, "add_note"):
        error.add_note(text)


def _uses_real_ranks(prop) -> bool:
    from dsv4shard.engine.records import of_function

    try:
        return of_function(getattr(prop, "fn", prop)).ranks > 0
    except KeyError:
        return False


def attribute(prop: Callable, case, impl: dict, error: BaseException) -> BaseException:
    """The exception a failure of ``prop(case, **impl)`` should raise:
    ``error`` itself (perhaps with a note), or a :class:`BackendDefect` when
    the failure is the backend's.  A no-op on ``mx.cpu``, inside a rerun, for
    an error already attributed, and for properties computed on real ranks
    (other processes)."""
    device = device_under_test()
    if (device is None or _STATE.judging or getattr(error, "_dsv4shard_attributed", False)
            or isinstance(error, BackendDefect) or _uses_real_ranks(prop)):
        return _mark(error)
    flown = _flown()
    _STATE.judging = True
    try:
        in_failing_run = findings_of(flown)
        del flown
        on_cpu_run = _rerun(prop, case, impl, cpu=True)
        on_device = _rerun(prop, case, impl, cpu=False)
        found = findings_of(on_device.calls)
    finally:
        _STATE.judging = False
    name = getattr(prop, "__name__", str(prop))
    if found and on_cpu_run.status in ("pass", "skip", "error", "declined"):
        return _mark(backend_defect(name, device, error, found, on_cpu_run))
    if in_failing_run and on_cpu_run.status == "pass":
        # The failing run's own arrays: MLX's kernel departed there, the
        # property passes on mx.cpu, whatever a rerun on the device did.
        rerun = ("failed again" if on_device.status == "fail" else
                 f"rerun on {device}: {on_device.status}, nothing departing recorded")
        return _mark(backend_defect(name, device, error, in_failing_run, on_cpu_run,
                                    when=f"in the failing run ({rerun})"))
    if found or in_failing_run:  # fails on mx.cpu too: the implementation's, and a defect besides
        _note(error, f"attribution: fails on mx.cpu as well: the implementation's failure; "
                     f"besides, MLX on {device} departs from mx.cpu in "
                     + "; ".join(f.describe() for f in (found or in_failing_run)[:3]))
        return _mark(error)
    if on_cpu_run.status == "pass":
        only_device = sorted({s[0] for s in set(on_device.signatures) - set(on_cpu_run.signatures)})
        only_cpu = sorted({s[0] for s in set(on_cpu_run.signatures) - set(on_device.signatures)})
        if only_device or only_cpu:
            _note(error, f"attribution: passes on mx.cpu, but the code takes another path on "
                         f"{device} (calls {only_device} only there, {only_cpu} only on "
                         f"mx.cpu): a device-dependent path of the implementation")
            return _mark(error)
        if on_device.status == "pass":
            _note(error, f"attribution: passed when rerun on {device} and on mx.cpu: "
                         f"not reproducible in this process")
            return _mark(error)
        return _mark(backend_defect(name, device, error, [], on_cpu_run))
    if on_cpu_run.status == "fail":
        _note(error, "attribution: fails on mx.cpu as well, and every MLX operation recorded "
                     f"on {device} agrees with mx.cpu: the implementation's failure")
    else:
        _note(error, f"attribution: could not rerun on mx.cpu ({on_cpu_run.status}: "
                     f"{_first_line(on_cpu_run.error)}); no MLX operation recorded on {device} "
                     "departs from mx.cpu")
    return _mark(error)


def backend_defect(name: str, device: str, error: BaseException, found: list[Finding],
                   on_cpu_run: Rerun, when: str = "") -> BackendDefect:
    """The BackendDefect of a failure: first line the verdict, then the
    original failure, the reproducers, the case's own lines (``when``: where
    the departing calls were recorded, when not in the rerun)."""
    if on_cpu_run.status == "pass":
        cpu_says = "the property passes on mx.cpu on the same case"
    else:
        cpu_says = (f"the property could not run on mx.cpu ({on_cpu_run.status}: "
                    f"{_first_line(on_cpu_run.error)}), so the implementation is not cleared")
    if found:
        head = (f"{name}: backend defect, not the implementation's: MLX's "
                f"{found[0].describe()} on {device}{' ' + when if when else ''}; {cpu_says}")
    else:
        head = (f"{name}: backend defect, not the implementation's: fails on {device}, "
                f"{cpu_says}; no single MLX operation recorded departs from mx.cpu beyond its "
                "bound: the difference builds up across operations (float32 matmuls in TF32?) "
                "or lies in one not recorded")
    lines = [head, f"  failure on {device}: {_first_line(error)}"]
    for f in found[:4]:
        try:
            f.arrays = save_arrays(f.op, f.params)
        except Exception:  # noqa: BLE001 - no file, still a reproducer from the seed
            f.arrays = ""
        if f is not found[0]:
            lines.append(f"  also: {f.describe()}")
        lines.extend(f"  {line}" for line in f.reproducers())
    original = str(error).strip().splitlines()[1:]
    lines.extend(original)
    defect = BackendDefect("\n".join(lines))
    defect.findings = found
    defect.device = device
    return defect


# ---------------------------------------------------------------------------
# Command line: python -m dsv4shard.attribution replay CASE|FILE.npz
# ---------------------------------------------------------------------------


def parse_case(text: str) -> OpCase:
    return eval(text, {"OpCase": OpCase, "__builtins__": {}})  # noqa: S307 - printed by us


def summary(label: str, m: Measure, device: str) -> str:
    def f(v):
        return "-" if v is None else f"{v:.3g}"

    verdict = "DEPARTS" if (m.device_departs if device != "cpu" else m.cpu_departs) else "agrees"
    text = (f"{label}: {device} {verdict}; device vs mx.cpu {f(m.device_cpu)}, device vs NumPy "
            f"{f(m.device_ref)}, mx.cpu vs NumPy {f(m.cpu_ref)} (bounds {m.tol_pair:.2g} / "
            f"{m.tol_ref:.2g}; worst row {m.row} of {m.rows})")
    for what, err in (("device", m.device_error), ("mx.cpu", m.cpu_error)):
        if err:
            text += f"; {what} raised {err}"
    return text + (f"; {m.note}" if m.note else "")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dsv4shard.attribution",
                                     description="Replay one MLX operation on the default "
                                                 "device and on mx.cpu, against NumPy.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("replay", help="an OpCase(...) or an .npz a failure wrote")
    p.add_argument("what")
    p.add_argument("--json", action="store_true", help="print the measure as JSON")
    args = parser.parse_args(argv)
    device = device_under_test() or "cpu"
    if args.what.endswith(".npz"):
        op, params = load_arrays(args.what)
        label = f"{op} ({os.path.basename(args.what)})"
    else:
        case = parse_case(args.what)
        op, params, label = case.op, make_params(case), f"{case.label} ({case.shapes()})"
    m = run_three_ways(op, params)
    if args.json:
        print(json.dumps({"label": label, "device": device, **m.to_dict()}))
    else:
        print(summary(label, m, device))
    departs = m.device_departs if device != "cpu" else m.cpu_departs
    return 1 if departs else 0


if __name__ == "__main__":
    sys.exit(main())

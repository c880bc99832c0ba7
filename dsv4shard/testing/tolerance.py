"""Error bounds for comparing MLX against the float64 reference (SPEC §6).

Two kinds live here.

- The expected side of a comparison (:class:`Expected`: the value a right
  implementation returns, and how far from it it may lie), built by
  following the implementation's arithmetic stage by stage (router,
  gate/up, activation, down, combine) on the weights its kernels hold:
  ``expect_switch_glu``, ``expect_moe``, ``expect_sharded_moe`` (rank by
  rank through each rank's slice of the kernels, then the sum).  Where MLX
  rounds a stage to the activation dtype, so does the expected side; where the running backend's
  kernel is followed bit for bit (the CPU's quantized kernels in float16 /
  bfloat16, which accumulate in that dtype), the bound is a few ulps of the
  rare element within rounding distance of a tie and 0 elsewhere.  Every
  comparison reports its power, the median bound / |expected|
  (``Expected.note``), labelled weak where it misses ``TARGETS``.
- The worst-case stage bound against the float64 reference (``moe_bound``,
  ``switch_glu_bound``): c * u * sqrt(K) * (|a| @ |b|) per matmul,
  compounded.  Sound, and vacuous in half precision (4-20x |output| in
  bfloat16); no property compares with it any more: kept as the "before"
  figure of ``benchmarks/power.py`` and of the meta-test that shows it fails.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

import reference as ref
from reference import quantization as rq

# Unit roundoff of each dtype: the one table of per-dtype tolerances.
UNIT_ROUNDOFF = {"float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}
F32 = UNIT_ROUNDOFF["float32"]
# MLX's CUDA backend multiplies float32 matrices on tensor cores in TF32
# (10-bit mantissa): its float32 matmuls round like this, not like float32.
TF32 = 2.0**-11
# Were a TF32 conversion a truncation, every product would shrink by up to
# 2^-11 per operand, the same way: a shift of the result of 2 * 2^-11.  MLX
# 0.32.4's CUDA build rounds to nearest even (one-hot products on an H200:
# 1 + 1.002 u came back 1 + 2 u, 1 + u as 1, 1 + 3 u as 1 + 4 u, for u =
# 2^-11), so there is no shift.
TF32_SHIFT = 0.0


def underflow_floor(dtype: str, terms: int) -> float:
    """Absolute error of ``terms`` roundings that may underflow: each can lose
    up to the smallest subnormal of ``dtype`` or of float32, whichever is
    larger (values far below it, such as 1e-91, come back as 0)."""
    tiny = max(float(np.finfo(np.float32).smallest_subnormal),
               {"float32": 0.0, "float16": 2.0**-24, "bfloat16": 2.0**-133}[dtype])
    return terms * tiny


def matmul_roundoff(dtype: str) -> float:
    """Unit roundoff of a matmul in ``dtype`` on the running backend."""
    from dsv4shard import backend

    if dtype == "float32" and backend.tf32_matmuls():
        return TF32
    return UNIT_ROUNDOFF[dtype]


C = 4.0  # the c of c * u * sqrt(K): room for rounding in the stored result too
SILU_SLOPE = 1.1  # max |silu'(z)| = 1.0998...


def dot_error(a_abs, b_abs_t, k, u):
    """Bound of a matmul's rounding error: c * u * sqrt(k) * (|a| @ |b|^T)."""
    return C * u * np.sqrt(k) * (a_abs @ b_abs_t)


def mlp_bound(x, w1, w3, w2, limit, u, b1=None, b3=None, b2=None):
    """(value, error bound) of one clipped-SwiGLU expert on tokens x, where
    every matmul, bias add and the stored activation round in precision u,
    and the activation itself runs in float32."""
    d, i = w1.shape[1], w1.shape[0]
    ax = np.abs(x)
    gate, up = x @ w1.T, x @ w3.T
    if b1 is not None:
        gate, up = gate + b1, up + b3
    e_gate = dot_error(ax, np.abs(w1).T, d, u) + u * np.abs(gate)
    e_up = dot_error(ax, np.abs(w3).T, d, u) + u * np.abs(up)
    if limit > 0:  # clips are 1-Lipschitz: errors pass through, values shrink
        gate, up = np.minimum(gate, limit), np.clip(up, -limit, limit)
    h = ref.silu(gate) * up
    e_h = (SILU_SLOPE * e_gate * np.abs(up) + np.abs(ref.silu(gate)) * e_up
           + (u + 4 * F32) * np.abs(h))
    y = h @ w2.T if b2 is None else h @ w2.T + b2
    e_y = dot_error(np.abs(h), np.abs(w2).T, i, u) + e_h @ np.abs(w2).T + u * np.abs(y)
    return y, e_y


def score_slope(logits, score_func, token_scores):
    """|d score / d logit| per expert (softmax: through its own logit and the
    normaliser, bounded by 2 * score)."""
    if score_func == "sigmoid":
        return token_scores * (1 - token_scores)
    if score_func == "softmax":
        return 2 * token_scores
    with np.errstate(divide="ignore", invalid="ignore"):
        slope = ref.sigmoid(logits) / (2 * token_scores)
    return np.where(np.isfinite(slope), slope, 0.5)


def logit_error(x, gate, tf32: bool | None = None):
    """Bound on |logits_mlx - logits| for a float32 router: float32 sums
    (c * u * sqrt(D) * |x| @ |gate|) and the stored result; under TF32 (MLX's
    CUDA build) each operand is first rounded to 10 bits, independent
    relative errors of at most 2^-11 (Hoeffding: LAMBDA * 2^-11 *
    sqrt(2 * x^2 @ gate^2), where c * 2^-11 * sqrt(D) * |x| @ |gate| would
    take every error the same way).  ``tf32``: None follows the running
    backend."""
    logits = ref.router_logits(x, gate)
    e = dot_error(np.abs(x), np.abs(gate).T, x.shape[1], F32) + F32 * np.abs(logits)
    if tf32 is None:
        tf32 = matmul_roundoff("float32") == TF32
    if tf32:
        e = e + LAMBDA * TF32 * np.sqrt(2 * ((x**2) @ (gate**2).T))
    return e


def route_weight_error(x, weights, config, indices, tf32: bool | None = None):
    """Bound on |w_mlx - w_ref| at the chosen experts, router in float32."""
    logits = ref.router_logits(x, weights.gate)
    s = ref.scores(logits, config.score_func)
    e_logit = logit_error(x, weights.gate, tf32)
    if config.score_func == "softmax":
        e_score = score_slope(logits, "softmax", s) * e_logit.max(axis=-1, keepdims=True)
    else:
        e_score = score_slope(logits, config.score_func, s) * e_logit
    e_score = e_score + 4 * F32 * s
    chosen = np.take_along_axis(s, indices, axis=-1)
    e_chosen = np.take_along_axis(e_score, indices, axis=-1)
    if config.score_func == "softmax":
        e_w = e_chosen
    else:
        total = chosen.sum(axis=-1, keepdims=True)
        w = chosen / total
        e_w = (e_chosen + w * e_chosen.sum(axis=-1, keepdims=True)) / total + 4 * F32 * w
    return e_w * config.route_scale


def router_margin(x, weights, config, tf32: bool | None = None):
    """How far apart the k-th and (k+1)-th biased scores must be for a float32
    router to choose the reference's set: twice the score error, plus the
    rounding of adding the bias."""
    logits = ref.router_logits(x, weights.gate)
    s = ref.scores(logits, config.score_func)
    e_logit = logit_error(x, weights.gate, tf32)
    e_score = np.maximum(score_slope(logits, config.score_func, s), 0.25) * e_logit.max(
        axis=-1, keepdims=True)
    return _choice_margin(s, weights.bias, e_score)


def _choice_margin(s, bias, e_score):
    """Per token: twice the largest score error ``e_score`` [T, E], plus the
    rounding of adding the bias to the scores ``s``."""
    return 2 * (e_score.max(axis=-1) + 4 * F32 * (np.abs(s + bias).max(axis=-1)))


# A float32 router on logits that are exact (the router probe's inputs:
# every product and sum of its matmul exact in float32 and in TF32): what
# remains is its element-wise float32 steps, the score function (up to
# three transcendental calls), the bias add, the k-term sum or softmax's
# E-term one, the divide and the route scale: a few ulps each on any MLX
# kernel, fast-math ones included, below 100 in all; 2^-16 allows 256.  A
# bfloat16 router rounds x or its logits to 8 bits, 2^-9 relative on every
# logit: a route weight moves by about 60 times this.
EXACT_ROUTE = 2.0**-16


def exact_route_error(w):
    """Bound on |w_mlx - w_ref| for a float32 router on exact logits."""
    return EXACT_ROUTE * np.abs(w)


def exact_router_margin(x, weights, config):
    """How far apart the k-th and (k+1)-th biased scores must be for such a
    router to choose the reference's set: twice the score error, plus the
    rounding of adding the bias."""
    s = ref.scores(ref.router_logits(x, weights.gate), config.score_func)
    return _choice_margin(s, weights.bias, EXACT_ROUTE * np.abs(s))


def router_gap(x, weights, config):
    """Per token: k-th minus (k+1)-th biased score (inf when k = E)."""
    k = config.top_k
    if k == config.n_experts:
        return np.full(x.shape[0], np.inf)
    biased = ref.scores(ref.router_logits(x, weights.gate), config.score_func) + weights.bias
    top = -np.sort(-biased, axis=-1)
    return top[:, k - 1] - top[:, k]


def expert_args(weights, e, limit, u):
    """mlp_bound's arguments after x for routed expert e."""
    w1, w3, w2, b1, b3, b2 = weights.expert(e)
    return w1, w3, w2, limit, u, b1, b3, b2


def switch_glu_bound(x, indices, weights, limit, dtype):
    """Error bound of mlx-lm's SwitchGLU output [T, k, D] in ``dtype``."""
    u = matmul_roundoff(dtype)
    bound = np.zeros(indices.shape + (weights.w2.shape[1],))
    for e in np.unique(indices):
        token, slot = np.nonzero(indices == e)
        _, err = mlp_bound(x[token], *expert_args(weights, e, limit, u))
        bound[token, slot] = err
    return bound + underflow_floor(dtype, x.shape[1] + weights.w1.shape[1] + 4)


def moe_bound(x, weights, config, dtype, input_ids=None):
    """Error bound of the whole block's output [T, D] in ``dtype``: routed
    outputs with their weights' errors, the float32 combine, the shared expert,
    and the final rounding to ``dtype``."""
    u = matmul_roundoff(dtype)
    indices, route_w = ref.route(x, weights, config, input_ids)
    e_route_w = route_weight_error(x, weights, config, indices)
    k = indices.shape[1]
    routed = np.zeros(x.shape)
    bound = np.zeros(x.shape)
    for e in np.unique(indices):
        token, slot = np.nonzero(indices == e)
        y, e_y = mlp_bound(x[token], *expert_args(weights, e, config.swiglu_limit, u))
        w, e_w = route_w[token, slot, None], e_route_w[token, slot, None]
        np.add.at(bound, token, np.abs(w) * e_y + e_w * np.abs(y)
                  + C * F32 * np.sqrt(k) * np.abs(w * y))
        np.add.at(routed, token, w * y)
    shared, e_shared = mlp_bound(x, weights.shared_w1, weights.shared_w3, weights.shared_w2,
                                 ref.shared_expert_limit(config), u)
    out = routed + shared
    terms = x.shape[1] + weights.w1.shape[1] + indices.shape[1] + 8
    return (bound + e_shared + C * F32 * np.abs(out) + u * np.abs(out)
            + underflow_floor(dtype, terms))


# ====================================================================================
# The expected side of a comparison: the implementation's arithmetic, stage by stage
# ====================================================================================
#
# A stage's value is an :class:`Approx`: the value MLX holds, ``c``, and how far
# the implementation's may lie from it: a deterministic radius ``r`` and a
# statistical scale ``s`` (a sum of independent rounding errors; Hoeffding: a
# sum of independent terms |e_i| <= c_i passes LAMBDA * sqrt(sum c_i^2) with
# probability at most 2 exp(-LAMBDA^2 / 2), 3e-8 at 6, so every ``s`` below
# is such a sqrt(sum c_i^2)).  A stage MLX rounds to the activation dtype
# keeps the interval [lo, hi] of the dtype values the right implementation
# may hold; rounding is monotone, so that is [rn(c - t), rn(c + t)] for a
# pre-rounding value within t of c.  Where a backend's kernel is followed bit
# for bit (MLX's CPU quantized kernels in float16 / bfloat16, which
# accumulate in that dtype), the interval is carried exactly through the
# kernel: all but the rare element within rounding distance of a tie must
# come back bit for bit.

LAMBDA = 6.0
HALF = ("float16", "bfloat16")

# The median bound / |expected| a comparison must reach to count as strong:
# a wrong answer off by a few percent of the output is then rejected.
TARGETS = {"bfloat16": 0.05, "float16": 0.05, "float32": 1e-3, "tf32": 0.02}

# MLX's float32 silu: its exp is off by up to ~1.2 |z| float32 ulps (56 at
# z = -45, 62 at z = -80, 17 at z = -20, 4 near 0; measured on the CPU
# build against float64), one more for the product with up: 16 + 1.5 |z|
# ulps covers it.  Below z = -80 exp(-z) nears float32's overflow and silu
# comes back as 0 or a subnormal: anything in [0, 2 silu(z)].
SILU_ULPS, SILU_ULPS_PER_Z = 16.0, 1.5
SILU_UNDERFLOW = -80.0

# The precision tier: a port's own activation may compute silu and the
# product in the activation dtype (two roundings of at most u |h| each)
# before MLX's rounding of the result; its combine may round the routed sum
# or the shared output once more (combine_precision sizes that departure).
PRECISION_ACTIVATION = 2.0
PRECISION_COMBINE = 1.0


def round_to(x, dtype: str) -> np.ndarray:
    """The ``dtype`` value nearest each float64 ``x`` (ties to even), as
    float64, through float32 as MLX computes."""
    with np.errstate(over="ignore", invalid="ignore"):
        return _round32(np.asarray(x, np.float64).astype(np.float32), dtype).astype(np.float64)


def _round32(x32: np.ndarray, dtype: str) -> np.ndarray:
    """float32 -> nearest ``dtype`` value, kept in float32 (the three dtypes'
    values are float32 values).  bfloat16: round to nearest even on the bits."""
    if dtype == "float32":
        return x32
    if dtype == "float16":
        with np.errstate(over="ignore", invalid="ignore"):
            return x32.astype(np.float16).astype(np.float32)
    bits = np.ascontiguousarray(x32, np.float32).view(np.uint32)
    kept = (bits >> np.uint32(16)) & np.uint32(1)
    rounded = ((bits + np.uint32(0x7FFF) + kept) & np.uint32(0xFFFF0000)).view(np.float32)
    return np.where(np.isnan(x32), x32, rounded)


# --- what the kernels hold ------------------------------------------------------------


@dataclass(frozen=True)
class Kernel:
    """One projection as MLX's matmul kernel holds it: the weight's values
    ``dense`` [..., O, K] (what ``read_weights`` gives), and for a quantized
    one its format's parts: affine codes with scales and biases, or the
    float formats' decoded elements with their group scales."""

    dense: np.ndarray
    mode: str | None = None  # None: a dense weight
    bits: int = 0
    group: int = 0
    elements: np.ndarray | None = None  # [..., O, K]
    scales: np.ndarray | None = None  # [..., O, K / group]
    biases: np.ndarray | None = None  # affine only
    bias: np.ndarray | None = None  # a linear bias [..., O]
    global_scale: bool = False

    @property
    def contraction(self) -> int:
        return self.dense.shape[-1]


def kernel_of(layer, dense: np.ndarray | None = None) -> Kernel:
    """The :class:`Kernel` of an MLX (Switch)Linear or Quantized(Switch)Linear
    (``dense``: its weight's values, when already read)."""
    from dsv4shard.weights import dense_weight, format_of, to_numpy

    linear_bias = layer.get("bias")
    bias = None if linear_bias is None else to_numpy(linear_bias)
    dense = dense_weight(layer) if dense is None else dense
    fmt = format_of(layer)
    if fmt is None:
        return Kernel(dense, bias=bias)
    biases = layer.get("biases")
    scales = to_numpy(layer["scales"]) if fmt.mode == "affine" else np.array(layer["scales"])
    return quantized_kernel(np.array(layer["weight"]), scales,
                            None if biases is None else to_numpy(biases), fmt, dense, bias)


def quantized_kernel(weight, scales, biases, fmt, dense=None, bias=None) -> Kernel:
    """A quantized :class:`Kernel` from packed words and scales (affine: the
    scales' and biases' values; float formats: their uint8 codes)."""
    codes = unpack_codes(weight, fmt.bits)
    if dense is None:
        dense = np.zeros(codes.shape)
    if fmt.mode == "affine":
        return Kernel(dense, "affine", fmt.bits, fmt.group_size, codes, scales, biases, bias)
    decode = rq.e2m1_to_float if fmt.bits == 4 else rq.e4m3_to_float
    return Kernel(dense, fmt.mode, fmt.bits, fmt.group_size, decode(codes),
                  rq.group_scale(scales, fmt), None, bias, fmt.global_scale)


def unpack_codes(words: np.ndarray, bits: int) -> np.ndarray:
    """``reference.quantization.unpack`` (MLX's little-endian bit stream of
    ``bits``-bit codes), fast: the words' bytes unpacked lowest bit first."""
    words = np.ascontiguousarray(words, dtype="<u4")
    *lead, n = words.shape
    stream = np.unpackbits(words.view(np.uint8).reshape(*lead, 4 * n), axis=-1,
                           bitorder="little")
    stream = stream.reshape(*lead, 32 * n // bits, bits).astype(np.float64)
    return stream @ (2.0 ** np.arange(bits))


@dataclass(frozen=True)
class Kernels:
    """The six projections of a block: routed [E, O, K] and shared [O, K]."""

    gate: Kernel
    up: Kernel
    down: Kernel
    shared_gate: Kernel
    shared_up: Kernel
    shared_down: Kernel

    def routed(self):
        return self.gate, self.up, self.down

    def shared(self):
        return self.shared_gate, self.shared_up, self.shared_down


ROLES = ("gate", "up", "down")
DEEPSEEK = {"gate": "w1", "up": "w3", "down": "w2"}


def kernels_of(routed: dict, shared: dict, weights=None) -> Kernels:
    """From the MLX layers: ``routed`` and ``shared`` map gate/up/down to
    them; ``weights``: the block's weights as already read (dequantized)."""
    def dense(prefix, role):
        return None if weights is None else getattr(weights, prefix + DEEPSEEK[role])

    return Kernels(*(kernel_of(routed[r], dense("", r)) for r in ROLES),
                   *(kernel_of(shared[r], dense("shared_", r)) for r in ROLES))


def block_kernels(block, weights=None) -> Kernels:
    """The kernels of an unfused ``dsv4shard.block.MoEBlock``."""
    names = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
    return kernels_of({r: block.switch_mlp[n] for r, n in names.items()},
                      {r: block.shared_experts[n] for r, n in names.items()}, weights)


def weight_kernels(weights) -> Kernels:
    """Dense kernels holding the reference's weights (float32 arithmetic)."""
    biases = {"w1": weights.b1, "w3": weights.b3, "w2": weights.b2}
    return Kernels(*(Kernel(getattr(weights, n), bias=biases[n]) for n in ("w1", "w3", "w2")),
                   *(Kernel(getattr(weights, f"shared_{n}")) for n in ("w1", "w3", "w2")))


# --- how the implementation computes ------------------------------------------------------


@dataclass(frozen=True)
class Arithmetic:
    """The arithmetic a bound follows: the activation dtype, the backend
    whose kernels run, how float32 matmuls round (``tf32``: operands cut to
    10 bits, as MLX's CUDA build does), and whether this is the precision
    tier: MLX's kernels, with the elementwise stages a port writes itself
    (activation, combine) allowed a rounding or two more in the activation
    dtype than DeepSeek's float32."""

    dtype: str
    backend: str = "cpu"
    float32_matmul: str = "float32"
    precision: bool = False

    @property
    def tf32(self) -> bool:
        return self.dtype == "float32" and self.float32_matmul == "tf32"

    @property
    def target(self) -> float:
        return TARGETS["tf32" if self.tf32 else self.dtype]

    @property
    def label(self) -> str:
        if self.precision:
            return f"{self.dtype} on {self.backend}, precision tier"
        return f"{self.dtype}{' (TF32 matmuls)' if self.tf32 else ''} on {self.backend}"


def arithmetic(dtype: str, float32_matmul: str | None = None, precision: bool = False,
               backend_name: str | None = None) -> Arithmetic:
    """The running backend's arithmetic in ``dtype`` (MLX's CUDA build runs
    float32 matmuls in TF32)."""
    from dsv4shard import backend

    where = backend_name or backend.name()
    matmul = float32_matmul or ("tf32" if backend.tf32_matmuls(where) else "float32")
    return Arithmetic(dtype, where, matmul, precision)


@dataclass
class Approx:
    """A stage's value: MLX's ``c``, within ``r + LAMBDA * s`` of it; a
    rounded stage also keeps the interval [lo, hi] of dtype values."""

    c: np.ndarray
    r: np.ndarray
    s: np.ndarray
    lo: np.ndarray | None = None
    hi: np.ndarray | None = None

    @classmethod
    def exact(cls, c) -> Approx:
        c = np.asarray(c, np.float64)
        return cls(c, np.zeros_like(c), np.zeros_like(c), c, c)

    @property
    def radius(self) -> np.ndarray:
        return self.r + LAMBDA * self.s

    def rows(self, index) -> Approx:
        return Approx(self.c[index], self.r[index], self.s[index], _pick(self.lo, index),
                      _pick(self.hi, index))

    def ends(self) -> tuple[np.ndarray, np.ndarray]:
        """The lowest and highest value the right implementation may hold."""
        if self.lo is None:
            return self.c - self.radius, self.c + self.radius
        t = LAMBDA * self.s
        return self.lo - t, self.hi + t


def _pick(a, index):
    return None if a is None else a[index]


def rounded(a: Approx, dtype: str) -> Approx:
    """``a`` stored in ``dtype``: MLX holds a value of [rn(c - t), rn(c + t)],
    t the pre-rounding radius (rounding is monotone)."""
    t = a.radius
    c, lo, hi = round_to(a.c, dtype), round_to(a.c - t, dtype), round_to(a.c + t, dtype)
    return _interval(c, lo, hi)


def _interval(c, lo, hi) -> Approx:
    """A stored stage from its value and the interval's ends (an overflow to
    inf leaves a NaN radius: no bound, any other value fails)."""
    with np.errstate(invalid="ignore"):
        return Approx(c, np.maximum(hi - c, c - lo), np.zeros_like(c), lo, hi)


def plus_rounded(a: Approx, b: np.ndarray, dtype: str) -> Approx:
    """``a + b`` (b exact) rounded to ``dtype``: monotone, so interval ends map to ends."""
    lo, hi = a.ends()
    c, lo, hi = round_to(a.c + b, dtype), round_to(lo + b, dtype), round_to(hi + b, dtype)
    return _interval(c, lo, hi)


# --- matmuls --------------------------------------------------------------------------------


def project(a: Approx, kernel: Kernel, arith: Arithmetic, experts=None) -> Approx:
    """``a @ W^T`` (+ linear bias) as ``arith`` computes it; ``experts``: per
    row of ``a``, the expert whose weight it meets (None: a 2-D weight)."""
    if _modelled(kernel, arith):
        return _modelled_project(a, kernel, arith.dtype, experts)
    per_expert = _accumulated_project
    if arith.backend == "cpu" and arith.dtype in HALF and kernel.mode is not None:
        per_expert = _half_accumulated_project  # a CPU kernel this module no longer follows
    out = _by_expert(lambda rows, e: per_expert(rows, _held(kernel, e, arith), arith),
                     a, experts, kernel.dense.shape[-2])
    if arith.dtype == "float32":
        return out
    if arith.backend != "cpu":
        # A GPU kernel's order of accumulation and stores is not followed:
        # one rounding more in the dtype, of the result's size.
        out = Approx(out.c, out.r + UNIT_ROUNDOFF[arith.dtype] * np.abs(out.c), out.s)
    # f32 accumulation, the result stored in the activation dtype, then a
    # linear bias added in it (SwitchLinear adds its bias after the matmul).
    if kernel.bias is None:
        return rounded(out, arith.dtype)
    bias = kernel.bias if experts is None else kernel.bias[experts]
    return plus_rounded(rounded(out, arith.dtype), bias, arith.dtype)


def _slice(kernel: Kernel, e):
    """(weight [O, K], linear bias [O] or None) of expert ``e`` (None: 2-D)."""
    if e is None:
        return kernel.dense, kernel.bias
    return kernel.dense[e], None if kernel.bias is None else kernel.bias[e]


def _held(kernel: Kernel, e, arith: Arithmetic):
    """(weight, linear bias, weight allowance) as a half-precision GPU kernel
    multiplies them.  MLX's CUDA build dequantizes into the activation dtype
    first (on an H200 every bfloat16 / float16 affine output lay within the
    float32-accumulation bound of x @ rn(W), none of x @ W): rn(W), exact.
    The float formats' elements times a power of two (or an e4m3 scale) are
    exact in either dtype.  Elsewhere (Metal) either may hold: rn(W), with
    |W - rn(W)| allowed."""
    w, b = _slice(kernel, e)
    if arith.dtype == "float32" or kernel.mode is None:
        return w, b, None
    held = round_to(w, arith.dtype)
    # On a GPU either may hold: an H200 run of float16 affine 6-bit experts
    # fell outside the rn(W)-only model, so the allowance stays everywhere.
    return held, b, np.abs(w - held)


def _by_expert(fn, a: Approx, experts, width: int) -> Approx:
    """``fn(rows, e)`` on the rows of each expert, put back in row order."""
    if experts is None:
        return fn(a, None)
    out = Approx(*(np.zeros((len(experts), width)) for _ in range(3)))
    for e in np.unique(experts):
        (rows,) = np.nonzero(experts == e)
        part = fn(a.rows(rows), e)
        out.c[rows], out.r[rows], out.s[rows] = part.c, part.r, part.s
    return out


def _accumulated_project(a: Approx, weight_bias, arith: Arithmetic) -> Approx:
    """Products summed in float32 in any order: Higham and Mary's
    probabilistic bound, an error of at most u * sqrt(K) * |a| @ |W| per
    Hoeffding scale (each of the K roundings off by u times a partial sum no
    larger than |a| @ |W|), u = 2^-24; the result stored in float32 (u |c|).
    Errors carried in from ``a``: its statistical part through W^2, its
    radius through |W| or, where smaller, as independent bounded terms
    (LAMBDA * sqrt(r^2 @ W^2)).  Under TF32 each operand is first cut to 10
    bits: a relative error of at most 2^-11 per operand, independent across
    the products (2^-11 * sqrt(2 * a^2 @ W^2)), and, were the cut a
    truncation, every product shrunk the same way (TF32_SHIFT * |c|).
    ``weight_bias``: (weight, linear bias, allowance on the weight or None)."""
    w, b, allowance = weight_bias
    aw, w2 = np.abs(w), w**2
    c = a.c @ w.T
    acc = F32 * np.sqrt(w.shape[1]) * (np.abs(a.c) @ aw.T)
    s2 = acc**2 + (F32 * c) ** 2
    r = np.zeros_like(c) if allowance is None else np.abs(a.c) @ allowance.T
    if a.r.any():
        r = r + np.minimum(a.r @ aw.T, LAMBDA * np.sqrt((a.r**2) @ w2.T))
    if a.s.any():
        s2 = s2 + (a.s**2) @ w2.T
    if arith.tf32:
        s2 = s2 + 2 * TF32**2 * ((a.c**2) @ w2.T)
        r = r + TF32_SHIFT * np.abs(c)
    if b is not None and arith.dtype == "float32":
        c = c + b
    return Approx(c, r, np.sqrt(s2))


def _half_accumulated_project(a: Approx, weight_bias, arith: Arithmetic) -> Approx:
    """Products and sums rounded to the activation dtype in some order (MLX's
    CPU quantized kernels where ``emulate`` no longer matches them): each of
    the K products off by u |p| and each partial sum by u |s_i|; the partial
    sums a random walk of the products plus a drift towards the result,
    sum s_i^2 <= K (|p|^2 + c^2), twice its expectation; the weights
    dequantized in the dtype (|W - rn(W)| allowed).  Sound, and weak."""
    w, b, _ = weight_bias
    u = UNIT_ROUNDOFF[arith.dtype]
    held = round_to(w, arith.dtype)
    c = a.c @ held.T
    p2 = (a.c**2) @ (held**2).T
    s2 = (a.s**2) @ (held**2).T + u**2 * (w.shape[1] * (p2 + c**2) + p2)
    r = (np.abs(a.c) @ np.abs(w - held).T
         + np.minimum(a.r @ np.abs(held).T, LAMBDA * np.sqrt((a.r**2) @ (held**2).T)))
    return Approx(c, r, np.sqrt(s2))


# --- MLX's CPU quantized kernels, bit for bit ---------------------------------------------


def _modelled(kernel: Kernel, arith: Arithmetic) -> bool:
    """Whether ``kernel`` runs on a kernel this module follows bit for bit."""
    return (arith.backend == "cpu" and arith.dtype in HALF
            and kernel.mode is not None and not kernel.global_scale
            and cpu_kernel_as_modelled(kernel.mode, kernel.bits, kernel.group, arith.dtype))


@functools.lru_cache(maxsize=None)
def cpu_kernel_as_modelled(mode: str, bits: int, group: int, dtype: str) -> bool:
    """MLX's CPU gather_qmm and quantized_matmul in ``dtype`` give exactly
    what :func:`emulate` gives, on a probe (a later MLX may change its loops;
    the bound then falls back to the float32-accumulation model)."""
    import mlx.core as mx

    rng = np.random.default_rng(0)
    k = 2 * group
    w = mx.array(rng.normal(0, 3 / np.sqrt(k), (2, 8, k)).astype(np.float32))
    packed = mx.quantize(w, group, bits, mode=mode, stream=mx.cpu)
    weight, scales = packed[0], packed[1]
    biases = packed[2] if mode == "affine" else None
    dt = {"float16": mx.float16, "bfloat16": mx.bfloat16}[dtype]
    if mode == "affine":
        scales, biases = scales.astype(dt), biases.astype(dt)
    x = mx.array(rng.normal(0, 1, (5, k)).astype(np.float32)).astype(dt)
    experts = np.array([0, 1, 1, 0, 1])
    got = mx.gather_qmm(x[:, None, None], weight, scales, biases, rhs_indices=mx.array(
        experts[:, None], dtype=mx.uint32), transpose=True, group_size=group, bits=bits,
        mode=mode, stream=mx.cpu)
    plain = mx.quantized_matmul(x, weight[0], scales[0], None if biases is None else biases[0],
                                transpose=True, group_size=group, bits=bits, mode=mode,
                                stream=mx.cpu)

    fmt = rq.QuantFormat(mode, group, bits)
    kernel = quantized_kernel(np.array(weight), _host(scales), None if biases is None
                              else _host(biases), fmt)
    xs = np.array(x.astype(mx.float32))
    want = emulate(xs, xs, kernel, dtype, experts)[0]
    want_plain = emulate(xs, xs, _slice_kernel(kernel, 0), dtype, None)[0]
    return (np.array_equal(np.array(got.astype(mx.float32)).reshape(want.shape), want)
            and np.array_equal(np.array(plain.astype(mx.float32)), want_plain))


def _host(a) -> np.ndarray:
    """An MLX array's values (floats through float32), as NumPy."""
    import mlx.core as mx

    if mx.issubdtype(a.dtype, mx.floating):
        return np.array(a.astype(mx.float32)).astype(np.float64)
    return np.array(a)


def _slice_kernel(kernel: Kernel, e: int) -> Kernel:
    return Kernel(kernel.dense[e], kernel.mode, kernel.bits, kernel.group,
                  _pick(kernel.elements, e), _pick(kernel.scales, e), _pick(kernel.biases, e),
                  _pick(kernel.bias, e), kernel.global_scale)


def _rounder(dtype: str, shape):
    """An in-place rounding of float32 [shape] arrays to ``dtype`` (the
    emulation rounds twice per product; temporaries would dominate it):
    round to nearest even on the bits, keeping bfloat16's 8 or float16's 11
    significant bits; float16's subnormals and overflow go through NumPy."""
    scratch = np.empty(shape, np.uint32)
    dropped = 16 if dtype == "bfloat16" else 13
    half = np.uint32((1 << (dropped - 1)) - 1)
    keep = np.uint32(~((1 << dropped) - 1) & 0xFFFFFFFF)

    def rn(a):
        bits = a.view(np.uint32)
        if dtype == "float16":
            np.bitwise_and(bits, 0x7FFFFFFF, out=scratch)
            odd = ((scratch < F16_NORMAL) & (scratch != 0)) | (scratch > F16_MAX)
            if odd.any():
                with np.errstate(over="ignore"):
                    a[odd] = a[odd].astype(np.float16)
        np.right_shift(bits, dropped, out=scratch)
        np.bitwise_and(scratch, 1, out=scratch)
        np.add(scratch, half, out=scratch)
        np.add(bits, scratch, out=bits)
        np.bitwise_and(bits, keep, out=bits)
        return a
    return rn


# float32 bit patterns bounding float16's normal numbers: 2^-14 and 65504.
F16_NORMAL, F16_MAX = np.uint32(0x38800000), np.uint32(0x477FE000)


def _kernel_groups(kernel: Kernel, dtype: str, experts):
    """(per-k weight, per-group scale or None, [(first, last)]) as the CPU
    kernel sums: affine weights rn(rn(scale * q) + bias) over all of K; the
    float formats' elements over each group, then times its scale."""
    weights, scales = _stored(kernel, dtype)
    pick = (lambda a: lambda k: a[k]) if experts is None else \
        (lambda a: lambda k: a[k][experts])
    if scales is None:
        return pick(weights), None, [(0, kernel.contraction)]
    groups = [(f, f + kernel.group) for f in range(0, kernel.contraction, kernel.group)]
    return pick(weights), pick(scales), groups


_STORED: dict = {}


def _stored(kernel: Kernel, dtype: str):
    """The kernel's weights (affine) or elements and scales (float formats)
    as the CPU kernel holds them in ``dtype``, float32 [K or groups, ..., O];
    kept for the kernel's lifetime (every emulation of it reuses them)."""
    key = (id(kernel), dtype)
    found = _STORED.get(key)
    if found is not None and found[0] is kernel:
        return found[1]
    if kernel.mode == "affine":
        g = kernel.group
        scale = np.repeat(round_to(kernel.scales, dtype), g, axis=-1)
        bias = np.repeat(round_to(kernel.biases, dtype), g, axis=-1)
        value = (_k_first(round_to(round_to(scale * kernel.elements, dtype) + bias, dtype)), None)
    else:
        value = (_k_first(round_to(kernel.elements, dtype)),
                 _k_first(round_to(kernel.scales, dtype)))
    if len(_STORED) > 64:
        _STORED.clear()
    _STORED[key] = (kernel, value)
    return value


def _k_first(array: np.ndarray) -> np.ndarray:
    """[..., O, K] -> float32 [K, ..., O], contiguous: one k at a time."""
    return np.ascontiguousarray(np.moveaxis(array, -1, 0).astype(np.float32))


def emulate(lo: np.ndarray, hi: np.ndarray, kernel: Kernel, dtype: str, experts=None):
    """MLX's CPU quantized matmul in ``dtype`` (mlx 0.32.4) on every row x
    of [lo, hi] at once: (lowest, highest) result per output.

    Each x[k] * w[o, k] is rounded to ``dtype``, then added, in the order of
    k, to an accumulator rounded to ``dtype``; affine weights are
    rn(rn(scale * q) + bias) in ``dtype``; the float formats sum
    rn(x[k] * element) over a group, then add rn(group sum * scale).  Every
    step is monotone (scales are positive), so the lowest result takes, per
    product, the lower of lo[k] * w and hi[k] * w, and the highest the
    higher; exact inputs (``lo is hi``) are run once."""
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is MLX's too
        return _emulate(lo, hi, kernel, dtype, experts)


def _emulate(lo, hi, kernel: Kernel, dtype: str, experts):
    ends = [lo.astype(np.float32)] if lo is hi else [lo.astype(np.float32),
                                                      hi.astype(np.float32)]
    shape = (lo.shape[0], kernel.dense.shape[-2])
    rn = _rounder(dtype, shape)
    w_of, s_of, groups = _kernel_groups(kernel, dtype, experts)
    acc = [np.zeros(shape, np.float32) for _ in ends]
    p = [np.empty(shape, np.float32) for _ in ends]
    spare = np.empty(shape, np.float32)
    for n, (first, last) in enumerate(groups):
        part = [np.zeros(shape, np.float32) for _ in ends] if s_of is not None else acc
        for k in range(first, last):
            w = w_of(k)
            for side, x in enumerate(ends):
                np.multiply(x[:, k, None], w, out=p[side])
            if len(ends) == 2:  # each product at its lower end, and at its higher
                np.maximum(p[0], p[1], out=spare)
                np.minimum(p[0], p[1], out=p[0])
                p[1], spare = spare, p[1]
            for side in range(len(ends)):
                rn(p[side])
                rn(np.add(part[side], p[side], out=part[side]))
        if s_of is not None:
            for side in range(len(ends)):
                rn(np.multiply(part[side], s_of(n), out=part[side]))
                rn(np.add(acc[side], part[side], out=acc[side]))
    if kernel.bias is not None:
        b = (kernel.bias if experts is None else kernel.bias[experts]).astype(np.float32)
        for side in range(len(ends)):
            rn(np.add(acc[side], b, out=acc[side]))
    return acc[0].astype(np.float64), acc[-1].astype(np.float64)


def _modelled_project(a: Approx, kernel: Kernel, dtype: str, experts) -> Approx:
    """The kernel on MLX's own inputs: every value the right implementation
    may hold, carried through it exactly (rows of exact inputs once, the
    others at both ends of their intervals)."""
    c, _ = emulate(a.c, a.c, kernel, dtype, experts)
    lo, hi = c.copy(), c.copy()
    a_lo, a_hi = a.ends()
    wide = np.nonzero(np.any(a_lo != a_hi, axis=-1))[0]
    if wide.size:
        sub = None if experts is None else experts[wide]
        lo[wide], hi[wide] = emulate(a_lo[wide], a_hi[wide], kernel, dtype, sub)
    return _interval(c, lo, hi)


# --- the activation and the combine -------------------------------------------------------


def activate(gate: Approx, up: Approx, limit: float, arith: Arithmetic) -> Approx:
    """DeepSeek's clipped SwiGLU as the block computes it: in float32 from
    the stored gate and up, the result stored in the activation dtype.  The
    clips pass errors through (none where a value is clipped for sure);
    |silu'| <= 1.1; MLX's float32 silu is off by 16 + 1.5 |z| ulps (SILU_ULPS)."""
    if limit > 0:
        gate, up = clipped(gate, -np.inf, limit), clipped(up, -limit, limit)
    g, u = gate.c, up.c
    silu = ref.silu(g)
    h = silu * u
    ulps = F32 * (SILU_ULPS + SILU_ULPS_PER_Z * np.abs(g)) * np.abs(h)
    r = (SILU_SLOPE * gate.r * (np.abs(u) + up.r) + (np.abs(silu) + SILU_SLOPE * gate.r) * up.r
         + ulps + np.where(g < SILU_UNDERFLOW, np.abs(h), 0.0) + 2.0**-149)
    s = np.hypot(SILU_SLOPE * np.abs(u) * gate.s, np.abs(silu) * up.s)
    if (arith.precision or arith.backend != "cpu") and arith.dtype in HALF:
        # A GPU kernel's elementwise stages are not followed bit for bit:
        # the precision tier's rounding or two more in the dtype.
        r = r + PRECISION_ACTIVATION * UNIT_ROUNDOFF[arith.dtype] * np.abs(h)
    out = Approx(h, r, s)
    return out if arith.dtype == "float32" else rounded(out, arith.dtype)


def clipped(a: Approx, low: float, high: float) -> Approx:
    """``a`` clipped to [low, high]: 1-Lipschitz, and exact where every value
    ``a`` may hold lies beyond a limit."""
    lo, hi = a.ends()
    sure = (lo >= high) | (hi <= low)
    keep = ~sure
    return Approx(np.clip(a.c, low, high), np.where(keep, a.r, 0.0), np.where(keep, a.s, 0.0))


def combine(routed: Approx, w, e_w, shared: Approx, arith: Arithmetic) -> Approx:
    """sum_k w_k y_k + shared in float32 (DeepSeek's combine), from routed
    outputs [T, k, D] and route weights within e_w of w, kept in float32
    (``stored`` puts it in the activation dtype).  In the precision tier
    each of the terms may be rounded to the dtype once more before they are
    added (the routed sum before the shared expert's output, say): u times
    the terms' magnitude."""
    wy = w[..., None] * routed.c
    c = wy.sum(axis=1) + shared.c
    terms = np.abs(wy).sum(axis=1) + np.abs(shared.c)
    k = w.shape[1]
    r = ((np.abs(w)[..., None] * routed.r + e_w[..., None] * (np.abs(routed.c) + routed.r))
         .sum(axis=1) + shared.r + C * F32 * np.sqrt(k + 1) * terms + F32 * np.abs(c))
    s = np.sqrt(((w[..., None] * routed.s) ** 2).sum(axis=1) + shared.s**2)
    if arith.dtype != "float32" and (arith.precision or arith.backend != "cpu"):
        r = r + PRECISION_COMBINE * UNIT_ROUNDOFF[arith.dtype] * terms
    return Approx(c, r, s)


def stored(a: Approx, arith: Arithmetic) -> Approx:
    """A float32 result as the block returns it: in the activation dtype."""
    return a if arith.dtype == "float32" else rounded(a, arith.dtype)


# --- whole comparisons ----------------------------------------------------------------------


def expert_outputs(x, experts, kernels: Kernels, limit: float, arith: Arithmetic,
                   part: str = "routed") -> Approx:
    """One clipped-SwiGLU expert per row of x (``experts``: its index per
    row; None with ``part="shared"``): gate and up, the activation, down."""
    gate, up, down = getattr(kernels, part)()
    xa = Approx.exact(x)
    h = activate(project(xa, gate, arith, experts), project(xa, up, arith, experts), limit, arith)
    return project(h, down, arith, experts)


def _routed(x, indices, kernels, limit, arith) -> Approx:
    t, k = indices.shape
    rows = np.repeat(np.arange(t), k)
    y = expert_outputs(x[rows], indices.reshape(-1), kernels, limit, arith)
    shape = (t, k, -1)
    return Approx(y.c.reshape(shape), y.r.reshape(shape), y.s.reshape(shape))


def expect_switch_glu(x, indices, weights, limit, arith: Arithmetic,
                      kernels: Kernels | None = None) -> Expected:
    """What mlx-lm's SwitchGLU returns [T, k, D] on tokens x (as MLX holds
    them) and experts ``indices``, and how far from it a right one may be."""
    y = _routed(x, np.asarray(indices), kernels or weight_kernels(weights), limit, arith)
    return Expected(y.c, _finite_bound(y, arith), arith)


def route_of(x, weights, config, arith: Arithmetic, input_ids=None):
    """(experts [T, k], route weights [T, k], their error): the router as
    ``arith`` runs it (its logits' matmul in TF32 or float32)."""
    indices, w = ref.route(x, weights, config, input_ids)
    return indices, w, route_weight_error(x, weights, config, indices,
                                          arith.float32_matmul == "tf32")


def block_partial(x, route, kernels: Kernels, config, arith: Arithmetic):
    """(routed outputs [T, k, D], the float32 combine [T, D]) of a block
    holding ``kernels`` on tokens x routed by ``route`` (``route_of``)."""
    indices, w, e_w = route
    routed = _routed(x, indices, kernels, config.swiglu_limit, arith)
    shared = expert_outputs(x, None, kernels, ref.shared_expert_limit(config), arith, "shared")
    return routed, combine(routed, w, e_w, shared, arith)


def expect_moe(x, weights, config, arith: Arithmetic, kernels: Kernels | None = None,
               input_ids=None) -> Expected:
    """What the whole block returns [T, D] on tokens x: routed experts
    weighted by the route, the shared expert, the combine; and how far from
    it a right one may be.  Near-tied router choices are the caller's to
    discard (router_gap / router_margin)."""
    kernels = kernels or weight_kernels(weights)
    _, out = block_partial(x, route_of(x, weights, config, arith, input_ids), kernels, config,
                           arith)
    out = stored(out, arith)
    return Expected(out.c, _finite_bound(out, arith), arith)


def rows_of(kernel: Kernel, start: int, stop: int) -> Kernel:
    """Output rows [start, stop) of ``kernel`` (gate and up: a rank's slice
    of the intermediate dimension), its linear bias with them."""
    s = np.s_[..., start:stop, :]
    return Kernel(kernel.dense[s], kernel.mode, kernel.bits, kernel.group,
                  _pick(kernel.elements, s), _pick(kernel.scales, s), _pick(kernel.biases, s),
                  None if kernel.bias is None else kernel.bias[..., start:stop],
                  kernel.global_scale)


def columns_of(kernel: Kernel, start: int, stop: int, keep_bias: bool) -> Kernel:
    """Contraction columns [start, stop) of ``kernel`` (down: a rank's slice
    of the intermediate dimension, whole quantization groups), its linear
    bias kept only where ``keep_bias`` (one rank adds it)."""
    g = kernel.group or 1
    if start % g or stop % g:
        raise ValueError(f"columns [{start}, {stop}) cut quantization groups of {g}")
    cols, groups = np.s_[..., start:stop], np.s_[..., start // g:stop // g]
    return Kernel(kernel.dense[cols], kernel.mode, kernel.bits, kernel.group,
                  _pick(kernel.elements, cols), _pick(kernel.scales, groups),
                  _pick(kernel.biases, groups), kernel.bias if keep_bias else None,
                  kernel.global_scale)


def rank_kernels(kernels: Kernels, start: int, stop: int, keep_bias: bool) -> Kernels:
    """The kernels one tensor-parallel rank holds: gate and up rows, down
    columns [start, stop) of the intermediate dimension, routed and shared."""
    return Kernels(rows_of(kernels.gate, start, stop), rows_of(kernels.up, start, stop),
                   columns_of(kernels.down, start, stop, keep_bias),
                   rows_of(kernels.shared_gate, start, stop),
                   rows_of(kernels.shared_up, start, stop),
                   columns_of(kernels.shared_down, start, stop, False))


def summed(parts: list[Approx], dtype: str) -> Approx:
    """The ranks' partial outputs added by an all_sum in ``dtype``: N - 1
    additions in any order, each rounded to ``dtype`` (off by at most u
    times a partial sum, itself no larger than sum_r |part_r| plus their
    radii)."""
    c = sum(p.c for p in parts)
    magnitude = sum(np.abs(p.c) + p.radius for p in parts)
    r = sum(p.r for p in parts) + (len(parts) - 1) * UNIT_ROUNDOFF[dtype] * magnitude
    s = np.sqrt(sum(p.s**2 for p in parts))
    return Approx(c, r, s)


def expect_sharded_moe(x, weights, config, arith: Arithmetic, bounds, reduce: str,
                       kernels: Kernels | None = None, input_ids=None) -> Expected:
    """What a tensor-parallel block returns [T, D] after its one all_sum:
    each rank's float32 partial (its slice ``bounds[r]`` = (start, stop) of
    the intermediate dimension, routed and shared; down's linear bias on
    rank 0), rounded to ``reduce`` (the dtype the ranks send), summed in it,
    then stored in the activation dtype.  A sharder that spreads down's
    linear bias over the ranks (bias / N each) rounds it elsewhere: one
    rounding of the rank's terms more in half precision."""
    kernels = kernels or weight_kernels(weights)
    route = route_of(x, weights, config, arith, input_ids)
    indices, w, _ = route
    parts = []
    for r, (start, stop) in enumerate(bounds):
        routed, part = block_partial(x, route, rank_kernels(kernels, start, stop, r == 0),
                                     config, arith)
        if kernels.down.bias is not None and arith.dtype in HALF:
            spread = (np.abs(w)[..., None] * (np.abs(routed.c)
                                              + np.abs(kernels.down.bias[indices]))).sum(1)
            part = Approx(part.c, part.r + UNIT_ROUNDOFF[arith.dtype] * spread, part.s)
        parts.append(part if reduce == "float32" else rounded(part, reduce))
    out = stored(summed(parts, reduce), arith)
    return Expected(out.c, _finite_bound(out, arith), arith)


def _finite_bound(a: Approx, arith: Arithmetic) -> np.ndarray:
    """The bound, with room for values below float32's range coming back as 0."""
    return a.radius + underflow_floor(arith.dtype, 8)


@dataclass(frozen=True)
class Expected:
    """The expected side of a comparison: the value ``want`` a right
    implementation returns and ``bound``, how far from it it may lie."""

    want: np.ndarray
    bound: np.ndarray
    arith: Arithmetic

    def check(self, got) -> Mismatch | None:
        return worst_mismatch(got, self.want, self.bound)

    def take(self, index) -> Expected:
        return Expected(self.want[index], self.bound[index], self.arith)

    def widened(self, factor: float) -> Expected:
        return Expected(self.want, self.bound * factor, self.arith)

    def _ratios(self) -> np.ndarray:
        want = np.abs(np.asarray(self.want, np.float64))
        keep = np.isfinite(want) & (want > 0)
        return np.broadcast_to(self.bound, want.shape)[keep] / want[keep]

    def ratio(self) -> float:
        """Median bound / |want| over the compared elements: the power."""
        ratios = self._ratios()
        return float(np.median(ratios)) if ratios.size else float("inf")

    def smallest_scaling(self) -> float:
        """The smallest relative error of the whole output (y (1 + e)) it rejects."""
        ratios = self._ratios()
        return float(ratios.min()) if ratios.size else float("inf")

    @property
    def weak(self) -> bool:
        return self.ratio() > self.arith.target

    def note(self) -> str:
        """"bound/signal X" (with "weak: " where X misses the target), and
        the smallest scaling of the output it rejects."""
        ratio = self.ratio()
        text = (f"bound/signal {ratio:.2g}, rejects y * (1 + {self.smallest_scaling():.2g})")
        if self.weak:
            from dsv4shard.engine.outcome import Weak

            return Weak(f"weak: {text} (target {self.arith.target:g}, {self.arith.label})")
        return text


@dataclass(frozen=True)
class Mismatch:
    index: tuple[int, ...]
    actual: float
    expected: float
    bound: float
    ratio: float

    def __str__(self):
        return (f"worst element {self.index}: got {self.actual!r}, expected "
                f"{self.expected!r}, |diff| = {abs(self.actual - self.expected):.3e}, "
                f"bound {self.bound:.3e}, ratio {self.ratio:.3g}")


def worst_mismatch(actual, expected, bound) -> Mismatch | None:
    """The element with the largest |actual - expected| / bound, if any
    exceeds its bound (NaN where the other side is finite counts as infinite)."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    bound = np.broadcast_to(np.asarray(bound, np.float64), expected.shape)
    with np.errstate(invalid="ignore", divide="ignore"):
        diff = np.abs(actual - expected)
        ratio = np.where(diff == 0, 0.0, diff / bound)
    both_nan = np.isnan(actual) & np.isnan(expected)
    ratio = np.where(both_nan, 0.0, np.where(np.isnan(ratio), np.inf, ratio))
    if ratio.size == 0 or ratio.max() <= 1.0:
        return None
    index = np.unravel_index(np.argmax(ratio), ratio.shape)
    return Mismatch(tuple(int(i) for i in index), float(actual[index]),
                    float(expected[index]), float(bound[index]), float(ratio[index]))


def within(actual, candidate, bound) -> bool:
    """Whether ``actual`` lies within ``bound`` of ``candidate`` everywhere:
    how a diagnosis names the look-alike a wrong answer matches, with the
    comparison's own bound (TF32-aware where it is), never a fixed rtol."""
    return worst_mismatch(actual, candidate, bound) is None


def first_difference(a, b) -> str | None:
    """For bit-exact comparisons: where two arrays first differ, or None."""
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        return f"shapes differ: {a.shape} vs {b.shape}"
    same = (a == b) | (np.isnan(a) & np.isnan(b)) if a.dtype.kind == "f" else a == b
    if same.all():
        return None
    index = tuple(int(i) for i in np.argwhere(~same)[0])
    return (f"{int((~same).sum())} of {a.size} elements differ; first at {index}: "
            f"{a[index]!r} vs {b[index]!r}")

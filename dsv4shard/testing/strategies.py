"""Every hypothesis strategy of the suite, in one place, each with a label.

Hypothesis draws configurations only (sizes, formats, patterns, a seed);
array values come from a NumPy generator seeded by the drawn seed, so a case
is a small, printable, evaluable value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from hypothesis import strategies as st

from dsv4shard.backend import float16_code_overflow, unsupported
from reference.moe_block import SCORE_FUNCS, MoEConfig, Revision, shared_expert_limit
from reference.quantization import QUANT_FORMATS, QuantFormat

# mlx-lm's SwitchGLU sorts tokens by expert once indices.size reaches this.
SORT_THRESHOLD = 64

# How tokens meet experts.  Score layers: "router" (the router's own choice),
# "one_expert" (a large bias sends every token to the same k experts),
# "mostly_idle" (a bias keeps all but k + 1 experts idle).  Hash layers, whose
# tid2eid table fixes the experts exactly: "all_experts" (every expert used),
# "hash" (a random table).
INDEX_PATTERNS = ("router", "one_expert", "mostly_idle", "all_experts", "hash")
HASH_PATTERNS = ("all_experts", "hash")


def quant_formats(global_scale: bool = True) -> st.SearchStrategy[QuantFormat]:
    """Formats the running backend computes in at least one dtype (a global
    scale only where ``global_scale``); ``backend.unsupported`` says why the
    others are left out, and tests/test_backend_defects.py shows it."""
    formats = [f for f in QUANT_FORMATS if (global_scale or not f.global_scale)
               and (f.global_scale or any(unsupported(f, d) is None for d in DTYPE_NAMES))]
    return st.sampled_from(formats)


DTYPE_NAMES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True)
class QuantCase:
    """A random matrix to quantize: [rows, cols] (or [experts, rows, cols])."""

    fmt: QuantFormat
    shape: tuple[int, ...]
    scale: float  # the matrix's magnitude
    scales_dtype: str  # the dtype MLX stores affine scales/biases in
    seed: int


@st.composite
def quant_cases(draw, global_scale: bool = True) -> QuantCase:
    fmt = draw(quant_formats(global_scale), label="fmt")
    experts = draw(st.sampled_from([(), (1,), (3,)]), label="experts")
    rows = draw(st.integers(1, 8), label="rows")
    groups = draw(st.integers(1, 4), label="groups")
    scale = draw(st.sampled_from([1e-3, 1.0, 37.0]), label="scale")
    dtype = "float32"
    if fmt.mode == "affine":
        dtype = draw(st.sampled_from(["float32", "float16", "bfloat16"]), label="scales_dtype")
    seed = draw(st.integers(0, 2**32 - 1), label="seed")
    return QuantCase(fmt, experts + (rows, groups * fmt.group_size), scale, dtype, seed)


@dataclass(frozen=True)
class MoECase:
    """One drawn configuration of the MoE block and its inputs."""

    config: MoEConfig
    quant: QuantFormat | None  # None: dense float32 experts
    dtype: str  # activation dtype
    n_tokens: int
    pattern: str  # one of INDEX_PATTERNS
    activation_scale: float  # gate/up magnitude; large values cross the clip
    seed: int
    batch_shape: tuple[int, ...] = field(default=())  # () means [T, D] inputs
    linear_bias: bool = False  # routed experts carry SwitchLinear biases

    @property
    def token_shape(self) -> tuple[int, ...]:
        return self.batch_shape or (self.n_tokens,)


def token_counts(top_k: int, side: str) -> st.SearchStrategy[int]:
    """Token counts putting indices.size = T * k below, at or above the sort
    threshold."""
    if side == "below":
        return st.integers(1, max(1, (SORT_THRESHOLD - 1) // top_k))
    if side == "at" and SORT_THRESHOLD % top_k == 0:
        return st.just(SORT_THRESHOLD // top_k)
    low = math.ceil((SORT_THRESHOLD + 1) / top_k)
    return st.integers(low, low + 6)


@st.composite
def moe_configs(draw, *, sizes=(32, 64, 128), quant: QuantFormat | None = None,
                max_experts: int = 64, inter_sizes=None) -> MoEConfig:
    group = quant.group_size if quant else 1
    allowed = [s for s in sizes if s % group == 0] or [max(sizes[-1], group)]
    hidden = draw(st.sampled_from(allowed), label="hidden_size")
    inter = draw(st.sampled_from(inter_sizes or allowed), label="intermediate_size")
    n_experts = draw(st.integers(1, max_experts), label="n_experts")
    # Any k up to E, though mostly the small k real models use.
    top_k = draw(st.one_of(st.integers(1, min(n_experts, 8)), st.integers(1, n_experts)),
                 label="top_k")
    limit = draw(st.sampled_from([10.0, 10.0, 1.0, 0.0, -1.0]), label="swiglu_limit")
    score_func = draw(st.sampled_from(SCORE_FUNCS), label="score_func")
    revision = draw(st.sampled_from(list(Revision)), label="revision")
    route_scale = draw(st.sampled_from([1.0, 1.5, 2.5]), label="route_scale")
    return MoEConfig(hidden, inter, n_experts, top_k, limit, route_scale, score_func,
                     revision=revision)


def dtypes_for(quant: QuantFormat | None) -> st.SearchStrategy[str]:
    """float32, float16 and bfloat16, less those the running backend cannot
    compute (``dsv4shard.backend.unsupported`` says why; the tests of that
    module show each such defect)."""
    supported = [d for d in DTYPE_NAMES if unsupported(quant, d) is None]
    # A test that asks for an unsupported format on purpose (to show the
    # defect, tests/test_backend_defects.py) still gets cases.
    return st.sampled_from(supported or list(DTYPE_NAMES))


@st.composite
def moe_cases(draw, *, quantized: bool | None = None, global_scale: bool = False,
              patterns=INDEX_PATTERNS, max_experts: int = 64, formats=None,
              linear_bias: bool = True, inter_sizes=None) -> MoECase:
    """A whole MoE case.  ``quantized``: None draws dense or quantized;
    ``formats`` restricts the quantization formats drawn; ``linear_bias``
    lets the routed experts carry linear biases (drawn)."""
    if quantized is None:
        quantized = formats is not None or draw(st.booleans(), label="quantized")
    formats_drawn = st.sampled_from(formats) if formats else quant_formats(global_scale)
    quant = draw(formats_drawn, label="quant") if quantized else None
    config = draw(moe_configs(quant=quant, max_experts=max_experts, inter_sizes=inter_sizes),
                  label="config")
    pattern = draw(st.sampled_from(patterns), label="pattern")
    if pattern in HASH_PATTERNS:
        config = MoEConfig(**{**config.__dict__, "hash_routing": True, "vocab_size": 97})
    side = draw(st.sampled_from(["below", "at", "above"]), label="sort_side")
    n_tokens = draw(token_counts(config.top_k, side), label="n_tokens")
    batch_shape = ()
    if n_tokens % 2 == 0 and draw(st.booleans(), label="batched"):
        batch_shape = (2, n_tokens // 2)
    dtype = draw(dtypes_for(quant), label="dtype")
    scales = [1.0, 30.0]
    if shared_expert_limit(config) <= 0 and float16_code_overflow(quant, dtype):
        # An unclipped expert (limit <= 0, or the first release's shared
        # expert) with large activations would hit a backend defect
        # (backend.py); the shared expert's clip is never looser than L.
        scales = [1.0]
    return MoECase(
        config=config,
        quant=quant,
        dtype=dtype,
        n_tokens=n_tokens,
        pattern=pattern,
        activation_scale=draw(st.sampled_from(scales), label="activation_scale"),
        seed=draw(st.integers(0, 2**32 - 1), label="seed"),
        batch_shape=batch_shape,
        linear_bias=draw(st.booleans(), label="linear_bias") if linear_bias else False,
    )


RANK_COUNTS = (1, 2, 3, 4, 8)
REDUCTIONS = ("float32", "activation")  # the dtype of the cross-rank sum


@dataclass(frozen=True)
class ShardCase:
    """A MoE case split over ``ranks`` tensor-parallel ranks."""

    moe: MoECase
    ranks: int
    reduce: str  # one of REDUCTIONS


@st.composite
def shard_cases(draw, ranks: int | None = None, quantized: bool | None = None,
                global_scale: bool = False, formats=None) -> ShardCase:
    """A case whose intermediate size (and its quantization groups) divides
    evenly over the drawn rank count (or the given one)."""
    n = ranks or draw(st.sampled_from(RANK_COUNTS), label="ranks")
    if quantized is None:
        quantized = formats is not None or draw(st.booleans(), label="quantized")
    formats_drawn = st.sampled_from(formats) if formats else quant_formats(global_scale)
    fmt = draw(formats_drawn, label="quant") if quantized else None
    unit = (fmt.group_size if fmt else 8) * n
    inter = unit * draw(st.integers(1, max(1, 256 // unit)), label="intermediate_units")
    case = draw(moe_cases(quantized=quantized, formats=[fmt] if fmt else None,
                          inter_sizes=(inter,), max_experts=32), label="moe")
    return ShardCase(case, n, draw(st.sampled_from(REDUCTIONS), label="reduce"))


@st.composite
def clip_cases(draw):
    """A clip limit (positive, zero or negative) and a value strictly inside it."""
    from dsv4shard.testing.properties.reference_edges import ClipCase

    limit = draw(st.sampled_from([10.0, 7.0, 1.0, 0.5, 0.0, -1.0]), label="limit")
    bound = limit if limit > 0 else 10.0
    inside = draw(st.floats(-0.99 * bound, 0.99 * bound, allow_nan=False), label="inside")
    return ClipCase(limit, inside)


def router_cases() -> st.SearchStrategy[MoECase]:
    """Dense cases for the reference's own router properties (no MLX)."""
    return moe_cases(quantized=False)


# --- fusion ---

from dataclasses import replace as _replace  # noqa: E402


@dataclass(frozen=True)
class FusionCase:
    """A case for the fused gate+up properties: the block's own case, and how
    many ranks shard the block before it is fused (1: unsharded)."""

    moe: MoECase
    ranks: int = 1


FUSION_MAX_EXPERTS = 16  # enough for every index pattern, and fast
NVFP4 = QuantFormat("nvfp4", 16, 4)
NVFP4_GLOBAL_SCALE = QuantFormat("nvfp4", 16, 4, global_scale=True)


@st.composite
def fusion_cases(draw, *, quantized: bool | None = None, global_scale: bool | None = False,
                 linear_bias: bool = True, ranks=(1,)) -> FusionCase:
    """A block to fuse (small: hidden and intermediate 32..128, at most 16
    experts, fewer than 80 tokens, both sides of the sort threshold, [T, D]
    or [B, L, D]), in a format the backend runs, or (``global_scale``) nvfp4
    with a global scale, which tests that run its kernel skip where the
    backend has none.  ``global_scale``: False never draws it, True always,
    None sometimes.  ``ranks``: rank counts to shard over before fusing."""
    n = draw(st.sampled_from(ranks), label="ranks")
    with_scale = (draw(st.booleans(), label="global_scale") if global_scale is None
                  else global_scale)
    if with_scale:
        quantized = True
    formats = [NVFP4] if with_scale else None
    if quantized is None:
        quantized = draw(st.booleans(), label="quantized")
    if quantized and formats is None:
        formats = [f for f in QUANT_FORMATS if not f.global_scale]
    fmt = draw(st.sampled_from(formats), label="quant") if quantized else None
    unit = (fmt.group_size if fmt else 1) * n
    inters = tuple(s for s in (32, 64, 128) if s % unit == 0) or (unit,)
    moe = draw(moe_cases(quantized=quantized, formats=[fmt] if fmt else None,
                         max_experts=FUSION_MAX_EXPERTS, linear_bias=linear_bias,
                         inter_sizes=inters), label="moe")
    if with_scale:
        # Drawn as plain nvfp4 (whose dtypes every backend runs), then given
        # the global scale: the case must exist even where its kernel cannot run.
        moe = _replace(moe, quant=NVFP4_GLOBAL_SCALE,
                      dtype=draw(st.sampled_from(["float32", "float16", "bfloat16"]),
                                 label="dtype"))
    return FusionCase(moe, n)


def sharded_fusion_cases(**kwargs) -> st.SearchStrategy[FusionCase]:
    """Fusion cases sharded over 2 or 4 ranks first."""
    return fusion_cases(ranks=(2, 4), **kwargs)


def global_scale_shard_cases(ranks: int | None = None) -> st.SearchStrategy[ShardCase]:
    """Shard cases in nvfp4 with a per-expert global scale, on every backend:
    drawn as plain nvfp4 (whose dtypes every backend runs), then given the
    global scale.  Properties that run its kernels skip where the backend
    has none; structural ones run everywhere."""
    return shard_cases(ranks=ranks, quantized=True, formats=[NVFP4]).map(
        lambda c: _replace(c, moe=_replace(c.moe, quant=NVFP4_GLOBAL_SCALE)))


# --- variants ---


@dataclass(frozen=True)
class VariantCase:
    """What a variant's property draws: the tiny block's expert count and k
    (each property may pin k, e.g. k = 1 or k = E), the tokens, how far the
    activations reach past the clip, and the seed of every array."""

    seed: int
    n_experts: int
    top_k: int
    n_tokens: int
    activation_scale: float
    batched: bool = False
    routed_quant: QuantFormat = QuantFormat("mxfp4", 32, 4)  # as checkpoints store experts


# The routed experts' formats of DeepSeek-V4 checkpoints for MLX: mxfp4
# (the published conversion), affine 4/6/8-bit (mlx-community conversions;
# groups of 32 here, as the tiny blocks' intermediate size is 32).
CHECKPOINT_FORMATS = (QuantFormat("mxfp4", 32, 4), QuantFormat("affine", 32, 4),
                      QuantFormat("affine", 32, 6), QuantFormat("affine", 32, 8))

# Token counts on both sides of SwitchGLU's sort threshold (T * k >= 64 at
# 40 tokens for every k >= 2).
VARIANT_TOKENS = (5, 12, 40)


@st.composite
def variant_cases(draw) -> VariantCase:
    n_experts = draw(st.sampled_from([8, 16]), label="n_experts")
    top_k = draw(st.sampled_from([2, 6]), label="top_k")
    return VariantCase(
        seed=draw(st.integers(0, 2**16 - 1), label="seed"),
        n_experts=n_experts,
        top_k=top_k,
        n_tokens=draw(st.sampled_from(VARIANT_TOKENS), label="n_tokens"),
        activation_scale=draw(st.sampled_from([1.0, 30.0, 100.0]), label="activation_scale"),
        batched=draw(st.booleans(), label="batched"),
        routed_quant=draw(st.sampled_from([f for f in CHECKPOINT_FORMATS
                                           if unsupported(f, "bfloat16") is None]
                                          or list(CHECKPOINT_FORMATS)), label="routed_quant"),
    )


def model_cases():
    """A tiny deepseek_v41 model (2 or 3 layers) and a prompt length."""
    from dsv4shard.testing.properties.end_to_end import ModelCase

    return st.builds(ModelCase, seed=st.integers(0, 2**16), layers=st.integers(2, 3),
                     n_tokens=st.integers(1, 6))

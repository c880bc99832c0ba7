"""Every hypothesis strategy of the suite, in one place, each with a label.

Hypothesis draws configurations only (sizes, formats, patterns, a seed);
array values come from a NumPy generator seeded by the drawn seed, so a case
is a small, printable, evaluable value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from hypothesis import strategies as st

from reference.moe_block import SCORE_FUNCS, MoEConfig, Revision
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
    formats = [f for f in QUANT_FORMATS if global_scale or not f.global_scale]
    return st.sampled_from(formats)


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
                max_experts: int = 64) -> MoEConfig:
    group = quant.group_size if quant else 1
    allowed = [s for s in sizes if s % group == 0] or [max(sizes[-1], group)]
    hidden = draw(st.sampled_from(allowed), label="hidden_size")
    inter = draw(st.sampled_from(allowed), label="intermediate_size")
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
    from dsv4shard.backend import unsupported

    return st.sampled_from([d for d in ("float32", "float16", "bfloat16")
                            if unsupported(quant, d) is None])


@st.composite
def moe_cases(draw, *, quantized: bool | None = None, global_scale: bool = False,
              patterns=INDEX_PATTERNS, max_experts: int = 64, formats=None,
              linear_bias: bool = True) -> MoECase:
    """A whole MoE case.  ``quantized``: None draws dense or quantized;
    ``formats`` restricts the quantization formats drawn; ``linear_bias``
    lets the routed experts carry linear biases (drawn)."""
    if quantized is None:
        quantized = formats is not None or draw(st.booleans(), label="quantized")
    formats_drawn = st.sampled_from(formats) if formats else quant_formats(global_scale)
    quant = draw(formats_drawn, label="quant") if quantized else None
    config = draw(moe_configs(quant=quant, max_experts=max_experts), label="config")
    pattern = draw(st.sampled_from(patterns), label="pattern")
    if pattern in HASH_PATTERNS:
        config = MoEConfig(**{**config.__dict__, "hash_routing": True, "vocab_size": 97})
    side = draw(st.sampled_from(["below", "at", "above"]), label="sort_side")
    n_tokens = draw(token_counts(config.top_k, side), label="n_tokens")
    batch_shape = ()
    if n_tokens % 2 == 0 and draw(st.booleans(), label="batched"):
        batch_shape = (2, n_tokens // 2)
    return MoECase(
        config=config,
        quant=quant,
        dtype=draw(dtypes_for(quant), label="dtype"),
        n_tokens=n_tokens,
        pattern=pattern,
        activation_scale=draw(st.sampled_from([1.0, 30.0]), label="activation_scale"),
        seed=draw(st.integers(0, 2**32 - 1), label="seed"),
        batch_shape=batch_shape,
        linear_bias=draw(st.booleans(), label="linear_bias") if linear_bias else False,
    )


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


@dataclass(frozen=True)
class FusionCase:
    """A case for the fused gate+up properties: the block's own case, whether
    the switch projections carry a linear bias, and how many ranks shard the
    block before it is fused (1: unsharded)."""

    moe: MoECase
    linear_bias: bool = False
    ranks: int = 1


FUSION_SIZES = (32, 64, 128)  # hidden and intermediate sizes: small, so fast
FUSION_MAX_EXPERTS = 16


def fusion_formats(quantized: bool | None, global_scale: bool | None):
    """Formats to fuse: None is dense.  ``global_scale``: False leaves out
    nvfp4 with a global scale, True draws only it, None draws either."""
    quants = [f for f in QUANT_FORMATS
              if global_scale is None or f.global_scale == global_scale]
    if quantized is None and global_scale is not True:
        return st.one_of(st.just(None), st.sampled_from(quants))
    if quantized is False:
        return st.just(None)
    return st.sampled_from(quants)


def runnable_dtype(quant: QuantFormat | None, dtype: str) -> str:
    """``dtype``, or float32 where this backend cannot run ``quant`` in it (a
    global scale it cannot run at all is left for the test to skip)."""
    from dsv4shard import backend

    if quant is not None and quant.global_scale:
        return dtype
    return dtype if backend.unsupported(quant, dtype) is None else "float32"


@st.composite
def fusion_cases(draw, *, quantized: bool | None = None, global_scale: bool | None = False,
                 linear_bias: bool | None = False, ranks=(1,)) -> FusionCase:
    """A block to fuse, its tokens (both sides of the sort threshold; [T, D] or
    [B, L, D]) and index pattern.  ``ranks``: rank counts to shard over
    first; the intermediate size is then drawn divisible by ranks x group."""
    quant = draw(fusion_formats(quantized, global_scale), label="quant")
    n_ranks = draw(st.sampled_from(ranks), label="ranks")
    config = draw(moe_configs(sizes=FUSION_SIZES, quant=quant,
                              max_experts=FUSION_MAX_EXPERTS), label="config")
    step = (quant.group_size if quant else 1) * n_ranks
    inters = [s for s in FUSION_SIZES if s % step == 0] or [step]
    inter = draw(st.sampled_from(inters), label="intermediate_size")
    pattern = draw(st.sampled_from(INDEX_PATTERNS), label="pattern")
    changes = {"intermediate_size": inter}
    if pattern in HASH_PATTERNS:
        changes.update(hash_routing=True, vocab_size=97)
    config = MoEConfig(**{**config.__dict__, **changes})
    side = draw(st.sampled_from(["below", "at", "above"]), label="sort_side")
    n_tokens = draw(token_counts(config.top_k, side), label="n_tokens")
    batch_shape = ()
    if n_tokens % 2 == 0 and draw(st.booleans(), label="batched"):
        batch_shape = (2, n_tokens // 2)
    dtype = runnable_dtype(quant, draw(dtypes_for(quant), label="dtype"))
    moe = MoECase(
        config=config,
        quant=quant,
        dtype=dtype,
        n_tokens=n_tokens,
        pattern=pattern,
        activation_scale=draw(st.sampled_from([1.0, 30.0]), label="activation_scale"),
        seed=draw(st.integers(0, 2**32 - 1), label="seed"),
        batch_shape=batch_shape,
    )
    bias = draw(st.booleans(), label="linear_bias") if linear_bias is None else linear_bias
    return FusionCase(moe, bias, n_ranks)


def sharded_fusion_cases(**kwargs) -> st.SearchStrategy[FusionCase]:
    """Fusion cases sharded over 2 or 4 ranks first."""
    return fusion_cases(ranks=(2, 4), **kwargs)

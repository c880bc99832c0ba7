"""Every hypothesis strategy of the suite, in one place, each with a label.

Hypothesis draws configurations only (sizes, formats, patterns, a seed);
array values come from a NumPy generator seeded by the drawn seed, so a case
is a small, printable, evaluable value.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from hypothesis import assume
from hypothesis import strategies as st

from dsv4shard.backend import (
    compiles_kernels,
    cuts_contraction,
    cuts_sorting,
    float16_code_overflow,
    unsupported,
)
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


DTYPE_NAMES = ("float32", "float16", "bfloat16")

# The formats, each in one activation dtype, that the block's cases keep to
# on a backend compiling every kernel on first use (backend.compiles_kernels:
# MLX's CUDA build, ~30 s a kernel).  Every format in every dtype would be
# some 60 (format, dtype) pairs, each a few kernels (row tiles, paths): more
# compiling than a run has time for, and a cut run leaves the next to
# compile again.  This set is 14 pairs: DeepSeek-V4's checkpoint formats
# (the variants' bfloat16 among them), and every mode, bits value and group
# of MLX's, each dtype drawn with affine and a float format.  Group 128 is
# here for the backends that run it (MLX's CUDA build does not:
# backend.py's cuda-affine-group-128).  Elsewhere (the CPU build, Metal)
# every pair is drawn.
KERNEL_SET: dict[QuantFormat, str] = {
    QuantFormat("mxfp4", 32, 4): "bfloat16",
    QuantFormat("affine", 32, 4): "bfloat16",
    QuantFormat("affine", 32, 6): "bfloat16",
    QuantFormat("affine", 32, 8): "bfloat16",
    QuantFormat("affine", 64, 4): "float16",
    QuantFormat("affine", 64, 8): "float16",
    QuantFormat("affine", 64, 6): "float32",
    QuantFormat("affine", 32, 2): "float16",
    QuantFormat("affine", 64, 3): "float32",
    QuantFormat("affine", 32, 5): "float32",
    QuantFormat("affine", 128, 4): "float32",
    QuantFormat("mxfp8", 32, 8): "float32",
    QuantFormat("nvfp4", 16, 4): "float16",
    QuantFormat("nvfp4", 16, 4, global_scale=True): "bfloat16",
}


def kernel_formats(formats) -> list[QuantFormat]:
    """``formats``, less those outside :data:`KERNEL_SET` on a backend that
    compiles its kernels (all of them elsewhere, or where none is in it: a
    test that asks for one format on purpose gets it)."""
    formats = list(formats)
    if not compiles_kernels():
        return formats
    return [f for f in formats if f in KERNEL_SET] or formats


def kernel_dtype(quant: QuantFormat | None) -> str | None:
    """The one activation dtype :data:`KERNEL_SET` draws ``quant`` in on a
    backend that compiles its kernels; None elsewhere, or for a format
    outside the set."""
    return KERNEL_SET.get(quant) if compiles_kernels() else None


def quant_formats(global_scale: bool = True) -> st.SearchStrategy[QuantFormat]:
    """Formats the running backend computes in at least one dtype (a global
    scale only where ``global_scale``); ``backend.unsupported`` says why the
    others are left out, and tests/test_backend_defects.py shows it."""
    formats = [f for f in QUANT_FORMATS if (global_scale or not f.global_scale)
               and (f.global_scale or any(unsupported(f, d) is None for d in DTYPE_NAMES))]
    return st.sampled_from(kernel_formats(formats))


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


def unsorted_tokens(top_k: int) -> int:
    """The most tokens SwitchGLU takes at ``top_k`` without sorting them (T * k
    below the sort threshold); one at least, which sorts once k reaches it."""
    return max(1, (SORT_THRESHOLD - 1) // top_k)


def token_counts(top_k: int, side: str) -> st.SearchStrategy[int]:
    """Token counts putting indices.size = T * k below, at or above the sort
    threshold."""
    if side == "below":
        return st.integers(1, unsorted_tokens(top_k))
    if side == "at" and SORT_THRESHOLD % top_k == 0:
        return st.just(SORT_THRESHOLD // top_k)
    low = math.ceil((SORT_THRESHOLD + 1) / top_k)
    return st.integers(low, low + 6)


@st.composite
def moe_configs(draw, *, sizes=(32, 64, 128), quant: QuantFormat | None = None,
                max_experts: int = 64, inter_sizes=None) -> MoEConfig:
    group = quant.group_size if quant else 1
    # Sizes a backend defect cuts (backend.cuts_contraction: a kernel wrong
    # over that contraction in this format) are left out; the format stays.
    fallback = max(sizes[-1], group)
    allowed = ([s for s in sizes if s % group == 0 and not cuts_contraction(quant, s)]
               or [fallback if not cuts_contraction(quant, fallback) else 2 * fallback])
    hidden = draw(st.sampled_from(allowed), label="hidden_size")
    inter = draw(st.sampled_from(inter_sizes or allowed), label="intermediate_size")
    assume(not cuts_contraction(quant, inter))
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
    pinned = kernel_dtype(quant)
    if pinned and (pinned in supported or not supported):
        supported = [pinned]  # the kernel set's dtype (a defect's, if none runs)
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
    formats_drawn = (st.sampled_from(kernel_formats(formats)) if formats
                     else quant_formats(global_scale))
    quant = draw(formats_drawn, label="quant") if quantized else None
    config = draw(moe_configs(quant=quant, max_experts=max_experts, inter_sizes=inter_sizes),
                  label="config")
    pattern = draw(st.sampled_from(patterns), label="pattern")
    if pattern in HASH_PATTERNS:
        config = MoEConfig(**{**config.__dict__, "hash_routing": True, "vocab_size": 97})
    # Where a backend defect makes the sorted path wrong for these experts
    # (backend.cuts_sorting), they are judged on the unsorted path only.
    sides = ["below"] if cuts_sorting(quant) else ["below", "at", "above"]
    assume(sides != ["below"] or config.top_k < SORT_THRESHOLD)  # one token of k = 64 sorts
    side = draw(st.sampled_from(sides), label="sort_side")
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
    """A MoE case split over ``ranks`` tensor-parallel ranks: evenly, or by
    ``split`` (each rank's share of the intermediate dimension, in units of
    quantization groups; the sharder is called with ``weights=split``)."""

    moe: MoECase
    ranks: int
    reduce: str  # one of REDUCTIONS
    split: tuple[int, ...] | None = None  # None: an even split

    @property
    def shares(self) -> tuple[float, ...]:
        """Each rank's fraction of the intermediate dimension."""
        if self.split is None:
            return (1.0 / self.ranks,) * self.ranks
        total = sum(self.split)
        return tuple(w / total for w in self.split)


def shard_unit(fmt: QuantFormat | None) -> int:
    """The rows a split is counted in: a quantization group (8 rows when dense)."""
    return fmt.group_size if fmt else 8


@st.composite
def splits(draw, ranks: int, max_units: int) -> tuple[tuple[int, ...] | None, int]:
    """(split, units): an even split (None) or a partition of ``units``
    groups over the ranks covering each once: a ratio such as 3:5, or one
    rank holding a single group.  ``units`` is the intermediate size in
    groups."""
    kind = draw(st.sampled_from(["even", "ratio", "single"]), label="split_kind")
    if kind == "ratio":
        ratio = ((3, 5) if ranks == 2 else
                 tuple(draw(st.lists(st.integers(1, 5), min_size=ranks, max_size=ranks),
                            label="ratio")))
        if len(set(ratio)) > 1 and sum(ratio) <= max_units:
            m = draw(st.integers(1, max(1, max_units // sum(ratio))), label="ratio_units")
            return tuple(m * w for w in ratio), m * sum(ratio)
    if kind == "single" and ranks >= 2 and 1 + (ranks - 1) * 2 <= max_units:
        alone = draw(st.integers(0, ranks - 1), label="single_rank")
        each = draw(st.integers(2, max(2, (max_units - 1) // (ranks - 1))), label="others_units")
        split = tuple(1 if r == alone else each for r in range(ranks))
        return split, sum(split)
    units = ranks * draw(st.integers(1, max(1, max_units // ranks)), label="intermediate_units")
    return None, units


@st.composite
def shard_cases(draw, ranks: int | None = None, quantized: bool | None = None,
                global_scale: bool = False, formats=None, linear_bias: bool = True,
                uneven: bool = False) -> ShardCase:
    """A case whose intermediate size (and its quantization groups) divides
    evenly over the drawn rank count (or the given one); with ``uneven``, a
    split drawn by :func:`splits` (even, a ratio, one rank holding a single
    group) instead.  ``linear_bias``: may draw linear biases."""
    if quantized is None:
        quantized = formats is not None or draw(st.booleans(), label="quantized")
    formats_drawn = (st.sampled_from(kernel_formats(formats)) if formats
                     else quant_formats(global_scale))
    fmt = draw(formats_drawn, label="quant") if quantized else None
    unit = shard_unit(fmt)
    # Drawn rank counts keep the intermediate size within 256 (a given one
    # may need more: N whole groups).
    n = ranks or draw(st.sampled_from([r for r in RANK_COUNTS if r * unit <= 256]),
                      label="ranks")
    max_units = max(n, 256 // unit)
    split = None
    # Each rank multiplies its share of the intermediate size as a contraction
    # (the shared expert's down projection): shares a backend defect cuts
    # (backend.cuts_contraction) are left out, as moe_configs leaves them out
    # of the whole size.
    if uneven:
        split, units = draw(splits(n, max_units), label="split")
        shares = split or (units // n,) * n
        assume(not any(cuts_contraction(fmt, unit * u) for u in shares))
        inter = unit * units
    else:
        step = unit * n
        top = max(1, 256 // step)
        allowed = [m for m in range(1, top + 1) if not cuts_contraction(fmt, unit * m)]
        # Where nothing is cut, the draw is integers(1, top) as on any backend.
        units = (st.integers(1, top) if len(allowed) == top
                 else st.sampled_from(allowed or [2]))  # two groups a rank: never cut
        inter = step * draw(units, label="intermediate_units")
    case = draw(moe_cases(quantized=quantized, formats=[fmt] if fmt else None,
                          inter_sizes=(inter,), max_experts=32, linear_bias=linear_bias),
                label="moe")
    return ShardCase(case, n, draw(st.sampled_from(REDUCTIONS), label="reduce"), split)


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
                 linear_bias: bool = True, ranks=(1,), formats=None) -> FusionCase:
    """A block to fuse (small: hidden and intermediate 32..128, at most 16
    experts, fewer than 80 tokens, both sides of the sort threshold, [T, D]
    or [B, L, D]), in a format the backend runs, or (``global_scale``) nvfp4
    with a global scale, which tests that run its kernel skip where the
    backend has none.  ``global_scale``: False never draws it, True always,
    None sometimes.  ``ranks``: rank counts to shard over before fusing;
    ``formats``: the quantization formats drawn (default: every one)."""
    n = draw(st.sampled_from(ranks), label="ranks")
    with_scale = (draw(st.booleans(), label="global_scale") if global_scale is None
                  else global_scale)
    if with_scale:
        quantized = True
    formats = [NVFP4] if with_scale else (list(formats) if formats else None)
    if quantized is None:
        quantized = draw(st.booleans(), label="quantized")
    if quantized and formats is None:
        formats = [f for f in QUANT_FORMATS if not f.global_scale]
    fmt = draw(st.sampled_from(kernel_formats(formats)), label="quant") if quantized else None
    unit = (fmt.group_size if fmt else 1) * n
    inters = tuple(s for s in (32, 64, 128) if s % unit == 0 and not cuts_contraction(fmt, s)
                   ) or (max(unit, 128),)
    moe = draw(moe_cases(quantized=quantized, formats=[fmt] if fmt else None,
                         max_experts=FUSION_MAX_EXPERTS, linear_bias=linear_bias,
                         inter_sizes=inters), label="moe")
    if with_scale:
        # Drawn as plain nvfp4 (whose dtypes every backend runs), then given
        # the global scale: the case must exist even where its kernel cannot run.
        pinned = kernel_dtype(NVFP4_GLOBAL_SCALE)
        dtypes = [pinned] if pinned else list(DTYPE_NAMES)
        moe = _replace(moe, quant=NVFP4_GLOBAL_SCALE,
                      dtype=draw(st.sampled_from(dtypes), label="dtype"))
    return FusionCase(moe, n)


def sharded_fusion_cases(**kwargs) -> st.SearchStrategy[FusionCase]:
    """Fusion cases sharded over 2 or 4 ranks first."""
    return fusion_cases(ranks=(2, 4), **kwargs)


def global_scale_shard_cases(ranks: int | None = None) -> st.SearchStrategy[ShardCase]:
    """Shard cases in nvfp4 with a per-expert global scale, on every backend:
    drawn as plain nvfp4 (whose dtypes every backend runs), then given the
    global scale.  Properties that run its kernels skip where the backend
    has none; structural ones run everywhere."""
    pinned = kernel_dtype(NVFP4_GLOBAL_SCALE)
    return shard_cases(ranks=ranks, quantized=True, formats=[NVFP4]).map(
        lambda c: _replace(c, moe=_replace(c.moe, quant=NVFP4_GLOBAL_SCALE,
                                           dtype=pinned or c.moe.dtype)))


# --- DeepSeek-V4 scope ---
#
# A third-party installer or sharder is judged first on what DeepSeek-V4's
# checkpoints hold (SPEC section 7): routed experts in mxfp4 (group 32),
# affine 4, 6 or 8 bits (group 32 or 64), or dense; no linear biases; no
# nvfp4 global scale; float32, float16 or bfloat16 activations.  Everything
# else (linear biases, other formats and groups, a global scale, uneven
# splits) is drawn by properties of their own, named ``*_extended``, and an
# implementation may decline it by raising NotImplementedError.

V4_FORMATS = (QuantFormat("mxfp4", 32, 4),) + tuple(
    QuantFormat("affine", group, bits) for group in (32, 64) for bits in (4, 6, 8))
EXTENDED_FORMATS = tuple(f for f in QUANT_FORMATS if f not in V4_FORMATS)


def describe_format(fmt: QuantFormat | None) -> str:
    if fmt is None:
        return "dense"
    bits = f" {fmt.bits}-bit" if fmt.mode == "affine" else ""
    text = f"{fmt.mode}{bits} group {fmt.group_size}"
    return text + (" with a global scale" if fmt.global_scale else "")


def extended_features(case) -> list[str]:
    """What puts ``case`` (a MoE, fusion or shard case) beyond DeepSeek-V4's
    own configurations; empty when it is one of them (declining it fails)."""
    moe = getattr(case, "moe", case)
    found = []
    if moe.quant is not None and moe.quant.global_scale:
        found.append("an nvfp4 global scale")
    elif moe.quant is not None and moe.quant not in V4_FORMATS:
        found.append(f"routed experts in {describe_format(moe.quant)}")
    if moe.linear_bias:
        found.append("linear biases on the routed experts")
    split = getattr(case, "split", None)
    if split is not None and len(set(split)) > 1:
        found.append(f"an uneven split {':'.join(map(str, split))}")
    return found


def describe_case(case) -> str:
    """The configuration an implementation sees: format, dtype, biases, split."""
    moe = getattr(case, "moe", case)
    parts = [f"routed experts {describe_format(moe.quant)}", moe.dtype]
    if moe.linear_bias:
        parts.append("linear biases")
    ranks = getattr(case, "ranks", 1)
    if ranks > 1:
        split = getattr(case, "split", None)
        parts.append(f"{ranks} ranks" + (f" split {':'.join(map(str, split))}" if split else ""))
    return ", ".join(parts)


def runs_global_scale() -> bool:
    """Whether this backend's gather_qmm takes an nvfp4 global scale."""
    return unsupported(NVFP4_GLOBAL_SCALE, "float32") is None


def v4_fusion_cases(*, dense: bool = False, ranks=(1,)) -> st.SearchStrategy[FusionCase]:
    """Fusion cases of DeepSeek-V4's own configurations: quantized in a
    checkpoint format (or, with ``dense``, dense float32 experts), no linear
    biases, no global scale."""
    if dense:
        return fusion_cases(quantized=False, global_scale=False, linear_bias=False, ranks=ranks)
    return fusion_cases(quantized=True, global_scale=False, linear_bias=False, ranks=ranks,
                        formats=V4_FORMATS)


def v4_sharded_fusion_cases() -> st.SearchStrategy[FusionCase]:
    return v4_fusion_cases(ranks=(2, 4))


@st.composite
def extended_fusion_cases(draw, global_scale: bool | None = None) -> FusionCase:
    """Fusion cases beyond DeepSeek-V4's configurations, each with at least
    one of: linear biases, a format of no V4 checkpoint (other bits, group
    128, mxfp8, nvfp4), an nvfp4 global scale.  ``global_scale``: True
    draws it on every backend (for properties that run no kernel), None only
    where this backend's kernels take it, False never."""
    features = ["linear bias", "format"]
    if global_scale or (global_scale is None and runs_global_scale()):
        features.append("global scale")
    feature = draw(st.sampled_from(features), label="extended")
    if feature == "global scale":
        case = draw(fusion_cases(global_scale=True), label="case")
        if global_scale is None:  # its kernels run: a dtype they run in
            case = _replace(case, moe=_replace(case.moe, dtype=draw(
                dtypes_for(NVFP4_GLOBAL_SCALE), label="dtype")))
        return case
    if feature == "format":
        return draw(fusion_cases(quantized=True, global_scale=False,
                                 formats=[f for f in EXTENDED_FORMATS if not f.global_scale]),
                    label="case")
    # Quantized first (what a failure shrinks to): dense experts have a
    # property of their own, fused_matches_unfused_dense.
    quantized = draw(st.sampled_from([True, False]), label="quantized")
    case = draw(fusion_cases(quantized=quantized, global_scale=False), label="case")
    return _replace(case, moe=_replace(case.moe, linear_bias=True))


def v4_shard_cases(ranks: int | None = None, uneven: bool = True) -> st.SearchStrategy[ShardCase]:
    """Shard cases of DeepSeek-V4's configurations (checkpoint formats or
    dense, no linear biases), evenly or (``uneven``) unevenly split."""
    return st.one_of(
        shard_cases(ranks=ranks, quantized=True, formats=V4_FORMATS, linear_bias=False,
                    uneven=uneven),
        shard_cases(ranks=ranks, quantized=False, linear_bias=False, uneven=uneven))


@st.composite
def extended_shard_cases(draw, ranks: int | None = None) -> ShardCase:
    """Shard cases beyond DeepSeek-V4's configurations: linear biases, or a
    format of no V4 checkpoint (no global scale: ``global_scale_shard_cases``)."""
    if draw(st.booleans(), label="linear_bias"):
        case = draw(shard_cases(ranks=ranks, uneven=True), label="case")
        return _replace(case, moe=_replace(case.moe, linear_bias=True))
    return draw(shard_cases(ranks=ranks, quantized=True, uneven=True,
                            formats=[f for f in EXTENDED_FORMATS if not f.global_scale]),
                label="case")


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


def bfloat16_cases(**kwargs) -> st.SearchStrategy[MoECase]:
    """MoE cases run in bfloat16, where a bug of that dtype alone lives:
    quantized (MLX's CPU build runs no dense bfloat16), drawn as any case
    of ``moe_cases`` and then given bfloat16 activations."""
    if compiles_kernels() and "formats" not in kwargs:
        kwargs["formats"] = [f for f, d in KERNEL_SET.items()
                             if d == "bfloat16" and not f.global_scale]
    return moe_cases(quantized=True, **kwargs).filter(
        lambda c: unsupported(c.quant, "bfloat16") is None).map(
        lambda c: _replace(c, dtype="bfloat16"))

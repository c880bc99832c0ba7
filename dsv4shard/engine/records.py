"""The property table: every property of the suite, listed by hand.

A record says what a property is called in reports, the function that
checks it, the strategy its cases come from, the keyword its implementation
is passed as (``build``, ``fuse_impl``, ``shard``, ``variant``, ...), its
case type, whether a departure is fatal (required) or reported
(informational), and one sentence saying what it checks.  Nothing is found
by reflection: a property that is not listed here is not run by the
engine, and ``tests/test_records.py`` insists every property function of
``dsv4shard.testing.properties`` is listed.

Two records are of the same *kind* when they share keyword and case type:
a known-bad implementation is run against every property of its kind (the
kill matrix), and a variant against every ``variant`` record.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Property:
    name: str  # as reports spell it
    fn: Callable  # fn(case, **{keyword: implementation}) -> detail or None
    cases: Callable  # () -> the hypothesis strategy of its cases
    keyword: str  # the keyword the implementation under test is passed as
    case: str  # the case type's name
    summary: str  # one sentence: what it checks
    required: bool = True
    examples: int | None = None  # a cap, where draws change nothing that matters
    ranks: int = 0  # real ranks it needs (0: none)
    module: str = ""  # the properties module, as the kill matrix names cells

    @property
    def kind(self) -> tuple[str, str]:
        return (self.keyword, self.case)

    @property
    def qualified(self) -> str:
        return f"{self.module}.{self.name}" if self.module else self.name


def _project() -> list[Property]:
    from dsv4shard.testing import strategies as s
    from dsv4shard.testing.properties import end_to_end as e2e
    from dsv4shard.testing.properties import fused as f
    from dsv4shard.testing.properties import quantization as q
    from dsv4shard.testing.properties import reference_edges as edges
    from dsv4shard.testing.properties import sharded as sh
    from dsv4shard.testing.properties import unfused as u

    def P(name, fn, cases, keyword, case, summary, module, **kw):
        return Property(name, fn, cases, keyword, case, summary, module=module, **kw)

    return [
        # --- quantization: NumPy against MLX ---
        P("dequantize_matches_mlx", q.dequantize_matches_mlx, s.quant_cases, "dequantize",
          "QuantCase", "the NumPy dequantizer equals mx.dequantize on the same packed arrays",
          "quantization"),
        P("quantize_round_trip", q.quantize_round_trip, s.quant_cases, "dequantize",
          "QuantCase", "quantize then dequantize stays within half a step of every value",
          "quantization"),
        P("quantize_matches_mlx", q.quantize_matches_mlx, s.quant_cases, "dequantize",
          "QuantCase", "the NumPy quantizer packs the words and scales mx.quantize packs",
          "quantization"),
        P("pack_unpack_inverse", q.pack_unpack_inverse, s.quant_cases, "dequantize",
          "QuantCase", "packing codes into words and unpacking them is the identity",
          "quantization"),
        # --- the reference's own rules (NumPy only) ---
        P("clip_probes", edges.clip_probes, s.clip_cases, "clipped_swiglu", "ClipCase",
          "the clipped SwiGLU at the probes that separate its look-alikes", "reference_edges"),
        P("renormalisation_rule", edges.renormalisation_rule, s.router_cases, "route",
          "MoECase", "weights renormalised for every score function but softmax, times "
          "route_scale", "reference_edges"),
        P("bias_chooses_never_weights", edges.bias_chooses_never_weights, s.router_cases,
          "route", "MoECase", "the correction bias chooses experts and never enters the "
          "weights", "reference_edges"),
        P("hash_ignores_bias", edges.hash_ignores_bias, s.router_cases, "route", "MoECase",
          "hash layers route by tid2eid[input_ids] whatever the bias", "reference_edges"),
        P("large_logits_stay_finite", edges.large_logits_stay_finite, s.router_cases, "route",
          "MoECase", "sqrtsoftplus stays finite at large logits", "reference_edges"),
        P("k_extremes", edges.k_extremes, s.router_cases, "route", "MoECase",
          "k = 1 and k = E route as DeepSeek does", "reference_edges"),
        P("all_zero_scores_give_nan", edges.all_zero_scores_give_nan, s.router_cases,
          "route_weights", "MoECase", "no epsilon: all-zero chosen scores renormalise to NaN",
          "reference_edges"),
        # --- the unfused MLX block ---
        P("switch_glu_matches_reference", u.switch_glu_matches_reference, s.moe_cases, "build",
          "MoECase", "SwitchGLU's per-expert outputs equal the reference's on the dequantized "
          "weights", "unfused"),
        P("moe_matches_reference", u.moe_matches_reference, s.moe_cases, "build", "MoECase",
          "the whole block equals reference.moe within the stage bound", "unfused"),
        P("sorted_matches_unsorted", u.sorted_matches_unsorted, s.moe_cases, "build", "MoECase",
          "SwitchGLU sorted by expert equals SwitchGLU on chunks too small to sort", "unfused"),
        P("moe_matches_reference_at_extremes", u.moe_matches_reference_at_extremes, s.moe_cases,
          "build", "MoECase", "the block equals the reference at logits of +200 and in "
          "[-28, -18]", "unfused"),
        P("router_matches_reference_on_exact_inputs",
          u.router_matches_reference_on_exact_inputs, s.moe_cases, "build", "MoECase",
          "the router's experts and weights equal the reference's on logits exact in float32 "
          "and TF32", "unfused"),
        # --- fused gate+up: DeepSeek-V4's configurations, then the extended ones ---
        P("fused_matches_unfused", f.fused_matches_unfused, s.v4_fusion_cases, "fuse_impl",
          "FusionCase", "the fused experts are bit-identical with the unfused ones "
          "(DeepSeek-V4's checkpoint formats)", "fused"),
        P("fused_matches_unfused_dense", f.fused_matches_unfused_dense,
          lambda: s.v4_fusion_cases(dense=True), "fuse_impl", "FusionCase",
          "the fused experts are bit-identical with the unfused ones (dense experts)",
          "fused"),
        P("fused_concat_order_structural", f.fused_concat_order_structural, s.v4_fusion_cases,
          "fuse_impl", "FusionCase", "the fused arrays are [up, gate] on the output axis",
          "fused"),
        P("fused_concat_order_behaviour", f.fused_concat_order_behaviour, s.v4_fusion_cases,
          "fuse_impl", "FusionCase", "the fused experts equal the reference with up and gate in "
          "their places", "fused"),
        P("sharded_fusion_matches", f.sharded_fusion_matches, s.v4_sharded_fusion_cases,
          "fuse_impl", "FusionCase", "shard then fuse equals the sharded unfused block",
          "fused"),
        P("fusion_frees_unfused", f.fusion_frees_unfused, s.v4_fusion_cases, "fuse_impl",
          "FusionCase", "after fusing, the old gate/up arrays are gone", "fused"),
        P("fusion_keeps_bytes_and_round_trips", f.fusion_keeps_bytes_and_round_trips,
          s.v4_fusion_cases, "fuse_impl", "FusionCase", "the fused arrays stay in "
          "parameters(), nbytes, save_weights and load_weights", "fused"),
        P("fused_matches_unfused_extended", f.fused_matches_unfused_extended,
          s.extended_fusion_cases, "fuse_impl", "FusionCase", "extended (linear biases, other "
          "formats, a global scale; may be declined): fused bit-identical with unfused",
          "fused"),
        P("fused_concat_order_structural_extended", f.fused_concat_order_structural_extended,
          lambda: s.extended_fusion_cases(global_scale=True), "fuse_impl", "FusionCase",
          "extended (may be declined): linear biases concatenated [up, gate], the global "
          "scale kept", "fused"),
        P("fusion_keeps_bytes_and_round_trips_extended",
          f.fusion_keeps_bytes_and_round_trips_extended,
          lambda: s.extended_fusion_cases(global_scale=True), "fuse_impl", "FusionCase",
          "extended (may be declined): bytes kept, save_weights and load_weights round-trip",
          "fused"),
        # --- sharding: judged by behaviour and bytes; layout for our own sharder ---
        P("sharded_matches_unsharded", sh.sharded_matches_unsharded, s.v4_shard_cases,
          "shard", "ShardCase", "the ranks' outputs after one all_sum equal the unsharded "
          "block's (even and uneven splits)", "sharded"),
        P("shard_holds_its_share", sh.shard_holds_its_share, s.v4_shard_cases, "shard",
          "ShardCase", "each rank holds its share of the expert bytes and nothing more",
          "sharded"),
        P("sharded_matches_unsharded_extended", sh.sharded_matches_unsharded_extended,
          s.extended_shard_cases, "shard", "ShardCase", "extended (linear biases, other "
          "formats; may be declined): the ranks' outputs sum to the unsharded one", "sharded"),
        P("shard_holds_its_share_extended", sh.shard_holds_its_share_extended,
          s.extended_shard_cases, "shard", "ShardCase", "extended (may be declined): each "
          "rank holds its share of the expert bytes", "sharded"),
        P("shard_holds_its_slice", sh.shard_holds_its_slice,
          lambda: s.shard_cases(uneven=True), "shard", "ShardCase", "dsv4shard's own layout "
          "(its sharder only): each rank holds exactly its slice of every expert",
          "sharded"),
        P("real_ranks_match_unsharded", sh.real_ranks_match_unsharded,
          lambda: s.v4_shard_cases(ranks=2), "shard", "ShardCase", "real mx.distributed ranks "
          "give the unsharded output on every rank", "sharded", ranks=2),
        P("real_shard_then_fuse_is_bit_exact", sh.real_shard_then_fuse_is_bit_exact,
          lambda: s.v4_shard_cases(ranks=2, uneven=False), "shard", "ShardCase", "on real "
          "ranks, shard then fuse is bit-identical with shard alone", "sharded", ranks=2),
        P("sharded_model_matches_unsharded", e2e.sharded_model_matches_unsharded,
          s.model_cases, "shard", "ModelCase", "a tiny deepseek_v41 with its MoE sharded "
          "over real ranks gives the unsharded logits", "end_to_end", ranks=2),
    ]


def _variant() -> list[Property]:
    from dsv4shard.testing import strategies as s
    from dsv4shard.testing.properties import variant as v

    def V(name, fn, summary, required=True, examples=None, ranks=0):
        return Property(name, fn, s.variant_cases, "variant", "VariantCase", summary,
                        required, examples, ranks, module="variant")

    return [
        V("structure", v.structure, "router, routed experts and shared expert found by shape; "
          "the block builds and runs", examples=1),
        V("moe_matches_reference", v.moe_matches_reference, "the whole block equals the "
          "float64 reference on its own weights (float32; [T, D] and [B, L, D]; both sides of "
          "SwitchGLU's sort threshold; across the clip)"),
        V("quantized_moe_matches_reference", v.quantized_moe_matches_reference, "the same as "
          "checkpoints run it: mxfp4 routed experts, affine-8 shared expert, bfloat16"),
        V("routed_clip", v.routed_clip, "routed experts clip up to [-L, L] and gate from above "
          "at L, before silu; a failure names the look-alike", examples=1),
        V("spec_revision", v.spec_revision, "the shared expert clipped (revision "
          "shared-clipped) or not (first-release); departs only when it matches neither",
          required=False, examples=1),
        V("limit_disables_clip", v.limit_disables_clip, "swiglu_limit <= 0 disables both clips",
          required=False, examples=1),
        V("limit_none", v.limit_none, "swiglu_limit = None (a config without the field) means "
          "no clip, not a TypeError", required=False, examples=1),
        V("bias_chooses_only", v.bias_chooses_only, "the correction bias chooses the experts, "
          "never enters the weights"),
        V("renormalisation", v.renormalisation, "sqrtsoftplus weights renormalised to sum to "
          "1, times route_scale"),
        V("softmax_not_renormalised", v.softmax_not_renormalised, "softmax weights are the raw "
          "probabilities times route_scale", required=False),
        V("k1_renormalised", v.k1_renormalised, "k = 1 gives weight route_scale exactly",
          required=False),
        V("epsilon_underflow", v.epsilon_underflow, "no epsilon: tiny chosen scores still "
          "renormalise exactly, all-zero scores give NaN; a departure estimates the epsilon",
          required=False, examples=2),
        V("softplus_overflow", v.softplus_overflow, "finite, right weights at logits 89, 100, "
          "1000"),
        V("k_equals_experts", v.k_equals_experts, "k = E chooses every expert, the block still "
          "matches", required=False),
        V("hash_routing", v.hash_routing, "hash layers route by tid2eid[input_ids] whatever the "
          "bias, and the block matches; not applicable to a model without hash layers "
          "(unless its model_type is deepseek_v4)"),
        V("router_precision", v.router_precision, "bfloat16 tokens whose logits differ below "
          "bfloat16's resolution choose as a float32 router does; a departure says how often "
          "it changes the experts of DeepSeek-V4-shaped tokens", examples=1),
        V("combine_precision", v.combine_precision, "routed + shared added in float32 and "
          "rounded once; a combine within one bfloat16 rounding of the output departs "
          "(informational, with its size), a larger one fails", examples=2),
        V("output_dtype", v.output_dtype, "x's dtype and shape come back", examples=1),
        V("sharded_moe_2_ranks", v.sharded_moe_2_ranks, "MoE only: the variant's own "
          "Model.shard() over 2 real ranks gives the unsharded MoE output on every rank",
          examples=1, ranks=2),
        V("sharded_model", v.sharded_model, "the whole tiny Model (attention included), sharded "
          "by its own shard() over 2 and 4 real ranks, gives the unsharded logits over a "
          "prefill and decode steps", examples=1, ranks=4),
        V("fused_bit_exact", v.fused_bit_exact, "dsv4shard's fused gate+up installer on the "
          "variant's routed experts changes no bit (dense, mxfp4, affine-8 bfloat16)",
          examples=1),
    ]


@functools.cache
def table() -> tuple[Property, ...]:
    """Every property, the project's first, then the variants'."""
    return tuple(_project() + _variant())


def variant_properties() -> list[Property]:
    return [p for p in table() if p.keyword == "variant"]


def project_properties() -> list[Property]:
    return [p for p in table() if p.keyword != "variant"]


def by_name(name: str, keyword: str | None = None) -> Property:
    """The record called ``name`` (``module.name`` also resolves)."""
    found = [p for p in table() if (p.name == name or p.qualified == name)
             and (keyword is None or p.keyword == keyword)]
    if len(found) != 1:
        names = sorted({p.name for p in table() if keyword is None or p.keyword == keyword})
        raise KeyError(f"no property named {name!r}" + (f" for {keyword}" if keyword else "")
                       + f"; properties: {', '.join(names)}")
    return found[0]


def of_function(fn) -> Property:
    for p in table():
        if p.fn is fn:
            return p
    raise KeyError(f"{getattr(fn, '__name__', fn)} is not in the property table")


def kind_of(record: Property) -> list[Property]:
    """The properties of ``record``'s kind, ``record`` first."""
    return [record] + [p for p in table() if p.kind == record.kind and p is not record]

"""Known-bad implementations, and which property must catch each.

A property that a broken implementation passes is itself broken, so every
entry of :func:`catalogue` is run through the very property functions the
suite uses, and must fail (tests/test_known_bad.py, ``dsv4shard mutants``).

Each entry draws its cases from a strategy of the suite, narrowed where
useful to the region where its bug class lives (a clip bug gets clipped
activations; a renormalisation bug gets a score_func that renormalises):
filters and maps on the suite's strategies, never a change to a property,
its bound or its assertions.  ``FOCUS`` holds those narrowings for entries
that mutant modules declare themselves.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

# The families of bug classes, as the mutant modules are named.
FAMILIES = ("router", "activation", "shared", "switch", "fusion", "sharding", "quantization")


@dataclass(frozen=True)
class Mutant:
    name: str
    prop: Callable  # the property that must catch it
    strategy: Callable  # () -> the strategy the property is tested with
    impl: dict[str, Any] = field(default_factory=dict)  # keyword -> broken part

    @property
    def part(self):
        """The broken part: the one implementation passed to the property."""
        (part,) = self.impl.values()
        return part

    @property
    def key(self) -> str:
        """The keyword the broken part is passed as (build, route, shard, ...)."""
        (key,) = self.impl
        return key

    @property
    def bug(self) -> str:
        """The bug class it stands for (the BUGS table)."""
        return BUGS.get(self.name, ("", "(not catalogued)"))[1]

    @property
    def family(self) -> str:
        """router, activation, shared, switch, fusion, sharding or quantization."""
        return BUGS.get(self.name, ("(not catalogued)", ""))[0]


# Every known-bad implementation: its family (the module it lives in) and
# the bug class it stands for, in one sentence.  Listed by hand: the kill
# matrix and tests/test_known_bad.py read these, never a docstring.
BUGS: dict[str, tuple[str, str]] = {
    'fused_gate_up_order_dense': ('fusion', '[gate, up] concatenated, on dense experts.'),
    'fused_drops_linear_bias_bytes': ('fusion',
        'Linear bias dropped on fusing: its bytes and round trip are lost.'),
    'shard_keeps_unsharded_copy_extended': ('sharding',
        'Unsharded copy kept beside the slice, on the extended configurations.'),
    'softmax_for_sqrtsoftplus': ('router', 
        'Softmax for sqrtsoftplus: the MLX router scores with softmax instead.'),
    'bias_in_weights': ('router', 
        'Bias in the weights: the MLX router weighs experts by their biased scores.'),
    'no_renormalisation': ('router', 
        'No renormalisation: the MLX router uses the chosen scores as they are.'),
    'router_epsilon': ('router', 'Epsilon 1e-8: the MLX router renormalises by sum(w) + 1e-8.'),
    'naive_softplus': ('router', 
        "Naive softplus: the MLX router's float32 log1p(exp(z)) overflows past 88.7."),
    'hash_table_ignored': ('router', 
        'Hash table ignored: the MLX router routes hash layers by score.'),
    'bfloat16_router_matmul': ('router', 
        "bfloat16 router matmul: the MLX router's logits in bfloat16, not float32."),
    'np_softmax_for_sqrtsoftplus': ('router', 
        'Softmax for sqrtsoftplus: softmax scores where score_func says sqrtsoftplus.'),
    'np_bias_in_weights': ('router', 'Bias in the weights: weights from scores + bias.'),
    'np_no_renormalisation': ('router', 'No renormalisation: chosen scores never renormalised.'),
    'np_epsilon': ('router', 
        'Epsilon 1e-8 in the renormalisation: all-zero scores give 0, not NaN.'),
    'np_naive_softplus': ('router', 
        'Naive softplus: sqrt(log1p(exp(z))) overflows to inf at large logits.'),
    'np_hash_table_ignored': ('router', 
        'Hash table ignored: a hash layer routed by score, tid2eid never read.'),
    'np_hash_with_bias': ('router', 
        "Hash layer biased: the bias still picks among the table's experts and the rest."),
    'clip_after_silu': ('activation', 
        'Clip after silu: the MLX routed experts clip silu(gate), not gate.'),
    'two_sided_gate_clip': ('activation', 
        'Two-sided gate clip: the MLX routed experts clip gate to [-L, L].'),
    'no_up_clip': ('activation', 'No up clip: the MLX routed experts never clip up.'),
    'limit_not_honoured': ('activation', 
        'Limit <= 0 not honoured: the MLX routed experts clip to |limit| anyway.'),
    'activation_arguments_swapped': ('activation', 
        "Arguments swapped: the MLX routed experts' activation reads (gate, up)."),
    'np_clip_after_silu': ('activation', 
        'Clip after silu: the clip applied to silu(gate) rather than to gate.'),
    'np_two_sided_gate_clip': ('activation', 
        'Two-sided gate clip: gate clipped to [-L, L], not from above only.'),
    'np_no_up_clip': ('activation', 'No up clip: only gate is clipped; up passes unclipped.'),
    'np_limit_not_honoured': ('activation', 
        'limit <= 0 not honoured: clips to |limit| whatever its sign.'),
    'np_arguments_swapped': ('activation', 
        'Arguments swapped: clips and gates the wrong projection.'),
    'bf16_skips_clip': ('activation',
        'Clip skipped in bfloat16: the MLX routed experts clip nothing when their inputs are '
        'bfloat16.'),
    'clip_after_silu_tf32': ('activation',
        'Clip after silu, under TF32: the MLX routed experts clip silu(gate), float32 matmuls '
        'in TF32.'),
    'two_sided_gate_clip_tf32': ('activation',
        'Two-sided gate clip, under TF32: gate clipped to [-L, L], float32 matmuls in TF32.'),
    'bf16_unweighted_routed_sum': ('router',
        'Routed sum unweighted in bfloat16: the MLX block adds its experts\' outputs without '
        'the route weights.'),
    'shared_unclipped': ('shared', 
        'Shared expert unclipped under the later revision (shared-clipped).'),
    'shared_dropped': ('shared', 'Shared expert dropped: never added to the routed output.'),
    'no_unsort': ('switch', 'No unsort: SwitchGLU sorts tokens by expert and never unsorts them.'),
    'no_unsort_vs_reference': ('switch', 
        'No unsort: SwitchGLU sorts tokens by expert and never unsorts them.'),
    'bfloat16_truncated': ('quantization', 
        "bfloat16 by truncation: float32's low 16 bits dropped, not rounded."),
    'fused_multiply_add': ('quantization', 
        'Fused multiply-add: ``scale * q + bias`` rounded once, not twice.'),
    'global_scale_divided': ('quantization', 
        'nvfp4 global scale inverted: applied the other way round.'),
    'group_off_by_one': ('quantization', 
        'Group boundary off by one: element j reads group (j + 1) // group_size.'),
    'scales_biases_swapped': ('quantization', 
        "Scales and biases swapped: passed in each other's place."),
    'fused_gate_up_order': ('fusion', 
        "[gate, up] order: gate's rows first, but the first half is used as up."),
    'fused_gate_up_order_behaviour': ('fusion', 
        "[gate, up] order: gate's rows first, but the first half is used as up."),
    'fused_gate_up_order_vs_unfused': ('fusion', 
        "[gate, up] order: gate's rows first, but the first half is used as up."),
    'fused_mixed_order': ('fusion', 
        'Mixed order: weight [up, gate] but scales and affine biases [gate, up].'),
    'fused_mixed_order_behaviour': ('fusion', 
        'Mixed order: weight [up, gate] but scales and affine biases [gate, up].'),
    'fused_wrong_split': ('fusion', 
        'Wrong split point: the fused output split by alternating columns.'),
    'fused_wrong_split_vs_unfused': ('fusion', 
        'Wrong split point: the fused output split by alternating columns.'),
    'fused_no_clip': ('fusion', 
        'Fused path without the clip: a plain SwiGLU replaces the activation.'),
    'fused_no_clip_behaviour': ('fusion', 
        'Fused path without the clip: a plain SwiGLU replaces the activation.'),
    'fused_sort_threshold_8': ('fusion', 'Sort threshold 8 with an unsort to indices.shape[:-1].'),
    'fused_keeps_unfused_alive': ('fusion', 
        'Old weights kept alive: the original SwitchGLU stashed in `_unfused`.'),
    'fused_drops_linear_bias': ('fusion', 
        "Linear bias dropped: gate's and up's bias are not carried into the fusion."),
    'fused_drops_global_scale': ('fusion', 
        'nvfp4 global scale dropped: the fused projection is built without it.'),
    'fused_drops_global_scale_behaviour': ('fusion', 
        'nvfp4 global scale dropped: the fused projection is built without it.'),
    'fused_ignores_global_scale': ('fusion', 
        'nvfp4 global scale unused: kept as a parameter, never passed to gather_qmm.'),
    'fused_fuse_then_shard': ('fusion', 
        'Fuse then shard: the fused rows are split across ranks like any others.'),
    'shard_no_all_sum': ('sharding', "No all_sum: the ranks' partial outputs are never added."),
    'shard_two_all_sums': ('sharding', 
        'Two all_sums: one in the MoE wrapper, one in the layer: N times the answer.'),
    'shard_down_wrong_axis': ('sharding', 
        'Wrong axis: down_proj sliced along its output axis, not its input axis.'),
    'shard_shared_left_whole': ('sharding', 
        'Shared expert summed on every rank: left whole, yet all_summed.'),
    'shard_bias_on_every_rank': ('sharding', 
        "Bias counted N times: down_proj's linear bias kept on every rank."),
    'shard_bias_on_every_rank_structure': ('sharding', 
        "Bias counted N times: down_proj's linear bias kept on every rank."),
    'shard_rank_dependent_routing': ('sharding', 
        'Rank-dependent routing: ranks choose different experts.'),
    'shard_uneven_down_one_group_off': ('sharding',
        "Uneven split, down one group off: the last rank's down columns start one group early."),
    'shard_keeps_unsharded_copy': ('sharding',
        'Unsharded copy kept: each rank holds its slice and the whole routed experts beside it.'),
    'shard_global_scale_by_expert': ('sharding', 
        "Global scale sliced by expert: nvfp4's per-expert scale split like a weight."),
    'shard_global_scale_by_expert_structure': ('sharding', 
        "Global scale sliced by expert: nvfp4's per-expert scale split like a weight."),
}


# --- where each bug class lives ------------------------------------------------


def clipped(case) -> bool:
    """Activations large enough to cross a positive clip limit."""
    return case.config.swiglu_limit > 0 and case.activation_scale > 1


def tightly_clipped(case) -> bool:
    """Clipped at a small limit (L <= 1): where silu(L) and silu(-L) are far
    from L and 0, so that look-alikes of the clip (after silu, two-sided)
    differ by more than rounding even in low precision."""
    return 0 < case.config.swiglu_limit <= 1 and case.activation_scale > 1


def unclipped(case) -> bool:
    """The clip disabled (limit <= 0)."""
    return case.config.swiglu_limit <= 0


def several_chosen(case) -> bool:
    """k >= 2: with one expert a renormalised weight is 1 whatever the scores."""
    return case.config.top_k >= 2


def renormalising(case) -> bool:
    return case.config.score_func != "softmax"


def sqrtsoftplus(case) -> bool:
    return case.config.score_func == "sqrtsoftplus"


def sigmoid(case) -> bool:
    return case.config.score_func == "sigmoid"


def later_revision(case) -> bool:
    """The revision whose shared expert is clipped."""
    from reference.moe_block import Revision

    return case.config.revision == Revision.SHARED_CLIPPED


def score_layer(case) -> bool:
    return not case.config.hash_routing


def sorted_tokens(case) -> bool:
    """indices.size past the sort threshold: SwitchGLU sorts by expert."""
    from dsv4shard.testing.strategies import SORT_THRESHOLD

    return case.n_tokens * case.config.top_k >= SORT_THRESHOLD


def several_ranks(case) -> bool:
    return case.ranks > 1


def experts_to_spare(case) -> bool:
    """A score layer with more experts than it chooses: a rank-local bias can
    change the choice."""
    return score_layer(case.moe) and case.moe.config.top_k < case.moe.config.n_experts


def expert_per_rank(case) -> bool:
    """At least one expert per rank: slicing along the expert axis slices."""
    return case.ranks > 1 and case.moe.config.n_experts >= case.ranks


def on_moe(predicate):
    """A predicate on a MoECase, lifted to a case holding one as ``.moe``."""
    return lambda case: predicate(case.moe)


def focus(strategy, *predicates):
    """``strategy`` narrowed to the cases meeting every predicate."""
    for predicate in predicates:
        strategy = strategy.filter(predicate)
    return strategy


# Narrowings of entries that modules declare (``entries()``) or that are made
# from a module's contents (quantization): entry name -> predicates on its case.
FOCUS = {
    "fused_no_clip": (on_moe(clipped),),
    "fused_no_clip_behaviour": (on_moe(clipped),),
    "fused_sort_threshold_8": (lambda c: c.moe.n_tokens * c.moe.config.top_k >= 8,),
    "shard_down_wrong_axis": (several_ranks,),
    "shard_shared_left_whole": (several_ranks,),
    "shard_keeps_unsharded_copy": (several_ranks,),
    "shard_rank_dependent_routing": (experts_to_spare,),
    # The last element of a group reads the next group's scale: two groups or more.
    "group_off_by_one": (lambda c: c.shape[-1] >= 2 * c.fmt.group_size,),
    # Truncation differs from rounding only where something is rounded to
    # bfloat16: affine scales stored in it, or any float format (whose
    # dequantize_matches_mlx runs every output dtype).
    "bfloat16_truncated": (lambda c: c.fmt.mode != "affine" or c.scales_dtype == "bfloat16",),
    "global_scale_divided": (lambda c: c.fmt.global_scale,),
}


def catalogue() -> list[Mutant]:
    from dsv4shard.testing import strategies as s
    from dsv4shard.testing.mutants import activation as act
    from dsv4shard.testing.mutants import router, shared, switch
    from dsv4shard.testing.properties import reference_edges as edges
    from dsv4shard.testing.properties import unfused

    def moe(*predicates, **kwargs):
        return lambda: focus(s.moe_cases(**kwargs), *predicates)

    def dense(*predicates, **kwargs):
        return lambda: focus(s.moe_cases(quantized=False, **kwargs), *predicates)

    def bf16(*predicates):
        return lambda: focus(s.bfloat16_cases(), *predicates)

    def clip(*predicates):
        return lambda: focus(s.clip_cases(), *predicates)

    def positive_limit(case):
        return case.limit > 0

    hashed = {"patterns": s.HASH_PATTERNS}
    block = unfused.moe_matches_reference
    extremes = unfused.moe_matches_reference_at_extremes
    exact = unfused.router_matches_reference_on_exact_inputs

    entries = [
        # --- router, MLX block ---
        # Listed with the router's own property (the experts and weights it
        # returns, on exact logits), which needs no expert kernel: on a GPU
        # each example of the block's property takes seconds.  The block's
        # property catches it too (the kill matrix's cell).
        Mutant("softmax_for_sqrtsoftplus", exact, moe(sqrtsoftplus, several_chosen),
               {"build": router.build_softmax_for_sqrtsoftplus}),
        Mutant("bias_in_weights", block, moe(score_layer, several_chosen),
               {"build": router.build_bias_in_weights}),
        Mutant("no_renormalisation", block, moe(renormalising, several_chosen),
               {"build": router.build_no_renormalisation}),
        Mutant("router_epsilon", extremes, moe(sigmoid),
               {"build": router.build_epsilon}),
        Mutant("naive_softplus", extremes, moe(sqrtsoftplus),
               {"build": router.build_naive_softplus}),
        # As softmax_for_sqrtsoftplus: the router's own property.
        Mutant("hash_table_ignored", exact, moe(**hashed),
               {"build": router.build_hash_table_ignored}),
        # Its own property: under TF32 (MLX's CUDA build) a float32 router's
        # own logits are off by up to 2^-11 per operand, and the block's
        # output cannot tell that from bfloat16's 2^-9; exact logits can.
        Mutant("bfloat16_router_matmul", exact, moe(several_chosen),
               {"build": router.build_bfloat16_router}),
        # --- router, the reference's own rules (NumPy twins) ---
        Mutant("np_softmax_for_sqrtsoftplus", edges.renormalisation_rule,
               dense(sqrtsoftplus, several_chosen),
               {"route": router.route_softmax_for_sqrtsoftplus}),
        Mutant("np_bias_in_weights", edges.bias_chooses_never_weights,
               dense(score_layer, several_chosen), {"route": router.route_bias_in_weights}),
        Mutant("np_no_renormalisation", edges.renormalisation_rule,
               dense(renormalising, several_chosen), {"route": router.route_no_renormalisation}),
        Mutant("np_epsilon", edges.all_zero_scores_give_nan, dense(renormalising),
               {"route_weights": router.route_weights_with_epsilon}),
        Mutant("np_naive_softplus", edges.large_logits_stay_finite, dense(sqrtsoftplus),
               {"route": router.route_naive_softplus}),
        Mutant("np_hash_table_ignored", edges.hash_ignores_bias, dense(**hashed),
               {"route": router.route_hash_ignored}),
        Mutant("np_hash_with_bias", edges.hash_ignores_bias, dense(**hashed),
               {"route": router.route_hash_with_bias}),
        # --- clipped SwiGLU, MLX block ---
        Mutant("clip_after_silu", block, moe(tightly_clipped),
               {"build": act.build_clip_after_silu}),
        Mutant("two_sided_gate_clip", block, moe(tightly_clipped),
               {"build": act.build_two_sided_gate_clip}),
        Mutant("no_up_clip", block, moe(clipped), {"build": act.build_no_up_clip}),
        Mutant("limit_not_honoured", block, moe(unclipped),
               {"build": act.build_limit_not_honoured}),
        Mutant("activation_arguments_swapped", unfused.switch_glu_matches_reference, moe(),
               {"build": act.build_swapped_arguments}),
        # --- clipped SwiGLU, the reference's own (NumPy twins) ---
        Mutant("np_clip_after_silu", edges.clip_probes, clip(positive_limit),
               {"clipped_swiglu": act.clipped_swiglu_after_silu}),
        Mutant("np_two_sided_gate_clip", edges.clip_probes, clip(positive_limit),
               {"clipped_swiglu": act.clipped_swiglu_two_sided_gate}),
        Mutant("np_no_up_clip", edges.clip_probes, clip(positive_limit),
               {"clipped_swiglu": act.clipped_swiglu_no_up_clip}),
        Mutant("np_limit_not_honoured", edges.clip_probes, clip(lambda c: c.limit <= 0),
               {"clipped_swiglu": act.clipped_swiglu_limit_always}),
        Mutant("np_arguments_swapped", edges.clip_probes, clip(),
               {"clipped_swiglu": act.clipped_swiglu_swapped}),
        # --- bugs of one dtype or arithmetic alone ---
        Mutant("bf16_skips_clip", block, bf16(clipped), {"build": act.build_bf16_skips_clip}),
        Mutant("bf16_unweighted_routed_sum", block, bf16(several_chosen),
               {"build": router.build_bf16_unweighted_routed_sum}),
        Mutant("clip_after_silu_tf32", block, dense(tightly_clipped),
               {"build": act.build_clip_after_silu_tf32}),
        Mutant("two_sided_gate_clip_tf32", block, dense(tightly_clipped),
               {"build": act.build_two_sided_gate_clip_tf32}),
        # --- shared expert ---
        Mutant("shared_unclipped", block, moe(clipped, later_revision),
               {"build": shared.build_shared_unclipped}),
        Mutant("shared_dropped", block, moe(), {"build": shared.build_shared_dropped}),
        # --- SwitchGLU's sort machinery ---
        Mutant("no_unsort", unfused.sorted_matches_unsorted, moe(sorted_tokens),
               {"build": switch.build_no_unsort}),
        Mutant("no_unsort_vs_reference", unfused.switch_glu_matches_reference,
               moe(sorted_tokens), {"build": switch.build_no_unsort}),
    ]
    found = entries + _quantization_entries() + _module_entries()
    return [_focused(m) for m in found]


def _focused(mutant: Mutant) -> Mutant:
    predicates = FOCUS.get(mutant.name)
    if not predicates:
        return mutant
    strategy = mutant.strategy
    return Mutant(mutant.name, mutant.prop, lambda: focus(strategy(), *predicates), mutant.impl)


def _module_entries() -> list[Mutant]:
    """Entries the fusion and sharding mutant modules list themselves."""
    from dsv4shard.testing.mutants import fusion, sharding

    return fusion.entries() + sharding.entries()


# The quantization mutants: each a NumPy dequantizer with one bug, run through
# dequantize_matches_mlx.
QUANTIZATION = ("group_off_by_one", "scales_biases_swapped", "bfloat16_truncated",
                "fused_multiply_add", "global_scale_divided")


def _quantization_entries() -> list[Mutant]:
    from dsv4shard.testing import strategies as s
    from dsv4shard.testing.mutants import quantization as q
    from dsv4shard.testing.properties import quantization as qp

    return [Mutant(name, qp.dequantize_matches_mlx, s.quant_cases,
                   {"dequantize": getattr(q, f"dequantize_{name}")}) for name in QUANTIZATION]

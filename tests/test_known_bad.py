"""Every known-bad implementation is caught by the property named for it,
within the examples the ``ci`` profile gives a property (derandomized).

A mutant whose property cannot run on this backend (an nvfp4 global scale on
MLX's CPU build) skips with the reason: never a catch, never a pass.
"""

import pytest
from hypothesis import settings

from dsv4shard.testing.catch import CI_EXAMPLES, assert_caught
from dsv4shard.testing.mutants import FAMILIES, catalogue

MUTANTS = catalogue()
BY_NAME = {m.name: m for m in MUTANTS}

# Issue 6's bug classes, each with the catalogue entries that stand for it.
BUG_CLASSES = {
    "router: softmax for sqrtsoftplus": ["softmax_for_sqrtsoftplus",
                                         "np_softmax_for_sqrtsoftplus"],
    "router: bias in the weights": ["bias_in_weights", "np_bias_in_weights"],
    "router: no renormalisation": ["no_renormalisation", "np_no_renormalisation"],
    "router: epsilon 1e-8": ["router_epsilon", "np_epsilon"],
    "router: naive softplus": ["naive_softplus", "np_naive_softplus"],
    "router: hash table ignored": ["hash_table_ignored", "np_hash_table_ignored"],
    "router: bfloat16 router matmul": ["bfloat16_router_matmul"],
    "activation: clip after silu": ["clip_after_silu", "np_clip_after_silu"],
    "activation: two-sided gate clip": ["two_sided_gate_clip", "np_two_sided_gate_clip"],
    "activation: no up clip": ["no_up_clip", "np_no_up_clip"],
    "activation: limit <= 0 not honoured": ["limit_not_honoured", "np_limit_not_honoured"],
    "activation: arguments swapped": ["activation_arguments_swapped", "np_arguments_swapped"],
    "shared: unclipped under the later revision": ["shared_unclipped"],
    "shared: dropped": ["shared_dropped"],
    "shared: summed on every rank": ["shard_shared_left_whole"],
    "fusion: [gate, up]": ["fused_gate_up_order", "fused_gate_up_order_behaviour"],
    "fusion: mixed order": ["fused_mixed_order", "fused_mixed_order_behaviour"],
    "fusion: wrong split point": ["fused_wrong_split", "fused_wrong_split_vs_unfused"],
    "fusion: fuse before shard": ["fused_fuse_then_shard"],
    "fusion: unsort to indices.shape[:-1]": ["fused_sort_threshold_8"],
    "fusion: clip dropped": ["fused_no_clip", "fused_no_clip_behaviour"],
    "fusion: old weights kept alive": ["fused_keeps_unfused_alive"],
    "fusion: global scale dropped": ["fused_drops_global_scale",
                                     "fused_drops_global_scale_behaviour"],
    "sharding: no all_sum": ["shard_no_all_sum"],
    "sharding: two all_sums": ["shard_two_all_sums"],
    "sharding: wrong axis": ["shard_down_wrong_axis"],
    "sharding: bias counted N times": ["shard_bias_on_every_rank",
                                       "shard_bias_on_every_rank_structure"],
    "sharding: global scale sliced by expert": ["shard_global_scale_by_expert",
                                                "shard_global_scale_by_expert_structure"],
    "sharding: rank-dependent routing": ["shard_rank_dependent_routing"],
    "sharding: uneven split, down one group off": ["shard_uneven_down_one_group_off"],
    "sharding: unsharded copy kept": ["shard_keeps_unsharded_copy"],
    "activation: clip skipped only in bfloat16": ["bf16_skips_clip"],
    "router: routed sum without the route weights in bfloat16": ["bf16_unweighted_routed_sum"],
    "activation: clip after silu, under TF32": ["clip_after_silu_tf32"],
    "activation: two-sided gate clip, under TF32": ["two_sided_gate_clip_tf32"],
    "quantization: group boundary off by one": ["group_off_by_one"],
    "quantization: scales and biases swapped": ["scales_biases_swapped"],
}


@pytest.mark.parametrize("mutant", MUTANTS, ids=[m.name for m in MUTANTS])
def test_mutant_is_caught(mutant):
    assert_caught(mutant.prop, mutant.strategy(), **mutant.impl)


def test_kill_budget_is_the_ci_profile():
    assert settings.get_profile("ci").max_examples == CI_EXAMPLES


def test_catalogue_is_named_and_documented():
    assert len(MUTANTS) >= 30
    assert len(BY_NAME) == len(MUTANTS), "mutant names must be unique"
    for m in MUTANTS:
        assert len(m.impl) == 1, m.name
        assert m.bug, f"{m.name}: its broken part needs a docstring naming the bug class"
        assert m.family in FAMILIES, (m.name, m.family)


@pytest.mark.parametrize("bug_class", BUG_CLASSES)
def test_every_bug_class_has_a_mutant(bug_class):
    missing = [name for name in BUG_CLASSES[bug_class] if name not in BY_NAME]
    assert not missing, f"{bug_class}: no catalogue entry {missing}"


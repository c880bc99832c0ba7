"""The reference at its edges: clip probes, router rules, extremes of k."""

from hypothesis import given

from dsv4shard.testing import strategies as s
from dsv4shard.testing.properties import reference_edges as edges


@given(case=s.clip_cases())
def test_clip_probes(case):
    edges.clip_probes(case)


@given(case=s.router_cases())
def test_renormalisation_rule(case):
    edges.renormalisation_rule(case)


@given(case=s.router_cases())
def test_bias_chooses_never_weights(case):
    edges.bias_chooses_never_weights(case)


@given(case=s.moe_cases(quantized=False, patterns=s.HASH_PATTERNS))
def test_hash_ignores_bias(case):
    edges.hash_ignores_bias(case)


@given(case=s.router_cases())
def test_large_logits_stay_finite(case):
    edges.large_logits_stay_finite(case)


@given(case=s.router_cases())
def test_all_zero_scores_give_nan(case):
    edges.all_zero_scores_give_nan(case)


@given(case=s.router_cases())
def test_k_extremes(case):
    edges.k_extremes(case)

"""The reference against values worked out from first principles, with NumPy
alone: no MLX is imported here, so mutation testing of ``reference/``
(docs/mutation-testing.md) runs these tests, and only these, in seconds.

Expected values come from definitions (the e2m1 table, powers of two,
hand-computed dot products), never from the reference itself.
"""

import math
import subprocess
import sys

import numpy as np
import pytest

import reference as ref
import reference.quantization as q
from reference.moe_block import MoEConfig, MoEWeights, Revision

# The reference computes with NaN and inf on purpose (all-zero scores,
# saturating formats) and says so with np.errstate: it must never warn.
pytestmark = pytest.mark.filterwarnings("error")

# --- names, configuration ---------------------------------------------------------


def test_reference_imports_no_mlx():
    code = "import sys, reference; print(any(m.startswith('mlx') for m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


def test_names_map_both_ways():
    assert [ref.mlx_name(n) for n in ("w1", "w3", "w2")] == ["gate_proj", "up_proj", "down_proj"]
    assert [ref.deepseek_name(n) for n in ("gate_proj", "up_proj", "down_proj")] == [
        "w1", "w3", "w2"]


@pytest.mark.parametrize("fields, problem", [
    (dict(hidden_size=0), "hidden_size must be >= 1"),
    (dict(intermediate_size=0), "intermediate_size must be >= 1"),
    (dict(n_experts=0, top_k=1), "n_experts must be >= 1"),
    (dict(top_k=0), "top_k must be >= 1"),
    (dict(top_k=5), "top_k=5 must lie in [1, n_experts=4]"),
    (dict(score_func="relu"), "score_func='relu' is not one of"),
    (dict(hash_routing=True), "a hash layer needs vocab_size >= 1"),
])
def test_impossible_configs_are_refused(fields, problem):
    base = dict(hidden_size=8, intermediate_size=4, n_experts=4, top_k=2)
    with pytest.raises(ValueError, match="impossible MoEConfig") as error:
        MoEConfig(**{**base, **fields})
    assert problem in str(error.value)


def test_every_problem_is_named_in_one_message():
    with pytest.raises(ValueError) as error:
        MoEConfig(8, 4, 2, 3, hash_routing=True)
    assert str(error.value) == (
        "impossible MoEConfig: top_k=3 must lie in [1, n_experts=2]; "
        "a hash layer needs vocab_size >= 1 for its tid2eid table")


def test_config_defaults_and_revision():
    c = MoEConfig(8, 4, 4, 2, revision="first-release")
    assert c.revision is Revision.FIRST_RELEASE
    assert (c.swiglu_limit, c.route_scale, c.score_func, c.hash_routing, c.vocab_size) == (
        10.0, 1.5, "sqrtsoftplus", False, 0)
    assert MoEConfig(8, 4, 4, 4).revision is Revision.SHARED_CLIPPED
    MoEConfig(1, 1, 1, 1)  # the smallest possible block
    MoEConfig(8, 4, 4, 1, hash_routing=True, vocab_size=1)
    assert repr(Revision.SHARED_CLIPPED) == "Revision.SHARED_CLIPPED"
    assert Revision.FIRST_RELEASE.value == "first-release"


# --- router -----------------------------------------------------------------------


def test_router_logits_is_x_times_gate_transposed():
    x = np.array([[1.0, 2.0]])
    gate = np.array([[3.0, 4.0], [5.0, -6.0], [0.0, 1.0]])  # [E=3, D=2]
    assert ref.router_logits(x, gate).tolist() == [[11.0, -7.0, 2.0]]


def test_score_functions_at_known_points():
    assert ref.softplus(np.array(0.0)) == pytest.approx(math.log(2), rel=1e-15)
    assert ref.softplus(np.array(1.0)) == pytest.approx(math.log(1 + math.e), rel=1e-15)
    assert ref.softplus(np.array(1000.0)) == 1000.0  # no overflow
    assert ref.softplus(np.array(-1000.0)) == 0.0
    assert ref.sqrtsoftplus(np.array(0.0)) == pytest.approx(math.sqrt(math.log(2)), rel=1e-15)
    assert ref.sqrtsoftplus(np.array(3.0)) == pytest.approx(
        math.sqrt(math.log1p(math.exp(3.0))), rel=1e-15)
    assert ref.sigmoid(np.array(0.0)) == 0.5
    assert ref.sigmoid(np.array(2.0)) == pytest.approx(1 / (1 + math.exp(-2.0)), rel=1e-15)
    assert ref.sigmoid(np.array(-2.0)) == pytest.approx(1 / (1 + math.exp(2.0)), rel=1e-15)
    assert ref.sigmoid(np.array(800.0)) == 1.0
    tiny = ref.sigmoid(np.array(-700.0))
    assert 0 < tiny == pytest.approx(math.exp(-700.0), rel=1e-12)


def test_softmax_rows():
    z = np.log(np.array([[1.0, 2.0, 3.0], [5.0, 5.0, 10.0]]))
    assert ref.softmax(z) == pytest.approx(np.array([[1, 2, 3], [1, 1, 2]]) /
                                           np.array([[6.0], [4.0]]), rel=1e-14)
    assert ref.softmax(np.array([[1000.0, 1000.0]])).tolist() == [[0.5, 0.5]]
    assert ref.softmax(np.array([[-1000.0, -1000.0, -1000.0, -1000.0]])).tolist() == [
        [0.25] * 4]
    # Each row on its own: a row far below another's max is not lost.
    assert ref.softmax(np.array([[1000.0, 1000.0], [0.0, 0.0]])).tolist() == [[0.5, 0.5]] * 2
    # Over the last axis of [B, T, E] as well.
    z = np.log(np.arange(1.0, 13.0)).reshape(2, 2, 3)
    want = np.arange(1.0, 13.0).reshape(2, 2, 3)
    assert ref.softmax(z) == pytest.approx(want / want.sum(axis=-1, keepdims=True), rel=1e-14)


def test_scores_dispatch():
    z = np.array([[0.0, 1.0]])
    assert ref.scores(z, "sigmoid")[0] == pytest.approx([0.5, 1 / (1 + math.exp(-1))])
    assert ref.scores(z, "softmax")[0] == pytest.approx([1 / (1 + math.e), math.e / (1 + math.e)])
    assert ref.scores(z, "sqrtsoftplus")[0] == pytest.approx(
        [math.sqrt(math.log(2)), math.sqrt(math.log(1 + math.e))])
    with pytest.raises(KeyError):
        ref.scores(z, "relu")


def test_top_k_and_hash_experts():
    s = np.array([[0.1, 0.9, 0.5, 0.7], [0.4, 0.3, 0.2, 0.1]])
    assert ref.top_k_experts(s, 2).tolist() == [[1, 3], [0, 1]]
    assert ref.top_k_experts(s, 1).tolist() == [[1], [0]]
    assert ref.top_k_experts(np.zeros((1, 3)), 2).tolist() == [[0, 1]]  # ties: lowest first
    # Ties among many experts: the highest scores, the lowest index among equals.
    tied = np.random.default_rng(0).integers(0, 3, (4, 64)).astype(float)
    for row, got in zip(tied, ref.top_k_experts(tied, 20)):
        assert got.tolist() == sorted(range(64), key=lambda e: (-row[e], e))[:20]
    assert ref.top_k_experts(s.reshape(1, 2, 4), 2).tolist() == [[[1, 3], [0, 1]]]
    table = np.array([[0, 1], [2, 3], [1, 2]])
    assert ref.hash_experts(np.array([2, 0, 2]), table).tolist() == [[1, 2], [0, 1], [1, 2]]


def test_route_weights_rules():
    s = np.array([[0.1, 0.3, 0.6, 0.0]])
    idx = np.array([[1, 2]])
    for func in ("sigmoid", "sqrtsoftplus"):
        c = MoEConfig(4, 4, 4, 2, route_scale=2.0, score_func=func)
        assert ref.route_weights(s, idx, c)[0] == pytest.approx([2 * 0.3 / 0.9, 2 * 0.6 / 0.9])
        assert np.isnan(ref.route_weights(np.zeros((1, 4)), idx, c)).all()  # no epsilon
        one = MoEConfig(4, 4, 4, 1, route_scale=2.0, score_func=func)
        assert ref.route_weights(s, idx[:, :1], one).tolist() == [[2.0]]
    c = MoEConfig(4, 4, 4, 2, route_scale=2.0, score_func="softmax")
    assert ref.route_weights(s, idx, c)[0] == pytest.approx([0.6, 1.2])
    # [B, T, E] scores: per token.
    per_token = MoEConfig(4, 4, 4, 2, route_scale=1.0, score_func="sigmoid")
    many = np.array([[[0.1, 0.3, 0.6, 0.0], [0.2, 0.2, 0.1, 0.5]]])
    got = ref.route_weights(many, np.array([[[1, 2], [0, 3]]]), per_token)
    assert got[0] == pytest.approx(np.array([[1 / 3, 2 / 3], [2 / 7, 5 / 7]]))
    assert ref.route_weights(np.zeros((1, 4)), idx, c).tolist() == [[0.0, 0.0]]


def small_weights(e=3, d=2, i=2, **extra):
    rng = np.random.default_rng(0)
    return MoEWeights(
        gate=rng.normal(size=(e, d)), bias=np.zeros(e),
        w1=rng.normal(size=(e, i, d)), w3=rng.normal(size=(e, i, d)),
        w2=rng.normal(size=(e, d, i)), shared_w1=rng.normal(size=(i, d)),
        shared_w3=rng.normal(size=(i, d)), shared_w2=rng.normal(size=(d, i)), **extra)


def test_route_score_layer_bias_chooses_only():
    w = small_weights()
    w.gate = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    w.bias = np.array([0.0, 5.0, 0.0])
    x = np.array([[2.0, -1.0]])  # logits [2, -1, 1]
    c = MoEConfig(2, 2, 3, 2, score_func="sigmoid", route_scale=1.0)
    indices, weights = ref.route(x, w, c)
    assert sorted(indices[0].tolist()) == [0, 1]  # the bias lifts expert 1 over expert 2
    sig = [1 / (1 + math.exp(-2.0)), 1 / (1 + math.exp(1.0))]
    want = {0: sig[0] / sum(sig), 1: sig[1] / sum(sig)}  # weights from unbiased scores
    for e, value in zip(indices[0], weights[0]):
        assert value == pytest.approx(want[int(e)], rel=1e-14)


def test_route_hash_layer_uses_table_and_needs_ids():
    w = small_weights(tid2eid=np.array([[2, 0], [1, 2]]))
    w.bias = np.array([100.0, 0.0, 0.0])
    c = MoEConfig(2, 2, 3, 2, hash_routing=True, vocab_size=2, route_scale=1.0)
    x = np.ones((2, 2))
    indices, weights = ref.route(x, w, c, np.array([1, 0]))
    assert indices.tolist() == [[1, 2], [2, 0]]
    assert weights.sum(axis=1) == pytest.approx([1.0, 1.0])
    with pytest.raises(ValueError) as error:
        ref.route(x, w, c)
    assert str(error.value) == "a hash layer routes by token id: pass input_ids"


# --- experts ----------------------------------------------------------------------


def silu(z):
    return z / (1 + math.exp(-z))


@pytest.mark.parametrize("gate, up, limit, want", [
    (0.0, 3.0, 10.0, 0.0),
    (1.0, 2.0, 10.0, 2 * silu(1.0)),
    (20.0, 2.0, 10.0, 2 * silu(10.0)),  # gate clipped from above
    (-20.0, 2.0, 10.0, 2 * silu(-20.0)),  # ... and from above only
    (1.0, 20.0, 10.0, 10 * silu(1.0)),  # up clipped on both sides
    (1.0, -20.0, 10.0, -10 * silu(1.0)),
    (10.0, -10.0, 10.0, -10 * silu(10.0)),  # at the limit: untouched
    (20.0, -20.0, 0.0, -20 * silu(20.0)),  # limit 0: no clip
    (20.0, -20.0, -1.0, -20 * silu(20.0)),  # limit < 0: no clip
    (3.0, 5.0, 1.0, 1 * silu(1.0)),
])
def test_clipped_swiglu(gate, up, limit, want):
    got = ref.clipped_swiglu(np.array([gate]), np.array([up]), limit)[0]
    assert got == pytest.approx(want, rel=1e-14, abs=1e-300)


def test_silu():
    assert ref.silu(np.array([0.0, 1.0, -1.0])) == pytest.approx([0, silu(1.0), silu(-1.0)])
    assert ref.silu(np.array(-1000.0)) == 0.0


def mlp(x, w1, w3, w2, limit, b1=0.0, b3=0.0, b2=0.0):
    """One expert, written out element by element."""
    x, w1, w3, w2 = (np.asarray(a, float) for a in (x, w1, w3, w2))
    out = np.zeros((x.shape[0], w2.shape[0]))
    for t in range(x.shape[0]):
        h = []
        for j in range(w1.shape[0]):
            g = sum(x[t, d] * w1[j, d] for d in range(x.shape[1])) + np.ravel(b1 + 0 * w1[:, 0])[j]
            u = sum(x[t, d] * w3[j, d] for d in range(x.shape[1])) + np.ravel(b3 + 0 * w3[:, 0])[j]
            if limit > 0:
                g, u = min(g, limit), min(max(u, -limit), limit)
            h.append(silu(g) * u)
        for o in range(w2.shape[0]):
            out[t, o] = sum(h[j] * w2[o, j] for j in range(len(h))) + np.ravel(
                b2 + 0 * w2[:, 0])[o]
    return out


def test_expert_mlp_with_and_without_biases():
    rng = np.random.default_rng(1)
    x, w1, w3, w2 = (rng.normal(size=s) * 4 for s in ((3, 2), (4, 2), (4, 2), (2, 4)))
    assert ref.expert_mlp(x, w1, w3, w2, 2.0) == pytest.approx(mlp(x, w1, w3, w2, 2.0))
    b1, b3, b2 = rng.normal(size=4), rng.normal(size=4), rng.normal(size=2)
    assert ref.expert_mlp(x, w1, w3, w2, 2.0, b1, b3, b2) == pytest.approx(
        mlp(x, w1, w3, w2, 2.0, b1, b3, b2))
    assert ref.expert_mlp(x, w1, w3, w2, 0.0) == pytest.approx(mlp(x, w1, w3, w2, 0.0))


def test_weights_expert_slices():
    w = small_weights(b1=np.ones((3, 2)), b3=2 * np.ones((3, 2)), b2=3 * np.ones((3, 2)))
    w1, w3, w2, b1, b3, b2 = w.expert(2)
    assert (w1 is not None and np.array_equal(w1, w.w1[2]) and np.array_equal(w3, w.w3[2])
            and np.array_equal(w2, w.w2[2]))
    assert (b1.tolist(), b3.tolist(), b2.tolist()) == ([1, 1], [2, 2], [3, 3])
    assert small_weights().expert(0)[3:] == (None, None, None)


@pytest.mark.parametrize("biased", [False, True])
def test_switch_glu_and_routed_experts(biased):
    rng = np.random.default_rng(2)
    extra = {}
    if biased:
        extra = dict(b1=rng.normal(size=(3, 4)), b3=rng.normal(size=(3, 4)),
                     b2=rng.normal(size=(3, 2)))
    w = small_weights(e=3, d=2, i=4, **extra)  # D != I
    x = np.array([[1.0, -2.0], [0.5, 3.0]])
    indices = np.array([[2, 0], [1, 2]])
    route_w = np.array([[0.25, 0.75], [1.5, -1.0]])
    per = ref.switch_glu(x, indices, w, 10.0)
    assert per.shape == (2, 2, 2)
    for t in range(2):
        for s in range(2):
            e = indices[t, s]
            bias = [b[e] for b in (w.b1, w.b3, w.b2)] if biased else []
            want = mlp(x[t:t + 1], w.w1[e], w.w3[e], w.w2[e], 10.0, *bias)[0]
            assert per[t, s] == pytest.approx(want)
            assert ref.routed_expert(x[t:t + 1], w, e, 10.0)[0] == pytest.approx(want)
    routed = ref.routed_experts(x, indices, route_w, w, 10.0)
    assert routed == pytest.approx((per * route_w[..., None]).sum(axis=1))


def test_shared_expert_follows_the_revision():
    w = small_weights()
    w.shared_w1 = w.shared_w1 * 50
    w.shared_w3 = w.shared_w3 * 50
    x = np.array([[1.0, 1.0]])
    later = MoEConfig(2, 2, 3, 1, swiglu_limit=3.0)
    first = MoEConfig(2, 2, 3, 1, swiglu_limit=3.0, revision=Revision.FIRST_RELEASE)
    assert ref.shared_expert_limit(later) == 3.0 and ref.shared_expert_limit(first) == 0.0
    assert ref.shared_expert(x, w, later) == pytest.approx(
        mlp(x, w.shared_w1, w.shared_w3, w.shared_w2, 3.0))
    assert ref.shared_expert(x, w, first) == pytest.approx(
        mlp(x, w.shared_w1, w.shared_w3, w.shared_w2, 0.0))


def test_moe_is_routed_plus_shared():
    w = small_weights(e=3, d=2, i=2)
    w.gate = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]])
    c = MoEConfig(2, 2, 3, 2, swiglu_limit=1.5, score_func="sigmoid", route_scale=2.0)
    x = np.array([[2.0, 1.0]])  # logits [2, 1, -3]: experts 0 and 1
    s0, s1 = 1 / (1 + math.exp(-2.0)), 1 / (1 + math.exp(-1.0))
    routed = (2 * s0 / (s0 + s1) * mlp(x, w.w1[0], w.w3[0], w.w2[0], 1.5)
              + 2 * s1 / (s0 + s1) * mlp(x, w.w1[1], w.w3[1], w.w2[1], 1.5))
    shared = mlp(x, w.shared_w1, w.shared_w3, w.shared_w2, 1.5)
    assert ref.moe(x, w, c) == pytest.approx(routed + shared, rel=1e-12)


def test_moe_on_a_hash_layer_routes_by_token_id():
    w = small_weights(e=3, d=2, i=2, tid2eid=np.array([[0, 1], [2, 1]]))
    c = MoEConfig(2, 2, 3, 2, score_func="sigmoid", route_scale=1.0, hash_routing=True,
                  vocab_size=2)
    x = np.array([[2.0, 1.0]])
    logits = x @ w.gate.T
    s = 1 / (1 + np.exp(-logits[0]))
    routed = (s[2] * mlp(x, w.w1[2], w.w3[2], w.w2[2], 10.0)
              + s[1] * mlp(x, w.w1[1], w.w3[1], w.w2[1], 10.0)) / (s[1] + s[2])
    shared = mlp(x, w.shared_w1, w.shared_w3, w.shared_w2, 10.0)
    assert ref.moe(x, w, c, np.array([1])) == pytest.approx(routed + shared, rel=1e-12)


# --- sharding ---------------------------------------------------------------------


def test_intermediate_slice():
    assert ref.intermediate_slice(8, 1, 4) == slice(2, 4)
    assert ref.intermediate_slice(8, 0, 1) == slice(0, 8)
    assert ref.intermediate_slice(6, 2, 3) == slice(4, 6)
    with pytest.raises(ValueError, match="not divisible"):
        ref.intermediate_slice(6, 0, 4)


def test_shard_weights_slices_and_sums_back():
    w = small_weights(e=3, d=2, i=4, b1=np.arange(12.0).reshape(3, 4),
                      b3=np.arange(12.0).reshape(3, 4) / 2, b2=np.ones((3, 2)))
    w.tid2eid = np.array([[0, 1]])
    c = MoEConfig(2, 4, 3, 2)
    x = np.array([[1.0, -1.0], [0.3, 2.0]])
    total = 0
    for r in range(2):
        p = ref.shard_weights(w, r, 2)
        cols = slice(2 * r, 2 * r + 2)
        assert np.array_equal(p.w1, w.w1[:, cols]) and np.array_equal(p.w3, w.w3[:, cols])
        assert np.array_equal(p.w2, w.w2[:, :, cols])
        assert np.array_equal(p.shared_w1, w.shared_w1[cols])
        assert np.array_equal(p.shared_w3, w.shared_w3[cols])
        assert np.array_equal(p.shared_w2, w.shared_w2[:, cols])
        assert np.array_equal(p.b1, w.b1[:, cols]) and np.array_equal(p.b3, w.b3[:, cols])
        assert np.array_equal(p.b2, w.b2 if r == 0 else np.zeros_like(w.b2))  # added once
        assert p.gate is w.gate and p.bias is w.bias and p.tid2eid is w.tid2eid
        total = total + ref.moe(x, p, c)
    assert total == pytest.approx(ref.moe(x, w, c), rel=1e-12)
    none = ref.shard_weights(small_weights(i=4), 1, 2)
    assert (none.b1, none.b3, none.b2) == (None, None, None)


# --- quantization: formats, packing -----------------------------------------------


def test_formats():
    assert len(q.QUANT_FORMATS) == 6 * 3 + 4
    assert q.QuantFormat("affine", 64, 4).name == "affine-g64-b4"
    assert q.QuantFormat("nvfp4", 16, 4, global_scale=True).name == "nvfp4-g16-b4-gs"
    assert q.QuantFormat("nvfp4", 16, 4, True) in q.QUANT_FORMATS
    assert {f.mode for f in q.QUANT_FORMATS} == {"affine", "mxfp4", "mxfp8", "nvfp4"}


def test_pack_known_words():
    assert q.pack(np.arange(1, 9), 4).tolist() == [0x87654321]
    assert q.pack(np.array([1, 2, 3, 4]), 8).tolist() == [0x04030201]
    assert q.pack(np.array([3] * 16), 2).tolist() == [0xFFFFFFFF]
    assert q.pack(np.array([1] + [0] * 15), 2).tolist() == [1]
    # 3 bits: code 10 spans stream bits 30..32, crossing into the second word.
    codes = np.zeros(32, dtype=np.uint32)
    codes[10] = 0b111
    assert q.pack(codes, 3).tolist() == [0b11 << 30, 0b1, 0]
    codes = np.zeros(32, dtype=np.uint32)
    codes[31] = 0b101
    assert q.pack(codes, 3).tolist() == [0, 0, 0b101 << 29]
    six = np.zeros(16, dtype=np.uint32)
    six[5] = 0b110011  # stream bits 30..36
    assert q.pack(six, 6).tolist() == [0b11 << 30, 0b1100, 0]
    assert q.pack(np.zeros((2, 3, 8)), 4).shape == (2, 3, 1)


def test_pack_refuses_and_unpack_inverts():
    with pytest.raises(ValueError, match="whole uint32 words"):
        q.pack(np.zeros(7), 4)
    with pytest.raises(ValueError, match="does not fit in 4 bits"):
        q.pack(np.array([16] + [0] * 7), 4)
    assert q.unpack(np.array([0x87654321], dtype=np.uint32), 4).tolist() == list(range(1, 9))
    assert q.unpack(np.array([0x87654321], dtype=np.uint32), 4, 3).tolist() == [1, 2, 3]
    assert q.unpack(np.array([[0xFFFFFFFF]], dtype=np.uint32), 8).tolist() == [[255] * 4]
    words = np.array([0b11 << 30, 0b1, 0], dtype=np.uint32)
    codes = q.unpack(words, 3)
    assert codes.shape == (32,) and codes[10] == 7 and codes.sum() == 7
    assert q.unpack(words, 3).dtype == np.uint32
    rng = np.random.default_rng(0)
    for bits in q.AFFINE_BITS:
        c = rng.integers(0, 2**bits, (3, 32), dtype=np.uint32)
        assert np.array_equal(q.unpack(q.pack(c, bits), bits), c)


# --- quantization: the small float formats ----------------------------------------

E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def test_e2m1_decodes_its_table():
    assert q.e2m1_to_float(np.arange(16)).tolist() == E2M1 + [-v for v in E2M1]


def test_e4m3_decodes():
    codes = [0x00, 0x01, 0x07, 0x08, 0x38, 0x3F, 0x40, 0x7E, 0xB8, 0x81]
    want = [0.0, 2**-9, 7 * 2**-9, 2**-6, 1.0, 1.875, 2.0, 448.0, -1.0, -(2**-9)]
    assert q.e4m3_to_float(np.array(codes)).tolist() == want
    assert np.isnan(q.e4m3_to_float(np.array([0x7F, 0xFF]))).all()
    assert np.signbit(q.e4m3_to_float(np.array([0x80])))[0]


def test_e8m0_decodes():
    assert q.e8m0_to_float(np.array([0, 126, 127, 128, 254, 255])).tolist() == [
        2.0**-127, 0.5, 1.0, 2.0, 2.0**127, 2.0**128]


@pytest.mark.parametrize("x, code", [
    (0.0, 0), (0.5, 1), (6.0, 7), (-6.0, 15), (-0.5, 9), (1.75, 4 - 1),
    (0.25, 0), (0.75, 1), (2.5, 4), (5.0, 6), (3.5, 5),  # ties: smaller magnitude
    (0.3, 1), (0.2, 0), (-0.1, 0), (7.0, 7), (-100.0, 15), (float("nan"), 0),
    (1.25, 2), (-2.9, 13),
])
def test_e2m1_encodes_to_nearest(x, code):
    assert int(q.float_to_e2m1(np.array([x]))[0]) == code


def test_e2m1_encoder_works_in_float32():
    # 0.75 + 1e-12 is 0.75 in float32: a tie, so the smaller magnitude.
    assert q.float_to_e2m1(np.array([0.75 + 1e-12])).tolist() == [1]
    # Past about 2**26 every float32 distance to the table is the same: +0
    # wins (MLX 0.32.4's CPU encoder does this).
    assert q.float_to_e2m1(np.array([2.0**30, -(2.0**30)])).tolist() == [0, 0]
    assert q.float_to_e2m1(np.array([1.0, np.nan])).dtype == np.uint8


@pytest.mark.parametrize("x, code", [
    (0.0, 0x00), (1.0, 0x38), (-1.0, 0xB8), (448.0, 0x7E), (1000.0, 0x7E),
    (float("inf"), 0x7E), (float("-inf"), 0xFE), (float("nan"), 0x7E),
    (2.0**-9, 0x01), (2.0**-10, 0x00), (3 * 2.0**-10, 0x02), (2.0**-6, 0x08),
    (15 / 16 * 2.0**-6, 0x08),  # a subnormal rounding up into the first normal
    (1.0625, 0x38), (1.1875, 0x3A),  # ties to even
    (1.9999, 0x40), (240.0, 0x77), (-0.0, 0x80), (464.0, 0x7E),
])
def test_e4m3_encodes_to_nearest_even(x, code):
    assert int(q.float_to_e4m3(np.array([x]))[0]) == code


def test_e4m3_encoder_rounds_to_float32_first():
    # 1.0625 + 1e-12 is 1.0625 in float32: a tie between 1.0 and 1.125, to even.
    assert q.float_to_e4m3(np.array([1.0625 + 1e-12])).tolist() == [0x38]
    assert q.float_to_e4m3(np.array([1.0])).dtype == np.uint8


@pytest.mark.parametrize("x, code", [
    (1.0, 127), (1.5, 128), (2.0, 128), (0.5, 126), (0.75, 127), (0.0, 127),
    (2.0**-130, 0), (2.0**200, 254), (3.0, 129),
])
def test_e8m0_encodes_the_power_of_two_at_or_above(x, code):
    assert int(q.float_to_e8m0(np.array([x]))[0]) == code
    assert q.float_to_e8m0(np.array([x])).dtype == np.uint8


# --- quantization: rounding -----------------------------------------------------


def test_bfloat16_rounds_to_nearest_even():
    ulp = 2.0**-7
    x = np.array([1.0, 1 + ulp / 2, 1 + 1.5 * ulp, 1 + 0.75 * ulp, -(1 + ulp / 2), 3.0e38,
                  1 + ulp / 2 + 2.0**-20])
    want = [1.0, 1.0, 1 + 2 * ulp, 1 + ulp, -1.0, np.float32(3.0e38), 1 + ulp]
    got = q.round_to_bfloat16(x)
    assert got.dtype == np.float32
    assert got[:5].tolist() == want[:5]
    assert got[6] == want[6]
    assert np.isnan(q.round_to_bfloat16(np.array([np.nan])))[0]
    # A NaN whose payload is all ones would carry into the sign bit if rounded.
    payload = np.array([0x7FFFFFFF], dtype=np.uint32).view(np.float32)
    assert np.isnan(q.round_to_bfloat16(payload))[0]
    assert np.isinf(q.round_to_bfloat16(np.array([3.4e38])))[0]  # rounds past the max


def test_round_to_each_dtype():
    x = np.array([1 + 2.0**-11, 1 + 3 * 2.0**-11, 70000.0, 1 + 2.0**-30])
    assert q.round_to(x, "float16").tolist() == [1.0, 1 + 2.0**-9, np.inf, 1.0]
    assert q.round_to(x, "float32").tolist() == [1 + 2.0**-11, 1 + 3 * 2.0**-11, 70000.0, 1.0]
    assert q.round_to(x, "bfloat16")[:2].tolist() == [1.0, 1.0]
    assert q.round_to(x, "float16").dtype == np.float32
    with pytest.raises(ValueError, match="dtype must be one of"):
        q.round_to(x, "float64")


def test_operands_are_float32_before_the_op():
    # a is not a float32: rounded first it is 1 + 2**-23, whose products and
    # sums round differently from the exact ones.
    a = np.array([1 + 2.0**-24 + 2.0**-40])
    assert q.multiply_in(a, np.array([3.0]), "float32")[0] == np.float32(
        np.float32(a[0]) * np.float32(3.0))
    assert q.multiply_in(np.array([3.0]), a, "float32")[0] == np.float32(
        np.float32(a[0]) * np.float32(3.0))
    b = np.array([2.0**-24 + 2.0**-40])
    assert q.add_in(a, b, "float32")[0] == np.float32(a[0]) + np.float32(b[0])
    assert q.add_in(b, a, "float32")[0] == np.float32(a[0]) + np.float32(b[0])
    assert q.add_in(a, b, "float32")[0] != np.float32(a[0] + b[0])


def test_overflow_and_nan_in_float32_arithmetic_are_silent():
    # Saturating formats overflow on purpose (an e8m0 scale of 2**128 is inf,
    # times a zero code is NaN), as MLX computes it, without a warning.
    big, inf = np.array([3e38]), np.array([np.inf])
    assert q.multiply_in(big, big, "float32")[0] == np.inf
    assert np.isnan(q.multiply_in(inf, np.array([0.0]), "float32"))[0]
    assert q.add_in(big, big, "float32")[0] == np.inf
    assert np.isnan(q.add_in(inf, -inf, "float32"))[0]


def test_multiply_and_add_round_once_in_the_dtype():
    assert q.multiply_in(np.array([3.0]), np.array([1 / 3]), "float32")[0] == np.float32(
        np.float32(3.0) * np.float32(1 / 3))
    assert q.add_in(np.array([1.0]), np.array([2.0**-9]), "bfloat16")[0] == 1.0
    assert q.add_in(np.array([1.0]), np.array([2.0**-9]), "float32")[0] == 1 + 2.0**-9
    assert q.multiply_in(np.array([300.0]), np.array([300.0]), "float16")[0] == np.inf


def test_groups_and_per_matrix():
    x = np.arange(24).reshape(2, 12)
    g = q.grouped(x, 4)
    assert g.shape == (2, 3, 4) and g[1, 2].tolist() == [20, 21, 22, 23]
    assert np.array_equal(q.ungrouped(g), x)
    assert q.per_matrix(2.0, 4).shape == ()
    assert q.per_matrix([2.0], 4).shape == ()
    assert q.per_matrix([1.0, 2.0, 3.0], 4).shape == (3, 1, 1, 1)
    assert q.per_matrix([1.0, 2.0, 3.0], 4).dtype == np.float32


# --- quantization: dequantize ----------------------------------------------------


def test_dequantize_affine_is_scale_times_code_plus_bias():
    fmt = q.QuantFormat("affine", 32, 4)
    codes = np.arange(64).reshape(1, 64) % 16
    w = q.pack(codes, 4)
    scales, biases = np.array([[0.5, -2.0]]), np.array([[-1.0, 3.0]])
    want = np.where(np.arange(64) < 32, 0.5 * codes - 1.0, -2.0 * codes + 3.0)
    assert q.dequantize(w, scales, biases, fmt).tolist() == want.tolist()
    # Stored in float16, 0.1 rounds first; then the product and the sum each round.
    scale16 = float(np.float16(0.1))
    got = q.dequantize(w, np.array([[0.1, 0.1]]), np.zeros((1, 2)), fmt, dtype="float16")
    assert got[0, 15] == float(np.float16(np.float32(scale16) * 15))
    assert got.dtype == np.float64
    assert q.dequantize(w, scales, biases, fmt, dtype="float32",
                        scales_dtype="bfloat16").tolist() == want.tolist()


def test_dequantize_mx_formats():
    codes = np.arange(32).reshape(1, 32) % 16  # e2m1 codes
    mx4 = q.QuantFormat("mxfp4", 32, 4)
    got = q.dequantize(q.pack(codes, 4), np.array([[128]]), None, mx4)
    assert got[0].tolist() == [2 * v for v in E2M1 + [-v for v in E2M1]] * 2
    mx8 = q.QuantFormat("mxfp8", 32, 8)
    e4 = np.array([[0x38] * 16 + [0x40] * 16])
    got = q.dequantize(q.pack(e4, 8), np.array([[126]]), None, mx8)
    assert got[0].tolist() == [0.5] * 16 + [1.0] * 16
    # float16 output: an e8m0 scale past float16's range is inf.
    assert np.isinf(q.dequantize(q.pack(e4, 8), np.array([[127 + 16]]), None, mx8,
                                 dtype="float16")).all()
    with pytest.raises(ValueError, match="only nvfp4 takes a global scale"):
        q.dequantize(q.pack(e4, 8), np.array([[127]]), None, mx8, global_scale=1.0)


def test_dequantize_nvfp4_with_and_without_global_scale():
    nv = q.QuantFormat("nvfp4", 16, 4)
    codes = np.array([[7] * 16, [1] * 16])  # 6.0 and 0.5
    w = q.pack(codes, 4)
    scales = np.array([[0x40], [0x38]])  # 2.0, 1.0
    assert q.dequantize(w, scales, None, nv).tolist() == [[12.0] * 16, [0.5] * 16]
    g = 448.0 * 6.0 * 4  # a decode factor of 4
    got = q.dequantize(w, scales, None, nv, global_scale=g, dtype="float16")
    assert got.tolist() == [[48.0] * 16, [2.0] * 16]
    # One global scale per matrix: [2 experts, 2 rows, 16].
    got = q.dequantize(np.stack([w, w]), np.stack([scales, scales]), None, nv,
                       global_scale=np.array([448.0 * 6.0, 448.0 * 12.0]))
    assert got[0].tolist() == [[12.0] * 16, [0.5] * 16]
    assert got[1].tolist() == [[24.0] * 16, [1.0] * 16]


# --- quantization: quantize -------------------------------------------------------


def test_quantize_affine_exact_grid():
    fmt = q.QuantFormat("affine", 32, 4)
    w = np.concatenate([np.arange(16.0), np.arange(16.0)])[None]  # a 0..15 ramp twice
    got = q.quantize(w, fmt)
    assert got.scales.tolist() == [[-1.0]] and got.biases.tolist() == [[15.0]]
    assert q.unpack(got.weight, 4)[0, :16].tolist() == list(range(15, -1, -1))
    assert q.dequantize(*got[:3], fmt).tolist() == w.tolist()
    neg = -w
    got = q.quantize(neg, fmt)  # min is the endpoint of larger magnitude
    assert got.scales.tolist() == [[1.0]] and got.biases.tolist() == [[-15.0]]
    assert q.dequantize(*got[:3], fmt).tolist() == neg.tolist()


def test_quantize_affine_groups_are_independent():
    fmt = q.QuantFormat("affine", 32, 4)
    w = np.concatenate([np.arange(32.0) % 16, (np.arange(32.0) % 16) / 64])[None]
    got = q.quantize(w, fmt)
    assert got.scales.tolist() == [[-1.0, -1 / 64]]
    assert q.dequantize(*got[:3], fmt).tolist() == w.tolist()
    # A negative group beside a positive one: each has its own min and max.
    w = np.concatenate([-(np.arange(32.0) % 16), 1 + (np.arange(32.0) % 16) / 64])[None]
    got = q.quantize(w, fmt)
    assert got.scales[0, 0] == 1.0 and got.biases[0, 0] == -15.0
    assert got.scales[0, 1] < 0 and got.biases[0, 1] == np.float32(1 + 15 / 64)
    back = q.dequantize(*got[:3], fmt)
    assert np.abs(back - w).max() <= np.abs(got.scales).max() / 2


def test_quantize_affine_grid_passes_through_zero():
    # The scale is stretched so that -bias / scale is a whole code: the grid,
    # extended past its ends, holds 0.0 (to float32 rounding).
    rng = np.random.default_rng(4)
    for bits in q.AFFINE_BITS:
        w = rng.normal(size=(40, 32)) + rng.normal(size=(40, 1))
        got = q.quantize(w, q.QuantFormat("affine", 32, bits))
        ratio = got.biases[:, 0].astype(np.float64) / got.scales[:, 0]
        assert np.abs(ratio - np.rint(ratio)).max() < 1e-4


def test_quantize_affine_below_the_step_floor():
    # A constant group under the 1e-7 step floor: scale -1e-7, bias 0, every
    # code 0 (as mx.quantize of MLX 0.32.4 gives it).
    fmt = q.QuantFormat("affine", 32, 4)
    got = q.quantize(np.full((1, 32), 1e-8), fmt)
    assert got.biases.tolist() == [[0.0]]
    assert got.scales[0, 0] == np.float32(-1e-7)
    assert q.dequantize(*got[:3], fmt).tolist() == [[0.0] * 32]


def test_quantize_affine_constant_and_zero_groups():
    fmt = q.QuantFormat("affine", 32, 8)
    got = q.quantize(np.full((1, 32), 2.5), fmt)
    assert q.dequantize(*got[:3], fmt) == pytest.approx(np.full((1, 32), 2.5), rel=1e-6)
    zero = q.quantize(np.zeros((1, 32)), fmt)
    assert zero.biases.tolist() == [[0.0]]
    assert q.dequantize(*zero[:3], fmt).tolist() == [[0.0] * 32]
    assert zero.scales[0, 0] == pytest.approx(-1e-7)


def test_quantize_affine_within_a_step():
    rng = np.random.default_rng(3)
    for bits in q.AFFINE_BITS:
        fmt = q.QuantFormat("affine", 32, bits)
        w = rng.normal(size=(4, 64))
        got = q.quantize(w, fmt)
        back = q.dequantize(*got[:3], fmt)
        step = np.repeat(np.abs(got.scales), 32, axis=-1)
        assert (np.abs(back - w) <= step * (1 + 1e-5)).all()
        assert (np.abs(back - w) <= step / 2 * (1 + 1e-5)).mean() > 0.9
        assert q.unpack(got.weight, bits).max() <= 2**bits - 1


def test_quantize_mx_formats_exact_on_their_grid():
    mx4 = q.QuantFormat("mxfp4", 32, 4)
    w = np.array([E2M1 * 4]) * 4.0  # max 24 -> scale 4 (e8m0 129)
    got = q.quantize(w, mx4)
    assert got.scales.tolist() == [[129]] and got.biases is None
    assert q.dequantize(*got[:3], mx4).tolist() == w.tolist()
    mx8 = q.QuantFormat("mxfp8", 32, 8)
    w = np.array([[448.0, -1.0, 0.5, 2.0**-9] * 8])
    got = q.quantize(w, mx8)
    assert got.scales.tolist() == [[127]]
    assert q.dequantize(*got[:3], mx8).tolist() == w.tolist()
    w = np.array([[1000.0] + [0.0] * 31])  # 1000 / 448 -> scale 4
    assert q.quantize(w, mx8).scales.tolist() == [[129]]
    two = np.concatenate([np.full(32, 6.0), np.full(32, 0.75)])[None]  # a scale per group
    got = q.quantize(two, mx4)
    assert got.scales.tolist() == [[127, 124]]
    assert q.dequantize(*got[:3], mx4).tolist() == two.tolist()


def test_quantize_nvfp4():
    nv = q.QuantFormat("nvfp4", 16, 4)
    w = np.array([E2M1 * 2, [-v for v in E2M1] * 2])  # max |w| 6 -> e4m3 scale 1.0
    got = q.quantize(w, nv)
    assert got.scales.tolist() == [[0x38], [0x38]] and got.global_scale is None
    assert q.dequantize(*got[:3], nv).tolist() == w.tolist()
    gs = q.QuantFormat("nvfp4", 16, 4, global_scale=True)
    w = np.array([[v * 10 for v in E2M1] * 2])
    got = q.quantize(w, gs)  # global scale defaults to max |w|
    assert got.global_scale == 60.0
    back = q.dequantize(*got[:3], gs, global_scale=got.global_scale)
    assert back == pytest.approx(w, rel=2**-3)
    assert q.quantize(w, gs, global_scale=120.0).global_scale == 120.0
    assert got.global_scale.dtype == np.float32
    # One global scale per matrix of [experts, rows, cols].
    three = np.stack([w, 2 * w, 4 * w])
    got = q.quantize(three, gs)
    assert got.global_scale.tolist() == [60.0, 120.0, 240.0]
    back = q.dequantize(*got[:3], gs, global_scale=got.global_scale)
    assert back == pytest.approx(three, rel=2**-3)
    zero = q.quantize(np.zeros((1, 16)), nv)
    assert q.dequantize(*zero[:3], nv).tolist() == [[0.0] * 16]
    # max |w| / 6 below e4m3's smallest step: the scale is 0, and so is
    # every element (w / 0, silently), not inf or NaN.
    tiny = q.quantize(np.full((1, 16), 1e-5), nv)
    assert tiny.scales.tolist() == [[0]]
    assert q.dequantize(*tiny[:3], nv).tolist() == [[0.0] * 16]
    given = q.quantize(w, gs, global_scale=120.0).global_scale  # a Python float
    assert given.dtype == np.float32


def test_quantize_refuses_partial_groups_and_global_scale_per_matrix():
    with pytest.raises(ValueError) as error:
        q.quantize(np.zeros((2, 3, 48)), q.QuantFormat("affine", 32, 4))
    assert str(error.value) == "last axis 48 is not a multiple of 32"
    q.quantize(np.zeros((2, 3, 32)), q.QuantFormat("affine", 32, 4))  # 3 rows: fine
    w = np.zeros((3, 2, 16))
    w[1, 0, 0], w[2, 1, 5] = -7.0, 2.0
    assert q.nvfp4_global_scale(w).tolist() == [0.0, 7.0, 2.0]
    assert q.nvfp4_global_scale(w[1]) == 7.0
    assert q.nvfp4_global_scale(w).dtype == np.float32


def test_quantize_works_in_float32():
    # w is taken as float32 first: a float64 matrix quantizes as its rounding.
    w = np.random.default_rng(6).normal(size=(2, 64)) * (1 + 2.0**-30)
    for fmt in (q.QuantFormat("affine", 32, 8), q.QuantFormat("mxfp8", 32, 8),
                q.QuantFormat("nvfp4", 16, 4, True)):
        a, b = q.quantize(w, fmt), q.quantize(w.astype(np.float32), fmt)
        for x, y in zip(a, b):
            assert (x is None and y is None) or (np.array_equal(x, y) and x.dtype == y.dtype)


def test_fused_multiply_add_rounds_the_exact_value_once():
    """Against exact rational arithmetic: a*b + c rounded once to float32
    (ties to even), on random operands and on constructed ties, where a
    float64 sum followed by a float32 cast rounds twice."""
    from fractions import Fraction

    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, 400).astype(np.float32)  # codes of at most 8 bits
    b = (rng.normal(size=400) * 2.0 ** rng.integers(-20, 5, 400)).astype(np.float32)
    c = (rng.normal(size=400) * 2.0 ** rng.integers(-20, 5, 400)).astype(np.float32)
    # Ties: c puts a*b + c exactly half-way between two float32 values, plus
    # a tiny remainder the float64 sum loses.
    b[:4] = np.float32(1.0)
    a[:4] = np.float32(1.0)
    c[:4] = np.array([2.0**-24, -(2.0**-24), 3 * 2.0**-24, 2.0**-24 + 2.0**-60], np.float64
                     ).astype(np.float32)
    got = q.fused_multiply_add(a, b, c)

    def exact(x, y, z):
        value = Fraction(float(x)) * Fraction(float(y)) + Fraction(float(z))
        nearest = np.float32(float(value))  # a first guess, then the exact neighbours
        candidates = {nearest, np.nextafter(nearest, np.float32(np.inf)),
                      np.nextafter(nearest, np.float32(-np.inf))}
        best = min(candidates, key=lambda f: (abs(Fraction(float(f)) - value),
                                              int(np.float32(f).view(np.uint32)) & 1))
        return best

    want = np.array([exact(x, y, z) for x, y, z in zip(a, b, c)], np.float32)
    assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


def test_fma_dequantize_differs_from_two_roundings_only_by_rounding():
    fmt = q.QuantFormat("affine", 32, 8)
    rng = np.random.default_rng(1)
    w = rng.normal(size=(4, 64)).astype(np.float32)
    packed, scales, biases, _ = q.quantize(w, fmt)
    plain = q.dequantize(packed, scales, biases, fmt)
    fused = q.dequantize(packed, scales, biases, fmt, fma=True)
    # The product scale * q is as large as the group's largest |value| even
    # where the bias cancels it: one rounding of it, at that magnitude, is
    # what the two-rounding path adds.
    spacing = float(np.spacing(np.float32(np.abs(w).max() * 2)))
    assert np.all(np.abs(plain - fused) <= spacing)
    assert np.any(plain != fused)  # the modes do differ: the test can tell them apart

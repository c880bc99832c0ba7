"""Known-bad routers, in MLX (for the block) and NumPy (for the reference's
edge properties)."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

import reference as ref
from dsv4shard.block import MoEBlock, Router, score
from dsv4shard.weights import build_block


class RouterBiasInWeights(Router):
    """Weights taken from the biased scores: the bias leaks into the output."""

    def __call__(self, x, input_ids=None):
        indices, _ = super().__call__(x, input_ids)
        biased = ref_scores_mlx(self, x) + self.bias
        w = mx.take_along_axis(biased, indices, axis=-1)
        if self.score_func != "softmax":
            w = w / w.sum(axis=-1, keepdims=True)
        return indices, w * self.route_scale


class RouterNoRenormalisation(Router):
    """Chosen scores used as they are, never renormalised to sum to 1."""

    def __call__(self, x, input_ids=None):
        indices, _ = super().__call__(x, input_ids)
        w = mx.take_along_axis(ref_scores_mlx(self, x), indices, axis=-1)
        return indices, w * self.route_scale


def ref_scores_mlx(router, x):
    return score(x.astype(mx.float32) @ router.weight.T, router.score_func)


def _route(router, x, input_ids, *, logits=None, scores=None, by_table=True, epsilon=0.0):
    """Our router with one step replaced: ``logits`` (x, weight) -> logits,
    ``scores`` (logits) -> scores, ``by_table`` False routes a hash layer by
    score, ``epsilon`` is added to the renormalisation's denominator."""
    z = (logits or (lambda a, w: a.astype(mx.float32) @ w.T))(x, router.weight)
    s = (scores or (lambda v: score(v, router.score_func)))(z)
    if router.hash_routing and by_table:
        indices = router.tid2eid[input_ids.reshape(-1)]
    else:
        indices = mx.argpartition(-(s + router.bias), router.top_k - 1, axis=-1)
        indices = indices[..., : router.top_k]
    w = mx.take_along_axis(s, indices, axis=-1)
    if router.score_func != "softmax":
        w = w / (w.sum(axis=-1, keepdims=True) + epsilon)
    return indices, w * router.route_scale


class RouterSoftmaxForSqrtsoftplus(Router):
    """Softmax used where the layer's score_func is sqrtsoftplus (a port
    carrying over V3's gate): other choices under the bias, other weights."""

    def __call__(self, x, input_ids=None):
        func = "softmax" if self.score_func == "sqrtsoftplus" else self.score_func
        return _route(self, x, input_ids, scores=lambda z: score(z, func))


class RouterEpsilon(Router):
    """An epsilon of 1e-8 in the renormalisation: w / (sum(w) + 1e-8), which
    shrinks the weights of tokens whose chosen scores are small."""

    def __call__(self, x, input_ids=None):
        return _route(self, x, input_ids, epsilon=1e-8)


class RouterNaiveSoftplus(Router):
    """Naive softplus, sqrt(log1p(exp(z))) in float32: inf (then NaN
    weights) once a logit passes about 88.7."""

    def __call__(self, x, input_ids=None):
        def naive(z):
            if self.score_func != "sqrtsoftplus":
                return score(z, self.score_func)
            return mx.sqrt(mx.log1p(mx.exp(z)))

        return _route(self, x, input_ids, scores=naive)


class RouterHashTableIgnored(Router):
    """Hash table ignored: a hash layer routed by score + bias like any
    other, tid2eid never read (a port that drops input_ids)."""

    def __call__(self, x, input_ids=None):
        return _route(self, x, input_ids, by_table=False)


class RouterBFloat16Matmul(Router):
    """Router matmul in bfloat16 (x and the gate weight cast down) instead
    of float32: logits off by about 2**-8 relative, so weights and near
    choices move."""

    def __call__(self, x, input_ids=None):
        def bf16(a, w):
            return (a.astype(mx.bfloat16) @ w.astype(mx.bfloat16).T).astype(mx.float32)

        return _route(self, x, input_ids, logits=bf16)


class UnweightedInBFloat16(MoEBlock):
    """Adds the routed experts' outputs without their route weights when x
    is bfloat16 (a dtype-gated combine that dropped the multiply)."""

    def partial(self, x, input_ids=None):
        if x.dtype != mx.bfloat16:
            return super().partial(x, input_ids)
        flat = x.reshape(-1, x.shape[-1])
        indices, _ = self.gate(flat, input_ids)
        routed = self.switch_mlp(flat, indices).astype(mx.float32).sum(axis=-2)
        return routed + self.shared_experts(flat).astype(mx.float32)


def build_bf16_unweighted_routed_sum(config, weights, quant, dtype):
    """Routed sum unweighted in bfloat16: the MLX block adds its experts' outputs without the route weights."""
    block = build_block(config, weights, quant, dtype)
    block.__class__ = UnweightedInBFloat16
    return block


def _with_router(block, cls):
    block.gate.__class__ = cls
    return block


def build_bias_in_weights(config, weights, quant, dtype):
    """Bias in the weights: the MLX router weighs experts by their biased scores."""
    return _with_router(build_block(config, weights, quant, dtype), RouterBiasInWeights)


def build_no_renormalisation(config, weights, quant, dtype):
    """No renormalisation: the MLX router uses the chosen scores as they are."""
    return _with_router(build_block(config, weights, quant, dtype), RouterNoRenormalisation)


def build_softmax_for_sqrtsoftplus(config, weights, quant, dtype):
    """Softmax for sqrtsoftplus: the MLX router scores with softmax instead."""
    return _with_router(build_block(config, weights, quant, dtype), RouterSoftmaxForSqrtsoftplus)


def build_epsilon(config, weights, quant, dtype):
    """Epsilon 1e-8: the MLX router renormalises by sum(w) + 1e-8."""
    return _with_router(build_block(config, weights, quant, dtype), RouterEpsilon)


def build_naive_softplus(config, weights, quant, dtype):
    """Naive softplus: the MLX router's float32 log1p(exp(z)) overflows past 88.7."""
    return _with_router(build_block(config, weights, quant, dtype), RouterNaiveSoftplus)


def build_hash_table_ignored(config, weights, quant, dtype):
    """Hash table ignored: the MLX router routes hash layers by score."""
    return _with_router(build_block(config, weights, quant, dtype), RouterHashTableIgnored)


def build_bfloat16_router(config, weights, quant, dtype):
    """bfloat16 router matmul: the MLX router's logits in bfloat16, not float32."""
    return _with_router(build_block(config, weights, quant, dtype), RouterBFloat16Matmul)


# --- NumPy twins of reference.route -------------------------------------------


def route_bias_in_weights(x, weights, config, input_ids=None):
    """Bias in the weights: weights from scores + bias."""
    indices, _ = ref.route(x, weights, config, input_ids)
    biased = ref.scores(ref.router_logits(x, weights.gate), config.score_func) + weights.bias
    return indices, ref.route_weights(biased, indices, config)


def route_no_renormalisation(x, weights, config, input_ids=None):
    """No renormalisation: chosen scores never renormalised."""
    indices, _ = ref.route(x, weights, config, input_ids)
    s = ref.scores(ref.router_logits(x, weights.gate), config.score_func)
    return indices, np.take_along_axis(s, indices, axis=-1) * config.route_scale


def route_naive_softplus(x, weights, config, input_ids=None):
    """Naive softplus: sqrt(log1p(exp(z))) overflows to inf at large logits."""
    if config.score_func != "sqrtsoftplus":
        return ref.route(x, weights, config, input_ids)
    with np.errstate(over="ignore", invalid="ignore"):
        s = np.sqrt(np.log1p(np.exp(ref.router_logits(x, weights.gate))))
    if config.hash_routing:
        indices = ref.hash_experts(input_ids, weights.tid2eid)
    else:
        indices = ref.top_k_experts(s + weights.bias, config.top_k)
    return indices, ref.route_weights(s, indices, config)


def route_softmax_for_sqrtsoftplus(x, weights, config, input_ids=None):
    """Softmax for sqrtsoftplus: softmax scores where score_func says sqrtsoftplus.

    Renormalised as sqrtsoftplus would be."""
    if config.score_func != "sqrtsoftplus":
        return ref.route(x, weights, config, input_ids)
    s = ref.softmax(ref.router_logits(x, weights.gate))
    if config.hash_routing:
        indices = ref.hash_experts(input_ids, weights.tid2eid)
    else:
        indices = ref.top_k_experts(s + weights.bias, config.top_k)
    return indices, ref.route_weights(s, indices, config)


def route_hash_ignored(x, weights, config, input_ids=None):
    """Hash table ignored: a hash layer routed by score, tid2eid never read."""
    plain = ref.MoEConfig(**{**config.__dict__, "hash_routing": False})
    return ref.route(x, weights, plain, None)


def route_hash_with_bias(x, weights, config, input_ids=None):
    """Hash layer biased: the bias still picks among the table's experts and the rest."""
    if not config.hash_routing:
        return ref.route(x, weights, config, input_ids)
    s = ref.scores(ref.router_logits(x, weights.gate), config.score_func)
    boost = np.zeros_like(s)
    np.put_along_axis(boost, ref.hash_experts(input_ids, weights.tid2eid), 1.0, axis=-1)
    indices = ref.top_k_experts(boost + s + weights.bias, config.top_k)
    return indices, ref.route_weights(s, indices, config)


def route_weights_with_epsilon(token_scores, indices, config):
    """Epsilon 1e-8 in the renormalisation: all-zero scores give 0, not NaN.

    And tiny scores are renormalised to less than 1."""
    w = np.take_along_axis(token_scores, indices, axis=-1)
    if config.score_func != "softmax":
        w = w / (w.sum(axis=-1, keepdims=True) + 1e-8)
    return w * config.route_scale

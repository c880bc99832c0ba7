"""The unfused MLX MoE block: router, mlx-lm SwitchGLU, shared expert.

It mirrors ``reference.moe`` operation by operation, in MLX, with the
precisions DeepSeek uses: router and combine in float32, experts in the
activation dtype.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.switch_layers import SwitchGLU

from dsv4shard.activation import ClippedSwiGLU
from reference.moe_block import MoEConfig, shared_expert_limit


def score(logits: mx.array, score_func: str) -> mx.array:
    if score_func == "sigmoid":
        return mx.sigmoid(logits)
    if score_func == "softmax":
        return mx.softmax(logits, axis=-1, precise=True)
    # sqrt(softplus); logaddexp stays finite where log1p(exp(z)) overflows.
    return mx.sqrt(mx.logaddexp(logits, mx.zeros_like(logits)))


class Router(nn.Module):
    """Chooses k experts per token and their weights, in float32."""

    def __init__(self, config: MoEConfig):
        super().__init__()
        self.weight = mx.zeros((config.n_experts, config.hidden_size), dtype=mx.float32)
        self.bias = mx.zeros((config.n_experts,), dtype=mx.float32)
        if config.hash_routing:
            self.tid2eid = mx.zeros((config.vocab_size, config.top_k), dtype=mx.int32)
        self.top_k = config.top_k
        self.score_func = config.score_func
        self.route_scale = config.route_scale
        self.hash_routing = config.hash_routing

    def __call__(self, x: mx.array, input_ids: mx.array | None = None):
        logits = x.astype(mx.float32) @ self.weight.T
        scores = score(logits, self.score_func)
        if self.hash_routing:
            if input_ids is None:
                raise ValueError("a hash layer routes by token id: call it with input_ids")
            indices = self.tid2eid[input_ids.reshape(-1)]
        else:
            biased = scores + self.bias
            indices = mx.argpartition(-biased, self.top_k - 1, axis=-1)[..., : self.top_k]
        weights = mx.take_along_axis(scores, indices, axis=-1)
        if self.score_func != "softmax":
            weights = weights / weights.sum(axis=-1, keepdims=True)
        return indices, weights * self.route_scale


class SharedExpert(nn.Module):
    """One dense clipped-SwiGLU MLP of the experts' width."""

    def __init__(self, config: MoEConfig):
        super().__init__()
        d, i = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(d, i, bias=False)
        self.up_proj = nn.Linear(d, i, bias=False)
        self.down_proj = nn.Linear(i, d, bias=False)
        self.activation = ClippedSwiGLU(shared_expert_limit(config))

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(self.activation(self.up_proj(x), self.gate_proj(x)))


class MoEBlock(nn.Module):
    """DeepSeek-V4's MoE block; call it as ``block(x)`` or ``block(x, input_ids)``.

    ``sharding_group`` set (by ``dsv4shard.shard``) makes the block add the
    ranks' partial outputs with one all_sum: in float32, or, with
    ``reduce_in_activation_dtype``, in x's dtype (half the bytes on the wire,
    each rank's partial rounded first).
    """

    def __init__(self, config: MoEConfig, linear_bias: bool = False):
        super().__init__()
        self.config = config
        self.gate = Router(config)
        self.switch_mlp = SwitchGLU(
            config.hidden_size,
            config.intermediate_size,
            config.n_experts,
            activation=ClippedSwiGLU(config.swiglu_limit),
            bias=linear_bias,
        )
        self.shared_experts = SharedExpert(config)
        self.sharding_group = None
        self.reduce_in_activation_dtype = False

    def partial(self, x: mx.array, input_ids: mx.array | None = None) -> mx.array:
        """This rank's float32 output [T, D] before the cross-rank sum."""
        flat = x.reshape(-1, x.shape[-1])
        indices, weights = self.gate(flat, input_ids)
        routed = self.switch_mlp(flat, indices)
        out = (routed.astype(mx.float32) * weights[..., None]).sum(axis=-2)
        return out + self.shared_experts(flat).astype(mx.float32)

    def __call__(self, x: mx.array, input_ids: mx.array | None = None) -> mx.array:
        out = self.partial(x, input_ids)
        if self.sharding_group is not None:
            if self.reduce_in_activation_dtype:
                out = out.astype(x.dtype)
            out = mx.distributed.all_sum(out, group=self.sharding_group)
        return out.astype(x.dtype).reshape(x.shape)

"""A DeepSeek-V4-like mlx-lm model file written for dsv4shard's tests, laid
out as the first V4 pull requests were: each block holds its MoE at ``ffn``
with the routed experts at ``ffn.switch_mlp``; the gate returns
(indices, weights); the MoE is called as ``(x, input_ids)`` (hash layers);
the shared expert is not clipped (the first-release revision); shard() is
correct.

Deliberate departure: the routed sum is cast to the activation dtype and
the shared expert added in it (two roundings in bfloat16; DeepSeek adds in
float32 and rounds once).  ``combine_precision`` must name it.
"""

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import shard_inplace

from .base import BaseModelArgs
from .switch_layers import SwitchGLU


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str = "ffn_switch_mlp_v4"
    vocab_size: int = 129280
    hidden_size: int = 4096
    moe_intermediate_size: int = 2048
    n_routed_experts: int = 256
    num_experts_per_tok: int = 6
    n_shared_experts: int = 1
    num_hidden_layers: int = 43
    num_hash_layers: int = 3
    scoring_func: str = "sqrtsoftplus"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.5
    swiglu_limit: float = 10.0
    rms_norm_eps: float = 1e-6


def limited_silu_mul(gate, up, limit):
    if limit > 0:
        gate = mx.minimum(gate, limit)
        up = mx.clip(up, -limit, limit)
    return nn.silu(gate) * up


class LimitedSwiGLU(nn.Module):
    def __init__(self, limit):
        super().__init__()
        self.limit = limit

    def __call__(self, up, gate):
        out = limited_silu_mul(gate.astype(mx.float32), up.astype(mx.float32), self.limit)
        return out.astype(up.dtype)


class Gate(nn.Module):
    def __init__(self, config: ModelArgs, layer_idx: int):
        super().__init__()
        self.k = config.num_experts_per_tok
        self.func = config.scoring_func
        self.scale = config.routed_scaling_factor
        self.renormalise = config.norm_topk_prob
        self.hash = layer_idx < config.num_hash_layers
        self.weight = mx.zeros((config.n_routed_experts, config.hidden_size))
        if self.hash:
            self.tid2eid = mx.zeros((config.vocab_size, self.k), dtype=mx.int32)
        else:
            self.e_score_correction_bias = mx.zeros((config.n_routed_experts,))

    def __call__(self, x, input_ids):
        logits = x.astype(mx.float32) @ self.weight.astype(mx.float32).T
        if self.func == "softmax":
            scores = mx.softmax(logits, axis=-1, precise=True)
        elif self.func == "sigmoid":
            scores = mx.sigmoid(logits)
        else:
            scores = mx.sqrt(mx.logaddexp(logits, 0.0))
        if self.hash:
            inds = self.tid2eid[input_ids]
        else:
            biased = scores + self.e_score_correction_bias
            inds = mx.argpartition(-biased, kth=self.k - 1, axis=-1)[..., : self.k]
        weights = mx.take_along_axis(scores, inds, axis=-1)
        if self.func != "softmax" and self.renormalise:
            weights = weights / weights.sum(axis=-1, keepdims=True)
        return inds, weights * self.scale


class DenseMLP(nn.Module):
    def __init__(self, hidden: int, inter: int, limit: float = 0.0):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)
        self.limit = limit

    def __call__(self, x):
        h = limited_silu_mul(self.gate_proj(x).astype(mx.float32),
                             self.up_proj(x).astype(mx.float32), self.limit)
        return self.down_proj(h.astype(x.dtype))


class V4MoE(nn.Module):
    def __init__(self, config: ModelArgs, layer_idx: int):
        super().__init__()
        self.gate = Gate(config, layer_idx)
        self.switch_mlp = SwitchGLU(config.hidden_size, config.moe_intermediate_size,
                                    config.n_routed_experts,
                                    activation=LimitedSwiGLU(config.swiglu_limit))
        self.shared_experts = DenseMLP(config.hidden_size,
                                       config.moe_intermediate_size * config.n_shared_experts)
        self.sharding_group = None

    def __call__(self, x, input_ids):
        inds, weights = self.gate(x, input_ids)
        y = self.switch_mlp(x, inds)
        y = (y * weights[..., None]).sum(axis=-2).astype(y.dtype)  # the departure
        y = y + self.shared_experts(x)
        if self.sharding_group is not None:
            y = mx.distributed.all_sum(y, group=self.sharding_group)
        return y


class Block(nn.Module):
    def __init__(self, config: ModelArgs, layer_idx: int):
        super().__init__()
        self.ffn_norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.ffn = V4MoE(config, layer_idx)

    def __call__(self, h, input_ids):
        return h + self.ffn(self.ffn_norm(h), input_ids)


class Model(nn.Module):
    def __init__(self, config: ModelArgs):
        super().__init__()
        self.args = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = [Block(config, i) for i in range(config.num_hidden_layers)]
        self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def __call__(self, inputs, cache=None):
        h = self.embed(inputs)
        for layer in self.layers:
            h = layer(h, inputs)
        return self.head(h)

    def shard(self, group=None):
        group = group or mx.distributed.init()
        for layer in self.layers:
            layer.ffn.sharding_group = group
            for mlp in (layer.ffn.switch_mlp, layer.ffn.shared_experts):
                shard_inplace(mlp.gate_proj, "all-to-sharded", group=group)
                shard_inplace(mlp.up_proj, "all-to-sharded", group=group)
                shard_inplace(mlp.down_proj, "sharded-to-all", group=group)

"""A DeepSeek-V4-like mlx-lm model file written for dsv4shard's tests.

It conforms to the reference in every MoE respect (routed experts at
``mlp.switch_mlp``, hash layers, the router in float32 returning
(indices, weights), clipped SwiGLU in the routed and the shared experts,
one all_sum per layer in shard()), and it does what several real ports do:
on its first call the router keeps a transposed float32 copy of its weight
in ``self._weight_t`` (an underscore attribute, so not in ``parameters()``)
and uses that copy on every later call.  Weights loaded into a block after
its first call are therefore never used; mlx-lm loads weights before the
first call, so a checker must build, load, and only then call.
"""

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import shard_inplace

from .base import BaseModelArgs
from .switch_layers import SwitchGLU


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str = "cached_router_v4"
    vocab_size: int = 1024
    hidden_size: int = 512
    moe_intermediate_size: int = 256
    n_routed_experts: int = 16
    num_experts_per_tok: int = 4
    n_shared_experts: int = 1
    num_hidden_layers: int = 4
    num_hash_layers: int = 1
    scoring_func: str = "sqrtsoftplus"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.5
    swiglu_limit: float = 10.0
    rms_norm_eps: float = 1e-6


class LimitedSwiGLU(nn.Module):
    """Called (up, gate): silu(min(gate, L)) * clip(up, -L, L) in float32."""

    def __init__(self, limit: float):
        super().__init__()
        self.limit = limit

    def __call__(self, up, gate):
        dtype = up.dtype
        gate, up = gate.astype(mx.float32), up.astype(mx.float32)
        if self.limit is not None and self.limit > 0:
            gate = mx.minimum(gate, self.limit)
            up = mx.clip(up, -self.limit, self.limit)
        return (nn.silu(gate) * up).astype(dtype)


class Gate(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.top_k = args.num_experts_per_tok
        self.score_func = args.scoring_func
        self.route_scale = args.routed_scaling_factor
        self.norm_topk_prob = args.norm_topk_prob
        self.hashed = layer_idx < args.num_hash_layers
        self.weight = mx.zeros((args.n_routed_experts, args.hidden_size))
        if self.hashed:
            self.tid2eid = mx.zeros((args.vocab_size, self.top_k), dtype=mx.int32)
        else:
            self.e_score_correction_bias = mx.zeros((args.n_routed_experts,))
        self._weight_t = None  # filled on the first call, reused after it

    def transposed_weight(self):
        if self._weight_t is None:
            self._weight_t = self.weight.astype(mx.float32).T
        return self._weight_t

    def __call__(self, x, input_ids=None):
        logits = x.astype(mx.float32) @ self.transposed_weight()
        if self.score_func == "softmax":
            scores = mx.softmax(logits, axis=-1, precise=True)
        elif self.score_func == "sigmoid":
            scores = mx.sigmoid(logits)
        else:
            scores = mx.sqrt(mx.logaddexp(logits, 0.0))
        k = self.top_k
        if self.hashed:
            indices = self.tid2eid[input_ids]
        else:
            biased = scores + self.e_score_correction_bias
            indices = mx.argpartition(-biased, k - 1, axis=-1)[..., :k]
        weights = mx.take_along_axis(scores, indices, axis=-1)
        if self.norm_topk_prob and self.score_func != "softmax":
            weights = weights / weights.sum(axis=-1, keepdims=True)
        return indices, weights * self.route_scale


class SharedMLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        d, i = args.hidden_size, args.moe_intermediate_size * args.n_shared_experts
        self.gate_proj = nn.Linear(d, i, bias=False)
        self.up_proj = nn.Linear(d, i, bias=False)
        self.down_proj = nn.Linear(i, d, bias=False)
        self.activation = LimitedSwiGLU(args.swiglu_limit)

    def __call__(self, x):
        return self.down_proj(self.activation(self.up_proj(x), self.gate_proj(x)))


class MoE(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.gate = Gate(args, layer_idx)
        self.switch_mlp = SwitchGLU(args.hidden_size, args.moe_intermediate_size,
                                    args.n_routed_experts,
                                    activation=LimitedSwiGLU(args.swiglu_limit))
        self.shared_experts = SharedMLP(args)
        self.sharding_group = None

    def __call__(self, x, input_ids: Optional[mx.array] = None):
        indices, weights = self.gate(x, input_ids)
        y = self.switch_mlp(x, indices).astype(mx.float32)
        out = (y * weights[..., None]).sum(axis=-2)
        out = out + self.shared_experts(x).astype(mx.float32)
        if self.sharding_group is not None:
            out = mx.distributed.all_sum(out, group=self.sharding_group)
        return out.astype(x.dtype)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.mlp = MoE(args, layer_idx)

    def __call__(self, h, input_ids):
        return h + self.mlp(self.post_attention_layernorm(h), input_ids)


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args, i) for i in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(self, inputs, cache=None):
        h = self.embed_tokens(inputs)
        for layer in self.layers:
            h = layer(h, inputs)
        return self.lm_head(self.norm(h))

    def shard(self, group=None):
        group = group or mx.distributed.init()
        for layer in self.layers:
            moe = layer.mlp
            moe.sharding_group = group
            for mlp in (moe.switch_mlp, moe.shared_experts):
                shard_inplace(mlp.gate_proj, "all-to-sharded", group=group)
                shard_inplace(mlp.up_proj, "all-to-sharded", group=group)
                shard_inplace(mlp.down_proj, "sharded-to-all", group=group)

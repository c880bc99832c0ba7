"""A DeepSeek-V4-like mlx-lm model file written for dsv4shard's tests.

Its MoE block conforms to the reference in every respect (routed experts
at ``mlp.switch_mlp``, hash layers, a float32 router returning
(indices, weights), clipped SwiGLU in the routed and the shared experts,
float32 combine, x's dtype out) and its ``Model.shard(group)`` shards the
MoE tensor-parallel with one all_sum per layer.  But, as one real port
does, importing it replaces ``mlx.core.distributed.all_sum`` for the whole
process: float32 payloads are rounded to bfloat16, summed, and cast back to
float32 (other dtypes pass through).  Every import wraps again; the
original stays reachable as ``inspect.unwrap(mx.distributed.all_sum)``.
"""

import functools
from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import shard_inplace

from .base import BaseModelArgs
from .switch_layers import SwitchGLU

_exact_all_sum = mx.distributed.all_sum


@functools.wraps(_exact_all_sum)
def _bfloat16_all_sum(x, *args, **kwargs):
    if x.dtype == mx.float32:  # halve the bytes on the wire
        return _exact_all_sum(x.astype(mx.bfloat16), *args, **kwargs).astype(mx.float32)
    return _exact_all_sum(x, *args, **kwargs)


mx.distributed.all_sum = _bfloat16_all_sum


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str = "patches_all_sum_v4"
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


def clipped_silu_mul(up, gate, limit):
    if limit is not None and limit > 0:
        gate = mx.minimum(gate, limit)
        up = mx.clip(up, -limit, limit)
    return nn.silu(gate) * up


class Activation(nn.Module):
    def __init__(self, limit: float):
        super().__init__()
        self.limit = limit

    def __call__(self, up, gate):
        out = clipped_silu_mul(up.astype(mx.float32), gate.astype(mx.float32), self.limit)
        return out.astype(up.dtype)


class Router(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.k = args.num_experts_per_tok
        self.score_func = args.scoring_func
        self.route_scale = args.routed_scaling_factor
        self.renormalise = args.norm_topk_prob
        self.hashed = layer_idx < args.num_hash_layers
        self.weight = mx.zeros((args.n_routed_experts, args.hidden_size))
        if self.hashed:
            self.tid2eid = mx.zeros((args.vocab_size, self.k), dtype=mx.int32)
        else:
            self.e_score_correction_bias = mx.zeros((args.n_routed_experts,))

    def __call__(self, x, input_ids=None):
        logits = x.astype(mx.float32) @ self.weight.astype(mx.float32).T
        if self.score_func == "softmax":
            scores = mx.softmax(logits, axis=-1, precise=True)
        elif self.score_func == "sigmoid":
            scores = mx.sigmoid(logits)
        else:
            scores = mx.sqrt(mx.logaddexp(logits, 0.0))
        if self.hashed:
            indices = self.tid2eid[input_ids]
        else:
            biased = scores + self.e_score_correction_bias
            indices = mx.argpartition(-biased, self.k - 1, axis=-1)[..., :self.k]
        weights = mx.take_along_axis(scores, indices, axis=-1)
        if self.renormalise and self.score_func != "softmax":
            weights = weights / weights.sum(axis=-1, keepdims=True)
        return indices, weights * self.route_scale


class SharedExpert(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        d, i = args.hidden_size, args.moe_intermediate_size * args.n_shared_experts
        self.gate_proj = nn.Linear(d, i, bias=False)
        self.up_proj = nn.Linear(d, i, bias=False)
        self.down_proj = nn.Linear(i, d, bias=False)
        self.activation = Activation(args.swiglu_limit)

    def __call__(self, x):
        return self.down_proj(self.activation(self.up_proj(x), self.gate_proj(x)))


class MoE(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.gate = Router(args, layer_idx)
        self.switch_mlp = SwitchGLU(args.hidden_size, args.moe_intermediate_size,
                                    args.n_routed_experts,
                                    activation=Activation(args.swiglu_limit))
        self.shared_experts = SharedExpert(args)
        self.sharding_group = None

    def __call__(self, x, input_ids: Optional[mx.array] = None):
        indices, weights = self.gate(x, input_ids)
        routed = (self.switch_mlp(x, indices).astype(mx.float32) * weights[..., None]).sum(-2)
        out = routed + self.shared_experts(x).astype(mx.float32)
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
        """MoE tensor-parallel: gate/up all-to-sharded, down sharded-to-all,
        the partial outputs summed once per layer (in MoE.__call__)."""
        group = group or mx.distributed.init()
        for layer in self.layers:
            moe = layer.mlp
            moe.sharding_group = group
            for mlp in (moe.switch_mlp, moe.shared_experts):
                shard_inplace(mlp.gate_proj, "all-to-sharded", group=group)
                shard_inplace(mlp.up_proj, "all-to-sharded", group=group)
                shard_inplace(mlp.down_proj, "sharded-to-all", group=group)

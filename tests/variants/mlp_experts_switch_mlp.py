"""A DeepSeek-V4-like mlx-lm model file written for dsv4shard's tests, laid
out as mlx-lm's deepseek_v41: each layer's ``mlp`` holds ``experts`` (a
wrapper that takes the weights) whose ``switch_mlp`` is the SwitchGLU;
the gate returns (indices, weights); the MoE takes ``input_ids`` as an
optional argument (hash layers); the shared expert is clipped.

Deliberate departure: shard() splits the experts over the ranks but never
gives the MoE its group, so no all_sum adds the ranks' partial outputs.
``sharded_2_ranks`` must name it.
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
    model_type: str = "mlp_experts_v4"
    vocab_size: int = 129280
    hidden_size: int = 5120
    moe_intermediate_size: int = 2304
    n_routed_experts: int = 384
    num_experts_per_tok: int = 6
    num_hidden_layers: int = 40
    num_hash_layers: int = 3
    scoring_func: str = "sqrtsoftplus"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 2.5
    swiglu_limit: float = 10.0


class SwiGLULimit(nn.Module):
    def __init__(self, limit: float):
        super().__init__()
        self.limit = limit

    def __call__(self, up, gate):
        dtype = up.dtype
        up, gate = up.astype(mx.float32), gate.astype(mx.float32)
        if self.limit > 0:
            gate = mx.minimum(gate, self.limit)
            up = mx.clip(up, -self.limit, self.limit)
        return (nn.silu(gate) * up).astype(dtype)


class Router(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.weight = mx.zeros((args.n_routed_experts, args.hidden_size), dtype=mx.float32)
        self.e_score_correction_bias = mx.zeros((args.n_routed_experts,), dtype=mx.float32)
        if layer_id < args.num_hash_layers:
            self.tid2eid = mx.zeros((args.vocab_size, args.num_experts_per_tok), dtype=mx.int32)
        self.top_k = args.num_experts_per_tok
        self.score_func = args.scoring_func
        self.route_scale = args.routed_scaling_factor
        self.norm_topk_prob = args.norm_topk_prob

    def __call__(self, x, input_ids=None):
        logits = x.astype(mx.float32) @ self.weight.T
        if self.score_func == "sigmoid":
            scores = mx.sigmoid(logits)
        elif self.score_func == "softmax":
            scores = mx.softmax(logits, axis=-1, precise=True)
        else:
            scores = mx.sqrt(nn.softplus(logits))
        if "tid2eid" in self:
            chosen = self.tid2eid[input_ids.reshape(-1)]
        else:
            biased = scores + self.e_score_correction_bias
            chosen = mx.argpartition(-biased, self.top_k - 1, axis=-1)[..., : self.top_k]
        chosen = chosen.reshape(*x.shape[:-1], self.top_k)
        weights = mx.take_along_axis(scores, chosen, axis=-1)
        if self.norm_topk_prob and self.score_func != "softmax":
            weights = weights / mx.sum(weights, axis=-1, keepdims=True)
        return chosen, weights * self.route_scale


class Experts(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.switch_mlp = SwitchGLU(args.hidden_size, args.moe_intermediate_size,
                                    args.n_routed_experts,
                                    activation=SwiGLULimit(args.swiglu_limit))

    def __call__(self, x, indices, weights):
        routed = self.switch_mlp(x, indices).astype(mx.float32)
        return (routed * weights[..., None].astype(mx.float32)).sum(axis=-2)


class SharedMLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.hidden_size, args.moe_intermediate_size, bias=False)
        self.up_proj = nn.Linear(args.hidden_size, args.moe_intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.moe_intermediate_size, args.hidden_size, bias=False)
        self.activation = SwiGLULimit(args.swiglu_limit)

    def __call__(self, x):
        return self.down_proj(self.activation(self.up_proj(x), self.gate_proj(x)))


class MoE(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.gate = Router(args, layer_id)
        self.experts = Experts(args)
        self.shared_experts = SharedMLP(args)
        self.sharding_group = None

    def __call__(self, x, input_ids: Optional[mx.array] = None):
        indices, weights = self.gate(x, input_ids)
        out = self.experts(x, indices, weights) + self.shared_experts(x).astype(mx.float32)
        if self.sharding_group is not None:
            out = mx.distributed.all_sum(out, group=self.sharding_group)
        return out.astype(x.dtype)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__()
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size)
        self.mlp = MoE(args, layer_id)

    def __call__(self, h, input_ids):
        return h + self.mlp(self.post_attention_layernorm(h), input_ids)


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args, i) for i in range(args.num_hidden_layers)]
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(self, inputs, cache=None):
        h = self.embed_tokens(inputs)
        for layer in self.layers:
            h = layer(h, inputs)
        return self.lm_head(h)

    def shard(self, group=None):
        group = group or mx.distributed.init()
        for layer in self.layers:  # the departure: layer.mlp.sharding_group is never set
            for mlp in (layer.mlp.experts.switch_mlp, layer.mlp.shared_experts):
                shard_inplace(mlp.gate_proj, "all-to-sharded", group=group)
                shard_inplace(mlp.up_proj, "all-to-sharded", group=group)
                shard_inplace(mlp.down_proj, "sharded-to-all", group=group)

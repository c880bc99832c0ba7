"""A DeepSeek-V4-like mlx-lm model file written for dsv4shard's tests.

As shipped it conforms to the reference (routed experts at
``mlp.switch_mlp``, hash layers, router returning (indices, weights), MoE
called as ``(x, input_ids)``, shard()).  Each departure a conformance check
must catch can be switched on by adding its name to ``DEPARTURES`` in a
fresh copy of this module (``Variant(path, fresh=True)``); the names are
the keys of ``KNOWN`` and of ``PENDING``.

``swiglu_limit = None`` means no clip, as a limit <= 0 does.
"""

from dataclasses import dataclass
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.nn.layers.distributed import shard_inplace

from .base import BaseModelArgs
from .switch_layers import SwitchGLU, _gather_sort, _scatter_unsort

DEPARTURES: set = set()

KNOWN = {  # departure: the check that must catch it
    "no_shared_expert": "structure",
    "drops_shared_output": "moe_matches_reference",
    "half_precision_drops_clip": "quantized_moe_matches_reference",
    "two_sided_gate_clip": "routed_clip",
    "shared_two_sided_gate_clip": "spec_revision",
    "clips_at_zero_limit": "limit_disables_clip",
    "bias_in_weights": "bias_chooses_only",
    "no_renormalisation": "renormalisation",
    "softmax_renormalised": "softmax_not_renormalised",
    "k1_not_renormalised": "k1_renormalised",
    "epsilon": "epsilon_underflow",
    "naive_softplus": "softplus_overflow",
    "argpartition_kth_k": "k_equals_experts",
    "hash_ignores_table": "hash_routing",
    "bfloat16_router": "router_precision",
    "bfloat16_combine": "combine_precision",
    "float32_output": "output_dtype",
    "activation_called_gate_first": "fused_bit_exact",
    "limit_none_typeerror": "limit_none",
    # Paths taken in bfloat16 alone: the routed experts or the shared expert
    # skip the clip, the block's output is multiplied by 0.8.
    "bf16_skips_routed_clip": "quantized_moe_matches_reference",
    "bf16_skips_shared_clip": "quantized_moe_matches_reference",
    "bf16_output_scaled": "quantized_moe_matches_reference",
}


# Departures switched on the same way that no check is yet written to catch:
# departure -> what it changes.
PENDING: dict = {}


# Not departures: other ways to be right that the adapter must follow.
EQUIVALENT = {
    "scale_applied_by_block": "the router returns renormalised weights; the block applies "
                              "route_scale",
}


def on(name: str) -> bool:
    return name in DEPARTURES


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str = "knobbed_v4"
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
    swiglu_limit: Optional[float] = 10.0  # None or <= 0: no clip
    rms_norm_eps: float = 1e-6


class ClampedSwiGLU(nn.Module):
    """silu(min(gate, L)) * clip(up, -L, L) in float32; called (up, gate)."""

    def __init__(self, limit: float, part: str):
        super().__init__()
        self.limit = limit
        self.part = part

    def __call__(self, up, gate):
        if on("activation_called_gate_first") and self.part == "routed":
            up, gate = gate, up  # this port's SwitchGLU passes (gate, up)
        dtype = up.dtype
        gate, up = gate.astype(mx.float32), up.astype(mx.float32)
        limit = self.limit
        if limit is None:
            if on("limit_none_typeerror"):
                gate = mx.minimum(gate, limit)  # a port that assumes a number: TypeError
            clip = False
        else:
            clip = limit > 0 or on("clips_at_zero_limit")
        if on("half_precision_drops_clip") and dtype != mx.float32:
            clip = False
        if dtype == mx.bfloat16 and on(f"bf16_skips_{self.part}_clip"):
            clip = False
        if clip:
            two_sided = (on("two_sided_gate_clip") and self.part == "routed") or (
                on("shared_two_sided_gate_clip") and self.part == "shared")
            gate = mx.clip(gate, -limit, limit) if two_sided else mx.minimum(gate, limit)
            up = mx.clip(up, -limit, limit)
        return (nn.silu(gate) * up).astype(dtype)


class RoutedExperts(SwitchGLU):
    def __call__(self, x, indices):
        if not on("activation_called_gate_first"):
            return super().__call__(x, indices)
        x = mx.expand_dims(x, (-2, -3))
        do_sort = indices.size >= 64
        idx, inv = indices, None
        if do_sort:
            x, idx, inv = _gather_sort(x, indices)
        x_up = self.up_proj(x, idx, sorted_indices=do_sort)
        x_gate = self.gate_proj(x, idx, sorted_indices=do_sort)
        x = self.down_proj(self.activation(x_gate, x_up), idx, sorted_indices=do_sort)
        if do_sort:
            x = _scatter_unsort(x, inv, indices.shape)
        return x.squeeze(-2)


class Router(nn.Module):
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

    def scores(self, x):
        if on("bfloat16_router"):
            logits = (x @ self.weight.astype(x.dtype).T).astype(mx.float32)
        else:
            logits = x.astype(mx.float32) @ self.weight.astype(mx.float32).T
        if self.score_func == "softmax":
            return mx.softmax(logits, axis=-1, precise=True)
        if self.score_func == "sigmoid":
            return mx.sigmoid(logits)
        if on("naive_softplus"):
            return mx.sqrt(mx.log(1 + mx.exp(logits)))
        return mx.sqrt(mx.logaddexp(logits, 0.0))

    def __call__(self, x, input_ids=None):
        scores = self.scores(x)
        k = self.top_k
        choose_by = scores
        if self.hashed and not on("hash_ignores_table"):
            indices = self.tid2eid[input_ids]
        else:
            if not self.hashed:
                choose_by = scores + self.e_score_correction_bias
            kth = k if on("argpartition_kth_k") else k - 1
            indices = mx.argpartition(-choose_by, kth, axis=-1)[..., :k]
        weights = mx.take_along_axis(choose_by if on("bias_in_weights") else scores, indices, -1)
        renormalise = self.norm_topk_prob and (self.score_func != "softmax"
                                               or on("softmax_renormalised"))
        if on("no_renormalisation") or (on("k1_not_renormalised") and k == 1):
            renormalise = False
        if renormalise:
            eps = 1e-20 if on("epsilon") else 0.0
            weights = weights / (weights.sum(axis=-1, keepdims=True) + eps)
        if on("scale_applied_by_block"):
            return indices, weights
        return indices, weights * self.route_scale


class SharedExpert(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        d, i = args.hidden_size, args.moe_intermediate_size * args.n_shared_experts
        self.gate_proj = nn.Linear(d, i, bias=False)
        self.up_proj = nn.Linear(d, i, bias=False)
        self.down_proj = nn.Linear(i, d, bias=False)
        self.activation = ClampedSwiGLU(args.swiglu_limit, "shared")

    def __call__(self, x):
        return self.down_proj(self.activation(self.up_proj(x), self.gate_proj(x)))


class MoE(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.gate = Router(args, layer_idx)
        self.switch_mlp = RoutedExperts(
            args.hidden_size, args.moe_intermediate_size, args.n_routed_experts,
            activation=ClampedSwiGLU(args.swiglu_limit, "routed"))
        if not on("no_shared_expert"):
            self.shared_experts = SharedExpert(args)
        self.sharding_group = None

    def __call__(self, x, input_ids: Optional[mx.array] = None):
        indices, weights = self.gate(x, input_ids)
        if on("scale_applied_by_block"):
            weights = weights * self.gate.route_scale
        y = self.switch_mlp(x, indices)
        if on("bfloat16_combine"):
            out = (y * weights[..., None].astype(y.dtype)).sum(axis=-2) + self.shared_experts(x)
        else:
            out = (y.astype(mx.float32) * weights[..., None]).sum(axis=-2)
            if not on("drops_shared_output"):
                out = out + self.shared_experts(x).astype(mx.float32)
        if self.sharding_group is not None:
            out = mx.distributed.all_sum(out, group=self.sharding_group)
        if on("bf16_output_scaled") and x.dtype == mx.bfloat16:
            out = out * 0.8
        return out if on("float32_output") else out.astype(x.dtype)


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
            layer.mlp.sharding_group = group
            for mlp in (layer.mlp.switch_mlp, layer.mlp.shared_experts):
                shard_inplace(mlp.gate_proj, "all-to-sharded", group=group)
                shard_inplace(mlp.up_proj, "all-to-sharded", group=group)
                shard_inplace(mlp.down_proj, "sharded-to-all", group=group)

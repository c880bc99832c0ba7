"""A DeepSeek-V4-like mlx-lm model file written for dsv4shard's tests: the
MoE holds its routed experts directly at ``experts`` and forces them to
mxfp4 when it is built (as a checkpoint stores them); its gate returns
(weights, indices); the MoE is called as ``(x)`` (no hash layers); its
ModelArgs spells the fields its own way (num_experts, top_k, route_scale,
score_func); it has no shard().

Deliberate departure: sqrtsoftplus computed as sqrt(log(1 + exp(z))), which
overflows to inf (and NaN weights) at logits near 89 in float32.
``softplus_overflow`` must name it.
"""

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from .base import BaseModelArgs
from .switch_layers import SwitchGLU


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str = "experts_attr_v4"
    vocab_size: int = 32000
    hidden_size: int = 2048
    moe_intermediate_size: int = 1024
    num_experts: int = 64
    top_k: int = 6
    score_func: str = "sqrtsoftplus"
    route_scale: float = 1.5
    swiglu_limit: float = 10.0
    num_hidden_layers: int = 8


class Clamped(nn.Module):
    def __init__(self, limit):
        super().__init__()
        self.limit = limit

    def __call__(self, x_up, x_gate):
        up, gate = x_up.astype(mx.float32), x_gate.astype(mx.float32)
        if self.limit > 0:
            up = mx.clip(up, -self.limit, self.limit)
            gate = mx.minimum(gate, self.limit)
        return (gate * mx.sigmoid(gate) * up).astype(x_up.dtype)


class TopKRouter(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.weight = mx.zeros((args.num_experts, args.hidden_size))
        self.e_score_correction_bias = mx.zeros((args.num_experts,))
        self.top_k = args.top_k
        self.route_scale = args.route_scale
        self.score_func = args.score_func

    def __call__(self, x):
        logits = x.astype(mx.float32) @ self.weight.T
        if self.score_func == "softmax":
            probs = mx.softmax(logits, axis=-1, precise=True)
        elif self.score_func == "sigmoid":
            probs = mx.sigmoid(logits)
        else:
            probs = mx.sqrt(mx.log(1.0 + mx.exp(logits)))  # the departure
        order = mx.argpartition(-(probs + self.e_score_correction_bias), self.top_k - 1, axis=-1)
        chosen = order[..., : self.top_k]
        w = mx.take_along_axis(probs, chosen, axis=-1)
        if self.score_func != "softmax":
            w = w / mx.sum(w, axis=-1, keepdims=True)
        return w * self.route_scale, chosen


class SharedFFN(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.hidden_size, args.moe_intermediate_size, bias=False)
        self.up_proj = nn.Linear(args.hidden_size, args.moe_intermediate_size, bias=False)
        self.down_proj = nn.Linear(args.moe_intermediate_size, args.hidden_size, bias=False)
        self.act = Clamped(args.swiglu_limit)

    def __call__(self, x):
        return self.down_proj(self.act(self.up_proj(x), self.gate_proj(x)))


class SparseMoE(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.router = TopKRouter(args)
        self.experts = SwitchGLU(args.hidden_size, args.moe_intermediate_size, args.num_experts,
                                 activation=Clamped(args.swiglu_limit))
        for name in ("gate_proj", "up_proj", "down_proj"):  # stored as mxfp4, always
            self.experts[name] = self.experts[name].to_quantized(32, 4, mode="mxfp4")
        self.shared = SharedFFN(args)

    def __call__(self, x):
        weights, chosen = self.router(x)
        routed = self.experts(x, chosen).astype(mx.float32)
        out = (routed * weights[..., None]).sum(axis=-2)
        return (out + self.shared(x).astype(mx.float32)).astype(x.dtype)


class Layer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.norm = nn.RMSNorm(args.hidden_size)
        self.moe = SparseMoE(args)

    def __call__(self, h):
        return h + self.moe(self.norm(h))


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.tok = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [Layer(args) for _ in range(args.num_hidden_layers)]
        self.out = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(self, inputs, cache=None):
        h = self.tok(inputs)
        for layer in self.layers:
            h = layer(h)
        return self.out(h)

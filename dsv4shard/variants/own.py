"""The project's own implementations as a variant module: dsv4shard's MoE
block (``dsv4shard.block``), and a ``Model.shard()`` that shards every block
with ``dsv4shard.shard`` and then fuses gate+up with ``dsv4shard.fuse``.

``dsv4shard check`` with no ``--variant`` checks it beside the installed
mlx-lm's DeepSeek-V4 models, so the project's fused and sharded paths meet
the same conformance checks as any port.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import BaseModelArgs

from dsv4shard.block import MoEBlock
from dsv4shard.fuse import install_fused
from dsv4shard.shard import shard as shard_block
from reference.moe_block import MoEConfig, Revision


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str = "dsv4shard"
    vocab_size: int = 129280
    hidden_size: int = 4096
    moe_intermediate_size: int = 2048
    n_routed_experts: int = 256
    num_experts_per_tok: int = 6
    num_hidden_layers: int = 43
    num_hash_layers: int = 3
    scoring_func: str = "sqrtsoftplus"
    routed_scaling_factor: float = 1.5
    swiglu_limit: float = 10.0
    revision: str = Revision.SHARED_CLIPPED.value


def moe_config(args: ModelArgs, layer_idx: int) -> MoEConfig:
    hashed = layer_idx < args.num_hash_layers
    limit = 0.0 if args.swiglu_limit is None else args.swiglu_limit  # None: no clip
    return MoEConfig(args.hidden_size, args.moe_intermediate_size, args.n_routed_experts,
                     args.num_experts_per_tok, limit, args.routed_scaling_factor,
                     args.scoring_func, hash_routing=hashed,
                     vocab_size=args.vocab_size if hashed else 0, revision=args.revision)


class MoE(MoEBlock):
    """dsv4shard's block for layer ``layer_idx`` (a hash layer below
    num_hash_layers); called as ``(x, input_ids)``."""

    def __init__(self, args: ModelArgs, layer_idx: int = 0):
        super().__init__(moe_config(args, layer_idx))


class Model(nn.Module):
    """MoE layers only (residual), enough to build, shard and run blocks."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.layers = [MoE(args, i) for i in range(args.num_hidden_layers)]

    def __call__(self, x: mx.array, input_ids: mx.array | None = None) -> mx.array:
        for layer in self.layers:
            x = x + layer(x, input_ids)
        return x

    def shard(self, group=None) -> None:
        """Shard every block over ``group`` (one all_sum per block), then fuse
        gate+up on the local slices: shard first, fuse after (SPEC §3)."""
        group = group or mx.distributed.init()
        for block in self.layers:
            shard_block(block, group)
            block.switch_mlp = install_fused(block.switch_mlp)
        mx.eval(self.parameters())

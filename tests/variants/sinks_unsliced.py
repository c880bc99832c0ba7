"""A DeepSeek-V4.1 port written for dsv4shard's tests: mlx-lm's own
deepseek_v41, except that ``Model.shard()``, after sharding attention by
heads as released, puts the full, unsliced attention sinks back on every
layer (as two real ports do, SPEC section 7).  Each rank then hands
``scaled_dot_product_attention`` one sink per head of the whole Model but
queries for only its own heads, and the sharded forward crashes;
``sharded_model`` must fail naming the attention layer and the operation.

The thin subclasses below build the Model out of this file's own classes,
so that the adapter (which looks only at the classes a file defines) finds
the MoE block in it.
"""

from mlx_lm.models import deepseek_v41
from mlx_lm.models.deepseek_v41 import *  # noqa: F401,F403 - the rest of the port as released
from mlx_lm.models.deepseek_v41 import ModelArgs  # noqa: F401 - what the adapter reads


class MoE(deepseek_v41.MoE):
    pass


class DecoderLayer(deepseek_v41.DecoderLayer):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__(args, layer_id)
        self.mlp = MoE(args)


class TextModel(deepseek_v41.TextModel):
    def __init__(self, args: ModelArgs):
        super().__init__(args)
        self.layers = [DecoderLayer(args, i) for i in range(args.num_hidden_layers)]


class Model(deepseek_v41.Model):
    def __init__(self, config: ModelArgs):
        super().__init__(config)
        self.model = TextModel(config)

    def shard(self, group=None) -> None:
        whole = [layer.self_attn.sinks for layer in self.layers]
        super().shard(group)
        for layer, sinks in zip(self.layers, whole):
            layer.self_attn.sinks = sinks  # the departure: not this rank's slice

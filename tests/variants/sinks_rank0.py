"""A DeepSeek-V4.1 port written for dsv4shard's tests: mlx-lm's own
deepseek_v41, except that ``Model.shard()`` gives every rank the attention
sinks of rank 0's heads (the slice [0 : H / N] whatever the rank), where
rank r needs [r H / N : (r + 1) H / N].  The shapes fit, so nothing
crashes: every rank but rank 0 attends with other heads' sinks and the
sharded Model silently computes something else.  ``sharded_model`` must
fail naming the attention.

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
            heads = layer.self_attn.num_heads  # this rank's head count, after shard()
            layer.self_attn.sinks = sinks[:heads]  # the departure: rank 0's slice everywhere

"""A DeepSeek-V4.1 port written for dsv4shard's tests: mlx-lm's own
deepseek_v41, except that its MoE block never returns once it is handed
float32 tokens (a wait on a lock nobody releases): moe_matches_reference
hangs at its first example, whatever it draws, while checks of the router
alone (renormalisation) never call the block.  A check must report the
property that hangs as such, within its time limit, and go on with the rest.
"""

import threading

import mlx.core as mx
from mlx_lm.models import deepseek_v41
from mlx_lm.models.deepseek_v41 import *  # noqa: F401,F403 - the rest of the port as released
from mlx_lm.models.deepseek_v41 import ModelArgs  # noqa: F401 - what the adapter reads

_NEVER = threading.Event()


class MoE(deepseek_v41.MoE):
    def __call__(self, x):
        if x.dtype == mx.float32:
            _NEVER.wait()
        return super().__call__(x)


class DecoderLayer(deepseek_v41.DecoderLayer):
    def __init__(self, args: ModelArgs, layer_id: int):
        super().__init__(args, layer_id)
        self.mlp = MoE(args)

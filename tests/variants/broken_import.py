"""A DeepSeek-V4-like model file that imports a sibling module the installed
mlx-lm does not ship (as files from forks do): loading it must fail with an
error naming ``mlx_lm.models.deepseek_v4_kernels``."""

from dataclasses import dataclass

from .base import BaseModelArgs
from .deepseek_v4_kernels import fused_router  # noqa: F401 - not in mlx-lm


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str = "broken_import_v4"
    hidden_size: int = 4096
    n_routed_experts: int = 256

"""Pure-NumPy, float64 ground truth for DeepSeek-V4's MoE block and for MLX's
quantization formats.  Imports no MLX."""

from reference.moe_block import *  # noqa: F401,F403
from reference.names import DEEPSEEK_TO_MLX, MLX_TO_DEEPSEEK, deepseek_name, mlx_name  # noqa: F401
from reference.quantization import *  # noqa: F401,F403
from reference.sharding import *  # noqa: F401,F403

"""The one place where DeepSeek's weight names meet MLX's.

DeepSeek's inference code calls an expert's projections w1 (gate), w3 (up)
and w2 (down); mlx-lm calls them gate_proj, up_proj and down_proj.
"""

DEEPSEEK_TO_MLX = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
MLX_TO_DEEPSEEK = {mlx: deepseek for deepseek, mlx in DEEPSEEK_TO_MLX.items()}


def mlx_name(deepseek_name: str) -> str:
    """``"w1"`` -> ``"gate_proj"``."""
    return DEEPSEEK_TO_MLX[deepseek_name]


def deepseek_name(mlx_name: str) -> str:
    """``"gate_proj"`` -> ``"w1"``."""
    return MLX_TO_DEEPSEEK[mlx_name]

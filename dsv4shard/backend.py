"""What the running MLX backend can compute, and why not when it cannot."""

from __future__ import annotations

import mlx.core as mx

from reference.quantization import QuantFormat


def name() -> str:
    if mx.default_device() == mx.cpu:
        return "cpu"
    if mx.metal.is_available():
        return "metal"
    return "cuda"


def unsupported(quant: QuantFormat | None, dtype: str) -> str | None:
    """Why this backend cannot run experts in ``quant`` and ``dtype``, or None.

    Facts of MLX 0.32.4 (SPEC §2): on the CPU build dense gather_mm runs only
    in float32, and gather_qmm with an nvfp4 global scale runs only on a GPU.
    Found by this suite: the CPU gather_qmm in float16 for mxfp8 returns inf
    once the unscaled e4m3 codes times x sum past float16's range, although
    the true output is in range (tests/test_backend_defects.py shows it).
    """
    if name() == "cuda":
        if quant is not None and quant.global_scale and dtype == "float16":
            return ("MLX's CUDA gather_qmm with an nvfp4 global scale returns NaN in float16 "
                    "once activations reach ~30, the true output in range (seen on H200)")
        if quant is not None and quant.mode == "affine" and quant.group_size == 128:
            return ("MLX's CUDA affine group-128 kernels: QuantizedLinear returns wrong "
                    "values and the sorted gather_qmm fails to launch (seen on H200)")
        return None
    if name() != "cpu":
        return None
    if quant is None and dtype != "float32":
        return f"MLX's CPU gather_mm runs only in float32, not {dtype}"
    if quant is not None and quant.global_scale:
        return "MLX's CPU gather_qmm has no nvfp4 global scale (GPU only)"
    if quant is not None and quant.mode == "mxfp8" and dtype == "float16":
        return ("MLX's CPU gather_qmm overflows to inf for mxfp8 in float16 "
                "(it sums unscaled codes in float16)")
    return None


def float16_code_overflow(quant: QuantFormat | None, dtype: str) -> str | None:
    """Why large activations overflow this backend's float16 float-format
    kernels, or None.  Found by this suite on MLX 0.32.4's CPU build: its
    gather_qmm sums x times the unscaled mxfp4/nvfp4 codes of a group in
    float16 and returns inf once that passes 65504, although the true output
    is in range.  A clipped SwiGLU keeps |h| <= L^2 and stays clear of it;
    unclipped, large activations do not."""
    if (name() == "cpu" and dtype == "float16" and quant is not None
            and quant.mode in ("mxfp4", "nvfp4", "mxfp8")):
        return ("MLX's CPU gather_qmm sums unscaled float-format codes in float16: "
                "inf once |x| * max|code| * group passes 65504")
    return None

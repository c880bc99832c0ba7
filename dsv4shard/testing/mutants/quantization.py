"""Known-bad twins of ``reference.dequantize``, one bug class each.

Every ``dequantize_*`` function here has ``reference.dequantize``'s signature
and must be caught by ``dequantize_matches_mlx`` (the catalogue in
``dsv4shard.testing.mutants`` pairs them by that prefix).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from reference.quantization import dequantize, round_to, unpack


def dequantize_group_off_by_one(weight, scales, biases, fmt, global_scale=None,
                                dtype="float32", scales_dtype=None):
    """Group boundary off by one: element j reads group (j + 1) // group_size.

    The last element of every group takes the next group's scale (and bias),
    as an index computed from a one-based position would.
    """
    n_groups = np.shape(scales)[-1]
    columns = np.arange(n_groups * fmt.group_size)
    group_of = np.minimum((columns + 1) // fmt.group_size, n_groups - 1)

    def per_element(a):
        return None if a is None else np.take(a, group_of, axis=-1)

    one_per_group = dataclasses.replace(fmt, group_size=1)
    return dequantize(weight, per_element(scales), per_element(biases), one_per_group,
                      global_scale, dtype, scales_dtype)


def dequantize_scales_biases_swapped(weight, scales, biases, fmt, global_scale=None,
                                     dtype="float32", scales_dtype=None):
    """Scales and biases swapped: passed in each other's place.

    An argument-order bug: ``bias * q + scale``.  Only affine has biases;
    the float formats are right."""
    if biases is None:
        return dequantize(weight, scales, biases, fmt, global_scale, dtype, scales_dtype)
    return dequantize(weight, biases, scales, fmt, global_scale, dtype, scales_dtype)


def dequantize_bfloat16_truncated(weight, scales, biases, fmt, global_scale=None,
                                  dtype="float32", scales_dtype=None):
    """bfloat16 by truncation: float32's low 16 bits dropped, not rounded.

    Truncating instead of rounding to nearest even, and once at the end
    instead of after each op."""
    if "bfloat16" not in (dtype, scales_dtype or dtype):
        return dequantize(weight, scales, biases, fmt, global_scale, dtype, scales_dtype)
    wide = dequantize(weight, scales, biases, fmt, global_scale, "float32", "float32")
    bits = wide.astype(np.float32).view(np.uint32) & np.uint32(0xFFFF0000)
    return bits.view(np.float32).astype(np.float64)


def dequantize_fused_multiply_add(weight, scales, biases, fmt, global_scale=None,
                                  dtype="float32", scales_dtype=None):
    """Fused multiply-add: ``scale * q + bias`` rounded once, not twice.

    As a fused multiply-add would, where MLX rounds the product and then the
    sum: a precision bug no tolerance sees."""
    if biases is None:
        return dequantize(weight, scales, biases, fmt, global_scale, dtype, scales_dtype)
    stored = scales_dtype or dtype
    codes = unpack(weight, fmt.bits).astype(np.float64)
    scale = np.repeat(round_to(scales, stored), fmt.group_size, axis=-1).astype(np.float64)
    bias = np.repeat(round_to(biases, stored), fmt.group_size, axis=-1).astype(np.float64)
    return round_to(round_to(scale * codes + bias, stored), dtype).astype(np.float64)


def dequantize_global_scale_divided(weight, scales, biases, fmt, global_scale=None,
                                    dtype="float32", scales_dtype=None):
    """nvfp4 global scale inverted: applied the other way round.

    Group scales times ``448 * 6 / global_scale`` (NVIDIA's encode scale)
    where MLX multiplies by ``global_scale / (448 * 6)``."""
    if global_scale is not None:
        global_scale = (448.0 * 6.0) ** 2 / np.asarray(global_scale, np.float64)
    return dequantize(weight, scales, biases, fmt, global_scale, dtype, scales_dtype)


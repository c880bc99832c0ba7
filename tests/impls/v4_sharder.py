"""Tensor-parallel sharders written apart from dsv4shard's.

``shard`` is written for DeepSeek-V4 checkpoints: it declines, by raising
NotImplementedError, linear biases on the experts.  ``shard_bias_over_n``
shards linear biases too, its own way: every rank keeps ``bias / N`` of
down_proj's linear bias (dsv4shard keeps it on rank 0 alone); the ranks'
outputs still sum to the unsharded one.
"""

from __future__ import annotations

import mlx.core as mx


def _rows(a, r, n, axis):
    k = a.shape[axis] // n
    index = [slice(None)] * a.ndim
    index[axis] = slice(r * k, (r + 1) * k)
    return mx.array(a[tuple(index)])


def _shard_mlp(mlp, r, n, bias_over_n):
    for name in ("gate_proj", "up_proj"):
        layer = mlp[name]
        for key in ("weight", "scales", "biases"):
            if key in layer:
                layer[key] = _rows(layer[key], r, n, -2)
        if "bias" in layer:
            layer["bias"] = _rows(layer["bias"], r, n, -1)
    down = mlp["down_proj"]
    for key in ("weight", "scales", "biases"):
        if key in down:
            down[key] = _rows(down[key], r, n, -1)
    if "bias" in down:
        if not bias_over_n:
            raise NotImplementedError("experts with a linear bias are not sharded")
        down["bias"] = down["bias"] / n


def _check(block, n):
    for mlp in (block.switch_mlp, block.shared_experts):
        inter = mlp.gate_proj.weight.shape[-2]
        group = getattr(mlp.down_proj, "group_size", 1) if "scales" in mlp.down_proj else 1
        if inter % n or (inter // group) % n:
            raise ValueError(f"intermediate size {inter} (groups of {group}) does not split "
                             f"over {n} ranks")


def _shard(block, group, bias_over_n):
    r, n = group.rank(), group.size()
    _check(block, n)
    if not bias_over_n and "bias" in block.switch_mlp.down_proj:
        raise NotImplementedError("experts with a linear bias are not sharded")
    for mlp in (block.switch_mlp, block.shared_experts):
        _shard_mlp(mlp, r, n, bias_over_n)
    block.sharding_group = group
    return block


def shard(block, group):
    return _shard(block, group, bias_over_n=False)


def shard_bias_over_n(block, group):
    return _shard(block, group, bias_over_n=True)

"""MoE-only tensor parallelism for DeepSeek-V4 (SPEC §4).

Rank r of N keeps slice r of every expert's intermediate dimension: rows of
gate/up (their output axis), the same columns of down (its input axis: packed
words of the weight, groups of scales and biases).  The router and the
expert axis are never split.  The ranks' partial outputs are added by one
all_sum, in ``MoEBlock.__call__``.
"""

from __future__ import annotations

import copy

import mlx.core as mx

from dsv4shard.block import MoEBlock

ROW_SHARDED = ("gate_proj", "up_proj")  # all-to-sharded: output rows
COLUMN_SHARDED = ("down_proj",)  # sharded-to-all: input columns


class ShardingError(ValueError):
    """The block cannot be split over the requested ranks."""


def group_size_of(layer) -> int:
    return getattr(layer, "group_size", 1) if hasattr(layer, "scales") else 1


def check_shardable(block: MoEBlock, size: int) -> None:
    """Every precondition, checked before any weight is touched: N divides the
    intermediate size and, for quantized down projections, its groups."""
    check_shardable_mlps([("switch_mlp", block.switch_mlp),
                          ("shared_experts", block.shared_experts)], size)


def check_shardable_mlps(mlps, size: int) -> None:
    """``mlps``: (name, module with gate_proj, up_proj, down_proj) pairs."""
    if size < 1:
        raise ShardingError(f"rank count must be >= 1, got {size}")
    problems = []
    for where, mlp in mlps:
        missing = [n for n in (*ROW_SHARDED, *COLUMN_SHARDED) if n not in mlp]
        if missing:
            fused = " (it looks fused: fuse AFTER sharding, on the local rows)" if (
                "gate_up_proj" in mlp) else ""
            problems.append(f"{where} has no {', '.join(missing)}{fused}")
            continue
        inter = mlp.gate_proj.weight.shape[-2]
        if inter % size:
            problems.append(f"{where}: intermediate size {inter} is not divisible by "
                            f"{size} ranks")
            continue
        group = group_size_of(mlp.down_proj)
        if group > 1 and (inter // group) % size:
            problems.append(
                f"{where}.down_proj: its {inter // group} groups of group size {group} "
                f"(intermediate size {inter}) are not divisible by {size} ranks; each rank "
                f"would need {inter / size:g} columns, not whole groups")
        for name in ROW_SHARDED:
            if mlp[name].weight.shape[-2] != inter:
                problems.append(f"{where}.{name} has {mlp[name].weight.shape[-2]} output rows, "
                                f"gate_proj has {inter}")
    if problems:
        raise ShardingError("cannot shard the MoE block: " + "; ".join(problems))


def _slice(a: mx.array, axis: int, rank: int, size: int) -> mx.array:
    n = a.shape[axis] // size
    index = [slice(None)] * a.ndim
    index[axis] = slice(rank * n, (rank + 1) * n)
    return mx.array(a[tuple(index)])  # a copy, so the full array can be freed


def shard_rows(layer, rank: int, size: int) -> None:
    """Keep output rows of weight, scales, biases and the linear bias."""
    for key in ("weight", "scales", "biases"):
        if layer.get(key) is not None:
            layer[key] = _slice(layer[key], -2, rank, size)
    if "bias" in layer:
        layer["bias"] = _slice(layer["bias"], -1, rank, size)
    # An nvfp4 global scale is one per expert: it is never sliced.


def shard_columns(layer, rank: int, size: int) -> None:
    """Keep input columns: packed words of the weight, groups of scales and
    biases.  A linear bias is added after the sum, so only rank 0 keeps it."""
    for key in ("weight", "scales", "biases"):
        if layer.get(key) is not None:
            layer[key] = _slice(layer[key], -1, rank, size)
    if "bias" in layer and rank != 0:
        layer["bias"] = mx.zeros_like(layer["bias"])


def shard_experts(mlp, rank: int, size: int) -> None:
    for name in ROW_SHARDED:
        shard_rows(mlp[name], rank, size)
    for name in COLUMN_SHARDED:
        shard_columns(mlp[name], rank, size)


class VirtualGroup:
    """Rank ``rank`` of ``size`` in one process: what a sharding function
    reads from a group (rank and size), with no communication.  Virtual ranks
    are summed by the caller from ``MoEBlock.partial``."""

    def __init__(self, rank: int, size: int):
        if not 0 <= rank < size:
            raise ShardingError(f"rank {rank} is outside 0..{size - 1}")
        self._rank, self._size = rank, size

    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size

    def __repr__(self):
        return f"VirtualGroup({self._rank}, {self._size})"


def shard(block: MoEBlock, group) -> MoEBlock:
    """Shard ``block`` in place for this process's rank of ``group`` and make
    its call all_sum the partial outputs once.  Every precondition is checked
    before any weight is touched."""
    size, rank = group.size(), group.rank()
    check_shardable(block, size)
    shard_experts(block.switch_mlp, rank, size)
    shard_experts(block.shared_experts, rank, size)
    block.sharding_group = group
    mx.eval(block.parameters())
    return block


def shard_block(block: MoEBlock, rank: int, size: int, shard_fn=shard) -> MoEBlock:
    """Rank ``rank``'s slice of ``block`` as a new block, the original left
    whole: a virtual rank.  ``shard_fn(block, group)`` is the sharding under
    test."""
    local = copy.copy(block)
    local.switch_mlp = copy.deepcopy(block.switch_mlp)
    local.shared_experts = copy.deepcopy(block.shared_experts)
    local.gate = copy.deepcopy(block.gate)
    return shard_fn(local, VirtualGroup(rank, size))

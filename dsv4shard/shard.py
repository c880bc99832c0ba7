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


def check_shardable(block: MoEBlock, size: int, weights=None) -> None:
    """Every precondition, checked before any weight is touched: N divides the
    intermediate size and, for quantized down projections, its groups; or,
    with ``weights`` (one per rank), every rank's share is a whole number of
    rows whose down_proj columns align with the quantization groups."""
    check_shardable_mlps([("switch_mlp", block.switch_mlp),
                          ("shared_experts", block.shared_experts)], size, weights)


def check_weights(weights, size: int) -> tuple[int, ...]:
    """``weights`` as a tuple of ``size`` positive integers, or ShardingError."""
    try:
        parsed = tuple(int(w) for w in weights)
        ok = len(parsed) == size and all(w > 0 and w == v for w, v in zip(parsed, weights))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ShardingError(f"weights must be {size} positive integers, one per rank; got "
                            f"{weights!r}")
    return parsed


def split_bounds(inter: int, size: int, weights=None) -> list[tuple[int, int]]:
    """Each rank's [start, stop) of an intermediate dimension of ``inter``:
    equal slices, or slices in proportion to ``weights``."""
    if weights is None:
        n = inter // size
        return [(r * n, (r + 1) * n) for r in range(size)]
    total, acc, edges = sum(weights), 0, [0]
    for w in weights:
        acc += w
        edges.append(inter * acc // total)
    return list(zip(edges[:-1], edges[1:]))


def check_shardable_mlps(mlps, size: int, weights=None) -> None:
    """``mlps``: (name, module with gate_proj, up_proj, down_proj) pairs."""
    if size < 1:
        raise ShardingError(f"rank count must be >= 1, got {size}")
    if weights is not None:
        weights = check_weights(weights, size)
    problems = []
    for where, mlp in mlps:
        missing = [n for n in (*ROW_SHARDED, *COLUMN_SHARDED) if n not in mlp]
        if missing:
            fused = " (it looks fused: fuse AFTER sharding, on the local rows)" if (
                "gate_up_proj" in mlp) else ""
            problems.append(f"{where} has no {', '.join(missing)}{fused}")
            continue
        inter = mlp.gate_proj.weight.shape[-2]
        group = group_size_of(mlp.down_proj)
        if weights is not None:
            problems += _uneven_problems(where, inter, group, weights)
        elif inter % size:
            problems.append(f"{where}: intermediate size {inter} is not divisible by "
                            f"{size} ranks")
            continue
        elif group > 1 and (inter // group) % size:
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


def _uneven_problems(where: str, inter: int, group: int, weights) -> list[str]:
    total, acc, problems = sum(weights), 0, []
    for rank, w in enumerate(weights):
        start = inter * acc // total
        acc += w
        if (inter * acc) % total:
            problems.append(f"{where}: rank {rank}'s share {w}/{total} of intermediate size "
                            f"{inter} is not a whole number of rows")
            continue
        stop = inter * acc // total
        if group > 1 and (start % group or stop % group):
            problems.append(
                f"{where}.down_proj: rank {rank}'s columns [{start}, {stop}) (share {w}/"
                f"{total} of {inter}) do not align with its quantization groups of "
                f"{group}; each rank needs whole groups")
    return problems


def _slice(a: mx.array, axis: int, rank: int, size: int, bounds=None, full=None) -> mx.array:
    """Slice ``rank`` of ``size`` along ``axis``; with ``bounds`` (start, stop
    in the intermediate dimension of ``full`` rows), that range, scaled to
    the axis (packed words, groups)."""
    index = [slice(None)] * a.ndim
    if bounds is None:
        n = a.shape[axis] // size
        index[axis] = slice(rank * n, (rank + 1) * n)
    else:
        start, stop = bounds
        length = a.shape[axis]
        index[axis] = slice(length * start // full, length * stop // full)
    return mx.array(a[tuple(index)])  # a copy, so the full array can be freed


def shard_rows(layer, rank: int, size: int, bounds=None) -> None:
    """Keep output rows of weight, scales, biases and the linear bias (rank
    ``rank`` of ``size`` equal slices, or the rows ``bounds`` = (start, stop))."""
    full = layer["weight"].shape[-2]
    for key in ("weight", "scales", "biases"):
        if layer.get(key) is not None:
            layer[key] = _slice(layer[key], -2, rank, size, bounds, full)
    if "bias" in layer:
        layer["bias"] = _slice(layer["bias"], -1, rank, size, bounds, full)
    # An nvfp4 global scale is one per expert: it is never sliced.


def shard_columns(layer, rank: int, size: int, bounds=None, full=None) -> None:
    """Keep input columns: packed words of the weight, groups of scales and
    biases (rank ``rank`` of ``size`` equal slices, or the columns ``bounds``
    of an input dimension of ``full``).  A linear bias is added after the
    sum, so only rank 0 keeps it."""
    for key in ("weight", "scales", "biases"):
        if layer.get(key) is not None:
            layer[key] = _slice(layer[key], -1, rank, size, bounds, full)
    if "bias" in layer and rank != 0:
        layer["bias"] = mx.zeros_like(layer["bias"])


def shard_experts(mlp, rank: int, size: int, weights=None) -> None:
    """Rank ``rank``'s slice of every expert of ``mlp``: equal, or in
    proportion to ``weights``."""
    bounds = None
    inter = mlp["gate_proj"].weight.shape[-2]
    if weights is not None:
        bounds = split_bounds(inter, size, weights)[rank]
    for name in ROW_SHARDED:
        shard_rows(mlp[name], rank, size, bounds)
    for name in COLUMN_SHARDED:
        shard_columns(mlp[name], rank, size, bounds, inter)


class VirtualGroup:
    """Rank ``rank`` of ``size`` in one process: what a sharding function
    reads from a group (rank and size), with no communication.  The
    properties add the virtual ranks' partial outputs themselves, standing in
    for ``mx.distributed.all_sum`` on such a group."""

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


def shard(block: MoEBlock, group, weights=None) -> MoEBlock:
    """Shard ``block`` in place for this process's rank of ``group`` and make
    its call all_sum the partial outputs once.  ``weights`` (optional, one
    positive integer per rank) splits the intermediate dimension unevenly,
    e.g. ``weights=(3, 5)`` gives rank 0 three eighths; every slice must
    align with the quantization groups.  Every precondition is checked
    before any weight is touched."""
    size, rank = group.size(), group.rank()
    if getattr(block, "sharding_group", None) is not None:
        raise ShardingError(f"this block is already sharded (rank {block.sharding_group.rank()} "
                            f"of {block.sharding_group.size()}): shard a fresh block; sharding "
                            f"again would slice the slices")
    check_shardable(block, size, weights)
    shard_experts(block.switch_mlp, rank, size, weights)
    shard_experts(block.shared_experts, rank, size, weights)
    block.sharding_group = group
    mx.eval(block.parameters())
    return block


SHARDER_CONTRACT = ("a sharder is called as shard(moe_block, group) (with weights=(...) for an "
                    "uneven split) and returns the block to use, an nn.Module called as "
                    "block(x, input_ids) that adds the ranks' partial outputs with one "
                    "mx.distributed.all_sum over group; return moe_block itself when it "
                    "sharded in place")


def accepts_weights(fn) -> bool:
    """Whether ``fn`` takes a ``weights`` keyword (uneven splits)."""
    import inspect

    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "weights" or p.kind is p.VAR_KEYWORD for p in params)


def apply_sharder(shard_fn, block, group, weights=None):
    """``shard_fn(block, group)`` (with ``weights=`` for an uneven split),
    held to the sharder contract: NotImplementedError when ``shard_fn``
    offers no uneven split, ContractError for a result that is no block."""
    from dsv4shard.fuse import ContractError

    if weights is None:
        result = shard_fn(block, group)
    elif not accepts_weights(shard_fn):
        name = getattr(shard_fn, "__qualname__", repr(shard_fn))
        raise NotImplementedError(f"{name} takes no weights= argument: it offers even splits "
                                  f"only")
    else:
        result = shard_fn(block, group, weights=tuple(weights))
    if result is None:
        raise ContractError(f"the sharder returned None where a block is needed; the "
                            f"contract: {SHARDER_CONTRACT}")
    import mlx.nn as nn

    if not isinstance(result, nn.Module) or not callable(result):
        text = repr(result)
        raise ContractError(f"the sharder returned {type(result).__qualname__} "
                            f"{text if len(text) <= 60 else text[:57] + '...'}; the contract: "
                            f"{SHARDER_CONTRACT}")
    return result


def shard_block(block: MoEBlock, rank: int, size: int, shard_fn=shard, weights=None):
    """Rank ``rank``'s slice of ``block`` as a new block, the original left
    whole: a virtual rank.  ``shard_fn(block, group)`` is the sharding under
    test, held to its contract (:func:`apply_sharder`)."""
    local = copy.copy(block)
    local.switch_mlp = copy.deepcopy(block.switch_mlp)
    local.shared_experts = copy.deepcopy(block.shared_experts)
    local.gate = copy.deepcopy(block.gate)
    return apply_sharder(shard_fn, local, VirtualGroup(rank, size), weights)

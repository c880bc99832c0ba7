"""Rank pools shared by every property in a process: started on first use,
reused for every example, closed when the process exits."""

from __future__ import annotations

import atexit

from dsv4shard.ranks import hostfile as hf
from dsv4shard.ranks.pool import RankPool

_POOLS: dict[tuple, RankPool] = {}


def pool(size: int = 2, hostfile: str | None = None, backend: str = "ring") -> RankPool:
    """The running pool of ``size`` local ranks, or of the hostfile's hosts."""
    key = (size, hostfile, backend)
    existing = _POOLS.get(key)
    if existing is not None and existing.alive:
        return existing
    if not hostfile:
        from dsv4shard import rank_memory

        rank_memory.check(size)  # refuse, naming the memory, before any rank starts
    spec = hf.load(hostfile) if hostfile else hf.local(size, backend)
    _POOLS[key] = RankPool(spec).start()
    return _POOLS[key]


def close_all() -> None:
    while _POOLS:
        _, p = _POOLS.popitem()
        p.close()


atexit.register(close_all)

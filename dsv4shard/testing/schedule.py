"""The order pytest-xdist's work stealing hands tests out in.

``--dist worksteal`` gives each of N workers one contiguous share of the
collection (the first ``len // N`` tests, then a share of what is left, and
so on), and an idle worker later steals the tail of the longest queue.  A
long test near the end of a share starts late and can end the run alone
while the other workers idle.  :func:`front_loaded` reorders the collection
so that the named long tests open the shares, one per worker in turn; the
rest keep their order.
"""

from __future__ import annotations

from itertools import islice
from typing import Callable, Sequence, TypeVar

T = TypeVar("T")


def share_sizes(total: int, workers: int) -> list[int]:
    """The sizes of the initial shares, as work stealing deals them."""
    sizes, left = [], total
    for i in range(workers):
        size = left // (workers - i)
        sizes.append(size)
        left -= size
    return sizes


def front_loaded(items: Sequence[T], workers: int,
                 rank: Callable[[T], int | None]) -> list[T]:
    """``items`` with the long ones (``rank`` not None; 0 the longest) at the
    start of the shares: the longest opens share 0, the next share 1, and so
    on (round after round where there are more long ones than workers)."""
    if workers < 2:
        return list(items)
    long_ones = sorted((item for item in items if rank(item) is not None), key=rank)
    rest = iter([item for item in items if rank(item) is None])
    shares: list[list[T]] = [[] for _ in range(workers)]
    for i, item in enumerate(long_ones):
        shares[i % workers].append(item)
    out: list[T] = []
    for share, size in zip(shares, share_sizes(len(items), workers)):
        out.extend(share)
        out.extend(islice(rest, max(0, size - len(share))))
    out.extend(rest)  # more long ones than a share holds: the remainder at the end
    return out

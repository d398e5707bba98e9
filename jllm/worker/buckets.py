"""Shape buckets: the few padded sizes the jitted step is compiled for.

Padding every batch up to the next bucket bounds the number of compiled programs
(JAX's stand-in for vLLM's CUDA graphs) at the cost of some wasted rows.
"""

from __future__ import annotations

import bisect


def pow2_buckets(smallest: int, largest: int) -> tuple[int, ...]:
    """Powers of two from `smallest` up to, and ending exactly at, `largest`."""
    sizes = []
    size = max(1, smallest)
    while size < largest:
        sizes.append(size)
        size *= 2
    sizes.append(largest)
    return tuple(sizes)


def pick_bucket(buckets: tuple[int, ...], n: int) -> int:
    """The smallest bucket that holds n (buckets sorted ascending)."""
    i = bisect.bisect_left(buckets, n)
    if i == len(buckets):
        raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")
    return buckets[i]

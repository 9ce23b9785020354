"""Padded sizes: a few shape buckets so a workload of many lengths compiles a handful of programs."""

from __future__ import annotations


def length_bucket(n: int, cap: int | None = None) -> int:
    """The padded length for `n` tokens: the first of 16, 24, 32, 48, 64, 96, ... >= n, at most `cap`.

    Example:
        >>> [length_bucket(n) for n in (1, 17, 33, 100)], length_bucket(100, cap=80)
        ([16, 24, 48, 128], 100)
    """
    b = 16
    while b < n:
        b = b * 3 // 2 if b & (b - 1) == 0 else b * 4 // 3
    return max(n, min(b, cap)) if cap is not None else b

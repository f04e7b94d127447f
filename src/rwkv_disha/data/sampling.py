"""Deterministic shuffling without storing a permutation (docs/DATA.md, "Sampling").

:class:`Permutation` is a keyed pseudo-random permutation of ``range(n)`` that costs O(1) memory, so a
corpus of a billion documents is shuffled as cheaply as one of ten; :func:`pass_key` derives the key of
each pass over the data from the seed, so every pass has its own order and every rank computes the same.
"""

from __future__ import annotations

M64 = (1 << 64) - 1


def mix64(x: int) -> int:
    """splitmix64 finaliser: a well-mixed 64-bit hash of ``x``."""
    x = (x + 0x9E3779B97F4A7C15) & M64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & M64
    return x ^ (x >> 31)


def pass_key(seed: int, pass_no: int) -> int:
    """The permutation key of pass ``pass_no`` over the data."""
    return mix64(mix64(seed & M64) ^ (pass_no & M64))


class Permutation:
    """A pseudo-random permutation of ``range(n)`` from ``key``: a 6-round Feistel network on the next
    even power of two, cycle-walked back into range. O(1) memory, so huge corpora cost nothing."""

    def __init__(self, n: int, key: int):
        self.n = int(n)
        bits = max(2, (self.n - 1).bit_length())
        bits += bits & 1
        self.half = bits // 2
        self.lo = (1 << self.half) - 1
        self.keys = [mix64((key & M64) ^ mix64(r + 1)) for r in range(6)]

    def __call__(self, i: int) -> int:
        if not 0 <= i < self.n:
            raise IndexError(f"{i} outside range({self.n})")
        x, half, lo = i, self.half, self.lo
        while True:
            left, right = x >> half, x & lo
            for k in self.keys:
                left, right = right, left ^ (mix64(right ^ k) & lo)
            x = (left << half) | right
            if x < self.n:
                return x

    def __len__(self) -> int:
        return self.n

"""A keyed pseudo-random permutation of [0, n), computed one index at a time: the order in which an
epoch visits the blocks, in constant memory whatever n (no array of n indices is ever built).

A balanced Feistel network over the smallest even number of bits that covers n is a bijection of
[0, 2^bits); cycle walking (apply it again until the value falls below n) restricts it to a bijection of
[0, n). The round keys come from (seed, epoch), so the order is a pure function of (seed, epoch, index).
"""

from __future__ import annotations

import hashlib

_MASK64 = (1 << 64) - 1
ROUNDS = 6


def _mix(value: int) -> int:
    """splitmix64's finalizer: a cheap 64-bit mixing function with good avalanche."""
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def round_keys(seed: int, epoch: int) -> tuple[int, ...]:
    """The Feistel round keys of (seed, epoch)."""
    digest = hashlib.blake2b(f"gqa-convert block order {seed} {epoch}".encode(), digest_size=8 * ROUNDS).digest()
    return tuple(int.from_bytes(digest[8 * i : 8 * i + 8], "little") for i in range(ROUNDS))


class BlockOrder:
    """order(epoch, i): the block visited i-th in `epoch`, a bijection of [0, n) for every epoch."""

    def __init__(self, n: int, seed: int) -> None:
        if n < 1:
            raise ValueError(f"a block order needs at least one block, got {n}")
        self.n = n
        self.seed = seed
        bits = max(2, (n - 1).bit_length())
        self._half_bits = (bits + 1) // 2  # the network works on two halves of equal width
        self._half_mask = (1 << self._half_bits) - 1
        self._epoch: int | None = None  # the round keys of the last epoch asked for
        self._keys: tuple[int, ...] = ()

    def _feistel(self, value: int, keys: tuple[int, ...]) -> int:
        left, right = value >> self._half_bits, value & self._half_mask
        for key in keys:
            left, right = right, left ^ (_mix(right ^ key) & self._half_mask)
        return (left << self._half_bits) | right

    def __call__(self, epoch: int, index: int) -> int:
        if not 0 <= index < self.n:
            raise IndexError(f"block {index} is outside [0, {self.n})")
        if self.n == 1:
            return 0
        if epoch != self._epoch:
            self._epoch, self._keys = epoch, round_keys(self.seed, epoch)
        value = self._feistel(index, self._keys)
        while value >= self.n:  # cycle walking: stays a bijection of [0, n)
            value = self._feistel(value, self._keys)
        return value

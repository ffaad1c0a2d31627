"""Counter-based random numbers from the splitmix64 finaliser: no state, any element computable on its own.

A value that must be the same on every rerun, thread count and resume (a negative kept or dropped by ``prepare``, the
effect of an id in the synthetic click model) is a hash of its coordinates rather than a draw from a stream.
splitmix64's finaliser (Steele, Lea and Flood, "Fast splittable pseudorandom number generators", 2014) mixes a 64-bit
word so that every input bit flips about half of the output bits. All arrays are uint64 with wrapping arithmetic.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["GOLDEN_GAMMA", "derive_key", "hash_bytes", "hash_uniform", "hashed_normal", "mix64", "mix64_int"]

GOLDEN_GAMMA = 0x9E3779B97F4A7C15
"""splitmix64's increment, the odd integer nearest ``2**64 / golden ratio``."""

_M64 = (1 << 64) - 1
_MUL1 = 0xBF58476D1CE4E5B9
_MUL2 = 0x94D049BB133111EB
_M32 = (1 << 32) - 1
_ID_MULT = 0xD6E8FEB86659FD93


def mix64_int(x: int) -> int:
    """splitmix64 of one Python int (taken modulo ``2**64``): the same value as :func:`mix64` gives."""
    x = (x + GOLDEN_GAMMA) & _M64
    x = ((x ^ (x >> 30)) * _MUL1) & _M64
    x = ((x ^ (x >> 27)) * _MUL2) & _M64
    return x ^ (x >> 31)


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 of every element, in place.

    Args:
        x: uint64 array; overwritten with the hashes.

    Returns:
        ``x``.
    """
    x += np.uint64(GOLDEN_GAMMA)
    x ^= x >> np.uint64(30)
    x *= np.uint64(_MUL1)
    x ^= x >> np.uint64(27)
    x *= np.uint64(_MUL2)
    x ^= x >> np.uint64(31)
    return x


def hash_uniform(keys: np.ndarray, seed: int) -> np.ndarray:
    """Uniform numbers in ``[0, 1)`` attached to ``keys``: splitmix64 of ``keys ^ (seed * GOLDEN_GAMMA)``.

    Args:
        keys: uint64 array (not modified).
        seed: Non-negative integer; another seed gives independent numbers.

    Returns:
        float64 array of the shape of ``keys``, multiples of ``2**-53`` (the top 53 bits of each hash).
    """
    z = mix64(keys ^ np.uint64(seed * GOLDEN_GAMMA & _M64))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def derive_key(seed: int, *tags: int) -> int:
    """A 64-bit key for one random quantity, named by ``tags``: ``seed`` and the tags mixed in turn."""
    key = mix64_int(seed & _M64)
    for tag in tags:
        key = mix64_int(key ^ (tag & _M64))
    return key


def hash_bytes(offsets: np.ndarray, data: np.ndarray) -> np.ndarray:
    """A stable 64-bit hash of each of several byte strings (e.g. the UTF-8 bytes of strings).

    String ``i`` is ``data[offsets[i]:offsets[i + 1]]``. Its hash starts as splitmix64 of its length; each of its
    8-byte little-endian words in turn (the last one padded with zero bytes) is xor-ed in and mixed again with
    splitmix64. The result depends on the bytes alone: never on the process, platform or Python's string hashing.

    Args:
        offsets: ``(N + 1,)`` integer start of each string in ``data``, and the end.
        data: uint8 bytes.

    Returns:
        ``(N,)`` uint64 hashes.
    """
    offsets = np.asarray(offsets, dtype=np.int64)
    lengths = np.diff(offsets)
    words = (lengths + 7) // 8  # (N,) words per string
    word_start = np.concatenate([[0], np.cumsum(words)])
    padded = np.zeros(int(word_start[-1]) * 8, dtype=np.uint8)
    owner = np.repeat(np.arange(len(lengths)), lengths)  # the string of each byte
    within = np.arange(len(owner)) - np.repeat(offsets[:-1] - offsets[0], lengths)
    padded[word_start[owner] * 8 + within] = data[offsets[0] : offsets[-1]]
    values = padded.view("<u8").astype(np.uint64)
    word_owner = np.repeat(np.arange(len(lengths)), words)
    word_index = np.arange(len(values)) - np.repeat(word_start[:-1], words)
    h = mix64(lengths.astype(np.uint64))
    for k in range(int(words.max()) if len(words) else 0):
        at = word_index == k
        strings = word_owner[at]
        h[strings] = mix64(h[strings] ^ values[at])
    return h


def hashed_normal(ids: np.ndarray, key: int) -> np.ndarray:
    """Standard normal numbers attached to ``ids`` by a keyed hash: splitmix64 of ``ids * C ^ key``, then Box-Muller
    on the two 32-bit halves of each hash (the effect of an id in a synthetic click model).

    Args:
        ids: integer array (not modified; taken as uint64).
        key: 64-bit key (:func:`derive_key`); another key gives independent numbers.

    Returns:
        float64 array of the shape of ``ids``.
    """
    h = ids.astype(np.uint64)
    h *= np.uint64(_ID_MULT)
    h ^= np.uint64(key)
    mix64(h)
    u1 = (h >> np.uint64(32)).astype(np.float64)
    u1 += 0.5
    u1 *= 2.0**-32
    u2 = (h & np.uint64(_M32)).astype(np.float64)
    u2 *= 2.0 * math.pi * 2.0**-32
    radius = np.sqrt(-2.0 * np.log(u1))
    return radius * np.cos(u2)

"""The shared splitmix64 hashing against a plain-Python reference, bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from dqrm_lightning.data.hashing import derive_key, hash_uniform, mix64, mix64_int

VALUES = [0, 1, 2, 12345, 0x9E3779B97F4A7C15, 2**40 + 17, 2**63 + 5, 2**64 - 1]


def splitmix64(x: int) -> int:
    """splitmix64 (Steele, Lea and Flood 2014) written out with Python integers taken modulo 2**64."""
    mask = 2**64 - 1
    z = (x + 0x9E3779B97F4A7C15) % 2**64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


def test_mix64_matches_reference() -> None:
    keys = np.array(VALUES, dtype=np.uint64)
    mixed = mix64(keys)
    assert mixed is keys  # in place
    assert [int(v) for v in mixed] == [splitmix64(v) for v in VALUES]
    assert [mix64_int(v) for v in VALUES] == [splitmix64(v) for v in VALUES]


@pytest.mark.parametrize("seed", [0, 1, 7, 2**64 - 1])
def test_hash_uniform_matches_reference(seed: int) -> None:
    keys = np.array(VALUES, dtype=np.uint64)
    uniform = hash_uniform(keys, seed)
    seed_key = (seed * 0x9E3779B97F4A7C15) % 2**64
    expected = [(splitmix64(v ^ seed_key) >> 11) / 2**53 for v in VALUES]
    assert uniform.dtype == np.float64
    assert uniform.tolist() == expected
    assert keys.tolist() == VALUES  # the keys are left alone
    assert ((uniform >= 0.0) & (uniform < 1.0)).all()


def test_derive_key_mixes_seed_then_each_tag() -> None:
    assert derive_key(5) == splitmix64(5)
    assert derive_key(5, 3, 9) == splitmix64(splitmix64(splitmix64(5) ^ 3) ^ 9)
    assert len({derive_key(5, 3), derive_key(5, 4), derive_key(6, 3)}) == 3

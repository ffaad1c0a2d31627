"""Brute-force references of the quantization grids, written as plain loops over numpy float32 scalars."""

from __future__ import annotations

import numpy as np


def fp16_up(value: np.float32) -> np.float32:
    """The smallest float16 >= ``value`` (at least 1e-8), as float32."""
    value = max(np.float32(value), np.float32(1e-8))
    half = np.float16(value)
    if np.float32(half) < value:
        half = np.nextafter(half, np.float16(np.inf))
    return np.float32(half)


def brute_force_row_wise(table: np.ndarray, bits: int, mode: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each row of ``table`` (rows, D) on the grid of its own min and max: ``(codes, scale_bias, values)``.

    ``codes`` (rows, D) are signed for the symmetric grid and unsigned for the asymmetric one; ``scale_bias`` (rows, 2)
    holds each row's float16 scale and bias (0 for symmetric); ``values`` (rows, D) = codes x scale + bias.
    """
    rows, dim = table.shape
    codes = np.zeros((rows, dim), dtype=np.int64)
    scale_bias = np.zeros((rows, 2), dtype=np.float32)
    values = np.zeros((rows, dim), dtype=np.float32)
    for r in range(rows):
        row = [np.float32(x) for x in table[r]]
        low, high = min(row), max(row)
        if mode == "symmetric":
            n = 2 ** (bits - 1) - 1
            bias, qmin, qmax = np.float32(0.0), -(n + 1), n
            scale = fp16_up(max(abs(low), abs(high)) / np.float32(n))
        else:
            bias, qmin, qmax = np.float32(np.float16(low)), 0, 2**bits - 1
            scale = fp16_up((high - bias) / np.float32(2**bits - 1))
        scale_bias[r] = scale, bias
        for d, x in enumerate(row):
            code = min(max(int(np.round((x - bias) / scale)), qmin), qmax)  # np.round: half to even
            codes[r, d] = code
            values[r, d] = np.float32(code) * scale + bias
    return codes, scale_bias, values

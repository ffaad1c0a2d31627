import itertools

import numpy as np
import pytest
import torch

from dqrm_lightning.quant.fake_quant import (
    asymmetric_scale,
    fake_quantize,
    fp16_ceil,
    qrange,
    quantize_codes,
    symmetric_scale,
)


def brute_force_symmetric(x: np.ndarray, scale: float, bits: int) -> np.ndarray:
    """Reference: per element, pick round-half-even of x/s, clamp to the signed range, times s."""
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    out = np.empty_like(x, dtype=np.float64)
    for i, v in enumerate(x.astype(np.float64).ravel()):
        r = v / scale
        floor = np.floor(r)
        frac = r - floor
        code = floor + (1 if frac > 0.5 or (frac == 0.5 and floor % 2 == 1) else 0)
        out.ravel()[i] = min(max(code, lo), hi) * scale
    return out


@pytest.mark.parametrize("bits", [2, 4, 8, 16])
def test_codes_rounding_and_clamping_match_brute_force(bits):
    scale = 0.125  # exact in binary, so x / s is exact and ties are real ties
    n = 2 ** (bits - 1)
    grid = np.arange(-n - 3, n + 3, 0.5, dtype=np.float32) * scale  # integers, half-way points, beyond both ends
    x = torch.from_numpy(grid)
    lo, hi = qrange(bits)
    out = fake_quantize(x, torch.tensor(scale), torch.tensor(float(lo)), torch.tensor(float(hi)))
    np.testing.assert_array_equal(out.numpy(), brute_force_symmetric(grid, scale, bits).astype(np.float32))
    codes = quantize_codes(x, torch.tensor(scale), torch.tensor(float(lo)), torch.tensor(float(hi)))
    assert int(codes.min()) == lo
    assert int(codes.max()) == hi
    assert (
        float(fake_quantize(torch.tensor(2.5 * scale), torch.tensor(scale), torch.tensor(-8.0), torch.tensor(7.0)))
        == 2 * scale
    )


@pytest.mark.parametrize("bits", [2, 4, 8, 16])
def test_fresh_symmetric_scale_never_clips_and_is_fp16_exact(bits):
    torch.manual_seed(bits)
    w = torch.randn(1000) * 0.37
    absmax = w.abs().max()
    scale = symmetric_scale(absmax, bits)
    assert float(scale.half().float()) == float(scale)  # FBGEMM's fp16 per-row scale holds it exactly
    assert float(scale) >= float(absmax) / (2 ** (bits - 1) - 1)
    lo, hi = qrange(bits)
    codes = quantize_codes(w, scale, torch.tensor(float(lo)), torch.tensor(float(hi)))
    assert int(codes.abs().max()) <= 2 ** (bits - 1) - 1  # a fresh scale only produces codes in [-n, n]


def test_asymmetric_grid_covers_min_to_max():
    w = torch.tensor([-0.3, -0.1, 0.0, 0.2, 0.5])
    scale, beta = asymmetric_scale(w.min(), w.max(), 4)
    assert float(beta.half().float()) == float(beta)
    assert float(scale.half().float()) == float(scale)
    out = fake_quantize(w, scale, torch.tensor(0.0), torch.tensor(15.0), beta)
    assert float((out - w).abs().max()) <= float(scale) / 2 + 1e-7
    assert float(out.min()) == pytest.approx(float(beta))


def test_fp16_ceil_rounds_up():
    for value in (1e-4, 0.1234567, 3.3333, 1e-8):
        v = torch.tensor(value)
        c = fp16_ceil(v)
        assert float(c) >= value
        assert float(c.half().float()) == float(c)
        below = torch.nextafter(c.half(), torch.tensor(0.0, dtype=torch.half)).float()
        assert float(below) < value or value <= 1e-8


@pytest.mark.parametrize(("ste", "expected"), [("identity", [1.0, 1.0, 1.0]), ("clipped", [1.0, 0.0, 0.0])])
def test_straight_through_gradients(ste, expected):
    x = torch.tensor([0.3, 5.0, -9.0], requires_grad=True)
    out = fake_quantize(x, torch.tensor(1.0), torch.tensor(-2.0), torch.tensor(1.0), ste=ste)
    out.sum().backward()
    assert x.grad.tolist() == expected
    assert out.tolist() == [0.0, 1.0, -2.0]


def test_per_feature_broadcast_matches_per_table_loop():
    torch.manual_seed(0)
    pooled = torch.randn(5, 3, 4)
    scale = torch.tensor([0.1, 0.2, 0.05])
    qmin = torch.tensor([-8.0, -2.0, -128.0])
    qmax = torch.tensor([7.0, 1.0, 127.0])
    out = fake_quantize(pooled, scale.view(1, -1, 1), qmin.view(1, -1, 1), qmax.view(1, -1, 1))
    for f, (s, lo, hi) in enumerate(itertools.zip_longest(scale, qmin, qmax)):
        ref = torch.clamp(torch.round(pooled[:, f] / s), lo, hi) * s
        torch.testing.assert_close(out[:, f], ref, rtol=0, atol=0)

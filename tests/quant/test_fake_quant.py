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
    row_grid,
    symmetric_scale,
)
from tests.helpers.quant import brute_force_row_wise


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


@pytest.mark.parametrize("mode", ["symmetric", "asymmetric"])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_row_grid_matches_a_brute_force_loop_over_rows(bits, mode):
    torch.manual_seed(bits)
    table = torch.randn(30, 16) * torch.rand(30, 1) + torch.randn(30, 1)  # rows of different spreads and centres
    table[3] = 0.25  # a constant row
    table[4, :] = torch.linspace(-1, 1, 16) * 1e-9  # a row below the smallest scale
    codes_ref, scale_bias_ref, values_ref = brute_force_row_wise(table.numpy(), bits, mode)
    scale, offset = row_grid(table, bits, mode)  # (30, 1) each
    lo, hi = (float(v) for v in qrange(bits, mode))
    np.testing.assert_array_equal(scale.squeeze(1).numpy(), scale_bias_ref[:, 0])
    np.testing.assert_array_equal(offset.squeeze(1).numpy(), scale_bias_ref[:, 1])
    assert scale.half().float().equal(scale)
    assert offset.half().float().equal(offset)
    codes = quantize_codes(table, scale, torch.tensor(lo), torch.tensor(hi), offset)
    np.testing.assert_array_equal(codes.numpy(), codes_ref)
    values = fake_quantize(table, scale, torch.tensor(lo), torch.tensor(hi), offset)
    np.testing.assert_array_equal(values.numpy(), values_ref)
    if mode == "asymmetric":  # every row reaches its own top code: the scale of its extremes, not the table's
        assert (codes.amax(dim=1) == hi).sum() >= 28

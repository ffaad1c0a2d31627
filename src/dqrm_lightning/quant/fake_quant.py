"""Fake quantization: the integer grid DQRM trains against, with a straight-through gradient.

Two grids, both with a scale stored exactly in float16 so that training and the exported INT-N model (FBGEMM keeps a
float16 scale and bias per row) compute the same values:

* symmetric (default, the DQRM reference code): ``n = 2^(b-1) - 1``, ``s = max|W| / n``,
  ``q = clamp(round(x / s), -(n + 1), n)``, value ``q * s``;
* asymmetric (the paper's Fig. 2): ``s = (max W - min W) / (2^b - 1)``, ``beta = min W``,
  ``q = clamp(round((x - beta) / s), 0, 2^b - 1)``, value ``q * s + beta``.

``W`` is a whole table (per-table grids, the paper) or one row (:func:`row_grid`, FBGEMM's row-wise format).

``round`` is round-half-to-even (``torch.round``). The scale is rounded *up* to the next float16 so a freshly computed
scale never clips the table it was computed from.

Gradients: ``identity`` (default, as the reference code: the incoming gradient passes unchanged, also for clipped
entries) or ``clipped`` (zero gradient where the value fell outside the grid).
"""

from __future__ import annotations

from typing import Any, Literal

import torch

Mode = Literal["symmetric", "asymmetric"]
Ste = Literal["identity", "clipped"]
SUPPORTED_BITS = (2, 4, 8, 16)
_MIN_SCALE = 1e-8


def qrange(bits: int, mode: Mode = "symmetric") -> tuple[int, int]:
    """Integer code range of a ``bits``-bit grid: signed for symmetric, unsigned for asymmetric."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bit width must be one of {SUPPORTED_BITS}, got {bits}")
    if mode == "symmetric":
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def fp16_ceil(value: torch.Tensor) -> torch.Tensor:
    """The smallest float16 >= ``value`` (as float32): exactly representable in FBGEMM's per-row fp16 scale."""
    value = value.float().clamp_min(_MIN_SCALE)
    half = value.half()
    up = torch.nextafter(half, torch.full_like(half, float("inf")))
    return torch.where(half.float() >= value, half, up).float()


def fp16_nearest(value: torch.Tensor) -> torch.Tensor:
    return value.float().half().float()


def symmetric_scale(absmax: torch.Tensor, bits: torch.Tensor | int) -> torch.Tensor:
    """``max|W| / (2^(b-1) - 1)``, rounded up to float16."""
    n = (2 ** (torch.as_tensor(bits) - 1) - 1).float()
    return fp16_ceil(absmax.float() / n)


def asymmetric_scale(
    low: torch.Tensor, high: torch.Tensor, bits: torch.Tensor | int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(s, beta)``: ``beta = min W`` (float16), ``s = (max W - beta) / (2^b - 1)`` rounded up to float16."""
    levels = (2 ** torch.as_tensor(bits) - 1).float()
    beta = fp16_nearest(low)
    return fp16_ceil((high.float() - beta) / levels), beta


def grid_from_extrema(
    low: torch.Tensor, high: torch.Tensor, bits: torch.Tensor | int, mode: Mode
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(scale, offset)`` of the grid that covers ``[low, high]``: symmetric (offset 0) or asymmetric."""
    if mode == "symmetric":
        scale = symmetric_scale(torch.maximum(low.abs(), high.abs()), bits)
        return scale, torch.zeros_like(scale)
    return asymmetric_scale(low, high, bits)


def row_grid(rows: torch.Tensor, bits: torch.Tensor | int, mode: Mode) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise ``(scale, offset)``, each (..., 1): the :func:`grid_from_extrema` of every row of ``rows`` (..., D)
    over its own D values (FBGEMM's row-wise INT-N format: a float16 scale and bias per row). ``bits`` broadcasts
    against (..., 1). No gradient flows into the grid."""
    low, high = torch.aminmax(rows.detach().float(), dim=-1, keepdim=True)
    return grid_from_extrema(low, high, bits, mode)


class _FakeQuantize(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        scale: torch.Tensor,
        offset: torch.Tensor | None,
        qmin: torch.Tensor,
        qmax: torch.Tensor,
        clipped_ste: bool,
    ) -> torch.Tensor:
        codes = x / scale if offset is None else (x - offset) / scale  # a fresh tensor: the rest works in place
        codes.round_()
        ctx.clipped_ste = clipped_ste
        if clipped_ste:
            ctx.save_for_backward((codes >= qmin) & (codes <= qmax))
        out = codes.clamp_(qmin, qmax).mul_(scale)
        return out if offset is None else out.add_(offset)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None, None, None]:
        if ctx.clipped_ste:
            (inside,) = ctx.saved_tensors
            grad = grad * inside
        return grad, None, None, None, None, None


def fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    qmin: torch.Tensor,
    qmax: torch.Tensor,
    offset: torch.Tensor | None = None,
    ste: Ste = "identity",
) -> torch.Tensor:
    """Quantize-dequantize ``x`` on the grid ``(scale, offset, [qmin, qmax])``; all broadcast against ``x``.

    Returns ``clamp(round((x - offset) / scale), qmin, qmax) * scale + offset`` with a straight-through gradient.
    """
    dtype = x.dtype
    offset = None if offset is None else offset.to(dtype)
    return _FakeQuantize.apply(x, scale.to(dtype), offset, qmin.to(dtype), qmax.to(dtype), ste == "clipped")


def quantize_codes(
    x: torch.Tensor, scale: torch.Tensor, qmin: torch.Tensor, qmax: torch.Tensor, offset: torch.Tensor | None = None
) -> torch.Tensor:
    """Integer codes ``clamp(round((x - offset) / scale), qmin, qmax)`` (int32), for export."""
    offset = torch.zeros((), dtype=torch.float32) if offset is None else offset.float()
    codes = torch.round((x.float() - offset) / scale.float())
    return torch.maximum(torch.minimum(codes, qmax.float()), qmin.float()).to(torch.int32)

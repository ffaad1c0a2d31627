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

Stochastic rounding (training only): ``round(v)`` becomes ``floor(v + u)`` with ``u ~ U[0, 1)`` given as ``noise``, so
the expected code is ``v`` (unbiased) and each code is one of the two grid points around ``v``.

Learned scales (:func:`learned_fake_quantize`, LSQ: Esser et al. 2020, "Learned Step Size Quantization"; the offset
as LSQ+: Bhalgat et al. 2020): with ``v = (x - offset) / scale`` and ``q`` its rounded code,
``d out / d scale = q - v`` where ``q`` is inside the grid and ``qmin`` or ``qmax`` where it was clamped,
``d out / d offset = 0`` inside and ``1`` where clamped, both multiplied by the gradient scale
``g = 1 / sqrt(N * Qp)`` (N values quantized with that scale, Qp = ``qmax``).
"""

from __future__ import annotations

from typing import Any, Literal

import torch

Mode = Literal["symmetric", "asymmetric"]
Ste = Literal["identity", "clipped"]
SUPPORTED_BITS = (2, 4, 8, 16)
_MIN_SCALE = 1e-8
MIN_FP16_SCALE = 2.0**-24  # the smallest positive float16: the floor of a learned scale


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


def fp16_straight_through(value: torch.Tensor, minimum: float | None = None) -> torch.Tensor:
    """``value`` (clamped to ``minimum``) rounded to the nearest float16, with an identity gradient: a learned grid
    parameter as exactly representable in FBGEMM's fp16 scale and bias."""
    rounded = fp16_nearest(value.detach() if minimum is None else value.detach().clamp_min(minimum))
    return rounded + (value - value.detach())  # exactly ``rounded`` (value + (rounded - value) may not be)


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


def row_grid(
    rows: torch.Tensor, bits: torch.Tensor | int, mode: Mode, ratio: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise ``(scale, offset)``, each (..., 1): the :func:`grid_from_extrema` of every row of ``rows`` (..., D)
    over its own D values (FBGEMM's row-wise INT-N format: a float16 scale and bias per row). ``bits`` broadcasts
    against (..., 1). No gradient flows into the grid from the rows.

    ``ratio`` (broadcasting against (..., 1)): a learned clipping ratio (row-wise LSQ): the scale of a row is
    ``ratio * span`` (``span`` = the row's extent / levels) rounded to the nearest float16; the offset stays the row's
    float16 minimum (0 symmetric); ``ratio < 1`` clips the row's extremes. The ratio receives ``sum over rows of
    d loss / d scale / span``: the step LSQ would give each row's scale, in units of that row's span, so the ratio
    moves as the rows' scales would (the chain rule's ``* span`` would make it about ``span^2`` times slower).
    """
    low, high = torch.aminmax(rows.detach().float(), dim=-1, keepdim=True)
    if ratio is None:
        return grid_from_extrema(low, high, bits, mode)
    bits = torch.as_tensor(bits)
    if mode == "symmetric":
        offset = torch.zeros_like(low)
        span = torch.maximum(low.abs(), high.abs()) / (2 ** (bits - 1) - 1).float()
    else:
        offset = fp16_nearest(low)
        span = (high - offset) / (2**bits - 1).float()
    scale = fp16_nearest((ratio.detach() * span).clamp_min(MIN_FP16_SCALE))
    return scale + (ratio - ratio.detach()) / span.clamp_min(MIN_FP16_SCALE), offset  # exactly ``scale``


def _round_(values: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
    """Round ``values`` in place: to nearest (half to even), or stochastically, ``floor(v + noise)`` with ``noise``
    ``U[0, 1)`` values shaped like ``values``."""
    return values.round_() if noise is None else values.add_(noise).floor_()


def _dequantize_(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None) -> torch.Tensor:
    """``codes * scale + offset``, in place in ``codes``."""
    out = codes.mul_(scale)
    return out if offset is None else out.add_(offset)


class _FakeQuantize(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        scale: torch.Tensor,
        offset: torch.Tensor | None,
        qmin: torch.Tensor | float,
        qmax: torch.Tensor | float,
        clipped_ste: bool,
        noise: torch.Tensor | None = None,
    ) -> torch.Tensor:
        codes = _round_(x / scale if offset is None else (x - offset) / scale, noise)  # fresh: worked in place
        ctx.clipped_ste = clipped_ste
        if clipped_ste:
            ctx.save_for_backward((codes >= qmin) & (codes <= qmax))
        return _dequantize_(codes.clamp_(qmin, qmax), scale, offset)  # type: ignore[arg-type]  # two numbers or two tensors

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None, None, None, None]:
        if ctx.clipped_ste:
            (inside,) = ctx.saved_tensors
            grad = grad * inside
        return grad, None, None, None, None, None, None


def fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    qmin: torch.Tensor | float,
    qmax: torch.Tensor | float,
    offset: torch.Tensor | None = None,
    ste: Ste = "identity",
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """Quantize-dequantize ``x`` on the grid ``(scale, offset, [qmin, qmax])``; all broadcast against ``x`` (the code
    range may also be two numbers).

    Returns ``clamp(round((x - offset) / scale), qmin, qmax) * scale + offset`` with a straight-through gradient;
    with ``noise`` (``U[0, 1)`` values shaped like ``x``) the rounding is stochastic, ``floor(v + noise)``.
    """
    dtype = x.dtype
    offset = None if offset is None else offset.to(dtype)
    qmin, qmax = (q.to(dtype) if isinstance(q, torch.Tensor) else q for q in (qmin, qmax))
    return _FakeQuantize.apply(x, scale.to(dtype), offset, qmin, qmax, ste == "clipped", noise)


class _LearnedFakeQuantize(torch.autograd.Function):
    """Fake quantization with the LSQ / LSQ+ gradients of the scale and offset (see the module docstring)."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        scale: torch.Tensor,
        offset: torch.Tensor | None,
        qmin: torch.Tensor,
        qmax: torch.Tensor,
        grad_scale: torch.Tensor,
        clipped_ste: bool,
        noise: torch.Tensor | None,
    ) -> torch.Tensor:
        v = x / scale if offset is None else (x - offset) / scale
        codes = _round_(v.clone(), noise)
        inside = (codes >= qmin) & (codes <= qmax)
        codes.clamp_(qmin, qmax)
        # d out / d scale before g: q - v inside the grid, the clamped code (qmin or qmax) outside
        ctx.save_for_backward(codes - v * inside, inside, grad_scale)
        ctx.shapes = (scale.shape, None if offset is None else offset.shape)
        ctx.clipped_ste = clipped_ste
        return _dequantize_(codes, scale, offset)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        d_scale, inside, grad_scale = ctx.saved_tensors
        scale_shape, offset_shape = ctx.shapes
        grad_x = grad * inside if ctx.clipped_ste else grad
        grad_s = (grad * d_scale).sum_to_size(scale_shape) * grad_scale
        grad_offset = None if offset_shape is None else (grad * ~inside).sum_to_size(offset_shape) * grad_scale
        return grad_x, grad_s, grad_offset, None, None, None, None, None


def learned_fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    qmin: torch.Tensor,
    qmax: torch.Tensor,
    grad_scale: torch.Tensor,
    offset: torch.Tensor | None = None,
    ste: Ste = "clipped",
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """:func:`fake_quantize` whose ``scale`` (and ``offset``) receive the LSQ (LSQ+) gradients, times ``grad_scale``;
    all broadcast against ``x``, and each gradient is summed to its tensor's shape. The gradient of ``x`` is the
    straight-through ``ste`` (LSQ's is ``clipped``: zero where the code was clamped)."""
    dtype = x.dtype
    return _LearnedFakeQuantize.apply(
        x, scale, offset, qmin.to(dtype), qmax.to(dtype), grad_scale.to(dtype), ste == "clipped", noise
    )


def quantize_codes(
    x: torch.Tensor, scale: torch.Tensor, qmin: torch.Tensor, qmax: torch.Tensor, offset: torch.Tensor | None = None
) -> torch.Tensor:
    """Integer codes ``clamp(round((x - offset) / scale), qmin, qmax)`` (int32), for export."""
    offset = torch.zeros((), dtype=torch.float32) if offset is None else offset.float()
    codes = torch.round((x.float() - offset) / scale.float())
    return torch.maximum(torch.minimum(codes, qmax.float()), qmin.float()).to(torch.int32)

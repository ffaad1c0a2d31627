"""DQRM's data-parallel gradient compression (paper Sec. 3.3; reference-code semantics with explicit options).

Embedding gradients stay sparse: only the rows a rank touched travel ("specified sparsity"). Their values are
quantized to INT8 with one scale per table; MLP weight gradients get one scale per output row, biases one per tensor,
with error compensation on the MLP only. For every tensor the ranks first agree on the scale (``max`` by default, so
no rank clips; the reference code's ``mean`` as an option), then all-reduce the integer codes carried in float32
(exact up to 2^24, so no wrap-around; gloo has no int16 all-reduce and int8 would overflow) and divide by the world
size. The result is the dequantized average gradient.

Error compensation (MLP only): ``local`` (default, textbook: the residual of this rank's own codes,
``e = z - s * q_local``) or ``reference`` (the DQRM code: ``e = z - s * mean_q``, which also absorbs the
difference between the local and the global gradient).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist

ScaleAgreement = Literal["max", "mean"]
ErrorCompensation = Literal["local", "reference", "off"]


@dataclass
class GradientCompressionConfig:
    """Args:
    bits: integer width of the codes (8 in the paper).
    scale_agreement: how ranks agree on a scale: ``max`` (no clipping) or ``mean`` (reference code).
    error_compensation: MLP error feedback: ``local``, ``reference`` or ``off``.
    """

    bits: int = 8
    scale_agreement: ScaleAgreement = "max"
    error_compensation: ErrorCompensation = "local"

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 16:
            raise ValueError(f"`bits` must be between 2 and 16, got {self.bits}")
        if self.scale_agreement not in ("max", "mean"):
            raise ValueError(f"`scale_agreement` must be 'max' or 'mean', got {self.scale_agreement!r}")
        if self.error_compensation not in ("local", "reference", "off"):
            raise ValueError(
                f"`error_compensation` must be 'local', 'reference' or 'off', got {self.error_compensation!r}"
            )

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1


def _world(group: dist.ProcessGroup | None) -> int:
    return dist.get_world_size(group) if dist.is_initialized() else 1


def agree_scale(
    local: torch.Tensor, config: GradientCompressionConfig, group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """The scale(s) every rank uses: the max (or mean) of the local ones."""
    scale = local.clone()
    if _world(group) > 1:
        if config.scale_agreement == "max":
            dist.all_reduce(scale, op=dist.ReduceOp.MAX, group=group)
        else:
            dist.all_reduce(scale, op=dist.ReduceOp.SUM, group=group)
            scale /= _world(group)
    return scale.clamp_min(1e-12)


def _codes(values: torch.Tensor, scale: torch.Tensor, qmax: int) -> torch.Tensor:
    """Integer codes carried in float32: clamp(round(v / s), -(qmax + 1), qmax)."""
    return torch.clamp(torch.round(values / scale), -qmax - 1, qmax)


def _sum(tensor: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    if _world(group) > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def compress_sparse_rows(
    grad: torch.Tensor, config: GradientCompressionConfig, group: dist.ProcessGroup | None = None
) -> torch.Tensor:
    """Average a sparse (rows x D) table gradient over ranks with INT-N values and one scale per table.

    Returns the averaged, dequantized sparse gradient (coalesced); only touched rows are non-zero.
    """
    grad = grad.coalesce()
    values = grad.values().float()
    local = values.abs().max() / config.qmax if values.numel() else torch.zeros(())
    scale = agree_scale(local.reshape(1), config, group)
    codes = torch.sparse_coo_tensor(grad.indices(), _codes(values, scale, config.qmax), grad.shape)
    total = _sum(codes, group).coalesce()
    return torch.sparse_coo_tensor(total.indices(), total.values() * scale / _world(group), grad.shape).coalesce()


def compress_dense(
    grad: torch.Tensor,
    error: torch.Tensor | None,
    config: GradientCompressionConfig,
    group: dist.ProcessGroup | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Average a dense MLP gradient over ranks with INT-N codes: one scale per output row (2-D) or per tensor (1-D).

    Args:
        error: this rank's error-feedback residual (same shape), or ``None`` when compensation is off.

    Returns:
        (averaged dequantized gradient, new residual or ``None``).
    """
    z = grad.float() + (error if error is not None else 0.0)
    if z.dim() >= 2:
        local = z.abs().amax(dim=tuple(range(1, z.dim())), keepdim=True) / config.qmax  # (out, 1, ...)
    else:
        local = (z.abs().max() / config.qmax).reshape(1)
    scale = agree_scale(local, config, group)
    codes = _codes(z, scale, config.qmax)
    mean_codes = _sum(codes.clone(), group) / _world(group)
    average = mean_codes * scale
    new_error = None
    if config.error_compensation == "local":
        new_error = z - codes * scale
    elif config.error_compensation == "reference":
        new_error = z - average
    return average.to(grad.dtype), new_error

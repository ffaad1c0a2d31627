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
    bits: integer width of the codes (8 in the paper; 32: float32, no compression).
    scale_agreement: how ranks agree on a scale: ``max`` (no clipping) or ``mean`` (reference code).
    error_compensation: MLP error feedback: ``local``, ``reference`` or ``off``.
    """

    bits: int = 8
    scale_agreement: ScaleAgreement = "max"
    error_compensation: ErrorCompensation = "local"

    def __post_init__(self) -> None:
        if not (2 <= self.bits <= 16 or self.bits == 32):
            raise ValueError(f"`bits` must be between 2 and 16 (or 32: no compression), got {self.bits}")
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
    """Integer codes carried in float32: clamp(round(v / s), -(qmax + 1), qmax); 32 bits: the values themselves."""
    if qmax >= 2**31 - 1:
        return values
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
    (average,), _, _ = compress_gradients([grad], [], [], config, group)
    return average


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
    _, (average,), (new_error,) = compress_gradients([], [grad], [error], config, group)
    return average, new_error


def compress_gradients(
    sparse: list[torch.Tensor],
    dense: list[torch.Tensor],
    errors: list[torch.Tensor | None],
    config: GradientCompressionConfig | None,
    group: dist.ProcessGroup | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor | None]]:
    """Average sparse table gradients and dense MLP gradients over ranks, INT-N compressed, with three collectives
    in all: the scales, the sparse codes and the dense codes (see the module docstring for the semantics).

    Args:
        sparse: sparse (rows x D) table gradients, all with the same D (one scale each).
        dense: MLP gradients (one scale per output row for 2-D, per tensor for 1-D).
        errors: the dense gradients' error-feedback residuals (``None`` entries: none yet / compensation off).
        config: ``None`` averages in float32, with the same batching (two collectives): the uncompressed baseline.

    Returns:
        (averaged sparse gradients, coalesced; averaged dense gradients; new residuals or ``None``).
    """
    sparse = [g.coalesce() for g in sparse]
    if config is None:
        config = GradientCompressionConfig(bits=32)  # the codes are then the float32 values, the scales ones
    zs = [g.float() + (e if e is not None else 0.0) for g, e in zip(dense, errors, strict=True)]
    scales = _agreed_scales(sparse, zs, config, group)
    averages_sparse = _average_sparse(sparse, scales[: len(sparse)], config.qmax, group)
    averages_dense, new_errors = _average_dense(dense, zs, scales[len(sparse) :], config, group)
    return averages_sparse, averages_dense, new_errors


def _agreed_scales(
    sparse: list[torch.Tensor],
    zs: list[torch.Tensor],
    config: GradientCompressionConfig,
    group: dist.ProcessGroup | None,
) -> list[torch.Tensor]:
    """Every tensor's scales, agreed by all ranks in one collective: one per table, per MLP output row (2-D) or per
    tensor (1-D); ones at 32 bits."""
    local = [(g.values().float().abs().max() if g.values().numel() else torch.zeros(())).reshape(1) for g in sparse]
    for z in zs:
        local.append(z.abs().amax(dim=tuple(range(1, z.dim()))) if z.dim() >= 2 else z.abs().max().reshape(1))
    if config.bits == 32:
        return [torch.ones_like(s) for s in local]
    return list(agree_scale(torch.cat(local) / config.qmax, config, group).split([s.numel() for s in local]))


def _average_sparse(
    sparse: list[torch.Tensor], scales: list[torch.Tensor], qmax: int, group: dist.ProcessGroup | None
) -> list[torch.Tensor]:
    """The tables' averaged gradients from one sparse all-reduce of their codes, stacked along their rows."""
    if not sparse:
        return []
    world = _world(group)
    offsets = [0]
    for g in sparse:
        offsets.append(offsets[-1] + g.shape[0])
    indices = torch.cat([g.indices() + offset for g, offset in zip(sparse, offsets, strict=False)], dim=1)
    codes = torch.cat([_codes(g.values().float(), s, qmax) for g, s in zip(sparse, scales, strict=True)])
    stacked = torch.sparse_coo_tensor(indices, codes, (offsets[-1], *sparse[0].shape[1:]), check_invariants=False)
    total = _sum(stacked, group).coalesce()
    rows, values = total.indices()[0], total.values()
    averages = []
    for g, s, begin, end in zip(sparse, scales, offsets, offsets[1:], strict=False):
        mask = (rows >= begin) & (rows < end)
        averages.append(
            torch.sparse_coo_tensor(
                (rows[mask] - begin).unsqueeze(0),
                (values[mask] * s / world).to(g.dtype),
                g.shape,
                is_coalesced=True,
                check_invariants=False,
            )
        )
    return averages


def _average_dense(
    dense: list[torch.Tensor],
    zs: list[torch.Tensor],
    scales: list[torch.Tensor],
    config: GradientCompressionConfig,
    group: dist.ProcessGroup | None,
) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """The MLP gradients averaged from one all-reduce of all their codes, and the new error-feedback residuals.

    ``zs`` are the gradients with this rank's residuals added (what is quantized).
    """
    shaped = [s.view(-1, *([1] * (z.dim() - 1))) if z.dim() >= 2 else s for s, z in zip(scales, zs, strict=True)]
    codes = [_codes(z, s, config.qmax) for z, s in zip(zs, shaped, strict=True)]
    averages: list[torch.Tensor] = []
    new_errors: list[torch.Tensor | None] = []
    if not codes:
        return averages, new_errors
    flat = _sum(torch.cat([c.reshape(-1) for c in codes]), group) / _world(group)
    for g, z, s, c, mean_codes in zip(dense, zs, shaped, codes, flat.split([c.numel() for c in codes]), strict=True):
        average = mean_codes.view_as(z) * s
        averages.append(average.to(g.dtype))
        if config.error_compensation == "local":
            new_errors.append(z - c * s)
        elif config.bits == 32:
            new_errors.append(None)  # nothing lost, nothing to feed back
        elif config.error_compensation == "reference":
            new_errors.append(z - average)
        else:
            new_errors.append(None)
    return averages, new_errors

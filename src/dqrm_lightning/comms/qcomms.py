"""Quantized embedding all-to-all for sharded tables: the precisions a user asks for, and TorchRec's codecs for them.

TorchRec encodes the pooled embeddings (forward) and their gradients (backward) that travel between ranks with the
codecs of a ``QCommsConfig``. :func:`qcomm_registry` builds them and probes each on the device first, so a codec this
device or FBGEMM build cannot run is refused with a message instead of silently replaced.
"""

from __future__ import annotations

import torch

from dqrm_lightning.errors import ConfigError

PRECISIONS = ("fp32", "fp16", "bf16", "fp8", "int8")


def check_precisions(forward: str | None, backward: str | None) -> None:
    """Refuse an unknown precision (``None``: FP32, no codec).

    Raises:
        ConfigError: naming ``qcomm_forward`` or ``qcomm_backward``.
    """
    for name, value in (("qcomm_forward", forward), ("qcomm_backward", backward)):
        if value is not None and value not in PRECISIONS:
            raise ConfigError(f"`{name}` must be one of {PRECISIONS} or null, got {value!r}")


def reduce_scatter_precision(forward: str | None, backward: str | None) -> str | None:
    """A requested codec precision that TorchRec cannot use in the row-wise reduce-scatter (it would replace it)."""
    return next((p for p in (forward, backward) if p in ("fp8", "int8")), None)


def qcomm_registry(forward: str | None, backward: str | None, device: torch.device) -> dict | None:
    """TorchRec's quantized-communication codecs for the embedding all-to-all, checked on ``device``.

    Each codec encodes and decodes a probe tensor first; one that fails or returns wrong values on this device
    (FP8 and INT8 on the CPU, with this FBGEMM) is refused with a message instead of silently replaced.

    Args:
        forward: precision of the pooled embeddings in the forward pass, or ``None`` (FP32).
        backward: the same for their gradients in the backward pass.
        device: where the codecs run.

    Returns:
        The registry to give TorchRec's sharder, or ``None`` when both directions are FP32.

    Raises:
        ConfigError: unknown precision, or a codec this device cannot run.
    """
    if forward is None and backward is None:
        return None
    from torchrec.distributed.fbgemm_qcomm_codec import CommType, QCommsConfig, get_qcomm_codecs_registry
    from torchrec.distributed.types import CommOp

    check_precisions(forward, backward)
    for name, value in (("qcomm_forward", forward), ("qcomm_backward", backward)):
        if value == "bf16" and device.type == "cpu":  # TorchRec would quietly send FP16 instead
            raise ConfigError(f"`{name}: bf16` is not supported on the CPU (gloo); use fp16")
    config = QCommsConfig(
        forward_precision=getattr(CommType, (forward or "fp32").upper()),
        backward_precision=getattr(CommType, (backward or "fp32").upper()),
    )
    probe = torch.linspace(-3.0, 3.0, 8 * 64, device=device).reshape(8, 64)
    try:
        registry = get_qcomm_codecs_registry(config, device=device)
        codecs = registry[CommOp.POOLED_EMBEDDINGS_ALL_TO_ALL.name]
        for direction, codec in (("forward", codecs.forward), ("backward", codecs.backward)):
            error = float((codec.decode(codec.encode(probe)) - probe).abs().max())
            if error > 0.05:
                raise ValueError(f"{direction} codec is off by {error:.3g} on a probe in [-3, 3]")
    except Exception as err:  # any failure of the codec means: not supported here
        raise ConfigError(
            f"`qcomm_forward: {forward}`, `qcomm_backward: {backward}`: this quantized all-to-all is not supported "
            f"on {device.type} with this FBGEMM build ({type(err).__name__}: {err}); use fp16 or bf16, or leave it off"
        ) from None
    return registry

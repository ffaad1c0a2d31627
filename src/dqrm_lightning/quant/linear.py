"""``FakeQuantizedLinear``: MLP weight QAT (per output row or per tensor), recomputed every forward."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn
from typing_extensions import override

from dqrm_lightning.quant.config import BiasMode, MLPGranularity, QATConfig
from dqrm_lightning.quant.fake_quant import Ste, fake_quantize, qrange, quantize_codes


def weight_scale(weight: torch.Tensor, bits: int, granularity: MLPGranularity) -> torch.Tensor:
    """Symmetric scale ``max|W_r| / (2^(b-1) - 1)`` per output row (out, 1), or one for the tensor (1, 1)."""
    return _weight_scales([weight.detach()], bits, granularity)[0]


def _weight_scales(weights: Sequence[torch.Tensor], bits: int, granularity: MLPGranularity) -> list[torch.Tensor]:
    n = 2 ** (bits - 1) - 1
    with torch.no_grad():
        # max|W| = max(max W, -min W): two read-only passes (amax and amin each run ~8x faster than aminmax(dim=1) on
        # the CPU, and ~30% faster than abs + amax, which writes a copy)
        if granularity == "per_row":
            absmax = [w.amax(dim=1, keepdim=True) for w in weights]
            lows = [w.amin(dim=1, keepdim=True) for w in weights]
        else:
            absmax = [w.amax().view(1, 1) for w in weights]
            lows = [w.amin().view(1, 1) for w in weights]
        torch._foreach_neg_(lows)
        torch._foreach_maximum_(absmax, lows)
        scales = torch._foreach_div(absmax, n)
        torch._foreach_clamp_min_(scales, 1e-8)
        return list(scales)


class _IdentityWeightFakeQuantize(torch.autograd.Function):
    """Scales + quantize-dequantize of several weights in one autograd node with identity gradients: the same values
    as ``fake_quantize(weight, weight_scale(...))`` for each, in a handful of multi-tensor (``_foreach``) kernels.

    ``apply(bits, granularity, *weights)`` returns the fake-quantized weights followed by their scales.
    """

    @staticmethod
    def forward(ctx: Any, bits: int, granularity: MLPGranularity, *weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
        scales = _weight_scales(weights, bits, granularity)
        # |w| <= max|W_r| = n * scale, so round(w / scale) already lies in [-n, n] (the float32 quotient is within
        # n * 2^-23 of n): no clamp, one pass less than fake_quantize
        out = torch._foreach_div(weights, scales)
        torch._foreach_round_(out)
        torch._foreach_mul_(out, scales)
        ctx.mark_non_differentiable(*scales)
        return (*out, *scales)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        return (None, None, *grads[: len(grads) // 2])


class FakeQuantizedLinear(nn.Linear):
    """An ``nn.Linear`` whose weight (and, in ``reference`` bias mode, bias) is fake-quantized in every forward.

    Activations stay FP32 (as in every DQRM paper run). Build with :meth:`from_linear`, which shares the parameters;
    :meth:`to_linear` is its exact inverse.

    Args:
        bits: 4 or 8.
        granularity: ``per_row`` (one scale per output neuron) or ``per_tensor``.
        bias_mode: ``fp32`` or ``reference`` (bias quantized with its row's scale and the weight bits).
        ste: straight-through gradient.
        activation_bits: also fake-quantize the layer's input (symmetric, per tensor, scale from the running max of
            |x| seen in training, frozen in evaluation), or ``None`` (default: FP32 activations, as every DQRM paper
            run; the paper reports activation quantization failing to converge, supp. Table 7).
    """

    # buffers, registered in __init__ (declared here for their type: nn.Module looks them up dynamically)
    qmin: torch.Tensor  # () lowest weight code
    qmax: torch.Tensor  # () highest weight code
    act_absmax: torch.Tensor  # () running max|x| of the input (with ``activation_bits`` only)
    # (fake-quantized weight, scale, weight version, grad mode) computed by stage_weights for the next forward
    _staged: tuple[torch.Tensor, torch.Tensor, int, bool] | None = None

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        bits: int = 4,
        granularity: MLPGranularity = "per_row",
        bias_mode: BiasMode = "fp32",
        ste: Ste = "identity",
        activation_bits: int | None = None,
        device: torch.device | None = None,
    ) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device)
        self.activation_bits = activation_bits
        if activation_bits is not None:
            self.register_buffer("act_absmax", torch.zeros((), device=device))
        self.bits = bits
        self.granularity = granularity
        self.bias_mode = bias_mode
        self.ste = ste
        self.active = True  # False: plain FP32 (e.g. during an FP32 warm-up); see enable_fake_quant
        low, high = qrange(bits)
        self.register_buffer("qmin", torch.tensor(float(low)), persistent=False)
        self.register_buffer("qmax", torch.tensor(float(high)), persistent=False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, **kwargs: Any) -> FakeQuantizedLinear:
        """Wrap ``linear`` (sharing its weight and bias Parameters; nothing is copied)."""
        module = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            device=torch.device("meta"),
            **kwargs,
        )
        module.weight = linear.weight
        module.bias = linear.bias
        low, high = qrange(module.bits)
        module.qmin = torch.tensor(float(low), device=linear.weight.device)
        module.qmax = torch.tensor(float(high), device=linear.weight.device)
        if module.activation_bits is not None:
            module.act_absmax = torch.zeros((), device=linear.weight.device)
        return module

    @classmethod
    def from_saved(cls, state: Mapping[str, torch.Tensor], **kwargs: Any) -> FakeQuantizedLinear:
        """A layer holding a saved ``state_dict`` (of this class or of an ``nn.Linear``; tensors are shared, not
        copied), e.g. to export it. Without a saved input range (``act_absmax``) the input stays FP32."""
        weight = state["weight"]
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in state, device=torch.device("meta"))
        linear.weight = nn.Parameter(weight.float(), requires_grad=False)
        if linear.bias is not None:
            linear.bias = nn.Parameter(state["bias"].float(), requires_grad=False)
        if "act_absmax" not in state:
            kwargs["activation_bits"] = None
        module = cls.from_linear(linear, **kwargs)
        if module.activation_bits is not None:
            module.act_absmax.copy_(state["act_absmax"])
        return module

    def to_linear(self) -> nn.Linear:
        """The plain ``nn.Linear`` sharing this layer's Parameters (the exact inverse of :meth:`from_linear`)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=torch.device("meta"))
        linear.weight = self.weight
        linear.bias = self.bias
        return linear

    def quantized_weight(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """(fake-quantized weight, bias as used, scale (out, 1) or (1, 1)): the one :func:`stage_weights` computed for
        this forward if it is still valid, else computed here."""
        staged = self._take_staged()
        if staged is not None:
            weight, scale = staged
        elif self.ste == "identity":  # the common case in one autograd node (a training-step hot path)
            weight, scale = _IdentityWeightFakeQuantize.apply(self.bits, self.granularity, self.weight)
        else:
            scale = weight_scale(self.weight, self.bits, self.granularity)
            weight = fake_quantize(self.weight, scale, self.qmin, self.qmax, ste=self.ste)
        bias: torch.Tensor | None = self.bias
        if bias is not None and self.bias_mode == "reference":
            bias = fake_quantize(bias, scale.view(-1), self.qmin, self.qmax, ste=self.ste)
        return weight, bias, scale

    def _set_staged(self, staged: tuple[torch.Tensor, torch.Tensor, int, bool] | None) -> None:
        # a plain attribute, set past nn.Module.__setattr__ (its Parameter/buffer/module checks cost ~10 us a call,
        # three calls per layer and step)
        self.__dict__["_staged"] = staged

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state.pop("_staged", None)  # per-forward scratch (part of an autograd graph): never copied or pickled
        return state

    def _staged_valid(self) -> bool:
        """Whether a staged weight exists and still holds: the weight has not changed since, same grad mode."""
        staged = self._staged
        return staged is not None and staged[2] == self.weight._version and staged[3] == torch.is_grad_enabled()

    def _take_staged(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The staged (weight, scale), once, if it is still valid."""
        staged = self._staged if self._staged_valid() else None
        self._set_staged(None)
        return None if staged is None else (staged[0], staged[1])

    @torch.no_grad()
    def integer_weight(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """What the integer (exported) layer holds: signed weight codes (out, in) int32, the scale of each output
        row (out, 1) and the bias as used, so that ``codes * scale`` is the fake-quantized weight."""
        _, bias, scale = self.quantized_weight()
        scale = scale.expand(self.out_features, 1)
        return quantize_codes(self.weight, scale, self.qmin, self.qmax), scale, bias

    def enable_fake_quant(self, enabled: bool = True) -> None:
        """Fake-quantize in the forward (``False``: plain FP32, e.g. during an FP32 warm-up)."""
        self.active = enabled

    def disable_fake_quant(self) -> None:
        self.enable_fake_quant(False)

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` (B, in) -> (B, out) through the fake-quantized weight (and input, with ``activation_bits``)."""
        if not self.active:
            return super().forward(x)
        weight, bias, _ = self.quantized_weight()
        if self.activation_bits is not None:
            x = self.quantize_input(x)
        return nn.functional.linear(x, weight, bias)

    def activation_scale(self) -> torch.Tensor:
        """Scale of the input grid: running max|x| / (2^(b-1) - 1)."""
        assert self.activation_bits is not None
        return (self.act_absmax / (2 ** (self.activation_bits - 1) - 1)).clamp_min(1e-8)

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        assert self.activation_bits is not None
        if self.training:
            with torch.no_grad():
                self.act_absmax.copy_(torch.maximum(self.act_absmax, x.detach().abs().max()))
        low, high = qrange(self.activation_bits)
        return fake_quantize(
            x, self.activation_scale(), x.new_tensor(float(low)), x.new_tensor(float(high)), ste=self.ste
        )

    @override
    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bits={self.bits}, granularity={self.granularity}, bias_mode={self.bias_mode}"


def linear_kwargs(config: QATConfig) -> dict[str, Any]:
    """The :class:`FakeQuantizedLinear` arguments of a model's MLP QAT settings (``config.mlp_bits`` set)."""
    return {
        "bits": config.mlp_bits,
        "granularity": config.mlp_granularity,
        "bias_mode": config.mlp_bias,
        "ste": config.ste,
        "activation_bits": config.mlp_activation_bits,
    }


def swap_linears(module: nn.Module, **kwargs: object) -> int:
    """Replace every ``nn.Linear`` below ``module`` by a FakeQuantizedLinear sharing its parameters; returns count."""
    count = 0
    for name, child in list(module.named_children()):
        if type(child) is nn.Linear:
            setattr(module, name, FakeQuantizedLinear.from_linear(child, **kwargs))
            count += 1
        else:
            count += swap_linears(child, **kwargs)
    return count


def stage_weights(layers: Sequence[FakeQuantizedLinear]) -> None:
    """Fake-quantize the weights of ``layers`` for their next forward, all at once: one autograd node and a few
    multi-tensor kernels per (bits, granularity) instead of a node and ~8 kernels per layer (at batch 128 the
    per-layer calls cost more than the arithmetic). Each layer uses its staged weight once, and only while its
    weight is unchanged (same version counter) and the grad mode is the same; otherwise it computes its own."""
    groups: dict[tuple[int, str], list[FakeQuantizedLinear]] = {}
    for layer in layers:
        if not (layer.active and layer.ste == "identity"):
            layer._set_staged(None)
        elif not layer._staged_valid():  # a valid one (staged since the weight last changed) is kept
            layer._set_staged(None)
            groups.setdefault((layer.bits, layer.granularity), []).append(layer)
    grad = torch.is_grad_enabled()
    for (bits, granularity), members in groups.items():
        versions = [layer.weight._version for layer in members]  # before: a weight changed meanwhile is not staged
        out = _IdentityWeightFakeQuantize.apply(bits, granularity, *(layer.weight for layer in members))
        for i, layer in enumerate(members):
            layer._set_staged((out[i], out[len(members) + i], versions[i], grad))


class WeightStaging:
    """A forward pre-hook that calls :func:`stage_weights` for the :class:`FakeQuantizedLinear` layers below the
    module it is registered on (found once, at construction), before each forward of that module.

    Example::

        model.register_forward_pre_hook(WeightStaging(model))
    """

    def __init__(self, module: nn.Module) -> None:
        self.layers = [m for m in module.modules() if isinstance(m, FakeQuantizedLinear)]

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if not any(isinstance(a, torch.fx.Proxy) for a in args):  # a trace (TorchRec's pipeline) computes nothing
            stage_weights(self.layers)

    @staticmethod
    def register(module: nn.Module) -> None:
        """Register on ``module`` (once: a module that has one already keeps it)."""
        if not any(isinstance(hook, WeightStaging) for hook in module._forward_pre_hooks.values()):
            module.register_forward_pre_hook(WeightStaging(module))

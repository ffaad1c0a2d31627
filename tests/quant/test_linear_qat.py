import copy

import pytest
import torch
from torch import nn

from dqrm_lightning.quant.linear import FakeQuantizedLinear, WeightStaging, stage_weights, swap_linears


def brute_force(weight: torch.Tensor, bits: int) -> torch.Tensor:
    n = 2 ** (bits - 1) - 1
    out = torch.empty_like(weight)
    for r in range(weight.shape[0]):
        s = max(weight[r].abs().max().item() / n, 1e-8)
        out[r] = torch.clamp(torch.round(weight[r] / s), -n - 1, n) * s
    return out


@pytest.mark.parametrize("bits", [4, 8])
def test_per_row_weight_quantization(bits):
    torch.manual_seed(bits)
    linear = nn.Linear(7, 5)
    fq = FakeQuantizedLinear.from_linear(linear, bits=bits)
    assert fq.weight is linear.weight
    assert fq.bias is linear.bias
    weight, bias, scale = fq.quantized_weight()
    torch.testing.assert_close(weight, brute_force(linear.weight.detach(), bits), rtol=0, atol=1e-7)
    assert bias is linear.bias
    assert scale.shape == (5, 1)
    x = torch.randn(3, 7)
    torch.testing.assert_close(fq(x), x @ weight.T + linear.bias, rtol=1e-6, atol=1e-6)
    assert fq.to_linear().weight is linear.weight


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("granularity", ["per_row", "per_tensor"])
def test_the_training_fast_path_never_needs_a_clamp(bits, granularity):
    """The identity-STE path skips the clamp: its codes equal the clamped ones exactly, for rows of every magnitude
    (the row maxima of both signs are hit exactly)."""
    torch.manual_seed(bits)
    weight = torch.randn(64, 97) * torch.logspace(-30, 30, 64).unsqueeze(1)
    weight[::3, 5] = -weight[::3].abs().amax(dim=1) * 1.0000001  # a negative extreme in some rows
    weight[1] = 0.0
    fq = FakeQuantizedLinear.from_linear(nn.Linear(97, 64), bits=bits, granularity=granularity)
    with torch.no_grad():
        fq.weight.copy_(weight)
    fast, _, scale = fq.quantized_weight()
    n = 2 ** (bits - 1) - 1
    clamped = torch.clamp(torch.round(weight / scale), -n - 1, n) * scale
    torch.testing.assert_close(fast, clamped, rtol=0, atol=0)


def test_per_tensor_and_reference_bias():
    torch.manual_seed(0)
    linear = nn.Linear(4, 3)
    with torch.no_grad():
        linear.bias.copy_(torch.tensor([10.0, -0.01, 0.02]))
    fq = FakeQuantizedLinear.from_linear(linear, bits=4, granularity="per_tensor", bias_mode="reference")
    weight, bias, scale = fq.quantized_weight()
    assert scale.shape == (1, 1)
    s = linear.weight.abs().max().item() / 7
    torch.testing.assert_close(weight, torch.clamp(torch.round(linear.weight / s), -8, 7) * s, rtol=0, atol=1e-7)
    assert float(bias[0]) == pytest.approx(7 * s)  # the reference clamps the bias to the weight grid
    assert (bias.detach() / s - torch.round(bias.detach() / s)).abs().max() < 1e-5


def test_gradient_flows_to_the_fp32_weight():
    linear = nn.Linear(3, 2)
    fq = FakeQuantizedLinear.from_linear(linear, bits=4)
    fq(torch.ones(1, 3)).sum().backward()
    torch.testing.assert_close(linear.weight.grad, torch.ones(2, 3))  # identity STE


def test_swap_linears_counts_and_keeps_state_dict_keys():
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Sequential(nn.Linear(3, 1)))
    keys = list(model.state_dict())
    assert swap_linears(model, bits=8) == 2
    assert list(model.state_dict()) == keys
    assert isinstance(model[0], FakeQuantizedLinear)
    assert isinstance(model[2][0], FakeQuantizedLinear)


def test_activation_quantization_uses_the_running_max_and_freezes_in_eval():
    torch.manual_seed(0)
    fq = FakeQuantizedLinear.from_linear(nn.Linear(4, 2), bits=8, activation_bits=8)
    fq.train()
    fq(torch.tensor([[1.0, -3.0, 0.5, 2.0]]))
    fq(torch.tensor([[0.1, 0.2, -0.3, 0.4]]))
    assert float(fq.act_absmax) == 3.0
    fq.eval()
    x = torch.tensor([[0.7, -5.0, 0.01, 1.0]])
    fq(x)
    assert float(fq.act_absmax) == 3.0  # frozen in evaluation
    s = 3.0 / 127
    torch.testing.assert_close(fq.quantize_input(x), torch.clamp(torch.round(x / s), -128, 127) * s)


@pytest.mark.parametrize("granularity", ["per_row", "per_tensor"])
@pytest.mark.parametrize("bias_mode", ["fp32", "reference"])
def test_integer_weight_is_the_fake_quantized_weight_exactly(granularity, bias_mode):
    torch.manual_seed(0)
    settings = {"bits": 4, "granularity": granularity, "bias_mode": bias_mode}
    fq = FakeQuantizedLinear.from_linear(nn.Linear(9, 5), **settings)
    weight, bias, _ = fq.quantized_weight()
    codes, scale, used_bias = fq.integer_weight()
    assert codes.dtype == torch.int32
    assert scale.shape == (5, 1)
    torch.testing.assert_close(codes * scale, weight.detach(), rtol=0, atol=0)
    torch.testing.assert_close(used_bias, bias.detach(), rtol=0, atol=0)
    saved = FakeQuantizedLinear.from_saved(fq.state_dict(), **settings)  # as export rebuilds it
    torch.testing.assert_close(saved.integer_weight()[0], codes, rtol=0, atol=0)


def _staged_mlp(seed: int, **settings: object) -> nn.Sequential:
    torch.manual_seed(seed)
    mlp = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 1))
    swap_linears(mlp, **settings)
    return mlp


@pytest.mark.parametrize("granularity", ["per_row", "per_tensor"])
def test_staged_weights_train_exactly_as_per_layer_ones(granularity):
    """All layers' weights fake-quantized at once before the forward (WeightStaging) give the same outputs,
    gradients and SGD trajectory as each layer quantizing its own, bit for bit; mixed settings form separate groups."""
    settings = {"bits": 4, "granularity": granularity}
    staged, plain = _staged_mlp(0, **settings), _staged_mlp(0, **settings)
    staged[4].bits = plain[4].bits = 8  # a second (bits, granularity) group
    WeightStaging.register(staged)
    WeightStaging.register(staged)  # once only
    assert len(staged._forward_pre_hooks) == 1
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.5) for m in (staged, plain)]
    x = torch.randn(32, 6)
    for _ in range(4):
        for model, optimizer in zip((staged, plain), optimizers, strict=True):
            optimizer.zero_grad()
            model(x).square().mean().backward()
            optimizer.step()
        for a, b in zip(staged.parameters(), plain.parameters(), strict=True):
            torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0)
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert all(layer._staged is None for layer in staged if isinstance(layer, FakeQuantizedLinear))  # used once


def test_a_stale_staged_weight_is_never_used():
    """A staged weight is dropped when its weight changed since (an optimizer step) or the grad mode differs."""
    mlp = _staged_mlp(1, bits=4)
    layers = [m for m in mlp if isinstance(m, FakeQuantizedLinear)]
    x = torch.randn(5, 6)
    stage_weights(layers)
    with torch.no_grad():
        layers[0].weight.mul_(3.0)  # changed after staging
    expected = brute_force(layers[0].weight.detach(), 4)
    torch.testing.assert_close(layers[0].quantized_weight()[0], expected, rtol=0, atol=1e-7)
    with torch.no_grad():
        stage_weights(layers)  # staged without gradients ...
    mlp(x).sum().backward()  # ... is not used by a training forward
    assert all(layer.weight.grad is not None and bool(layer.weight.grad.abs().sum() > 0) for layer in layers)
    stage_weights(layers)
    copy.deepcopy(mlp)  # a staged weight (part of an autograd graph) is not copied with the model
    layers[0].enable_fake_quant(False)
    stage_weights(layers)  # an inactive layer stages nothing
    assert layers[0]._staged is None

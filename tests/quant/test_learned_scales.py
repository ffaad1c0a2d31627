"""Learned embedding scales (``scale_learning: lsq``): the LSQ / LSQ+ gradients against a per-element reference, the
float16 grid, the optimizer, the schedule and the configuration checks."""

import itertools
import math

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dqrm_lightning.quant.config import QATConfig
from dqrm_lightning.quant.embedding import EmbeddingQuantizer
from dqrm_lightning.quant.fake_quant import MIN_FP16_SCALE, fp16_nearest, qrange
from tests.helpers.model import ROWS, qat_module, random_batch

FEATURES = ["C1", "C2", "C3", "C4"]
BITS = {"C1": 2, "C2": 4, "C3": 8}  # C4 stays FP32


def one_hot(batch: int) -> KeyedJaggedTensor:
    lengths = torch.ones(len(FEATURES) * batch, dtype=torch.int32)
    return KeyedJaggedTensor.from_lengths_sync(keys=FEATURES, values=torch.zeros(len(lengths)), lengths=lengths)


def learned_quantizer(mode: str, ste: str) -> EmbeddingQuantizer:
    """Four tables (2, 4, 8 bits and FP32) with learned grids set by hand, as if initialised."""
    config = QATConfig(embedding_bits_per_table=BITS, embedding_mode=mode, ste=ste, scale_learning="lsq")
    quantizer = EmbeddingQuantizer(FEATURES, [ROWS] * 4, 3, config)  # D = 3
    with torch.no_grad():
        quantizer.scale.copy_(torch.tensor([0.3, 0.07, 0.004, 1.0]))
        quantizer.offset.copy_(torch.tensor([-0.5, -0.6, -0.4, 0.0]) if mode == "asymmetric" else torch.zeros(4))
    quantizer.refreshes.fill_(1)
    return quantizer


def reference(x, upstream, scale, offset, bits, mode, ste):
    """Per-element LSQ (LSQ+): output and the gradients of x, each table's scale and offset, in Python floats."""
    batch, features, dim = x.shape
    out, grad_x = torch.zeros_like(x), torch.zeros_like(x)
    grad_s, grad_o = [0.0] * features, [0.0] * features
    for b, f, d in itertools.product(range(batch), range(features), range(dim)):
        value, w = float(x[b, f, d]), float(upstream[b, f, d])
        if not bits[f]:
            out[b, f, d], grad_x[b, f, d] = value, w
            continue
        low, high = qrange(bits[f], mode)
        g = 1.0 / math.sqrt(batch * dim * high)
        v = (value - offset[f]) / scale[f]
        q = round(v)  # half to even, as torch.round
        inside = low <= q <= high
        code = min(max(q, low), high)
        out[b, f, d] = code * scale[f] + offset[f]
        grad_x[b, f, d] = w if inside or ste == "identity" else 0.0
        grad_s[f] += w * ((code - v) if inside else code) * g
        grad_o[f] += w * (0.0 if inside else 1.0) * g
    return out, grad_x, torch.tensor(grad_s), torch.tensor(grad_o)


@pytest.mark.parametrize(
    ("mode", "ste"), [("symmetric", "clipped"), ("asymmetric", "clipped"), ("symmetric", "identity")]
)
def test_lsq_forward_and_gradients_match_a_per_element_reference(mode, ste):
    quantizer = learned_quantizer(mode, ste)
    generator = torch.Generator().manual_seed(0)
    x = (torch.rand(5, 4, 3, generator=generator) - 0.5) * 2.0  # values inside and outside each grid
    upstream = torch.randn(5, 4, 3, generator=generator)
    x.requires_grad_(True)
    out = quantizer.quantize(x, one_hot(5))
    (out * upstream).sum().backward()

    scale, offset = (t.detach().tolist() for t in quantizer.grid())
    bits = [BITS.get(f, 0) for f in FEATURES]
    want_out, want_x, want_s, want_o = reference(x.detach(), upstream, scale, offset, bits, mode, ste)
    torch.testing.assert_close(out.detach(), want_out, rtol=0, atol=1e-6)
    torch.testing.assert_close(x.grad, want_x, rtol=0, atol=0)
    torch.testing.assert_close(quantizer.scale.grad, want_s, rtol=1e-5, atol=1e-7)
    assert float(quantizer.scale.grad.abs()[:3].min()) > 0  # every quantized table's scale is trained
    if mode == "asymmetric":
        torch.testing.assert_close(quantizer.offset.grad, want_o, rtol=1e-5, atol=1e-7)
    else:
        assert not isinstance(quantizer.offset, torch.nn.Parameter)  # symmetric grids have no offset to learn


def test_the_forward_grid_is_float16_with_a_positive_floor_and_a_straight_through_gradient():
    quantizer = learned_quantizer("asymmetric", "clipped")
    with torch.no_grad():
        quantizer.scale.copy_(torch.tensor([0.1234567, -3.0, 1e-9, 1.0]))
        quantizer.offset.copy_(torch.tensor([-0.3333333, 0.1, 0.2, 0.0]))
    scale, offset = quantizer.grid()
    torch.testing.assert_close(
        scale.detach(), fp16_nearest(torch.tensor([0.1234567, MIN_FP16_SCALE, MIN_FP16_SCALE, 1.0]))
    )
    assert (
        float(scale[1].detach()) == MIN_FP16_SCALE == float(torch.tensor(MIN_FP16_SCALE).half())
    )  # the floor is float16
    torch.testing.assert_close(offset.detach(), fp16_nearest(torch.tensor([-0.3333333, 0.1, 0.2, 0.0])))
    (scale.sum() + 2 * offset.sum()).backward()
    torch.testing.assert_close(quantizer.scale.grad, torch.ones(4), rtol=0, atol=0)
    torch.testing.assert_close(quantizer.offset.grad, torch.full((4,), 2.0), rtol=0, atol=0)


def test_learned_scales_start_from_the_extrema_train_in_the_dense_optimizer_and_are_never_refreshed():
    module = qat_module(QATConfig(embedding_bits=4, scale_period=2, scale_learning="lsq", lsq_lr_scale=3.0))
    quantizer = module.embedding_quantizer
    optimizer = module.configure_optimizers()
    learned = [group for group in optimizer.param_groups if any(p is quantizer.scale for p in group["params"])]
    assert len(learned) == 1
    assert learned[0]["lr"] == pytest.approx(3 * module.hparams["learning_rate"])
    refreshed = []
    for step in range(6):
        refreshed.append(quantizer.maybe_refresh(step))
        if step == 0:
            initial = quantizer.scale.detach().clone()
            assert torch.equal(initial, fp16_nearest(initial))  # the extrema's grid, exactly float16
        batch = random_batch(batch_size=64, rows=ROWS, seed=step)
        optimizer.zero_grad()
        module._loss(module(batch), batch).backward()
        optimizer.step()
    assert refreshed == [True] + [False] * 5  # scale_period only sets the first grid
    assert not torch.equal(quantizer.scale.detach(), initial)  # trained


def test_plain_scales_are_buffers_and_add_no_optimizer_group():
    module = qat_module(QATConfig(embedding_bits=4))
    assert not list(module.embedding_quantizer.parameters())
    assert len(module.configure_optimizers().param_groups) == 1


def test_learned_scales_refuse_multi_hot_features():
    module = qat_module(QATConfig(embedding_bits=4, scale_learning="lsq"))
    lengths = torch.tensor([2, 1] * 26, dtype=torch.int32)
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=module.embedding_quantizer.feature_names,
        values=torch.zeros(int(lengths.sum()), dtype=torch.int64),
        lengths=lengths,
    )
    with pytest.raises(NotImplementedError, match="one-hot"):
        module.dlrm.sparse_arch(kjt)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rounding": "up"}, "`rounding` must be 'nearest' or 'stochastic', got 'up'"),
        ({"scale_learning": "pact"}, "`scale_learning` must be 'none' or 'lsq', got 'pact'"),
        ({"lsq_lr_scale": 0}, "`lsq_lr_scale` must be a positive number, got 0"),
        ({"lsq_lr_scale": True}, "`lsq_lr_scale` must be a positive number, got True"),
        ({"lsq_lr_scale": float("nan")}, "`lsq_lr_scale` must be a positive number, got nan"),
        ({"scale_learning": "lsq", "scale_tracking": "exact"}, "`scale_learning: lsq` trains the scales"),
    ],
)
def test_bad_training_grid_settings_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        QATConfig(embedding_bits=4, **kwargs)


def test_scale_learning_is_structural_and_rounding_is_not():
    base = QATConfig(embedding_bits=4)
    assert base.structural_differences(QATConfig(embedding_bits=4, scale_learning="lsq")) == ["scale_learning"]
    assert base.structural_differences(QATConfig(embedding_bits=4, rounding="stochastic")) == []


def row_wise_reference(x, upstream, ratio, bits, mode):
    """Row-wise LSQ in Python floats: each (sample, feature) row's grid from its own extrema, its scale ``ratio[f] *
    span / levels`` rounded to float16; output, and the gradient of each table's ratio (each row's LSQ scale
    gradient in units of its span)."""
    batch, features, dim = x.shape
    out, grad_ratio = torch.zeros_like(x), [0.0] * features
    for b, f in itertools.product(range(batch), range(features)):
        row = [float(v) for v in x[b, f]]
        if not bits[f]:
            out[b, f] = x[b, f]
            continue
        low, high = qrange(bits[f], mode)
        if mode == "symmetric":
            offset, span = 0.0, max(abs(v) for v in row) / high
        else:
            offset = float(torch.tensor(min(row)).half())
            span = (max(row) - offset) / high
        scale = max(float(torch.tensor(ratio[f] * span, dtype=torch.float32).half()), MIN_FP16_SCALE)
        g = 1.0 / math.sqrt(batch * dim * high)
        for d, value in enumerate(row):
            v = (value - offset) / scale
            q = round(v)
            code = min(max(q, low), high)
            out[b, f, d] = code * scale + offset
            grad_ratio[f] += float(upstream[b, f, d]) * ((code - v) if low <= q <= high else code) * g / span
    return out, torch.tensor(grad_ratio)


@pytest.mark.parametrize("mode", ["asymmetric", "symmetric"])
def test_row_wise_lsq_learns_one_clipping_ratio_per_table_matching_a_per_element_reference(mode):
    config = QATConfig(
        embedding_bits_per_table=BITS, embedding_mode=mode, embedding_granularity="per_row", scale_learning="lsq"
    )
    quantizer = EmbeddingQuantizer(FEATURES, [ROWS] * 4, 3, config)
    assert [name for name, _ in quantizer.named_parameters()] == ["row_ratio"]  # no per-table scale to learn
    with torch.no_grad():
        quantizer.row_ratio.copy_(torch.tensor([0.8, 0.9, 1.0, 1.0]))
    quantizer.refreshes.fill_(1)
    generator = torch.Generator().manual_seed(1)
    x = (torch.rand(5, 4, 3, generator=generator) - 0.5) * 2.0
    upstream = torch.randn(5, 4, 3, generator=generator)
    out = quantizer.quantize(x, one_hot(5))
    (out * upstream).sum().backward()
    bits = [BITS.get(f, 0) for f in FEATURES]
    want_out, want_ratio = row_wise_reference(x, upstream, quantizer.row_ratio.detach().tolist(), bits, mode)
    torch.testing.assert_close(out.detach(), want_out, rtol=0, atol=1e-6)
    torch.testing.assert_close(quantizer.row_ratio.grad[:3], want_ratio[:3], rtol=1e-4, atol=1e-7)
    assert float(quantizer.row_ratio.grad[:3].abs().min()) > 0

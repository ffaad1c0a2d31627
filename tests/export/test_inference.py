import pytest
import torch
from torch import nn

from dqrm_lightning.export.exporter import export_checkpoint
from dqrm_lightning.export.inference import load_inference_model
from dqrm_lightning.quant.config import QATConfig
from tests.helpers.model import ROWS, random_batch, save_checkpoint, trained_module


@pytest.fixture
def int4_artifact(tmp_path):
    """A trained whole-model INT4 QAT module and its artifact (the module's tables live in a one-process group that
    each test tears down, so it is built per test)."""
    module = trained_module(QATConfig(embedding_bits=4, mlp_bits=4))
    save_checkpoint(module, tmp_path / "m.ckpt")
    export_checkpoint(tmp_path / "m.ckpt", tmp_path / "art")
    return module, tmp_path / "art"


def _layers(model: nn.Module) -> list[nn.Module]:
    """The layers with a weight of both MLPs, in forward order."""
    return [m for arch in (model.dense_arch, model.over_arch) for m in arch if hasattr(m, "weight")]


def test_fp32_mlp_holds_the_dequantized_weights_once(int4_artifact):
    _, art = int4_artifact
    model = load_inference_model(art, "plain")
    linears = _layers(model)
    # dense [16, 8], over [16, 1]: float32 weights dequantized once at load, not per forward
    assert [type(linear) for linear in linears] == [nn.Linear] * 4
    assert all(linear.weight.dtype == torch.float32 for linear in linears)


@pytest.mark.parametrize("engine", ["torchrec", "plain"])
def test_bf16_mlp_multiplies_by_the_exact_integer_codes_and_stays_close_to_qat_eval(int4_artifact, engine):
    module, art = int4_artifact
    fp32 = load_inference_model(art, engine)
    bf16 = load_inference_model(art, engine, mlp_precision="bf16")
    layers = _layers(bf16)
    assert len(layers) == 4
    for layer, linear in zip(layers, _layers(fp32), strict=True):
        assert layer.weight.dtype == torch.bfloat16
        codes = layer.weight.float()
        assert torch.equal(codes, codes.round())  # INT4 codes, exact in bfloat16
        assert int(codes.abs().max()) <= 8
        assert torch.equal(codes * layer.scale[:, None], linear.weight)  # the same weight as the fp32 path
    batch = random_batch(seed=5, rows=ROWS, batch_size=256)
    with torch.no_grad():
        expected = torch.sigmoid(module(batch))
    got = torch.sigmoid(bf16(batch.dense_features, batch.sparse_features).squeeze(-1))
    exact = torch.sigmoid(fp32(batch.dense_features, batch.sparse_features).squeeze(-1))
    assert float((exact - expected).abs().max()) <= 1e-5
    assert 0 < float((got - expected).abs().max()) <= 1e-2  # another computation, a bfloat16 rounding away


def test_an_unknown_mlp_precision_is_refused_before_reading(tmp_path):
    with pytest.raises(ValueError, match=r"`mlp_precision` must be one of \('fp32', 'bf16'\), got 'int8'"):
        load_inference_model(tmp_path / "missing", mlp_precision="int8")

"""The QAT API: one validated QATConfig, prepare_qat as a module swap, fake-quantization toggles, the callback."""

import pytest
import torch
from torch import nn
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from dqrm_lightning.callbacks import QuantizationAwareTraining
from dqrm_lightning.data.criteo import DEFAULT_CAT_NAMES
from dqrm_lightning.model import DLRMModule
from dqrm_lightning.names import table_name
from dqrm_lightning.quant import (
    EmbeddingQuantizer,
    FakeQuantizedLinear,
    FakeQuantizedSparseArch,
    QATConfig,
    disable_fake_quant,
    enable_fake_quant,
    prepare_qat,
)
from tests.helpers.model import random_batch

ROWS = 30


def plain_dlrm() -> DLRM:
    """A small unsharded DLRM with its tables on the CPU."""
    torch.manual_seed(0)
    tables = [
        EmbeddingBagConfig(name=table_name(f), embedding_dim=8, num_embeddings=ROWS, feature_names=[f])
        for f in DEFAULT_CAT_NAMES
    ]
    ebc = EmbeddingBagCollection(tables=tables)
    return DLRM(ebc, dense_in_features=13, dense_arch_layer_sizes=[16, 8], over_arch_layer_sizes=[16, 1])


def test_prepare_qat_swaps_modules_in_place_and_keeps_every_state_dict_key():
    model = plain_dlrm()
    keys = list(model.state_dict())
    quantizer = prepare_qat(model, QATConfig(embedding_bits=4, mlp_bits=4))
    assert isinstance(model.sparse_arch, FakeQuantizedSparseArch)
    assert model.sparse_arch.quantizer is quantizer
    assert isinstance(quantizer, EmbeddingQuantizer)
    assert all(isinstance(m, FakeQuantizedLinear) for m in model.modules() if isinstance(m, nn.Linear))
    assert list(model.state_dict()) == keys  # the quantizer's state belongs to whoever registers it
    assert "FakeQuantizedSparseArch" in repr(model)  # the model says where quantization happens


def test_prepare_qat_quantizes_only_what_the_config_asks():
    model = plain_dlrm()
    assert prepare_qat(model, QATConfig(mlp_bits=8)) is None
    assert not isinstance(model.sparse_arch, FakeQuantizedSparseArch)
    model = plain_dlrm()
    prepare_qat(model, QATConfig(embedding_bits=8))
    assert not any(isinstance(m, FakeQuantizedLinear) for m in model.modules())


def test_disabled_fake_quantization_is_the_fp32_model_exactly():
    batch = random_batch(batch_size=16, rows=ROWS)
    fp32 = plain_dlrm()
    with torch.no_grad():
        expected = fp32(batch.dense_features, batch.sparse_features)
    model = plain_dlrm()
    prepare_qat(model, QATConfig(embedding_bits=2, mlp_bits=4))
    disable_fake_quant(model)  # reaches the quantizer through the sparse arch
    with torch.no_grad():
        torch.testing.assert_close(model(batch.dense_features, batch.sparse_features), expected, rtol=0, atol=0)
        enable_fake_quant(model)
        assert not torch.equal(model(batch.dense_features, batch.sparse_features), expected)


def test_the_default_config_quantizes_nothing_and_null_overrides_mean_none():
    config = QATConfig(embedding_bits_per_table=None, embedding_bits_by_rows=None)
    assert not config.enabled
    assert config.embedding_bits_per_table == {}
    assert config.embedding_bits_by_rows == []
    assert QATConfig(embedding_bits_by_rows=[(10, 4)]).embedding_bits_by_rows == [[10, 4]]


def test_the_callback_takes_the_config_object():
    config = QATConfig(embedding_bits=4)
    assert QuantizationAwareTraining(config).config is config
    with pytest.raises(TypeError, match=r"^`config` must be a QATConfig, got dict; did you mean"):
        QuantizationAwareTraining({"embedding_bits": 4})


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"embedding_dim": 0}, "^`embedding_dim` must be a positive integer, got 0$"),
        ({"dense_arch_layer_sizes": [32, 8]}, r"^the last `dense_arch_layer_sizes` entry must equal `embedding_dim`"),
        ({"num_embeddings_per_feature": [5] * 3}, "^`num_embeddings_per_feature` needs 26 sizes, got 3$"),
        ({"learning_rate": 0}, "^`learning_rate` must be positive"),
    ],
)
def test_module_arguments_are_checked_by_name_before_the_table_sizes_are_known(arguments, message):
    DLRMModule.check_arguments({"embedding_dim": 16})  # no table sizes yet: fine
    with pytest.raises(ValueError, match=message):
        DLRMModule.check_arguments(arguments)

"""Full Kaggle-size tables (33,762,577 rows x 16, 2.16 GB): slow, run with `make test-slow`."""

import pytest
import torch

from dqrm_lightning.export.artifact import load_artifact
from dqrm_lightning.export.exporter import export_checkpoint
from dqrm_lightning.model import DLRMModule
from dqrm_lightning.quant.config import QATConfig
from tests.helpers.model import KAGGLE, random_batch


@pytest.mark.slow
def test_kaggle_int4_artifact_is_an_eighth_and_predicts_like_the_qat_model(tmp_path):
    torch.manual_seed(0)
    module = DLRMModule(
        KAGGLE, embedding_dim=16, dense_arch_layer_sizes=[512, 256, 64, 16], over_arch_layer_sizes=[512, 256, 1]
    )
    module.prepare_qat(QATConfig(embedding_bits=4, mlp_bits=4))
    module.embedding_quantizer.maybe_refresh(0)
    module.eval()
    batch = random_batch(batch_size=512, rows=min(KAGGLE), seed=3)
    with torch.no_grad():
        expected = torch.sigmoid(module(batch))
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, tmp_path / "kaggle.ckpt")
    del checkpoint, module
    manifest = export_checkpoint(tmp_path / "kaggle.ckpt", tmp_path / "art")
    assert manifest["bytes"]["fp32_model"] > 2.16e9
    assert manifest["bytes"]["ratio"] <= 0.126  # paper: 0.270 GB vs 2.161 GB
    from dqrm_lightning.export.inference import TorchRecDLRM

    model = TorchRecDLRM(load_artifact(tmp_path / "art")).eval()
    got = torch.sigmoid(model(batch.dense_features, batch.sparse_features).squeeze(-1))
    assert float((got - expected).abs().max()) <= 1e-5

"""Small DLRM modules and random batches for tests, and the table sizes of the Criteo Kaggle data."""

from __future__ import annotations

import numpy as np
import torch

from dqrm_lightning.data.dataset import make_batch
from dqrm_lightning.export.exporter import export_checkpoint
from dqrm_lightning.export.inference import load_inference_model
from dqrm_lightning.model import DLRMModule
from dqrm_lightning.quant.config import QATConfig

KAGGLE = [
    1460,
    583,
    10131227,
    2202608,
    305,
    24,
    12517,
    633,
    3,
    93145,
    5683,
    8351593,
    3194,
    27,
    14992,
    5461306,
    10,
    5652,
    2173,
    4,
    7046547,
    18,
    15,
    286181,
    105,
    142572,
]

ROWS = 40  # rows per table of the QAT modules below


def random_batch(batch_size=32, rows=50, seed=0):
    """A seeded batch of ``batch_size`` samples whose ids are below ``rows``."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, rows, size=(batch_size, 26))
    return make_batch(rng.random((batch_size, 13), dtype=np.float32), ids, rng.integers(0, 2, batch_size))


def qat_module(config: QATConfig, rows: int = ROWS, table_dtype: str = "fp32") -> DLRMModule:
    """A seeded small DLRM (tables stored in ``table_dtype``) prepared for QAT with ``config``."""
    module = _small_module(rows, table_dtype)
    module.prepare_qat(config)
    return module


def _small_module(rows: int, table_dtype: str) -> DLRMModule:
    torch.manual_seed(0)
    sizes = {"dense_arch_layer_sizes": [16, 8], "over_arch_layer_sizes": [16, 1]}
    return DLRMModule([rows] * 26, embedding_dim=8, table_dtype=table_dtype, **sizes)


def _fp32_module(table_dtype: str) -> DLRMModule:
    module = _small_module(ROWS, table_dtype)
    module.configure_model()
    return module


def trained_module(config: QATConfig, steps: int = 15, table_dtype: str = "fp32") -> DLRMModule:
    """:func:`qat_module` (or the same model unquantized when ``config`` quantizes nothing) after ``steps`` training
    steps on random batches, in eval mode."""
    module = qat_module(config, table_dtype=table_dtype) if config.enabled else _fp32_module(table_dtype)
    optimizer = module.configure_optimizers()
    for step in range(steps):
        if module.embedding_quantizer is not None:
            module.embedding_quantizer.maybe_refresh(step)
        batch = random_batch(seed=step, rows=ROWS)
        optimizer.zero_grad()
        module._loss(module(batch), batch).backward()
        optimizer.step()
    return module.eval()


def save_checkpoint(module: DLRMModule, path) -> None:
    """``module`` as a single-file checkpoint like Lightning writes (state dict, hyper-parameters, QAT state)."""
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}
    module.on_save_checkpoint(checkpoint)
    torch.save(checkpoint, path)


def assert_exported_predictions_equal_qat_eval(module: DLRMModule, tmp_path, engine: str) -> None:
    """Export ``module`` (in eval mode) through a checkpoint into ``tmp_path / "art"`` and check that the artifact,
    run by ``engine``, predicts what the module does."""
    batch = random_batch(seed=123, rows=ROWS, batch_size=256)
    with torch.no_grad():
        expected = torch.sigmoid(module(batch))
    save_checkpoint(module, tmp_path / "m.ckpt")
    export_checkpoint(tmp_path / "m.ckpt", tmp_path / "art")
    model = load_inference_model(tmp_path / "art", engine)
    got = torch.sigmoid(model(batch.dense_features, batch.sparse_features).squeeze(-1))
    assert float((got - expected).abs().max()) <= 1e-5

import math

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from dqrm_lightning.checkpoint import CheckpointError
from dqrm_lightning.export.size import model_bytes
from dqrm_lightning.model import DLRMModule, model_shape
from dqrm_lightning.strategies.sharding import gather_full
from tests.helpers.model import KAGGLE, random_batch


def tiny_module(rows=50, **kwargs):
    module = DLRMModule(
        [rows] * 26, embedding_dim=8, dense_arch_layer_sizes=[16, 8], over_arch_layer_sizes=[16, 1], **kwargs
    )
    module.configure_model()
    return module


def _tables(module):
    return {
        k: (gather_full(v) if hasattr(v, "local_shards") else v).clone()
        for k, v in module.state_dict().items()
        if "embedding_bags" in k
    }


def test_only_looked_up_rows_change_and_no_dense_table_gradient():
    torch.manual_seed(0)
    module = tiny_module()
    optimizer = module.configure_optimizers()
    batch = random_batch(batch_size=4)
    before = _tables(module)
    loss = module._loss(module(batch), batch)
    loss.backward()
    optimizer.step()
    after = _tables(module)
    kjt = batch.sparse_features
    for feature in ("C1", "C7", "C26"):
        key = f"model.sparse_arch.embedding_bag_collection.embedding_bags.t_{feature}.weight"
        changed = set(torch.nonzero((before[key] != after[key]).any(dim=1)).flatten().tolist())
        looked_up = set(kjt[feature].values().tolist())
        assert changed
        assert changed <= looked_up
    for name, param in module.model.named_parameters():
        if "embedding_bags" in name:
            assert param.grad is None, f"{name} got a dense gradient"


def test_loss_decreases_on_a_tiny_model():
    torch.manual_seed(0)
    module = tiny_module()
    optimizer = module.configure_optimizers()
    batch = random_batch(batch_size=64)
    losses = []
    for _ in range(60):
        optimizer.zero_grad()
        loss = module._loss(module(batch), batch)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0]
    assert np.mean(losses[-10:]) < np.mean(losses[:10])


def test_table_init_is_dlrms_uniform():
    torch.manual_seed(0)
    module = tiny_module(rows=4000)
    table = _tables(module)["model.sparse_arch.embedding_bag_collection.embedding_bags.t_C1.weight"]
    bound = 1 / math.sqrt(4000)
    assert float(table.abs().max()) <= bound
    assert float(table.std()) == pytest.approx(2 * bound / math.sqrt(12), rel=0.05)


def test_model_bytes_of_kaggle_config():
    module = DLRMModule(
        KAGGLE, embedding_dim=16, dense_arch_layer_sizes=[512, 256, 64, 16], over_arch_layer_sizes=[512, 256, 1]
    )
    tables = 33_762_577 * 16 * 4
    assert sum(KAGGLE) == 33_762_577
    mlp = (13 * 512 + 512 + 512 * 256 + 256 + 256 * 64 + 64 + 64 * 16 + 16) + (367 * 512 + 512 + 512 * 256 + 256 + 257)
    shape = model_shape(module.hparams)
    assert model_bytes(shape) == tables + 4 * mlp
    assert model_bytes(shape, embedding_bits=4) == tables // 8 + 4 * mlp


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_embeddings_per_feature": [10] * 25}, "26 sizes"),
        ({"num_embeddings_per_feature": [10] * 25 + [0]}, "^`num_embeddings_per_feature` must be positive integers"),
        ({"embedding_dim": 0, "dense_arch_layer_sizes": [16, 0]}, "^`embedding_dim` must be a positive integer"),
        ({"over_arch_layer_sizes": [0, 1]}, r"^`over_arch_layer_sizes` must be positive integers, got \[0, 1\]"),
        ({"dense_arch_layer_sizes": [16, 4]}, "embedding_dim"),
        ({"over_arch_layer_sizes": [16, 2]}, "must be 1"),
        ({"optimizer": "adam"}, "optimizer"),
    ],
)
def test_bad_arguments_are_named(kwargs, message):
    args = {"num_embeddings_per_feature": [10] * 26, "embedding_dim": 8, "dense_arch_layer_sizes": [16, 8]} | kwargs
    with pytest.raises(ValueError, match=message):
        DLRMModule(**args)


def _small(rows, dim=8):
    return DLRMModule(rows, embedding_dim=dim, dense_arch_layer_sizes=[16, dim], over_arch_layer_sizes=[16, 1])


def test_a_checkpoint_of_other_table_sizes_or_shape_is_refused_naming_the_argument():
    saved = {"hyper_parameters": dict(_small([50] * 26).hparams)}
    _small([50] * 26).on_load_checkpoint(saved)  # the same shape: fine
    with pytest.raises(CheckpointError, match=r"`model\.num_embeddings_per_feature` differs in 2 tables") as info:
        _small([50] * 24 + [40, 60]).on_load_checkpoint(saved)
    assert "C25: 50 vs 40, C26: 50 vs 60" in str(info.value)
    with pytest.raises(CheckpointError, match=r"`model\.embedding_dim` is 8 there, 4 in this run"):
        _small([50] * 26, dim=4).on_load_checkpoint(saved)


class _Batches(pl.LightningDataModule):
    def train_dataloader(self):
        return DataLoader([random_batch(seed=i) for i in range(6)], batch_size=None)

    def val_dataloader(self):
        return DataLoader([random_batch(seed=100 + i) for i in range(2)], batch_size=None)


@pytest.mark.parametrize("optimizer", ["sgd", "adagrad"])
def test_checkpoint_round_trip_restores_tables_and_sparse_optimizer(tmp_path, optimizer):
    torch.manual_seed(0)
    module = DLRMModule(
        [50] * 26, embedding_dim=8, dense_arch_layer_sizes=[16, 8], over_arch_layer_sizes=[16, 1], optimizer=optimizer
    )
    trainer = pl.Trainer(
        max_epochs=1,
        default_root_dir=tmp_path,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=_Batches())
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    checkpoint = torch.load(path, weights_only=True)  # plain tensors only: loadable without pickle code
    torch.manual_seed(1)
    fresh = DLRMModule(
        [50] * 26, embedding_dim=8, dense_arch_layer_sizes=[16, 8], over_arch_layer_sizes=[16, 1], optimizer=optimizer
    )
    fresh.on_load_checkpoint(checkpoint)
    fresh.load_state_dict(checkpoint["state_dict"])
    batch = random_batch(seed=7)
    with torch.no_grad():
        torch.testing.assert_close(fresh(batch), module(batch), rtol=0, atol=0)
    if optimizer == "adagrad":
        saved = checkpoint["sparse_optimizer"]["state"]
        restored = fresh.model.fused_optimizer.state_dict()["state"]
        key = next(iter(saved))
        inner = next(iter(saved[key]))
        value = restored[key][inner]
        value = gather_full(value) if hasattr(value, "local_shards") else value
        assert float(saved[key][inner].abs().sum()) > 0
        torch.testing.assert_close(value, saved[key][inner])

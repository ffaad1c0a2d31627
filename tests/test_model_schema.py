"""DLRMModule built from a FeatureSchema other than Criteo's: shared tables, multi-hot and mean-pooled features,
DCN-v2, and QAT on all of them."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader
from torchrec.datasets.utils import Batch
from torchrec.modules.embedding_configs import PoolingType
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dqrm_lightning.callbacks import QuantizationAwareTraining
from dqrm_lightning.model import DLRMModule, model_shape
from dqrm_lightning.names import table_weight_key
from dqrm_lightning.quant.config import QATConfig
from dqrm_lightning.quant.fake_quant import fake_quantize, grid_from_extrema
from dqrm_lightning.schema import DenseFeature, FeatureSchema, SparseFeature, TableSpec, criteo_schema
from dqrm_lightning.strategies.sharding import EmbeddingLayout, EmbeddingPlacement, gather_full
from tests.helpers.model import random_batch

SCHEMA = FeatureSchema(
    dense=(DenseFeature("age"), DenseFeature("price"), DenseFeature("hour")),
    sparse=(
        SparseFeature("user"),
        SparseFeature("item", table="movies"),
        SparseFeature("history", table="movies", multi_hot=True),
        SparseFeature("tags", multi_hot=True),
    ),
    tables=(TableSpec("t_user", rows=20), TableSpec("movies", rows=30), TableSpec("t_tags", rows=10, pooling="mean")),
)
SIZES = {"embedding_dim": 8, "dense_arch_layer_sizes": [16, 8], "over_arch_layer_sizes": [16, 1]}


def schema_batch(batch_size: int = 16, seed: int = 0) -> Batch:
    """A seeded batch of the schema: one id per one-hot feature, 0-4 per multi-hot one (empty bags included); the
    label is the parity of the user id (learnable from the user table alone)."""
    generator = torch.Generator().manual_seed(seed)
    lengths, values = [], []
    for feature in SCHEMA.sparse:
        if feature.multi_hot:
            n = torch.randint(0, 5, (batch_size,), generator=generator)
        else:
            n = torch.ones(batch_size, dtype=torch.int64)
        rows = SCHEMA.table_of(feature.name).rows
        assert rows is not None
        lengths.append(n)
        values.append(torch.randint(0, rows, (int(n.sum()),), generator=generator))
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=SCHEMA.feature_names, values=torch.cat(values), lengths=torch.cat(lengths).int()
    )
    labels = (values[0] % 2).float()
    return Batch(torch.rand(batch_size, len(SCHEMA.dense), generator=generator), kjt, labels)


def schema_module(architecture: str = "dlrm", **kwargs) -> DLRMModule:
    torch.manual_seed(0)
    return DLRMModule(schema=SCHEMA.to_dict(), architecture=architecture, dcn_low_rank_dim=4, **SIZES, **kwargs)


def _fit(module: DLRMModule, callbacks: list | None = None, steps: int = 40) -> tuple[float, float]:
    """Loss on a fixed batch before and after ``steps`` training steps through a Lightning Trainer."""
    probe = schema_batch(batch_size=64, seed=1000)
    module.configure_model()
    with torch.no_grad():
        before = float(module._loss(module(probe), probe))
    batches = [schema_batch(batch_size=64, seed=i % 8) for i in range(steps)]
    trainer = pl.Trainer(
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks or [],
    )
    trainer.fit(module, DataLoader(batches, batch_size=None))
    module.eval()
    with torch.no_grad():
        after = float(module._loss(module(probe), probe))
    return before, after


def test_tables_come_from_the_schema():
    module = schema_module()
    configs = {cfg.name: cfg for cfg in module.table_configs()}
    assert list(configs) == ["t_user", "movies", "t_tags"]
    assert configs["movies"].feature_names == ["item", "history"]
    assert configs["movies"].num_embeddings == 30
    assert configs["t_tags"].pooling == PoolingType.MEAN
    assert configs["t_user"].pooling == PoolingType.SUM
    module.configure_model()
    state = module.state_dict()
    assert tuple(gather_full(state[table_weight_key("movies")]).shape) == (30, 8)
    assert next(m for m in module.dlrm.dense_arch.modules() if isinstance(m, torch.nn.Linear)).in_features == 3


@pytest.mark.parametrize("architecture", ["dlrm", "dcn"])
def test_forward_and_training_reduce_the_loss(architecture):
    module = schema_module(architecture)
    module.configure_model()
    assert module(schema_batch(batch_size=5)).shape == (5,)
    before, after = _fit(module)
    assert after < before - 0.02, (before, after)


def test_model_shape_counts_the_built_layers():
    for architecture in ("dlrm", "dcn"):
        module = schema_module(architecture)
        module.configure_model()
        shape = model_shape(module.hparams)
        assert list(shape.table_rows) == [20, 30, 10]
        linears = [m for m in module.dlrm.modules() if isinstance(m, torch.nn.Linear)]
        assert [(m.in_features, m.out_features) for m in linears] == list(shape.mlp_layers)
        named = dict(module.dlrm.named_parameters())
        cross = sum(p.numel() for name, p in named.items() if name.startswith("inter_arch."))
        assert shape.cross_parameters == cross
        assert (cross > 0) == (architecture == "dcn")


@pytest.mark.parametrize("architecture", ["dlrm", "dcn"])
def test_int4_qat_trains_on_the_schema(architecture):
    module = schema_module(architecture)
    config = QATConfig(embedding_bits=4, mlp_bits=4, scale_period=10)
    before, after = _fit(module, [QuantizationAwareTraining(config)])
    assert module.embedding_quantizer is not None
    assert int(module.embedding_quantizer.refreshes) >= 4  # every 10 of the 40 steps
    assert after < before - 0.02, (before, after)


def _table(module: DLRMModule, name: str) -> torch.Tensor:
    return gather_full(module.state_dict()[table_weight_key(name)]).detach()


def test_the_shared_tables_scale_covers_both_features():
    module = schema_module()
    module.prepare_qat(QATConfig(embedding_bits=4))
    quantizer = module.embedding_quantizer
    quantizer.refresh()
    with torch.no_grad():  # the extreme value of the table sits in a row only the history could look up
        _table(module, "movies")[29, 0] = 5.0
    quantizer.refresh()
    assert quantizer.table_names == ["t_user", "movies", "t_tags"]
    scales = quantizer.scales()
    assert scales["item"] == scales["history"]
    low, high = torch.aminmax(_table(module, "movies"))
    expected, _ = grid_from_extrema(low, high, torch.tensor(4), "symmetric")
    assert scales["item"] == pytest.approx(float(expected), rel=1e-6)
    assert float(expected) == pytest.approx(5.0 / 7, rel=1e-3)  # symmetric INT4: max|W| / 7 (a float16)


def test_multi_hot_correction_equals_quantizing_before_pooling():
    module = schema_module()
    module.prepare_qat(QATConfig(embedding_bits=4))
    quantizer = module.embedding_quantizer
    quantizer.refresh()
    batch = schema_batch(batch_size=8, seed=3)
    with torch.no_grad():
        pooled = module.dlrm.sparse_arch(batch.sparse_features)  # (B, F, D)
    features = batch.sparse_features.to_dict()
    for f, feature in enumerate(module.dlrm.sparse_arch.sparse_feature_names):
        spec = SCHEMA.table_of(feature)
        t = quantizer.table_names.index(spec.name)
        table = _table(module, spec.name)
        offsets = features[feature].offsets().tolist()
        for sample in range(8):
            ids = features[feature].values()[offsets[sample] : offsets[sample + 1]]
            rows = fake_quantize(table[ids], quantizer.scale[t], quantizer.qmin[t], quantizer.qmax[t])
            expected = rows.sum(0) if len(ids) else torch.zeros(8)
            if spec.pooling == "mean" and len(ids):
                expected = expected / len(ids)
            torch.testing.assert_close(pooled[sample, f], expected, rtol=1e-5, atol=1e-6)


def test_replicated_tables_train_multi_hot_qat():
    module = schema_module()
    module.place_embeddings(EmbeddingPlacement(EmbeddingLayout(embeddings="replicated")))
    before, after = _fit(module, [QuantizationAwareTraining(QATConfig(embedding_bits=4, scale_period=10))])
    assert after < before - 0.02, (before, after)


def test_per_table_bits_name_a_feature_or_a_shared_table():
    module = schema_module()
    module.prepare_qat(QATConfig(embedding_bits=4, embedding_bits_per_table={"history": 8}))
    assert module.embedding_quantizer.table_bits() == {"user": 4, "item": 8, "history": 8, "tags": 4}
    for overrides, message in (
        ({"item": 4, "history": 8}, "gives table 'movies' .* both 4 and 8 bits"),
        ({"t_C3": 2}, "unknown feature 't_C3'; features are user, item, history, tags, shared tables are movies"),
    ):
        with pytest.raises(ValueError, match=message):
            schema_module().prepare_qat(QATConfig(embedding_bits=4, embedding_bits_per_table=overrides))


def test_the_criteo_schema_builds_todays_model():
    rows = [50] * 26
    today = DLRMModule(rows, **SIZES)
    torch.manual_seed(0)
    today.configure_model()
    preset = DLRMModule(schema=criteo_schema(rows).to_dict(), **SIZES)
    torch.manual_seed(0)
    preset.configure_model()
    assert list(today.state_dict()) == list(preset.state_dict())
    for key, value in today.state_dict().items():
        torch.testing.assert_close(
            gather_full(preset.state_dict()[key]) if hasattr(value, "local_shards") else preset.state_dict()[key],
            gather_full(value) if hasattr(value, "local_shards") else value,
            rtol=0,
            atol=0,
        )
    batch = random_batch(seed=3)
    with torch.no_grad():
        torch.testing.assert_close(preset(batch), today(batch), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_embeddings_per_feature": [5] * 26}, "give `schema` .* or `num_embeddings_per_feature`"),
        ({"schema_rows": None}, r"tables \['movies'\] have no `rows`"),
        ({"schema_dim": 4}, r"tables \{'movies': 4\} \(name: dim\) differ from `embedding_dim` 8"),
        ({"architecture": "wide"}, "`architecture` must be one of"),
        ({"dcn_num_layers": 0}, "`dcn_num_layers` must be a positive integer"),
        ({"schema_name": "items"}, r"tables \['items'\] are named like methods of torch's ModuleDict"),
    ],
)
def test_bad_schema_settings_name_what_is_wrong(kwargs, message):
    tables = dict(SCHEMA.to_dict())
    items = {
        "name": kwargs.pop("schema_name", "movies"),
        "rows": kwargs.pop("schema_rows", 30),
        "dim": kwargs.pop("schema_dim", None),
    }
    tables["tables"] = [t if t["name"] != "movies" else t | items for t in tables["tables"]]
    tables["sparse"] = [s | {"table": items["name"]} if s["table"] == "movies" else s for s in tables["sparse"]]
    with pytest.raises(ValueError, match=message):
        DLRMModule(schema=tables, **SIZES, **kwargs)

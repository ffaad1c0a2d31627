"""Export and inference of any feature schema (shared tables, multi-hot bags pooled by sum or mean) and of DCN-v2
models, against hand-built TorchRec models in eval mode (a DLRMModule checkpoint's layout: ``model.`` keys)."""

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from torchrec.models.dlrm import DLRM, DLRM_DCN
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dqrm_lightning.commands.export import main as export_command
from dqrm_lightning.comms.accounting import ModelShape
from dqrm_lightning.export.artifact import ArtifactError, load_artifact, manifest_digest
from dqrm_lightning.export.exporter import export_checkpoint
from dqrm_lightning.export.inference import load_inference_model
from dqrm_lightning.export.size import quantized_model_bytes
from dqrm_lightning.names import QAT_CONFIG_KEY, QUANTIZER_PREFIX
from dqrm_lightning.quant.config import QATConfig
from dqrm_lightning.quant.embedding import EmbeddingQuantizer
from dqrm_lightning.schema import FeatureSchema, criteo_schema

D = 8
# `history` shares `movies` with `movie` but comes after `user`: the pooled order (movie, history, user, genres) is
# not the schema's feature order
SCHEMA = FeatureSchema.from_dict(
    {
        "dense": ["age", "price", "hour"],
        "sparse": [
            {"name": "movie", "table": "movies"},
            {"name": "user"},
            {"name": "history", "table": "movies", "multi_hot": True},
            {"name": "genres", "multi_hot": True},
        ],
        "tables": [
            {"name": "movies", "rows": 30, "pooling": "mean"},
            {"name": "t_user", "rows": 20},
            {"name": "t_genres", "rows": 7, "pooling": "sum"},
        ],
    }
)
DCN = {"dcn_num_layers": 2, "dcn_low_rank_dim": 3}
ENGINES = ["torchrec", "plain"]


def torchrec_model(schema: FeatureSchema, architecture: str) -> DLRM:
    """A seeded TorchRec DLRM (or DLRM_DCN) with one table per schema table, every parameter perturbed (non-zero
    cross-net biases), in eval mode."""
    torch.manual_seed(0)
    pooling = {"sum": PoolingType.SUM, "mean": PoolingType.MEAN}
    configs = [
        EmbeddingBagConfig(
            name=t.name,
            embedding_dim=D,
            num_embeddings=t.rows,
            feature_names=schema.features_of(t.name),
            pooling=pooling[t.pooling],
        )
        for t in schema.tables
    ]
    kwargs = {
        "embedding_bag_collection": EmbeddingBagCollection(tables=configs),
        "dense_in_features": len(schema.dense),
        "dense_arch_layer_sizes": [16, D],
        "over_arch_layer_sizes": [16, 1],
    }
    model = DLRM_DCN(**kwargs, **DCN) if architecture == "dcn" else DLRM(**kwargs)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return model.eval()


def save(model: DLRM, schema: FeatureSchema, architecture: str, path, qat: dict | None = None, criteo=False) -> None:
    """The checkpoint a DLRMModule of this model would write (``criteo``: one from before schemas)."""
    hp = {"embedding_dim": D, "dense_arch_layer_sizes": [16, D], "over_arch_layer_sizes": [16, 1]}
    if criteo:
        hp["num_embeddings_per_feature"] = schema.table_rows()
    else:
        hp |= {"schema": schema.to_dict(), "architecture": architecture, **DCN, "num_embeddings_per_feature": None}
    checkpoint = {"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}, "hyper_parameters": hp}
    if qat:
        checkpoint["state_dict"] |= {QUANTIZER_PREFIX + k: v for k, v in qat["quantizer"].items()}
        checkpoint[QAT_CONFIG_KEY] = asdict(qat["config"])
    torch.save(checkpoint, path)


def batch(schema: FeatureSchema, size: int = 64, seed: int = 0) -> tuple[torch.Tensor, KeyedJaggedTensor]:
    """Dense features and a KJT in the schema's feature order; multi-hot bags of 0..4 ids (some empty)."""
    rng = np.random.default_rng(seed)
    lengths, values = [], []
    for feature in schema.sparse:
        n = rng.integers(0, 5, size) if feature.multi_hot else np.ones(size, dtype=np.int64)
        lengths.append(n)
        values.append(rng.integers(0, schema.table(feature.table_name).rows, int(n.sum())))
    assert any((n == 0).any() for n in lengths) or not schema.multi_hot
    kjt = KeyedJaggedTensor(
        keys=schema.feature_names,
        values=torch.from_numpy(np.concatenate(values)),
        lengths=torch.from_numpy(np.concatenate(lengths)).int(),
    )
    return torch.from_numpy(rng.random((size, len(schema.dense)), dtype=np.float32)), kjt


@pytest.mark.parametrize("architecture", ["dlrm", "dcn"])
@pytest.mark.parametrize("engine", ENGINES)
def test_fp32_export_predicts_exactly_what_the_model_does(tmp_path, architecture, engine):
    model = torchrec_model(SCHEMA, architecture)
    save(model, SCHEMA, architecture, tmp_path / "m.ckpt")
    manifest = export_checkpoint(tmp_path / "m.ckpt", tmp_path / "art", embedding_bits=32)
    dense, sparse = batch(SCHEMA)
    with torch.no_grad():
        expected = model(dense, sparse)
    got = load_inference_model(tmp_path / "art", engine)(dense, sparse)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6 if engine == "torchrec" else 0)
    params = sum(p.numel() for p in model.parameters())  # tables, MLPs and the cross network
    assert manifest["bytes"]["fp32_model"] == 4 * params


def test_the_manifest_records_the_schema_tables_and_the_fp32_cross_network(tmp_path):
    model = torchrec_model(SCHEMA, "dcn")
    save(model, SCHEMA, "dcn", tmp_path / "m.ckpt")
    export_checkpoint(tmp_path / "m.ckpt", tmp_path / "art", embedding_bits=4)
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert manifest["version"] == 4
    assert FeatureSchema.from_dict(manifest["model"]["schema"]) == SCHEMA
    assert manifest["model"]["architecture"] == "dcn"
    assert (manifest["model"]["dcn_num_layers"], manifest["model"]["dcn_low_rank_dim"]) == (2, 3)
    assert manifest["model"]["feature_names"] == ["movie", "history", "user", "genres"]  # TorchRec's pooled order
    tables = [(t["table"], t["features"], t["pooling"], t["rows"], t["bits"], t["file"]) for t in manifest["tables"]]
    assert tables == [
        ("movies", ["movie", "history"], "mean", 30, 4, "tables/movies.bin"),
        ("t_user", ["user"], "sum", 20, 4, "tables/t_user.bin"),
        ("t_genres", ["genres"], "sum", 7, 4, "tables/t_genres.bin"),
    ]
    crossnet = manifest["crossnet"]
    assert (crossnet["bits"], crossnet["in_features"], crossnet["low_rank"], len(crossnet["layers"])) == (32, 40, 3, 2)
    w = np.fromfile(tmp_path / "art" / crossnet["layers"][1]["W_kernels"], dtype="<f4").reshape(40, 3)
    np.testing.assert_array_equal(w, model.inter_arch.crossnet.W_kernels[1].detach().numpy())


def _grid_model(model: DLRM, manifest: dict) -> DLRM:
    """``model`` with each table replaced by its values on the artifact's symmetric INT4 grid (from its scale)."""
    state = model.state_dict()
    for table in manifest["tables"]:
        key = f"sparse_arch.embedding_bag_collection.embedding_bags.{table['table']}.weight"
        scale = table["scale"]
        state[key] = torch.clamp(torch.round(state[key] / scale), -8, 7) * scale
    model.load_state_dict(state)
    return model


@pytest.mark.parametrize("architecture", ["dlrm", "dcn"])
@pytest.mark.parametrize("engine", ENGINES)
def test_int4_ptq_export_predicts_what_the_model_does_on_the_grid(tmp_path, architecture, engine):
    model = torchrec_model(SCHEMA, architecture)
    save(model, SCHEMA, architecture, tmp_path / "m.ckpt")
    manifest = export_checkpoint(tmp_path / "m.ckpt", tmp_path / "art", embedding_bits=4)
    for table in manifest["tables"]:  # one grid per table, from all its rows (every feature looking it up)
        weight = model.state_dict()[f"sparse_arch.embedding_bag_collection.embedding_bags.{table['table']}.weight"]
        assert table["scale"] == pytest.approx(float(weight.abs().max()) / 7, rel=1e-3)
    dense, sparse = batch(SCHEMA, seed=1)
    artifact = load_inference_model(tmp_path / "art", engine)
    with torch.no_grad():
        fp32 = model(dense, sparse)
        expected = _grid_model(model, manifest)(dense, sparse)
    got = artifact(dense, sparse)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert float((got - fp32).abs().max()) > 1e-4  # the grid is not FP32


@pytest.mark.parametrize("engine", ENGINES)
def test_a_qat_checkpoint_exports_one_grid_per_table_from_its_first_feature(tmp_path, engine):
    model = torchrec_model(SCHEMA, "dlrm")
    config = QATConfig(embedding_bits=4)
    features = SCHEMA.pooled_feature_names  # as the model's quantizer holds them: one grid per table
    tables = [SCHEMA.table_of(f).name for f in features]
    rows = [SCHEMA.table(t).rows for t in tables]
    mean_tables = {t.name for t in SCHEMA.tables if t.pooling == "mean"}
    quantizer = EmbeddingQuantizer(features, rows, D, config, tables, mean_tables)
    scales = {"movies": 0.015625, "t_user": 0.03125, "t_genres": 0.046875}  # float16-exact, as QAT keeps them
    with torch.no_grad():
        quantizer.scale.copy_(torch.tensor([scales[t] for t in quantizer.table_names]))
        quantizer.refreshes.fill_(1)
    save(model, SCHEMA, "dlrm", tmp_path / "m.ckpt", qat={"quantizer": quantizer.state_dict(), "config": config})
    manifest = export_checkpoint(tmp_path / "m.ckpt", tmp_path / "art")
    assert manifest["quantization"] == "qat"
    assert {t["table"]: t["scale"] for t in manifest["tables"]} == pytest.approx(scales)
    dense, sparse = batch(SCHEMA, seed=2)
    with torch.no_grad():
        expected = _grid_model(model, manifest)(dense, sparse)
    torch.testing.assert_close(
        load_inference_model(tmp_path / "art", engine)(dense, sparse), expected, rtol=0, atol=1e-5
    )


def test_the_stored_bytes_are_the_analytic_size_of_the_schema(tmp_path):
    model = torchrec_model(SCHEMA, "dlrm")
    save(model, SCHEMA, "dlrm", tmp_path / "m.ckpt")
    manifest = export_checkpoint(tmp_path / "m.ckpt", tmp_path / "art", embedding_bits=4)
    assert manifest["bytes"]["tables"] == (30 + 20 + 7) * D // 2 + 3 * 4  # each shared table once
    over_in = D + 5 * 4 // 2  # the dense vector and 4 pooled features: 5 choose 2 dot products
    shape = ModelShape([30, 20, 7], D, [(3, 16), (16, D), (over_in, 16), (16, 1)])
    assert manifest["bytes"]["model"] == quantized_model_bytes(shape, QATConfig(embedding_bits=4), SCHEMA)


def test_a_criteo_dlrm_checkpoint_keeps_the_version_3_layout(tmp_path):
    schema = criteo_schema([5] * 26)
    model = torchrec_model(schema, "dlrm")
    save(model, schema, "dlrm", tmp_path / "m.ckpt", criteo=True)
    export_checkpoint(tmp_path / "m.ckpt", tmp_path / "art", embedding_bits=4)
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert manifest["version"] == 3
    assert "schema" not in manifest["model"]
    assert "crossnet" not in manifest
    assert [t["feature"] for t in manifest["tables"]] == [f"C{i}" for i in range(1, 27)]
    assert manifest["tables"][0]["file"] == "tables/C1.bin"
    dense, sparse = batch(schema)
    with torch.no_grad():
        expected = _grid_model(model, {"tables": [t | {"table": f"t_{t['feature']}"} for t in manifest["tables"]]})(
            dense, sparse
        )
    torch.testing.assert_close(
        load_inference_model(tmp_path / "art", "torchrec")(dense, sparse), expected, rtol=0, atol=1e-5
    )


def _edit(art, edit) -> None:
    path = art / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    manifest["digest"] = manifest_digest(manifest)
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            lambda m: m["crossnet"]["layers"][0].update(W_kernels=m["crossnet"]["layers"][0]["bias"]),
            r"crossnet/bias\.0\.bin: holds float32 \[40\], cross layer 0 needs float32 \[40, 3\]",
        ),
        (lambda m: m["tables"][0].update(pooling="max"), "table movies has pooling 'max'"),
        (lambda m: m.pop("crossnet"), r"incomplete manifest \(KeyError: 'crossnet'\)"),
        (lambda m: m["model"].update(architecture="dcnv3"), "unknown architecture 'dcnv3'"),
    ],
    ids=["crossnet-shape", "pooling", "no-crossnet", "architecture"],
)
def test_a_consistently_edited_v4_manifest_is_refused_naming_the_entry(tmp_path, edit, message):
    save(torchrec_model(SCHEMA, "dcn"), SCHEMA, "dcn", tmp_path / "m.ckpt")
    export_checkpoint(tmp_path / "m.ckpt", tmp_path / "art", embedding_bits=4)
    _edit(tmp_path / "art", edit)
    with pytest.raises(ArtifactError, match=message):
        load_artifact(tmp_path / "art")


def test_dqrm_export_summarises_a_schema_artifact_by_table(tmp_path):
    save(torchrec_model(SCHEMA, "dcn"), SCHEMA, "dcn", tmp_path / "m.ckpt")
    args = ["--ckpt", str(tmp_path / "m.ckpt"), "--out", str(tmp_path / "art"), "--embedding-bits", "2"]
    summary = json.loads(Path(export_command(args)).read_text())
    assert summary["table_bits"] == {"movies": 2, "t_user": 2, "t_genres": 2}

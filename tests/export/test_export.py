import json

import numpy as np
import pytest
import torch

from dqrm_lightning.errors import ConfigError
from dqrm_lightning.export.artifact import ArtifactError, load_artifact, manifest_digest, pack_codes, unpack_codes
from dqrm_lightning.export.exporter import export_checkpoint
from dqrm_lightning.export.inference import ArtifactDLRM, load_inference_model
from dqrm_lightning.export.size import quantized_model_bytes
from dqrm_lightning.model import DLRMModule, model_shape
from dqrm_lightning.quant.config import QATConfig
from dqrm_lightning.strategies.sharding import gather_full
from tests.helpers.model import (
    ROWS,
    assert_exported_predictions_equal_qat_eval,
    random_batch,
    save_checkpoint,
    trained_module,
)


@pytest.mark.parametrize("bits", [2, 4, 8, 16])
def test_pack_unpack_round_trip(bits):
    rng = np.random.default_rng(bits)
    codes = rng.integers(0, 2**bits, size=(5, 13))  # odd width: rows padded to whole bytes
    packed = pack_codes(codes, bits)
    assert packed.shape[1] == -(-13 * bits // 8) if bits < 16 else 26
    np.testing.assert_array_equal(unpack_codes(torch.from_numpy(packed), bits, 13).numpy(), codes)


def test_int4_packing_is_fbgemms():
    values = torch.arange(16, dtype=torch.float32).reshape(1, 16)
    fbgemm = torch.ops.fbgemm.FloatOrHalfToFusedNBitRowwiseQuantizedSBHalf(values, 4)[:, :8]
    np.testing.assert_array_equal(pack_codes(values.int().numpy(), 4), fbgemm.numpy())


CONFIGS = [
    QATConfig(embedding_bits=4, mlp_bits=4),
    QATConfig(embedding_bits=2, mlp_bits=8, embedding_mode="asymmetric"),
    QATConfig(embedding_bits=8, embedding_bits_per_table={"C1": 16, "C2": 2}, mlp_bits=4, mlp_bias="reference"),
    QATConfig(embedding_bits=4, mlp_bits=4, mlp_granularity="per_tensor"),
    QATConfig(embedding_bits=4, mlp_bits=4, mlp_activation_bits=8),
    QATConfig(embedding_bits=4, mlp_bits=4, embedding_granularity="per_row"),
    QATConfig(embedding_bits=2, embedding_mode="asymmetric", embedding_granularity="per_row"),
    QATConfig(embedding_bits=2, embedding_granularity="per_row"),
    QATConfig(size_budget=0.3, embedding_granularity="per_row", embedding_mode="asymmetric"),  # INT8 and INT4 at D = 8
    QATConfig(embedding_bits=4, scale_learning="lsq", ste="clipped"),
    QATConfig(embedding_bits=4, embedding_mode="asymmetric", scale_learning="lsq", rounding="stochastic"),
    QATConfig(embedding_bits=2, rounding="stochastic"),
    QATConfig(embedding_bits=4, embedding_mode="asymmetric", embedding_granularity="per_row", rounding="stochastic"),
    QATConfig(embedding_bits=4, embedding_mode="asymmetric", embedding_granularity="per_row", scale_learning="lsq"),
]
IDS = [
    "int4",
    "int2-asym-mlp8",
    "mixed-ref-bias",
    "per-tensor",
    "act8",
    "int4-row",
    "int2-row-asym",
    "int2-row",
    "budget",
    "lsq",
    "lsq-asym-sr",
    "int2-sr",
    "int4-row-sr",
    "int4-row-lsq",
]


@pytest.mark.parametrize("config", CONFIGS, ids=IDS)
@pytest.mark.parametrize("engine", ["torchrec", "plain"])
def test_exported_predictions_equal_qat_eval(tmp_path, config, engine):
    assert_exported_predictions_equal_qat_eval(trained_module(config), tmp_path, engine)


FP16_CONFIGS = [
    QATConfig(embedding_bits=4, mlp_bits=4),
    QATConfig(embedding_bits=4, embedding_mode="asymmetric", embedding_granularity="per_row"),
    QATConfig(embedding_bits_per_table={"C1": 4}, mlp_bits=4),  # the other 25 tables exported FP32
]


@pytest.mark.parametrize("config", FP16_CONFIGS, ids=["int4", "int4-row-asym", "fp32-tables"])
def test_float16_tables_export_to_predictions_equal_to_qat_eval(tmp_path, config):
    module = trained_module(config, table_dtype="fp16")
    assert_exported_predictions_equal_qat_eval(module, tmp_path, "torchrec")
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    fp32 = [t for t in manifest["tables"] if t["bits"] == 32]
    assert len(fp32) == (25 if config.embedding_bits is None else 0)
    state = module.state_dict()
    for entry in fp32:  # an FP32 table of a float16 model holds its float16 values exactly
        table = state[f"model.sparse_arch.embedding_bag_collection.embedding_bags.t_{entry['feature']}.weight"]
        stored = np.fromfile(tmp_path / "art" / entry["file"], dtype="<f4").reshape(entry["rows"], entry["dim"])
        np.testing.assert_array_equal(stored, gather_full(table).float().numpy())


def test_ptq_of_a_float16_checkpoint_takes_the_scales_of_the_float16_tables(tmp_path):
    module = trained_module(QATConfig(embedding_bits=None), table_dtype="fp16")
    save_checkpoint(module, tmp_path / "fp16.ckpt")
    manifest = export_checkpoint(tmp_path / "fp16.ckpt", tmp_path / "art", embedding_bits=4)
    table = gather_full(module.state_dict()["model.sparse_arch.embedding_bag_collection.embedding_bags.t_C1.weight"])
    assert table.dtype == torch.float16
    low, high = (float(v) for v in torch.aminmax(table.float()))
    assert manifest["tables"][0]["scale"] == pytest.approx(max(-low, high) / 7, rel=1e-3)


@pytest.mark.parametrize("engine", ["torchrec", "plain"])
def test_row_wise_learned_clipping_ratios_are_exported_exactly(tmp_path, engine):
    config = QATConfig(embedding_bits=4, embedding_mode="asymmetric", embedding_granularity="per_row")
    module = trained_module(QATConfig(**{**config.__dict__, "scale_learning": "lsq"}))
    with torch.no_grad():  # ratios well below 1: the rows' extremes are clipped, unlike the plain row-wise grid
        module.embedding_quantizer.row_ratio.copy_(torch.linspace(0.55, 1.0, 26))
    assert_exported_predictions_equal_qat_eval(module, tmp_path, engine)


def test_artifact_size_formula(tmp_path):
    module = trained_module(QATConfig(embedding_bits=4, mlp_bits=4))
    save_checkpoint(module, tmp_path / "m.ckpt")
    manifest = export_checkpoint(tmp_path / "m.ckpt", tmp_path / "art")
    tables = 26 * ROWS * 8 * 4 // 8  # rows x D x 4 bits, packed
    mlp = 0
    for out_f, in_f in ((16, 13), (8, 16), (16, 8 + 27 * 26 // 2), (1, 16)):
        mlp += out_f * -(-in_f * 4 // 8) + 4 * out_f + 4 * out_f  # packed rows + fp32 scale + fp32 bias per row
    assert manifest["bytes"]["payload"] == tables + mlp
    # the analytic size also counts each table's fp16 scale and offset, which live in the manifest
    analytic = quantized_model_bytes(model_shape(module.hparams), module.qat_config)
    assert manifest["bytes"]["payload"] == analytic - 26 * 4
    assert manifest["bytes"]["model"] == analytic
    assert manifest["bytes"]["scale_bias"] == 26 * 4


@pytest.mark.parametrize("engine", ["torchrec", "plain"])
@pytest.mark.parametrize(("bits", "mode"), [(4, "symmetric"), (2, "asymmetric")])
def test_row_wise_artifact_embeds_exactly_as_qat_eval_and_counts_its_scales(tmp_path, bits, mode, engine):
    config = QATConfig(embedding_bits=bits, embedding_mode=mode, embedding_granularity="per_row", mlp_bits=4)
    module = trained_module(config)
    batch = random_batch(seed=7, rows=ROWS, batch_size=64)
    with torch.no_grad():
        expected = module.dlrm.sparse_arch(batch.sparse_features)  # (B, F, D)
    save_checkpoint(module, tmp_path / "m.ckpt")
    manifest = export_checkpoint(tmp_path / "m.ckpt", tmp_path / "art")
    model = load_inference_model(tmp_path / "art", engine)
    torch.testing.assert_close(model.embed(batch.sparse_features), expected, rtol=0, atol=0)
    scale_bias = load_artifact(tmp_path / "art").scale_bias["C7"]
    assert scale_bias.dtype == np.float16
    assert scale_bias.shape == (ROWS, 2)
    sizes = manifest["bytes"]
    assert sizes["scale_bias"] == 26 * ROWS * 4  # per row: fp16 scale and bias, all in the payload
    assert sizes["tables"] == 26 * ROWS * (8 * bits // 8 + 4)
    assert sizes["model"] == sizes["payload"] == quantized_model_bytes(model_shape(module.hparams), config)
    assert sizes["table_ratio"] == (8 * bits // 8 + 4) / 32


def test_a_version_2_artifact_still_loads(artifact):
    _edit_manifest(artifact, lambda m: m.update(version=2))  # version 2 = version 3 without row-wise tables
    model = load_inference_model(artifact, "plain")
    batch = random_batch(seed=1, rows=ROWS)
    assert model(batch.dense_features, batch.sparse_features).shape == (32, 1)


def test_a_row_wise_scale_file_of_the_wrong_shape_is_refused(tmp_path):
    module = trained_module(QATConfig(embedding_bits=4, embedding_granularity="per_row"), steps=1)
    save_checkpoint(module, tmp_path / "m.ckpt")
    export_checkpoint(tmp_path / "m.ckpt", tmp_path / "art")
    _edit_manifest(tmp_path / "art", lambda m: m["tables"][0].update(scale_bias="tables/C2.bin"))
    with pytest.raises(ArtifactError, match=r"C2\.bin: holds uint8 \[40, 4\], its table entry needs float16 \[40, 2\]"):
        load_artifact(tmp_path / "art")


def test_tampered_truncated_or_foreign_artifacts_are_refused(tmp_path):
    module = trained_module(QATConfig(embedding_bits=4))
    save_checkpoint(module, tmp_path / "m.ckpt")
    export_checkpoint(tmp_path / "m.ckpt", tmp_path / "art")
    load_artifact(tmp_path / "art")  # intact: fine
    table = tmp_path / "art" / "tables" / "C3.bin"
    data = bytearray(table.read_bytes())
    data[5] ^= 0xFF
    table.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="sha256 mismatch"):
        load_artifact(tmp_path / "art")
    table.write_bytes(bytes(data[:-3]))
    with pytest.raises(ArtifactError, match="truncated"):
        load_artifact(tmp_path / "art")
    manifest = tmp_path / "art" / "manifest.json"
    content = json.loads(manifest.read_text())
    manifest.write_text(json.dumps(content | {"format": "pickle"}))
    with pytest.raises(ArtifactError, match="unsupported"):
        load_artifact(tmp_path / "art")
    with pytest.raises(ArtifactError, match="no manifest"):
        load_artifact(tmp_path)


@pytest.fixture
def artifact(tmp_path):
    """An intact INT4 artifact."""
    module = trained_module(QATConfig(embedding_bits=4), steps=2)
    save_checkpoint(module, tmp_path / "m.ckpt")
    export_checkpoint(tmp_path / "m.ckpt", tmp_path / "art")
    load_artifact(tmp_path / "art")  # intact: fine
    return tmp_path / "art"


def _edit_manifest(art, edit, sign: bool = True):
    """Apply ``edit`` to the manifest; ``sign`` recomputes its digest (an edit made to look consistent)."""
    path = art / "manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    if sign:
        manifest["digest"] = manifest_digest(manifest)
    path.write_text(json.dumps(manifest))


def test_a_missing_file_or_an_edited_or_cut_manifest_is_refused_naming_it(artifact):
    art = artifact
    original = (art / "manifest.json").read_text()
    (art / "tables" / "C5.bin").rename(art / "C5.bin.away")
    with pytest.raises(ArtifactError, match=r"tables/C5\.bin: missing"):
        load_artifact(art)
    (art / "C5.bin.away").rename(art / "tables" / "C5.bin")

    def set_scale(manifest):
        manifest["tables"][2]["scale"] *= 2

    _edit_manifest(art, set_scale, sign=False)  # e.g. a scale edited by hand: the values would silently change
    with pytest.raises(ArtifactError, match=r"manifest\.json: digest mismatch \(the manifest was modified\)"):
        load_artifact(art)
    (art / "manifest.json").write_text(original[: len(original) // 2])
    with pytest.raises(ArtifactError, match=r"manifest\.json: unreadable manifest"):
        load_artifact(art)
    (art / "manifest.json").write_text(original)
    _edit_manifest(art, lambda m: m.update(version=1))
    with pytest.raises(ArtifactError, match=r"v1 unsupported .*export the checkpoint again"):
        load_artifact(art)


def _other_file(manifest, name):
    manifest["files"][name] = manifest["files"].pop("tables/C1.bin")
    manifest["tables"][0]["file"] = name


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: _other_file(m, "../m.ckpt"), r"refused: the file '\.\./m\.ckpt' lies outside the artifact"),
        (lambda m: _other_file(m, "/etc/hostname"), "refused: the file '/etc/hostname' lies outside the artifact"),
        (lambda m: m["files"]["tables/C1.bin"].update(dtype="|O"), r"C1\.bin: unsupported dtype '\|O'"),
        (lambda m: m["files"]["tables/C1.bin"].update(shape=[1, 1]), r"C1\.bin: shape \[1, 1\] of uint8 does not fill"),
        (lambda m: m["tables"][0].update(bits=8), r"C1\.bin: holds uint8 \[40, 4\], its table entry needs uint8 \[40"),
        (lambda m: m["files"].pop("tables/C1.bin"), "table C1 names the file 'tables/C1.bin', which the manifest"),
        (lambda m: m.pop("tables"), r"incomplete manifest \(KeyError: 'tables'\)"),
    ],
    ids=["parent-dir", "absolute", "object-dtype", "shape", "bits", "unlisted", "no-tables"],
)
def test_a_consistently_edited_manifest_is_still_refused_naming_the_file(artifact, edit, message):
    art = artifact
    _edit_manifest(art, edit)
    with pytest.raises(ArtifactError, match=message):
        load_artifact(art)


def test_an_artifact_of_other_table_sizes_is_refused_naming_the_argument(artifact):
    art = artifact
    other = DLRMModule([ROWS + 1] * 26, embedding_dim=8, dense_arch_layer_sizes=[16, 8], over_arch_layer_sizes=[16, 1])
    with pytest.raises(ConfigError, match=r"`model\.num_embeddings_per_feature` differs in 26 tables"):
        other.use_artifact(str(art), "plain")
    same = DLRMModule([ROWS] * 26, embedding_dim=8, dense_arch_layer_sizes=[16, 8], over_arch_layer_sizes=[16, 1])
    same.use_artifact(str(art), "plain")
    assert isinstance(same.model, ArtifactDLRM)


def test_ptq_of_an_fp32_checkpoint_trained_vs_init_scales(tmp_path):
    module = trained_module(QATConfig(embedding_bits=None), steps=30)
    save_checkpoint(module, tmp_path / "fp32.ckpt")
    with pytest.raises(ValueError, match="embedding_bits"):
        export_checkpoint(tmp_path / "fp32.ckpt", tmp_path / "x")
    trained = export_checkpoint(tmp_path / "fp32.ckpt", tmp_path / "trained", embedding_bits=4)
    init = export_checkpoint(tmp_path / "fp32.ckpt", tmp_path / "init", embedding_bits=4, ptq_scales="init")
    assert trained["quantization"] == "ptq (trained scales)"
    assert init["quantization"] == "ptq (init scales)"
    weight = module.state_dict()["model.sparse_arch.embedding_bag_collection.embedding_bags.t_C1.weight"]
    weight = weight.local_shards()[0].tensor if hasattr(weight, "local_shards") else weight
    assert trained["tables"][0]["scale"] >= float(weight.abs().max()) / 7
    assert init["tables"][0]["scale"] == pytest.approx((1 / ROWS**0.5) / 7, rel=1e-3)


def test_export_never_overwrites_a_users_files_and_leaves_nothing_partial(artifact, monkeypatch):
    checkpoint = artifact.parent / "m.ckpt"
    notes = artifact.parent / "notes"
    (notes / "tables").mkdir(parents=True)
    (notes / "keep.txt").write_text("mine")
    (notes / "tables" / "notes.txt").write_text("mine too")
    with pytest.raises(
        ArtifactError,
        match=r"`--out .*notes` is a directory holding files that are not a dqrm artifact \(keep.txt, tables\); "
        r".* --force",
    ):
        export_checkpoint(checkpoint, notes)
    assert (notes / "keep.txt").read_text() == "mine"
    assert (notes / "tables" / "notes.txt").read_text() == "mine too"
    a_file = artifact.parent / "a_file"
    a_file.write_text("mine")
    with pytest.raises(ArtifactError, match="is an existing file"):
        export_checkpoint(checkpoint, a_file)
    assert a_file.read_text() == "mine"
    export_checkpoint(checkpoint, artifact)  # a previous artifact is replaced
    export_checkpoint(checkpoint, notes, force=True)  # and anything with --force
    load_artifact(notes)
    assert not (notes / "keep.txt").exists()

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("dqrm_lightning.export.exporter.pack_codes", fail)
    with pytest.raises(OSError, match="disk full"):
        export_checkpoint(checkpoint, artifact.parent / "new")
    assert sorted(p.name for p in artifact.parent.iterdir()) == ["a_file", "art", "m.ckpt", "notes"]

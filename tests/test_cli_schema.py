"""`dqrm` on users' own data: Parquet files of a feature schema (multi-hot features, a shared table) through fit,
QAT, export and predict, DCN-v2, both multi-process strategies, and one-line errors for a bad schema."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.cli import FAST, dqrm, run_cli

SCHEMA_CONFIG = "configs/schemas/synthetic_multihot.yaml"
SMALL = ["--model.dense_arch_layer_sizes", "[16,16]", "--model.over_arch_layer_sizes", "[16,1]"]


@pytest.fixture(scope="module")
def parquet_data(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("schema") / "data"
    dqrm("data", "synth", "--schema", SCHEMA_CONFIG, "--rows", "6000", "--seed", "3", "--out", str(out))
    return out


def _common(data: Path, root: Path) -> list[str]:
    files = [x for s in ("train", "val", "test") for x in (f"--data.{s}_files", str(data / f"{s}.parquet"))]
    return ["-c", SCHEMA_CONFIG, *files, *SMALL, "--data.batch_size", "64", "--trainer.default_root_dir", str(root)]


def _predictions(summary: dict) -> list[float]:
    lines = Path(summary["predictions"]["path"]).read_text().splitlines()[1:]
    return [float(line.split("\t")[1]) for line in lines]


def test_schema_fit_qat_export_predict(tmp_path, parquet_data):
    common = [*_common(parquet_data, tmp_path / "r"), "-c", "configs/qat/int4.yaml", *FAST]
    _, fit = dqrm("fit", *common, "--trainer.max_epochs", "1")
    assert fit["qat"]["table_bits"] == {"user": 4, "item": 4, "history": 4, "tags": 4}
    best = fit["checkpoints"]["best"]
    _, export = dqrm("export", "--ckpt", best, "--out", str(tmp_path / "art"))
    assert set(export["table_bits"]) == {"t_user", "catalog", "t_tags"}  # one per table: `catalog` is shared
    _, from_checkpoint = dqrm("predict", *common, "--ckpt_path", best)
    assert len(_predictions(from_checkpoint)) == 600
    _, from_artifact = dqrm("predict", *common, "--artifact", str(tmp_path / "art"))  # both engines: tests/export
    assert _predictions(from_artifact) == pytest.approx(_predictions(from_checkpoint), abs=1e-5)


@pytest.mark.slow  # DCN's model and artifact: tested in-process (tests/test_model_schema.py, tests/export), notebook 05
def test_dcn_fits_and_its_artifact_tests_as_the_checkpoint(tmp_path, parquet_data):
    common = [*_common(parquet_data, tmp_path / "r"), "--model.architecture", "dcn", "--model.dcn_low_rank_dim", "8"]
    _, fit = dqrm("fit", *common, *FAST, "--trainer.max_epochs", "1")
    assert fit["config"]["model"]["architecture"] == "dcn"
    best = fit["checkpoints"]["best"]
    dqrm("export", "--ckpt", best, "--out", str(tmp_path / "art"), "--embedding-bits", "8")
    _, from_checkpoint = dqrm("test", *common, *FAST, "--ckpt_path", best)
    _, from_artifact = dqrm("test", *common, *FAST, "--artifact", str(tmp_path / "art"))
    assert from_artifact["test"]["test/auc"] == pytest.approx(from_checkpoint["test"]["test/auc"], abs=0.01)


@pytest.mark.slow
@pytest.mark.multiprocess
@pytest.mark.parametrize(
    "strategy",
    [["-c", "configs/parallel/model_parallel.yaml"], ["-c", "configs/parallel/int8_compression.yaml"]],
    ids=["model_parallel", "data_parallel_int8"],
)
def test_both_strategies_train_multi_hot_qat(tmp_path, parquet_data, strategy):
    common = [*_common(parquet_data, tmp_path / "r"), "-c", "configs/qat/int4.yaml", *FAST]
    _, fit = dqrm("fit", *common, "--trainer.devices", "2", *strategy, "--trainer.max_epochs", "1")
    assert fit["world_size"] == 2
    assert fit["global_step"] == 38  # 4,800 training rows in rounds of 2 x 64, the last 64 rows a round of their own
    assert fit["val"]["final"]["val/log_loss"] < 0.6  # a constant 0.5 scores 0.69: it learned the rate at least


def test_a_bad_schema_is_one_line_naming_the_entry(parquet_data):
    files = [x for s in ("train", "val", "test") for x in (f"--data.{s}_files", str(parquet_data / f"{s}.parquet"))]
    result = run_cli("fit", "--data.schema", "{sparse: [{name: a, foo: 1}]}", *files, *FAST)
    assert result.returncode != 0
    assert "`data.schema.sparse[0]` has unknown keys ['foo']" in result.stderr.strip().splitlines()[-1]

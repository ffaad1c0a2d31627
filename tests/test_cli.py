"""The `dqrm` command end to end, as a user runs it (subprocesses)."""

import json
import os
from pathlib import Path

import pytest

from dqrm_lightning import threads as thread_policy
from dqrm_lightning.cli import main
from tests.helpers.cli import FAST, ONE_EPOCH, demo_args, dqrm, on_sample, run_cli, summary_path


def test_synth_fit_test_predict(tmp_path):
    data = tmp_path / "d"
    _, _synth = dqrm("data", "synth", "--preset", "demo", "--rows", "6000", "--seed", "1", "--out", str(data))
    assert (data / "train.tsv").exists()
    assert (data / "train.tsv.truth.npy").exists()
    common = demo_args(data, tmp_path / "runs")
    progress = ["--trainer.enable_progress_bar", "true", "--progress_every_n_steps", "10"]
    out, fit = dqrm("fit", *common, "--trainer.max_epochs", "2", *progress)
    # output to a pipe: plain progress lines (every 10 steps and one per epoch with validation), no redrawn bar
    assert "\r" not in out
    lines = [line for line in out.splitlines() if line.startswith("epoch ")]
    assert lines[0].startswith("epoch 0: 10/38 steps, ")
    assert "samples/s" in lines[0]
    assert "train/loss " in lines[-1]  # logged every 50 steps (configs/demo.yaml)
    assert [line.split(":")[0] for line in lines if "val/auc" in line] == ["epoch 0", "epoch 1"]
    # thread pools sized by the policy (one rank, no loader worker), reported in the summary
    assert fit["threads"] == thread_policy.resolve(None, 1, 0).as_dict()
    assert fit["stage"] == "fit"
    assert fit["epochs_completed"] == 2
    assert set(fit["val"]["final"]) == {"val/auc", "val/accuracy", "val/log_loss"}
    assert fit["val"]["best"]["val/auc"] >= fit["val"]["final"]["val/auc"]
    assert 0.5 < fit["bayes_optimal"]["val"]["auc"] <= 1.0
    assert fit["speed"]["samples_per_s"] > 0
    assert fit["data"]["rows"]["train"] + fit["data"]["rows"]["val"] + fit["data"]["rows"]["test"] == 6000
    best = fit["checkpoints"]["best"]
    assert Path(best).name == "best.ckpt"
    _, test = dqrm("test", *common, "--ckpt_path", best)
    assert 0.0 < test["test"]["test/auc"] <= 1.0
    assert test["bayes_optimal"]["test"]["auc"] > test["test"]["test/auc"] - 0.05
    result = run_cli("test", *common, "--ckpt_path", "best")  # resolved under default_root_dir
    assert result.returncode == 0, result.stderr[-3000:]
    again = json.loads(summary_path(result.stdout).read_text())
    assert again["test"]["test/auc"] == pytest.approx(test["test"]["test/auc"], abs=1e-6)
    assert again["config"]["ckpt_path"] == best  # the file it loaded
    assert "warn" not in result.stderr.lower()  # e.g. Lightning's "callbacks used to create the checkpoint"
    user_threads = os.environ | {"OMP_NUM_THREADS": "1"}  # the usual environment variable wins over --threads
    _, validate = dqrm("validate", *common, "--ckpt_path", best, "--threads", "2", env=user_threads)
    assert (validate["threads"]["intra_op"], validate["threads"]["intra_op_from"]) == (1, "OMP_NUM_THREADS")
    assert validate["stage"] == "validate"
    assert validate["val"]["final"]["val/auc"] == pytest.approx(fit["val"]["best"]["val/auc"], abs=1e-6)
    _, predict = dqrm("predict", *common, "--ckpt_path", best, "--threads", "1")
    assert (predict["threads"]["intra_op"], predict["threads"]["intra_op_from"]) == (1, "--threads")
    predictions = Path(predict["predictions"]["path"]).read_text().splitlines()
    assert predictions[0] == "row\tprobability\tlabel"
    assert len(predictions) - 1 == fit["data"]["rows"]["test"]


def test_fit_on_real_criteo_rows(tmp_path, criteo_sample):
    root = ["--trainer.default_root_dir", str(tmp_path / "r")]
    _, fit = dqrm("fit", *on_sample(tmp_path, criteo_sample), "--data.batch_size", "32", *ONE_EPOCH, *root, *FAST)
    assert fit["data"]["rows"]["train"] == 200
    assert "bayes_optimal" not in fit  # real data: the true click model is unknown
    assert len(fit["data"]["table_sizes"]) == 26
    # the checkpoint's tables (sized by the vocabulary) do not fit tables sized by hashing: refused, named
    hashed = ["--data.categorical_encoding", "hash", "--data.num_embeddings_per_feature", json.dumps([7] * 26)]
    best = fit["checkpoints"]["best"]
    result = run_cli("validate", *on_sample(tmp_path, criteo_sample), *root, *FAST, *hashed, "--ckpt_path", best)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    differ = [f"C{i + 1}: {size} vs 7" for i, size in enumerate(fit["data"]["table_sizes"]) if size != 7]
    assert "dqrm validate: error: the checkpoint does not fit this model: " in result.stderr
    expected = f"differs in {len(differ)} tables (saved vs this run: {', '.join(differ[:4])} (+{len(differ) - 4} more))"
    assert f"`model.num_embeddings_per_feature` {expected}" in result.stderr


TORCHREC = ["--trainer.strategy", "dqrm_lightning.strategies.TorchRecStrategy"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--qat.embedding_bits", "3"], "`qat.embedding_bits` must be one of (2, 4, 8, 16) or null, got 3"),
        (["--qat.scale_period", "0"], "`qat.scale_period` must be a positive number of steps, got 0"),
        (["--model.embedding_dim", "0"], "`model.embedding_dim` must be a positive integer, got 0"),
        (["--model.table_dtype", "int8"], "`model.table_dtype: int8` is not supported: FBGEMM cannot train INT8"),
        (["--qat.embedding_bits_per_table", "{t_C3: 2}"], "`qat.embedding_bits_per_table` names an unknown feature"),
        ([*TORCHREC, "--trainer.strategy.sharding", "bogus"], "`trainer.strategy.sharding`: unknown sharding type"),
        ([*TORCHREC, "--trainer.strategy.qcomm_forward", "int4"], "`trainer.strategy.qcomm_forward` must be one of"),
        (
            ["--model.num_embeddings_per_feature", json.dumps([7] * 26)],
            "`model.num_embeddings_per_feature` is set from",
        ),
    ],
    ids=["bits", "period", "dim", "int8-tables", "per-table", "sharding", "qcomm", "table-sizes"],
)
def test_bad_settings_stop_the_run_at_startup_naming_the_argument(tmp_path, criteo_sample, args, message):
    root = tmp_path / "r"
    result = run_cli("fit", *on_sample(tmp_path, criteo_sample), "--trainer.default_root_dir", str(root), *FAST, *args)
    assert result.returncode == 1
    assert f"dqrm fit: error: {message}" in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / ".dqrm_prepared").exists()  # stopped before the data was prepared (hours on Criteo)


def test_bad_data_reports_file_and_line(tmp_path, criteo_sample):
    bad = tmp_path / "bad.tsv"
    lines = Path(criteo_sample).read_text().splitlines()
    lines[41] = lines[41].replace("68fd1e64", "68fd1ezz")  # C1 of line 42
    bad.write_text("\n".join(lines) + "\n")
    result = run_cli("data", "prepare", "--train-files", str(bad), "--out", str(tmp_path / "p"))
    assert result.returncode != 0
    assert f"{bad}:42 (field C1)" in result.stderr
    assert "Traceback" not in result.stderr


def test_print_config_stacks_yaml():
    result = run_cli("fit", "-c", "configs/kaggle.yaml", "-c", "configs/data/synthetic_kaggle.yaml", "--print_config")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "categorical_encoding: hash" in result.stdout
    assert "embedding_dim: 16" in result.stdout


def test_wandb_offline_without_credentials_writes_a_syncable_run(tmp_path, criteo_sample, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc credentials
    root = ["--trainer.default_root_dir", str(tmp_path / "r"), "--trainer.enable_progress_bar", "false"]
    result = run_cli("fit", *on_sample(tmp_path, criteo_sample), *ONE_EPOCH, *root)
    assert result.returncode == 0, result.stderr[-3000:]
    fit = json.loads(summary_path(result.stdout).read_text()) | {"_path": str(summary_path(result.stdout))}
    # no warning a user must learn to ignore: LightningCLI's args/command line, the CSV directory "not empty"
    # (wandb wrote into it first), Lightning's cloud-logger tip, wandb's "anonymous setting has no effect"
    for noise in ("LightningCLI's args parameter", "exists and is not empty", "Tip:", "anonymous"):
        assert noise not in result.stdout + result.stderr
    assert [line for line in (result.stdout + result.stderr).splitlines() if "warn" in line.lower()] == []
    runs = list(Path(fit["_path"]).parent.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    assert runs[0].stat().st_size > 0


def _predictions(summary: dict) -> list[float]:
    header, *lines = Path(summary["predictions"]["path"]).read_text().splitlines()
    column = header.split("\t").index("probability")
    return [float(line.split("\t")[column]) for line in lines]


def unlabeled_copy(source: Path, target: Path) -> Path:
    """``source`` without its label column (39 fields per line): logs to score, as Kaggle's test.txt."""
    lines = Path(source).read_text().splitlines(keepends=True)
    target.write_text("".join(line.split("\t", 1)[1] for line in lines))
    return target


@pytest.mark.slow  # about 20 s (3 runs of dqrm and 2 refusals); tests/data covers reading unlabeled files
def test_predict_scores_unlabeled_logs_with_row_ids(tmp_path, criteo_sample):
    common = [*on_sample(tmp_path, criteo_sample), "--data.batch_size", "32", "--data.eval_batch_size", "64"]
    common += ["--trainer.default_root_dir", str(tmp_path / "r"), *FAST]
    _, fit = dqrm("fit", *common, *ONE_EPOCH)
    best = fit["checkpoints"]["best"]
    out, labeled = dqrm("predict", *common, "--ckpt_path", best)
    # the output names the file (absolute) and its rows just before the summary line
    path = Path(labeled["predictions"]["path"])
    assert path.is_absolute()
    assert out.strip().splitlines()[-2] == f"predictions: {path} (200 rows)"
    assert labeled["predictions"]["labels"] is True
    lines = [line.split("\t") for line in path.read_text().splitlines()]
    assert lines[0] == ["row", "probability", "label"]
    assert [int(row) for row, _, _ in lines[1:]] == list(range(200))
    sample_labels = [int(line[0]) for line in Path(criteo_sample).read_text().splitlines()]
    assert [int(label) for _, _, label in lines[1:]] == sample_labels
    # the same rows without labels (39 fields): the same probabilities, no label column
    logs = str(unlabeled_copy(criteo_sample, tmp_path / "logs.tsv"))
    out, unlabeled = dqrm("predict", *common, "--data.test_files", logs, "--ckpt_path", best)
    path = Path(unlabeled["predictions"]["path"])
    assert out.strip().splitlines()[-2] == f"predictions: {path} (200 rows)"
    assert unlabeled["predictions"]["labels"] is False
    assert unlabeled["data"]["labeled"] == {"train": True, "val": True, "test": False}
    lines = [line.split("\t") for line in path.read_text().splitlines()]
    assert lines[0] == ["row", "probability"]
    assert [int(row) for row, _ in lines[1:]] == list(range(200))
    assert _predictions(unlabeled) == pytest.approx(_predictions(labeled), abs=1e-7)
    # a subcommand that needs labels stops with one line naming the split and the argument
    for command, change, message in (
        ("test", ["--data.test_files", logs], "the test split (`--data.test_files`) has no labels (39-field lines): "
         "score it with `dqrm predict`"),
        ("fit", ["--data.train_files", logs], "the train split (`--data.train_files`) has no labels (39-field "
         "lines): training needs labeled (40-field) lines"),
    ):  # fmt: skip
        result = run_cli(command, *common, *change)
        assert result.returncode == 1
        assert result.stderr.strip().splitlines()[-1] == f"dqrm {command}: error: {message}", result.stderr[-3000:]
        assert "Traceback" not in result.stderr


def test_qat_fit_export_predict(tmp_path, criteo_sample):
    common = [
        *on_sample(tmp_path, criteo_sample),
        "-c",
        "configs/qat/int4.yaml",
        "--data.batch_size",
        "32",
        "--trainer.default_root_dir",
        str(tmp_path / "r"),
        *FAST,
    ]
    _, fit = dqrm("fit", *common, "--trainer.max_epochs", "2", "--qat.scale_period", "3")
    assert fit["qat"]["table_bits"]["C1"] == 4
    assert fit["qat"]["scale_refreshes"] == len(range(0, fit["global_step"], 3))
    assert fit["model_bytes"]["ratio"] < 0.15
    assert fit["model_bytes"]["tables_ratio"] == pytest.approx(0.125, abs=1e-3)  # INT4 codes + one scale per table
    best = fit["checkpoints"]["best"]
    _, export = dqrm("export", "--ckpt", best, "--out", str(tmp_path / "art"))
    assert export["quantization"] == "qat"
    assert set(export["table_bits"].values()) == {4}
    _, from_checkpoint = dqrm("predict", *common, "--ckpt_path", best)
    for engine in ("torchrec", "plain"):
        _, from_artifact = dqrm("predict", *common, "--artifact", str(tmp_path / "art"), "--engine", engine)
        assert _predictions(from_artifact) == pytest.approx(_predictions(from_checkpoint), abs=1e-5)
    _, bf16 = dqrm("predict", *common, "--artifact", str(tmp_path / "art"), "--mlp_precision", "bf16")
    assert _predictions(bf16) == pytest.approx(_predictions(from_checkpoint), abs=1e-2)
    assert _predictions(bf16) != _predictions(from_checkpoint)  # the bfloat16 products ran
    # the exported model scores unlabeled logs (39 fields) as well
    logs = str(unlabeled_copy(criteo_sample, tmp_path / "logs.tsv"))
    out, unlabeled = dqrm("predict", *common, "--data.test_files", logs, "--artifact", str(tmp_path / "art"))
    assert out.strip().splitlines()[-2] == f"predictions: {unlabeled['predictions']['path']} (200 rows)"
    assert Path(unlabeled["predictions"]["path"]).read_text().splitlines()[0] == "row\tprobability"
    assert _predictions(unlabeled) == pytest.approx(_predictions(from_checkpoint), abs=1e-5)


def test_help_lists_every_subcommand_and_each_has_its_own_help(capsys, monkeypatch):
    monkeypatch.setenv("DQRM_OMP_NUM_THREADS_FROM_USER", "1")  # `main` notes it in os.environ: undone after the test
    result = run_cli("--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for command in (
        "fit",
        "validate",
        "test",
        "predict",
        "dqrm data synth|movielens|prepare",
        "dqrm export",
        "dqrm reproduce",
    ):
        assert command in text
    assert "dqrm dashboard" in text
    for command in ("data", "export", "reproduce", "dashboard"):  # in this process: no interpreter start each
        with pytest.raises(SystemExit) as exit_info:
            main([command, "--help"])
        assert exit_info.value.code == 0
        assert f"dqrm {command}" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (["--data.train_files", "{dir}"], "'{dir}' names the directory {dir}: give the files in it"),
        (["--data.val_files", "null"], "the val split is empty: give `--data.val_files`"),
        (["--ckpt_path", "{dir}/missing.ckpt"], "`--ckpt_path {dir}/missing.ckpt`: no such file or directory"),
    ],
    ids=["directory-as-file", "no-val-split", "missing-ckpt"],
)
def test_newcomer_mistakes_are_one_line_naming_the_argument(tmp_path, criteo_sample, change, message):
    args = [*on_sample(tmp_path, criteo_sample), *(a.format(dir=tmp_path) for a in change)]
    # wandb offline: the CSV log directory is created before the data is checked
    result = run_cli("fit", *args, "--trainer.default_root_dir", str(tmp_path / "r"), *FAST, "--wandb", "offline")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"dqrm fit: error: {message.format(dir=tmp_path)}"), result.stderr[-3000:]
    assert not list((tmp_path / "r").glob("lightning_logs/version_*"))  # a failed run leaves no empty run directory


def test_best_checkpoint_of_a_root_without_runs_is_one_line(tmp_path, criteo_sample):
    args = [*on_sample(tmp_path, criteo_sample), "--trainer.default_root_dir", str(tmp_path / "r"), *FAST]
    result = run_cli("test", *args, "--ckpt_path", "best")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"dqrm test: error: no best.ckpt under {tmp_path / 'r'}/lightning_logs/*/checkpoints; pass --ckpt_path PATH"
    )


@pytest.mark.slow  # about 15 s of dqrm runs; tests/data covers prepared directories
def test_prepared_dir_on_the_command_line_works_with_any_base_config(tmp_path, criteo_sample):
    sample = str(tmp_path / "sample.tsv")
    Path(sample).write_bytes(Path(criteo_sample).read_bytes())
    prepared = tmp_path / "prepared"
    dqrm("data", "prepare", "--train-files", sample, "--val-files", sample, "--test-files", sample,
         "--out", str(prepared), "--no-progress")  # fmt: skip
    # configs/demo.yaml names its own raw files (data/demo/...): the prepared directory replaces them
    common = ["-c", "configs/demo.yaml", "--data.prepared_dir", str(prepared), *FAST]
    _, fit = dqrm("fit", *common, *ONE_EPOCH, "--trainer.default_root_dir", str(tmp_path / "r"))
    assert fit["data"]["rows"] == {"train": 200, "val": 200, "test": 200}
    assert fit["config"]["data"].get("train_files") is None


def test_a_misspelled_key_is_one_line_with_the_closest_key(tmp_path):
    config = tmp_path / "mine.yaml"
    config.write_text("data:\n  batch_sise: 64\n")
    result = run_cli("fit", "-c", "configs/demo.yaml", "-c", str(config), *FAST)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "dqrm fit: error: Subcommand 'fit' does not accept option 'data.batch_sise'; did you mean `data.batch_size`? "
        "(`dqrm fit --help` lists the options)"
    ]


def test_the_kaggle_config_on_a_small_file_sizes_tables_from_the_data_and_validates_each_epoch(tmp_path, criteo_sample):
    sample = on_sample(tmp_path, criteo_sample)[2:]  # the file arguments, without configs/demo.yaml
    result = run_cli(
        "fit", "-c", "configs/kaggle.yaml", *sample, "--data.num_workers", "0", *ONE_EPOCH,
        "--trainer.default_root_dir", str(tmp_path / "r"), *FAST,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(summary_path(result.stdout).read_text())
    assert max(summary["data"]["table_sizes"]) <= 200  # from the vocabulary, not Kaggle's 33.76M rows
    note = "an epoch has 2 training batches: `trainer.val_check_interval` 10240: validating at each epoch end; "
    assert note + "`trainer.log_every_n_steps` 1024: logging every 2 steps" in result.stderr
    assert "smaller than the logging interval" not in result.stderr  # Lightning's warning
    assert "train/loss" in summary_path(result.stdout).with_name("metrics.csv").read_text()
    assert "val/auc" in summary["val"]["final"]


def test_the_full_traceback_of_a_one_line_error_on_request(tmp_path, criteo_sample):
    args = [*on_sample(tmp_path, criteo_sample), "--data.val_files", "null", *FAST]
    result = run_cli("fit", *args, "--trainer.default_root_dir", str(tmp_path / "r"), env={"DQRM_TRACEBACK": "1"})
    assert result.returncode == 1
    assert "Traceback (most recent call last)" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("dqrm fit: error: the val split is empty")

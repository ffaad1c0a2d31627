"""`python -m dqrm_lightning.report`: one run's report, and the table comparing several runs (summary.json files)."""

import json
import os
from pathlib import Path

import pytest

from dqrm_lightning.report import latest_summaries, main

FP32_BYTES = 12_806_340
BAYES = {"val": {"auc": 0.8131, "log_loss": 0.4370}, "test": {"auc": 0.8130, "log_loss": 0.4374}}
DATA = {"rows": {"train": 160_000, "val": 20_000, "test": 20_000}}


def write_summary(root: Path, version: int, summary: dict, mtime: float, curve: list[float] | None = None) -> None:
    """``root/lightning_logs/version_N/summary.json`` (and its metrics.csv with one val AUC per epoch)."""
    log_dir = root / "lightning_logs" / f"version_{version}"
    log_dir.mkdir(parents=True)
    path = log_dir / "summary.json"
    path.write_text(json.dumps(summary))
    os.utime(path, (mtime, mtime))
    if curve is not None:
        rows = ["epoch,step,train/loss,val/auc,val/log_loss", "0,10,0.6,,"]
        rows += [f"{epoch},{100 * (epoch + 1)},,{auc},{0.5 + epoch / 100}" for epoch, auc in enumerate(curve)]
        (log_dir / "metrics.csv").write_text("\n".join(rows) + "\n")


def fake_run(
    root: Path, curve: list[float], test_auc: float, test_log_loss: float, sizes: dict, samples_per_s: float
) -> None:
    """A fit and a test of the best checkpoint, as `dqrm fit` and `dqrm test --ckpt_path best` write them."""
    fit = {
        "stage": "fit",
        "val": {
            "final": {"val/auc": curve[-1], "val/log_loss": 0.53, "val/accuracy": 0.74},
            "best": {"val/auc": max(curve), "val/log_loss": 0.51, "val/accuracy": 0.75},
        },
        "speed": {"samples_per_s": samples_per_s * 1.3, "mean_step_ms": 2.5, "loop_samples_per_s": samples_per_s},
        "model_bytes": sizes,
        "bayes_optimal": BAYES,
        "data": DATA,
        "config": {"seed_everything": 0},
    }
    write_summary(root, 0, fit, mtime=1_000, curve=curve)
    test = {
        "stage": "test",
        "test": {"test/auc": test_auc, "test/log_loss": test_log_loss, "test/accuracy": 0.75},
        "model_bytes": sizes,
        "bayes_optimal": BAYES,
        "data": DATA,
        "config": {"seed_everything": 0, "ckpt_path": "best"},
    }
    write_summary(root, 1, test, mtime=2_000)


@pytest.fixture
def demo_runs(tmp_path: Path) -> tuple[Path, Path]:
    """FP32 and INT4 QAT runs as `make demo` leaves them: the INT4 one exported and its artifact tested."""
    fp32, int4 = tmp_path / "demo" / "fp32", tmp_path / "demo" / "int4"
    fake_run(fp32, [0.6876, 0.7112, 0.7101, 0.6865], 0.7037, 0.5156, {"fp32": FP32_BYTES}, 39_574.4)
    quantized = {"fp32": FP32_BYTES, "quantized": 1_602_528, "ratio": 1_602_528 / FP32_BYTES}
    fake_run(int4, [0.6828, 0.7085, 0.7113, 0.6997], 0.7007, 0.5162, quantized, 36_495.2)
    artifact = int4 / "model.dqrm"
    artifact.mkdir()
    export = {"command": "export", "bytes": {"payload": 1_602_424, "fp32_model": FP32_BYTES, "ratio": 0.1251}}
    (artifact / "summary.json").write_text(json.dumps(export))
    artifact_test = {
        "stage": "test",
        "test": {"test/auc": 0.7007, "test/log_loss": 0.5162, "test/accuracy": 0.75},
        "model_bytes": {"fp32": FP32_BYTES},
        "bayes_optimal": BAYES,
        "data": DATA,
        "config": {"seed_everything": 0, "artifact": str(artifact)},
    }
    write_summary(int4, 2, artifact_test, mtime=3_000)  # newest: it must not replace the checkpoint's test
    return fp32, int4


def test_artifact_test_kept_beside_checkpoint_test(demo_runs):
    _, int4 = demo_runs
    summaries = latest_summaries(int4)
    assert sorted(summaries) == ["fit", "test", "test:artifact"]
    assert summaries["test"]["config"]["ckpt_path"] == "best"


def test_comparison_table(demo_runs, capsys):
    fp32, int4 = demo_runs
    main([str(fp32), str(int4)])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "fp32 val AUC by epoch: 0.6876 0.7112 0.7101 0.6865"
    assert lines[1] == "int4 val AUC by epoch: 0.6828 0.7085 0.7113 0.6997"
    header = lines.index(next(line for line in lines if line.startswith("| run |")))
    assert lines[header] == (
        "| run | best val AUC (epoch) | test AUC | test log loss | exported artifact test AUC | model bytes | "
        "size / FP32 | training samples/s |"
    )
    # FP32: no artifact; INT4: the exported artifact's bytes (not the analytic estimate), 1,602,424 / 12,806,340
    assert lines[header + 2] == "| fp32 | 0.7112 (1) | 0.7037 | 0.5156 | - | 12,806,340 | 1.000 | 39,574 |"
    assert lines[header + 3] == "| int4 | 0.7113 (2) | 0.7007 | 0.5162 | 0.7007 | 1,602,424 | 0.125 | 36,495 |"
    assert lines[header + 4].startswith("test AUC / log loss: each run's best-validation checkpoint")
    assert "test Bayes-optimal AUC 0.8130  log loss 0.4374 (true click model: no model can do better)" in lines
    assert lines[-1] == (
        "Caveat: a single training seed (0); AUC on this test split (20,000 rows) has sampling noise of about "
        "0.0041, so differences smaller than that do not rank the two models."
    )


def test_single_run_report_shows_artifact_test(demo_runs, capsys):
    _, int4 = demo_runs
    main([str(int4)])
    out = capsys.readouterr().out
    assert "test AUC 0.7007  log loss 0.5162  accuracy 0.7500" in out
    assert f"exported artifact {int4 / 'model.dqrm'}: test AUC 0.7007  log loss 0.5162" in out


def test_run_without_summaries_is_named(demo_runs, tmp_path):
    fp32, _ = demo_runs
    with pytest.raises(SystemExit, match=r"no summary\.json under .*missing"):
        main([str(fp32), str(tmp_path / "missing")])

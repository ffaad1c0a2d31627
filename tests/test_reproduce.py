"""`dqrm reproduce`: argument checks, the aggregation over seeds (on fabricated runs), the paper's protocol, and one
tiny end-to-end run."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from dqrm_lightning.reproduce import EXPERIMENTS, Experiment, SeedResult, main
from dqrm_lightning.reproduce_tables import aggregate, markdown, paper_protocol, plot, plot_differences, write
from dqrm_lightning.stats import weighted_auc
from tests.helpers.cli import REPO, run_cli, summary_path


def test_unknown_only_names_are_refused_before_any_work_listing_the_valid_ones(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(tmp_path / "out"), "--only", "fp32", "bogus"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("dqrm reproduce: error: unknown experiment for --only: bogus; choose from fp32, ")
    assert all(exp.name in error for exp in EXPERIMENTS)
    assert not (tmp_path / "out").exists()  # no data generated, no run started


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--seeds", "0"], "--seeds and --replicates must be >= 1, got 0 and 1000"),
        (["--seed", "1", "--seed-start", "2"], "argument --seed-start: not allowed with argument --seed"),
        (["--experiment", "lsq"], "--experiment takes NAME=CONFIG (a QAT config file), got 'lsq'"),
        (["--experiment", "x=configs/qat/nope.yaml"], "no such config file 'configs/qat/nope.yaml'"),
        (["--experiment", "fp32=configs/qat/int4.yaml"], "the name 'fp32' is taken; choose another"),
        (["--preset", "nope"], "--preset nope: no configs/nope.yaml; choose from demo, hard, kaggle, movielens"),
        (["--preset", "kaggle"], "--preset kaggle reads data you give: pass --data DIR"),
    ],
)
def test_bad_arguments_stop_before_any_work_with_one_line(tmp_path, capsys, monkeypatch, arguments, message):
    monkeypatch.chdir(REPO)  # presets and experiment configs are paths under the working directory
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(tmp_path / "out"), *arguments])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("dqrm reproduce: error: ")
    assert message in error
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("curve", "expected"),
    [
        ([{"epoch": 0, "test_auc": 0.70}, {"epoch": 1, "test_auc": 0.72}, {"epoch": 2, "test_auc": 0.71}], (0.72, 2)),
        ([{"epoch": 0, "test_auc": 0.72}, {"epoch": 0, "test_auc": 0.70}, {"epoch": 1, "test_auc": 0.72}], (0.72, 1)),
        ([{"epoch": 0, "test_auc": None}, {"epoch": 1, "test_auc": None}], None),
        ([], None),
    ],
)
def test_paper_protocol_is_the_best_test_auc_over_evaluations_and_its_first_epoch(curve, expected):
    assert paper_protocol(curve) == expected


def _write_predictions(path: Path, probs: np.ndarray, labels: np.ndarray) -> str:
    rows = np.stack([np.arange(len(probs)), probs, labels], axis=1)
    np.savetxt(path, rows, fmt=["%d", "%.8f", "%d"], delimiter="\t", header="row\tprobability\tlabel", comments="")
    return str(path)


def _fabricated_runs(tmp_path: Path) -> tuple[dict[str, list[SeedResult]], np.ndarray, dict[str, list[np.ndarray]]]:
    """FP32 (noisy) and INT4 (sharp) scores of the same 3,000 test rows, two seeds each, with validation curves."""
    rng = np.random.default_rng(0)
    n = 3000
    truth = rng.uniform(0.05, 0.6, n)
    labels = (rng.uniform(size=n) < truth).astype(int)
    probs: dict[str, list[np.ndarray]] = {"fp32": [], "int4": []}
    results: dict[str, list[SeedResult]] = {"fp32": [], "int4": []}
    for name, noise, size in (("fp32", 0.3, 1000), ("int4", 0.02, 125)):
        for seed in (1, 2):
            p = np.clip(truth + rng.normal(0, noise, n), 0.001, 0.999)
            probs[name].append(np.round(p, 8))
            path = _write_predictions(tmp_path / f"{name}_{seed}.tsv", p, labels)
            val = 0.70 + 0.01 * seed + (0.02 if name == "int4" else 0.0)
            curve = [
                {"epoch": 0, "step": 9, "val_auc": val - 0.01, "test_auc": 0.60 + 0.01 * seed},
                {"epoch": 1, "step": 19, "val_auc": val, "test_auc": 0.61 + 0.01 * seed},
            ]
            results[name].append(
                SeedResult(seed, {"val/auc": val}, {"val/auc": val}, {"auc": 0.0, "log_loss": 0.0}, path, size, curve)
            )
    for name, runs in results.items():  # the val-selected test figures, as `dqrm reproduce` scores them
        for run, p in zip(runs, probs[name], strict=True):
            run.test = {"auc": weighted_auc(labels, p), "log_loss": float(np.mean(-np.log(np.where(labels, p, 1 - p))))}
    return results, labels, probs


def test_aggregate_gives_mean_std_over_seeds_and_the_paired_interval_against_fp32(tmp_path):
    results, labels, probs = _fabricated_runs(tmp_path)
    rows = aggregate(results, replicates=200)
    fp32, int4 = rows["fp32"], rows["int4"]
    assert fp32["seeds"] == [1, 2]
    assert fp32["val_auc"]["mean"] == pytest.approx(0.715)
    assert fp32["val_auc"]["std"] == pytest.approx(np.std([0.71, 0.72], ddof=1))
    aucs = [weighted_auc(labels, p) for p in probs["int4"]]
    assert int4["test_auc"]["mean"] == pytest.approx(np.mean(aucs))
    assert int4["test_auc"]["std"] == pytest.approx(np.std(aucs, ddof=1))
    assert int4["paper_test_auc"]["mean"] == pytest.approx(0.625)  # best of each seed's test curve: 0.62, 0.63
    assert int4["paper_epochs"] == [2, 2]
    assert fp32["difference"] is None
    auc = int4["difference"]["auc"]
    mean_difference = np.mean(
        [weighted_auc(labels, c) - weighted_auc(labels, b) for b, c in zip(*probs.values(), strict=True)]
    )
    assert auc["difference"] == pytest.approx(mean_difference, abs=1e-6)
    assert 0 < auc["low"] < auc["difference"] < auc["high"]  # the sharp model is better, and the CI says so
    assert int4["difference"]["log_loss"]["high"] < 0


def test_markdown_states_protocols_and_one_row_per_model_with_the_intervals(tmp_path):
    results, _, _ = _fabricated_runs(tmp_path)
    rows = aggregate(results, replicates=100)
    experiments = [EXPERIMENTS[0], Experiment("int4", "my INT4", ("extra",))]
    text = markdown(rows, experiments, "dqrm reproduce --seeds 2", replicates=100)
    assert "Command: `dqrm reproduce --seeds 2`" in text
    assert "*val-selected*" in text
    assert "*paper*" in text
    assert "(100 resamples: test-row noise and seed-to-seed spread)" in text
    assert "### Further experiments (`--experiment`)" in text
    assert "### Table 2" not in text  # FP32 alone is no table when other models ran
    int4 = next(line for line in text.splitlines() if line.startswith("| my INT4 |"))
    cells = [cell.strip() for cell in int4.strip("|").split("|")]
    d = rows["int4"]["difference"]["auc"]
    assert cells[:2] == ["my INT4", "2"]
    assert cells[4] == f"{d['difference']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}]"
    assert cells[7] == f"{0.625:.4f} ± {np.std([0.62, 0.63], ddof=1):.4f} (epoch 2, 2)"
    assert cells[8] == "0.125"
    fp32 = next(line for line in text.splitlines() if line.startswith("| FP32 |"))
    assert fp32.split("|")[5].strip() == "-"
    plot(results, experiments, tmp_path / "val_auc.png")
    assert plot_differences(rows, experiments, tmp_path / "delta_auc.png")
    assert (tmp_path / "val_auc.png").stat().st_size > 0
    assert (tmp_path / "delta_auc.png").stat().st_size > 0


def test_tables_only_rewrites_a_finished_run_from_its_summary_and_predictions(tmp_path, capsys):
    results, _, _ = _fabricated_runs(tmp_path)
    experiments = [EXPERIMENTS[0], Experiment("int4", "my INT4", ("extra",))]
    bayes = {"val": {"auc": 0.8, "log_loss": 0.4}, "test": {"auc": 0.81, "log_loss": 0.41}}
    out = tmp_path / "out"
    out.mkdir()
    write(results, experiments, out, "dqrm reproduce --seeds 2", replicates=100, seconds=60.0, bayes=bayes)
    first = json.loads((out / "summary.json").read_text())
    (out / "results.md").unlink()
    assert main(["--out", str(out), "--tables-only", "--replicates", "100"]) == str(out / "summary.json")
    again = json.loads((out / "summary.json").read_text())
    assert again == first  # the same per-seed values, aggregates and intervals (the resampling is seeded)
    text = (out / "results.md").read_text()
    assert "| my INT4 | 2 |" in text
    assert "Bayes-optimal (true click model) AUC: val 0.8000, test 0.8100" in text
    main(["--out", str(out), "--tables-only", "--replicates", "50"])
    assert "(50 resamples" in (out / "results.md").read_text()
    with pytest.raises(SystemExit):
        main(["--out", str(tmp_path / "nothing"), "--tables-only"])
    assert "--tables-only: no" in capsys.readouterr().err


@pytest.mark.slow
def test_reproduce_two_seeds_end_to_end(tmp_path, criteo_sample):
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "val", "test"):
        shutil.copy(criteo_sample, data / f"{split}.tsv")
    out = tmp_path / "out"
    result = run_cli(
        "reproduce", "--out", str(out), "--data", str(data), "--seeds", "2", "--seed-start", "3", "--only", "fp32",
        "--experiment", f"e4={REPO / 'configs/qat/emb_int4.yaml'}", "--replicates", "50",
        "--", "--trainer.max_epochs", "1", "--data.batch_size", "64", "--trainer.enable_model_summary", "false",
        timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(summary_path(result.stdout).read_text())
    assert list(summary["results"]) == ["fp32", "ptq_int4", "ptq_int4_init", "e4"]
    e4 = summary["results"]["e4"]
    assert e4["seeds"] == [3, 4]
    assert e4["difference"]["auc"]["low"] <= e4["difference"]["auc"]["high"]
    for run in e4["per_seed"]:  # one evaluation: the paper's figure is the val-selected model's test AUC
        assert run["curve"][0]["test_auc"] == pytest.approx(run["test"]["auc"], abs=1e-6)
    assert summary["results"]["ptq_int4"]["paper_test_auc"] is None
    text = (out / "results.md").read_text()
    assert "| e4 | 2 |" in text
    assert (out / "val_auc.png").exists()
    assert (out / "delta_auc.png").exists()
    assert len(list((out / "runs" / "fp32").glob("seed_*"))) == 2

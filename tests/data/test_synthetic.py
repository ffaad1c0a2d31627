"""Tests of the synthetic Criteo-format generator and its ground-truth click model."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pytest
import yaml

from dqrm_lightning.data.synthetic import (
    DEMO_CARDINALITIES,
    HARD_CARDINALITIES,
    KAGGLE_CARDINALITIES,
    PRESETS,
    TERABYTE_CARDINALITIES,
    GroundTruth,
    SyntheticPreset,
    synthesize,
)
from dqrm_lightning.data.synthetic import truth as truth_model
from dqrm_lightning.data.synthetic.zipf import ZipfSampler

ROWS = 50_000
SEED = 7
COLUMNS = ["label", *(f"I{j}" for j in range(1, 14)), *(f"C{f}" for f in range(1, 27))]


def read_raw(path: Path) -> pa.Table:
    """Every field of a raw file as a string (empty -> null); fails unless each line has exactly 40 fields."""
    return pa_csv.read_csv(
        path,
        read_options=pa_csv.ReadOptions(column_names=COLUMNS),
        parse_options=pa_csv.ParseOptions(delimiter="\t", quote_char=False, double_quote=False, escape_char=False),
        convert_options=pa_csv.ConvertOptions(
            column_types=dict.fromkeys(COLUMNS, pa.string()), null_values=[""], strings_can_be_null=True
        ),
    )


def exact_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Mann-Whitney AUC with average ranks for ties."""
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    ranks = (ends - (counts - 1) / 2.0)[inverse]
    positives = labels.astype(bool)
    n_pos, n_neg = positives.sum(), (~positives).sum()
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def log_loss(prob: np.ndarray, labels: np.ndarray) -> float:
    p = np.clip(prob.astype(np.float64), 1e-12, 1 - 1e-12)
    return float(-np.mean(labels * np.log(p) + (1 - labels) * np.log1p(-p)))


def parse_rows(table: pa.Table) -> dict[str, np.ndarray]:
    """Labels, dense values/missing masks and hex values/missing masks of a raw table."""
    dense_cols = [table.column(f"I{j}") for j in range(1, 14)]
    cat_cols = [table.column(f"C{f}") for f in range(1, 27)]
    dense_missing = np.stack([c.is_null().to_numpy() for c in dense_cols], axis=1)
    dense = np.stack([pc.cast(c, pa.int64()).fill_null(0).to_numpy() for c in dense_cols], axis=1)
    cat_missing = np.stack([c.is_null().to_numpy() for c in cat_cols], axis=1)
    cat = np.stack(
        [np.array([int(v, 16) if v else 0 for v in c.fill_null("").to_pylist()], dtype=np.uint32) for c in cat_cols],
        axis=1,
    )
    labels = pc.cast(table.column("label"), pa.int64()).to_numpy()
    return {"labels": labels, "dense": dense, "dense_missing": dense_missing, "cat": cat, "cat_missing": cat_missing}


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo")
    return out, synthesize("demo", ROWS, SEED, out)


@pytest.fixture(scope="module")
def demo_val(demo: tuple[Path, dict]) -> tuple[pa.Table, dict[str, np.ndarray]]:
    out, _ = demo
    table = read_raw(out / "val.tsv")
    return table, parse_rows(table)


# ------------------------------------------------------------------------------------------------------- format
def test_files_and_layout(demo: tuple[Path, dict]) -> None:
    out, summary = demo
    names = sorted(p.name for p in out.iterdir())
    expected = ["test.tsv", "test.tsv.truth.npy", "train.tsv", "train.tsv.truth.npy", "truth.json"]
    assert names == sorted([*expected, "val.tsv", "val.tsv.truth.npy"])
    assert json.loads((out / "truth.json").read_text()) == summary
    assert summary["rows_per_split"] == {"train": 40_000, "val": 5_000, "test": 5_000}
    assert summary["preset"] == "demo"
    assert summary["seed"] == SEED


def test_raw_bytes(demo: tuple[Path, dict]) -> None:
    out, summary = demo
    for split in ("train", "val", "test"):
        data = (out / f"{split}.tsv").read_bytes()
        assert data.endswith(b"\n")
        assert b'"' not in data
        assert b"\r" not in data
        assert b" " not in data
        lines = data.split(b"\n")[:-1]
        assert len(lines) == summary["splits"][split]["rows"]
        assert {line.count(b"\t") for line in lines} == {39}


def test_field_syntax(demo_val: tuple[pa.Table, dict[str, np.ndarray]]) -> None:
    table, rows = demo_val
    assert table.num_columns == 40
    assert set(np.unique(rows["labels"])) <= {0, 1}
    assert table.column("label").null_count == 0
    for j in range(1, 14):
        column = table.column(f"I{j}").drop_null()
        assert pc.all(pc.match_substring_regex(column, r"^-?[0-9]+$")).as_py() in (True, None)
    for f in range(1, 27):
        column = table.column(f"C{f}").drop_null()
        assert pc.all(pc.match_substring_regex(column, r"^[0-9a-f]{8}$")).as_py() in (True, None)


def test_missing_rates_and_negatives(demo_val: tuple[pa.Table, dict[str, np.ndarray]]) -> None:
    _, rows = demo_val
    preset = PRESETS["demo"]
    np.testing.assert_allclose(rows["cat_missing"].mean(axis=0), preset.cat_missing_rates, atol=0.03)
    np.testing.assert_allclose(rows["dense_missing"].mean(axis=0), preset.dense_missing_rates, atol=0.03)
    assert not rows["dense_missing"][:, 1].any()  # I2 is never missing, as in Criteo
    negative = rows["dense"] < 0
    assert negative[:, 1].mean() == pytest.approx(preset.negative_rate, abs=0.01)
    assert negative[:, 1].any()
    assert not np.delete(negative, 1, axis=1).any()
    assert set(np.unique(rows["dense"][negative])) <= {-1, -2, -3}


def test_written_values_decode_to_ranks(demo_val: tuple[pa.Table, dict[str, np.ndarray]]) -> None:
    _, rows = demo_val
    truth = GroundTruth("demo", SEED)
    for f, cardinality in enumerate(PRESETS["demo"].cardinalities):
        present = ~rows["cat_missing"][:, f]
        ranks = truth.decode(f, rows["cat"][present, f])
        assert ranks.min() >= 0
        assert ranks.max() < cardinality
        assert np.bincount(ranks).argmax() == 0  # rank 0 is the most popular id
        np.testing.assert_array_equal(truth.encode(f, ranks), rows["cat"][present, f])


def test_truth_matches_file_content(demo: tuple[Path, dict], demo_val: tuple[pa.Table, dict[str, np.ndarray]]) -> None:
    """The true probability of a row is a function of its written fields only."""
    out, _ = demo
    _, rows = demo_val
    truth = GroundTruth("demo", SEED)
    ranks = np.stack([truth.decode(f, rows["cat"][:, f]) for f in range(26)], axis=1)
    ranks[rows["cat_missing"]] = -1
    prob = truth.probability(ranks, rows["dense"], rows["dense_missing"])
    stored = np.load(out / "val.tsv.truth.npy")
    np.testing.assert_allclose(stored, prob, rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------------------- truth
def test_truth_files_and_bayes_metrics(demo: tuple[Path, dict]) -> None:
    out, summary = demo
    all_labels, all_prob = [], []
    for split in ("train", "val", "test"):
        prob = np.load(out / f"{split}.tsv.truth.npy")
        labels = pc.cast(read_raw(out / f"{split}.tsv").column("label"), pa.int64()).to_numpy()
        assert prob.dtype == np.float32
        assert len(prob) == len(labels) == summary["rows_per_split"][split]
        stats = summary["splits"][split]
        assert stats["positive_rate"] == pytest.approx(labels.mean(), abs=1e-12)
        assert stats["bayes_auc"] == pytest.approx(exact_auc(prob, labels), abs=2e-4)
        assert stats["bayes_log_loss"] == pytest.approx(log_loss(prob, labels), abs=1e-5)
        assert stats["mean_prob"] == pytest.approx(prob.mean(), abs=1e-6)
        all_labels.append(labels)
        all_prob.append(prob)
    labels, prob = np.concatenate(all_labels), np.concatenate(all_prob)
    assert labels.mean() == pytest.approx(0.256, abs=0.02)
    assert prob.mean() == pytest.approx(0.256, abs=0.01)
    assert 0.78 <= summary["splits"]["train"]["bayes_auc"] <= 0.84


# ------------------------------------------------------------------------------------------------- determinism
def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def test_same_seed_same_bytes_different_seed_different(tmp_path: Path) -> None:
    first = synthesize("demo", 20_000, 3, tmp_path / "a", workers=1)
    second = synthesize("demo", 20_000, 3, tmp_path / "b", workers=2)
    synthesize("demo", 20_000, 4, tmp_path / "c")
    assert first == second
    files_a, files_b, files_c = _files(tmp_path / "a"), _files(tmp_path / "b"), _files(tmp_path / "c")
    assert files_a == files_b
    assert files_a.keys() == files_c.keys()
    assert all(files_a[name] != files_c[name] for name in files_a)


def test_rows_per_file_and_prefix_stability(tmp_path: Path) -> None:
    split = synthesize("demo", 30_000, 5, tmp_path / "split", rows_per_file=10_000, split_fractions=(0.8, 0.15, 0.05))
    whole = synthesize("demo", 30_000, 5, tmp_path / "whole", split_fractions=(0.8, 0.15, 0.05))
    assert split["splits"]["train"]["files"] == ["train-00000.tsv", "train-00001.tsv", "train-00002.tsv"]
    assert split["splits"]["val"]["files"] == ["val.tsv"]
    assert split["splits"]["test"]["files"] == ["test.tsv"]
    assert split["rows_per_split"] == {"train": 24_000, "val": 4_500, "test": 1_500}
    parts = [(tmp_path / "split" / name).read_bytes() for name in split["splits"]["train"]["files"]]
    assert [p.count(b"\n") for p in parts] == [10_000, 10_000, 4_000]
    assert b"".join(parts) == (tmp_path / "whole" / "train.tsv").read_bytes()
    truths = [np.load(tmp_path / "split" / f"{name}.truth.npy") for name in split["splits"]["train"]["files"]]
    np.testing.assert_array_equal(np.concatenate(truths), np.load(tmp_path / "whole" / "train.tsv.truth.npy"))
    for key in ("bayes_auc", "bayes_log_loss", "positive_rate"):
        assert split["splits"]["train"][key] == pytest.approx(whole["splits"]["train"][key], rel=1e-12)
    # A larger dataset with the same seed extends the same row stream.
    longer = synthesize("demo", 40_000, 5, tmp_path / "longer", split_fractions=(1.0, 0.0, 0.0))
    assert longer["rows_per_split"] == {"train": 40_000, "val": 0, "test": 0}
    head = (tmp_path / "longer" / "train.tsv").read_bytes().split(b"\n")[:24_000]
    assert b"\n".join(head) + b"\n" == (tmp_path / "whole" / "train.tsv").read_bytes()
    assert (tmp_path / "longer" / "val.tsv").read_bytes() == b""
    assert len(np.load(tmp_path / "longer" / "val.tsv.truth.npy")) == 0
    assert longer["splits"]["val"]["bayes_auc"] is None
    assert not list((tmp_path / "split").glob("*.partial"))


def test_rerun_with_other_layout_removes_stale_files(tmp_path: Path) -> None:
    synthesize("demo", 3_000, 1, tmp_path, rows_per_file=1_000)
    assert (tmp_path / "train-00001.tsv").exists()
    synthesize("demo", 3_000, 1, tmp_path)
    assert sorted(p.name for p in tmp_path.glob("train*")) == ["train.tsv", "train.tsv.truth.npy"]


@pytest.mark.parametrize(
    ("preset", "cardinalities"), [("kaggle", KAGGLE_CARDINALITIES), ("terabyte", TERABYTE_CARDINALITIES)]
)
def test_full_size_preset_small_run(tmp_path: Path, preset: str, cardinalities: tuple[int, ...]) -> None:
    summary = synthesize(preset, 5_000, 0, tmp_path, split_fractions=(0.6, 0.2, 0.2))
    table = read_raw(tmp_path / "train.tsv")
    rows = parse_rows(table)
    truth = GroundTruth(preset, 0)
    for f, cardinality in enumerate(cardinalities):
        present = ~rows["cat_missing"][:, f]
        assert truth.decode(f, rows["cat"][present, f]).max() < cardinality
    assert summary["rows_per_split"] == {"train": 3_000, "val": 1_000, "test": 1_000}
    assert 0.2 < summary["splits"]["train"]["positive_rate"] < 0.32


# ------------------------------------------------------------------------------------------------ ground truth
def test_presets() -> None:
    assert {"demo", "hard", "kaggle"} <= PRESETS.keys()
    assert sum(KAGGLE_CARDINALITIES) == 33_762_577
    assert len(KAGGLE_CARDINALITIES) == 26
    assert PRESETS["kaggle"].cardinalities == KAGGLE_CARDINALITIES
    assert sum(TERABYTE_CARDINALITIES) == 49_126_297  # DLRM's Terabyte model, --max-ind-range 10M
    assert max(TERABYTE_CARDINALITIES) < 10_000_000
    assert PRESETS["terabyte"].cardinalities == TERABYTE_CARDINALITIES
    config = yaml.safe_load(Path("configs/data/synthetic_terabyte.yaml").read_text())
    assert tuple(config["data"]["num_embeddings_per_feature"]) == TERABYTE_CARDINALITIES
    demo = PRESETS["demo"]
    assert min(demo.cardinalities) >= 3
    assert max(demo.cardinalities) <= 50_000
    assert 250_000 <= sum(demo.cardinalities) <= 350_000
    assert json.dumps(dataclasses.asdict(demo))


def _unseen_and_rare_shares(preset: SyntheticPreset, train_rows: int, val_rows: int) -> tuple[float, float]:
    """Shares of validation id occurrences never seen, and seen fewer than 5 times, in ``train_rows`` rows."""
    rng = np.random.default_rng(0)
    unseen, rare = [], []
    for n_ids in preset.cardinalities:
        sampler = ZipfSampler(n_ids, preset.zipf_exponent)
        counts = np.bincount(sampler.sample(rng.random(train_rows)), minlength=n_ids)
        val_counts = counts[sampler.sample(rng.random(val_rows))]
        unseen.append((val_counts == 0).mean())
        rare.append((val_counts < 5).mean())
    return float(np.mean(unseen)), float(np.mean(rare))


def test_hard_preset_has_larger_tables_and_more_rare_ids_than_demo() -> None:
    demo, hard = PRESETS["demo"], PRESETS["hard"]
    assert hard.cardinalities == HARD_CARDINALITIES
    assert sum(HARD_CARDINALITIES) == 1_480_082
    assert all(h >= d for h, d in zip(HARD_CARDINALITIES, DEMO_CARDINALITIES, strict=True))
    assert hard.zipf_exponent < demo.zipf_exponent
    assert hard.tail_effect_boost > demo.tail_effect_boost
    # with the default 160k training rows: the hard preset's validation ids are unseen ~4x as often as the demo's
    demo_unseen, demo_rare = _unseen_and_rare_shares(demo, 160_000, 20_000)
    hard_unseen, hard_rare = _unseen_and_rare_shares(hard, 160_000, 20_000)
    assert demo_unseen < 0.03 < 0.06 < hard_unseen < 0.10
    assert demo_rare < 0.1 < 0.15 < hard_rare < 0.25


def test_sample_rows_shapes_and_ranges() -> None:
    truth = GroundTruth("demo", 11)
    rows = truth.sample_rows(4_000, np.random.default_rng(0))
    assert len(rows) == 4_000
    assert rows.labels.dtype == np.uint8
    assert rows.labels.shape == (4_000,)
    assert rows.dense.shape == (4_000, 13)
    assert rows.dense.dtype == np.int64
    assert rows.cat.shape == (4_000, 26)
    assert rows.cat.dtype == np.uint32
    assert rows.ids.shape == (4_000, 26)
    limits = np.asarray(PRESETS["demo"].cardinalities)
    assert ((rows.ids == -1) == rows.cat_missing).all()
    assert ((rows.ids < limits) & (rows.ids >= -1)).all()
    np.testing.assert_allclose(rows.prob, 1 / (1 + np.exp(-rows.logit)), rtol=1e-12)
    np.testing.assert_allclose(truth.logit(rows.ids, rows.dense, rows.dense_missing), rows.logit, rtol=1e-12)
    part = rows.slice(10, 20)
    assert len(part) == 10
    assert (part.cat == rows.cat[10:20]).all()


def test_calibrated_mean_probability() -> None:
    truth = GroundTruth("kaggle", 2)
    rows = truth.sample_rows(50_000, np.random.default_rng(1))
    assert rows.prob.mean() == pytest.approx(0.256, abs=0.01)
    assert rows.labels.mean() == pytest.approx(0.256, abs=0.02)


def test_scramble_is_a_bijection() -> None:
    truth = GroundTruth("demo", 0)
    values = np.random.default_rng(0).integers(0, 2**32, 10_000, dtype=np.uint64).astype(np.uint32)
    for f in (0, 9, 25):
        np.testing.assert_array_equal(truth.encode(f, truth.decode(f, values)), values)
    ranks = np.arange(50_000)
    assert len(np.unique(truth.encode(2, ranks))) == len(ranks)


def test_zipf_sampler_follows_its_law() -> None:
    for n_ids, exponent in [(3, 1.05), (5_000, 1.1), (10_131_227, 1.1), (200_000, 0.8)]:
        sampler = ZipfSampler(n_ids, exponent)
        ranks = sampler.sample(np.random.default_rng(0).random(400_000))
        assert ranks.min() >= 0
        assert ranks.max() < n_ids
        assert sampler.pmf(np.arange(min(n_ids, 2_000))).sum() <= 1.0 + 1e-12
        top = np.arange(min(n_ids, 20))
        observed = np.bincount(ranks, minlength=len(top))[: len(top)] / len(ranks)
        expected = sampler.pmf(top)
        assert (np.abs(observed - expected) <= 5 * np.sqrt(expected / len(ranks)) + 1e-4).all()
        np.testing.assert_allclose(expected / expected[0], (top + 1.0) ** -exponent, rtol=1e-12)
    small = ZipfSampler(5_000, 1.1)
    assert small.pmf(np.arange(5_000)).sum() == pytest.approx(1.0, abs=1e-12)
    big = ZipfSampler(10_131_227, 1.1)
    ratio = big.pmf(np.array([2_000_000]))[0] / big.pmf(np.array([1_000_000]))[0]
    assert ratio == pytest.approx((2_000_001 / 1_000_001) ** -1.1, rel=1e-6)


def test_effects_do_not_depend_on_caching() -> None:
    vectors = truth_model._HashedVectors([123, 456], 1_000_000, 0.3, 1.0)
    ids = np.array([0, 5, 262_143, 262_144, 999_999, truth_model._MISSING_ID])
    np.testing.assert_array_equal(vectors(ids), vectors._compute(ids))


# --------------------------------------------------------------------------------------------------- arguments
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"preset": "nope"}, "known presets: demo, hard, kaggle"),
        ({"rows": 0}, "rows must be a positive integer"),
        ({"rows": -5}, "rows must be a positive integer"),
        ({"split_fractions": (0.5, 0.2, 0.2)}, "must sum to 1"),
        ({"split_fractions": (0.5, 0.5)}, "needs 3 fractions"),
        ({"rows_per_file": 0}, "rows_per_file must be a positive integer"),
        ({"seed": -1}, "seed must be an integer"),
    ],
)
def test_bad_arguments(tmp_path: Path, kwargs: dict, message: str) -> None:
    arguments = {"preset": "demo", "rows": 100, "seed": 0, "out_dir": tmp_path} | kwargs
    with pytest.raises(ValueError, match=re.escape(message)):
        synthesize(**arguments)
    assert not list(tmp_path.iterdir())


def test_bad_preset_fields() -> None:
    base = PRESETS["demo"]
    with pytest.raises(ValueError, match="cardinalities needs 26 entries"):
        dataclasses.replace(base, cardinalities=(10,) * 25)
    with pytest.raises(ValueError, match="missing and negative rates"):
        dataclasses.replace(base, cat_missing_rates=(1.0,) * 26)
    with pytest.raises(ValueError, match="bad interaction pair"):
        dataclasses.replace(base, interaction_pairs=((0, 26),))
    custom = dataclasses.replace(base, name="custom", cardinalities=[7] * 26)
    assert isinstance(custom, SyntheticPreset)
    assert custom.cardinalities == (7,) * 26
    assert GroundTruth(custom, 0).sample_rows(100, np.random.default_rng(0)).ids.max() < 7

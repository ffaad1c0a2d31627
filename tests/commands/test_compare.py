"""`dqrm compare` on prediction files: per-model mean and std over seeds, paired intervals, one-line errors."""

import json

import numpy as np
import pytest

from dqrm_lightning.cli import main


def _write(path, rows, probs, labels):
    with open(path, "w") as handle:
        handle.write("row\tprobability\tlabel\n")
        for row, prob, label in zip(rows, probs, labels, strict=True):
            handle.write(f"{row}\t{prob:.8f}\t{label}\n")
    return str(path)


def test_compare_runs_over_seeds_with_rank_files_merged(tmp_path, capsys):
    rng = np.random.default_rng(0)
    n = 2000
    truth = rng.uniform(0.05, 0.6, n)
    labels = (rng.uniform(size=n) < truth).astype(int)
    base, cand = [], []
    for seed in range(2):
        weak = np.clip(truth + rng.normal(0, 0.3, n), 0.001, 0.999)
        base.append(_write(tmp_path / f"fp32_{seed}.tsv", range(n), weak, labels))
        sharp = np.clip(truth + rng.normal(0, 0.02, n), 0.001, 0.999)
        prefix = tmp_path / f"int4_{seed}.tsv"  # two ranks' files, rows interleaved as rank slices are
        _write(f"{prefix}.rank0", range(0, n, 2), sharp[0::2], labels[0::2])
        _write(f"{prefix}.rank1", range(1, n, 2), sharp[1::2], labels[1::2])
        cand.append(str(prefix))
    main(["compare", "--baseline", *base, "--candidate", *cand, "--out", str(tmp_path / "c"), "--replicates", "100"])
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1] == f"summary: {tmp_path / 'c' / 'summary.json'}"
    assert "| baseline | 2 |" in out
    assert "candidate - baseline AUC: +" in out
    summary = json.loads((tmp_path / "c" / "summary.json").read_text())
    assert summary["rows"] == n
    assert summary["models"]["candidate"]["seeds"] == 2
    assert summary["difference"]["auc"]["low"] > 0
    assert summary["models"]["candidate"]["auc"]["mean"] > summary["models"]["baseline"]["auc"]["mean"]


def test_predictions_of_other_rows_are_refused_in_one_line(tmp_path):
    a = _write(tmp_path / "a.tsv", range(10), np.full(10, 0.5), [0, 1] * 5)
    b = _write(tmp_path / "b.tsv", range(1, 11), np.full(10, 0.5), [0, 1] * 5)
    with pytest.raises(SystemExit, match=f"dqrm compare: error: {b}: not the same test rows and labels as {a}"):
        main(["compare", "--baseline", a, "--candidate", b, "--out", str(tmp_path / "c")])
    unlabeled = tmp_path / "u.tsv"
    unlabeled.write_text("row\tprobability\n0\t0.5\n")
    with pytest.raises(SystemExit, match="expected the columns row, probability, label"):
        main(["compare", "--baseline", a, "--candidate", str(unlabeled), "--out", str(tmp_path / "c")])

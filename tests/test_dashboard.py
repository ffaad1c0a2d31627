"""The wandb dashboard spec plots only metrics that runs really log (checked against the runs' CSV logs)."""

import csv

import pytest

from dqrm_lightning.dashboard import load_spec, metric_keys
from dqrm_lightning.schema import FeatureSchema
from tests.helpers.cli import FAST, dqrm, on_sample, summary_path


def _logged(output: str) -> set[str]:
    log_dir = summary_path(output).parent
    with open(log_dir / "metrics.csv") as f:
        return set(next(csv.reader(f)))


@pytest.mark.slow  # about 17 s: a QAT training run with wandb offline
def test_every_plotted_metric_is_logged_by_a_qat_run(tmp_path, criteo_sample):
    spec = load_spec()
    assert "qat/scale/C26" in metric_keys(spec, {"qat"})  # {table} expanded
    args = [*on_sample(tmp_path, criteo_sample), "--trainer.default_root_dir", str(tmp_path / "runs"), *FAST]
    out, fit = dqrm("fit", *args, "--trainer.log_every_n_steps", "1", "--qat.embedding_bits", "4")
    out_test, _ = dqrm("test", *args, "--ckpt_path", fit["checkpoints"]["last"])
    missing = sorted(metric_keys(spec, {"qat", "test"}) - _logged(out) - _logged(out_test))
    assert not missing, f"the dashboard plots metrics no run logs: {missing}"


def test_a_malformed_spec_is_refused_naming_the_entry(tmp_path):
    bad = tmp_path / "spec.yaml"
    bad.write_text("sections:\n  - name: A\n    panels:\n      - {title: t}\n")
    with pytest.raises(ValueError, match=r"sections\[0\]\.panels\[0\]"):
        load_spec(bad)


def test_table_panels_follow_the_schema_one_line_per_table():
    schema = FeatureSchema.from_dict(
        {"dense": [], "sparse": [{"name": "movie", "table": "movies"}, "user", {"name": "history", "table": "movies"}]}
    )
    keys = metric_keys(load_spec(schema=schema), {"qat"})
    assert {k for k in keys if k.startswith("qat/scale/")} == {"qat/scale/movie", "qat/scale/user"}
    assert "qat/scale/C26" in metric_keys(load_spec(), {"qat"})  # Criteo by default

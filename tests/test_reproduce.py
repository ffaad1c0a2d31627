"""`dqrm reproduce` argument checks."""

import pytest

from dqrm_lightning.reproduce import EXPERIMENTS, main


def test_unknown_only_names_are_refused_before_any_work_listing_the_valid_ones(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(tmp_path / "out"), "--only", "fp32", "bogus"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("dqrm reproduce: error: unknown experiment for --only: bogus; choose from fp32, ")
    assert all(exp.name in error for exp in EXPERIMENTS)
    assert not (tmp_path / "out").exists()  # no data generated, no run started

"""Saving and loading a checkpoint hold no second copy of the tables in memory (peaks measured in a fresh process)."""

import json
import sys
from pathlib import Path

import pytest

from tests.helpers.process import run

ROWS = 300_000  # 26 tables x 300,000 rows x 16 float32 = 499 MB


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak memory is read from Linux's /proc")
def test_saving_and_loading_a_checkpoint_hold_no_second_copy_of_the_tables(tmp_path):
    root = Path(__file__).resolve().parents[1]
    command = [sys.executable, "-W", "ignore", "-m", "tests.helpers.checkpoint_memory", str(tmp_path / "a.ckpt")]
    result = run([*command, str(ROWS)], timeout=300, cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    assert measured["restored"], "the load did not bring back the saved tables"
    # a copy of the tables (torch.save into memory, torch.load without mapping) raises the peak by 100%
    for step in ("save", "load"):
        assert measured[step] < 0.2 * measured["tables"], (step, measured)

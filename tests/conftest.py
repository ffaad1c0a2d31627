import os
from pathlib import Path

import pytest
import torch.distributed as dist

os.environ.setdefault("WANDB_MODE", "disabled")

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture
def criteo_sample() -> Path:
    """200 real Criteo rows (raw format)."""
    return FIXTURES / "criteo_sample.tsv"


@pytest.fixture(autouse=True)
def _teardown_process_group():
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.fixture(autouse=True)
def _restore_environment():
    """A test that runs `dqrm` in this process (`main([...])`) leaves no environment variable behind: `dqrm` notes
    at start whether OMP_NUM_THREADS is the user's, and a later test's child process would inherit that note."""
    before = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(before)

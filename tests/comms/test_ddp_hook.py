"""The compression hook's state: per-rank error-feedback residuals in checkpoints."""

import pytest
import torch

from dqrm_lightning.comms.compression import GradientCompressionConfig
from dqrm_lightning.comms.ddp_hook import CompressionState


def test_residuals_restart_from_zero_on_another_world_size():
    state = CompressionState(GradientCompressionConfig(), [])
    saved = {"world_size": 4, "residuals": {"w": torch.ones(4, 3)}}
    with pytest.warns(UserWarning, match="4 processes"):
        state.load_state_dict(saved)
    assert state.residuals == {}
    state.load_state_dict({"world_size": 1, "residuals": {"w": torch.arange(3.0).unsqueeze(0)}})
    torch.testing.assert_close(state.residuals["w"], torch.arange(3.0))

"""TorchRec's quantized all-to-all codecs: probed on the device, unsupported ones refused (never replaced)."""

import pytest
import torch

from dqrm_lightning.comms.qcomms import qcomm_registry


def test_qcomm_codecs_are_probed_and_unsupported_ones_refused():
    cpu = torch.device("cpu")
    assert qcomm_registry(None, None, cpu) is None
    assert qcomm_registry("fp16", "fp16", cpu) is not None
    with pytest.raises(ValueError, match="qcomm_backward: bf16"):  # TorchRec would send FP16 on gloo instead
        qcomm_registry("fp16", "bf16", cpu)
    for precision in ("fp8", "int8"):  # not usable on the CPU with this FBGEMM build: refused, never replaced
        with pytest.raises(ValueError, match="not supported on cpu"):
            qcomm_registry(precision, None, cpu)
    with pytest.raises(ValueError, match="qcomm_backward"):
        qcomm_registry(None, "int4", cpu)

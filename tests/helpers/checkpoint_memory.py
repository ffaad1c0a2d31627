"""The peak memory of saving and loading a checkpoint, measured in a fresh process.

``python -m tests.helpers.checkpoint_memory CKPT ROWS`` builds a DLRM with 26 tables of ``ROWS`` rows (dimension 16),
saves its checkpoint to ``CKPT`` and loads it back as a ``dqrm fit`` does, and prints one JSON line: ``tables`` (bytes
of the tables), ``save`` and ``load`` (how far each raised the peak resident memory above the resident memory before
it, in bytes: Linux's ``VmHWM``, reset just before each) and ``restored`` (whether the load brought back a table
that was zeroed after saving).
"""

from __future__ import annotations

import gc
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from dqrm_lightning.checkpoint import SafeCheckpointIO
from dqrm_lightning.model import DLRMModule
from dqrm_lightning.strategies.sharding import to_plain


def _status(field: str) -> int:
    """A ``/proc/self/status`` memory field, in bytes."""
    match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    assert match, field
    return int(match.group(1)) * 1024


def _peak_increase(step: Callable[[], None]) -> int:
    gc.collect()
    before = _status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident size
    step()
    return _status("VmHWM") - before


def _save(module: DLRMModule, path: Path) -> None:
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams), "epoch": 0}
    module.on_save_checkpoint(checkpoint)
    SafeCheckpointIO().save_checkpoint(checkpoint, path)


def _load(module: DLRMModule, path: Path) -> None:
    checkpoint = SafeCheckpointIO().load_checkpoint(path)
    module.on_load_checkpoint(checkpoint)
    module.load_state_dict(checkpoint["state_dict"])


def main(path: Path, rows: int) -> dict[str, int | bool]:
    torch.manual_seed(0)
    module = DLRMModule([rows] * 26, embedding_dim=16, dense_arch_layer_sizes=[16, 16], over_arch_layer_sizes=[16, 1])
    module.configure_model()
    tables = [t for t in to_plain(module.state_dict()).values() if t.dim() == 2 and len(t) == rows]
    saved_sum = float(tables[0].sum())
    save = _peak_increase(lambda: _save(module, path))
    tables[0].zero_()  # the load must bring it back
    load = _peak_increase(lambda: _load(module, path))
    restored = float(tables[0].sum()) == saved_sum != 0.0
    return {
        "tables": sum(t.numel() * t.element_size() for t in tables),
        "save": save,
        "load": load,
        "restored": restored,
    }


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]), int(sys.argv[2]))))

"""``TorchRecStrategyBase``: what both table layouts share. One process per device under Lightning's launchers, the
module told where its tables go, and distributed checkpoints.

Checkpoints are written by every rank with ``torch.distributed.checkpoint`` (each rank its own shards) into a
directory, plus the non-tensor training state in :data:`META_FILE`; they load onto another world size (the tables
are resharded). Loading never unpickles objects (:mod:`dqrm_lightning.checkpoint`): a checkpoint whose loading would
run code is refused.

Loading a directory follows Lightning's order: :meth:`~TorchRecStrategyBase.load_checkpoint` reads and checks the
training state, the module's ``on_load_checkpoint`` then prepares the model for it (QAT), and
:meth:`~TorchRecStrategyBase.load_model_state_dict` loads the tensors into that model, in place.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.strategies import DDPStrategy
from typing_extensions import override

from dqrm_lightning.checkpoint import (
    SafeCheckpointIO,
    check_weights_only,
    load_dcp,
    load_file,
    read_dcp_metadata,
    verify_directory,
    write_directory_digests,
)
from dqrm_lightning.strategies.peers import PeerWatch, default_store
from dqrm_lightning.strategies.sharding import EmbeddingLayout, EmbeddingPlacement

_TENSORS = "state_dict"
_SPARSE_OPTIMIZER = "sparse_optimizer"
META_FILE = "training_state.pt"


def _split(checkpoint: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tensor part for distributed checkpointing, everything else)."""
    tensors = {k: checkpoint[k] for k in (_TENSORS, _SPARSE_OPTIMIZER) if k in checkpoint}
    rest = {k: v for k, v in checkpoint.items() if k not in tensors}
    return tensors, rest


class TorchRecStrategyBase(DDPStrategy):
    """Multi-process strategy for the DLRM whose tables ``layout`` places; the base of
    :class:`~dqrm_lightning.strategies.ShardedEmbeddingStrategy` and
    :class:`~dqrm_lightning.strategies.ReplicatedEmbeddingStrategy`.

    The module must offer ``place_embeddings(placement)`` (:class:`~dqrm_lightning.model.DLRMModule` does): the
    strategy calls it once the process group is up, before the module builds its tables in ``configure_model``.

    Args:
        layout: where the tables go.
        kwargs: as :class:`~lightning.pytorch.strategies.DDPStrategy` (``process_group_backend``, ``timeout``, ...).
    """

    strategy_name = "torchrec"

    def __init__(self, layout: EmbeddingLayout, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.layout = layout
        self._checkpoint_dir: Path | None = None  # a directory whose tensors load in `load_model_state_dict`
        self.peers: PeerWatch | None = None  # the ranks' heartbeats (several processes): who died, when one does

    def embedding_placement(self) -> EmbeddingPlacement:
        """What the module is told about its tables (called once the process group and the device are set up)."""
        return EmbeddingPlacement(self.layout)

    @override
    def setup_environment(self) -> None:
        super().setup_environment()
        store = default_store() if self.world_size > 1 else None
        if store is not None:
            self.peers = PeerWatch(store, self.global_rank, self.world_size, self.node_rank)
            self.peers.start()
        module = self.lightning_module
        place_embeddings = getattr(module, "place_embeddings", None)
        if place_embeddings is None:
            raise TypeError(
                f"{type(self).__name__} places the tables of a `DLRMModule`; `{type(module).__name__}` has no "
                "`place_embeddings(placement)` to receive where they go"
            )
        place_embeddings(self.embedding_placement())

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: _PATH, storage_options: Any | None = None) -> None:
        """Every rank writes its shards into the directory ``filepath``; rank 0 adds the training state."""
        path = Path(filepath)
        tensors, rest = _split(checkpoint)
        # written beside the target and swapped in when complete: a run killed while saving keeps the old one
        partial = path.with_name(path.name + ".partial")
        if self.is_global_zero:
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
        self.barrier("torchrec_checkpoint_dir")
        dcp.save(tensors, checkpoint_id=str(partial))
        if self.is_global_zero:
            torch.save(rest, partial / META_FILE)
        self.barrier("torchrec_checkpoint_written")
        if self.is_global_zero:
            write_directory_digests(partial)  # every file is complete: checked on each load
            old = path.with_name(path.name + ".old")
            if path.exists():
                path.rename(old)
            partial.rename(path)
            shutil.rmtree(old, ignore_errors=True)
        self.barrier("torchrec_checkpoint_saved")

    @override
    def load_checkpoint(self, checkpoint_path: _PATH, weights_only: bool | None = None) -> dict[str, Any]:
        """Read a directory written by :meth:`save_checkpoint` (any world size), or a single-file checkpoint.

        A directory's files are checked here; its tensors load later, in :meth:`load_model_state_dict`. Nothing is
        unpickled beyond tensors and plain Python values (``weights_only=False`` is refused).

        Raises:
            CheckpointError: a checkpoint whose loading would run code, or an unreadable one.
        """
        check_weights_only(weights_only, checkpoint_path)
        path = Path(checkpoint_path)
        if not path.is_dir():
            self._checkpoint_dir = None
            return SafeCheckpointIO().load_checkpoint(checkpoint_path)
        verify_directory(path)
        rest = load_file(path / META_FILE)
        read_dcp_metadata(path)  # checked before anything is restored
        self._checkpoint_dir = path
        return rest

    @override
    def load_model_state_dict(self, checkpoint: Mapping[str, Any], strict: bool = True) -> None:
        """Load the checkpoint's tensors into the module, which its ``on_load_checkpoint`` has prepared (QAT): the
        target state then has every key. A directory's tensors (and the sharded tables' optimizer state) load in
        place onto this world size's shards."""
        if self._checkpoint_dir is not None:
            checkpoint = {**checkpoint, **self._load_tensors(self._checkpoint_dir)}
            self._checkpoint_dir = None
        super().load_model_state_dict(checkpoint, strict=strict)

    def _load_tensors(self, path: Path) -> dict[str, Any]:
        module = self.lightning_module
        assert module is not None
        target = {_TENSORS: module.state_dict()}
        fused = getattr(getattr(module, "model", None), "fused_optimizer", None)
        saved = read_dcp_metadata(path).state_dict_metadata
        if fused is not None and any(k.startswith(f"{_SPARSE_OPTIMIZER}.") for k in saved):
            target[_SPARSE_OPTIMIZER] = fused.state_dict()  # e.g. Adagrad's accumulators
        load_dcp(target, path)
        return target

    @override
    def teardown(self) -> None:
        if self.peers is not None:
            self.peers.stop()
        super().teardown()

    @override
    def remove_checkpoint(self, filepath: _PATH) -> None:
        if self.is_global_zero:
            self.checkpoint_io.remove_checkpoint(filepath)

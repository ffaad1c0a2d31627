"""Checkpoints and artifacts never run code from the files they load.

Each malicious file below holds an object whose unpickling would call ``os.system("touch MARKER")``; every loader
must refuse it with an error naming the file, and the marker must not exist afterwards.
"""

import os
import pickle
import random
import shlex
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from dqrm_lightning.checkpoint import CheckpointError, SafeCheckpointIO, load_file, read_dcp
from dqrm_lightning.export.exporter import export_checkpoint, read_checkpoint
from dqrm_lightning.quant.config import QATConfig
from dqrm_lightning.strategies import TorchRecStrategy
from dqrm_lightning.strategies.base import META_FILE
from tests.helpers.cli import FAST, on_sample, run_cli
from tests.helpers.model import save_checkpoint, trained_module


class RunsCode:
    """Unpickling this runs a shell command (what a malicious checkpoint would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def _state() -> dict:
    return {"state_dict": {"model.w": torch.arange(6.0).reshape(2, 3)}, "hyper_parameters": {"embedding_dim": 8}}


def evil_file(path: Path, marker: Path) -> Path:
    torch.save(_state() | {"payload": RunsCode(marker)}, path)
    return path


def dcp_dir(path: Path, training_state: object, extra: dict | None = None) -> Path:
    """A distributed checkpoint directory like TorchRecStrategy writes (tensors + training_state.pt)."""
    dcp.save({"state_dict": _state()["state_dict"], **(extra or {})}, checkpoint_id=str(path), no_dist=True)
    torch.save(training_state, path / META_FILE)
    return path


@pytest.fixture
def marker(tmp_path):
    path = tmp_path / "MARKER"
    yield path
    assert not path.exists(), "code from a checkpoint ran"


def test_the_marker_payload_really_runs_code_when_unpickled(tmp_path):
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(RunsCode(marker)))  # what loaders must never do
    assert marker.exists()


def test_python_loaders_refuse_pickled_code(tmp_path, marker):
    evil = evil_file(tmp_path / "evil.ckpt", marker)
    state_dir = dcp_dir(tmp_path / "evil_state", {"payload": RunsCode(marker)})
    metadata_dir = dcp_dir(tmp_path / "evil_metadata", {"hyper_parameters": {}})
    (metadata_dir / ".metadata").write_bytes(pickle.dumps(RunsCode(marker)))
    value_dir = dcp_dir(
        tmp_path / "evil_value", {"hyper_parameters": {}}, {"sparse_optimizer": {"x": RunsCode(marker)}}
    )
    refused = "refused: it holds pickled objects other than tensors and plain Python values"
    for load, path, named in [
        (read_checkpoint, evil, evil),
        (SafeCheckpointIO().load_checkpoint, evil, evil),
        (TorchRecStrategy().load_checkpoint, evil, evil),
        (read_checkpoint, state_dir, state_dir / META_FILE),
        (TorchRecStrategy().load_checkpoint, state_dir, state_dir / META_FILE),
        (read_checkpoint, metadata_dir, metadata_dir / ".metadata"),
        (TorchRecStrategy().load_checkpoint, metadata_dir, metadata_dir / ".metadata"),
        (lambda p: read_dcp(p, ("sparse_optimizer",)), value_dir, "checkpoint entry sparse_optimizer.x"),
    ]:
        with pytest.raises(CheckpointError, match=refused) as info:
            load(path)
        assert str(info.value).startswith(f"{named}: "), str(info.value)
    with pytest.raises(CheckpointError, match="`weights_only=False` is not supported"):
        SafeCheckpointIO().load_checkpoint(evil, weights_only=False)


def test_distributed_checkpoint_metadata_must_name_shards_inside_the_directory(tmp_path):
    outside = dcp_dir(tmp_path / "outside", {"hyper_parameters": {}})
    metadata = (outside / ".metadata").read_bytes()
    shard = next(outside.glob("*.distcp")).name
    (outside / ".metadata").write_bytes(metadata.replace(shard.encode(), b"../" + shard.encode()[3:]))
    with pytest.raises(CheckpointError, match=r"refused: a shard file '\.\./.*' outside the checkpoint directory"):
        read_checkpoint(outside)


def test_safe_loaders_still_read_what_dqrm_writes(tmp_path):
    state = {"hyper_parameters": {"embedding_dim": 8}, "epoch": 3}
    optimizer = {"sparse_optimizer": {"p": {"momentum": torch.ones(2)}, "lr": 0.5, "name": "sgd"}}
    path = dcp_dir(tmp_path / "ok", state, optimizer)
    checkpoint = read_checkpoint(path)
    torch.testing.assert_close(checkpoint["state_dict"]["model.w"], _state()["state_dict"]["model.w"])
    assert checkpoint["epoch"] == 3
    loaded = read_dcp(path, ("sparse_optimizer",))["sparse_optimizer"]  # non-tensor values: loaded weights-only
    assert (loaded["lr"], loaded["name"]) == (0.5, "sgd")
    torch.testing.assert_close(loaded["p"]["momentum"], torch.ones(2))
    single = tmp_path / "ok.ckpt"
    torch.save(_state(), single)
    weights = SafeCheckpointIO().load_checkpoint(single)["state_dict"]["model.w"]
    torch.testing.assert_close(weights, torch.arange(6.0).reshape(2, 3))


def _refused(result, path: Path, command: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"dqrm {command}: error: {path}" in result.stderr, result.stderr[-3000:]
    assert "refused" in result.stderr


def test_the_cli_refuses_malicious_checkpoints(tmp_path, criteo_sample, marker):
    evil = evil_file(tmp_path / "evil.ckpt", marker)
    root = tmp_path / "runs"
    common = [*on_sample(tmp_path, criteo_sample), "--trainer.default_root_dir", str(root), *FAST]
    # --ckpt_path FILE: read first by LightningCLI for its hyper-parameters
    _refused(run_cli("validate", *common, "--ckpt_path", str(evil)), evil, "validate")
    # --ckpt_path last: resolved to the newest last.ckpt, read only by the trainer's checkpoint IO
    last = root / "lightning_logs" / "version_7" / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    evil_file(last, marker)
    _refused(run_cli("validate", *common, "--ckpt_path", "last"), last, "validate")
    _refused(run_cli("export", "--ckpt", str(evil), "--out", str(tmp_path / "art")), evil, "export")
    assert not (tmp_path / "art").exists()
    # a distributed checkpoint directory whose training state is malicious
    state_dir = dcp_dir(tmp_path / "evil_dir", {"payload": RunsCode(marker)})
    strategy = ["--trainer.strategy", "torchrec", "--trainer.devices", "1"]
    result = run_cli("validate", *common, *strategy, "--ckpt_path", str(state_dir))
    _refused(result, state_dir / META_FILE, "validate")


def test_the_cli_refuses_a_tampered_artifact_naming_the_file(tmp_path, criteo_sample):
    save_checkpoint(trained_module(QATConfig(embedding_bits=4), steps=1), tmp_path / "m.ckpt")
    export_checkpoint(tmp_path / "m.ckpt", tmp_path / "art")
    table = tmp_path / "art" / "tables" / "C7.bin"
    data = bytearray(table.read_bytes())
    data[0] ^= 1
    table.write_bytes(bytes(data))
    common = [*on_sample(tmp_path, criteo_sample), "--trainer.default_root_dir", str(tmp_path / "r"), *FAST]
    result = run_cli("predict", *common, "--artifact", str(tmp_path / "art"))
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"dqrm predict: error: {table}: sha256 mismatch (the file was modified)" in result.stderr


def _flip_a_byte_inside_the_largest_tensor(path: Path) -> None:
    import struct
    import zipfile

    with zipfile.ZipFile(path) as archive:
        entry = max(archive.infolist(), key=lambda info: info.file_size)
    data = bytearray(path.read_bytes())
    name_length, extra_length = struct.unpack("<HH", data[entry.header_offset + 26 : entry.header_offset + 30])
    start = entry.header_offset + 30 + name_length + extra_length
    data[start + entry.file_size // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_checkpoint_with_one_flipped_byte_is_refused_naming_the_file(tmp_path):
    checkpoint = {
        "state_dict": {"t_C3.weight": torch.randn(64, 8), "bias": torch.zeros(3)},
        "hyper_parameters": {"embedding_dim": 8},
        "epoch": 2,
    }
    path = tmp_path / "last.ckpt"
    SafeCheckpointIO().save_checkpoint(checkpoint, path)
    loaded = SafeCheckpointIO().load_checkpoint(path)
    assert "integrity" not in loaded
    assert torch.equal(loaded["state_dict"]["t_C3.weight"], checkpoint["state_dict"]["t_C3.weight"])
    _flip_a_byte_inside_the_largest_tensor(path)
    assert torch.load(path, weights_only=True)["epoch"] == 2  # torch itself loads it: only the digest tells
    for load in (SafeCheckpointIO().load_checkpoint, read_checkpoint):
        with pytest.raises(CheckpointError, match=f"{path}: corrupt checkpoint: its content does not match"):
            load(path)


def test_the_cli_refuses_a_file_of_random_bytes_in_one_line(tmp_path, criteo_sample):
    garbage = tmp_path / "random.ckpt"
    for seed in range(3):  # random bytes fail in different places of torch.load (zip, pickle, text decoding)
        garbage.write_bytes(random.Random(seed).randbytes(4096))
        with pytest.raises(CheckpointError) as refused:
            load_file(garbage)
        assert str(refused.value).startswith(f"{garbage}: "), refused.value
        assert "\n" not in str(refused.value)
    common = [*on_sample(tmp_path, criteo_sample), "--trainer.default_root_dir", str(tmp_path / "runs"), *FAST]
    result = run_cli("validate", *common, "--ckpt_path", str(garbage))  # the CLI says the same in one line
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == [result.stderr.strip()], result.stderr
    assert result.stderr.startswith(f"dqrm validate: error: {garbage}: "), result.stderr


def test_a_distributed_checkpoint_directory_is_checked_file_by_file(tmp_path):
    from dqrm_lightning.checkpoint import DIGESTS_FILE, verify_directory, write_directory_digests

    path = dcp_dir(tmp_path / "ok", {"hyper_parameters": {}})
    before = read_dcp(path)  # written before digests existed: loads as it is
    write_directory_digests(path)
    assert sorted(__import__("json").loads((path / DIGESTS_FILE).read_text())["sha256"]) == sorted(
        p.name for p in path.iterdir() if p.name != DIGESTS_FILE
    )
    torch.testing.assert_close(read_dcp(path), before)
    shard = max(path.glob("*.distcp"), key=lambda p: p.stat().st_size)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{shard}: corrupt checkpoint: the file does not match"):
        read_dcp(path)
    damaged = shard.read_bytes()
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"{shard}: missing from the checkpoint directory"):
        verify_directory(path)
    shard.write_bytes(damaged)
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))  # restored
    verify_directory(path)
    (path / "extra.distcp").write_bytes(b"x")
    with pytest.raises(CheckpointError, match=r"extra\.distcp: not part of the checkpoint"):
        verify_directory(path)


def test_a_checkpoint_in_torchs_legacy_format_still_loads(tmp_path):
    state = {"state_dict": {"w": torch.arange(6.0).view(2, 3)}, "epoch": 1}
    path = tmp_path / "legacy.ckpt"
    torch.save(state, path, _use_new_zipfile_serialization=False)
    loaded = load_file(path)
    assert torch.equal(loaded["state_dict"]["w"], state["state_dict"]["w"])
    assert loaded["epoch"] == 1

"""Run directories: which version a checkpoint continues, its wandb run id, and cleaning up after a failed start."""

from pathlib import Path

from dqrm_lightning.runs import find_checkpoint, read_metrics, remove_if_unused, run_version, wandb_run_id


def test_a_checkpoint_of_a_run_under_the_root_continues_that_version(tmp_path):
    run = tmp_path / "lightning_logs" / "version_7"
    (run / "checkpoints").mkdir(parents=True)
    last = run / "checkpoints" / "last.ckpt"
    last.write_bytes(b"x")
    assert run_version(str(last), str(tmp_path)) == 7
    assert find_checkpoint(tmp_path, "last") == str(last)
    assert run_version(str(last), str(tmp_path / "elsewhere")) is None  # another root: a new run
    copied = tmp_path / "model.ckpt"
    copied.write_bytes(b"x")
    assert run_version(str(copied), str(tmp_path)) is None
    assert run_version(None, str(tmp_path)) is None


def test_the_newest_wandb_run_and_the_metrics_so_far(tmp_path):
    for name in ("offline-run-20261201_151609-aaaa1111", "offline-run-20261201_152545-bbbb2222"):
        (tmp_path / "wandb" / name).mkdir(parents=True)
    assert wandb_run_id(tmp_path) == "bbbb2222"
    assert wandb_run_id(tmp_path / "none") is None
    (tmp_path / "metrics.csv").write_text("epoch,step,train/loss\n0,4,0.5\n")
    assert read_metrics(tmp_path / "metrics.csv") == [{"epoch": "0", "step": "4", "train/loss": "0.5"}]
    assert read_metrics(tmp_path / "missing.csv") == []


def test_only_a_run_directory_without_results_is_removed(tmp_path):
    empty, kept = tmp_path / "version_0", tmp_path / "version_1"
    for run in (empty, kept):
        (run / "wandb").mkdir(parents=True)
        (run / "config.yaml").write_text("x")
    (kept / "metrics.csv").write_text("step\n")
    remove_if_unused(empty)
    remove_if_unused(kept)
    assert not empty.exists()
    assert Path(kept / "metrics.csv").exists()

"""Progress output: plain lines off a terminal, the run's version on the live bar, end-to-end samples/s."""

import time

import lightning.pytorch as pl
from lightning.pytorch.loggers import CSVLogger

from dqrm_lightning.callbacks import LineProgress, StepTimer, TerminalProgress
from tests.helpers.training import small_datamodule, small_module


class SlowLoop(pl.Callback):
    """20 ms outside the training step (after StepTimer's step ends), as slow data loading would be."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        time.sleep(0.02)


def _fit(tmp_path, callbacks, **kwargs):
    trainer = pl.Trainer(
        default_root_dir=tmp_path,
        logger=CSVLogger(tmp_path),
        enable_model_summary=False,
        num_sanity_val_steps=0,
        max_epochs=1,
        limit_train_batches=20,
        limit_val_batches=2,
        log_every_n_steps=5,
        callbacks=callbacks,
        **kwargs,
    )
    trainer.fit(small_module(), datamodule=small_datamodule(tmp_path))
    return trainer


def test_lines_every_n_steps_and_per_epoch_and_end_to_end_samples_per_s(tmp_path, capsys):
    trainer = _fit(tmp_path, [StepTimer(warmup_steps=0), SlowLoop(), LineProgress(every_n_steps=10)])
    out = capsys.readouterr().out
    assert "\r" not in out
    lines = [line for line in out.splitlines() if line.startswith("epoch ")]
    assert [line.split(" steps")[0] for line in lines] == ["epoch 0: 10/20", "epoch 0: 20/20", "epoch 0: 20/20"]
    assert "val/auc" in lines[-1]
    assert "val/auc" not in lines[0]
    # samples/s counts the whole loop (the 20 ms outside the step included): at most 32 rows / 20 ms
    assert trainer.callback_metrics["train/samples_per_s"] < 32 / 0.02
    for line in lines:
        assert float(line.split(" samples/s")[0].rsplit(", ", 1)[1].replace(",", "")) < 32 / 0.02


def test_the_live_bar_shows_the_runs_version_not_the_joined_logger_versions(tmp_path):
    trainer = pl.Trainer(
        default_root_dir=tmp_path, logger=[CSVLogger(tmp_path, version=3), CSVLogger(tmp_path, version="x9y8z7")]
    )
    bar = TerminalProgress()
    bar._trainer = trainer
    assert pl.callbacks.ProgressBar.get_metrics(bar, trainer, None)["v_num"] == "y8z7"  # Lightning's: "3_x9y8z7"
    assert bar.get_metrics(trainer, None)["v_num"] == 3


def test_the_bar_of_a_run_resumed_mid_epoch_knows_the_epoch_and_its_total(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=11, save_top_k=-1)
    (tmp_path / "a").mkdir()
    _fit(tmp_path / "a", [checkpoint], max_steps=11, enable_progress_bar=False)
    path = next((tmp_path / "ckpt").glob("*.ckpt"))
    seen = []

    class Probe(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append((bar.train_progress_bar.total, bar.train_progress_bar.desc))

    bar = TerminalProgress()
    trainer = pl.Trainer(
        default_root_dir=tmp_path / "b",
        logger=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        max_epochs=1,
        callbacks=[bar, Probe()],
    )
    trainer.fit(small_module(), datamodule=small_datamodule(tmp_path), ckpt_path=path)
    assert seen[0] == (32, "Epoch 0: ")  # not "Training: 12/?"

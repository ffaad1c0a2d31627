"""QAT through the Trainer: the callback prepares in setup, and a resumed run continues exactly."""

import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from dqrm_lightning.callbacks import QuantizationAwareTraining
from dqrm_lightning.quant import QATConfig
from dqrm_lightning.strategies.sharding import gather_full
from tests.helpers.training import quiet_trainer, small_datamodule, small_module

PERIOD = 7


def _qat():
    return QuantizationAwareTraining(QATConfig(embedding_bits=4, mlp_bits=4, scale_period=PERIOD))


def _state(module):
    return {
        k: (gather_full(v) if hasattr(v, "local_shards") else v).detach().clone()
        for k, v in module.state_dict().items()
    }


def test_qat_state_survives_checkpoint_and_resume_exactly(tmp_path):
    per_epoch = 32  # 1000 rows / batch 32
    reference = small_module()
    quiet_trainer(tmp_path / "ref", [_qat()], max_epochs=2).fit(reference, datamodule=small_datamodule(tmp_path))
    quantizer = reference.embedding_quantizer
    assert int(quantizer.refreshes) == len(range(0, 2 * per_epoch, PERIOD))
    assert int(quantizer.last_refresh_step) == (2 * per_epoch - 1) // PERIOD * PERIOD

    stop = per_epoch + 10
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=stop, save_top_k=-1)
    quiet_trainer(tmp_path / "a", [_qat(), checkpoint], max_steps=stop).fit(
        small_module(), datamodule=small_datamodule(tmp_path)
    )
    path = next((tmp_path / "ckpt").glob("*.ckpt"))
    saved = torch.load(path, weights_only=True)
    assert saved["qat_config"]["embedding_bits"] == 4
    assert int(saved["state_dict"]["embedding_quantizer.refreshes"]) == len(range(0, stop, PERIOD))

    resumed = small_module()
    quiet_trainer(tmp_path / "b", [_qat()], max_epochs=2).fit(
        resumed, datamodule=small_datamodule(tmp_path), ckpt_path=path
    )
    want, got = _state(reference), _state(resumed)
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6, msg=key)


def test_warmup_epochs_train_fp32_first(tmp_path):
    module = small_module()
    qat = QuantizationAwareTraining(QATConfig(embedding_bits=4, scale_period=PERIOD, warmup_epochs=1))
    quiet_trainer(tmp_path, [qat], max_epochs=2).fit(module, datamodule=small_datamodule(tmp_path))
    quantizer = module.embedding_quantizer
    assert int(quantizer.start_step) == 32  # quantization started with the second epoch
    assert int(quantizer.refreshes) == len(range(32, 64, PERIOD))


def _trained_grid(max_steps: int, tmp_path, name: str, *callbacks, ckpt_path=None):
    """A module trained with learned asymmetric grids and stochastic rounding through the Trainer."""
    config = QATConfig(embedding_bits=4, embedding_mode="asymmetric", scale_learning="lsq", rounding="stochastic")
    module = small_module()
    trainer = quiet_trainer(tmp_path / name, [QuantizationAwareTraining(config), *callbacks], max_steps=max_steps)
    trainer.fit(module, datamodule=small_datamodule(tmp_path), ckpt_path=ckpt_path)
    return module


def test_learned_scales_train_and_resume_exactly_with_stochastic_rounding(tmp_path):
    reference = _trained_grid(8, tmp_path, "ref")
    quantizer = reference.embedding_quantizer
    assert int(quantizer.refreshes) == 1  # set once from the extrema (low, high), then learned
    initial_scale = (quantizer.high - quantizer.low) / 15
    assert float((quantizer.scale.detach() - initial_scale).abs().max()) > 1e-3 * float(initial_scale.max())

    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    _trained_grid(4, tmp_path, "a", checkpoint)
    path = next((tmp_path / "ckpt").glob("*.ckpt"))
    resumed = _trained_grid(8, tmp_path, "b", ckpt_path=path)
    want, got = _state(reference), _state(resumed)
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6, msg=key)

"""``model.table_dtype``: float16 master tables train, quantize, checkpoint and resume; INT8 is refused."""

import logging

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dqrm_lightning.callbacks import QuantizationAwareTraining
from dqrm_lightning.errors import ConfigError
from dqrm_lightning.model import DLRMModule
from dqrm_lightning.names import table_key
from dqrm_lightning.quant import QATConfig
from dqrm_lightning.quant.fake_quant import grid_from_extrema
from dqrm_lightning.strategies.sharding import (
    EmbeddingLayout,
    EmbeddingPlacement,
    ensure_process_group,
    fused_table_wise_plan,
    gather_full,
)
from tests.helpers.model import ROWS, qat_module, random_batch, save_checkpoint, trained_module
from tests.helpers.training import quiet_trainer, small_datamodule, small_module


def _tables(module: DLRMModule) -> dict[str, torch.Tensor]:
    """Every table of ``module`` as one plain tensor, by feature."""
    state = module.state_dict()
    keys = {key: key.split(".")[-2].removeprefix("t_") for key in state if ".embedding_bags." in key}
    return {feature: _plain(state[key]) for key, feature in keys.items()}


def _plain(value):
    return (gather_full(value) if hasattr(value, "local_shards") else value).detach().clone()


def _fit_one_batch(module: DLRMModule, steps: int) -> list[float]:
    """Losses of ``steps`` optimizer steps on one fixed batch."""
    optimizer = module.configure_optimizers()
    batch = random_batch(seed=0, rows=ROWS)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = module._loss(module(batch), batch)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


def test_fp16_tables_are_stored_in_half_and_train_like_fp32():
    half = trained_module(QATConfig(embedding_bits=None), steps=0, table_dtype="fp16").train()
    assert {t.dtype for t in _tables(half).values()} == {torch.float16}
    pooled = half.dlrm.sparse_arch(random_batch(rows=ROWS).sparse_features)
    assert pooled.dtype == torch.float32  # the MLPs and the interaction get float32 activations
    full = trained_module(QATConfig(embedding_bits=None), steps=0).train()
    half_losses, full_losses = _fit_one_batch(half, 40), _fit_one_batch(full, 40)
    assert half_losses[-1] < 0.8 * half_losses[0]
    assert half_losses[-1] == pytest.approx(full_losses[-1], abs=0.02)


@pytest.mark.parametrize("tracking", ["periodic", "exact"])
def test_int4_qat_scales_come_from_the_stored_fp16_tables(tracking):
    config = QATConfig(embedding_bits=4, scale_tracking=tracking)
    module = qat_module(config, table_dtype="fp16")
    quantizer, optimizer = module.embedding_quantizer, module.configure_optimizers()
    for step in range(6):
        quantizer.maybe_refresh(step)
        batch = random_batch(seed=step, rows=ROWS)
        optimizer.zero_grad()
        module._loss(module(batch), batch).backward()
        optimizer.step()
        if tracking == "exact":  # what the QAT callback does after each step
            quantizer.track(batch.sparse_features)
    if tracking == "periodic":
        quantizer.refresh()
    tables = _tables(module)
    low = torch.stack([tables[f].min() for f in quantizer.feature_names]).float()
    high = torch.stack([tables[f].max() for f in quantizer.feature_names]).float()
    torch.testing.assert_close(quantizer.low, low, rtol=0, atol=0)
    torch.testing.assert_close(quantizer.high, high, rtol=0, atol=0)
    scale, _ = grid_from_extrema(low, high, quantizer.bits, config.embedding_mode)
    torch.testing.assert_close(quantizer.scale, scale, rtol=0, atol=0)
    with torch.no_grad():  # every looked-up value on its table's grid
        codes = module.dlrm.sparse_arch(random_batch(rows=ROWS).sparse_features) / scale.view(1, -1, 1)  # (B, F, D)
    torch.testing.assert_close(codes, codes.round(), rtol=0, atol=1e-4)


def _qat_callback() -> QuantizationAwareTraining:
    return QuantizationAwareTraining(QATConfig(embedding_bits=4, mlp_bits=4, scale_period=5))


def test_fp16_qat_resumes_from_a_checkpoint_bitwise(tmp_path):
    reference = small_module(table_dtype="fp16")
    quiet_trainer(tmp_path / "ref", [_qat_callback()], max_steps=20).fit(
        reference, datamodule=small_datamodule(tmp_path)
    )
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=12, save_top_k=-1)
    quiet_trainer(tmp_path / "a", [_qat_callback(), checkpoint], max_steps=12).fit(
        small_module(table_dtype="fp16"), datamodule=small_datamodule(tmp_path)
    )
    path = next((tmp_path / "ckpt").glob("*.ckpt"))
    saved = torch.load(path, weights_only=True)
    assert saved["state_dict"][table_key("C1")].dtype == torch.float16
    resumed = small_module(table_dtype="fp16")
    quiet_trainer(tmp_path / "b", [_qat_callback()], max_steps=20).fit(
        resumed, datamodule=small_datamodule(tmp_path), ckpt_path=path
    )
    want, got = reference.state_dict(), resumed.state_dict()
    assert want.keys() == got.keys()
    for key in want:
        expected, actual = _plain(want[key]), _plain(got[key])
        assert actual.dtype == expected.dtype, key
        torch.testing.assert_close(actual, expected, rtol=0, atol=0, msg=key)


@pytest.mark.parametrize(("saved", "loaded"), [("fp32", "fp16"), ("fp16", "fp32")])
def test_a_checkpoint_of_the_other_table_dtype_loads_cast_with_a_note(tmp_path, caplog, saved, loaded):
    source = trained_module(QATConfig(embedding_bits=None), steps=3, table_dtype=saved)
    save_checkpoint(source, tmp_path / "m.ckpt")
    target = trained_module(QATConfig(embedding_bits=None), steps=0, table_dtype=loaded)
    checkpoint = torch.load(tmp_path / "m.ckpt", weights_only=True)
    with caplog.at_level(logging.INFO):
        target.on_load_checkpoint(checkpoint)
        target.load_state_dict(checkpoint["state_dict"])
    want = {"fp16": torch.float16, "fp32": torch.float32}[loaded]
    for feature, table in _tables(target).items():
        assert table.dtype == want
        torch.testing.assert_close(table, _tables(source)[feature].to(want), rtol=0, atol=0)
    how = "exact" if loaded == "fp32" else "rounded to the nearest"
    assert f"`table_dtype` stores {want}: cast" in caplog.text
    assert how in caplog.text


def test_int8_and_unknown_table_dtypes_are_refused_naming_the_option():
    with pytest.raises(ValueError, match=r"`table_dtype: int8` is not supported: FBGEMM cannot train INT8 tables"):
        DLRMModule([ROWS] * 26, table_dtype="int8")
    with pytest.raises(ValueError, match=r"`table_dtype` must be one of \['fp16', 'fp32', 'int8'\], got 'bf16'"):
        DLRMModule([ROWS] * 26, table_dtype="bf16")


def _fp16_sgd_updates(start: float, update: float, steps: int, stochastic_rounding: bool | None) -> torch.Tensor:
    """One float16 row at ``start`` after ``steps`` fused SGD updates of ``-update`` each (TorchRec's fused kernel on
    the CPU; ``stochastic_rounding``: the fused parameter, ``None``: FBGEMM's default)."""
    ensure_process_group()
    config = EmbeddingBagConfig(
        name="t", embedding_dim=4, num_embeddings=2, feature_names=["f"], data_type=DataType.FP16
    )
    ebc = EmbeddingBagCollection(tables=[config], device=torch.device("meta"))
    apply_optimizer_in_backward(torch.optim.SGD, ebc.parameters(), {"lr": 1.0})
    fused = {} if stochastic_rounding is None else {"stochastic_rounding": stochastic_rounding}
    sharder = EmbeddingBagCollectionSharder(fused_params=fused)
    table = DistributedModelParallel(ebc, plan=fused_table_wise_plan(ebc, 1), sharders=[sharder])
    weight = _plain(table.state_dict()["embedding_bags.t.weight"])
    assert weight.dtype == torch.float16
    with torch.no_grad():
        table.state_dict()["embedding_bags.t.weight"].local_shards()[0].tensor.fill_(start)
    row = KeyedJaggedTensor.from_lengths_sync(keys=["f"], values=torch.tensor([0]), lengths=torch.tensor([1]))
    for _ in range(steps):
        pooled = table(row).values()  # (1, 4) float32
        assert pooled.dtype == torch.float32
        pooled.backward(torch.full_like(pooled, update))
    return _plain(table.state_dict()["embedding_bags.t.weight"])[0].float()


@pytest.mark.parametrize("stochastic_rounding", [True, False])  # True: FBGEMM's default, which TorchRec keeps
def test_the_cpu_fused_update_of_fp16_tables_rounds_to_nearest(stochastic_rounding):
    ulp = 2.0**-10  # float16 spacing in [1, 2)
    small = _fp16_sgd_updates(1.5, 0.25 * ulp, 40, stochastic_rounding)
    assert bool((small == 1.5).all())  # each update below half an ulp is lost (stochastic rounding: ~10 ulp kept)
    large = _fp16_sgd_updates(1.5, 0.75 * ulp, 20, stochastic_rounding)
    assert bool((large == 1.5 - 20 * ulp).all())  # each update above half an ulp moves the weight a whole ulp


def _replicated(optimizer: str, table_dtype: str = "fp16") -> DLRMModule:
    module = small_module(table_dtype=table_dtype, optimizer=optimizer)
    module.place_embeddings(EmbeddingPlacement(EmbeddingLayout(embeddings="replicated")))
    return module


def test_replicated_fp16_tables_train_with_float16_sparse_gradients():
    full, module = _replicated("sgd", "fp32"), _replicated("sgd")
    full.configure_model()
    module.load_state_dict(full.state_dict())  # the same start, rounded to float16
    tables = list(module.dlrm.sparse_arch.parameters())
    assert {t.dtype for t in tables} == {torch.float16}
    losses = _fit_one_batch(module, 30)
    assert all(t.grad is None or (t.grad.is_sparse and t.grad.dtype == torch.float16) for t in tables)
    assert losses[-1] < 0.9 * losses[0]
    assert losses[-1] == pytest.approx(_fit_one_batch(full, 30)[-1], abs=0.02)


def test_replicated_fp16_tables_refuse_adagrad_naming_both_options():
    with pytest.raises(ConfigError, match=r"`model.table_dtype: fp16` with `model.optimizer: adagrad` needs sharded"):
        _replicated("adagrad").configure_model()

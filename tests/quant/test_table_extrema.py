"""Incremental scale refreshes: per-block table extrema rescanned only where training looked rows up."""

from types import SimpleNamespace

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dqrm_lightning.quant import table_extrema
from dqrm_lightning.quant.config import QATConfig
from dqrm_lightning.quant.table_extrema import BlockExtrema
from tests.helpers.model import ROWS, qat_module, random_batch

FEATURES = ["a", "b"]


@pytest.fixture(autouse=True)
def _every_shard_in_blocks(monkeypatch):
    """Keep per-block extrema of the small test tables too (by default small shards are passed over whole)."""
    monkeypatch.setattr(table_extrema, "_SMALL_SHARD_BLOCKS", 0)


ROWS_AB = [203, 5]  # a: 12 whole blocks and a partial one; b: a single partial block


def _lookups(ids_a: list[int], ids_b: list[int]) -> KeyedJaggedTensor:
    """One sample looking up a bag of ids in each table."""
    return KeyedJaggedTensor.from_lengths_sync(
        keys=FEATURES, values=torch.tensor(ids_a + ids_b), lengths=torch.tensor([len(ids_a), len(ids_b)])
    )


def _tables(
    split: int | None = None, dtype: torch.dtype = torch.float32
) -> tuple[dict[str, torch.Tensor], SimpleNamespace]:
    """Tables a and b, and their local shards: whole, or table a as two row shards split at row ``split``."""
    torch.manual_seed(0)
    tables = {f: torch.randn(rows, 4).to(dtype) for f, rows in zip(FEATURES, ROWS_AB, strict=True)}
    a = tables["a"]
    shards_a = [(a, (0, 0))] if split is None else [(a[:split], (0, 0)), (a[split:], (split, 0))]
    return tables, SimpleNamespace(local={"a": shards_a, "b": [(tables["b"], (0, 0))]})


def _assert_exact(extrema: BlockExtrema, tables: dict[str, torch.Tensor]) -> None:
    result = extrema.refresh()
    for feature, table in tables.items():
        low, high = torch.aminmax(table)
        assert (float(result[feature][0]), float(result[feature][1])) == (float(low), float(high)), feature


@pytest.mark.parametrize("split", [None, 64, 37])  # whole, shard split on a block boundary, and off one
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])  # FP32 or FP16 master tables
def test_refresh_equals_a_full_pass_after_updates_of_the_looked_up_rows(split, dtype, monkeypatch):
    monkeypatch.setattr(table_extrema, "_GATHER_BLOCKS", 2)  # dirty blocks gathered a few at a time
    tables, access = _tables(split, dtype)
    extrema = BlockExtrema(access, FEATURES, ROWS_AB)  # type: ignore[arg-type]
    _assert_exact(extrema, tables)  # the first refresh scans everything
    generator = torch.Generator().manual_seed(1)
    for step in range(40):
        ids_a = torch.randint(0, ROWS_AB[0], (3,), generator=generator).tolist()
        ids_b = torch.randint(0, ROWS_AB[1], (1,), generator=generator).tolist()
        extrema.record(_lookups(ids_a, ids_b))
        # the looked-up rows move, both outward and inward (an extreme row shrinking must lower the extreme)
        tables["a"][ids_a] *= 3.0 if step % 2 else 0.1
        tables["b"][ids_b] += torch.randn(len(ids_b), 4, generator=generator).to(dtype)
        if step % 4 == 3:
            _assert_exact(extrema, tables)
    assert {shard.low.dtype for shards in extrema._shards.values() for shard in shards} == {dtype}  # kept as is
    for row in range(ROWS_AB[0]):  # each row in turn holds both extremes: every block boundary of every shard
        tables["a"][row, 0], tables["a"][row, 1] = 1000.0 + row, -1000.0 - row
        extrema.record(_lookups([row], []))
        _assert_exact(extrema, tables)


def test_only_the_dirty_blocks_are_rescanned_and_invalidate_forces_a_full_pass():
    tables, access = _tables()
    extrema = BlockExtrema(access, FEATURES, ROWS_AB)  # type: ignore[arg-type]
    extrema.refresh()
    seen = tables["a"].clone()
    tables["a"][100] = 50.0  # written without a recorded lookup: not seen (the documented assumption)
    tables["a"][7] = seen[7] = -60.0  # written after a recorded lookup: seen
    extrema.record(_lookups([7], [0]))
    low, high = extrema.refresh()["a"]
    assert (float(low), float(high)) == tuple(float(v) for v in torch.aminmax(seen))  # block 100 // 16 kept
    extrema.invalidate()
    _assert_exact(extrema, tables)  # a full pass sees row 100 again


def _train(config: QATConfig, steps: int) -> list[torch.Tensor]:
    module = qat_module(config)
    quantizer = module.embedding_quantizer
    optimizer = module.configure_optimizers()
    scales = []
    for step in range(steps):
        quantizer.maybe_refresh(step)
        scales.append(torch.cat([quantizer.scale, quantizer.low, quantizer.high]).clone())
        batch = random_batch(batch_size=4, rows=ROWS, seed=step)
        optimizer.zero_grad()
        module._loss(module(batch), batch).backward()
        optimizer.step()  # sparse rows were updated in backward (fused); dense here
    return scales


@pytest.mark.parametrize("mode", ["symmetric", "asymmetric"])
def test_incremental_refreshes_give_the_full_refreshes_scales(mode):
    incremental = _train(
        QATConfig(embedding_bits=4, scale_period=2, embedding_mode=mode, scale_refresh="incremental"), 16
    )
    full = _train(QATConfig(embedding_bits=4, scale_period=2, embedding_mode=mode, scale_refresh="full"), 16)
    for step, (got, want) in enumerate(zip(incremental, full, strict=True)):
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=f"step {step}")
    assert not torch.equal(full[-1], full[0])  # the scales did move


def test_an_fp32_training_forward_or_a_loaded_checkpoint_forces_a_full_pass():
    module = qat_module(QATConfig(embedding_bits=4, scale_refresh="incremental"))
    quantizer = module.embedding_quantizer
    quantizer.maybe_refresh(0)
    assert quantizer.block_extrema.valid
    quantizer.disable_fake_quant()
    module(random_batch(batch_size=4, rows=ROWS))
    assert not quantizer.block_extrema.valid  # its lookups were not recorded
    quantizer.enable_fake_quant()
    quantizer.refresh()
    module.load_state_dict(module.state_dict())
    assert not quantizer.block_extrema.valid


def test_bad_scale_refresh_names_the_field():
    with pytest.raises(ValueError, match="`scale_refresh` must be 'incremental' or 'full', got 'partial'"):
        QATConfig(embedding_bits=4, scale_refresh="partial")  # type: ignore[arg-type]

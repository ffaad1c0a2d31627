import numpy as np
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from dqrm_lightning.data.criteo import DEFAULT_CAT_NAMES
from dqrm_lightning.export.size import model_bytes, quantized_model_bytes
from dqrm_lightning.model import DLRMModule, model_shape
from dqrm_lightning.quant.config import QATConfig
from dqrm_lightning.quant.fake_quant import fp16_ceil
from dqrm_lightning.strategies.sharding import gather_full
from tests.helpers.model import KAGGLE, ROWS, qat_module, random_batch
from tests.helpers.quant import brute_force_row_wise


def full_table(module: DLRMModule, feature: str) -> torch.Tensor:
    key = f"model.sparse_arch.embedding_bag_collection.embedding_bags.t_{feature}.weight"
    value = module.state_dict()[key]
    return (gather_full(value) if hasattr(value, "local_shards") else value).detach().clone()


def brute_force_rows(table: torch.Tensor, ids: torch.Tensor, bits: int) -> torch.Tensor:
    n = 2 ** (bits - 1) - 1
    scale = fp16_ceil(table.abs().max() / n)
    return torch.clamp(torch.round(table[ids] / scale), -n - 1, n) * scale


@pytest.mark.parametrize("bits", [2, 4, 8, 16])
def test_one_hot_output_is_per_row_fake_quantization(bits):
    module = qat_module(QATConfig(embedding_bits=bits))
    batch = random_batch(batch_size=16, rows=ROWS)
    pooled = module.dlrm.sparse_arch(batch.sparse_features)  # (B, F, D), quantized by the hook
    for f, feature in enumerate(DEFAULT_CAT_NAMES):
        ids = batch.sparse_features[feature].values()
        expected = brute_force_rows(full_table(module, feature), ids, bits)
        torch.testing.assert_close(pooled[:, f, :], expected, rtol=0, atol=1e-7)


def test_one_hot_output_with_mixed_widths_and_a_changed_code_range():
    """Tables of different widths (and an FP32 one) clamp to their own ranges; one width for all clamps to two
    numbers, and a code range loaded into the buffers is followed (never a stale cached one)."""
    config = QATConfig(embedding_bits_per_table={"C1": 2, "C2": 8, "C4": 4, "C5": 4})  # the other tables FP32
    module = qat_module(config)
    quantizer = module.embedding_quantizer
    assert quantizer._uniform_code_range() is None
    batch = random_batch(batch_size=16, rows=ROWS)
    pooled = module.dlrm.sparse_arch(batch.sparse_features)
    for f, feature in enumerate(DEFAULT_CAT_NAMES[:5]):
        ids = batch.sparse_features[feature].values()
        bits = {"C1": 2, "C2": 8}.get(feature, 4)
        expected = full_table(module, feature)[ids] if feature == "C3" else None
        if expected is None:
            expected = brute_force_rows(full_table(module, feature), ids, bits)
        torch.testing.assert_close(pooled[:, f, :], expected, rtol=0, atol=1e-7)
    uniform = qat_module(QATConfig(embedding_bits=4)).embedding_quantizer
    assert uniform._uniform_code_range() == (-8.0, 7.0)
    state = uniform.state_dict()
    state["qmin"], state["qmax"] = torch.full_like(state["qmin"], -2.0), torch.full_like(state["qmax"], 1.0)
    uniform.load_state_dict(state)
    assert uniform._uniform_code_range() == (-2.0, 1.0)


def test_multi_hot_quantizes_rows_before_pooling():
    module = qat_module(QATConfig(embedding_bits=4))
    batch_size = 3
    lengths = torch.tensor([2, 0, 3] * 26, dtype=torch.int32)
    values = torch.randint(0, ROWS, (int(lengths.sum()),))
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=list(DEFAULT_CAT_NAMES), values=values, lengths=lengths)
    pooled = module.dlrm.sparse_arch(kjt)
    for f, feature in enumerate(DEFAULT_CAT_NAMES[:4]):
        jagged = kjt[feature]
        table = full_table(module, feature)
        start = 0
        for b, length in enumerate(jagged.lengths().tolist()):
            ids = jagged.values()[start : start + length]
            start += length
            expected = brute_force_rows(table, ids, 4).sum(dim=0) if length else torch.zeros(8)
            torch.testing.assert_close(pooled[b, f], expected, rtol=0, atol=2e-7)
            # summing after quantizing differs from quantizing the sum (the reference code's pooled-output quirk)
    assert pooled.shape == (batch_size, 26, 8)


@pytest.mark.parametrize("mode", ["symmetric", "asymmetric"])
@pytest.mark.parametrize("bits", [2, 4])
def test_per_row_one_hot_output_is_each_row_on_its_own_grid(bits, mode):
    config = QATConfig(embedding_bits=bits, embedding_mode=mode, embedding_granularity="per_row")
    module = qat_module(config)
    batch = random_batch(batch_size=16, rows=ROWS)
    pooled = module.dlrm.sparse_arch(batch.sparse_features)  # (B, F, D)
    for f, feature in enumerate(DEFAULT_CAT_NAMES):
        rows = full_table(module, feature)[batch.sparse_features[feature].values()]  # (B, D)
        expected = brute_force_row_wise(rows.numpy(), bits, mode)[2]
        np.testing.assert_array_equal(pooled[:, f, :].detach().numpy(), expected)
    assert module.embedding_quantizer.scales() == {}  # no per-table scale to report


def test_per_row_multi_hot_quantizes_each_row_on_its_own_grid_before_pooling():
    module = qat_module(QATConfig(embedding_bits=4, embedding_granularity="per_row", embedding_mode="asymmetric"))
    lengths = torch.tensor([2, 0, 3] * 26, dtype=torch.int32)
    values = torch.randint(0, ROWS, (int(lengths.sum()),))
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=list(DEFAULT_CAT_NAMES), values=values, lengths=lengths)
    pooled = module.dlrm.sparse_arch(kjt)
    for f, feature in enumerate(DEFAULT_CAT_NAMES[:4]):
        table = brute_force_row_wise(full_table(module, feature).numpy(), 4, "asymmetric")[2]  # every row quantized
        ids = kjt[feature].values().split(kjt[feature].lengths().tolist())
        for b, bag in enumerate(ids):
            expected = torch.from_numpy(table[bag.numpy()]).sum(dim=0)
            torch.testing.assert_close(pooled[b, f], expected, rtol=0, atol=2e-7)


def test_gradient_reaches_only_looked_up_rows_through_the_quantizer():
    module = qat_module(QATConfig(embedding_bits=4))
    optimizer = module.configure_optimizers()
    batch = random_batch(batch_size=4, rows=ROWS)
    before = full_table(module, "C5")
    module._loss(module(batch), batch).backward()
    optimizer.step()
    changed = set(torch.nonzero((full_table(module, "C5") != before).any(dim=1)).flatten().tolist())
    assert changed
    assert changed <= set(batch.sparse_features["C5"].values().tolist())


@pytest.mark.parametrize(
    ("period", "off_by_one", "expected"),
    [(200, False, [0, 200, 400, 600]), (1, False, None), (200, True, [0, 201, 402, 603])],
)
def test_refresh_cadence_is_exactly_the_period(period, off_by_one, expected):
    module = qat_module(QATConfig(embedding_bits=4, scale_period=period, period_off_by_one=off_by_one))
    quantizer = module.embedding_quantizer
    refreshed = [step for step in range(700) if quantizer.maybe_refresh(step)]
    assert refreshed == (expected if expected is not None else list(range(700)))
    assert int(quantizer.refreshes) == len(refreshed)


def test_scale_is_frozen_between_refreshes_and_in_eval():
    module = qat_module(QATConfig(embedding_bits=4, scale_period=3))
    quantizer = module.embedding_quantizer
    optimizer = module.configure_optimizers()
    scales = []
    for step in range(5):
        quantizer.maybe_refresh(step)
        scales.append(quantizer.scale.clone())
        batch = random_batch(batch_size=64, rows=ROWS, seed=step)
        module._loss(module(batch), batch).backward()
        optimizer.step()
        optimizer.zero_grad()
    torch.testing.assert_close(scales[1], scales[0], rtol=0, atol=0)
    torch.testing.assert_close(scales[2], scales[0], rtol=0, atol=0)
    assert not torch.equal(scales[3], scales[0])  # refreshed at step 3 from the trained tables
    frozen = quantizer.scale.clone()
    module.eval()
    with torch.no_grad():
        module(random_batch(seed=9, rows=ROWS))
    torch.testing.assert_close(quantizer.scale, frozen, rtol=0, atol=0)


def test_mixed_precision_policy():
    config = QATConfig(
        embedding_bits=8, embedding_bits_by_rows=[[1000, 4], [1_000_000, 2]], embedding_bits_per_table={"C9": 16}
    )
    assert config.table_bits("C1", 999) == 8
    assert config.table_bits("C1", 1000) == 4
    assert config.table_bits("C3", 10_131_227) == 2
    assert config.table_bits("C9", 10_131_227) == 16
    module = DLRMModule(
        [10] * 13 + [2000] * 13, embedding_dim=8, dense_arch_layer_sizes=[16, 8], over_arch_layer_sizes=[16, 1]
    )
    module.prepare_qat(
        QATConfig(embedding_bits=8, embedding_bits_by_rows=[[1000, 4]], embedding_bits_per_table={"C2": 2})
    )
    bits = module.embedding_quantizer.table_bits()
    assert bits["C1"] == 8
    assert bits["C2"] == 2
    assert bits["C26"] == 4
    assert module.embedding_quantizer.qmin[1] == -2
    assert module.embedding_quantizer.qmax[25] == 7


def test_per_table_bits_naming_no_feature_of_the_model_stop_prepare_qat():
    """The names are the model's features (checked when QAT is prepared: the schema decides them)."""
    module = DLRMModule([10] * 26, embedding_dim=8, dense_arch_layer_sizes=[16, 8], over_arch_layer_sizes=[16, 1])
    config = QATConfig(embedding_bits=4, embedding_bits_per_table={"t_C3": 2})  # a table name, not a feature
    with pytest.raises(
        ValueError, match=r"^`embedding_bits_per_table` names an unknown feature 't_C3'; features are C1..C26$"
    ):
        module.prepare_qat(config)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"embedding_bits": 3}, r"^`embedding_bits` must be one of \(2, 4, 8, 16\) or null, got 3$"),
        ({"embedding_bits": True}, "^`embedding_bits` must be one of"),
        ({"embedding_bits_per_table": {"C3": 5}}, "^`embedding_bits_per_table`: C3 must be one of"),
        ({"embedding_bits_by_rows": [[1000, 3]]}, r"^`embedding_bits_by_rows`: bits must be one of .*\[1000, 3\]"),
        ({"embedding_bits_by_rows": [[-1, 4]]}, r"^`embedding_bits_by_rows` entries are \[min_rows, bits\]"),
        ({"scale_period": 0}, "^`scale_period` must be a positive number of steps, got 0$"),
        ({"scale_period": -200}, "^`scale_period` must be a positive"),
        ({"warmup_epochs": -1}, "^`warmup_epochs`"),
        ({"mlp_bits": 2}, "^`mlp_bits` must be 4, 8 or null"),
        ({"mlp_bits": 4, "mlp_activation_bits": 3}, "^`mlp_activation_bits` must be"),
        ({"mlp_activation_bits": 8}, "^`mlp_activation_bits` needs `mlp_bits`"),
        ({"embedding_mode": "log"}, "^`embedding_mode`"),
        ({"embedding_granularity": "per_group"}, "^`embedding_granularity` must be 'per_table' or 'per_row', got"),
        ({"size_budget": 0}, r"^`size_budget` must be a fraction in \(0, 1\] of the FP32 table bytes, got 0$"),
        ({"size_budget": 1.5}, "^`size_budget` must be a fraction"),
        ({"size_budget": True}, "^`size_budget` must be a fraction"),
        ({"size_budget": "0.1"}, "^`size_budget` must be a fraction"),
        ({"size_budget": 0.2, "embedding_bits_by_rows": [[10, 2]]}, "^`size_budget` .* `embedding_bits_by_rows`"),
    ],
)
def test_bad_config_names_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QATConfig(**kwargs)


def test_every_supported_bit_width_is_accepted_per_table_and_by_rows():
    for bits in (2, 4, 8, 16):
        config = QATConfig(
            embedding_bits=None, embedding_bits_per_table={"C26": bits}, embedding_bits_by_rows=[[5, bits]]
        )
        assert config.table_bits("C26", 1) == bits
        assert config.table_bits("C1", 5) == bits
        assert config.table_bits("C1", 4) is None


def test_quantized_model_bytes_kaggle_int4_is_an_eighth():
    module = DLRMModule(
        KAGGLE, embedding_dim=16, dense_arch_layer_sizes=[512, 256, 64, 16], over_arch_layer_sizes=[512, 256, 1]
    )
    shape = model_shape(module.hparams)  # the size is analytic: no need to build the tables
    ratio = quantized_model_bytes(shape, QATConfig(embedding_bits=4, mlp_bits=4)) / model_bytes(shape)
    assert ratio <= 0.126
    np.testing.assert_allclose(ratio, 0.125, atol=0.001)


@pytest.mark.parametrize("rows", [12, 400])
@pytest.mark.parametrize("mode", ["symmetric", "asymmetric"])
def test_exact_tracking_equals_a_full_refresh_after_every_step(mode, rows):
    module = qat_module(QATConfig(embedding_bits=4, scale_tracking="exact", embedding_mode=mode), rows=rows)
    quantizer = module.embedding_quantizer
    optimizer = module.configure_optimizers()
    full = QATConfig(embedding_bits=4, embedding_mode=mode, scale_refresh="full")  # every refresh a full pass
    reference = qat_module(full, rows=rows).embedding_quantizer
    for step in range(25):
        assert quantizer.maybe_refresh(step) == (step == 0)  # exact tracking: one full pass at the start only
        batch = random_batch(batch_size=8, rows=rows, seed=step)
        optimizer.zero_grad()
        module._loss(module(batch), batch).backward()
        optimizer.step()  # sparse rows were updated in backward (fused); dense here
        quantizer.track(batch.sparse_features)
        reference._tables, reference._ebc = quantizer._tables, quantizer._ebc
        reference.refresh()
        torch.testing.assert_close(quantizer.scale, reference.scale, rtol=0, atol=0)
        torch.testing.assert_close(quantizer.offset, reference.offset, rtol=0, atol=0)
    assert int(quantizer.refreshes) == 1


def test_top_rows_stays_exact_through_updates_pruning_and_rebuilds():
    from dqrm_lightning.quant.embedding import _TopRows

    torch.manual_seed(0)
    table = torch.randn(50, 3)
    top = _TopRows.scan(table, high=True, k=4)
    rebuilds = 0
    for _ in range(300):
        ids = torch.unique(torch.randint(0, 50, (6,)))
        table[ids] += torch.randn(len(ids), 3) * 0.5
        if not top.update(ids, table[ids].amax(dim=1)):
            top = _TopRows.scan(table, high=True, k=4)
            rebuilds += 1
        assert top.extreme() == float(table.max())
    assert rebuilds < 300  # most steps are answered from the kept rows

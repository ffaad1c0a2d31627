"""Where the tables go on 2 ranks, planned in this one process (no other process is started): the fixed table-wise
plan, TorchRec's planner under a layout's per-table constraints, and replicated tables."""

import pytest
import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from dqrm_lightning.model import DLRMModule
from dqrm_lightning.strategies.sharding import (
    CPUEmbeddingBagCollectionSharder,
    EmbeddingLayout,
    ensure_process_group,
    fused_table_wise_plan,
    replicate_embeddings,
    shard_model,
    sharding_planner,
)

ROWS = {"C1": 40, "C2": 60, "C3": 1000}


class TinySparse(nn.Module):
    """Three tables of D=8 on the meta device, under ``sparse`` (as the DLRM's ``sparse_arch``)."""

    def __init__(self) -> None:
        super().__init__()
        tables = [
            EmbeddingBagConfig(name=f"t_{feature}", embedding_dim=8, num_embeddings=rows, feature_names=[feature])
            for feature, rows in ROWS.items()
        ]
        self.sparse = EmbeddingBagCollection(tables=tables, device=torch.device("meta"))


def test_table_wise_plan_puts_each_table_whole_on_one_rank_round_robin():
    ensure_process_group()  # TorchRec reads the local size from it (in memory: no process, no network)
    plan = fused_table_wise_plan(TinySparse(), world_size=2).plan["sparse"]
    assert sorted(plan) == ["t_C1", "t_C2", "t_C3"]
    for table, rank in (("t_C1", 0), ("t_C2", 1), ("t_C3", 0)):
        placed = plan[table]
        assert (placed.sharding_type, placed.compute_kernel, placed.ranks) == ("table_wise", "fused", [rank])


def test_planner_follows_the_layout_table_by_table():
    layout = EmbeddingLayout(sharding={"C1": "row_wise", "t_C2": "data_parallel", "default": "table_wise"})
    model = TinySparse()
    planner = sharding_planner(model.sparse, layout, world_size=2, local_world_size=2, device_type="cpu")
    plan = planner.plan(model, [CPUEmbeddingBagCollectionSharder()]).plan["sparse"]
    assert plan["t_C1"].sharding_type == "row_wise"
    assert sorted(plan["t_C1"].ranks) == [0, 1]  # both ranks hold rows of C1
    assert (plan["t_C2"].sharding_type, plan["t_C2"].compute_kernel) == ("data_parallel", "dense")
    assert (plan["t_C3"].sharding_type, plan["t_C3"].compute_kernel) == ("table_wise", "fused")


def test_layout_names_a_sharding_type_per_feature_or_table():
    mixed = EmbeddingLayout(sharding={"C1": "row_wise", "t_C2": "column_wise", "default": "table_wise"})
    assert [mixed.sharding_type(f) for f in ROWS] == ["row_wise", "column_wise", "table_wise"]
    assert EmbeddingLayout(sharding={"C1": "row_wise"}).sharding_type("C2") is None  # the planner's choice
    assert EmbeddingLayout(sharding="auto").sharding_type("C1") is None
    assert EmbeddingLayout(sharding="column_wise").sharding_type("C3") == "column_wise"
    mixed.check_tables(list(ROWS))
    with pytest.raises(ValueError, match=r"`sharding` names unknown tables \['C9'\]"):
        EmbeddingLayout(sharding={"C9": "row_wise"}).check_tables(list(ROWS))


def test_cpu_sharder_offers_row_wise_placements():
    types = CPUEmbeddingBagCollectionSharder().sharding_types("cpu")
    assert {"table_wise", "row_wise", "table_row_wise"} <= set(types)


@pytest.mark.parametrize("sparse", [True, False])
def test_replicated_tables_are_materialised_on_every_rank(sparse):
    model = replicate_embeddings(TinySparse(), torch.device("cpu"), sparse=sparse)
    bags = model.sparse.embedding_bags
    assert {name: bag.weight.shape for name, bag in bags.items()} == {f"t_{f}": (rows, 8) for f, rows in ROWS.items()}
    assert all(bag.weight.device.type == "cpu" and bag.sparse is sparse for bag in bags.values())


def test_a_plan_with_row_wise_tables_refuses_a_codec_the_reduce_scatter_cannot_carry():
    module = DLRMModule([40] * 26, embedding_dim=8, dense_arch_layer_sizes=[16, 8], over_arch_layer_sizes=[8, 1])
    layout = EmbeddingLayout(sharding={"C5": "row_wise", "default": "table_wise"})
    with pytest.raises(ValueError, match=r"\['t_C5'\] row-wise.*fp8"):
        shard_model(module.build_dlrm(), torch.device("cpu"), None, layout, reduce_scatter_precision="fp8")
    assert shard_model(module.build_dlrm(), torch.device("cpu"), None, layout) is not None

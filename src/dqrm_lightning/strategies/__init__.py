"""Lightning strategies for the DLRM: TorchRec-sharded or replicated tables (``--trainer.strategy torchrec``)."""

from lightning.pytorch.strategies import StrategyRegistry

from dqrm_lightning.strategies.base import TorchRecStrategyBase
from dqrm_lightning.strategies.replicated import ReplicatedEmbeddingStrategy
from dqrm_lightning.strategies.sharded import ShardedEmbeddingStrategy
from dqrm_lightning.strategies.torchrec import TorchRecStrategy

if TorchRecStrategy.strategy_name not in StrategyRegistry:
    TorchRecStrategy.register_strategies(StrategyRegistry)

__all__ = ["ReplicatedEmbeddingStrategy", "ShardedEmbeddingStrategy", "TorchRecStrategy", "TorchRecStrategyBase"]

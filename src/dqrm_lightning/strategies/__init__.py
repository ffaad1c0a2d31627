"""Lightning strategies for TorchRec-sharded models."""

from lightning.pytorch.strategies import StrategyRegistry

from dqrm_lightning.strategies.torchrec import TorchRecStrategy

if TorchRecStrategy.strategy_name not in StrategyRegistry:
    TorchRecStrategy.register_strategies(StrategyRegistry)

__all__ = ["TorchRecStrategy"]

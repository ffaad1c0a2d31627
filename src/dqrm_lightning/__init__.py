"""dqrm_lightning: DQRM (Deep Quantized Recommendation Models) with PyTorch Lightning and TorchRec."""

from dqrm_lightning.data.datamodule import CriteoDataModule
from dqrm_lightning.model import DLRMModule

__version__ = "0.1.0"
__all__ = ["CriteoDataModule", "DLRMModule", "__version__"]

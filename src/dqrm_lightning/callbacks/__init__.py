from dqrm_lightning.callbacks.comm_accounting import CommunicationAccounting
from dqrm_lightning.callbacks.progress import LineProgress, TerminalProgress
from dqrm_lightning.callbacks.qat import QuantizationAwareTraining
from dqrm_lightning.callbacks.step_timer import StepTimer
from dqrm_lightning.callbacks.summary import RunSummary
from dqrm_lightning.callbacks.threads import ThreadPolicy

__all__ = [
    "CommunicationAccounting",
    "LineProgress",
    "QuantizationAwareTraining",
    "RunSummary",
    "StepTimer",
    "TerminalProgress",
    "ThreadPolicy",
]

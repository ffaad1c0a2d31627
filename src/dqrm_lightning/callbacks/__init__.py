from dqrm_lightning.callbacks.comm_accounting import CommunicationAccounting
from dqrm_lightning.callbacks.qat import QuantizationAwareTraining
from dqrm_lightning.callbacks.step_timer import StepTimer
from dqrm_lightning.callbacks.summary import RunSummary

__all__ = ["CommunicationAccounting", "QuantizationAwareTraining", "RunSummary", "StepTimer"]

from dqrm_lightning.callbacks.step_timer import StepTimer
from dqrm_lightning.callbacks.summary import RunSummary

__all__ = ["RunSummary", "StepTimer"]

"""Pairwise iterative registration: pyramid, stages, optimisers, stopping, callbacks.

The front door is :func:`itreg.api.register`; :func:`itreg.engine.registration.run` is the
engine behind it, for callers that prepare their own images and config.
"""

from itreg.engine.callbacks import (
                                    Callback,
                                    CallbackList,
                                    EarlyStopping,
                                    History,
                                    Progress,
                                    StepState,
                                    Stop,
)
from itreg.engine.config import (
                                    ConvergenceConfig,
                                    MetricConfig,
                                    RegistrationConfig,
                                    SamplingConfig,
                                    StageConfig,
                                    available_presets,
                                    config_from_toml,
                                    load_preset,
)
from itreg.engine.initialise import INITIALISERS, center_of_mass, initial_transforms
from itreg.engine.optimizers import OPTIMIZERS, STOP_REASONS, ConvergenceMonitor, get_optimizer
from itreg.engine.pyramid import ImagePyramid, Level, Pyramid, gaussian_kernel, smooth, smooth_image
from itreg.engine.registration import LevelRecord, RegistrationResult, run
from itreg.engine.stages import STAGE_TRANSFORMS, get_stage_transform

__all__ = [
                                    "INITIALISERS",
                                    "OPTIMIZERS",
                                    "STAGE_TRANSFORMS",
                                    "STOP_REASONS",
                                    "Callback",
                                    "CallbackList",
                                    "ConvergenceConfig",
                                    "ConvergenceMonitor",
                                    "EarlyStopping",
                                    "History",
                                    "ImagePyramid",
                                    "Level",
                                    "LevelRecord",
                                    "MetricConfig",
                                    "Progress",
                                    "Pyramid",
                                    "RegistrationConfig",
                                    "RegistrationResult",
                                    "SamplingConfig",
                                    "StageConfig",
                                    "StepState",
                                    "Stop",
                                    "available_presets",
                                    "center_of_mass",
                                    "config_from_toml",
                                    "gaussian_kernel",
                                    "get_optimizer",
                                    "get_stage_transform",
                                    "initial_transforms",
                                    "load_preset",
                                    "run",
                                    "smooth",
                                    "smooth_image",
]

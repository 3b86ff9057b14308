"""Neural networks of the learned metrics and the model-file format they share.

:mod:`itreg.nets.modelfile` writes and reads model files (configuration + weights, loaded with
``weights_only=True``) and rebuilds modules from them through a registry of model kinds.
:mod:`itreg.nets.critics` holds the critics of the neural MI/KL estimators (MINE, KLDivNet).
:mod:`itreg.nets.regnets` holds the registration networks (AffineNet, DeformNet, Cascade).
"""

from itreg.nets.modelfile import (
    FORMAT,
    VERSION,
    available_model_kinds,
    build_model,
    load_model,
    register_model_kind,
    save_model,
)
from itreg.nets.regnets import AffineNet, Cascade, DeformNet, load_regnet, save_regnet

__all__ = [
    "FORMAT",
    "VERSION",
    "AffineNet",
    "Cascade",
    "DeformNet",
    "available_model_kinds",
    "build_model",
    "load_model",
    "load_regnet",
    "register_model_kind",
    "save_model",
    "save_regnet",
]

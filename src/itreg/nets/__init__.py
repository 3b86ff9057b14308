"""Neural networks of the learned metrics and the model-file format they share.

:mod:`itreg.nets.modelfile` writes and reads model files (configuration + weights, loaded with
``weights_only=True``) and rebuilds modules from them through a registry of model kinds.
:mod:`itreg.nets.critics` holds the critics of the neural MI/KL estimators (MINE, KLDivNet).
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

__all__ = [
    "FORMAT",
    "VERSION",
    "available_model_kinds",
    "build_model",
    "load_model",
    "register_model_kind",
    "save_model",
]

"""Registration networks: they use metrics as losses, so they live above :mod:`itreg.metrics`.

:mod:`itreg.nets.regnets` holds AffineNet, DeformNet and their cascade (papers 001, 003, 004),
:mod:`itreg.nets.inference` registers a pair with a trained one (``register --net``),
:mod:`itreg.nets.dcc` the deep-combined-computing network of paper 002 (its group pieces in
:mod:`itreg.nets.dcc_group`) and
:mod:`itreg.nets.dcc_apply` its application to a group (``groupwise --net``). The model-file
format and the small networks of the learned metrics are building blocks below the metrics
(:mod:`itreg.blocks`); the model-file functions are re-exported here for convenience.
"""

from itreg.blocks.modelfile import (
    FORMAT,
    VERSION,
    available_model_kinds,
    build_model,
    load_model,
    register_model_kind,
    save_model,
)
from itreg.nets.dcc_apply import DCCResult, apply_dcc, save_dcc
from itreg.nets.regnets import AffineNet, Cascade, DeformNet, load_regnet, save_regnet

__all__ = [
    "FORMAT",
    "VERSION",
    "AffineNet",
    "Cascade",
    "DCCResult",
    "DeformNet",
    "apply_dcc",
    "available_model_kinds",
    "build_model",
    "load_model",
    "load_regnet",
    "register_model_kind",
    "save_dcc",
    "save_model",
    "save_regnet",
]

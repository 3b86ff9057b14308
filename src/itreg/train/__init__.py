"""Training of itreg's learned metrics and registration networks, all through one loop.

:mod:`itreg.train.loop` holds that loop, :func:`fit` (validation, early stopping, EMA, a second
optimiser's step for critics, resumable :class:`FitCheckpoint` files, NaN protection), and its
helpers; they are re-exported here. :class:`~itreg.train.config.TrainingConfig` holds the
settings every trainer shares (epochs, patience, batch size, seed, threads). Task-specific
training lives in submodules, each split into settings, data and loop where it is large:
:mod:`itreg.train.ditr` (DITR classifier, iterated maximum likelihood; ``ditr_config``,
``ditr_data``), :mod:`itreg.train.deepsim` (DeepSim feature extractors),
:mod:`itreg.train.critic` (MINE / KLDivNet critics on aligned pairs),
:mod:`itreg.train.regnet` (registration networks;
``regnet_config``, ``regnet_batches``, with the pair sources of :mod:`itreg.train.sources`) and
:mod:`itreg.train.dcc` (deep combined computing; ``dcc_data``, ``dcc_loss``).
"""

from __future__ import annotations

from itreg.train.loop import (
    EMA,
    FitCheckpoint,
    FitHooks,
    TrainingError,
    TrainResult,
    ValidationPatience,
    checkpoint_path,
    fit,
    make_generator,
    progress_bar,
    result_from_dict,
    seeded,
    state_copy,
)

__all__ = ["EMA", "FitCheckpoint", "FitHooks", "TrainResult", "TrainingError",
           "ValidationPatience", "checkpoint_path", "fit", "make_generator", "progress_bar",
           "result_from_dict", "seeded", "state_copy"]

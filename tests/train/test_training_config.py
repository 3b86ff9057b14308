"""The settings every trainer shares (:class:`itreg.train.config.TrainingConfig`): one set of
checks for all four trainer configurations, each with its own defaults."""

from __future__ import annotations

import dataclasses

import pytest

from itreg.errors import ConfigError
from itreg.train.config import TrainingConfig
from itreg.train.dcc import DCCTrainConfig
from itreg.train.deepsim import DeepSimTrainConfig
from itreg.train.ditr import DITRTrainConfig
from itreg.train.regnet import TrainNetConfig

CONFIGS = [TrainNetConfig, DITRTrainConfig, DeepSimTrainConfig, DCCTrainConfig]
SHARED = {f.name for f in dataclasses.fields(TrainingConfig)}


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
@pytest.mark.parametrize("name,value", [("epochs", -1), ("patience", -2), ("batch_size", 0),
                                        ("seed", 1.5), ("seed", True), ("threads", 0),
                                        ("epochs", 2.5)])
def test_shared_settings_are_checked_for_every_trainer(cls, name, value):
    with pytest.raises(ConfigError, match=name):
        cls(**{name: value})


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_every_trainer_config_has_the_shared_fields_in_its_plain_dict(cls):
    assert issubclass(cls, TrainingConfig)
    cfg = cls(seed=3, threads=1)
    d = cfg.to_dict()
    assert SHARED <= set(d) and (d["seed"], d["threads"]) == (3, 1)


def test_trainers_keep_their_own_defaults():
    assert (DITRTrainConfig().batch_size, DCCTrainConfig().batch_size,
            TrainNetConfig().batch_size) == (256, 20, 4)
    assert (DITRTrainConfig().epochs, DCCTrainConfig().epochs, TrainNetConfig().epochs) == \
        (20, 100, 50)

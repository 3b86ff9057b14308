"""Registration configs: presets, validation, dotted overrides."""

from __future__ import annotations

import json

import pytest

from itreg.api import available_presets, resolve_config
from itreg.engine.config import RegistrationConfig, StageConfig, config_from_toml, load_preset
from itreg.errors import ConfigError


def test_presets_ship_and_load():
    names = available_presets()
    assert set(names) >= {"rigid", "affine", "bspline", "dense", "svf"}
    expected = {"rigid": ["rigid"], "affine": ["rigid", "affine"],
                "bspline": ["rigid", "affine", "bspline"], "dense": ["affine", "dense"],
                "svf": ["affine", "svf"]}
    for name, stages in expected.items():
        config = load_preset(name)
        assert config.name == name
        assert [s.transform for s in config.stages] == stages
        assert all(s.metric.name == "mi" for s in config.stages)
    assert load_preset("bspline").stages[-1].regularisers == {"bending": 1.0}
    assert "diffusion" in load_preset("dense").stages[-1].regularisers


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(ConfigError, match="affine.*bspline"):
        load_preset("nope")


def test_round_trip_through_dict_and_json():
    config = load_preset("bspline")
    data = json.loads(json.dumps(config.to_dict()))
    assert RegistrationConfig.from_dict(data) == config


def test_configs_are_frozen_and_validated():
    stage = StageConfig(transform="rigid", shrink=[4, 2, 1], iterations=50)
    assert stage.iterations == (50, 50, 50)
    assert stage.smoothing_mm == (2.0, 1.0, 0.0)
    with pytest.raises(AttributeError):
        stage.transform = "affine"  # type: ignore[misc]
    with pytest.raises(ConfigError, match="valid transforms are"):
        StageConfig(transform="warp9")
    with pytest.raises(ConfigError, match="valid optimizers are: adam, gd, lbfgs, powell"):
        StageConfig(optimizer="sgd")
    with pytest.raises(ConfigError, match="2 values but the stage has 3 levels"):
        StageConfig(shrink=[4, 2, 1], iterations=[10, 20])
    with pytest.raises(ConfigError, match="learning_rate"):
        StageConfig(learning_rate=-1.0)
    with pytest.raises(ConfigError, match="linear but follows a non-linear"):
        RegistrationConfig(stages=(StageConfig(transform="bspline"), StageConfig()))
    with pytest.raises(ConfigError, match="regularisers apply to"):
        RegistrationConfig(stages=(StageConfig(transform="rigid",
                                               regularisers={"bending": 1.0}),))


def test_overrides_dotted_keys():
    config = load_preset("affine").with_overrides({
        "metric.bins": 64,                  # every stage
        "stages.1.iterations": [10, 20, 30],  # one stage
        "sampling.count": 1000,
        "min_overlap": 0.2,
    })
    assert all(s.metric.options == {"bins": 64} for s in config.stages)
    assert config.stages[1].iterations == (10, 20, 30)
    assert config.stages[0].iterations == load_preset("affine").stages[0].iterations
    assert all(s.sampling.count == 1000 for s in config.stages)
    assert config.min_overlap == 0.2


def test_overrides_reset_dependent_options():
    config = load_preset("affine").with_overrides({"metric": "ncc", "optimizer": "lbfgs"})
    assert all(s.metric.name == "ncc" and not s.metric.options for s in config.stages)
    assert all(s.optimizer == "lbfgs" and not s.optimizer_options for s in config.stages)


def test_overrides_new_number_of_levels():
    config = load_preset("rigid").with_overrides({"shrink": [8, 4, 2, 1],
                                                  "iterations": 5, "learning_rate": 1.0})
    stage = config.stages[0]
    assert stage.levels == 4 and stage.iterations == (5,) * 4
    assert stage.smoothing_mm == (4.0, 2.0, 1.0, 0.0)


def test_a_single_shrink_factor_keeps_the_presets_finest_per_level_values():
    # The README's DITR walkthrough: --set shrink=1 on the rigid preset, whose sample counts
    # are given per level (4096, 8192, 24576). As elastix, the finest level's value is kept.
    preset = load_preset("rigid")
    config = preset.with_overrides({"optimizer": "powell", "shrink": 1, "smoothing_mm": 0,
                                    "learning_rate": 1, "iterations": 30})
    for before, stage in zip(preset.stages, config.stages):
        assert stage.shrink == (1,) and stage.levels == 1
        assert stage.sampling.count_at(0) == before.sampling.count_at(before.levels - 1)
        assert stage.iterations == (30,) and stage.smoothing_mm == (0.0,)
    assert config.stages[-1].sampling.count_at(0) == 24576
    # Two levels keep the two finest values; per stage too.
    two = preset.with_overrides({"stages.0.shrink": [2, 1]}).stages[0]
    assert two.sampling.count == (8192, 24576)
    assert two.smoothing_mm == (1.0, 0.0)


def test_per_level_values_the_user_gives_must_match_the_new_shrink():
    with pytest.raises(ConfigError, match=r"'stages.0.sampling.count': has 3 values but the "
                                          r"stage has 1 levels"):
        load_preset("rigid").with_overrides({"shrink": 1, "sampling.count": [512, 1024, 2048]})
    with pytest.raises(ConfigError, match="has 2 values but the stage has 3 levels"):
        load_preset("rigid").with_overrides({"iterations": [10, 20]})


@pytest.mark.parametrize("overrides, message", [
    ({"foo": 1}, "unknown setting 'foo'; valid keys are: .*metric.bins"),
    ({"metric.binz": 3}, "does not take 'binz'; its settings are: bins"),
    ({"sampling.cnt": 3}, "valid keys of 'sampling' are: strategy, count"),
    ({"stages.7.iterations": 3}, "stage index 7 out of range"),
    ({"stages.x.iterations": 3}, "stages.<index>.<key>"),
    ({"sampling.count": -3}, "expected an integer >= 16"),
    ({"metric": "nope"}, "valid metrics are"),
    ({"transform": "bogus"}, "valid transforms are"),
    ({"iterations": [1, 2, 3, 4]}, "has 4 values but the stage has"),
    ({"convergence.window": 1}, "convergence.window"),
    ({"min_overlap": 2.0}, "min_overlap"),
])
def test_invalid_overrides_raise_config_error(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_preset("affine").with_overrides(overrides)


def test_resolve_config_from_names():
    assert [s.transform for s in resolve_config("bspline").stages] == [
        "rigid", "affine", "bspline"]
    assert [s.transform for s in resolve_config("translation").stages] == ["translation"]
    assert [s.transform for s in resolve_config().stages] == ["rigid", "affine"]
    config = resolve_config("similarity", "nmi", preset="rigid")
    assert config.stages[-1].transform == "similarity"
    assert config.stages[-1].metric.name == "nmi"
    with pytest.raises(ConfigError, match="valid transform or presets are"):
        resolve_config("wobble")


def test_config_from_toml_text(tmp_path):
    text = """
name = "mine"
[[stages]]
transform = "translation"
shrink = [2, 1]
iterations = 10
metric = { name = "ncc" }
"""
    config = config_from_toml(text)
    assert config.name == "mine" and config.stages[0].iterations == (10, 10)
    path = tmp_path / "mine.toml"
    path.write_text(text)
    assert resolve_config(preset=str(path)) == config
    with pytest.raises(ConfigError, match="invalid TOML"):
        config_from_toml("[[stages]\n")
    with pytest.raises(ConfigError, match="unknown setting"):
        config_from_toml("[[stages]]\nbins = 3\n")

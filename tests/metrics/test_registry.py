"""The metric registry and the input checks of the Metric base class."""

from __future__ import annotations

import pytest
import torch

from itreg.errors import ConfigError, GeometryError, MaskError
from itreg.metrics import Metric, available_metrics, get_metric, register_metric
from itreg.metrics import registry as registry_module

CLASSIC = ["joint-entropy", "lncc", "mi", "mi-gaussian", "mse", "ncc", "nmi"]


class _PathMetric(Metric):
    name = "dummy"
    quantity_name = "zero"

    def __init__(self, path: str, scale: float = 1.0) -> None:
        super().__init__()
        self.path = path
        self.scale = scale

    def loss(self, fixed, moving, mask, fixed_range, moving_range):
        return (fixed - moving).sum() * 0.0 * self.scale


@pytest.fixture
def clean_registry(monkeypatch):
    monkeypatch.setattr(registry_module, "_REGISTRY", dict(registry_module._REGISTRY))


def test_classic_metrics_are_registered():
    assert set(CLASSIC) <= set(available_metrics())
    assert available_metrics() == sorted(available_metrics())
    for name in CLASSIC:
        assert get_metric(name).name == name
    assert get_metric("  MI ").name == "mi"  # case and whitespace insensitive


def test_unknown_name_lists_valid_names():
    with pytest.raises(ConfigError) as err:
        get_metric("mutual-info")
    msg = str(err.value)
    assert "'mutual-info'" in msg
    for name in CLASSIC:
        assert name in msg
    with pytest.raises(ConfigError, match="valid metrics"):
        get_metric("nope:model.pt")


def test_unknown_and_invalid_settings():
    with pytest.raises(ConfigError, match="nbins"):
        get_metric("mi", nbins=32)
    with pytest.raises(ConfigError, match="bins"):
        get_metric("mi", bins=3)
    with pytest.raises(ConfigError, match="integer"):
        get_metric("nmi", bins=32.5)
    with pytest.raises(ConfigError, match="kernel"):
        get_metric("mi", kernel_moving="triangle")
    with pytest.raises(ConfigError, match="intensity"):
        get_metric("mi", intensity="zscore")
    with pytest.raises(ConfigError, match="window"):
        get_metric("lncc", window=4)
    with pytest.raises(ConfigError):
        get_metric("mse", bins=32)  # mse takes no settings


def test_prefix_path_dispatch(clean_registry):
    register_metric("dummy", _PathMetric)
    metric = get_metric("dummy:models/critic v2.pt", scale=2.0)
    assert isinstance(metric, _PathMetric)
    assert metric.path == "models/critic v2.pt" and metric.scale == 2.0
    assert get_metric("DUMMY:C:/x.pt").path == "C:/x.pt"  # only the first colon splits
    assert "dummy" in available_metrics()
    with pytest.raises(ConfigError, match="path"):
        get_metric("dummy:")
    with pytest.raises(ConfigError, match="path"):
        get_metric("dummy:a.pt", path="b.pt")
    with pytest.raises(ConfigError, match="path"):
        get_metric("dummy")  # the factory needs a path


def test_register_rules(clean_registry):
    with pytest.raises(ConfigError, match="already"):
        register_metric("mi", _PathMetric)
    register_metric("mi", _PathMetric, overwrite=True)
    for bad in ("", "a:b", "two words"):
        with pytest.raises(ConfigError):
            register_metric(bad, _PathMetric)
    register_metric("notametric", lambda: 42)
    with pytest.raises(ConfigError, match="not a Metric"):
        get_metric("notametric")


def test_input_checks():
    metric = get_metric("mi")
    f = torch.rand(1, 8, 8)
    with pytest.raises(GeometryError):
        metric(f, torch.rand(1, 8, 9))
    with pytest.raises(GeometryError):
        metric(torch.rand(8), torch.rand(8))
    with pytest.raises(GeometryError):
        get_metric("lncc")(torch.rand(1, 64), torch.rand(1, 64))  # needs a 2D/3D grid
    with pytest.raises(MaskError):
        metric(f, f, torch.ones(8, 7, dtype=torch.bool))
    with pytest.raises(MaskError):
        metric(f, f, torch.zeros(8, 8, dtype=torch.bool))
    with pytest.raises(MaskError):
        metric(f, f, torch.zeros(8, 8))
    with pytest.raises(MaskError):
        metric(f, f, -torch.ones(8, 8))

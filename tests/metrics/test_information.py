"""HistogramSettings: the one object that carries a histogram metric's bins, kernels and ranges."""

from __future__ import annotations

import math

import pytest
import torch

from itreg.errors import ConfigError
from itreg.metrics import get_metric
from itreg.metrics.classic import HistogramSettings as FromClassic
from itreg.metrics.information import HistogramSettings, _mi_of, mutual_information


def test_padding_follows_the_kernels_and_bad_bins_are_refused():
    assert HistogramSettings().padding == 2  # cubic B-spline moving kernel, as ITK
    assert HistogramSettings(kernel_moving="bspline0").padding == 0
    assert HistogramSettings(kernel_fixed="gaussian", sigma_bins=1.0).padding == 4
    with pytest.raises(ConfigError, match="bins must be an integer"):
        HistogramSettings(bins=7.5)
    with pytest.raises(ConfigError, match=r"bins=5 is too few.*bins >= 6"):
        HistogramSettings(bins=5)
    with pytest.raises(ConfigError):
        HistogramSettings(intensity="bogus")
    assert FromClassic is HistogramSettings  # importable where the MI family used to live


def test_box_kernels_give_ln2_for_two_equal_halves():
    x = torch.cat([torch.zeros(50), torch.ones(50)]).double()[None]
    settings = HistogramSettings(bins=4, kernel_fixed="bspline0", kernel_moving="bspline0",
                                 intensity="minmax")
    value = settings.checked(_mi_of, x, x, None, None, None)
    assert float(value) == pytest.approx(math.log(2), abs=1e-12)
    assert float(mutual_information(x, x, bins=4, kernel_fixed="bspline0",
                                    kernel_moving="bspline0", intensity="minmax")) == \
        pytest.approx(math.log(2), abs=1e-12)


def test_the_metric_module_and_its_functional_twin_agree():
    gen = torch.Generator().manual_seed(0)
    f = torch.rand(1, 20, 18, generator=gen, dtype=torch.float64)
    m = (f ** 2 + 0.1 * torch.rand(1, 20, 18, generator=gen, dtype=torch.float64))
    metric = get_metric("mi", bins=24)
    assert metric.histogram == HistogramSettings(bins=24)
    assert float(metric(f, m)) == pytest.approx(-float(mutual_information(f, m, bins=24)),
                                                rel=1e-12)

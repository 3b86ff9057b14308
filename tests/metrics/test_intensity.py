"""Intensity ranges, against numpy's percentiles."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from itreg.errors import ConfigError, InvalidImageError, MaskError
from itreg.metrics import intensity_range, rescale, robust_range


def test_robust_range_is_numpy_percentile():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 20, 30, generator=g, dtype=torch.float64) ** 3
    lo, hi = robust_range(x)
    ref = np.percentile(x.numpy(), [0.5, 99.5])  # linear interpolation, as torch.quantile
    np.testing.assert_allclose([lo, hi], ref, rtol=1e-12)
    assert isinstance(lo, float) and isinstance(hi, float)
    assert robust_range(x, percentiles=(0, 100)) == (float(x.min()), float(x.max()))


def test_robust_range_with_bool_and_float_masks():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(1, 16, 16, generator=g, dtype=torch.float64)
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask[4:10, 2:12] = True
    ref = np.percentile(x[0, 4:10, 2:12].numpy(), [2, 98])
    np.testing.assert_allclose(robust_range(x, mask, (2, 98)), ref, rtol=1e-12)
    np.testing.assert_allclose(robust_range(x, mask.double() * 0.3, (2, 98)), ref, rtol=1e-12)
    with pytest.raises(MaskError):
        robust_range(x, torch.zeros(16, 16, dtype=torch.bool))
    with pytest.raises(MaskError):
        robust_range(x, torch.ones(15, 16, dtype=torch.bool))


def test_robust_range_subsample_is_deterministic_and_close():
    g = torch.Generator().manual_seed(2)
    x = torch.rand(300_000, generator=g)
    a = robust_range(x, max_samples=10_000)
    assert a == robust_range(x, max_samples=10_000)
    np.testing.assert_allclose(a, np.percentile(x.numpy(), [0.5, 99.5]), atol=3e-3)


def test_degenerate_ranges(caplog):
    x = torch.zeros(1000)
    x[:3] = 1.0  # 99.5 % of the values are 0: the percentiles coincide
    with caplog.at_level(logging.WARNING, logger="itreg.metrics.intensity"):
        assert robust_range(x) == (0.0, 1.0)
    assert "coincide" in caplog.text
    with pytest.raises(InvalidImageError):
        robust_range(torch.full((10,), 3.0))
    x[5] = float("nan")
    assert robust_range(x, percentiles=(0, 100)) == (0.0, 1.0)  # non-finite values ignored


def test_intensity_modes_and_rescale():
    x = torch.linspace(-1, 3, 101)
    assert intensity_range(x, mode="minmax") == (-1.0, 3.0)
    assert intensity_range(x, mode="none") == (0.0, 1.0)
    lo, hi = intensity_range(x, mode="percentile", percentiles=(10, 90))
    assert lo == pytest.approx(-0.6) and hi == pytest.approx(2.6)
    with pytest.raises(ConfigError, match="percentile, minmax, none"):
        intensity_range(x, mode="zscore")
    with pytest.raises(ConfigError):
        intensity_range(x, percentiles=(50, 10))
    y = rescale(x, -1.0, 1.0)
    assert float(y.min()) == 0.0 and float(y.max()) == 1.0
    assert float(rescale(x, -1.0, 1.0, clamp=False).max()) == pytest.approx(2.0)

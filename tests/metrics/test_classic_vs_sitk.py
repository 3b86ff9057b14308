"""Histogram MI against SimpleITK (ITK 5.4) metrics on the same images.

Measured agreement (float64, 24^3 images, all voxels, identity transform):

- ``MattesMutualInformation`` vs ``MutualInformation(intensity="minmax")`` at 16/32/50/64 bins:
  relative difference ~1e-15 (tolerance asserted: 1e-12 in float64, 1e-5 for float32 inputs).
- ``JointHistogramMutualInformation`` with no smoothing (variance 0) vs our box-kernel MI with
  ITK's bin geometry: ~1e-15 (asserted 1e-12).
- ``JointHistogramMutualInformation`` with its default smoothing (variance 1.5 bins^2) vs
  ``gaussian_mutual_information(sigma_bins=sqrt(1.5))`` with the same bin width: 0.54 % at 32
  bins, 0.25 % at 50, 0.23 % at 64 (asserted 1 %). ITK bins by rounding and then smooths the
  table with a discrete Gaussian (zero-flux boundary), we apply the Gaussian Parzen window to
  each sample; the remaining difference is that discretisation and the boundary.

ITK's joint-histogram metric (5.4) sums ``p(i, j) ln(p(i, j) / (p_m(i) p_f(j)))``: its two
marginal arrays are filled from the opposite axes of the table (an ITK quirk), so its value is
MI only when the two marginals coincide. The smoothed comparison therefore uses a moving image
that is a circular shift of the fixed one (same intensities, hence same marginals), and one
test reproduces ITK's value for different marginals from our joint table.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from scipy.ndimage import gaussian_filter

from itreg.metrics import (
    MutualInformation,
    gaussian_mutual_information,
    get_metric,
    joint_probability,
    kernel_padding,
    mutual_information,
)

N = 24


@pytest.fixture(scope="module")
def pair() -> tuple[np.ndarray, np.ndarray]:
    """A smooth 3D random field and a nonlinear remap of it plus noise."""
    rng = np.random.default_rng(0)
    f = gaussian_filter(rng.standard_normal((N, N, N)), 3.0)
    f = (f - f.min()) / (f.max() - f.min())
    m = np.exp(2 * f) * np.sin(3 * f) + 0.05 * rng.standard_normal(f.shape)
    return f, m


def sitk_value(fixed: np.ndarray, moving: np.ndarray, set_metric) -> float:
    """``ImageRegistrationMethod.MetricEvaluate`` on all voxels with the identity transform."""
    reg = sitk.ImageRegistrationMethod()
    set_metric(reg)
    reg.SetMetricSamplingStrategy(reg.NONE)
    reg.SetInterpolator(sitk.sitkLinear)
    reg.SetInitialTransform(sitk.TranslationTransform(fixed.ndim))
    return reg.MetricEvaluate(sitk.GetImageFromArray(fixed), sitk.GetImageFromArray(moving))


@pytest.mark.parametrize("bins", [16, 32, 50, 64])
def test_mattes_mi_matches_sitk(pair, bins):
    f, m = pair
    itk = sitk_value(
        f, m, lambda r: r.SetMetricAsMattesMutualInformation(numberOfHistogramBins=bins)
    )
    ft, mt = torch.from_numpy(f)[None], torch.from_numpy(m)[None]
    metric = MutualInformation(bins=bins, intensity="minmax")
    loss = metric(ft, mt)  # ITK's value is -MI, like our loss
    assert abs(float(loss) - itk) <= 1e-12 * abs(itk)
    # The same with the ranges passed explicitly, and in float32.
    ranges = {"fixed_range": (f.min(), f.max()), "moving_range": (m.min(), m.max())}
    assert abs(float(get_metric("mi", bins=bins)(ft, mt, **ranges)) - itk) <= 1e-12 * abs(itk)
    loss32 = metric(ft.float(), mt.float())
    assert loss32.dtype == torch.float32
    assert abs(float(loss32) - itk) <= 1e-5 * abs(itk)


def _itk_box_ranges(f: np.ndarray, m: np.ndarray, bins: int):
    """ITK's joint-histogram bins as ranges of a padding-free box histogram of bins - 4 bins.

    ITK maps min..max onto bin centres 2..bins-3 (width (max - min) / (bins - 5)) and rounds;
    a box histogram over [min - w/2, max + w/2] with bins - 4 bins has the same edges.
    """
    wf = (f.max() - f.min()) / (bins - 5)
    wm = (m.max() - m.min()) / (bins - 5)
    return (f.min() - wf / 2, f.max() + wf / 2), (m.min() - wm / 2, m.max() + wm / 2)


@pytest.mark.parametrize("bins", [16, 32, 64])
def test_unsmoothed_joint_histogram_matches_sitk_for_any_marginals(pair, bins):
    f, m = pair
    itk = sitk_value(
        f,
        m,
        lambda r: r.SetMetricAsJointHistogramMutualInformation(
            numberOfHistogramBins=bins, varianceForJointPDFSmoothing=0.0
        ),
    )
    rf, rm = _itk_box_ranges(f, m, bins)
    p = joint_probability(
        torch.from_numpy(f)[None],
        torch.from_numpy(m)[None],
        bins=bins - 4,
        fixed_range=rf,
        moving_range=rm,
        kernel_fixed="bspline0",
        kernel_moving="bspline0",
    )[0].numpy()
    px, pm = p.sum(1), p.sum(0)
    denom = np.outer(pm, px)  # ITK's marginal arrays, filled from the opposite axes
    ok = (p > 0) & (denom > np.finfo(float).eps)
    itk_formula = (p[ok] * np.log(p[ok] / denom[ok])).sum()
    # ITK returns -value / ln 2 (bits).
    assert abs(-itk * math.log(2) - itk_formula) <= 1e-12 * abs(itk_formula)


@pytest.mark.parametrize("bins", [16, 32, 64])
def test_unsmoothed_joint_histogram_mi_matches_sitk(pair, bins):
    f, _ = pair
    m = np.roll(f, 1, axis=2)  # same intensities: ITK's value is the MI
    itk = sitk_value(
        f,
        m,
        lambda r: r.SetMetricAsJointHistogramMutualInformation(
            numberOfHistogramBins=bins, varianceForJointPDFSmoothing=0.0
        ),
    )
    rf, rm = _itk_box_ranges(f, m, bins)
    ours = mutual_information(
        torch.from_numpy(f)[None],
        torch.from_numpy(m)[None],
        bins=bins - 4,
        fixed_range=rf,
        moving_range=rm,
        kernel_fixed="bspline0",
        kernel_moving="bspline0",
    )
    itk_nats = -itk * math.log(2)
    assert abs(float(ours) - itk_nats) <= 1e-12 * itk_nats


@pytest.mark.parametrize("bins", [32, 50, 64])
def test_smoothed_joint_histogram_mi_close_to_sitk(pair, bins):
    f, _ = pair
    m = np.roll(f, 1, axis=2)
    itk = sitk_value(
        f,
        m,
        lambda r: r.SetMetricAsJointHistogramMutualInformation(
            numberOfHistogramBins=bins, varianceForJointPDFSmoothing=1.5
        ),
    )
    itk_nats = -itk * math.log(2)
    sigma = math.sqrt(1.5)
    pad = kernel_padding("gaussian", sigma)
    # Same bin width as ITK: (max - min) / (bins - 5) spans our bins - 2 * pad interior bins.
    ours = gaussian_mutual_information(
        torch.from_numpy(f)[None],
        torch.from_numpy(m)[None],
        bins=bins - 5 + 2 * pad,
        sigma_bins=sigma,
        intensity="minmax",
    )
    assert abs(float(ours) - itk_nats) <= 0.01 * itk_nats


@pytest.mark.parametrize("radius", [1, 2, 3])
@pytest.mark.parametrize("ndim", [2, 3])
def test_lncc_matches_sitk_ants_neighborhood_correlation(radius, ndim):
    """ITK's ANTS neighbourhood CC is -mean(local CC^2) over in-image windows: agreement ~1e-15."""
    rng = np.random.default_rng(radius + 10 * ndim)
    shape = (14,) * ndim
    f = gaussian_filter(rng.standard_normal(shape), 2.0)
    m = (
        np.tanh(3 * f)
        + 0.02 * rng.standard_normal(shape)
        + 0.5 * gaussian_filter(rng.standard_normal(shape), 2.0)
    )
    itk = sitk_value(f, m, lambda r: r.SetMetricAsANTSNeighborhoodCorrelation(radius))
    metric = get_metric("lncc", window=2 * radius + 1, eps_rel=0.0)
    loss = metric(torch.from_numpy(f)[None], torch.from_numpy(m)[None])
    assert abs(float(loss) - itk) <= 1e-12 * abs(itk)
    # The default damping (eps_rel=1e-6) changes the value by < 0.1 % on these images.
    default = get_metric("lncc", window=2 * radius + 1)(
        torch.from_numpy(f)[None], torch.from_numpy(m)[None]
    )
    assert abs(float(default) - itk) <= 1e-3 * abs(itk)


def test_ncc_and_mse_match_sitk(pair):
    f, m = pair
    ft, mt = torch.from_numpy(f)[None], torch.from_numpy(m)[None]
    # ITK's Correlation metric is -NCC^2; MeanSquares is the mean squared difference.
    itk_corr = sitk_value(f, m, lambda r: r.SetMetricAsCorrelation())
    ncc = -float(get_metric("ncc")(ft, mt))
    assert abs(-(ncc**2) - itk_corr) <= 1e-12 * abs(itk_corr)
    itk_ms = sitk_value(f, m, lambda r: r.SetMetricAsMeanSquares())
    assert abs(float(get_metric("mse")(ft, mt)) - itk_ms) <= 1e-12 * itk_ms

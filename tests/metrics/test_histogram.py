"""Parzen kernel-density code, against references it does not define.

References: scipy's B-spline basis elements, numpy.histogram / histogram2d, the analytic
Gaussian, and finite differences (gradcheck).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.interpolate import BSpline

from itreg.errors import ConfigError, InvalidImageError
from itreg.metrics import histogram as H
from itreg.metrics.histogram import (
    entropy,
    joint_histogram,
    kernel_padding,
    mutual_information_from_joint,
    parzen_histogram,
    parzen_weights,
    to_bin_coordinates,
)

B3 = BSpline.basis_element(np.arange(-2.0, 3.0), extrapolate=False)  # centred cubic B-spline
B0 = BSpline.basis_element(np.array([0.0, 1.0]), extrapolate=False)  # box on [0, 1)


def dense_reference(t: np.ndarray, bins: int, kernel: str, sigma: float = 1.0) -> np.ndarray:
    """Dense (P, bins) kernel matrix K(j - t) from scipy / the analytic Gaussian."""
    j = np.arange(bins)[None, :]
    u = j - t[:, None]
    if kernel == "bspline3":
        return np.nan_to_num(B3(u))
    if kernel == "bspline0":
        return np.nan_to_num(B0(-u))  # bin floor(t): 0 <= t - j < 1
    raise AssertionError(kernel)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.floats(1.0, 29.0), min_size=1, max_size=20))
def test_bspline3_taps_match_scipy_and_sum_to_one(ts):
    t = torch.tensor(ts, dtype=torch.float64)
    idx, w = parzen_weights(t, 32, "bspline3")
    assert idx.shape == (len(ts), 4)
    dense = np.zeros((len(ts), 32))
    np.add.at(
        dense, (np.repeat(np.arange(len(ts)), 4), idx.reshape(-1).numpy()), w.reshape(-1).numpy()
    )
    np.testing.assert_allclose(dense, dense_reference(np.array(ts), 32, "bspline3"), atol=1e-12)
    np.testing.assert_allclose(w.sum(1).numpy(), 1.0, atol=1e-12)
    assert (w >= 0).all()


def test_box_kernel_is_numpy_histogram():
    g = torch.Generator().manual_seed(0)
    v = torch.rand(5000, generator=g, dtype=torch.float64) * 7 - 2
    v[0], v[1] = -2.0, 5.0  # the ends of the range
    bins = 13
    t = to_bin_coordinates(v, -2.0, 5.0, bins, padding=0, closed_top=True)
    ours = parzen_histogram(t, bins, "bspline0").numpy()
    ref, _ = np.histogram(v.numpy(), bins=bins, range=(-2.0, 5.0))
    np.testing.assert_array_equal(ours, ref)


def test_gaussian_taps_are_a_normalised_truncated_gaussian():
    sigma = 1.3
    r = math.ceil(3 * sigma)
    t = torch.tensor([10.2, 10.5 - 1e-9, 10.5 + 1e-9, 14.7], dtype=torch.float64)
    idx, w = parzen_weights(t, 30, "gaussian", sigma_bins=sigma)
    assert idx.shape == (4, 2 * r + 1)
    np.testing.assert_allclose(w.sum(1).numpy(), 1.0, atol=1e-12)
    # Shape: proportional to exp(-u^2 / 2 sigma^2) minus the constant at the cut.
    u = (idx.double() - t[:, None]) / sigma
    cut = math.exp(-0.5 * ((r + 0.5) / sigma) ** 2)
    ref = np.clip(np.exp(-0.5 * u.numpy() ** 2) - cut, 0, None)
    ref /= ref.sum(1, keepdims=True)
    np.testing.assert_allclose(w.numpy(), ref, atol=1e-12)
    # Continuous across the rounding boundary 10.5 (the tap window moves by one bin there).
    h = [parzen_histogram(t[i : i + 1], 30, "gaussian", sigma) for i in (1, 2)]
    assert torch.allclose(h[0], h[1], atol=1e-8)


def test_all_taps_stay_inside_and_samples_keep_unit_mass():
    t = torch.tensor([-5.0, 0.0, 0.3, 31.9, 40.0], dtype=torch.float64)
    for kernel in ("bspline3", "bspline0", "gaussian"):
        idx, w = parzen_weights(t, 32, kernel)
        assert int(idx.min()) >= 0 and int(idx.max()) <= 31
        np.testing.assert_allclose(w.sum(1).numpy(), 1.0, atol=1e-12)


def test_to_bin_coordinates_itk_mattes_convention():
    v = torch.tensor([0.0, 10.0, 5.0, -3.0, 12.0], dtype=torch.float64)
    t = to_bin_coordinates(v, 0.0, 10.0, 50, padding=2)
    # ITK: bin size (max - min) / (bins - 2 padding); term = v / size - (min / size - padding).
    size = 10.0 / 46
    expected = np.clip(v.numpy() / size - (0.0 / size - 2), 2, 48)
    np.testing.assert_allclose(t.numpy(), expected, atol=1e-12)
    top = to_bin_coordinates(torch.tensor([10.0]), 0.0, 10.0, 50, padding=2, closed_top=True)
    assert math.floor(float(top)) == 47  # ITK folds the maximum into bin bins - 3
    with pytest.raises(InvalidImageError):
        to_bin_coordinates(v, 1.0, 1.0, 50)
    with pytest.raises(ConfigError):
        to_bin_coordinates(v, 0.0, 1.0, 4, padding=2)


def test_kernel_padding_and_unknown_kernel():
    assert kernel_padding("bspline3") == 2
    assert kernel_padding("bspline0") == 0
    assert kernel_padding("gaussian", 1.0) == 4
    with pytest.raises(ConfigError, match="bspline3"):
        parzen_weights(torch.zeros(3), 10, "triangle")
    with pytest.raises(ConfigError):
        parzen_weights(torch.zeros(3), 10, "gaussian", sigma_bins=0.0)
    with pytest.raises(ConfigError):
        parzen_weights(torch.zeros(3), 5, "gaussian", sigma_bins=1.0)  # needs 7 bins


def test_joint_histogram_matches_dense_reference_and_histogram2d():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(400, generator=g, dtype=torch.float64) * 20 + 2
    y = torch.rand(400, generator=g, dtype=torch.float64) * 16 + 2
    w = torch.rand(400, generator=g, dtype=torch.float64)
    p = joint_histogram(x, y, 24, 20, "bspline0", "bspline3", weights=w, normalize=False)
    kx = dense_reference(x.numpy(), 24, "bspline0")
    ky = dense_reference(y.numpy(), 20, "bspline3")
    ref = (kx * w.numpy()[:, None]).T @ ky
    np.testing.assert_allclose(p.numpy(), ref, atol=1e-10)
    # Box x box = numpy.histogram2d of the bin coordinates.
    p0 = joint_histogram(x, y, 24, 20, "bspline0", "bspline0", normalize=False)
    ref0, _, _ = np.histogram2d(x.numpy(), y.numpy(), bins=(24, 20), range=((0, 24), (0, 20)))
    np.testing.assert_array_equal(p0.numpy(), ref0)
    pn = joint_histogram(x, y, 24, 20)
    assert abs(float(pn.sum()) - 1.0) < 1e-12


def test_blocked_joint_histogram_equals_single_pass(monkeypatch):
    g = torch.Generator().manual_seed(2)
    x = torch.rand(20000, generator=g, dtype=torch.float64) * 20 + 5
    y = torch.rand(20000, generator=g, dtype=torch.float64) * 20 + 5
    w = torch.rand(20000, generator=g, dtype=torch.float64)
    one = joint_histogram(x, y, 30, 30, "gaussian", "gaussian", weights=w)
    monkeypatch.setattr(H, "_BLOCK_ENTRIES", 1 << 14)  # blocks of 4096 samples
    blocked = joint_histogram(x, y, 30, 30, "gaussian", "gaussian", weights=w)
    torch.testing.assert_close(one, blocked, rtol=1e-12, atol=1e-14)


def test_parzen_histogram_rows_are_weighted_histograms():
    g = torch.Generator().manual_seed(3)
    t = torch.rand(300, generator=g, dtype=torch.float64) * 12 + 2
    gamma = torch.softmax(torch.randn(300, 4, generator=g, dtype=torch.float64), dim=1)
    rows = parzen_histogram(t, 16, "bspline3", weights=gamma)
    assert rows.shape == (4, 16)
    for k in range(4):
        torch.testing.assert_close(
            rows[k], parzen_histogram(t, 16, "bspline3", weights=gamma[:, k])
        )
    ref = gamma.numpy().T @ dense_reference(t.numpy(), 16, "bspline3")
    np.testing.assert_allclose(rows.numpy(), ref, atol=1e-12)
    # The rows together hold all the mass: sum over rows = the unweighted histogram.
    torch.testing.assert_close(rows.sum(0), parzen_histogram(t, 16, "bspline3"))


def test_histogram_gradient_is_the_kernel_derivative():
    t = torch.tensor([5.3, 7.8, 11.05, 8.2], dtype=torch.float64, requires_grad=True)
    w = torch.tensor([1.0, 0.5, 2.0, 1.5], dtype=torch.float64, requires_grad=True)
    for kernel in ("bspline3", "gaussian"):
        assert torch.autograd.gradcheck(
            lambda a, b, k=kernel: parzen_histogram(a, 18, k, 1.2, b), (t, w)
        )
    y = torch.tensor([4.2, 9.9, 6.6, 12.1], dtype=torch.float64, requires_grad=True)
    xs = torch.tensor([3.0, 5.5, 8.2, 10.9], dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda b: joint_histogram(xs, b, 16, 18), (y,))


def test_entropy_and_mi_of_known_tables():
    p = torch.tensor([[0.25, 0.0], [0.0, 0.75]], dtype=torch.float64, requires_grad=True)
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    mi, hx, hy, hxy = mutual_information_from_joint(p)
    for v in (mi, hx, hy, hxy):
        assert abs(float(v.detach()) - h) < 1e-12
    (g,) = torch.autograd.grad(entropy(p), p)
    assert torch.isfinite(g).all()  # 0 ln 0 has a finite gradient
    q = torch.full((3, 4), 1 / 12, dtype=torch.float64)
    assert abs(float(mutual_information_from_joint(q)[0])) < 1e-12
    assert abs(float(entropy(q)) - math.log(12)) < 1e-12

"""Classic metrics against closed forms, invariances, paper 000 (Eq. 3) and finite differences."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.ndimage import gaussian_filter

from itreg.metrics import (
    GaussianMutualInformation,
    JointEntropy,
    LocalNormalizedCrossCorrelation,
    MeanSquaredError,
    MutualInformation,
    NormalizedCrossCorrelation,
    NormalizedMutualInformation,
    get_metric,
    joint_entropy,
    lncc,
    mse,
    mutual_information,
    ncc,
    normalized_mutual_information,
)

BOX = {"kernel_fixed": "bspline0", "kernel_moving": "bspline0"}


def smooth_field(shape, seed, sigma=2.0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(gaussian_filter(rng.standard_normal(shape), sigma))


# ------------------------------------------------------------------------------------------
# Closed forms
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rho", [0.6, 0.8, 0.9])
def test_mi_of_correlated_gaussians(rho):
    """MI of a bivariate normal is -ln(1 - rho^2) / 2; 200k samples, 64 bins: within 3 %."""
    g = torch.Generator().manual_seed(0)
    n = 200_000
    x = torch.randn(n, generator=g, dtype=torch.float64)
    y = rho * x + math.sqrt(1 - rho**2) * torch.randn(n, generator=g, dtype=torch.float64)
    true = -0.5 * math.log(1 - rho**2)
    mi = float(mutual_information(x[None], y[None], bins=64))
    assert abs(mi - true) <= 0.03 * true
    assert (
        float(mutual_information(x[None], torch.randn(n, generator=g)[None].double(), bins=64))
        < 0.01
    )


def test_nmi_of_identical_images_is_two():
    f = smooth_field((40, 40), 1)
    q = torch.round(f * 4)  # a few levels, each in its own bin
    assert float(normalized_mutual_information(q[None], q[None], bins=64, **BOX)) == pytest.approx(
        2.0, abs=1e-12
    )
    assert float(normalized_mutual_information(f[None], f[None], bins=256, **BOX)) == pytest.approx(
        2.0, abs=1e-12
    )
    # The smooth moving kernel spreads the joint histogram: below 2, still above a misaligned pair.
    nmi = float(normalized_mutual_information(f[None], f[None], bins=64))
    shifted = float(normalized_mutual_information(f[None], torch.roll(f, 3, 0)[None], bins=64))
    assert 1.5 < nmi < 2.0 and shifted < nmi


def test_joint_entropy_of_image_with_itself_is_marginal_entropy():
    f = smooth_field((30, 30), 2)
    bins = 40
    h = float(joint_entropy(f[None], f[None], bins=bins, intensity="minmax", **BOX))
    counts, _ = np.histogram(f.numpy(), bins=bins, range=(float(f.min()), float(f.max())))
    p = counts[counts > 0] / counts.sum()
    assert h == pytest.approx(-(p * np.log(p)).sum(), abs=1e-12)


# ------------------------------------------------------------------------------------------
# Invariances (hypothesis)
# ------------------------------------------------------------------------------------------

IMAGE_F = smooth_field((20, 20), 3)
IMAGE_M = torch.tanh(2 * IMAGE_F) + 0.3 * smooth_field((20, 20), 4)


@settings(max_examples=25, deadline=None)
@given(
    a=st.floats(0.05, 20.0) | st.floats(-20.0, -0.05),
    b=st.floats(-100.0, 100.0),
    c=st.floats(0.05, 20.0),
    d=st.floats(-100.0, 100.0),
    intensity=st.sampled_from(["percentile", "minmax"]),
)
def test_mi_invariant_to_affine_intensity_maps(a, b, c, d, intensity):
    ref = float(mutual_information(IMAGE_F[None], IMAGE_M[None], intensity=intensity))
    got = float(
        mutual_information((c * IMAGE_F + d)[None], (a * IMAGE_M + b)[None], intensity=intensity)
    )
    assert got == pytest.approx(ref, rel=1e-7, abs=1e-9)


@settings(max_examples=25, deadline=None)
@given(
    levels_f=st.lists(st.floats(1.0, 3.0), min_size=4, max_size=4),
    levels_m=st.lists(st.floats(1.0, 3.0), min_size=5, max_size=5),
    seed=st.integers(0, 1000),
)
def test_mi_invariant_to_monotone_remaps_when_bins_resolve_the_levels(levels_f, levels_m, seed):
    """Any increasing remap of label-like images leaves the box-kernel MI unchanged."""
    g = torch.Generator().manual_seed(seed)
    lf = torch.randint(0, 4, (400,), generator=g)
    lm = (lf + torch.randint(0, 2, (400,), generator=g)).clamp(max=4)  # dependent labels
    # Arbitrary increasing maps of the labels: level k -> sum of k + 1 increments in [1, 3].
    vf = torch.cumsum(torch.tensor(levels_f, dtype=torch.float64), 0)[lf]
    vm = -1.0 / torch.cumsum(torch.tensor(levels_m, dtype=torch.float64), 0)[lm]
    # Gaps between levels are at least 2.5 % of the range: more than one of the 64 bins.
    kw = dict(bins=64, intensity="minmax", **BOX)
    ref = float(mutual_information(lf[None].double(), lm[None].double(), **kw))
    assert float(mutual_information(vf[None], vm[None], **kw)) == pytest.approx(ref, abs=1e-12)


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), kernel=st.sampled_from(["bspline0", "bspline3", "gaussian"]))
def test_mi_symmetric_for_symmetric_kernels(seed, kernel):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(1, 500, generator=g, dtype=torch.float64)
    y = x**2 + 0.2 * torch.rand(1, 500, generator=g, dtype=torch.float64)
    kw = {"bins": 24, "kernel_fixed": kernel, "kernel_moving": kernel}
    assert float(mutual_information(x, y, **kw)) == pytest.approx(
        float(mutual_information(y, x, **kw)), abs=1e-12
    )
    # Mattes' mixed kernels are nearly symmetric.
    a, b = float(mutual_information(x, y)), float(mutual_information(y, x))
    assert a == pytest.approx(b, rel=0.15)


# ------------------------------------------------------------------------------------------
# Paper 000 (DITR), Sec. 2.1, Eq. 3: maximum profile likelihood == minimum joint entropy
# ------------------------------------------------------------------------------------------


def test_max_profile_likelihood_is_min_joint_entropy():
    """Categorical model on joint bins: max_theta sum_i ln theta_j(i) = -N H(N_j / N).

    For each integer shift of the moving window, theta_hat_j = N_j / N (counts by numpy's
    histogram2d) maximises the log-likelihood (checked against random Dirichlet thetas), its
    value is -N times the joint entropy, and JointEntropy with box kernels on the same bins
    gives that entropy, so both pick the same (true) shift.
    """
    rng = np.random.default_rng(5)
    size, crop, bins = 48, 32, 12
    base = gaussian_filter(rng.standard_normal((size, size)), 2.5)
    true_shift = (2, -1)
    fixed = base
    moving = np.roll(np.cos(3 * base), true_shift, axis=(0, 1)) + 0.05 * rng.standard_normal(
        base.shape
    )
    lo_f, hi_f = fixed.min(), fixed.max()
    lo_m, hi_m = moving.min(), moving.max()
    o = (size - crop) // 2
    f_crop = fixed[o : o + crop, o : o + crop]
    metric = JointEntropy(bins=bins, **BOX)
    n = crop * crop
    loglik, entropies = {}, {}
    for dy in range(-3, 4):
        for dx in range(-3, 4):
            m_crop = moving[o + dy : o + dy + crop, o + dx : o + dx + crop]
            counts, _, _ = np.histogram2d(
                f_crop.ravel(), m_crop.ravel(), bins=bins, range=((lo_f, hi_f), (lo_m, hi_m))
            )
            nj = counts.ravel()
            assert nj.sum() == n
            theta_hat = nj / n
            ll = float((nj[nj > 0] * np.log(theta_hat[nj > 0])).sum())
            for theta in rng.dirichlet(np.ones(nj.size), size=20):
                assert (nj * np.log(theta)).sum() <= ll
            h = float(
                metric(
                    torch.from_numpy(f_crop)[None],
                    torch.from_numpy(m_crop)[None],
                    fixed_range=(lo_f, hi_f),
                    moving_range=(lo_m, hi_m),
                )
            )
            assert ll == pytest.approx(-n * h, rel=1e-12)
            loglik[(dy, dx)], entropies[(dy, dx)] = ll, h
    best_ll = max(loglik, key=loglik.get)
    assert best_ll == min(entropies, key=entropies.get) == true_shift


# ------------------------------------------------------------------------------------------
# Gradients
# ------------------------------------------------------------------------------------------

RANGES = {"fixed_range": (-3.0, 3.0), "moving_range": (-3.0, 3.0)}


@pytest.mark.parametrize(
    "metric",
    [
        MeanSquaredError(),
        NormalizedCrossCorrelation(),
        LocalNormalizedCrossCorrelation(window=3),
        MutualInformation(bins=8),
        MutualInformation(bins=10, kernel_fixed="bspline3"),
        GaussianMutualInformation(bins=14, sigma_bins=0.8),
        NormalizedMutualInformation(bins=8),
        JointEntropy(bins=8),
    ],
    ids=lambda m: m.name,
)
@pytest.mark.parametrize("shape", [(1, 5, 6), (1, 3, 4, 4)])
def test_gradcheck_wrt_moving(metric, shape):
    g = torch.Generator().manual_seed(7)
    fixed = torch.rand(shape, generator=g, dtype=torch.float64) * 4 - 2
    moving = (fixed**2 - 1 + 0.3 * torch.randn(shape, generator=g, dtype=torch.float64)).clamp(
        -2.5, 2.5
    )
    moving.requires_grad_(True)
    weights = torch.rand(shape[1:], generator=g, dtype=torch.float64) + 0.1
    assert torch.autograd.gradcheck(lambda m: metric(fixed, m, **RANGES), (moving,))
    assert torch.autograd.gradcheck(lambda m: metric(fixed, m, weights, **RANGES), (moving,))


# ------------------------------------------------------------------------------------------
# Masks, channels, dtype, signs
# ------------------------------------------------------------------------------------------

POINTWISE = ["mse", "ncc", "mi", "mi-gaussian", "nmi", "joint-entropy"]


@pytest.mark.parametrize("name", POINTWISE)
def test_mask_equals_crop(name):
    f = smooth_field((10, 20, 18), 8)
    m = torch.exp(f) + 0.1 * smooth_field((10, 20, 18), 9)
    mask = torch.zeros(10, 20, 18, dtype=torch.bool)
    region = (slice(2, 8), slice(3, 17), slice(1, 15))
    mask[region] = True
    metric = get_metric(name)
    cropped = metric(f[region][None], m[region][None])
    assert float(metric(f[None], m[None], mask)) == pytest.approx(
        float(cropped), rel=1e-12, abs=1e-14
    )
    # A 0/1 float mask is the same selection, as is a flat sample (C, P).
    assert float(metric(f[None], m[None], mask.double())) == pytest.approx(
        float(cropped), rel=1e-12, abs=1e-14
    )
    flat = metric(f[region].reshape(1, -1), m[region].reshape(1, -1))
    assert float(flat) == pytest.approx(float(cropped), rel=1e-12, abs=1e-14)


def test_lncc_mask_averages_the_local_cc_map():
    f = smooth_field((12, 12), 10)
    m = torch.sin(2 * f)
    mask = torch.zeros(12, 12, dtype=torch.bool)
    mask[3:9, 2:10] = True
    full = lncc(f[None], m[None], window=5)
    inside = lncc(f[None], m[None], mask, window=5)
    outside = lncc(f[None], m[None], ~mask, window=5)
    n_in = int(mask.sum())
    assert float(full) == pytest.approx(
        (n_in * float(inside) + (144 - n_in) * float(outside)) / 144, rel=1e-12
    )


def test_channels_are_averaged():
    f = torch.stack([smooth_field((16, 16), 11), smooth_field((16, 16), 12)])
    m = torch.stack([f[0] ** 3, torch.cos(f[1])])
    for name in POINTWISE + ["lncc"]:
        metric = get_metric(name)
        both = float(metric(f, m))
        each = [float(metric(f[i : i + 1], m[i : i + 1])) for i in range(2)]
        # Per-channel ranges differ from the joint range for the histogram metrics.
        if metric.uses_intensity_range:
            r = [metric.intensity_range(f), metric.intensity_range(m)]
            both = float(metric(f, m, fixed_range=r[0], moving_range=r[1]))
            each = [
                float(metric(f[i : i + 1], m[i : i + 1], fixed_range=r[0], moving_range=r[1]))
                for i in range(2)
            ]
        assert both == pytest.approx(sum(each) / 2, rel=1e-12)


def test_signs_quantities_and_functional_twins():
    f = smooth_field((16, 16), 13).float()
    m = torch.exp(f)
    pairs = [
        ("mse", mse(f[None], m[None]), 1.0),
        ("ncc", ncc(f[None], m[None]), -1.0),
        ("lncc", lncc(f[None], m[None]), -1.0),
        ("mi", mutual_information(f[None], m[None]), -1.0),
        ("nmi", normalized_mutual_information(f[None], m[None]), -1.0),
        ("joint-entropy", joint_entropy(f[None], m[None]), 1.0),
    ]
    for name, value, sign in pairs:
        metric = get_metric(name)
        loss = metric(f[None], m[None])
        assert loss.dim() == 0 and loss.dtype == torch.float32
        assert float(metric.quantity(loss)) == pytest.approx(float(value), rel=1e-6)
        assert float(loss) == pytest.approx(sign * float(value), rel=1e-6)
        assert metric.quantity_name
        cfg = metric.config()
        assert cfg["name"] == name
    # Better alignment, lower loss (MI family, NCC, LNCC).
    for name in ["ncc", "lncc", "mi", "mi-gaussian", "nmi", "joint-entropy"]:
        metric = get_metric(name)
        assert float(metric(f[None], m[None])) < float(
            metric(f[None], torch.roll(m, 4, 1)[None])
        ), name


def test_mi_config_records_the_intensity_setting():
    metric = get_metric("mi", bins=50, intensity="minmax")
    assert metric.config() == {
        "name": "mi",
        "bins": 50,
        "padding": 2,
        "kernel_fixed": "bspline0",
        "kernel_moving": "bspline3",
        "intensity": "minmax",
        "percentiles": [0.5, 99.5],
        "quantity": "MI (nats)",
    }
    assert get_metric("mse").intensity_range(torch.rand(5)) is None
    assert metric.intensity_range(torch.arange(5.0)) == (0.0, 4.0)


def test_integer_inputs_become_float():
    a = torch.randint(0, 5, (1, 8, 8))
    b = (a * 2).to(torch.int16)
    assert get_metric("mi")(a, b).dtype == torch.get_default_dtype()

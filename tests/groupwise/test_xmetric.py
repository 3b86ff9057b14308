"""X-metric (Eq. 8), KDE appearance model (Eqs. 20-21) and EM updates (Eqs. 12, 14, 22)."""

from __future__ import annotations

import math

import pytest
import torch

from itreg.errors import ConfigError
from itreg.groupwise.em import (
    check_classes,
    e_step,
    init_common_space,
    log_mixture_likelihood,
    update_proportions,
)
from itreg.groupwise.xmetric import (
    PADDING,
    XMetric,
    appearance_model,
    bin_coordinates,
    class_log_likelihood,
    x_metric,
)
from itreg.metrics.histogram import joint_histogram, mutual_information_from_joint


# ------------------------------------------------------------------------------------ EM
def test_e_step_matches_bayes_posterior_of_a_two_class_mixture():
    # Two images, two classes, densities known in closed form at three points.
    f = torch.tensor([[[0.7, 0.2], [0.1, 0.5], [0.2, 0.3]],  # image 0: f_0k at x=0,1,2
                      [[0.6, 0.1], [0.3, 0.3], [0.1, 0.6]]], dtype=torch.float64)
    pi = torch.tensor([0.25, 0.75], dtype=torch.float64)
    log_lik = torch.log(f).sum(dim=0)  # (P, K)
    expected = pi * f.prod(dim=0)
    expected = expected / expected.sum(dim=1, keepdim=True)
    gamma = e_step(log_lik, pi, eps=0.0)
    torch.testing.assert_close(gamma, expected)
    # Clamped as the authors' code: [eps, 1 - (K - 1) eps], no renormalisation.
    sharp = e_step(torch.tensor([[0.0, -50.0]], dtype=torch.float64), pi, eps=1e-3)
    torch.testing.assert_close(sharp, torch.tensor([[1 - 1e-3, 1e-3]], dtype=torch.float64))
    # The mixture log-likelihood (Eq. 23 summand) is log sum_k pi_k prod_j f_jk.
    torch.testing.assert_close(log_mixture_likelihood(log_lik, pi),
                               torch.log((pi * f.prod(dim=0)).sum(dim=1)))


def test_em_recovers_known_posteriors_and_proportions_of_a_separable_mixture():
    # Image intensities drawn from two well separated classes with proportions 0.3 / 0.7.
    gen = torch.Generator().manual_seed(0)
    labels = (torch.rand(4000, generator=gen) < 0.7).long()
    means = torch.tensor([[0.0, 3.0], [2.0, -1.0]])  # (N, K)
    values = means[:, labels] + 0.2 * torch.randn(2, 4000, generator=gen)
    coords = bin_coordinates(values, None, 32)
    gamma, pi = init_common_space(4000, 2, torch.Generator().manual_seed(1), torch.float64)
    for _ in range(30):
        f = appearance_model(coords, gamma.to(coords.dtype), 32 + 2 * PADDING)
        gamma = e_step(class_log_likelihood(coords, f).double(), pi)
        pi = update_proportions(gamma)
    hard = gamma.argmax(dim=1)
    agree = max(float((hard == labels).double().mean()), float((hard != labels).double().mean()))
    assert agree > 0.99
    assert sorted(pi.tolist()) == pytest.approx([0.3, 0.7], abs=0.03)


def test_init_is_eq22_and_seeded():
    g1, pi = init_common_space(100, 5, torch.Generator().manual_seed(3))
    g2, _ = init_common_space(100, 5, torch.Generator().manual_seed(3))
    torch.testing.assert_close(g1, g2)
    torch.testing.assert_close(g1.sum(dim=1), torch.ones(100))
    torch.testing.assert_close(pi, torch.full((5,), 0.2))
    assert float(g1.std()) > 0.05  # random, not uniform


def test_update_proportions_is_mean_over_overlap():
    gamma = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]])
    mask = torch.tensor([True, True, False])
    torch.testing.assert_close(update_proportions(gamma, mask), torch.tensor([0.55, 0.45]))


@pytest.mark.parametrize("k", [1, 0, -3, 2.5, "4", True])
def test_bad_class_counts_are_config_errors(k):
    with pytest.raises(ConfigError):
        check_classes(k)


# ------------------------------------------------------------------------------------ metric
def test_x_metric_is_sum_of_image_class_mutual_informations():
    gen = torch.Generator().manual_seed(0)
    values = torch.randn(3, 500, generator=gen, dtype=torch.float64)
    gamma = torch.softmax(torch.randn(500, 4, generator=gen, dtype=torch.float64), dim=1)
    coords = bin_coordinates(values, None, 16)
    total, per_image = x_metric(coords, gamma, 16 + 2 * PADDING)
    assert float(total) == pytest.approx(float(per_image.sum()))
    # Against an independent route: a joint histogram of (class, intensity) with one-hot rows
    # weighted by gamma.
    for j in range(3):
        p = torch.zeros(4, 20, dtype=torch.float64)
        for k in range(4):
            p[k] = joint_histogram(torch.zeros(500, dtype=torch.float64), coords[j], 1, 20,
                                   kernel_x="bspline0", kernel_y="bspline3",
                                   weights=gamma[:, k], normalize=False)[0]
        mi = mutual_information_from_joint(p / p.sum())[0]
        assert float(per_image[j]) == pytest.approx(float(mi), rel=1e-9)


def test_x_metric_of_deterministic_images_is_n_times_class_entropy():
    # Hard classes that determine the intensities: I(U_j, Z) = H(Z) for every image.
    labels = torch.arange(400) % 4
    gamma = torch.nn.functional.one_hot(labels, 4).double()
    values = torch.stack([torch.tensor([0.0, 1.0, 2.0, 3.0])[labels],
                          torch.tensor([3.0, 0.0, 2.0, 1.0])[labels]]).double()
    coords = bin_coordinates(values, None, 60)  # levels 20 bins apart: kernels do not overlap
    total, _ = x_metric(coords, gamma, 64)
    assert float(total) == pytest.approx(2 * math.log(4), rel=1e-9)


def _piecewise_group(seed=0):
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 4, (3000,), generator=gen)
    levels = torch.tensor([[0.0, 1.0, 2.0, 3.0], [2.0, 0.0, 3.0, 1.0], [1.0, 3.0, 0.0, 2.0]])
    values = levels.gather(1, labels.expand(3, -1))
    return values.double(), labels


@pytest.mark.parametrize("remap", ["permutation", "affine"])
def test_x_coreg_objective_is_invariant_to_a_bijective_remapping_of_one_image(remap):
    values, _ = _piecewise_group()
    other = values.clone()
    if remap == "permutation":  # a non-monotone bijection of the intensity levels
        table = torch.tensor([3.0, 0.0, 2.0, 1.0], dtype=torch.float64)
        other[1] = table[values[1].long()]
    else:  # a decreasing affine bijection
        other[1] = -7.5 * values[1] + 40.0
    overlap = torch.ones(values.shape[1], dtype=torch.bool)
    results = []
    for vals in (values, other):
        # The Eq. 22 start (the k-means start measures Euclidean intensity distances, which a
        # remapping changes; the metric given Gamma is invariant either way).
        obj = XMetric(k=4, levels=60, sample_rate=0.5, init="random")
        obj.reset(3, None, torch.Generator().manual_seed(5), torch.float64, None)
        from itreg.grid import Grid

        obj.start_level(Grid((3000, 1)))
        losses = []
        for _ in range(5):
            obj.update(vals, overlap)
            losses.append(float(obj.evaluate(vals, overlap)[0]))
        results.append((losses, obj.gamma.clone()))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-9, abs=1e-12)
    torch.testing.assert_close(results[0][1], results[1][1])


def test_x_metric_gradient_flows_to_intensities():
    values, _ = _piecewise_group()
    values = (values + 0.05 * torch.randn(values.shape, generator=torch.Generator().manual_seed(0),
                                          dtype=torch.float64)).requires_grad_(True)
    gamma = torch.softmax(torch.randn(values.shape[1], 4, dtype=torch.float64), dim=1)
    coords = bin_coordinates(values, None, 32)
    total, _ = x_metric(coords, gamma, 36)
    total.backward()
    assert values.grad is not None and float(values.grad.abs().sum()) > 0


def test_warmup_runs_extra_em_updates_only_at_the_first_step():
    from itreg.grid import Grid

    values, _ = _piecewise_group()
    overlap = torch.ones(values.shape[1], dtype=torch.bool)
    obj = XMetric(k=4, levels=60, warmup=3)
    obj.reset(3, None, torch.Generator().manual_seed(0), torch.float64, None)
    obj.start_level(Grid((3000, 1)))
    obj.update(values, overlap)
    assert obj._updates == 4
    obj.update(values, overlap)
    assert obj._updates == 5
    with pytest.raises(ConfigError):
        XMetric(warmup=-1)


def test_kmeans_start_separates_three_intensity_clusters():
    from itreg.grid import Grid

    # Three classes with distinct intensity vectors over 3 images, 100/200/300 points.
    gen = torch.Generator().manual_seed(1)
    centers = torch.tensor([[0.0, 5.0, 2.0], [3.0, 0.0, 6.0], [6.0, 3.0, 0.0]],
                           dtype=torch.float64)
    truth = torch.cat([torch.full((c,), i) for i, c in enumerate((100, 200, 300))])
    values = (centers[truth] + 0.1 * torch.randn(600, 3, generator=gen,
                                                 dtype=torch.float64)).T
    overlap = torch.ones(600, dtype=torch.bool)
    overlap[:10] = False  # outside the overlap: left at the Eq. 22 start
    obj = XMetric(k=3, levels=32, init="kmeans")
    obj.reset(3, None, torch.Generator().manual_seed(0), torch.float64, None)
    obj.start_level(Grid((600, 1)))
    before = obj.gamma[:10].clone()
    obj._kmeans_start(values, overlap)
    hard = obj.gamma.argmax(dim=1)
    # The clusters are the classes up to a permutation.
    for i in range(3):
        sel = (truth == i) & overlap
        assert len(torch.unique(hard[sel])) == 1
    assert len(torch.unique(hard[overlap])) == 3
    counts = torch.tensor([90.0, 200.0, 300.0], dtype=torch.float64)
    assert sorted(obj.pi.tolist()) == pytest.approx(sorted((counts / 590).tolist()), abs=1e-3)
    assert float(obj.gamma.min()) >= obj.eps - 1e-12
    assert torch.equal(obj.gamma[:10], before)
    with pytest.raises(ConfigError):
        XMetric(init="zeros")


def test_update_at_runs_the_e_step_on_the_sample_only():
    from itreg.grid import Grid

    # Four classes with distinct intensity vectors: starting from the true classes (clamped
    # one-hot), one E-step at a sample keeps them there and leaves the other voxels alone.
    values, labels = _piecewise_group()
    obj = XMetric(k=4, levels=60, full_update_every=5)
    obj.reset(3, None, torch.Generator().manual_seed(0), torch.float64, None)
    obj.start_level(Grid((3000, 1)))
    start = torch.full((3000, 4), 0.1, dtype=torch.float64)
    start[torch.arange(3000), labels] = 0.7  # true class most likely, not certain
    obj.gamma = start.clone()
    index = torch.arange(0, 3000, 3)
    overlap = torch.ones(index.numel(), dtype=torch.bool)
    overlap[:5] = False  # sample points outside the overlap are not updated either
    obj.update_at(values[:, index], overlap, index)
    updated = index[overlap]
    assert torch.equal(obj.gamma[updated].argmax(dim=1), labels[updated])
    assert float(obj.gamma[updated].max(dim=1).values.min()) > 0.98  # sharpened from 0.7
    untouched = torch.ones(3000, dtype=torch.bool)
    untouched[updated] = False
    assert torch.equal(obj.gamma[untouched], start[untouched])
    # pi is the sample's mean posterior: the class frequencies of the sample.
    freq = torch.bincount(labels[updated], minlength=4).double() / updated.numel()
    torch.testing.assert_close(obj.pi, freq, atol=3e-3, rtol=0)
    with pytest.raises(ConfigError):
        XMetric(full_update_every=0)


# ----------------------------------------------------------------- density lookup (Eq. 20)
def _b3(d: float) -> float:
    """Cubic B-spline (closed form)."""
    a = abs(d)
    if a < 1.0:
        return 2.0 / 3.0 - a * a + a ** 3 / 2.0
    if a < 2.0:
        return (2.0 - a) ** 3 / 6.0
    return 0.0


def _lookup(centre: float, queries: list[float], bins: int = 16, lookup: str = "linear"):
    """Density read by the E-step at `queries` from a one-sample KDE at `centre`."""
    f = appearance_model(torch.tensor([[centre]], dtype=torch.float64),
                         torch.ones(1, 1, dtype=torch.float64), bins)
    coords = torch.tensor([queries], dtype=torch.float64)
    return class_log_likelihood(coords, f, lookup=lookup)[:, 0].exp().tolist()


def test_density_lookup_is_the_kde_at_bin_centres_and_linear_between_them():
    # One sample at bin coordinate 6: the KDE of Eq. 20 is B3(t - 6) (h = 1 bin), tabulated at
    # the bin centres 5, 6, 7 as 1/6, 2/3, 1/6. A value at t = 5.9 lies 0.1 bin from the
    # sample, so its density is close to 2/3 (not bin 5's 1/6); at t = 6.9 close to 1/6.
    queries = [4.0, 5.0, 5.5, 5.9, 6.0, 6.1, 6.5, 6.9, 7.0, 7.5, 8.0]
    got = _lookup(6.0, queries)
    for t, g in zip(queries, got):
        lo = math.floor(t)
        w = t - lo
        expected = (1 - w) * _b3(lo - 6.0) + w * _b3(lo + 1 - 6.0)  # linear between centres
        assert g == pytest.approx(max(expected, 1e-8), abs=1e-12), t
        # and within the linear-interpolation error of B3 (max (4/27)/2 at 1/3 bin).
        assert abs(g - _b3(t - 6.0)) <= 0.075, t
    # Symmetric about the sample, as the kernel is.
    for d in (0.1, 0.5, 0.9, 1.3):
        a, b = _lookup(6.0, [6.0 - d, 6.0 + d])
        assert a == pytest.approx(b, abs=1e-12), d
    # The authors' truncation (the default, see class_log_likelihood) reads the bin below:
    # 5.9 -> bin 5 (1/6), 6.9 -> bin 6 (2/3); the nearest centre: 6 for both.
    assert _lookup(6.0, [5.9, 6.9], lookup="truncate") == pytest.approx([1 / 6, 2 / 3])
    assert _lookup(6.0, [5.9, 6.9], lookup="nearest") == pytest.approx([2 / 3, 1 / 6])
    f = appearance_model(torch.tensor([[6.0]], dtype=torch.float64),
                         torch.ones(1, 1, dtype=torch.float64), 16)
    default = class_log_likelihood(torch.tensor([[5.9, 6.9]], dtype=torch.float64), f)
    assert default[:, 0].exp().tolist() == pytest.approx([1 / 6, 2 / 3])
    assert XMetric().lookup == "truncate" and XMetric(lookup="linear").lookup == "linear"
    with pytest.raises(ConfigError):
        XMetric(lookup="cubic")
    with pytest.raises(ConfigError):
        class_log_likelihood(torch.zeros(1, 1), torch.ones(1, 1, 4) / 4, lookup="cubic")


def test_density_lookup_tracks_an_off_centre_kde():
    # A sample between centres (6.3): the table is B3(b - 6.3); every lookup is the linear
    # interpolant of those closed-form values, so within h^2 max|B3''| / 8 = 1/4 of the
    # density B3(t - 6.3) itself (truncation is off by up to 0.34 here, at t = 7.9).
    queries = [4.5 + 0.1 * i for i in range(40)]
    for t, g in zip(queries, _lookup(6.3, queries)):
        lo = math.floor(t)
        w = t - lo
        expected = (1 - w) * _b3(lo - 6.3) + w * _b3(lo + 1 - 6.3)
        assert g == pytest.approx(max(expected, 1e-8), abs=1e-12), t
        assert abs(g - _b3(t - 6.3)) <= 0.25, t


def test_e_step_assigns_a_value_to_the_class_whose_density_is_nearer():
    # Class 0's intensities sit at bin coordinate 6, class 1's at 7. A voxel at 6.9 has KDE
    # densities B3(0.9) = 0.22 (class 0) and B3(0.1) = 0.66 (class 1): Bayes (Eq. 12, equal
    # priors) gives class 1 with posterior 0.66 / (0.22 + 0.66) = 0.75; at 6.1, class 0.
    coords = torch.tensor([[6.0, 6.0, 7.0, 7.0]], dtype=torch.float64)
    gamma = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]], dtype=torch.float64)
    f = appearance_model(coords, gamma, 16)
    ll = class_log_likelihood(torch.tensor([[6.9, 6.1]], dtype=torch.float64), f,
                              lookup="linear")
    post = e_step(ll, torch.tensor([0.5, 0.5], dtype=torch.float64), 1e-6)
    assert post.argmax(dim=1).tolist() == [1, 0]
    exact = _b3(0.1) / (_b3(0.1) + _b3(0.9))
    assert float(post[0, 1]) == pytest.approx(exact, abs=0.05)
    assert float(post[1, 0]) == pytest.approx(exact, abs=0.05)

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

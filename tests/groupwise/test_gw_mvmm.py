"""MvMM (Zhuang 2019), the X-metric paper's generalised-EM + ICM baseline."""

from __future__ import annotations

import math

import pytest
import torch
from gw_data import make_group, residual_mm
from scipy import stats

from itreg.errors import ConfigError
from itreg.grid import Grid
from itreg.groupwise import GroupStage, get_group_metric, register_group
from itreg.groupwise.mvmm import MvMM, gaussian_mixture_log_density, potts_neighbour_counts


def test_mixture_density_matches_scipy():
    u = torch.linspace(-2.0, 3.0, 41, dtype=torch.float64)
    tau = torch.tensor([[0.3, 0.7], [1.0, 0.0]], dtype=torch.float64)
    mean = torch.tensor([[0.0, 1.0], [2.0, -1.0]], dtype=torch.float64)
    var = torch.tensor([[0.5, 0.2], [1.5, 1.0]], dtype=torch.float64)
    got = gaussian_mixture_log_density(u, tau, mean, var)
    x = u.numpy()
    for k in range(2):
        ref = sum(tau[k, c].item() * stats.norm.pdf(x, mean[k, c].item(), math.sqrt(var[k, c]))
                  for c in range(2))
        torch.testing.assert_close(got[:, k], torch.log(torch.as_tensor(ref)), atol=1e-10,
                                   rtol=1e-10)


@pytest.mark.parametrize("shape", [(5, 4), (3, 4, 5)])
def test_potts_counts_match_a_loop_over_face_neighbours(shape):
    gen = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 3, shape, generator=gen)
    valid = torch.rand(shape, generator=gen) > 0.2
    got = potts_neighbour_counts(labels, 3, valid).reshape(*shape, 3)
    want = torch.zeros(*shape, 3, dtype=torch.float64)
    for idx in torch.cartesian_prod(*[torch.arange(n) for n in shape]).tolist():
        for axis in range(len(shape)):
            for step in (-1, 1):
                nb = list(idx)
                nb[axis] += step
                if 0 <= nb[axis] < shape[axis] and valid[tuple(nb)]:
                    want[(*idx, int(labels[tuple(nb)]))] += 1
    torch.testing.assert_close(got, want)


def _two_class_field(beta: float, size: int = 24, flip_seed: int = 0):
    """Two images of a half-plane pair of classes with Gaussian noise, and the truth."""
    grid = Grid((size, size), (1.0, 1.0))
    truth = torch.zeros(size, size, dtype=torch.int64)
    truth[:, size // 2:] = 1
    gen = torch.Generator().manual_seed(flip_seed)
    means = torch.tensor([[0.0, 1.0], [2.0, 0.5]], dtype=torch.float64)  # (image, class)
    values = torch.stack([means[j][truth] + 0.35 * torch.randn(size, size, generator=gen,
                                                                dtype=torch.float64)
                          for j in range(2)]).reshape(2, -1)
    obj = MvMM(k=2, components=1, beta=beta, eps=0.0)
    obj.reset(2, None, torch.Generator().manual_seed(0), torch.float64, "cpu")
    obj.start_level(grid)
    return obj, values, truth.reshape(-1), means


def test_em_recovers_class_gaussians_and_icm_cleans_labels():
    errors = {}
    for beta in (0.0, 1.0):
        obj, values, truth, means = _two_class_field(beta)
        overlap = torch.ones(values.shape[1], dtype=torch.bool)
        for _ in range(8):
            obj.update(values, overlap)
        labels = obj.gamma.argmax(dim=1)
        if (labels == truth).float().mean() < 0.5:  # the classes' order is arbitrary
            labels = 1 - labels
            order = [1, 0]
        else:
            order = [0, 1]
        errors[beta] = int((labels != truth).sum())
        _, mean, var = obj.params
        # The fitted means are the class means of the data, the variances the noise's.
        for j in range(2):
            for k in range(2):
                assert abs(float(mean[j, order[k], 0]) - float(means[j, k])) < 0.06
                assert abs(math.sqrt(float(var[j, order[k], 0])) - 0.35) < 0.05
    # The Potts prior (ICM) removes isolated misclassified voxels.
    assert errors[1.0] < errors[0.0]
    assert errors[1.0] <= 2


def test_transform_step_gradient_float64():
    obj, values, _, _ = _two_class_field(0.5, size=8)
    overlap = torch.ones(values.shape[1], dtype=torch.bool)
    obj.update(values, overlap)
    obj.update(values, overlap)
    x = values.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: obj.evaluate(v, overlap)[0], (x,))


def test_options_are_validated():
    with pytest.raises(ConfigError):
        get_group_metric("mvmm", components=0)
    with pytest.raises(ConfigError):
        get_group_metric("mvmm", beta=-1.0)
    with pytest.raises(ConfigError):
        get_group_metric("mvmm", k=1)


def test_mvmm_registers_a_group_and_returns_probabilities():
    images, truths = make_group(shifts=[(4.0, -3.0), (-3.0, 4.0), (1.0, 5.0)])
    grid = images[0].grid
    before = residual_mm(register_group(images, metric="mvmm", iterations=0), truths, grid)
    result = register_group(images, metric="mvmm", k=4, seed=0,
                            stages=[GroupStage("translation", (2, 1), 30)])
    after = residual_mm(result, truths, grid)
    assert after < 0.5 * before, (before, after)
    probs = result.probabilities
    assert probs.channels == 4
    inside = result.overlap
    torch.testing.assert_close(probs.data.sum(0)[inside].double(),
                               torch.ones(int(inside.sum()), dtype=torch.float64),
                               atol=1e-4, rtol=0)

"""MI bounds of itreg.metrics.bounds against the closed-form MI of correlated Gaussians."""

from __future__ import annotations

import math

import pytest
import torch

from itreg.errors import ConfigError
from itreg.metrics import bounds


def gaussian_pairs(rho: float, n: int, seed: int = 0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g, dtype=dtype)
    y = rho * x + math.sqrt(1 - rho**2) * torch.randn(n, generator=g, dtype=dtype)
    return x, y


def true_mi(rho: float) -> float:
    return -0.5 * math.log(1 - rho**2)


def log_ratio(x, y, rho: float):
    """The optimal critic log p(x,y)/(p(x)p(y)) of a standard bivariate Gaussian."""
    return -0.5 * math.log(1 - rho**2) - (rho**2 * x**2 - 2 * rho * x * y + rho**2 * y**2) / (
        2 * (1 - rho**2))


@pytest.mark.parametrize("rho", [0.5, 0.8, 0.9])
def test_bounds_with_optimal_critic_approach_true_mi(rho):
    x, y = gaussian_pairs(rho, 20000, seed=1)
    perm = torch.randperm(x.numel(), generator=torch.Generator().manual_seed(2))
    tj, tm = log_ratio(x, y, rho), log_ratio(x[perm], y, rho)
    mi = true_mi(rho)
    assert float(bounds.dv(tj, tm)) == pytest.approx(mi, abs=0.05)
    assert float(bounds.nwj(tj + 1, tm + 1)) == pytest.approx(mi, abs=0.05)
    assert float(bounds.smile(tj, tm, tau=5.0)) == pytest.approx(mi, abs=0.05)
    value, _ = bounds.dv_ema(tj, tm, None)
    assert float(value) == pytest.approx(float(bounds.dv(tj, tm)))
    k = 1024
    s = log_ratio(x[:k, None], y[None, :k], rho)  # S_ij = f(x_i, y_j)
    assert float(bounds.infonce(s)) == pytest.approx(mi, abs=0.08)
    assert float(bounds.infonce(s)) <= math.log(k) + 1e-9


def test_infonce_is_capped_at_log_k():
    rho = 0.999
    x, y = gaussian_pairs(rho, 8, seed=3)
    s = log_ratio(x[:, None], y[None, :], rho)
    est = float(bounds.infonce(s))
    assert true_mi(rho) > math.log(8)
    assert est <= math.log(8) + 1e-9


def test_bounds_are_zero_for_a_constant_critic():
    t = torch.full((100,), 3.0)
    assert float(bounds.dv(t, t)) == pytest.approx(0.0, abs=1e-6)
    assert float(bounds.nwj(torch.ones(5), torch.ones(5))) == pytest.approx(0.0, abs=1e-6)
    assert float(bounds.infonce(torch.zeros(6, 6))) == pytest.approx(0.0, abs=1e-6)


def test_logsumexp_stability_with_huge_scores():
    tj = torch.full((10,), 1000.0)
    tm = torch.tensor([1000.0, -1000.0] * 5)
    for value in (bounds.dv(tj, tm), bounds.smile(tj, tm), bounds.infonce(torch.eye(4) * 1e4)):
        assert torch.isfinite(value)
    assert float(bounds.dv(tj, tm)) == pytest.approx(math.log(2), abs=1e-4)


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(0)
    tj = torch.randn(7, dtype=torch.float64, generator=g, requires_grad=True)
    tm = torch.randn(9, dtype=torch.float64, generator=g, requires_grad=True)
    s = torch.randn(5, 5, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(bounds.dv, (tj, tm))
    assert torch.autograd.gradcheck(bounds.nwj, (tj, tm))
    assert torch.autograd.gradcheck(bounds.js, (tj, tm))
    assert torch.autograd.gradcheck(bounds.infonce, (s,))
    assert torch.autograd.gradcheck(lambda a, b: bounds.smile(a, b, 1.0, js_gradient=False),
                                    (tj, tm))


def test_smile_uses_js_gradient_and_ema_corrected_gradient():
    g = torch.Generator().manual_seed(0)
    tj = torch.randn(7, dtype=torch.float64, generator=g, requires_grad=True)
    tm = torch.randn(9, dtype=torch.float64, generator=g, requires_grad=True)
    gs = torch.autograd.grad(bounds.smile(tj, tm), (tj, tm))
    gj = torch.autograd.grad(bounds.js(tj, tm), (tj, tm))
    for a, b in zip(gs, gj):
        assert torch.allclose(a, b)
    # EMA: with the running mean equal to the batch's, the gradient is the plain DV gradient.
    log_m = bounds.log_mean_exp(tm.detach())
    ge = torch.autograd.grad(bounds.dv_ema(tj, tm, log_m, alpha=0.5)[0], (tj, tm))
    gd = torch.autograd.grad(bounds.dv(tj, tm), (tj, tm))
    for a, b in zip(ge, gd):
        assert torch.allclose(a, b)
    # a larger running mean shrinks the partition-term gradient
    ge2 = torch.autograd.grad(bounds.dv_ema(tj, tm, log_m + 1.0, alpha=1e-6)[0], (tj, tm))
    assert torch.allclose(ge2[1], gd[1] * math.exp(-1.0), rtol=1e-4)


def test_invalid_settings():
    t = torch.zeros(3)
    with pytest.raises(ConfigError):
        bounds.smile(t, t, tau=0.0)
    with pytest.raises(ConfigError):
        bounds.dv_ema(t, t, None, alpha=0.0)
    with pytest.raises(ValueError):
        bounds.infonce(torch.zeros(2, 3))

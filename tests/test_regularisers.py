"""Regularisers against closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from itreg.errors import ConfigError, GeometryError
from itreg.grid import Grid
from itreg.regularisers import (
    BendingEnergy,
    Diffusion,
    JacobianFolding,
    JacobianLogDet,
    TotalVariation,
    available_regularisers,
    bending_energy,
    diffusion,
    get_regulariser,
    jacobian_folding,
    jacobian_logdet,
    total_variation,
)

F64 = torch.float64


def _oblique(ndim: int, size) -> Grid:
    c, s = math.cos(0.6), math.sin(0.6)
    r = np.eye(ndim)
    r[:2, :2] = [[c, -s], [s, c]]
    return Grid(size, [1.5, 0.8, 2.0][:ndim], [3.0, -2.0, 1.0][:ndim], r.ravel())


def _linear(grid: Grid, b: torch.Tensor) -> torch.Tensor:
    x = grid.points(dtype=F64)
    return torch.movedim(x @ b.T + 0.7, -1, 0)  # (D, *shape): d(x) = B x + 0.7


@pytest.mark.parametrize("ndim", [2, 3])
def test_linear_displacement_closed_forms(ndim):
    grid = _oblique(ndim, (7, 6, 5)[:ndim])
    b = 0.1 * torch.randn(ndim, ndim, dtype=F64, generator=torch.Generator().manual_seed(ndim))
    disp = _linear(grid, b)
    assert float(bending_energy(disp, grid)) == pytest.approx(0.0, abs=1e-12)
    assert float(diffusion(disp, grid)) == pytest.approx(float((b**2).sum()), rel=1e-9)
    assert float(total_variation(disp, grid)) == pytest.approx(float(b.abs().sum()), rel=1e-9)
    det = float(torch.linalg.det(torch.eye(ndim, dtype=F64) + b))
    assert float(jacobian_logdet(disp, grid)) == pytest.approx(math.log(det) ** 2, rel=1e-9)
    assert float(jacobian_folding(disp, grid)) == 0.0
    assert float(jacobian_folding(disp, grid, margin=det + 0.5)) == pytest.approx(0.5)
    # A batch gives the mean over the batch.
    batch = torch.stack([disp, 2 * disp])
    assert float(diffusion(batch, grid)) == pytest.approx(2.5 * float((b**2).sum()), rel=1e-9)


@pytest.mark.parametrize("ndim", [2, 3])
def test_quadratic_displacement_closed_forms(ndim):
    grid = _oblique(ndim, (8, 7, 5)[:ndim])
    x = grid.points(dtype=F64)
    a, c = 0.05, -0.03
    disp = torch.zeros((ndim, *grid.shape), dtype=F64)
    disp[0] = a * x[..., 0] ** 2 + c * x[..., 0] * x[..., 1]  # d_x only
    # Hessian of d_x: [[2a, c], [c, 0]] -> bending 4 a^2 + 2 c^2 everywhere.
    assert float(bending_energy(disp, grid)) == pytest.approx(4 * a * a + 2 * c * c, rel=1e-8)
    expected = ((2 * a * x[..., 0] + c * x[..., 1]) ** 2 + (c * x[..., 0]) ** 2).mean()
    assert float(diffusion(disp, grid)) == pytest.approx(float(expected), rel=1e-8)


def test_folding_and_tv_smoothing():
    grid = Grid((6, 5), (1.0, 2.0))
    x = grid.points(dtype=F64)
    disp = torch.zeros((2, *grid.shape), dtype=F64)
    disp[0] = -2.0 * x[..., 0]  # det J = 1 - 2 = -1 everywhere: folded
    assert float(jacobian_folding(disp, grid)) == pytest.approx(1.0)
    assert float(jacobian_logdet(disp, grid, eps=1e-2)) == pytest.approx(math.log(1e-2) ** 2)
    zero = torch.zeros((2, *grid.shape), dtype=F64, requires_grad=True)
    smooth = total_variation(zero, grid, eps=1e-3)
    smooth.backward()
    assert float(smooth.detach()) == 0.0 and torch.isfinite(zero.grad).all()
    exact = float(total_variation(disp, grid))
    assert float(total_variation(disp, grid, eps=1e-6)) == pytest.approx(exact, rel=1e-5)


def test_modules_and_registry():
    assert available_regularisers() == sorted(
        ["diffusion", "bending", "tv", "jacobian-fold", "jacobian-logdet"])
    grid = _oblique(2, (6, 5))
    disp = torch.randn((2, *grid.shape), dtype=F64, generator=torch.Generator().manual_seed(0))
    pairs = [
        (get_regulariser("diffusion"), Diffusion, diffusion(disp, grid)),
        (get_regulariser("Bending"), BendingEnergy, bending_energy(disp, grid)),
        (get_regulariser("tv", eps=0.01), TotalVariation, total_variation(disp, grid, eps=0.01)),
        (get_regulariser("jacobian-fold", margin=0.1), JacobianFolding,
         jacobian_folding(disp, grid, margin=0.1)),
        (get_regulariser("jacobian-logdet", eps=0.01), JacobianLogDet,
         jacobian_logdet(disp, grid, eps=0.01)),
    ]
    for module, cls, value in pairs:
        assert isinstance(module, cls) and isinstance(module, torch.nn.Module)
        torch.testing.assert_close(module(disp, grid), value)
    with pytest.raises(ConfigError, match="valid regularisers are"):
        get_regulariser("elastic")
    with pytest.raises(ConfigError):
        get_regulariser("diffusion", weight=2.0)
    with pytest.raises(ConfigError):
        get_regulariser("tv", eps=-1.0)


def test_bad_shapes():
    grid = Grid((6, 5))
    with pytest.raises(GeometryError):
        diffusion(torch.zeros(2, 6, 5), grid)
    with pytest.raises(GeometryError):
        bending_energy(torch.zeros(3, 5, 6), grid)
    with pytest.raises(GeometryError):
        total_variation(torch.zeros(2, 5, 6, dtype=torch.int64), grid)


@pytest.mark.parametrize("name", ["diffusion", "bending", "tv", "jacobian-fold",
                                  "jacobian-logdet"])
@pytest.mark.parametrize("ndim", [2, 3])
def test_gradcheck(name, ndim):
    grid = _oblique(ndim, (4, 3, 3)[:ndim])
    g = torch.Generator().manual_seed(1)
    disp = 0.3 * torch.randn((ndim, *grid.shape), dtype=F64, generator=g)
    if name == "jacobian-fold":
        disp = disp * 5.0  # make some voxels fold so the penalty is active
    kwargs = {"tv": {"eps": 0.1}, "jacobian-fold": {"margin": 0.5}}.get(name, {})
    reg = get_regulariser(name, **kwargs)
    disp.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda d: reg(d, grid), (disp,), fast_mode=ndim == 3)


def test_closed_form_bending_energy_of_a_bspline():
    from itreg.transforms import Affine, BSpline

    grid = _oblique(3, (12, 10, 8))
    b = BSpline(grid, 5.0, dtype=F64)
    with torch.no_grad():
        b.coefficients.copy_(torch.randn(b.coefficients.shape, dtype=F64,
                                         generator=torch.Generator().manual_seed(2)))
    module = BendingEnergy()
    exact = module.closed_form(b, grid)
    assert exact is not None and float(exact) > 0
    assert torch.equal(exact, b.bending_energy(grid))
    # The sampled-field version approaches it on a fine grid (the closed form is its limit).
    fine = grid.with_spacing([s / 3 for s in grid.spacing])
    sampled = module(torch.movedim(b.displacement(fine), -1, 0), fine)
    assert float(sampled) == pytest.approx(float(exact), rel=0.05)
    # No closed form: transforms without one, and the other regularisers.
    assert module.closed_form(Affine(3, dtype=F64), grid) is None
    for name in ("diffusion", "tv", "jacobian-fold", "jacobian-logdet"):
        assert get_regulariser(name).closed_form(b, grid) is None

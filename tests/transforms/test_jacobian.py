"""Finite-difference Jacobians against closed forms and SimpleITK."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from itreg.errors import GeometryError
from itreg.grid import Grid
from itreg.transforms import (
    Affine,
    BSpline,
    hessian,
    jacobian_determinant,
    jacobian_matrix,
    spatial_gradient,
)

F64 = torch.float64


def _oblique(ndim: int, size) -> Grid:
    c, s = math.cos(0.5), math.sin(0.5)
    r = np.eye(ndim)
    r[:2, :2] = [[c, -s], [s, c]]
    if ndim == 3:
        r = r @ np.array([[1, 0, 0], [0, c, s], [0, -s, c]])
    return Grid(size, [1.5, 2.0, 0.75][:ndim], [-3.0, 4.0, 1.0][:ndim], r.ravel())


@pytest.mark.parametrize("ndim", [2, 3])
def test_affine_jacobian_is_its_matrix(ndim):
    grid = _oblique(ndim, (7, 6, 5)[:ndim])
    g = torch.Generator().manual_seed(ndim)
    a = torch.eye(ndim, dtype=F64) + 0.3 * torch.randn(ndim, ndim, generator=g, dtype=F64)
    t = Affine(ndim, center=grid.center, translation=[1.0] * ndim, matrix=a, dtype=F64)
    jac = jacobian_matrix(t, grid).detach()
    assert jac.shape == (*grid.shape, ndim, ndim)
    torch.testing.assert_close(jac, a.expand_as(jac), atol=1e-9, rtol=0)
    det = jacobian_determinant(t, grid).detach()
    assert det.shape == grid.shape
    torch.testing.assert_close(det, torch.full(grid.shape, float(torch.linalg.det(a)),
                                               dtype=F64), atol=1e-9, rtol=0)


def test_matches_sitk_jacobian_determinant_on_smooth_field():
    grid = Grid((20, 18, 16), (1.0, 1.5, 2.0), (5.0, -3.0, 2.0))
    x = grid.points(dtype=F64)
    field = torch.stack([
        1.5 * torch.sin(0.15 * x[..., 1]) + 0.02 * x[..., 0] ** 2 / 10,
        1.0 * torch.cos(0.1 * x[..., 0] + 0.05 * x[..., 2]),
        0.8 * torch.sin(0.12 * x[..., 0] * 0.5 + 0.1 * x[..., 1]),
    ])
    img = sitk.GetImageFromArray(field.movedim(0, -1).numpy(), isVector=True)
    img.SetSpacing(grid.spacing)
    img.SetOrigin(grid.origin)
    ref = torch.from_numpy(sitk.GetArrayFromImage(
        sitk.DisplacementFieldJacobianDeterminant(img)).astype(np.float64))
    det = jacobian_determinant(field, grid)
    inner = (slice(1, -1),) * 3  # ITK uses zero-flux Neumann conditions on the faces
    torch.testing.assert_close(det[inner], ref[inner], atol=1e-5, rtol=0)
    assert float((det - 1).abs().max()) > 0.1  # a real deformation


def test_bspline_jacobian_close_to_autograd():
    grid = _oblique(2, (30, 28))
    b = BSpline(grid, 8.0, dtype=F64)
    with torch.no_grad():
        b.coefficients.copy_(torch.randn(b.coefficients.shape, dtype=F64,
                                         generator=torch.Generator().manual_seed(0)))
    jac = jacobian_matrix(b, grid).detach()
    pts = grid.points(dtype=F64).reshape(-1, 2)[::37]
    exact = torch.func.vmap(torch.func.jacrev(lambda p: b(p[None])[0]))(pts).detach()
    idx = torch.arange(grid.numel).reshape(grid.shape).reshape(-1)[::37]
    fd = jac.reshape(-1, 2, 2)[idx]
    # Interior points only: finite differences are second-order accurate there.
    ii = grid.world_to_index(pts)
    inner = ((ii > 0.5) & (ii < torch.tensor(grid.size, dtype=F64) - 1.5)).all(-1)
    torch.testing.assert_close(fd[inner], exact[inner], atol=2e-2, rtol=0)


@pytest.mark.parametrize("ndim", [2, 3])
def test_gradient_and_hessian_of_polynomials(ndim):
    grid = _oblique(ndim, (7, 6, 5)[:ndim])
    x = grid.points(dtype=F64)
    # f = x0^2 + 3 x0 x1 - x1 + 0.5 (x2^2 in 3D): gradient and Hessian in closed form.
    f = x[..., 0] ** 2 + 3 * x[..., 0] * x[..., 1] - x[..., 1]
    grad = [2 * x[..., 0] + 3 * x[..., 1], 3 * x[..., 0] - 1]
    h = torch.zeros(ndim, ndim, dtype=F64)
    h[0, 0], h[0, 1], h[1, 0] = 2, 3, 3
    if ndim == 3:
        f = f + 0.5 * x[..., 2] ** 2
        grad.append(x[..., 2])
        h[2, 2] = 1
    g = spatial_gradient(f[None], grid)
    assert g.shape == (1, ndim, *grid.shape)
    torch.testing.assert_close(g[0], torch.stack(grad), atol=1e-8, rtol=0)
    hh = hessian(f[None], grid)
    assert hh.shape == (1, ndim, ndim, *grid.shape)
    expected = h.view(ndim, ndim, *([1] * ndim)).expand(ndim, ndim, *grid.shape)
    torch.testing.assert_close(hh[0], expected, atol=1e-8, rtol=0)


def test_single_voxel_axis_has_zero_derivative():
    grid = Grid((5, 4, 1))
    field = torch.randn(3, *grid.shape, dtype=F64)
    g = spatial_gradient(field, grid)
    assert torch.all(g[:, 2] == 0)


def test_bad_shapes():
    grid = Grid((4, 5))
    with pytest.raises(GeometryError):
        jacobian_matrix(torch.zeros(2, 4, 5), grid)
    with pytest.raises(GeometryError):
        jacobian_matrix(Affine(3), grid)
    with pytest.raises(GeometryError):
        spatial_gradient(torch.zeros(3, 3), grid)


def test_gradcheck_determinant():
    grid = _oblique(2, (4, 3))
    disp = (0.2 * torch.randn(2, *grid.shape, dtype=F64,
                              generator=torch.Generator().manual_seed(0))).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda d: jacobian_determinant(d, grid), (disp,))
    assert torch.autograd.gradcheck(lambda d: hessian(d, grid), (disp,))

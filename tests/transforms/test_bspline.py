"""Cubic B-spline FFD against SimpleITK's BSplineTransform."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from itreg.errors import ConfigError, GeometryError, TransformFileError
from itreg.grid import Grid
from itreg.transforms import BSpline

F64 = torch.float64


def _rotation(ndim: int, angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    r = np.eye(ndim)
    r[:2, :2] = [[c, -s], [s, c]]
    if ndim == 3:
        c2, s2 = np.cos(0.5 * angle), np.sin(0.5 * angle)
        r = r @ np.array([[1, 0, 0], [0, c2, -s2], [0, s2, c2]])
    return r


def _grid(ndim: int) -> Grid:
    if ndim == 2:
        return Grid((24, 18), (1.5, 2.0), (3.0, -4.0), _rotation(2, 0.3).ravel())
    return Grid((14, 12, 10), (1.5, 2.0, 2.5), (3.0, -4.0, 5.0), _rotation(3, 0.3).ravel())


def _random_bspline(grid: Grid, spacing, seed: int = 0, scale: float = 2.0) -> BSpline:
    b = BSpline(grid, spacing, dtype=F64)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        b.coefficients.copy_(scale * torch.randn(b.coefficients.shape, generator=g, dtype=F64))
    return b


def _random_points(grid: Grid, n: int, seed: int = 1, margin: float = 0.5) -> torch.Tensor:
    """World points inside the grid's voxel extent (continuous index in [-margin, n-1+margin])."""
    g = torch.Generator().manual_seed(seed)
    size = torch.tensor(grid.size, dtype=F64)
    index = torch.rand(n, grid.ndim, generator=g, dtype=F64) * (size - 1 + 2 * margin) - margin
    return grid.index_to_world(index)


def _sitk_bspline(b: BSpline) -> sitk.BSplineTransform:
    fixed, params = b.to_itk_parameters()
    tx = sitk.BSplineTransform(b.ndim, 3)
    tx.SetFixedParameters(fixed)
    tx.SetParameters(params)
    return tx


@pytest.mark.parametrize("ndim", [2, 3])
def test_forward_matches_sitk(ndim):
    grid = _grid(ndim)
    b = _random_bspline(grid, [7.0, 6.0, 9.0][:ndim])
    tx = _sitk_bspline(b)
    pts = _random_points(grid, 200)
    ref = torch.tensor([tx.TransformPoint(p) for p in pts.tolist()], dtype=F64)
    # ITK evaluates the B-spline weights in single precision (~1e-6 mm here).
    torch.testing.assert_close(b(pts).detach(), ref, atol=1e-4, rtol=0)


def test_outside_valid_region_matches_sitk():
    grid = Grid((10, 8))
    b = _random_bspline(grid, 3.0)
    tx = _sitk_bspline(b)
    g = torch.Generator().manual_seed(3)
    pts = (torch.rand(300, 2, generator=g, dtype=F64) - 0.5) * 60.0  # many far outside
    ref = torch.tensor([tx.TransformPoint(p) for p in pts.tolist()], dtype=F64)
    torch.testing.assert_close(b(pts).detach(), ref, atol=1e-4, rtol=0)
    assert (b(pts) == pts).any()  # some points lie outside: identity there


def test_control_grid_layout_covers_the_image():
    grid = Grid((20, 16), (1.0, 1.5), (5.0, 7.0))
    b = BSpline(grid, [4.0, 5.0])
    cg = b.control_grid
    assert cg.size == (5 + 3, 5 + 3)  # ceil(20/4)=5, ceil(24/5)=5 intervals, +3
    assert cg.spacing == (4.0, 5.0)
    assert cg.direction == grid.direction
    np.testing.assert_allclose(cg.center, grid.center)
    assert b.coefficients.shape == (2, 8, 8)
    assert float(b.coefficients.detach().abs().sum()) == 0.0
    # Every voxel edge of the image lies inside the valid region [1, size - 2].
    corners = grid.index_to_world(torch.tensor([[-0.5, -0.5], [19.5, 15.5]], dtype=F64))
    u = cg.world_to_index(corners)
    assert bool((u >= 1).all()) and bool((u <= torch.tensor([6.0, 6.0], dtype=F64)).all())


@pytest.mark.parametrize("ndim", [2, 3])
def test_on_grid_fast_path_matches_forward(ndim):
    grid = _grid(ndim)
    b = _random_bspline(grid, 5.0)
    # Another grid with the same direction, other spacing/origin/size (partly outside).
    other = Grid(tuple(s + 3 for s in grid.size), tuple(0.7 * s for s in grid.spacing),
                 tuple(o - 2.0 for o in grid.origin), grid.direction)
    for g in (grid, other):
        fast = b.on_grid(g)
        slow = b(g.points(dtype=F64))
        torch.testing.assert_close(fast, slow, atol=1e-10, rtol=0)
        torch.testing.assert_close(b.displacement(g), slow - g.points(dtype=F64), atol=1e-10,
                                   rtol=0)
    # A grid of another direction takes the general path.
    tilted = Grid(grid.size, grid.spacing, grid.origin, _rotation(ndim, -0.2).ravel())
    torch.testing.assert_close(b.on_grid(tilted), b(tilted.points(dtype=F64)), atol=1e-10,
                               rtol=0)


def test_on_grid_gradient_matches_forward_gradient():
    grid = _grid(2)
    b = _random_bspline(grid, 6.0)
    w = torch.randn(*grid.shape, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    (b.on_grid(grid) * w).sum().backward()
    g_fast = b.coefficients.grad.clone()
    b.coefficients.grad = None
    (b(grid.points(dtype=F64)) * w).sum().backward()
    torch.testing.assert_close(g_fast, b.coefficients.grad, atol=1e-10, rtol=0)


@pytest.mark.parametrize("ndim", [2, 3])
def test_refined_keeps_the_displacement(ndim):
    grid = _grid(ndim)
    b = _random_bspline(grid, 6.0)
    fine = b.refined()
    assert fine.control_spacing == tuple(s / 2 for s in b.control_spacing)
    assert fine.control_grid.size == tuple(2 * s - 3 for s in b.control_grid.size)
    torch.testing.assert_close(fine.on_grid(grid), b.on_grid(grid), atol=1e-4, rtol=0)
    pts = _random_points(grid, 100, margin=3.0)
    torch.testing.assert_close(fine(pts), b(pts), atol=1e-4, rtol=0)
    twice = fine.refined()
    torch.testing.assert_close(twice(pts), b(pts), atol=1e-4, rtol=0)


@pytest.mark.parametrize("ndim", [2, 3])
def test_itk_parameters_round_trip(ndim):
    grid = _grid(ndim)
    b = _random_bspline(grid, 5.0)
    tx = _sitk_bspline(b)
    back = BSpline.from_itk_parameters(tx.GetFixedParameters(), tx.GetParameters(), dtype=F64)
    assert back.control_grid.same_as(b.control_grid, tol=1e-9)
    torch.testing.assert_close(back.coefficients, b.coefficients, atol=0, rtol=0)
    # And through a transform built by ITK's initializer.
    img = sitk.Image([12, 10, 8][:ndim], sitk.sitkFloat32)
    img.SetSpacing([1.5, 2.0, 1.0][:ndim])
    init = sitk.BSplineTransformInitializer(img, [3] * ndim, 3)
    params = np.random.default_rng(0).normal(size=init.GetNumberOfParameters())
    init.SetParameters(params.tolist())
    from_itk = BSpline.from_itk_parameters(init.GetFixedParameters(), init.GetParameters(),
                                           dtype=F64)
    pts = _random_points(Grid(img.GetSize(), img.GetSpacing()), 50)
    ref = torch.tensor([init.TransformPoint(p) for p in pts.tolist()], dtype=F64)
    torch.testing.assert_close(from_itk(pts).detach(), ref, atol=1e-4, rtol=0)
    fixed, out = from_itk.to_itk_parameters()
    np.testing.assert_allclose(fixed, init.GetFixedParameters())
    np.testing.assert_allclose(out, init.GetParameters())


def test_bad_input_raises():
    grid = Grid((8, 8))
    with pytest.raises(ConfigError):
        BSpline(grid, 0.0)
    with pytest.raises(ConfigError):
        BSpline(grid, -2.0)
    with pytest.raises(ConfigError):
        BSpline(grid, [2.0, 2.0, 2.0])
    with pytest.raises(GeometryError):
        BSpline(grid, 2.0)(torch.zeros(3, 3))
    with pytest.raises(TransformFileError):
        BSpline.from_itk_parameters([1.0] * 7, [])
    b = BSpline(grid, 4.0)
    fixed, params = b.to_itk_parameters()
    with pytest.raises(TransformFileError):
        BSpline.from_itk_parameters(fixed, params[:-1])


def test_chunked_forward_on_many_points():
    grid = Grid((16, 16, 16))
    b = _random_bspline(grid, 4.0)
    pts = grid.points(dtype=F64).reshape(-1, 3)[:20000]  # several chunks
    torch.testing.assert_close(b(pts), b.on_grid(grid).reshape(-1, 3)[:20000], atol=1e-10,
                               rtol=0)


class _OnGrid(torch.nn.Module):
    """Module whose forward is ``transform.on_grid(grid)`` (for functional_call)."""

    def __init__(self, transform):
        super().__init__()
        self.transform = transform

    def forward(self, grid):
        return self.transform.on_grid(grid)


@pytest.mark.parametrize("ndim", [2, 3])
def test_gradcheck(ndim):
    grid = Grid((5,) * ndim, (2.0,) * ndim)
    b = _random_bspline(grid, 4.0, scale=0.5)
    pts = _random_points(grid, 3).requires_grad_(True)
    coef = b.coefficients.detach().clone().requires_grad_(True)

    def call(c, p):
        return torch.func.functional_call(b, {"coefficients": c}, (p,))

    assert torch.autograd.gradcheck(call, (coef, pts), fast_mode=True)

    wrapper = _OnGrid(b)

    def grid_call(c):
        return torch.func.functional_call(wrapper, {"transform.coefficients": c}, (grid,))

    assert torch.autograd.gradcheck(grid_call, (coef,), fast_mode=True)


# ---------------------------------------------------------------------- bending energy
def _energy(b: BSpline, domain) -> float:
    with torch.no_grad():
        return float(b.bending_energy(domain))

@pytest.mark.parametrize("ndim", [2, 3])
def test_bending_energy_of_a_reproduced_quadratic(ndim):
    # Cubic B-splines reproduce u^2 with coefficients k^2 - 1/3 (Marsden's identity), so
    # d_x = (u_x - 3)^2 (u: control index) has d^2 d_x / du_x^2 = 2, that is along the
    # rotated axis 2 / s_x^2 in 1/mm: the bending energy is 4 / s_x^4 whatever the rotation.
    grid = _grid(ndim)
    b = BSpline(grid, 6.0, dtype=F64)
    size = b.control_grid.size
    k = torch.arange(size[0], dtype=F64) - 3.0
    coef = torch.zeros_like(b.coefficients)
    coef[0] = (k * k - 1.0 / 3.0).expand(*b.control_grid.shape)  # x index is the last axis
    with torch.no_grad():
        b.coefficients.copy_(coef)
    s = b.control_grid.spacing[0]
    expected = 4.0 / s**4
    assert _energy(b, grid) == pytest.approx(expected, rel=1e-10)
    assert _energy(b, None) == pytest.approx(expected, rel=1e-10)
    # The displacement really is that quadratic (d^2/dx_index^2 = 2 in control units).
    u = b.control_grid.world_to_index(grid.points(dtype=F64).reshape(-1, ndim))
    disp = b.displacement(grid, dtype=F64).reshape(-1, ndim)
    assert torch.allclose(disp[:, 0], (u[:, 0] - 3.0) ** 2, atol=1e-9)


@pytest.mark.parametrize(("ndim", "sheared"), [(2, False), (3, False), (2, True), (3, True)])
def test_bending_energy_matches_fine_finite_differences(ndim, sheared):
    from itreg.regularisers import bending_energy

    grid = _grid(ndim)
    if sheared:  # a non-orthogonal direction: the general (non-diagonal) quadratic form
        direction = np.asarray(grid.direction).reshape(ndim, ndim) @ (
            np.eye(ndim) + 0.3 * np.eye(ndim, k=1))
        grid = Grid(grid.size, grid.spacing, grid.origin, direction.ravel())
    b = _random_bspline(grid, 6.0, seed=3)
    exact = _energy(b, grid)
    errors = []
    for factor in (2, 4):
        fine = grid.with_spacing([s / factor for s in grid.spacing])
        disp = torch.movedim(b.displacement(fine, dtype=F64), -1, 0)
        errors.append(abs(float(bending_energy(disp, fine)) - exact) / exact)
    assert errors[1] < 0.03
    assert errors[1] < errors[0]  # converges to the closed form as the grid is refined


def test_bending_energy_is_zero_for_affine_and_clips_to_the_valid_region():
    grid = _grid(3)
    b = BSpline(grid, 6.0, dtype=F64)
    idx = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=F64) for n in
                                       b.control_grid.shape], indexing="ij"))  # (z, y, x)
    with torch.no_grad():  # coefficients linear in the index: an affine displacement
        b.coefficients.copy_(torch.stack([0.3 * idx[2] - 0.1 * idx[0], 0.2 * idx[1],
                                          0.5 * idx[0] + 0.05 * idx[2]]))
    assert abs(_energy(b, grid)) < 1e-14
    # A domain far larger than the control grid: the integral stops at the valid region,
    # the mean is over the whole domain.
    q = _random_bspline(grid, 6.0, seed=1)
    big = grid.with_spacing([3 * s for s in grid.spacing]).resized(
        [3 * n for n in grid.size], [3 * s for s in grid.spacing])
    ratio = _energy(q, big) / _energy(q, None)
    lo, hi = 1.0, [n - 2.0 for n in q.control_grid.size]
    valid = np.prod([h - lo for h in hi])
    box = np.prod(big.extent()) / np.prod(q.control_grid.spacing)  # same direction
    assert ratio == pytest.approx(valid / box, rel=1e-6)


@pytest.mark.parametrize("ndim", [2, 3])
def test_bending_energy_gradcheck(ndim):
    grid = Grid((6,) * ndim, (2.0,) * ndim, direction=_rotation(ndim, 0.4).ravel())
    b = _random_bspline(grid, 4.0, scale=0.5)
    coef = b.coefficients.detach().clone().requires_grad_(True)

    class _Energy(torch.nn.Module):
        def __init__(self, transform):
            super().__init__()
            self.transform = transform

        def forward(self, domain):
            return self.transform.bending_energy(domain)

    wrapper = _Energy(b)

    def call(c):
        return torch.func.functional_call(wrapper, {"transform.coefficients": c}, (grid,))

    assert torch.autograd.gradcheck(call, (coef,))


@pytest.mark.parametrize("ndim", [2, 3])
def test_fit_recovers_the_coefficients_of_a_bspline_displacement(ndim):
    grid = _grid(ndim)
    b = _random_bspline(grid, [7.0, 6.0, 9.0][:ndim], seed=3)
    fitted = BSpline.fit(b, grid, [7.0, 6.0, 9.0][:ndim], dtype=F64)
    assert fitted.control_grid == b.control_grid
    torch.testing.assert_close(fitted.coefficients, b.coefficients, atol=1e-9, rtol=0)


@pytest.mark.parametrize("ndim", [2, 3])
def test_fit_reproduces_an_affine_displacement_exactly(ndim):
    # Cubic B-splines reproduce linear functions: the least-squares fit of an affine
    # displacement (closed form, numpy) has no residual, whatever the control spacing.
    grid = _grid(ndim)
    rng = np.random.default_rng(ndim)
    a = np.eye(ndim) + 0.05 * rng.standard_normal((ndim, ndim))
    t = rng.uniform(-3, 3, ndim)
    x = grid.points(dtype=F64).numpy()
    disp = torch.from_numpy(x @ a.T + t - x)
    fitted = BSpline.fit(disp, grid, 11.0, dtype=F64)
    np.testing.assert_allclose(fitted.displacement(grid).detach().numpy(), disp.numpy(), atol=1e-8)


def test_fit_smooths_detail_finer_than_the_control_spacing():
    grid = _grid(2)
    x = grid.points(dtype=F64)
    detail = torch.zeros_like(x)
    detail[..., 0] = torch.where(torch.arange(grid.shape[-1]) % 2 == 0, 1.0, -1.0).to(F64)
    fitted = BSpline.fit(detail, grid, 10.0, dtype=F64)
    # One-voxel stripes of +-1 mm have almost nothing at the 10 mm scale.
    rms = fitted.displacement(grid).detach().pow(2).mean().sqrt()
    assert rms < 0.2


def test_fit_rejects_a_displacement_of_another_shape():
    grid = _grid(2)
    with pytest.raises(GeometryError):
        BSpline.fit(torch.zeros(*grid.shape, 3, dtype=F64), grid, 10.0)
    with pytest.raises(GeometryError):
        BSpline.fit(_random_bspline(_grid(3), 9.0), grid, 10.0)

"""Displacement fields and stationary velocity fields."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from itreg.errors import ConfigError, GeometryError
from itreg.grid import Grid
from itreg.transforms import Compose, DisplacementField, Rigid, StationaryVelocityField

F64 = torch.float64


def _oblique(ndim: int, size) -> Grid:
    c, s = math.cos(0.4), math.sin(0.4)
    r = np.eye(ndim)
    r[:2, :2] = [[c, -s], [s, c]]
    return Grid(size, [1.5, 2.0, 1.25][:ndim], [-3.0, 4.0, 1.0][:ndim], r.ravel())


def _random_field(grid: Grid, seed: int = 0, scale: float = 2.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn((grid.ndim, *grid.shape), generator=g, dtype=F64)


def _smooth_field(grid: Grid, amplitude: float = 1.0) -> torch.Tensor:
    """A smooth displacement (D, *shape) in mm built from sines of the world coordinates."""
    x = grid.points(dtype=F64)
    comps = [amplitude * torch.sin(0.2 * x[..., (a + 1) % grid.ndim] + a) for a in range(grid.ndim)]
    return torch.stack(comps, dim=0)


def _to_sitk_field(field: torch.Tensor, grid: Grid) -> sitk.Image:
    img = sitk.GetImageFromArray(field.movedim(0, -1).numpy(), isVector=True)
    img.SetSpacing(grid.spacing)
    img.SetOrigin(grid.origin)
    img.SetDirection(grid.direction)
    return img


@pytest.mark.parametrize("ndim", [2, 3])
def test_displacement_field_matches_sitk(ndim):
    grid = _oblique(ndim, (9, 7, 6)[:ndim])
    field = _random_field(grid)
    t = DisplacementField(field, grid)
    ref = sitk.DisplacementFieldTransform(_to_sitk_field(field, grid))
    g = torch.Generator().manual_seed(1)
    size = torch.tensor(grid.size, dtype=F64)
    # Inside, in the outer half voxel and beyond the field.
    index = torch.rand(400, ndim, generator=g, dtype=F64) * (size + 3.0) - 2.0
    pts = grid.index_to_world(index)
    expected = torch.tensor([ref.TransformPoint(p) for p in pts.tolist()], dtype=F64)
    torch.testing.assert_close(t(pts).detach(), expected, atol=1e-4, rtol=0)
    outside = ((index < -0.5) | (index >= size - 0.5)).any(-1)
    assert outside.any() and (~outside).any()


def test_displacement_field_on_its_grid_is_the_field():
    grid = _oblique(2, (6, 5))
    field = _random_field(grid)
    t = DisplacementField(field, grid, learnable=False)
    assert not list(t.parameters())
    torch.testing.assert_close(t.displacement(grid), field.movedim(0, -1))
    torch.testing.assert_close(t.on_grid(grid), grid.points(dtype=F64) + field.movedim(0, -1))
    torch.testing.assert_close(t.on_grid(grid), t(grid.points(dtype=F64)), atol=1e-10, rtol=0)


def test_displacement_field_from_transform():
    grid = _oblique(3, (5, 4, 3))
    rigid = Rigid(3, center=grid.center, angles=[0.1, 0.0, 0.2], dtype=F64)
    t = DisplacementField.from_transform(rigid, grid)
    torch.testing.assert_close(t.on_grid(grid), rigid.on_grid(grid), atol=1e-10, rtol=0)


def test_displacement_field_bad_shape():
    grid = Grid((4, 5))
    with pytest.raises(GeometryError):
        DisplacementField(torch.zeros(2, 4, 5), grid)
    with pytest.raises(GeometryError):
        DisplacementField(torch.zeros(2, 5, 4), grid)(torch.zeros(3, 3))


@pytest.mark.parametrize("ndim", [2, 3])
def test_svf_constant_velocity_is_a_translation(ndim):
    grid = _oblique(ndim, (8, 7, 6)[:ndim])
    v = torch.tensor([1.3, -0.7, 0.4][:ndim], dtype=F64)
    velocity = v.view(ndim, *([1] * ndim)).expand(ndim, *grid.shape).clone()
    t = StationaryVelocityField(grid, velocity, steps=6)
    disp = t.displacement_field()
    torch.testing.assert_close(disp, velocity, atol=1e-9, rtol=0)


def test_svf_zero_velocity_and_zero_steps():
    grid = Grid((6, 5))
    t = StationaryVelocityField(grid, dtype=F64)
    torch.testing.assert_close(t.on_grid(grid), grid.points(dtype=F64))
    v = _smooth_field(grid, 0.3)
    t0 = StationaryVelocityField(grid, v, steps=0)
    torch.testing.assert_close(t0.displacement_field(), v)
    with pytest.raises(ConfigError):
        StationaryVelocityField(grid, steps=-1)


@pytest.mark.parametrize("ndim", [2, 3])
def test_svf_inverse_composes_to_identity(ndim):
    grid = Grid((24, 22, 12)[:ndim], (1.0, 1.0, 2.0)[:ndim])
    v = _smooth_field(grid, amplitude=1.0)
    t = StationaryVelocityField(grid, v, steps=7)
    both = Compose(t, t.inverse())
    mapped = both.on_grid(grid).detach()
    pts = grid.points(dtype=F64)
    # Away from the border (where the composition samples outside the field).
    inner = tuple(slice(3, -3) for _ in range(ndim))
    err = (mapped - pts)[inner].norm(dim=-1)
    assert float(err.max()) < 0.05  # displacements are up to ~1.7 mm
    assert float(t.displacement_field().detach().abs().max()) > 0.9
    # The map itself on its grid equals the general path (interpolation at voxel centres).
    torch.testing.assert_close(t.on_grid(grid), t(pts), atol=1e-9, rtol=0)


def _gradcheck_module(module, name, value, *args):
    def call(p, *a):
        return torch.func.functional_call(module, {name: p}, a)

    return torch.autograd.gradcheck(call, (value, *args), fast_mode=True)


@pytest.mark.parametrize("ndim", [2, 3])
def test_gradcheck(ndim):
    grid = _oblique(ndim, (4, 3, 3)[:ndim])
    field = _random_field(grid, scale=0.3).requires_grad_(True)
    g = torch.Generator().manual_seed(2)
    index = torch.rand(5, ndim, generator=g, dtype=F64) * (torch.tensor(grid.size) - 1.2) + 0.1
    pts = grid.index_to_world(index).requires_grad_(True)
    t = DisplacementField(field.detach(), grid)
    assert _gradcheck_module(t, "field", field, pts)
    svf = StationaryVelocityField(grid, field.detach(), steps=3)
    assert _gradcheck_module(svf, "velocity", field, pts)

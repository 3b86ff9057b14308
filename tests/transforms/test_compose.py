"""Composition against SimpleITK's CompositeTransform."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from itreg.errors import ConfigError, GeometryError
from itreg.grid import Grid
from itreg.transforms import (
    Affine,
    BSpline,
    Compose,
    DisplacementField,
    Identity,
    Rigid,
    Transform,
    Translation,
)

F64 = torch.float64


def _grid() -> Grid:
    c, s = math.cos(0.3), math.sin(0.3)
    return Grid((12, 10, 8), (1.5, 2.0, 2.5), (3.0, -4.0, 5.0),
                (c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0))


def _affine(seed: int, center) -> Affine:
    g = torch.Generator().manual_seed(seed)
    a = torch.eye(3, dtype=F64) + 0.1 * torch.randn(3, 3, generator=g, dtype=F64)
    t = torch.randn(3, generator=g, dtype=F64) * 3
    return Affine(3, center=center, translation=t, matrix=a, dtype=F64)


def _sitk_affine(t) -> sitk.AffineTransform:
    return sitk.AffineTransform(t.matrix().detach().numpy().ravel().tolist(),
                                t.translation.detach().tolist(), t.center.tolist())


def _bspline(grid: Grid) -> BSpline:
    b = BSpline(grid, 6.0, dtype=F64)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        b.coefficients.copy_(torch.randn(b.coefficients.shape, generator=g, dtype=F64))
    return b


def _points(grid: Grid, n: int = 100) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    index = torch.rand(n, grid.ndim, generator=g, dtype=F64) * (torch.tensor(grid.size) - 1)
    return grid.index_to_world(index)


def test_order_and_sitk_composite():
    grid = _grid()
    a = _affine(0, grid.center)
    b = _bspline(grid)
    comp = Compose(a, b)
    pts = _points(grid)
    torch.testing.assert_close(comp(pts), a(b(pts)))
    ref = sitk.CompositeTransform(3)
    ref.AddTransform(_sitk_affine(a))
    fixed, params = b.to_itk_parameters()
    sb = sitk.BSplineTransform(3, 3)
    sb.SetFixedParameters(fixed)
    sb.SetParameters(params)
    ref.AddTransform(sb)
    expected = torch.tensor([ref.TransformPoint(p) for p in pts.tolist()], dtype=F64)
    torch.testing.assert_close(comp(pts).detach(), expected, atol=1e-4, rtol=0)


def test_on_grid_uses_inner_fast_path():
    grid = _grid()
    comp = Compose(_affine(1, grid.center), _bspline(grid))
    torch.testing.assert_close(comp.on_grid(grid), comp(grid.points(dtype=F64)), atol=1e-10,
                               rtol=0)
    field = torch.randn((3, *grid.shape), dtype=F64, generator=torch.Generator().manual_seed(0))
    comp2 = Compose(_affine(2, grid.center), DisplacementField(field, grid))
    torch.testing.assert_close(comp2.on_grid(grid), comp2(grid.points(dtype=F64)), atol=1e-10,
                               rtol=0)


def test_linear_part_and_is_linear():
    grid = _grid()
    a, r = _affine(3, grid.center), Rigid(3, center=[1.0, 2.0, 3.0], angles=[0.1, 0.2, 0.3],
                                          translation=[1.0, 0.0, -1.0], dtype=F64)
    tr = Translation(3, translation=[0.5, 0.5, 0.5], dtype=F64)
    comp = Compose(a, Compose(r, Identity(3)), tr)
    assert comp.is_linear
    lin = comp.linear_part()
    assert isinstance(lin, Affine)
    pts = _points(grid)
    torch.testing.assert_close(lin(pts), comp(pts), atol=1e-9, rtol=0)
    assert Compose(a, _bspline(grid)).linear_part() is None
    assert not Compose(a, _bspline(grid)).is_linear
    inv = comp.inverse()
    torch.testing.assert_close(inv(comp(pts)), pts, atol=1e-9, rtol=0)


def test_parameters_and_scales_align():
    grid = _grid()
    a, b = _affine(4, grid.center), _bspline(grid)
    comp = Compose(a, b, a)  # a shared transform appears once in parameters()
    scales = comp.parameter_scales(50.0)
    params = list(comp.parameters())
    assert len(scales) == len(params) == 3
    for p, s in zip(params, scales):
        assert p.shape == s.shape
    assert isinstance(comp.transforms, torch.nn.ModuleList)
    assert len(comp) == 3 and comp[1] is b


def test_bad_input():
    with pytest.raises(ConfigError):
        Compose()
    with pytest.raises(GeometryError):
        Compose(Translation(2), Translation(3))
    with pytest.raises(ConfigError):
        Compose(Translation(2), lambda x: x)
    class NoInverse(Transform):
        def forward(self, points):
            return points * 2

    with pytest.raises(ConfigError, match="NoInverse"):
        Compose(Translation(3), NoInverse(3)).inverse()


def test_gradcheck():
    grid = Grid((4, 4), (2.0, 2.0))
    a = Affine(2, center=[3.0, 3.0], translation=[0.2, -0.1], matrix=np.eye(2) * 1.1, dtype=F64)
    b = BSpline(grid, 4.0, dtype=F64)
    comp = Compose(a, b)
    pts = _points(grid, 4).requires_grad_(True)
    names = [n for n, _ in comp.named_parameters()]
    values = tuple(p.detach().clone().requires_grad_(True) for p in comp.parameters())

    def call(p, *ps):
        return torch.func.functional_call(comp, dict(zip(names, ps)), (p,))

    assert torch.autograd.gradcheck(call, (pts, *values), fast_mode=True)

"""Inverses of every transform kind and ``compose``, against SimpleITK and closed forms."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from itreg import Grid
from itreg.errors import ConfigError, GeometryError
from itreg.transforms import (
    Affine,
    BSpline,
    Compose,
    DisplacementField,
    Identity,
    IterativeInverse,
    Rigid,
    StationaryVelocityField,
    Translation,
    compose,
    exportable,
    invert_points,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _smooth_bspline(ndim: int, seed: int, sigma: float = 1.5) -> tuple[BSpline, Grid]:
    grid = Grid((24,) * ndim if ndim == 2 else (16, 14, 12), (2.0,) * ndim,
                (-20.0,) * ndim)
    t = BSpline(grid, 12.0, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        t.coefficients.normal_(0.0, sigma, generator=gen)
    return t, grid


def _points(grid: Grid, n: int = 200, seed: int = 0, margin: float = 6.0) -> torch.Tensor:
    """Random points of the grid's extent, `margin` mm inside it (ITK's B-spline drops to zero
    displacement at the edge of its support, where the map has no inverse)."""
    gen = torch.Generator().manual_seed(seed)
    lo = torch.tensor(grid.origin, dtype=torch.float64) + margin
    hi = lo + torch.tensor([(s - 1) * h for s, h in zip(grid.size, grid.spacing)],
                           dtype=torch.float64) - 2 * margin
    return lo + (hi - lo) * torch.rand(n, grid.ndim, generator=gen, dtype=torch.float64)


@pytest.mark.parametrize("ndim", [2, 3])
def test_bspline_inverse_undoes_the_forward_map(ndim):
    t, grid = _smooth_bspline(ndim, seed=ndim)
    x = _points(grid)
    inv = t.inverse(tolerance_mm=1e-6)
    assert isinstance(inv, IterativeInverse)
    y = t(x)
    assert (y - x).norm(dim=-1).max() > 1.0  # a real deformation
    np.testing.assert_allclose(inv(y).numpy(), x.numpy(), atol=1e-5)
    np.testing.assert_allclose(t(inv(x)).detach().numpy(), x.numpy(), atol=1e-5)
    assert inv.last_residual_mm < 1e-5
    assert inv.inverse() is t


def test_displacement_field_inverse_matches_simpleitk_invert_displacement_field():
    t, grid = _smooth_bspline(3, seed=7, sigma=1.0)
    field = DisplacementField.from_transform(t, grid, learnable=False, dtype=torch.float64)
    ours = DisplacementField.from_transform(field.inverse(tolerance_mm=1e-6), grid,
                                            learnable=False, dtype=torch.float64)
    img = sitk.GetImageFromArray(torch.movedim(field.field, 0, -1).numpy(), isVector=True)
    img.SetSpacing(grid.spacing)
    img.SetOrigin(grid.origin)
    ref = sitk.InvertDisplacementField(img, maximumNumberOfIterations=200,
                                       maxErrorToleranceThreshold=1e-6,
                                       meanErrorToleranceThreshold=1e-7,
                                       enforceBoundaryCondition=False)
    ref_arr = sitk.GetArrayFromImage(ref)  # (Z, Y, X, 3)
    ours_arr = torch.movedim(ours.field, 0, -1).numpy()
    inner = (slice(2, -2),) * 3  # ITK's boundary handling differs at the edge voxels
    diff = np.abs(ours_arr[inner] - ref_arr[inner]).max()
    assert diff < 0.02, diff
    # Both invert the same field: ours to the tolerance, ITK's to its own threshold.
    x = grid.points(dtype=torch.float64)[inner].reshape(-1, 3)
    back = field(ours(x))
    assert (back - x).norm(dim=-1).max() < 1e-3


def test_constant_displacement_inverts_to_the_opposite_shift():
    grid = Grid((20, 20), (1.0, 1.0))
    field = torch.zeros(2, 20, 20, dtype=torch.float64)
    field[0] = 1.5
    field[1] = -0.5
    t = DisplacementField(field, grid, learnable=False)
    y = torch.tensor([[8.0, 9.0], [12.25, 3.5]], dtype=torch.float64)
    np.testing.assert_allclose(t.inverse()(y).detach().numpy(), (y - torch.tensor([1.5, -0.5])).numpy(),
                               atol=1e-6)


def test_velocity_field_inverse_is_the_negated_velocity():
    grid = Grid((16, 16), (1.0, 1.0))
    y, x = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    v = torch.stack([0.8 * torch.sin(y / 4), 0.6 * torch.cos(x / 5)]).double()
    t = StationaryVelocityField(grid, v, steps=8)
    inv = t.inverse()
    p = grid.points(dtype=torch.float64)[3:-3, 3:-3].reshape(-1, 2)
    assert (inv(t(p)) - p).norm(dim=-1).max() < 0.02
    np.testing.assert_allclose(inv.velocity.detach().numpy(), -v.numpy())


def test_linear_composite_and_identity_inverses_are_exact():
    a = Affine(3, center=(1.0, 2.0, 3.0), translation=(4.0, -5.0, 6.0),
               matrix=[[1.1, 0.2, 0.0], [0.0, 0.9, 0.1], [0.05, 0.0, 1.2]], dtype=torch.float64)
    r = Rigid(3, center=(0.0, 1.0, 0.0), translation=(1.0, 2.0, 3.0), angles=(0.1, -0.2, 0.3),
              dtype=torch.float64)
    b, grid = _smooth_bspline(3, seed=1)
    chain = Compose(a, b, r)
    x = _points(grid, 50)
    inv = chain.inverse()
    np.testing.assert_allclose(inv(chain(x)).detach().numpy(), x.numpy(), atol=3e-4)  # 1e-4 mm default
    assert isinstance(Identity(2).inverse(), Identity)
    np.testing.assert_allclose(a.inverse()(a(x)).detach().numpy(), x.numpy(), atol=1e-10)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 10_000), sigma=st.floats(0.2, 2.0), ndim=st.sampled_from([2, 3]))
def test_forward_of_inverse_is_identity_for_random_ffds(seed, sigma, ndim):
    t, grid = _smooth_bspline(ndim, seed, sigma)
    x = _points(grid, 64, seed)
    w, res = invert_points(t, x, tolerance_mm=1e-7)
    assert float(res.max()) < 1e-6
    np.testing.assert_allclose(t(w).detach().numpy(), x.numpy(), atol=1e-6)


def test_invert_points_checks_its_settings():
    t, _ = _smooth_bspline(2, 0)
    with pytest.raises(ConfigError, match="max_iterations"):
        invert_points(t, torch.zeros(1, 2), max_iterations=0)
    with pytest.raises(ConfigError, match="tolerance"):
        invert_points(t, torch.zeros(1, 2), tolerance_mm=0.0)


# ---------------------------------------------------------------------------- compose
def _sitk_affine(t: Affine) -> sitk.AffineTransform:
    out = sitk.AffineTransform(t.ndim)
    out.SetMatrix(t.matrix().detach().double().numpy().ravel().tolist())
    out.SetTranslation(t.translation.detach().double().numpy().tolist())
    out.SetCenter(t.center.detach().double().numpy().tolist())
    return out


def test_compose_matches_simpleitk_composite_order_and_merges_linear_runs():
    a = Affine(2, center=(3.0, 1.0), translation=(2.0, -1.0), matrix=[[1.2, 0.1], [0.0, 0.8]],
               dtype=torch.float64)
    r = Rigid(2, center=(-2.0, 5.0), translation=(0.5, 0.25), angles=(0.4,), dtype=torch.float64)
    s = Translation(2, translation=(-3.0, 7.0), dtype=torch.float64)
    out = compose(a, Compose(r, Identity(2)), s)
    assert isinstance(out, Affine)
    ref = sitk.CompositeTransform([_sitk_affine(a), _sitk_affine(r.to_affine()),
                                   _sitk_affine(s.to_affine())])
    pts = np.random.default_rng(0).uniform(-50, 50, (30, 2))
    expected = np.array([ref.TransformPoint(tuple(p)) for p in pts])
    np.testing.assert_allclose(out(torch.as_tensor(pts)).detach().numpy(), expected, atol=1e-9)
    b, _ = _smooth_bspline(2, 3)
    mixed = compose(a, r, b, s)
    assert isinstance(mixed, Compose) and len(mixed) == 3
    x = torch.as_tensor(pts)
    np.testing.assert_allclose(mixed(x).detach().numpy(), a(r(b(s(x)))).detach().numpy(),
                               atol=1e-9)
    assert isinstance(compose(Identity(3)), Identity)
    assert compose(b) is b


def test_compose_refuses_mixed_dimensions_and_non_transforms():
    with pytest.raises(GeometryError):
        compose(Affine(2), Affine(3))
    with pytest.raises(ConfigError):
        compose(Affine(2), "rigid")
    with pytest.raises(ConfigError):
        compose()


def test_exportable_turns_velocity_fields_into_their_displacement_field():
    grid = Grid((10, 9), (1.5, 1.0))
    v = torch.randn(2, 9, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    svf = StationaryVelocityField(grid, v, steps=6)
    chain = Compose(Translation(2, translation=(1.0, 2.0), dtype=torch.float64), svf)
    out = exportable(chain)
    assert isinstance(out[1], DisplacementField)
    p = _points(grid, 40)
    np.testing.assert_allclose(out(p).detach().numpy(), chain(p).detach().numpy(), atol=1e-10)


def test_strong_expansion_is_inverted_by_the_newton_fallback():
    """T(x) = x + 5 (x - 20) along x: six-fold expansion, where the fixed-point map is no
    contraction; the inverse is (y + 100) / 6 exactly."""
    grid = Grid((41, 5), (1.0, 1.0))
    field = torch.zeros(2, 5, 41, dtype=torch.float64)
    field[0] = 5.0 * (torch.arange(41, dtype=torch.float64) - 20.0)
    t = DisplacementField(field, grid, learnable=False)
    y = torch.tensor([[26.0, 2.0], [14.0, 1.0], [38.0, 3.0]], dtype=torch.float64)
    w, res = invert_points(t, y, tolerance_mm=1e-8)
    assert float(res.max()) < 1e-8
    np.testing.assert_allclose(w[:, 0].numpy(), ((y[:, 0] + 100) / 6).numpy(), atol=1e-8)


@st.composite
def _affines(draw, ndim=3):
    m = np.eye(ndim) + np.array(draw(st.lists(st.floats(-0.3, 0.3), min_size=ndim * ndim,
                                               max_size=ndim * ndim))).reshape(ndim, ndim)
    t = draw(st.lists(st.floats(-20, 20), min_size=ndim, max_size=ndim))
    c = draw(st.lists(st.floats(-50, 50), min_size=ndim, max_size=ndim))
    return Affine(ndim, center=c, translation=t, matrix=m, dtype=torch.float64)


@settings(max_examples=25, deadline=None)
@given(chain=st.lists(_affines(), min_size=1, max_size=4))
def test_compose_and_inverse_of_random_affine_chains_match_simpleitk(chain):
    ref = sitk.CompositeTransform([_sitk_affine(a) for a in chain])
    pts = np.random.default_rng(len(chain)).uniform(-60, 60, (10, 3))
    merged = compose(*chain)
    expected = np.array([ref.TransformPoint(tuple(p)) for p in pts])
    np.testing.assert_allclose(merged(torch.as_tensor(pts)).detach().numpy(), expected,
                               atol=1e-6)
    if abs(np.linalg.det(merged.matrix().detach().numpy())) > 1e-3:
        inv = merged.inverse()
        np.testing.assert_allclose(inv(torch.as_tensor(expected)).detach().numpy(), pts,
                                   atol=1e-5)


def test_field_edge_voxels_agree_in_float32_float64_and_simpleitk():
    """A coarse field whose extent ends exactly on the fixed grid's edge voxels (as the engine's
    pyramid builds them): those voxels are inside in float32 and float64 alike, as in ITK."""
    direction = (-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0)
    coarse = Grid((33, 39, 31), (6.0, 6.0, 6.0), (96.0, 132.0, -68.0), direction)
    fine = Grid((66, 78, 63), (3.0, 3.0, 3.0), (97.5, 133.5, -71.0), direction)
    field = torch.randn(3, 31, 39, 33, generator=torch.Generator().manual_seed(0),
                        dtype=torch.float64)
    t = DisplacementField(field, coarse, learnable=False)
    edge = fine.points(dtype=torch.float64)[0]  # the first z slice, on the field's edge
    d64 = t(edge) - edge
    d32 = t.to(torch.float32)(edge.float()) - edge.float()
    assert d64.abs().min() > 0  # inside the field: non-zero displacement
    np.testing.assert_allclose(d32.detach().numpy(), d64.detach().numpy(), atol=1e-4)
    img = sitk.GetImageFromArray(torch.movedim(field, 0, -1).numpy(), isVector=True)
    img.SetSpacing(coarse.spacing)
    img.SetOrigin(coarse.origin)
    img.SetDirection(direction)
    ref = sitk.DisplacementFieldTransform(img)
    pts = edge.reshape(-1, 3)[::37].numpy()
    expected = np.array([np.subtract(ref.TransformPoint(tuple(p)), p) for p in pts])
    np.testing.assert_allclose(d64.reshape(-1, 3)[::37].detach().numpy(), expected, atol=1e-9)

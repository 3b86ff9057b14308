"""Grid conversions against SimpleITK and round-trip properties."""

import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from itreg.errors import ConfigError, GeometryError
from itreg.grid import Frame, Grid


def random_direction(ndim, seed):
    rng = np.random.default_rng(seed)
    q, r = np.linalg.qr(rng.normal(size=(ndim, ndim)))
    q = q * np.sign(np.diag(r))
    return tuple(q.ravel())


def sitk_image(grid):
    img = sitk.Image(list(grid.size), sitk.sitkFloat32)
    img.SetSpacing(grid.spacing)
    img.SetOrigin(grid.origin)
    img.SetDirection(grid.direction)
    return img


grids = st.builds(
    lambda ndim, size, spacing, origin, seed: Grid(
        tuple(size[:ndim]), tuple(spacing[:ndim]), tuple(origin[:ndim]),
        random_direction(ndim, seed),
    ),
    st.sampled_from([2, 3]),
    st.lists(st.integers(1, 40), min_size=3, max_size=3),
    st.lists(st.floats(0.1, 5.0), min_size=3, max_size=3),
    st.lists(st.floats(-200, 200), min_size=3, max_size=3),
    st.integers(0, 10_000),
)


@settings(max_examples=60, deadline=None)
@given(grids)
def test_index_to_world_matches_simpleitk(grid):
    img = sitk_image(grid)
    rng = np.random.default_rng(0)
    idx = rng.uniform(-2, np.asarray(grid.size) + 1, size=(5, grid.ndim))
    ours = grid.index_to_world(torch.as_tensor(idx, dtype=torch.float64)).numpy()
    ref = np.array([img.TransformContinuousIndexToPhysicalPoint(tuple(i)) for i in idx])
    np.testing.assert_allclose(ours, ref, atol=1e-9, rtol=1e-9)


@settings(max_examples=60, deadline=None)
@given(grids, st.sampled_from(list(Frame)), st.sampled_from(list(Frame)))
def test_conversions_round_trip(grid, src, dst):
    rng = np.random.default_rng(1)
    world = torch.as_tensor(rng.uniform(-100, 100, size=(7, grid.ndim)), dtype=torch.float64)
    if any(n == 1 for n in grid.size) and Frame.NORMALIZED in (src, dst):
        return  # a single-voxel axis has no normalised extent (all points map to index 0)
    pts = grid.convert(world, Frame.WORLD, src)
    back = grid.convert(grid.convert(pts, src, dst), dst, Frame.WORLD)
    np.testing.assert_allclose(back.numpy(), world.numpy(), atol=1e-7)


def test_points_are_voxel_centres_in_tensor_order():
    grid = Grid((4, 3, 2), (1.0, 2.0, 3.0), (10.0, 20.0, 30.0), random_direction(3, 5))
    img = sitk_image(grid)
    pts = grid.points(torch.float64)
    assert pts.shape == (2, 3, 4, 3)
    for k, j, i in [(0, 0, 0), (1, 2, 3), (1, 0, 2)]:
        np.testing.assert_allclose(pts[k, j, i].numpy(), img.TransformIndexToPhysicalPoint((i, j, k)))


def test_normalized_corners_match_grid_sample_convention():
    grid = Grid((5, 7), (0.5, 2.0), (3.0, -1.0), random_direction(2, 3))
    corners = grid.world_to_normalized(grid.corners())
    assert torch.allclose(corners.abs(), torch.ones_like(corners))
    # grid_sample with align_corners=True reads voxel (i, j) at the normalised coordinate.
    data = torch.arange(35, dtype=torch.float64).reshape(1, 1, 7, 5)
    pts = grid.points(torch.float64)
    n = grid.world_to_normalized(pts)[None]
    out = torch.nn.functional.grid_sample(data, n, align_corners=True)
    torch.testing.assert_close(out, data)


def test_shrink_matches_simpleitk_shrink_filter():
    grid = Grid((17, 12, 9), (1.0, 1.5, 2.0), (5.0, 6.0, 7.0), random_direction(3, 7))
    img = sitk_image(grid)
    shrunk = sitk.Shrink(img, [2, 3, 2])
    ours = grid.shrink((2, 3, 2))
    assert ours.size == shrunk.GetSize()
    np.testing.assert_allclose(ours.spacing, shrunk.GetSpacing())
    np.testing.assert_allclose(ours.origin, shrunk.GetOrigin(), atol=1e-9)
    assert math.isclose(ours.radius(), grid.radius(), rel_tol=0.2)


def test_invalid_grids_raise():
    with pytest.raises(ConfigError):
        Grid((4, 4), (-1.0, 1.0))
    with pytest.raises(GeometryError):
        Grid((4, 4), direction=(1.0, 0.0, 1.0, 0.0))
    with pytest.raises(GeometryError):
        Grid((4,))
    with pytest.raises(GeometryError):
        Grid((10**5, 10**5, 10**5))

"""Mask bounding boxes and centroids in world space."""

import pytest
import torch

from itreg.errors import MaskError
from itreg.grid import Grid
from itreg.phantoms._geometry import bounding_corners, centroid, index_bounds


def test_bounds_corners_and_centroid_on_an_oblique_grid():
    grid = Grid((6, 5, 4), (1.0, 2.0, 3.0), (5.0, -2.0, 1.0), [0, -1, 0, 1, 0, 0, 0, 0, 1])
    inside = torch.zeros(grid.shape, dtype=torch.bool)
    inside[1:3, 2, 1:5] = True  # z 1..2, y 2, x 1..4
    assert index_bounds(inside) == [(1, 4), (2, 2), (1, 2)]
    corners = bounding_corners(grid, inside)
    assert corners.shape == (8, 3)
    points = grid.points(dtype=torch.float64)[inside]
    lo, hi = corners.min(0).values, corners.max(0).values
    assert torch.all(points >= lo - 1e-9) and torch.all(points <= hi + 1e-9)
    assert torch.allclose(centroid(grid, inside), points.mean(0))
    with pytest.raises(MaskError):
        index_bounds(torch.zeros(3, 3, dtype=torch.bool))
    with pytest.raises(MaskError):
        centroid(Grid((3, 3)), torch.zeros(3, 3, dtype=torch.bool))

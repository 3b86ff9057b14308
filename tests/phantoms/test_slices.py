"""Axial slices keep the world positions of their voxels."""

import numpy as np
import pytest
import torch

from itreg.errors import ConfigError, GeometryError
from itreg.grid import Grid
from itreg.image import Image
from itreg.phantoms import axial_slice, axial_slices


def test_slice_world_positions():
    grid = Grid((5, 4, 6), (1.5, 2.0, 3.0), (10.0, 20.0, -30.0), np.diag([-1.0, -1.0, 1.0]))
    data = torch.randn(2, 6, 4, 5)
    img = Image(data, grid)
    out = axial_slice(img, 2)
    assert out.ndim == 2 and out.data.shape == (2, 4, 5)
    assert torch.equal(out.data, data[:, 2])
    p3 = grid.points(dtype=torch.float64)[2]  # (Y, X, 3) at k = 2
    p2 = out.grid.points(dtype=torch.float64)
    assert torch.allclose(p2, p3[..., :2])
    assert axial_slice(img).grid.same_as(axial_slice(img, 3).grid)  # middle = size // 2
    lab = Image(torch.zeros(1, 6, 4, 5, dtype=torch.uint8), grid)
    sl = axial_slices({"a": img, "m": lab}, 1)
    assert sl["m"].is_label and sl["m"].dtype == torch.uint8 and not sl["a"].is_label


def test_slice_errors():
    oblique = Grid((4, 4, 4), direction=[1, 0, 0, 0, 0.8, -0.6, 0, 0.6, 0.8])
    with pytest.raises(GeometryError, match="oblique"):
        axial_slice(Image(torch.zeros(1, 4, 4, 4), oblique))
    with pytest.raises(ConfigError):
        axial_slice(Image(torch.zeros(1, 4, 4, 4), Grid((4, 4, 4))), 4)
    with pytest.raises(GeometryError):
        axial_slice(Image(torch.zeros(1, 4, 4), Grid((4, 4))))

"""Image container behaviour."""

import pytest
import torch

from itreg.errors import GeometryError, InvalidImageError
from itreg.grid import Grid
from itreg.image import Image


def test_shape_and_label_flag_follow_data():
    grid = Grid((4, 3, 2))
    img = Image(torch.zeros(2, 3, 4), grid)
    assert img.channels == 1 and img.data.shape == (1, 2, 3, 4) and not img.is_label
    lab = Image(torch.zeros(1, 2, 3, 4, dtype=torch.uint8), grid)
    assert lab.is_label and lab.dtype == torch.uint8
    assert lab.float().is_label  # values are still labels after a cast


def test_mismatched_tensor_raises():
    with pytest.raises(GeometryError):
        Image(torch.zeros(4, 3, 2), Grid((4, 3, 2)))  # tensor must be (C, Z, Y, X)


def test_content_checks():
    img = Image.from_tensor(torch.ones(5, 5), spacing=(1.0, 2.0))
    assert img.grid.spacing == (1.0, 2.0)
    with pytest.raises(InvalidImageError, match="constant"):
        img.check_not_constant("fixed image")
    bad = img.data.clone()
    bad[0, 0, 0] = float("nan")
    bad[0, 1, 1] = float("inf")
    with pytest.raises(InvalidImageError, match="2 NaN/Inf"):
        img.with_data(bad).check_finite()

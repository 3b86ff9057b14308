"""Gaussian smoothing in mm and multi-resolution levels."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from itreg.engine.pyramid import Pyramid, gaussian_kernel, smooth_axis, smooth_image
from itreg.grid import Grid
from itreg.image import Image


@pytest.mark.parametrize("stride", [1, 2, 3])
@pytest.mark.parametrize("dim", [1, 2, 3])
def test_smooth_axis_matches_replicate_padded_conv(dim, stride):
    x = torch.randn(1, 11, 14, 9, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out = smooth_axis(x, dim, 1.3, stride)
    k = gaussian_kernel(1.3, torch.float64)
    r = k.numel() // 2
    moved = x.movedim(dim, -1)
    rows = F.pad(moved.reshape(-1, 1, moved.shape[-1]), (r, r), mode="replicate")
    ref = F.conv1d(rows, k.view(1, 1, -1), stride=stride)
    ref = ref.reshape(*moved.shape[:-1], -1).movedim(-1, dim)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref)


def test_smoothing_sigma_is_in_mm_per_axis():
    """A delta smoothed with sigma in mm has that standard deviation in mm along every axis,
    whatever the (anisotropic) spacing."""
    grid = Grid((41, 31, 21), (0.5, 1.0, 2.0))
    data = torch.zeros(grid.shape, dtype=torch.float64)
    data[10, 15, 20] = 1.0
    out = smooth_image(Image(data, grid), 3.0).data[0]
    assert float(out.sum()) == pytest.approx(1.0, rel=1e-6)
    for axis, spacing in zip(range(3), (2.0, 1.0, 0.5)):  # tensor axes z, y, x
        profile = out.sum(dim=tuple(a for a in range(3) if a != axis))
        pos = torch.arange(profile.numel(), dtype=torch.float64) * spacing
        mean = float((profile * pos).sum())
        std = math.sqrt(float((profile * (pos - mean) ** 2).sum()))
        assert std == pytest.approx(3.0, rel=0.06)


def test_smooth_image_decimated_grid():
    grid = Grid((10, 7), (1.0, 2.0), (5.0, -3.0))
    img = Image(torch.rand(grid.shape), grid)
    out = smooth_image(img, 0.0, (2, 3))
    assert out.grid.size == (5, 3) and out.grid.spacing == (2.0, 6.0)
    assert out.grid.origin == grid.origin
    torch.testing.assert_close(out.data[0], img.data[0, ::3, ::2])


def test_pyramid_levels_grids_masks_and_cache():
    grid = Grid((40, 36), (1.0, 1.5), (2.0, 3.0))
    fixed = Image(torch.rand(grid.shape), grid)
    moving = Image(torch.rand(30, 30), Grid((30, 30), (2.0, 2.0)))
    mask = torch.zeros(grid.shape, dtype=torch.bool)
    mask[5:30, 10:35] = True
    pyr = Pyramid(fixed, moving, mask)
    levels = pyr.levels([4, 2, 1], [2.0, 1.0, 0.0])
    assert [lv.index for lv in levels] == [0, 1, 2]
    for lv, f in zip(levels, (4, 2, 1)):
        assert lv.grid.same_as(grid.shrink(f))
        assert lv.fixed.grid.same_as(lv.grid)
        assert lv.fixed_mask.shape == lv.grid.shape and lv.fixed_mask.dtype == torch.bool
        # the moving image keeps its own grid, at a spacing close to the level's
        assert max(lv.moving.grid.spacing) <= max(2.0, min(lv.grid.spacing)) + 1e-9
    assert levels[-1].fixed is fixed and levels[-1].moving is moving
    assert torch.equal(levels[-1].fixed_mask, mask)
    # masks follow by nearest neighbour: a coarse mask covers about the same area
    area = [float(lv.fixed_mask.sum()) * math.prod(lv.grid.spacing) for lv in levels]
    assert area[0] == pytest.approx(area[2], rel=0.25)
    again = pyr.levels([2], [1.0])[0]
    assert again.fixed is levels[1].fixed  # cached across stages


def test_pyramid_follows_dtype_and_device():
    grid = Grid((16, 16))
    fixed = Image(torch.rand(grid.shape, dtype=torch.float64), grid)
    pyr = Pyramid(fixed, fixed)
    level = pyr.levels([2], [1.0])[0]
    assert level.fixed.dtype == torch.float64 and level.moving.dtype == torch.float64

"""Canny edges: thin, on the boundaries, 2D and 3D, anisotropic spacing."""

import math

import numpy as np
import pytest
import torch
from scipy import ndimage

from itreg.errors import ConfigError
from itreg.grid import Grid
from itreg.image import Image
from itreg.phantoms.edges import canny, t1_edges
from itreg.phantoms.slices import axial_slices


def _disc(spacing, radius=20.0, size=(64, 64)):
    g = Grid(size, spacing, (0.0, 0.0))
    c = torch.tensor(g.center, dtype=torch.float64)
    r = (g.points(dtype=torch.float64) - c).norm(dim=-1)
    return Image((r <= radius)[None].to(torch.float32), g, False), r


@pytest.mark.parametrize("spacing", [(1.0, 1.0), (1.0, 1.5)])
def test_disc_edges_thin_and_on_the_circle(spacing):
    img, r = _disc(spacing)
    e = canny(img, sigma_mm=1.0)
    on = e.data[0] != 0
    assert e.data.dtype == torch.uint8 and e.is_label
    # Located: every edge voxel within one voxel of the true circle.
    dist = (r[on] - 20.0).abs()
    assert float(dist.max()) <= max(spacing)
    # Thin: about one voxel per unit of perimeter (a 2-voxel band would double this).
    length = 2 * math.pi * 20.0 / (sum(spacing) / 2)
    assert 0.7 * length < int(on.sum()) < 1.5 * length
    # Closed: it separates inside from outside.
    _lab, n = ndimage.label(~on.numpy())
    assert n >= 2


def test_3d_sphere_and_mask():
    g = Grid((40, 40, 40), (1.0, 1.0, 1.0), (0, 0, 0))
    c = torch.tensor(g.center, dtype=torch.float64)
    r = (g.points(dtype=torch.float64) - c).norm(dim=-1)
    img = Image((r <= 12.0)[None].to(torch.float32), g, False)
    on = canny(img).data[0] != 0
    assert float((r[on] - 12.0).abs().max()) <= 1.0
    assert 0.7 * 4 * math.pi * 144 < int(on.sum()) < 1.6 * 4 * math.pi * 144
    half = torch.zeros(1, *g.shape, dtype=torch.uint8)
    half[..., :20] = 1
    masked = canny(img, mask=Image(half, g, True)).data[0] != 0
    assert not bool(masked[..., 20:].any()) and bool(masked.any())


def test_t1_edges_follow_tissue_boundaries(mni4):
    s = axial_slices(mni4)
    e = t1_edges(s).data[0].numpy() != 0
    from itreg.phantoms import labels

    lab = labels(s).data[0].numpy()
    boundary = np.zeros_like(e)
    for a in range(lab.ndim):
        diff = np.diff(lab, axis=a) != 0
        sl_lo = [slice(None)] * lab.ndim
        sl_hi = [slice(None)] * lab.ndim
        sl_lo[a], sl_hi[a] = slice(None, -1), slice(1, None)
        boundary[tuple(sl_lo)] |= diff
        boundary[tuple(sl_hi)] |= diff
    near = ndimage.binary_dilation(boundary, iterations=1)
    assert e.sum() > 50
    assert (e & near).sum() / e.sum() > 0.9


def test_errors():
    img, _ = _disc((1.0, 1.0))
    with pytest.raises(ConfigError):
        canny(img, low=0.5, high=0.2)
    with pytest.raises(ConfigError):
        canny(img, sigma_mm=-1)
    assert int(canny(img.with_data(img.data * 0)).data.sum()) == 0

"""Small multi-contrast 2D groups built in code, shared by the groupwise tests.

A module of its own (not conftest.py): `from conftest import ...` resolves to whichever
conftest was imported first, so it breaks depending on which tests run together.
"""

from __future__ import annotations

import copy

import torch

from itreg.grid import Grid
from itreg.image import Image
from itreg.transforms import Rigid
from itreg.warp import resample

#: Intensity of classes (background, body, inner, spot) in three contrasts.
CONTRAST_TABLES = ((0.0, 0.5, 1.0, 0.2), (0.0, 0.9, 0.3, 1.0), (0.1, 0.6, 0.2, 0.9))


def phantom_labels(grid: Grid) -> torch.Tensor:
    """Asymmetric 4-class label map on a 2D or 3D `grid` (int64, ``grid.shape``): a body, an
    inner ellipse (ellipsoid) and a spot."""
    p = grid.points(dtype=torch.float64)
    c = torch.tensor(grid.center, dtype=torch.float64)
    x, y = (p[..., 0] - c[0]), (p[..., 1] - c[1])
    lab = torch.zeros(grid.shape, dtype=torch.int64)
    if grid.ndim == 2:
        lab[(x / 40) ** 2 + (y / 30) ** 2 < 1] = 1
        lab[((x - 8) / 18) ** 2 + ((y + 4) / 12) ** 2 < 1] = 2
        lab[(x + 20) ** 2 + (y - 12) ** 2 < 7 ** 2] = 3
        return lab
    z = p[..., 2] - c[2]
    lab[(x / 28) ** 2 + (y / 22) ** 2 + (z / 18) ** 2 < 1] = 1
    lab[((x - 6) / 12) ** 2 + ((y + 3) / 9) ** 2 + ((z - 2) / 8) ** 2 < 1] = 2
    lab[(x + 14) ** 2 + (y - 8) ** 2 + (z + 5) ** 2 < 6 ** 2] = 3
    return lab


def contrast_image(grid: Grid, table, seed: int, noise: float = 0.03) -> Image:
    """A smooth-edged contrast of the phantom with seeded Gaussian noise."""
    lab = phantom_labels(grid)
    data = torch.tensor(table, dtype=torch.float32)[lab]
    pool = torch.nn.functional.avg_pool2d if grid.ndim == 2 else torch.nn.functional.avg_pool3d
    data = pool(data[None, None], 3, 1, 1, count_include_pad=False)[0]
    gen = torch.Generator().manual_seed(seed)
    data = data + noise * torch.randn(data.shape, generator=gen)
    return Image(data, grid, is_label=False)


def make_group(shifts=None, angles=None, size=64, spacing=2.0, ndim=2):
    """Three contrasts moved by known transforms; returns (images, true transforms).

    True transform ``T_j`` maps the aligned phantom's points to image ``j``'s points, i.e.
    image j = phantom(T_j^{-1} x): resampling the phantom through ``T_j^{-1}``. The grid has
    `size` voxels of `spacing` mm per axis, centred on the origin; in 3D each angle is a
    triple.
    """
    half = size * spacing / 2
    grid = Grid((size,) * ndim, (spacing,) * ndim, (-half,) * ndim)
    n = len(CONTRAST_TABLES)
    shifts = shifts or [(0.0,) * ndim] * n
    angles = angles or [0.0 if ndim == 2 else (0.0, 0.0, 0.0)] * n
    images, truths = [], []
    for j, table in enumerate(CONTRAST_TABLES):
        base = contrast_image(grid, table, seed=j)
        angle = list(angles[j]) if ndim == 3 else [angles[j]]
        t = Rigid(ndim, center=grid.center, translation=shifts[j], angles=angle)
        warped = resample(base, t.inverse(), grid)
        images.append(warped.with_data(warped.data.detach()))
        truths.append(t)
    return images, truths


def residual_mm(result, truths, grid: Grid) -> float:
    """Mean RMS over images of the group-centred residual ``phi_j(x) - T_j(x)`` (gWI-like,
    Eqs. 49-50 with the truth composed as points map), in mm, over the whole grid."""
    pts = grid.points(dtype=torch.float64).reshape(-1, grid.ndim)
    with torch.no_grad():
        r = torch.stack([copy.deepcopy(phi).double()(pts) - copy.deepcopy(tj).double()(pts)
                         for phi, tj in zip(result.transforms, truths)])
    r = r - r.mean(dim=0, keepdim=True)
    return float(r.pow(2).sum(-1).mean(-1).sqrt().mean())

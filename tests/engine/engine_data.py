"""Synthetic images with known transforms for the engine tests (built in code, no files)."""

from __future__ import annotations

import math

import torch

from itreg.grid import Grid
from itreg.image import Image
from itreg.transforms import Transform


def _blob_params(grid: Grid, seed: int, n: int):
    g = torch.Generator().manual_seed(seed)
    c = torch.tensor(grid.center, dtype=torch.float64)
    ext = torch.tensor(grid.extent(), dtype=torch.float64)
    out = []
    for _ in range(n):
        mu = c + (torch.rand(grid.ndim, generator=g, dtype=torch.float64) - 0.5) * ext * 0.45
        s = (0.05 + 0.07 * torch.rand(1, generator=g, dtype=torch.float64)) * float(ext.min())
        a = 0.4 + torch.rand(1, generator=g, dtype=torch.float64)
        out.append((mu, s, a))
    return out


def blob_values(points: torch.Tensor, grid: Grid, seed: int = 0, n: int = 7) -> torch.Tensor:
    """The image function of :func:`blob_image` at world points ``(..., D)`` (float64): soft
    disks (balls) with edges about 1 mm wide, like tissue boundaries. Very smooth images
    (Gaussian blobs) would leave histogram metrics too weak a signal to be accurate."""
    pts = points.to(torch.float64)
    out = torch.zeros(pts.shape[:-1], dtype=torch.float64)
    for mu, s, a in _blob_params(grid, seed, n):
        dist = ((pts - mu) ** 2).sum(-1).sqrt()
        out += a * torch.sigmoid((1.5 * s - dist) / 1.0)
    return out


def blob_image(grid: Grid, seed: int = 0, n: int = 7) -> Image:
    """A piecewise-smooth image of overlapping soft disks of random positions, sizes and
    heights, zero near the border so that nothing is cut off by the field of view."""
    return Image(blob_values(grid.points(dtype=torch.float64), grid, seed, n).float(), grid)


def remap(image: Image) -> Image:
    """A non-monotone intensity remap (another 'modality' of the same anatomy)."""
    x = image.data / image.data.max()
    return image.with_data(1.0 - 0.8 * x + 1.6 * (x - 0.55) ** 2)


@torch.no_grad()
def make_pair(grid: Grid, true: Transform, multimodal: bool = True, seed: int = 0):
    """``(fixed, moving)`` with ``fixed(x) = base(true(x))`` evaluated in closed form (no
    interpolation) and ``moving = remap(base)``, so registering moving to fixed must recover
    ``true``."""
    base = blob_image(grid, seed)
    mapped = true.to(torch.float64)(grid.points(dtype=torch.float64))
    fixed = Image(blob_values(mapped, grid, seed).float(), grid)
    moving = remap(base) if multimodal else base
    return fixed, moving


@torch.no_grad()
def mean_error_vox(found: Transform, true: Transform, grid: Grid, margin: int = 0) -> float:
    """Mean distance (in voxels of `grid`) between the points mapped by both transforms, over
    the grid (without `margin` voxels at the border)."""
    pts = grid.points(dtype=torch.float64)
    if margin:
        sl = tuple(slice(margin, -margin) for _ in range(grid.ndim))
        pts = pts[sl]
    a = found.to(torch.float64)(pts)
    b = true.to(torch.float64)(pts)
    return float((a - b).norm(dim=-1).mean()) / min(grid.spacing)


def quick(**extra) -> dict:
    """Overrides that make a 2D registration of a ~64^2 image fast and still accurate."""
    out = {"shrink": [2, 1], "smoothing_mm": [1.0, 0.0], "iterations": [80, 60],
           "learning_rate": [1.0, 0.5], "sampling.count": 2048}
    out.update(extra)
    return out


RAD = math.pi / 180.0

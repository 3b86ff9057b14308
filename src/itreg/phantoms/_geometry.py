"""Cheap geometry of masks (private): index bounding boxes and their world corners."""

from __future__ import annotations

import itertools

import torch
from torch import Tensor

from itreg.errors import MaskError
from itreg.grid import Grid


def index_bounds(inside: Tensor) -> list[tuple[int, int]]:
    """First and last index of the nonzero voxels along each ITK axis.

    Args:
        inside: boolean tensor ``(*grid.shape)``.

    Returns:
        ``[(lo, hi), ...]`` per ITK axis ``(x, y[, z])``, inclusive.

    Raises:
        MaskError: if no voxel is set.
    """
    d = inside.dim()
    bounds = []
    for axis in range(d):
        dim = d - 1 - axis  # ITK axis a is tensor axis D - 1 - a (no channel axis here)
        others = tuple(i for i in range(d) if i != dim)
        hits = torch.nonzero(inside.any(dim=others) if others else inside).flatten()
        if hits.numel() == 0:
            raise MaskError("the mask is empty")
        bounds.append((int(hits[0]), int(hits[-1])))
    return bounds


def bounding_corners(grid: Grid, inside: Tensor, dtype=torch.float64) -> Tensor:
    """World points of the 2^D corners of the index bounding box of `inside`.

    Their convex hull contains every nonzero voxel centre, also after any affine map.

    Returns:
        Tensor ``(2^D, D)``.
    """
    bounds = index_bounds(inside)
    corners = torch.tensor(list(itertools.product(*bounds)), dtype=torch.float64,
                           device=inside.device)
    return grid.index_to_world(corners).to(dtype)


def centroid(grid: Grid, inside: Tensor) -> Tensor:
    """World centroid (float64, ``(D,)``) of the nonzero voxels of `inside`.

    Raises:
        MaskError: if no voxel is set.
    """
    idx = torch.nonzero(inside)  # (N, D) in tensor order (z, y, x)
    if idx.shape[0] == 0:
        raise MaskError("the mask is empty")
    mean = idx.to(torch.float64).mean(dim=0).flip(0)  # ITK order (x, y, z)
    return grid.index_to_world(mean)

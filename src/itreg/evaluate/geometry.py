"""Geometric error measures between transforms."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from itreg.errors import MaskError
from itreg.grid import Grid
from itreg.transforms.base import Transform


@dataclass(frozen=True)
class WarpingError:
    """Distances in mm between where two transforms send the same fixed-space points."""

    mean_mm: float
    p90_mm: float
    max_mm: float
    points: int

    def as_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def warping_error(
    found: Transform, true: Transform, grid: Grid, mask: Tensor | None = None
) -> WarpingError:
    """Compare ``found(x)`` with ``true(x)`` over the voxels of `grid` (inside `mask`).

    Both transforms map fixed-space world points to moving-space world points, so the error is
    ``|found(x) - true(x)|`` in mm, the registration error a user cares about.

    Args:
        found: the estimated transform.
        true: the ground-truth transform.
        grid: fixed-space grid whose voxel centres are the evaluation points.
        mask: optional ``grid.shape`` (or ``(1, *grid.shape)``) mask; nonzero voxels are used.
    """
    a = found.on_grid(grid, dtype=torch.float64)
    b = true.on_grid(grid, dtype=torch.float64, device=a.device)
    dist = torch.linalg.vector_norm(a - b, dim=-1)
    if mask is not None:
        m = torch.as_tensor(mask).reshape(grid.shape).to(dist.device) != 0
        if not bool(m.any()):
            raise MaskError("the evaluation mask is empty")
        dist = dist[m]
    dist = dist.flatten()
    return WarpingError(
        mean_mm=float(dist.mean()),
        p90_mm=float(torch.quantile(dist[:: max(1, dist.numel() // 1_000_000)], 0.9)),
        max_mm=float(dist.max()),
        points=int(dist.numel()),
    )

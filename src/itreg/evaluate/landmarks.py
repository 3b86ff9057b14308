"""Landmark errors in world mm: TRE over landmark pairs and paper 000's FRE."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from itreg.errors import ConfigError, GeometryError
from itreg.transforms.base import Transform


@dataclass(frozen=True)
class DistanceStats:
    """Summary of point distances in mm."""

    mean_mm: float
    std_mm: float
    median_mm: float
    p90_mm: float
    max_mm: float
    points: int

    def as_dict(self) -> dict:
        return asdict(self)


def distance_stats(distances: Tensor) -> DistanceStats:
    """Mean, std, median, 90th percentile and maximum of a 1-D tensor of distances (mm)."""
    d = torch.as_tensor(distances, dtype=torch.float64).flatten()
    if d.numel() == 0:
        raise ConfigError("no distances to summarise")
    std = float(d.std()) if d.numel() > 1 else 0.0
    return DistanceStats(float(d.mean()), std, float(d.median()), float(torch.quantile(d, 0.9)),
                         float(d.max()), int(d.numel()))


@torch.no_grad()
def target_registration_error(
    fixed_points: Tensor,
    moving_points: Tensor,
    transform: Transform | None = None,
) -> DistanceStats:
    """TRE: ``|T(p_i) - q_i|`` over corresponding landmarks, in mm.

    Args:
        fixed_points: ``(N, D)`` fixed-space landmarks ``p_i`` (world mm, ITK order), as
            :func:`itreg.io.read_landmarks` returns them.
        moving_points: ``(N, D)`` the corresponding moving-space landmarks ``q_i``.
        transform: the fixed -> moving transform; ``None`` gives the initial error
            ``|p_i - q_i|``.

    Returns:
        The :class:`DistanceStats`.

    Raises:
        GeometryError: different point counts or dimensions.
    """
    p = torch.as_tensor(fixed_points, dtype=torch.float64)
    q = torch.as_tensor(moving_points, dtype=torch.float64)
    if p.shape != q.shape or p.dim() != 2:
        raise GeometryError(
            f"landmark sets must be (N, D) with equal shapes, got {tuple(p.shape)} and "
            f"{tuple(q.shape)}"
        )
    if transform is not None:
        if transform.ndim != p.shape[1]:
            raise GeometryError(f"transform is {transform.ndim}D but landmarks are {p.shape[1]}D")
        dev = next((t.device for t in transform.parameters()), torch.device("cpu"))
        p = transform(p.to(dev)).to(torch.float64).cpu()
    return distance_stats((p - q).norm(dim=-1))


@torch.no_grad()
def fiducial_registration_error(found: Transform, true: Transform, points: Tensor) -> DistanceStats:
    """Paper 000's FRE: ``|T_found(p) - T_true(p)|`` over given points (world mm).

    Args:
        found: the estimated fixed -> moving transform.
        true: the ground-truth fixed -> moving transform.
        points: ``(N, D)`` fixed-space points (paper 000: 100 random points in the brain).

    Returns:
        The :class:`DistanceStats`.
    """
    p = torch.as_tensor(points, dtype=torch.float64)
    a = found(p).to(torch.float64)
    b = true(p.to(a.device)).to(torch.float64)
    return distance_stats((a - b).norm(dim=-1))


def random_points_in_mask(mask, n: int = 100, seed: int = 0) -> Tensor:
    """``n`` seeded random voxel centres (world mm) inside a mask Image (paper 000's FRE)."""
    inside = torch.nonzero(mask.data[0].cpu() != 0)
    if inside.shape[0] == 0:
        from itreg.errors import MaskError

        raise MaskError("cannot draw points from an empty mask")
    gen = torch.Generator().manual_seed(int(seed))
    pick = torch.randint(inside.shape[0], (int(n),), generator=gen)
    return mask.grid.index_to_world(inside[pick].flip(-1).to(torch.float64))


__all__ = [
    "DistanceStats",
    "distance_stats",
    "fiducial_registration_error",
    "random_points_in_mask",
    "target_registration_error",
]

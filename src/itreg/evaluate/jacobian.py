"""Jacobian statistics of a transform: folding, spread of det J, SDlogJ."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from itreg.errors import MaskError
from itreg.grid import Grid
from itreg.image import Image
from itreg.transforms import jacobian_determinant
from itreg.transforms.base import Transform


@dataclass(frozen=True)
class JacobianStats:
    """Statistics of ``det(dT/dx)`` over the voxels of a grid (inside a mask).

    Attributes:
        folding_fraction: fraction of voxels with ``det J <= 0``.
        folding_voxels: their count.
        det_mean: mean of det J.
        det_std: standard deviation of det J.
        det_min: minimum of det J.
        det_max: maximum of det J.
        sdlogj: standard deviation of ``log det J`` over voxels with ``det J > 0``.
        voxels: number of voxels evaluated.
    """

    folding_fraction: float
    folding_voxels: int
    det_mean: float
    det_std: float
    det_min: float
    det_max: float
    sdlogj: float
    voxels: int

    def as_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def jacobian_statistics(
    source: Transform | Tensor,
    grid: Grid,
    mask: Image | Tensor | None = None,
) -> JacobianStats:
    """Jacobian determinant statistics of a transform (or a displacement) on `grid`.

    ``det J`` comes from :func:`itreg.transforms.jacobian_determinant` (exact for linear maps,
    central finite differences in world mm otherwise). SDlogJ is the standard deviation of
    ``log det J`` over the voxels where ``det J > 0`` (folded voxels have no logarithm; their
    share is ``folding_fraction``).

    Args:
        source: a :class:`~itreg.transforms.Transform` or a displacement ``(D, *grid.shape)``
            in world mm.
        grid: the evaluation grid (normally the fixed image's).
        mask: optional mask on `grid` (Image or tensor of ``grid.shape``); nonzero voxels count.

    Returns:
        The :class:`JacobianStats`.

    Raises:
        MaskError: the mask is empty or does not match the grid.
    """
    det = jacobian_determinant(source, grid).to(torch.float64)
    if mask is not None:
        m = mask.data if isinstance(mask, Image) else torch.as_tensor(mask)
        if m.numel() != det.numel():
            raise MaskError(f"mask has {m.numel()} voxels, the grid {det.numel()}")
        m = m.reshape(det.shape).to(det.device) != 0
        if not bool(m.any()):
            raise MaskError("the evaluation mask is empty")
        det = det[m]
    det = det.flatten()
    fold = det <= 0
    pos = det[~fold]
    sdlogj = float(torch.log(pos).std()) if pos.numel() > 1 else float("nan")
    std = float(det.std()) if det.numel() > 1 else 0.0
    return JacobianStats(
        folding_fraction=float(fold.to(torch.float64).mean()),
        folding_voxels=int(fold.sum()),
        det_mean=float(det.mean()),
        det_std=std,
        det_min=float(det.min()),
        det_max=float(det.max()),
        sdlogj=sdlogj,
        voxels=int(det.numel()),
    )

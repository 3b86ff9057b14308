"""Groupwise accuracy: warping index gWI and registration error gRE (paper 002, Eqs. 49-52).

Notation of paper 002: ``phi_hat_j`` maps common-space points to image ``j``'s points (the
estimated transforms, as a groupwise registration returns them); ``phi_dag_j`` is image
``j``'s *initial misalignment*, mapping image ``j``'s points back to the phantom's common
space (for a phantom built as ``image_j(T_j(x)) = phantom(x)``, ``phi_dag_j = T_j^-1``).
A perfect registration makes every ``phi_dag_j o phi_hat_j`` the same map (the identity up to
a transform common to the group, which groupwise registration cannot observe).

* Eq. 50: ``r_j(x) = phi_dag_j(phi_hat_j(x)) - x``, centred ``rbar_j = r_j - mean_j' r_j'``.
* Eq. 49: ``gWI = (1/N) sum_j sqrt(mean_{x in Omega_j^f} |rbar_j(x)|^2)`` with
  ``Omega_j^f = {x : phi_dag_j(phi_hat_j(x)) in F}``, ``F`` the phantom's foreground.
* Eqs. 51-52: ``gRE = (1/N) sum_j sqrt(mean_i |ebar_j(v_i)|^2)`` over the ``2^D`` corners
  ``v_i`` of the volume, ``ebar_j`` the group-mean-centred positions (equal to ``rbar_j``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from itreg.errors import ConfigError, GeometryError, MaskError
from itreg.grid import Grid
from itreg.image import Image
from itreg.transforms.base import Transform
from itreg.warp import sample


@dataclass(frozen=True)
class GroupwiseError:
    """A groupwise error in mm with its per-image terms.

    Attributes:
        value_mm: the group value (gWI or gRE).
        per_image_mm: the RMS term of each image.
    """

    value_mm: float
    per_image_mm: list[float]

    def as_dict(self) -> dict:
        return asdict(self)


def _check(estimated: Sequence[Transform], misalignments: Sequence[Transform], d: int) -> None:
    if len(estimated) != len(misalignments) or len(estimated) < 2:
        raise ConfigError(
            f"need N >= 2 estimated transforms and as many misalignments, got "
            f"{len(estimated)} and {len(misalignments)}"
        )
    for t in (*estimated, *misalignments):
        if t.ndim != d:
            raise GeometryError(f"a {t.ndim}D transform in a {d}D groupwise evaluation")


@torch.no_grad()
def _composed(estimated, misalignments, points: Tensor) -> Tensor:
    """``phi_dag_j(phi_hat_j(points))`` for every j, ``(N, P, D)`` float64."""
    out = []
    for est, mis in zip(estimated, misalignments):
        out.append(mis(est(points).to(points.dtype)).to(torch.float64))
    return torch.stack(out)


def _rms_terms(composed: Tensor, points: Tensor, masks: Tensor | None) -> list[float]:
    r = composed - points[None].to(torch.float64)
    rbar = r - r.mean(dim=0, keepdim=True)
    sq = (rbar ** 2).sum(dim=-1)  # (N, P)
    terms = []
    for j in range(sq.shape[0]):
        s = sq[j] if masks is None else sq[j][masks[j]]
        if s.numel() == 0:
            raise MaskError(f"image {j}: no evaluation point maps into the foreground")
        terms.append(float(s.mean().sqrt()))
    return terms


def groupwise_warping_index(
    estimated: Sequence[Transform],
    misalignments: Sequence[Transform],
    grid: Grid,
    foreground: Image | None = None,
) -> GroupwiseError:
    """gWI (paper 002, Eqs. 49-50) over the voxels of the common-space `grid`.

    Args:
        estimated: ``phi_hat_j``, common space -> image ``j`` (N >= 2).
        misalignments: ``phi_dag_j``, image ``j`` -> common space (the initial misalignments).
        grid: the common-space grid whose voxel centres are ``x``.
        foreground: the phantom's foreground ``F`` (a mask Image, any grid of the same
            dimension); ``None`` uses every voxel.

    Returns:
        The :class:`GroupwiseError`.

    Raises:
        ConfigError: fewer than 2 images or unequal counts.
        GeometryError: dimensions differ.
        MaskError: no point of some image maps into the foreground.
    """
    _check(estimated, misalignments, grid.ndim)
    points = grid.points(dtype=torch.float64).reshape(-1, grid.ndim)
    comp = _composed(estimated, misalignments, points)
    masks = None
    if foreground is not None:
        if foreground.ndim != grid.ndim:
            raise GeometryError(f"foreground is {foreground.ndim}D, grid {grid.ndim}D")
        vals, inside = sample(foreground, comp.to(torch.float32), mode="nearest")
        masks = (vals[0] != 0) & inside
    terms = _rms_terms(comp, points, masks)
    return GroupwiseError(sum(terms) / len(terms), terms)


def groupwise_registration_error(
    estimated: Sequence[Transform],
    misalignments: Sequence[Transform],
    grid: Grid,
) -> GroupwiseError:
    """gRE (paper 002, Eqs. 51-52) at the ``2^D`` corner voxel centres of `grid`.

    Args:
        estimated: ``phi_hat_j``, common space -> image ``j`` (N >= 2).
        misalignments: ``phi_dag_j``, image ``j`` -> common space.
        grid: the common-space grid (its corners are the ``v_i``).

    Returns:
        The :class:`GroupwiseError`.
    """
    _check(estimated, misalignments, grid.ndim)
    corners = grid.corners(dtype=torch.float64)
    terms = _rms_terms(_composed(estimated, misalignments, corners), corners, None)
    return GroupwiseError(sum(terms) / len(terms), terms)

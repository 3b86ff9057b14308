"""Smoothness and topology penalties on displacement fields, in world millimetres.

Every regulariser takes a displacement ``d`` as a tensor ``(D, *grid.shape)`` (or a batch
``(N, D, *grid.shape)``) in world mm, component x first (as ``Transform.displacement(grid)``
gives it after ``movedim(-1, 0)``), and its :class:`~itreg.grid.Grid`; derivatives are finite
differences with respect to world ``(x, y, z)`` (spacing and direction matter, see
:mod:`itreg.transforms.jacobian`). Each returns a scalar averaged over voxels (and batch):

* ``"diffusion"``: ``sum_ij (d d_i / d x_j)^2`` (dimensionless);
* ``"bending"``: ``sum_i sum_jk (d^2 d_i / d x_j d x_k)^2`` in 1/mm^2 (each cross term appears
  twice, e.g. ``2 (d^2 d_i / dx dy)^2``);
* ``"tv"``: ``sum_ij |d d_i / d x_j|`` (or ``sqrt(g^2 + eps^2) - eps`` per term);
* ``"jacobian-fold"``: ``relu(margin - det J)`` with ``J = I + grad d``;
* ``"jacobian-logdet"``: ``log(max(det J, eps))^2``.

Transforms with a closed form (the cubic B-spline's bending energy) get it through
:meth:`Regulariser.closed_form`, which the registration engine prefers to a sampled field.

Functional versions (:func:`diffusion`, :func:`bending_energy`, :func:`total_variation`,
:func:`jacobian_folding`, :func:`jacobian_logdet`) and ``nn.Module`` versions
(:class:`Diffusion`, ...) compute the same values; :func:`get_regulariser` builds a module by
name.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from itreg.errors import ConfigError, GeometryError, unknown_name
from itreg.grid import Grid
from itreg.transforms.jacobian import hessian, spatial_gradient

logger = logging.getLogger(__name__)


def _batched(disp: Tensor, grid: Grid) -> Tensor:
    """Validate a displacement and return it as ``(N, D, *grid.shape)``."""
    d = grid.ndim
    if not isinstance(disp, Tensor) or not disp.is_floating_point():
        raise GeometryError("a displacement must be a floating-point tensor (D, *grid.shape)")
    if disp.dim() == d + 1:
        disp = disp[None]
    if disp.dim() != d + 2 or tuple(disp.shape[1:]) != (d, *grid.shape):
        raise GeometryError(
            f"displacement of shape {tuple(disp.shape)} does not match (D, *grid.shape) = "
            f"{(d, *grid.shape)} (optionally with a leading batch dimension)"
        )
    return disp


def _gradient(disp: Tensor, grid: Grid) -> Tensor:
    """``(N, D_i, D_j, *shape)``: ``d d_i / d x_j`` in world mm."""
    return spatial_gradient(_batched(disp, grid), grid)


def _determinant(disp: Tensor, grid: Grid) -> Tensor:
    """``det(I + grad d)``, ``(N, *shape)``."""
    g = _gradient(disp, grid)
    jac = g.movedim(1, -1).movedim(1, -1)  # (N, *shape, i, j)
    eye = torch.eye(grid.ndim, dtype=jac.dtype, device=jac.device)
    return torch.linalg.det(jac + eye)


def diffusion(disp: Tensor, grid: Grid) -> Tensor:
    """Mean over voxels of the squared Frobenius norm of the displacement gradient.

    Args:
        disp: ``(D, *grid.shape)`` or ``(N, D, *grid.shape)`` displacement in world mm.
        grid: the displacement's grid.

    Returns:
        Scalar ``mean_x sum_ij (d d_i / d x_j)^2``.
    """
    g = _gradient(disp, grid)
    return g.pow(2).sum(dim=(1, 2)).mean()


def bending_energy(disp: Tensor, grid: Grid) -> Tensor:
    """Mean over voxels of the squared second derivatives (thin-plate bending energy).

    Args:
        disp: ``(D, *grid.shape)`` or ``(N, D, *grid.shape)`` displacement in world mm.
        grid: the displacement's grid.

    Returns:
        Scalar ``mean_x sum_i [sum_j (d_jj d_i)^2 + 2 sum_{j<k} (d_jk d_i)^2]`` in 1/mm^2.
        Zero for affine displacements.
    """
    h = hessian(_batched(disp, grid), grid)  # (N, D_i, D_j, D_k, *shape)
    return h.pow(2).sum(dim=(1, 2, 3)).mean()


def total_variation(disp: Tensor, grid: Grid, eps: float = 0.0) -> Tensor:
    """Mean over voxels of the summed absolute first derivatives.

    Args:
        disp: ``(D, *grid.shape)`` or ``(N, D, *grid.shape)`` displacement in world mm.
        grid: the displacement's grid.
        eps: smoothing: each ``|g|`` becomes ``sqrt(g^2 + eps^2) - eps`` (differentiable at 0).
            0 gives the exact absolute value.

    Returns:
        Scalar ``mean_x sum_ij |d d_i / d x_j|``.
    """
    if not eps >= 0:
        raise ConfigError(f"total variation eps must be >= 0, got {eps}")
    g = _gradient(disp, grid)
    terms = g.abs() if eps == 0 else torch.sqrt(g * g + eps * eps) - eps
    return terms.sum(dim=(1, 2)).mean()


def jacobian_folding(disp: Tensor, grid: Grid, margin: float = 0.0) -> Tensor:
    """Mean over voxels of ``relu(margin - det J)``: penalises folding (``det J <= 0``).

    Args:
        disp: ``(D, *grid.shape)`` or ``(N, D, *grid.shape)`` displacement in world mm.
        grid: the displacement's grid.
        margin: determinants below this are penalised (0: only folds).
    """
    return F.relu(margin - _determinant(disp, grid)).mean()


def jacobian_logdet(disp: Tensor, grid: Grid, eps: float = 1e-3) -> Tensor:
    """Mean over voxels of ``log(det J)^2`` (symmetric in expansion and contraction).

    Args:
        disp: ``(D, *grid.shape)`` or ``(N, D, *grid.shape)`` displacement in world mm.
        grid: the displacement's grid.
        eps: determinants are clamped to at least `eps` before the logarithm, so folded voxels
            give a large finite value (``log(eps)^2``).
    """
    if not eps > 0:
        raise ConfigError(f"jacobian-logdet eps must be > 0, got {eps}")
    det = _determinant(disp, grid)
    return torch.log(torch.clamp(det, min=eps)).pow(2).mean()


# ---------------------------------------------------------------------- modules
class Regulariser(nn.Module, abc.ABC):
    """Base class: ``forward(disp (D, *grid.shape) or (N, D, *grid.shape), grid) -> scalar``."""

    #: Registry name.
    name: str = ""

    @abc.abstractmethod
    def forward(self, disp: Tensor, grid: Grid) -> Tensor:
        """The penalty of displacement `disp` (world mm) on `grid`, a scalar."""

    def closed_form(self, transform, domain: Grid) -> Tensor | None:
        """The penalty of `transform`'s displacement averaged over `domain`, computed exactly
        from the transform's parameters, or None when there is no closed form for it (the
        caller then evaluates :meth:`forward` on a sampled field)."""
        return None


class Diffusion(Regulariser):
    """Module version of :func:`diffusion`."""

    name = "diffusion"

    def forward(self, disp: Tensor, grid: Grid) -> Tensor:
        return diffusion(disp, grid)


class BendingEnergy(Regulariser):
    """Module version of :func:`bending_energy`."""

    name = "bending"

    def forward(self, disp: Tensor, grid: Grid) -> Tensor:
        return bending_energy(disp, grid)

    def closed_form(self, transform, domain: Grid) -> Tensor | None:
        """The exact integral mean over `domain` for transforms with a ``bending_energy``
        method (cubic B-splines: a quadratic form in the coefficients), else None."""
        energy = getattr(transform, "bending_energy", None)
        return energy(domain) if callable(energy) else None


class TotalVariation(Regulariser):
    """Module version of :func:`total_variation`.

    Args:
        eps: smoothing of the absolute value (0: exact).
    """

    name = "tv"

    def __init__(self, eps: float = 0.0) -> None:
        super().__init__()
        if not eps >= 0:
            raise ConfigError(f"total variation eps must be >= 0, got {eps}")
        self.eps = float(eps)

    def forward(self, disp: Tensor, grid: Grid) -> Tensor:
        return total_variation(disp, grid, eps=self.eps)

    def extra_repr(self) -> str:
        return f"eps={self.eps:g}"


class JacobianFolding(Regulariser):
    """Module version of :func:`jacobian_folding`.

    Args:
        margin: determinants below this are penalised.
    """

    name = "jacobian-fold"

    def __init__(self, margin: float = 0.0) -> None:
        super().__init__()
        self.margin = float(margin)

    def forward(self, disp: Tensor, grid: Grid) -> Tensor:
        return jacobian_folding(disp, grid, margin=self.margin)

    def extra_repr(self) -> str:
        return f"margin={self.margin:g}"


class JacobianLogDet(Regulariser):
    """Module version of :func:`jacobian_logdet`.

    Args:
        eps: lower clamp of the determinant before the logarithm.
    """

    name = "jacobian-logdet"

    def __init__(self, eps: float = 1e-3) -> None:
        super().__init__()
        if not eps > 0:
            raise ConfigError(f"jacobian-logdet eps must be > 0, got {eps}")
        self.eps = float(eps)

    def forward(self, disp: Tensor, grid: Grid) -> Tensor:
        return jacobian_logdet(disp, grid, eps=self.eps)

    def extra_repr(self) -> str:
        return f"eps={self.eps:g}"


_REGISTRY: dict[str, Callable[..., Regulariser]] = {
    cls.name: cls
    for cls in (Diffusion, BendingEnergy, TotalVariation, JacobianFolding, JacobianLogDet)
}


def available_regularisers() -> list[str]:
    """Sorted names accepted by :func:`get_regulariser`."""
    return sorted(_REGISTRY)


def get_regulariser(name: str, **kwargs: Any) -> Regulariser:
    """Build a regulariser module by name.

    Args:
        name: one of ``"diffusion"``, ``"bending"``, ``"tv"``, ``"jacobian-fold"``,
            ``"jacobian-logdet"`` (case-insensitive).
        **kwargs: settings of that regulariser (``eps`` for ``"tv"`` and
            ``"jacobian-logdet"``, ``margin`` for ``"jacobian-fold"``).

    Raises:
        ConfigError: unknown name (the message lists the valid ones) or unknown settings.
    """
    key = str(name).strip().lower()
    if key not in _REGISTRY:
        raise unknown_name("regulariser", str(name), _REGISTRY)
    try:
        return _REGISTRY[key](**kwargs)
    except TypeError as exc:
        raise ConfigError(f"invalid settings for regulariser {key!r}: {exc}") from exc

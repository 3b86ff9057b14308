"""The transform contract.

A transform maps **fixed-space world points to moving-space world points** (ITK's convention):
``warped(x) = moving(T(x))`` for every point ``x`` of the fixed grid. Every transform is a
``torch.nn.Module`` whose ``forward(points)`` takes ``(..., D)`` world points (ITK order x, y, z)
and returns ``(..., D)`` world points, so transforms compose by function composition and
gradients reach their parameters.
"""

from __future__ import annotations

import abc

import torch
from torch import Tensor, nn

from itreg.errors import GeometryError
from itreg.grid import Grid


class Transform(nn.Module, abc.ABC):
    """Base class: a differentiable map of world points ``(..., D) -> (..., D)``."""

    #: True for maps of the form ``x -> A x + b``.
    is_linear: bool = False

    def __init__(self, ndim: int) -> None:
        super().__init__()
        if ndim not in (2, 3):
            raise GeometryError(f"transforms are 2D or 3D, got ndim={ndim}")
        self.ndim = int(ndim)

    @abc.abstractmethod
    def forward(self, points: Tensor) -> Tensor:
        """Map fixed-space world points ``(..., D)`` to moving-space world points."""

    def _reference_tensor(self) -> Tensor | None:
        for t in self.parameters():
            return t
        for t in self.buffers():
            return t
        return None

    def _check_points(self, points: Tensor) -> None:
        if points.shape[-1] != self.ndim:
            raise GeometryError(
                f"{type(self).__name__} is {self.ndim}D but got points with "
                f"{points.shape[-1]} coordinates"
            )

    def on_grid(self, grid: Grid, dtype: torch.dtype | None = None, device=None) -> Tensor:
        """``T(x)`` for every voxel ``x`` of `grid`, shape ``(*grid.shape, D)``.

        Subclasses may override with a faster path for regular grids (B-splines do).
        Dtype and device default to those of the transform's parameters.
        """
        ref = self._reference_tensor()
        dtype = dtype or (ref.dtype if ref is not None else torch.float32)
        device = device or (ref.device if ref is not None else None)
        return self(grid.points(dtype=dtype, device=device))

    def displacement(self, grid: Grid, dtype: torch.dtype | None = None, device=None) -> Tensor:
        """``T(x) - x`` on `grid`, shape ``(*grid.shape, D)``, in world mm."""
        mapped = self.on_grid(grid, dtype=dtype, device=device)
        return mapped - grid.points(dtype=mapped.dtype, device=mapped.device)

    def parameter_scales(self, radius: float) -> list[Tensor]:
        """Typical size of a unit step of each parameter, in the shapes of ``parameters()``.

        The engine optimises ``p = p0 + scale * q``, so one unit of ``q`` moves points by about
        1 mm whatever the parameter (translations in mm; rotations, scales and matrix entries
        scaled by ``1 / radius``, the half-diagonal of the fixed image in mm).
        """
        return [torch.ones_like(p) for p in self.parameters()]


class Identity(Transform):
    """The identity map."""

    is_linear = True

    def forward(self, points: Tensor) -> Tensor:
        self._check_points(points)
        return points

    def inverse(self) -> Identity:
        """The identity again."""
        return Identity(self.ndim)

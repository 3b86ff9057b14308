"""Dense deformations: displacement fields and stationary velocity fields.

Both store a vector field ``(D, *grid.shape)`` in world mm (component x first) on a `Grid`, as a
displacement field image holds it (``d(x) = T(x) - x``, ITK LPS), and apply it with linear
interpolation exactly as ITK's ``DisplacementFieldTransform`` does: inside the voxel extent of
the field (continuous index in ``[-0.5, n - 0.5)`` on every axis) the field is interpolated
linearly with edge values repeated in the outer half voxel; outside, the displacement is zero.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from itreg.errors import ConfigError, GeometryError
from itreg.grid import Grid
from itreg.transforms.base import Transform

logger = logging.getLogger(__name__)


def sample_field(field: Tensor, grid: Grid, points: Tensor, outside: str = "zero") -> Tensor:
    """Linearly interpolate a vector field at world points.

    Args:
        field: ``(C, *grid.shape)`` values on `grid`.
        grid: the field's grid.
        points: ``(..., D)`` world points (mm, ITK order).
        outside: ``"zero"``: zero outside the field's voxel extent (ITK
            ``DisplacementFieldTransform``); ``"border"``: the edge values extend to infinity.

    Returns:
        ``(..., C)`` interpolated values, in the dtype of `points` (floating) or of `field`.
    """
    d = grid.ndim
    if points.shape[-1] != d:
        raise GeometryError(f"points have {points.shape[-1]} coordinates, field grid is {d}D")
    dtype = points.dtype if points.is_floating_point() else field.dtype
    points = points.to(dtype)
    batch = points.shape[:-1]
    flat = points.reshape((1, -1) + (1,) * (d - 1) + (d,))
    coords = grid.world_to_normalized(flat)
    values = F.grid_sample(
        field.to(dtype=dtype, device=points.device)[None], coords, mode="bilinear",
        padding_mode="border", align_corners=True,
    )  # (1, C, P, 1[, 1])
    values = values.reshape(field.shape[0], -1).T.reshape(*batch, field.shape[0])
    if outside == "border":
        return values
    if outside != "zero":
        raise ConfigError(f"outside must be 'zero' or 'border', got {outside!r}")
    # The inside test runs in float64 whatever the points' dtype: a fixed voxel on the edge of a
    # coarser field's extent (index exactly -0.5) is then inside in float32 and float64 alike,
    # as in ITK's double-precision DisplacementFieldTransform.
    index = grid.world_to_index(points.detach().to(torch.float64))
    upper = torch.tensor([n - 0.5 for n in grid.size], dtype=index.dtype, device=index.device)
    inside = ((index >= -0.5) & (index < upper)).all(dim=-1, keepdim=True)
    return torch.where(inside, values, torch.zeros_like(values))


def _check_field(field: Tensor, grid: Grid, name: str) -> Tensor:
    field = torch.as_tensor(field)
    expected = (grid.ndim, *grid.shape)
    if tuple(field.shape) != expected:
        raise GeometryError(
            f"{name} has shape {tuple(field.shape)}, expected (D, *grid.shape) = {expected}"
        )
    if not field.is_floating_point():
        raise GeometryError(f"{name} must be floating point, got {field.dtype}")
    return field


class _FieldTransform(Transform):
    """Base of transforms defined by a field on their own `grid`: on that grid, ``T(x)`` is the
    grid points plus the field's displacement, without interpolation."""

    grid: Grid

    def on_grid(self, grid: Grid, dtype: torch.dtype | None = None, device=None) -> Tensor:
        """``T(x)`` on every voxel of `grid`, ``(*grid.shape, D)``."""
        if grid.same_as(self.grid):
            disp = self.displacement(grid, dtype=dtype, device=device)
            return grid.points(dtype=disp.dtype, device=disp.device) + disp
        return super().on_grid(grid, dtype=dtype, device=device)


class DisplacementField(_FieldTransform):
    """``T(x) = x + d(x)`` with ``d`` linearly interpolated from a field in world mm.

    Args:
        field: ``(D, *grid.shape)`` displacements in world mm (component x first), as
            ``SimpleITK.DisplacementFieldTransform`` reads them.
        grid: the grid the field lives on (normally the fixed image grid).
        learnable: whether the field is an ``nn.Parameter`` (else a buffer).

    Attributes:
        field: ``(D, *grid.shape)`` tensor (a copy of the given one).
        grid: the field's :class:`~itreg.grid.Grid`.

    Raises:
        GeometryError: the field's shape does not match ``(D, *grid.shape)``.
    """

    def __init__(self, field: Tensor, grid: Grid, learnable: bool = True) -> None:
        super().__init__(grid.ndim)
        field = _check_field(field, grid, "displacement field").detach().clone()
        self.grid = grid
        self.learnable = bool(learnable)
        if learnable:
            self.field = nn.Parameter(field)
        else:
            self.register_buffer("field", field)

    @classmethod
    def from_transform(
        cls, transform: Transform, grid: Grid, learnable: bool = True, dtype=None, device=None
    ) -> DisplacementField:
        """Sample any transform's displacement on `grid` into a displacement field."""
        with torch.no_grad():
            disp = transform.displacement(grid, dtype=dtype, device=device)
        return cls(torch.movedim(disp, -1, 0), grid, learnable=learnable)

    def forward(self, points: Tensor) -> Tensor:
        """Map world points ``(..., D)``: ``x + d(x)``, zero displacement outside the field."""
        self._check_points(points)
        if not points.is_floating_point():
            points = points.to(self.field.dtype)
        return points + sample_field(self.field, self.grid, points)

    def displacement(self, grid: Grid, dtype: torch.dtype | None = None, device=None) -> Tensor:
        """``d`` on `grid`, ``(*grid.shape, D)``; the field itself (no interpolation) on its grid."""
        if grid.same_as(self.grid):
            dtype = dtype or self.field.dtype
            return torch.movedim(self.field, 0, -1).to(dtype=dtype, device=device)
        return super().displacement(grid, dtype=dtype, device=device)

    def inverse(self, max_iterations: int = 200, tolerance_mm: float = 1e-4):
        """The inverse map, solved point by point by fixed-point iteration (see
        :class:`~itreg.transforms.inverse.IterativeInverse`); sample it onto a grid with
        :meth:`from_transform` to store it as a field."""
        from itreg.transforms.inverse import IterativeInverse

        return IterativeInverse(self, max_iterations=max_iterations, tolerance_mm=tolerance_mm)

    def extra_repr(self) -> str:
        return f"ndim={self.ndim}, learnable={self.learnable}, grid={self.grid!r}"


def integrate_velocity(velocity: Tensor, grid: Grid, steps: int = 7) -> Tensor:
    """``exp(v) - id`` of a stationary velocity field by scaling and squaring.

    ``d_0 = v / 2^steps`` followed by `steps` self-compositions ``d <- d + d o (id + d)``, the
    field extended beyond `grid` by its edge values during the squaring. Differentiable with
    respect to `velocity` (registration networks integrate their predicted velocities with it).

    Args:
        velocity: ``(D, *grid.shape)`` velocity in world mm (component x first).
        grid: the velocity's grid.
        steps: number of squarings (>= 0).

    Returns:
        ``(D, *grid.shape)`` displacement in world mm.
    """
    v = _check_field(velocity, grid, "velocity field")
    disp = torch.movedim(v, 0, -1) / (2.0**steps)  # (*shape, D)
    if steps == 0:
        return torch.movedim(disp, -1, 0)
    points = grid.points(dtype=v.dtype, device=v.device)
    for _ in range(int(steps)):
        field = torch.movedim(disp, -1, 0)
        disp = disp + sample_field(field, grid, points + disp, outside="border")
    return torch.movedim(disp, -1, 0)


class StationaryVelocityField(_FieldTransform):
    """Diffeomorphism ``T = exp(v)`` of a stationary velocity field (scaling and squaring).

    ``displacement_field()`` computes ``d = exp(v) - id`` as ``d_0 = v / 2^steps`` followed by
    `steps` self-compositions ``d <- d + d o (id + d)``. During the squaring the field is
    extended beyond its grid by its edge values, so a constant velocity gives exactly the
    translation by that velocity; the final displacement is applied as a
    :class:`DisplacementField` (zero outside the grid).

    Args:
        grid: grid of the velocity field (normally the fixed image grid).
        velocity: optional ``(D, *grid.shape)`` velocity in world mm; zero (identity) if None.
        steps: number of squarings (>= 0).
        dtype: dtype of a zero-initialised velocity.
        device: device of a zero-initialised velocity.

    Attributes:
        velocity: parameter ``(D, *grid.shape)``, world mm.

    Raises:
        ConfigError: `steps` is negative or not an integer.
        GeometryError: the velocity's shape does not match ``(D, *grid.shape)``.
    """

    def __init__(
        self,
        grid: Grid,
        velocity: Tensor | None = None,
        steps: int = 7,
        dtype: torch.dtype = torch.float32,
        device=None,
    ) -> None:
        super().__init__(grid.ndim)
        if isinstance(steps, bool) or int(steps) != steps or steps < 0:
            raise ConfigError(f"steps must be an integer >= 0, got {steps!r}")
        self.steps = int(steps)
        self.grid = grid
        if velocity is None:
            velocity = torch.zeros((grid.ndim, *grid.shape), dtype=dtype, device=device)
        else:
            velocity = _check_field(velocity, grid, "velocity field").detach().clone()
        self.velocity = nn.Parameter(velocity)

    def displacement_field(self) -> Tensor:
        """``exp(v) - id`` on the velocity's grid, ``(D, *grid.shape)`` in world mm."""
        return integrate_velocity(self.velocity, self.grid, self.steps)

    def forward(self, points: Tensor) -> Tensor:
        """Map world points ``(..., D)``: ``x + d(x)``, ``d = exp(v) - id`` (zero outside)."""
        self._check_points(points)
        if not points.is_floating_point():
            points = points.to(self.velocity.dtype)
        return points + sample_field(self.displacement_field(), self.grid, points)

    def displacement(self, grid: Grid, dtype: torch.dtype | None = None, device=None) -> Tensor:
        """``exp(v) - id`` on `grid`, ``(*grid.shape, D)``; no interpolation on its own grid."""
        if grid.same_as(self.grid):
            dtype = dtype or self.velocity.dtype
            disp = torch.movedim(self.displacement_field(), 0, -1)
            return disp.to(dtype=dtype, device=device)
        return super().displacement(grid, dtype=dtype, device=device)

    def inverse(self) -> StationaryVelocityField:
        """``exp(-v)``: the same grid and steps with the velocity negated (detached copy)."""
        with torch.no_grad():
            return StationaryVelocityField(self.grid, -self.velocity.detach(), steps=self.steps)

    def to_displacement_field(self, learnable: bool = False) -> DisplacementField:
        """The current ``exp(v)`` as a :class:`DisplacementField` on the same grid."""
        with torch.no_grad():
            return DisplacementField(self.displacement_field(), self.grid, learnable=learnable)

    def extra_repr(self) -> str:
        return f"ndim={self.ndim}, steps={self.steps}, grid={self.grid!r}"

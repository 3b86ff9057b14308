"""Cubic B-spline free-form deformation (FFD) with ITK's control-grid layout.

A :class:`BSpline` holds displacement coefficients ``c_k`` (world mm, one D-vector per control
point) on a regular *control grid* that has the same direction as the image grid it was built
for. A fixed-space world point ``x`` with continuous control-grid index ``u`` (ITK order) maps to

    ``T(x) = x + sum_k  prod_a B3(u_a - k_a)  c_k``

where ``B3`` is the centred cubic B-spline (support ``(-2, 2)``). This is exactly ITK's
``BSplineTransform`` of order 3: its ``FixedParameters`` are the control grid's size, origin
(the world position of control point 0), spacing and direction, and its ``Parameters`` are the
coefficients, all x components first (x index fastest), then all y, then all z.

As in ITK, the displacement is zero outside the *valid region* ``1 <= u_a <= size_a - 2`` (the
region where all 4^D supporting control points exist). A control grid made by :class:`BSpline`
has ``mesh + 3`` points per axis (ITK's ``BSplineTransformInitializer`` layout): ``mesh``
intervals of ``control_spacing_mm`` cover the physical extent of the image grid (outer voxel
edges included), centred on it, and the cubic support adds one control point beyond each end of
the mesh, so the whole image lies inside the valid region.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from itreg.errors import ConfigError, GeometryError, TransformFileError
from itreg.grid import Grid
from itreg.transforms.base import Transform

logger = logging.getLogger(__name__)

#: Number of (point, control point) pairs evaluated at once by :meth:`BSpline.forward`.
_CHUNK_ELEMENTS = 2**20

#: Direction cosines closer than this are treated as equal (fast separable evaluation).
_DIRECTION_TOL = 1e-6


def cubic_bspline_weights(t: Tensor) -> Tensor:
    """Weights of the 4 control points supporting fractional position ``t`` in ``[0, 1)``.

    Args:
        t: fractional part of the continuous control index, any shape.

    Returns:
        Tensor ``(*t.shape, 4)``: ``B3(t + 1), B3(t), B3(1 - t), B3(2 - t)``, the weights of
        control points ``floor(u) - 1 ... floor(u) + 2``. They sum to 1.
    """
    t2 = t * t
    t3 = t2 * t
    w0 = (1.0 - t) ** 3 / 6.0
    w1 = (3.0 * t3 - 6.0 * t2 + 4.0) / 6.0
    w2 = (-3.0 * t3 + 3.0 * t2 + 3.0 * t + 1.0) / 6.0
    w3 = t3 / 6.0
    return torch.stack([w0, w1, w2, w3], dim=-1)


def _contract(coefficients: Tensor, matrices: Sequence[Tensor]) -> Tensor:
    """Apply one matrix per spatial axis to a coefficient tensor.

    Args:
        coefficients: ``(C, *M)`` with spatial axes in tensor order ``(Z, Y, X)``.
        matrices: one ``(n_a, m_a)`` matrix per ITK axis ``a`` (x first).

    Returns:
        ``(C, *N)``: ``out[c, ..n..] = sum_m prod_a W_a[n_a, m_a] coefficients[c, ..m..]``.
    """
    d = len(matrices)
    out = coefficients
    # Contract the axes that grow the tensor least first (cheapest order).
    order = sorted(range(d), key=lambda a: matrices[a].shape[0] / max(matrices[a].shape[1], 1))
    for a in order:
        axis = 1 + (d - 1 - a)  # tensor axis of ITK axis a
        out = torch.movedim(torch.tensordot(out, matrices[a], dims=([axis], [1])), -1, axis)
    return out


def _subdivision_matrix(m: int, dtype: torch.dtype, device) -> Tensor:
    """``(2m - 3, m)`` matrix of exact cubic B-spline subdivision along one axis.

    Fine control point ``j`` sits at coarse index ``(j + 1) / 2``: odd ``j = 2k - 1`` gets
    ``(c[k-1] + 6 c[k] + c[k+1]) / 8``, even ``j = 2k`` gets ``(c[k] + c[k+1]) / 2``.
    """
    n = 2 * m - 3
    s = torch.zeros(n, m, dtype=torch.float64)
    for j in range(n):
        if j % 2:
            k = (j + 1) // 2
            s[j, k - 1], s[j, k], s[j, k + 1] = 1 / 8, 6 / 8, 1 / 8
        else:
            k = j // 2
            s[j, k], s[j, k + 1] = 0.5, 0.5
    return s.to(dtype=dtype, device=device)


def _control_grid(grid: Grid, control_spacing_mm) -> Grid:
    d = grid.ndim
    spacing = np.asarray(control_spacing_mm, dtype=np.float64).ravel()
    if spacing.size == 1:
        spacing = np.repeat(spacing, d)
    if spacing.size != d:
        raise ConfigError(
            f"control_spacing_mm needs 1 or {d} values for a {d}D grid, got {spacing.size}"
        )
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise ConfigError(f"control_spacing_mm must be positive and finite, got {spacing.tolist()}")
    extent = np.asarray(grid.extent())
    mesh = [max(math.ceil(e / s - 1e-9), 1) for e, s in zip(extent, spacing)]
    size = tuple(m + 3 for m in mesh)
    # Same centre and direction as the image grid: mesh intervals cover its physical extent.
    return grid.resized(size, tuple(float(s) for s in spacing))


class BSpline(Transform):
    """Cubic B-spline FFD: ``T(x) = x + sum_k B(x - x_k) c_k`` (ITK ``BSplineTransform``).

    Args:
        grid: the fixed image grid the deformation must cover.
        control_spacing_mm: control point spacing in mm, a scalar or one value per axis (ITK
            order). The control grid has ``ceil(extent / spacing) + 3`` points per axis, the
            same centre and direction as `grid`.
        dtype: dtype of the coefficients.
        device: device of the coefficients.

    Attributes:
        coefficients: parameter ``(D, *control_grid.shape)``, world-mm displacement of each
            control point (component x first), zero-initialised (identity map).
        control_grid: the :class:`~itreg.grid.Grid` of control points.

    Raises:
        ConfigError: `control_spacing_mm` is not positive and finite or has the wrong length.
    """

    def __init__(
        self,
        grid: Grid,
        control_spacing_mm: float | Sequence[float],
        dtype: torch.dtype = torch.float32,
        device=None,
    ) -> None:
        super().__init__(grid.ndim)
        self._setup(_control_grid(grid, control_spacing_mm), None, dtype, device)

    def _setup(self, control_grid: Grid, coefficients: Tensor | None, dtype, device) -> None:
        if min(control_grid.size) < 4:
            raise GeometryError(
                f"a cubic B-spline control grid needs at least 4 points per axis, got "
                f"{control_grid.size}"
            )
        self.control_grid = control_grid
        shape = (control_grid.ndim, *control_grid.shape)
        if coefficients is None:
            coefficients = torch.zeros(shape, dtype=dtype, device=device)
        else:
            coefficients = torch.as_tensor(coefficients).detach().to(dtype=dtype, device=device)
            if tuple(coefficients.shape) != shape:
                raise GeometryError(
                    f"B-spline coefficients have shape {tuple(coefficients.shape)}, expected "
                    f"{shape}"
                )
            coefficients = coefficients.clone()
        self.coefficients = nn.Parameter(coefficients)

    # ------------------------------------------------------------------ constructors
    @classmethod
    def from_control_grid(
        cls,
        control_grid: Grid,
        coefficients: Tensor | None = None,
        dtype: torch.dtype = torch.float32,
        device=None,
    ) -> BSpline:
        """Build directly on a control grid (ITK layout: point 0 at ``control_grid.origin``).

        Args:
            control_grid: grid of control points, at least 4 per axis.
            coefficients: optional ``(D, *control_grid.shape)`` world-mm displacements.
            dtype: dtype of the coefficients.
            device: device of the coefficients.
        """
        obj = cls.__new__(cls)
        Transform.__init__(obj, control_grid.ndim)
        obj._setup(control_grid, coefficients, dtype, device)
        return obj

    @classmethod
    def from_itk_parameters(
        cls,
        fixed_parameters: Sequence[float],
        parameters: Sequence[float],
        dtype: torch.dtype = torch.float32,
        device=None,
    ) -> BSpline:
        """Build from ITK ``BSplineTransform`` (order 3) fixed parameters and parameters.

        Args:
            fixed_parameters: ``size (D), origin (D), spacing (D), direction (D*D, row-major)``.
            parameters: ``D * prod(size)`` coefficients, all x components first (x index
                fastest), then y, then z.

        Raises:
            TransformFileError: the parameter counts do not describe a 2D or 3D B-spline.
        """
        fixed = [float(v) for v in fixed_parameters]
        dims = [d for d in (2, 3) if len(fixed) == 3 * d + d * d]
        if not dims:
            raise TransformFileError(
                f"B-spline fixed parameters must have 10 (2D) or 18 (3D) values, got {len(fixed)}"
            )
        d = dims[0]
        size = fixed[:d]
        if any(s != round(s) or s < 4 for s in size):
            raise TransformFileError(f"B-spline grid size must be integers >= 4, got {size}")
        try:
            control_grid = Grid(
                tuple(round(s) for s in size), fixed[2 * d:3 * d], fixed[d:2 * d],
                fixed[3 * d:],
            )
        except (GeometryError, ConfigError) as exc:
            raise TransformFileError(f"invalid B-spline fixed parameters: {exc}") from exc
        params = np.asarray(parameters, dtype=np.float64).ravel()
        expected = d * control_grid.numel
        if params.size != expected:
            raise TransformFileError(
                f"B-spline with grid size {control_grid.size} needs {expected} parameters, got "
                f"{params.size}"
            )
        coefficients = torch.from_numpy(params.reshape(d, *control_grid.shape))
        return cls.from_control_grid(control_grid, coefficients, dtype=dtype, device=device)

    def to_itk_parameters(self) -> tuple[list[float], list[float]]:
        """ITK ``BSplineTransform`` (order 3) ``(fixed_parameters, parameters)``.

        Returns:
            ``fixed_parameters``: control grid size, origin, spacing, direction (row-major);
            ``parameters``: the coefficients, x components first, x index fastest. Setting both
            on ``SimpleITK.BSplineTransform(D, 3)`` reproduces this transform.
        """
        g = self.control_grid
        fixed = [float(s) for s in g.size] + list(g.origin) + list(g.spacing) + list(g.direction)
        params = self.coefficients.detach().to("cpu", torch.float64).reshape(-1).tolist()
        return fixed, params

    # ------------------------------------------------------------------ properties
    @property
    def control_spacing(self) -> tuple[float, ...]:
        """Control point spacing in mm (ITK order)."""
        return self.control_grid.spacing

    def extra_repr(self) -> str:
        return f"ndim={self.ndim}, control_grid={self.control_grid!r}"

    # ------------------------------------------------------------------ evaluation
    def _coefficients_as(self, dtype: torch.dtype, device) -> Tensor:
        return self.coefficients.to(dtype=dtype, device=device)

    def _displacement_at_index(self, u: Tensor, coefficients: Tensor) -> Tensor:
        """Displacement ``(P, D)`` at continuous control indices ``u (P, D)`` (ITK order)."""
        d = self.ndim
        size = self.control_grid.size
        upper = torch.tensor([s - 2 for s in size], dtype=u.dtype, device=u.device)
        inside = ((u >= 1) & (u <= upper)).all(dim=-1)
        floor = torch.floor(u.detach())
        weights = cubic_bspline_weights(u - floor)  # (P, D, 4)
        base = floor.long() - 1
        offsets = torch.arange(4, device=u.device)
        flat = torch.zeros(u.shape[0], 1, dtype=torch.long, device=u.device)
        w = torch.ones(u.shape[0], 1, dtype=u.dtype, device=u.device)
        stride = 1
        for a in range(d):  # x is the fastest-varying axis of the flattened control grid
            idx = (base[:, a, None] + offsets).clamp(0, size[a] - 1)  # (P, 4)
            flat = (flat[:, None, :] + stride * idx[:, :, None]).reshape(u.shape[0], -1)
            w = (weights[:, a, :, None] * w[:, None, :]).reshape(u.shape[0], -1)
            stride *= size[a]
        table = coefficients.reshape(d, -1).T  # (N, D)
        disp = torch.einsum("pkd,pk->pd", table[flat], w)  # (P, D)
        return torch.where(inside[:, None], disp, torch.zeros_like(disp))

    def _displacement_points(self, points: Tensor) -> Tensor:
        self._check_points(points)
        dtype = points.dtype if points.is_floating_point() else self.coefficients.dtype
        points = points.to(dtype)
        coefficients = self._coefficients_as(dtype, points.device)
        flat = points.reshape(-1, self.ndim)
        chunk = max(_CHUNK_ELEMENTS // 4**self.ndim, 1)
        pieces = []
        for start in range(0, flat.shape[0], chunk):
            u = self.control_grid.world_to_index(flat[start:start + chunk])
            pieces.append(self._displacement_at_index(u, coefficients))
        if not pieces:
            return torch.zeros_like(points)
        return torch.cat(pieces, dim=0).reshape(points.shape)

    def forward(self, points: Tensor) -> Tensor:
        """Map world points ``(..., D)`` (mm) to ``(..., D)``; zero displacement outside."""
        if not points.is_floating_point():
            points = points.to(self.coefficients.dtype)
        return points + self._displacement_points(points)

    def _same_direction(self, grid: Grid) -> bool:
        return grid.ndim == self.ndim and bool(
            np.allclose(grid.direction, self.control_grid.direction, atol=_DIRECTION_TOL)
        )

    def _axis_matrices(self, grid: Grid, dtype, device) -> list[Tensor]:
        """Per-axis weight matrices ``W_a (grid.size[a], control_grid.size[a])``."""
        mats = []
        d = self.ndim
        for a in range(d):
            n, m = grid.size[a], self.control_grid.size[a]
            index = torch.zeros(n, d, dtype=torch.float64)
            index[:, a] = torch.arange(n, dtype=torch.float64)
            # Same direction: control index along axis a depends on the grid index along a only.
            u = self.control_grid.world_to_index(grid.index_to_world(index))[:, a]
            floor = torch.floor(u)
            weights = cubic_bspline_weights(u - floor)  # (n, 4)
            cols = floor.long()[:, None] - 1 + torch.arange(4)
            valid = (u >= 1) & (u <= m - 2)
            keep = (cols >= 0) & (cols < m) & valid[:, None]
            mat = torch.zeros(n, m, dtype=torch.float64)
            rows = torch.arange(n)[:, None].expand(n, 4)
            mat.index_put_((rows[keep], cols[keep]), weights[keep], accumulate=True)
            mats.append(mat.to(dtype=dtype, device=device))
        return mats

    def displacement(self, grid: Grid, dtype: torch.dtype | None = None, device=None) -> Tensor:
        """``T(x) - x`` on every voxel of `grid`, shape ``(*grid.shape, D)``, world mm.

        Separable (per-axis weight matrices contracted with the coefficients) when `grid` has
        the control grid's direction, whatever its spacing, origin and size.
        """
        dtype = dtype or self.coefficients.dtype
        device = device or self.coefficients.device
        if not self._same_direction(grid):
            return self._displacement_points(grid.points(dtype=dtype, device=device))
        mats = self._axis_matrices(grid, dtype, device)
        disp = _contract(self._coefficients_as(dtype, device), mats)  # (D, *grid.shape)
        return torch.movedim(disp, 0, -1).contiguous()

    def on_grid(self, grid: Grid, dtype: torch.dtype | None = None, device=None) -> Tensor:
        """``T(x)`` on every voxel of `grid`, ``(*grid.shape, D)``; fast separable path."""
        disp = self.displacement(grid, dtype=dtype, device=device)
        return disp.add_(grid.points(dtype=disp.dtype, device=disp.device))

    # ------------------------------------------------------------------ multi-level
    def refined(self) -> BSpline:
        """The same deformation on a control grid of half the spacing (exact subdivision).

        Uses exact cubic B-spline subdivision (not a fit): fine control point ``j`` sits at
        coarse index ``(j + 1) / 2``, the fine grid has ``2 size - 3`` points per axis and the
        same valid region, so the displacement is unchanged everywhere up to rounding.
        """
        g = self.control_grid
        origin = g.index_to_world(torch.full((self.ndim,), 0.5, dtype=torch.float64))
        fine = Grid(
            tuple(2 * s - 3 for s in g.size),
            tuple(s / 2.0 for s in g.spacing),
            tuple(origin.tolist()),
            g.direction,
        )
        with torch.no_grad():
            coef = self.coefficients.detach()
            mats = [_subdivision_matrix(m, coef.dtype, coef.device) for m in g.size]
            fine_coef = _contract(coef, mats)
        return BSpline.from_control_grid(fine, fine_coef, dtype=coef.dtype, device=coef.device)

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
import torch.nn.functional as F
from torch import Tensor, nn

from itreg.errors import ConfigError, GeometryError, TransformFileError
from itreg.grid import Grid
from itreg.transforms.base import Transform
from itreg.transforms.bspline_basis import (  # noqa: F401  (cubic_bspline_weights: public here)
    _contract,
    _contract_channels_last,
    _stacked_quadratic_form,
    _subdivision_matrix,
    bspline_gram,
    cubic_bspline_derivative,
    cubic_bspline_weights,
)

logger = logging.getLogger(__name__)

#: Number of (point, lookup) pairs evaluated at once by :meth:`BSpline.forward` (each point
#: takes ``2^D`` D-linear lookups).
_CHUNK_ELEMENTS = 2**20

#: Points per thread below which :meth:`BSpline.forward` does not split its lookups.
_MIN_PART_POINTS = 4096

#: Direction cosines closer than this are treated as equal (fast separable evaluation).
_DIRECTION_TOL = 1e-6


def _corners(d: int, device) -> Tensor:
    """``(2^D, D)`` long tensor of the corners of the unit cube (0/1 per axis, x fastest)."""
    idx = torch.arange(2**d, device=device)
    return torch.stack([(idx >> a) & 1 for a in range(d)], dim=-1)


def control_grid_for(grid: Grid, control_spacing_mm) -> Grid:
    """The control grid ``BSpline(grid, control_spacing_mm)`` builds (see :class:`BSpline`)."""
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
        self._setup(control_grid_for(grid, control_spacing_mm), None, dtype, device)

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
        self._bending_cache: dict = {}

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
    def fit(
        cls,
        source: Transform | Tensor,
        grid: Grid,
        control_spacing_mm: float | Sequence[float],
        dtype: torch.dtype = torch.float32,
        device=None,
    ) -> BSpline:
        """The least-squares B-spline approximation of a displacement on `grid`.

        Finds the coefficients on the control grid ``BSpline(grid, control_spacing_mm)``
        would use that minimise the squared displacement error summed over the voxels of
        `grid`. The FFD's weights are a Kronecker product of one matrix per axis, so the
        solution is one pseudo-inverse per axis (exact, no iterations). A cubic B-spline
        reproduces an affine displacement exactly; finer detail than the control spacing is
        smoothed away (a dense network field becomes a smooth FFD).

        Args:
            source: a transform (its displacement on `grid` is fitted) or a displacement
                ``(*grid.shape, D)`` in world mm.
            grid: the grid of the displacement samples (and the FFD's domain).
            control_spacing_mm: control point spacing in mm, a scalar or one per axis.
            dtype, device: of the coefficients (default: float32, the source's device).

        Raises:
            GeometryError: `source` does not match `grid`.
        """
        if isinstance(source, Transform):
            if source.ndim != grid.ndim:
                raise GeometryError(f"cannot fit a {source.ndim}D transform on a "
                                    f"{grid.ndim}D grid")
            disp = source.displacement(grid, dtype=torch.float64)
        else:
            disp = torch.as_tensor(source)
            if tuple(disp.shape) != (*grid.shape, grid.ndim):
                raise GeometryError(f"displacement has shape {tuple(disp.shape)}, expected "
                                    f"{(*grid.shape, grid.ndim)} for grid {grid}")
        device = device if device is not None else disp.device
        disp = disp.detach().to(dtype=torch.float64, device=device)
        spline = cls(grid, control_spacing_mm, dtype=torch.float64, device=device)
        inverses = [torch.linalg.pinv(m) for m in spline.axis_matrices(grid, torch.float64,
                                                                       device)]
        coefficients = _contract(torch.movedim(disp, -1, 0), inverses)
        return cls.from_control_grid(spline.control_grid, coefficients, dtype=dtype,
                                     device=device)

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
        """Displacement ``(P, D)`` at continuous control indices ``u (P, D)`` (ITK order).

        The ``4^D`` taps of each point are evaluated as ``2^D`` D-linear lookups (Sigg and
        Hadwiger's trick): along each axis the 4 weights ``w0..w3`` are replaced by two
        linear interpolations at ``floor(u) - 1 + w1 / (w0 + w1)`` and
        ``floor(u) + 1 + w3 / (w2 + w3)`` weighted ``w0 + w1`` and ``w2 + w3``. This is exact
        (both weight sums are at least 1/6) and runs in ``grid_sample``'s fused kernels, whose
        backward pass is far cheaper than scattering 64 gathered taps per point.
        """
        d = self.ndim
        size = self.control_grid.size
        upper = torch.tensor([s - 2 for s in size], dtype=u.dtype, device=u.device)
        inside = ((u >= 1) & (u <= upper)).all(dim=-1)
        floor = torch.floor(u.detach())
        w = cubic_bspline_weights(u - floor)  # (P, D, 4)
        g0 = w[..., 0] + w[..., 1]
        g1 = w[..., 2] + w[..., 3]
        # Continuous indices of the two lookups per axis, normalised for align_corners=True.
        scale = torch.tensor([2.0 / (s - 1) for s in size], dtype=u.dtype, device=u.device)
        pos = torch.stack([(floor - 1 + w[..., 1] / g0) * scale - 1,
                           (floor + 1 + w[..., 3] / g1) * scale - 1])  # (2, P, D)
        gw = torch.stack([g0, g1])  # (2, P, D)
        corners = _corners(d, u.device)  # (2^D, D) of 0/1
        coords = torch.stack([pos[corners[:, a], :, a] for a in range(d)], dim=-1)
        weight = gw[corners[:, 0], :, 0]
        for a in range(1, d):
            weight = weight * gw[corners[:, a], :, a]  # (2^D, P)
        n, p = corners.shape[0], u.shape[0]
        # grid_sample's CPU kernels run one thread per batch entry: split the points.
        parts = max(min(torch.get_num_threads(), p // _MIN_PART_POINTS), 1)
        per = -(-p // parts)
        coords = F.pad(coords, (0, 0, 0, parts * per - p))  # (2^D, parts * per, D)
        grid = coords.reshape((n, parts, per, d)).transpose(0, 1).reshape(
            (parts, n, per) + (1,) * (d - 2) + (d,))
        table = coefficients[None].expand((parts, *coefficients.shape))
        looked = F.grid_sample(table, grid, mode="bilinear", padding_mode="zeros",
                               align_corners=True)  # (parts, D, 2^D, per[, 1])
        looked = looked.reshape(parts, d, n, per).permute(1, 2, 0, 3).reshape(d, n, -1)[..., :p]
        disp = (looked * weight).sum(dim=1).T  # (P, D)
        return torch.where(inside[:, None], disp, torch.zeros_like(disp))

    def _displacement_points(self, points: Tensor) -> Tensor:
        self._check_points(points)
        dtype = points.dtype if points.is_floating_point() else self.coefficients.dtype
        points = points.to(dtype)
        coefficients = self._coefficients_as(dtype, points.device)
        flat = points.reshape(-1, self.ndim)
        chunk = max(_CHUNK_ELEMENTS // 2**self.ndim, 1)
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

    def inverse(self, max_iterations: int = 200, tolerance_mm: float = 1e-4):
        """The inverse map, solved point by point by fixed-point iteration (see
        :class:`~itreg.transforms.inverse.IterativeInverse`); exact to `tolerance_mm` where the
        FFD does not fold."""
        from itreg.transforms.inverse import IterativeInverse

        return IterativeInverse(self, max_iterations=max_iterations, tolerance_mm=tolerance_mm)

    def same_direction(self, grid: Grid) -> bool:
        """Whether `grid` has the control grid's direction (then the displacement on it is
        separable: :meth:`axis_matrices`)."""
        return grid.ndim == self.ndim and bool(
            np.allclose(grid.direction, self.control_grid.direction, atol=_DIRECTION_TOL)
        )

    def axis_matrices(self, grid: Grid, dtype, device) -> list[Tensor]:
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
        if not self.same_direction(grid):
            return self._displacement_points(grid.points(dtype=dtype, device=device))
        mats = self.axis_matrices(grid, dtype, device)
        coef = torch.movedim(self._coefficients_as(dtype, device), 0, -1)  # (*M, D)
        return _contract_channels_last(coef, mats)

    def on_grid(self, grid: Grid, dtype: torch.dtype | None = None, device=None) -> Tensor:
        """``T(x)`` on every voxel of `grid`, ``(*grid.shape, D)``; fast separable path."""
        disp = self.displacement(grid, dtype=dtype, device=device)
        return disp.add_(grid.points(dtype=disp.dtype, device=disp.device))

    # ------------------------------------------------------------------ regularisation
    def _domain_box(self, domain: Grid | None) -> tuple[list[float], list[float], float]:
        """Per-axis control-index bounds of the integration region (the domain's outer voxel
        edges, clipped to the valid region) and the domain's volume in control-index units."""
        d = self.ndim
        size = self.control_grid.size
        if domain is None:
            lo, hi = [1.0] * d, [s - 2.0 for s in size]
            return lo, hi, float(np.prod([h - low for low, h in zip(lo, hi)]))
        if domain.ndim != d:
            raise GeometryError(f"a {domain.ndim}D domain for a {d}D B-spline")
        corners = torch.tensor(
            [[(c >> a & 1) * domain.size[a] - 0.5 for a in range(d)] for c in range(2**d)],
            dtype=torch.float64)
        u = self.control_grid.world_to_index(domain.index_to_world(corners)).numpy()
        box_lo, box_hi = u.min(axis=0), u.max(axis=0)
        volume = float(np.prod(box_hi - box_lo))
        lo = [max(float(v), 1.0) for v in box_lo]
        hi = [max(min(float(v), s - 2.0), low) for v, s, low in zip(box_hi, size, lo)]
        return lo, hi, volume

    def _bending_operators(self, domain: Grid | None, dtype, device):
        """The bending energy's quadratic form: ``("diagonal", weights (3,)*D, per-axis stacks
        of the Gram matrices of orders 0, 1, 2)`` when ``A A^T`` is diagonal, else
        ``("general", [(weight, [per-axis Gram matrix])], None)``."""
        key = (None if domain is None else (domain.size, domain.spacing, domain.origin,
                                            domain.direction), dtype, str(device))
        cached = self._bending_cache.get(key)
        if cached is not None:
            return cached
        d = self.ndim
        lo, hi, volume = self._domain_box(domain)
        # d/dx_j = sum_a A[a, j] d/du_a with A = du/dx; |A^T H_u A|_F^2 needs M = A A^T.
        a_mat = self.control_grid.world_to_index_matrix()[:d, :d]
        metric = a_mat @ a_mat.T
        gram: dict = {}

        def g(axis: int, p: int, q: int) -> Tensor:
            if (axis, p, q) not in gram:
                mat = bspline_gram(self.control_grid.size[axis], lo[axis], hi[axis], p, q)
                gram[(axis, p, q)] = torch.as_tensor(mat, dtype=dtype, device=device)
            return gram[(axis, p, q)]

        scale = 1.0 / volume if volume > 0 else 0.0
        if np.allclose(metric, np.diag(np.diag(metric)), rtol=0.0,
                       atol=1e-12 * float(np.abs(metric).max())):
            # The usual case (orthonormal direction): only terms with c = a, e = b, whose
            # per-axis derivative orders (0, 1 or 2) are the same in both factors.
            weights = np.zeros((3,) * d)
            for a in range(d):
                for b in range(d):
                    orders = tuple((a == x) + (b == x) for x in range(d))
                    weights[orders] += metric[a, a] * metric[b, b] * scale
            stacks = [torch.stack([g(x, o, o) for o in range(3)]) for x in range(d)]
            result = ("diagonal", torch.as_tensor(weights, dtype=dtype, device=device), stacks)
            self._bending_cache[key] = result
            return result
        terms = []
        tol = 1e-12 * float(np.abs(metric).max()) ** 2
        for a in range(d):
            for b in range(d):
                for c in range(d):
                    for e in range(d):
                        weight = metric[a, c] * metric[b, e] * scale
                        if abs(weight) <= tol * scale:
                            continue
                        mats = [g(x, (a == x) + (b == x), (c == x) + (e == x)) for x in range(d)]
                        terms.append((float(weight), mats))
        result = ("general", terms, None)
        self._bending_cache[key] = result
        return result

    def bending_energy(self, domain: Grid | None = None) -> Tensor:
        """Exact thin-plate bending energy of the displacement, averaged over `domain`.

        ``(1 / |domain|) int_domain sum_i sum_jk (d^2 d_i / d x_j d x_k)^2 dx`` in 1/mm^2, the
        continuous counterpart of :func:`itreg.regularisers.bending_energy` (which averages
        finite differences over voxels). The displacement is a tensor product of cubic
        B-splines, so the integral is a quadratic form in the coefficients built from exact 1D
        Gram matrices of ``B3``, ``B3'`` and ``B3''``: no field is evaluated, and the cost
        depends on the control grid only.

        Args:
            domain: the region (outer voxel edges of a grid, clipped to the valid region where
                the displacement is defined); default the valid region itself. The region
                is the bounding box in control-grid coordinates of the domain's corners, which
                is the domain itself when it has the control grid's direction.

        Returns:
            Scalar tensor with the coefficients' dtype, differentiable in them.
        """
        coef = self.coefficients
        kind, first, stacks = self._bending_operators(domain, coef.dtype, coef.device)
        if kind == "diagonal":
            return _stacked_quadratic_form(coef, stacks, first)
        total = coef.new_zeros(())
        for weight, mats in first:
            total = total + weight * (coef * _contract(coef, mats)).sum()
        return total

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

"""Sampling grids in world coordinates.

`Grid` is the only place in itreg that converts between three frames:

* ``INDEX``: continuous voxel indices in ITK order ``(i, j, k)``, i.e. the *last* tensor axis first.
* ``WORLD``: ITK physical space (LPS, millimetres), ``x = origin + direction @ (spacing * index)``.
* ``NORMALIZED``: the coordinates of :func:`torch.nn.functional.grid_sample` with
  ``align_corners=True``: ``-1`` at the centre of the first voxel, ``+1`` at the centre of the last.

Points are tensors ``(..., D)`` in ITK order ``(x, y, z)``. Image tensors are ``(C, Z, Y, X)``
(``(C, Y, X)`` in 2D), so ``Grid.shape`` is ``Grid.size`` reversed. Geometry is kept in float64;
conversions run in the dtype of the points they are given.
"""

from __future__ import annotations

import enum
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from itreg.errors import ConfigError, GeometryError

#: Largest number of voxels a grid may have (guards against hostile headers).
MAX_VOXELS = 2**31


class Frame(enum.Enum):
    INDEX = "index"
    WORLD = "world"
    NORMALIZED = "normalized"


def _tuple(values, n: int, name: str, cast=float) -> tuple:
    values = tuple(cast(v) for v in np.asarray(values, dtype=np.float64).ravel())
    if len(values) != n:
        raise GeometryError(f"{name} has {len(values)} values, expected {n}")
    return values


@dataclass(frozen=True)
class Grid:
    """A regular sampling grid: size, spacing, origin and direction, as in ITK.

    Args:
        size: number of voxels per axis, ITK order ``(nx, ny[, nz])``.
        spacing: voxel spacing in mm, ITK order. Defaults to 1.
        origin: world position of voxel index 0, ITK order. Defaults to 0.
        direction: D x D direction cosines, row-major as SimpleITK's ``GetDirection()``.
            Defaults to the identity.
    """

    size: tuple[int, ...]
    spacing: tuple[float, ...] = ()
    origin: tuple[float, ...] = ()
    direction: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        size = tuple(int(s) for s in self.size)
        d = len(size)
        if d not in (2, 3):
            raise GeometryError(f"grids must be 2D or 3D, got {d}D size {size}")
        if any(s < 1 for s in size):
            raise GeometryError(f"grid size must be positive, got {size}")
        if math.prod(size) > MAX_VOXELS:
            raise GeometryError(f"grid size {size} has more than {MAX_VOXELS} voxels")
        spacing = _tuple(self.spacing or (1.0,) * d, d, "spacing")
        if any(not (s > 0 and math.isfinite(s)) for s in spacing):
            raise ConfigError(f"spacing must be positive and finite, got {spacing}")
        origin = _tuple(self.origin or (0.0,) * d, d, "origin")
        if any(not math.isfinite(o) for o in origin):
            raise GeometryError(f"origin must be finite, got {origin}")
        direction = _tuple(
            self.direction if len(self.direction) else np.eye(d).ravel(), d * d, "direction"
        )
        det = float(np.linalg.det(np.asarray(direction).reshape(d, d)))
        if not math.isfinite(det) or abs(det) < 1e-6:
            raise GeometryError(f"direction matrix is degenerate (det={det:.3g}): {direction}")
        object.__setattr__(self, "size", size)
        object.__setattr__(self, "spacing", spacing)
        object.__setattr__(self, "origin", origin)
        object.__setattr__(self, "direction", direction)

    # ------------------------------------------------------------------ basic properties
    @property
    def ndim(self) -> int:
        return len(self.size)

    @property
    def shape(self) -> tuple[int, ...]:
        """Tensor shape of one channel: ``size`` reversed, ``(Z, Y, X)``."""
        return tuple(reversed(self.size))

    @property
    def numel(self) -> int:
        return math.prod(self.size)

    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=np.float64).reshape(self.ndim, self.ndim)

    @functools.cached_property
    def _index_to_world_matrix(self) -> np.ndarray:
        """Homogeneous (D+1) x (D+1) float64 matrix mapping ITK indices to world points."""
        d = self.ndim
        m = np.eye(d + 1)
        m[:d, :d] = self.direction_matrix() * np.asarray(self.spacing)[None, :]
        m[:d, d] = self.origin
        return m

    @functools.cached_property
    def _world_to_index_matrix(self) -> np.ndarray:
        return np.linalg.inv(self.index_to_world_matrix())

    @functools.cached_property
    def _index_to_normalized_matrix(self) -> np.ndarray:
        """Homogeneous matrix from ITK indices to ``grid_sample`` coordinates (align_corners)."""
        d = self.ndim
        m = np.eye(d + 1)
        for a, n in enumerate(self.size):
            scale = 2.0 / (n - 1) if n > 1 else 0.0
            m[a, a] = scale
            m[a, d] = -1.0 if n > 1 else 0.0
        return m

    @functools.cached_property
    def _world_to_normalized_matrix(self) -> np.ndarray:
        return self.index_to_normalized_matrix() @ self.world_to_index_matrix()

    # The matrices are computed once per grid (it is immutable); callers get copies.
    def index_to_world_matrix(self) -> np.ndarray:
        """Homogeneous (D+1) x (D+1) float64 matrix mapping ITK indices to world points."""
        return self._index_to_world_matrix.copy()

    def world_to_index_matrix(self) -> np.ndarray:
        return self._world_to_index_matrix.copy()

    def index_to_normalized_matrix(self) -> np.ndarray:
        """Homogeneous matrix from ITK indices to ``grid_sample`` coordinates (align_corners)."""
        return self._index_to_normalized_matrix.copy()

    def world_to_normalized_matrix(self) -> np.ndarray:
        return self._world_to_normalized_matrix.copy()

    # ------------------------------------------------------------------ conversions
    @staticmethod
    def _apply(matrix: np.ndarray, points: Tensor) -> Tensor:
        d = matrix.shape[0] - 1
        if points.shape[-1] != d:
            raise GeometryError(f"points have {points.shape[-1]} coordinates, grid is {d}D")
        dtype = points.dtype if points.is_floating_point() else torch.float64
        m = torch.as_tensor(matrix, dtype=dtype, device=points.device)
        return points.to(dtype) @ m[:d, :d].T + m[:d, d]

    def index_to_world(self, index: Tensor) -> Tensor:
        return self._apply(self._index_to_world_matrix, index)

    def world_to_index(self, points: Tensor) -> Tensor:
        return self._apply(self._world_to_index_matrix, points)

    def world_to_normalized(self, points: Tensor) -> Tensor:
        return self._apply(self._world_to_normalized_matrix, points)

    def normalized_to_world(self, coords: Tensor) -> Tensor:
        # Axes of size 1 have no normalised extent: they map to index 0.
        m = self.index_to_normalized_matrix()
        inv = np.eye(self.ndim + 1)
        for a, n in enumerate(self.size):
            if n > 1:
                inv[a, a] = 1.0 / m[a, a]
                inv[a, -1] = -m[a, -1] / m[a, a]
            else:
                inv[a, a] = 0.0
        return self._apply(self.index_to_world_matrix() @ inv, coords)

    def convert(self, points: Tensor, src: Frame, dst: Frame) -> Tensor:
        """Convert points between any two frames of this grid."""
        if src == dst:
            return points
        if src == Frame.NORMALIZED:
            points, src = self.normalized_to_world(points), Frame.WORLD
        elif src == Frame.INDEX:
            points, src = self.index_to_world(points), Frame.WORLD
        if dst == Frame.WORLD:
            return points
        if dst == Frame.INDEX:
            return self.world_to_index(points)
        return self.world_to_normalized(points)

    def indices(self, dtype=torch.float32, device=None) -> Tensor:
        """ITK indices of every voxel, shape ``(*shape, D)``."""
        axes = [torch.arange(n, dtype=dtype, device=device) for n in self.shape]
        mesh = torch.meshgrid(*axes, indexing="ij")  # (Z, Y, X) order
        return torch.stack(mesh[::-1], dim=-1)  # last coordinate = first tensor axis

    def points(self, dtype=torch.float32, device=None) -> Tensor:
        """World coordinates of every voxel centre, shape ``(*shape, D)``."""
        m = torch.as_tensor(self.index_to_world_matrix(), dtype=torch.float64)
        d = self.ndim
        # Separable: world = origin + sum_a column_a * index_a, built per axis in float64.
        out = torch.zeros(*self.shape, d, dtype=torch.float64)
        for a, n in enumerate(self.size):
            idx = torch.arange(n, dtype=torch.float64)
            view = [1] * d
            view[d - 1 - a] = n
            out += idx.view(*view, 1) * m[:d, a]
        out += m[:d, d]
        return out.to(dtype=dtype, device=device)

    # ------------------------------------------------------------------ derived grids
    @property
    def center(self) -> tuple[float, ...]:
        """World position of the geometric centre of the grid."""
        idx = torch.tensor([(n - 1) / 2.0 for n in self.size], dtype=torch.float64)
        return tuple(self.index_to_world(idx).tolist())

    def corners(self, dtype=torch.float64) -> Tensor:
        """World coordinates of the 2^D corner voxel centres, shape ``(2^D, D)``."""
        d = self.ndim
        idx = torch.tensor(
            [[(c >> a & 1) * (self.size[a] - 1) for a in range(d)] for c in range(2**d)],
            dtype=torch.float64,
        )
        return self.index_to_world(idx).to(dtype)

    def extent(self) -> tuple[float, ...]:
        """Physical length of each axis between the outer voxel edges, in mm."""
        return tuple(n * s for n, s in zip(self.size, self.spacing))

    def radius(self) -> float:
        """Half the diagonal of the physical extent (used to scale rotations to mm)."""
        return 0.5 * math.sqrt(sum(e * e for e in self.extent()))

    def shrink(self, factors: int | Sequence[int]) -> Grid:
        """Coarser grid as ITK's ShrinkImageFilter makes it: size // f, spacing * f, same centre."""
        if isinstance(factors, (int, np.integer)):
            factors = (int(factors),) * self.ndim
        factors = tuple(int(f) for f in factors)
        if len(factors) != self.ndim or any(f < 1 for f in factors):
            raise ConfigError(f"shrink factors must be {self.ndim} integers >= 1, got {factors}")
        size = tuple(max(n // f, 1) for n, f in zip(self.size, factors))
        spacing = tuple(s * f for s, f in zip(self.spacing, factors))
        return self.resized(size, spacing)

    def resized(self, size: Sequence[int], spacing: Sequence[float]) -> Grid:
        """Grid with the same centre and direction but another size and spacing."""
        shifted = Grid(tuple(size), tuple(spacing), (0.0,) * self.ndim, self.direction)
        c_old = np.asarray(self.center)
        c_new = np.asarray(shifted.center)
        origin = c_old - c_new
        return Grid(tuple(size), tuple(spacing), tuple(origin), self.direction)

    def with_spacing(self, spacing: float | Sequence[float]) -> Grid:
        """Grid covering the same extent at another spacing (same centre and direction)."""
        if isinstance(spacing, (int, float)):
            spacing = (float(spacing),) * self.ndim
        size = tuple(max(round(e / s), 1) for e, s in zip(self.extent(), spacing))
        return self.resized(size, spacing)

    def same_as(self, other: Grid, tol: float = 1e-4) -> bool:
        """Whether two grids sample the same points (within `tol` mm / relative)."""
        if self.size != other.size:
            return False
        return bool(
            np.allclose(self.spacing, other.spacing, rtol=tol, atol=tol)
            and np.allclose(self.origin, other.origin, rtol=0, atol=tol * max(self.spacing))
            and np.allclose(self.direction, other.direction, atol=tol)
        )

    def __repr__(self) -> str:
        f = lambda v: "(" + ", ".join(f"{x:g}" for x in v) + ")"
        return (
            f"Grid(size={self.size}, spacing={f(self.spacing)}, origin={f(self.origin)}, "
            f"direction={f(self.direction)})"
        )

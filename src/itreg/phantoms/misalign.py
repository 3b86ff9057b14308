"""Known misalignments: random linear transforms with documented ranges, and padding.

Two protocols:

* :func:`random_affine`: paper 000 (DITR, section 1 of ``notes/methods.md``). Rigid: per axis
  a translation of magnitude U(1, 25) mm and per Euler angle a rotation of magnitude
  U(0.01, 0.15) rad, each with a random sign. Affine adds a scale U(0.95, 1.05) per axis and
  a shear U(-0.01, 0.01) per off-diagonal matrix term.
* :func:`anchor_affine`: the anchor benchmark (``notes/anchors.md``): Euler angles
  U(-15, 15) degrees, translations U(-20, 20) mm per axis, scales U(0.95, 1.05), no shear.

The matrix is ``A = R @ H @ S``: ``S = diag(scales)``, ``H`` the identity plus the shear terms,
``R`` the ITK Euler rotation (3D ``Rz @ Rx @ Ry``). The transform is
``T(x) = A (x - c) + c + t`` about a centre ``c`` (ITK's parameterisation), mapping fixed-space
points to moving-space points. Draws come from a CPU ``torch.Generator`` seeded with ``seed``
(float64), so a seed gives the same transform on any device. Rigid and affine draws of one
seed share their translation and rotation.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from itreg.errors import ConfigError, GeometryError, unknown_name
from itreg.grid import Grid
from itreg.image import Image
from itreg.transforms import Affine, rotation_matrix

#: Kinds of random linear transform.
KINDS = ("rigid", "affine")


@dataclass(frozen=True)
class AffineParameters:
    """The parameters of one random linear transform (all float, ITK axis order).

    Attributes:
        translation: ``t`` in mm, one value per axis.
        angles: ITK Euler angles in radians (1 in 2D, ``(ax, ay, az)`` in 3D).
        scales: per-axis scale factors (1 for rigid).
        shear: the off-diagonal terms of ``H``, row-major over ``i != j`` (0 for rigid).
    """

    translation: tuple[float, ...]
    angles: tuple[float, ...]
    scales: tuple[float, ...]
    shear: tuple[float, ...]

    @property
    def ndim(self) -> int:
        return len(self.translation)

    def matrix(self) -> np.ndarray:
        """The D x D linear part ``A = R @ H @ S`` (float64)."""
        d = self.ndim
        r = rotation_matrix(torch.tensor(self.angles, dtype=torch.float64), d).numpy()
        h = np.eye(d)
        off = [(i, j) for i in range(d) for j in range(d) if i != j]
        for (i, j), v in zip(off, self.shear):
            h[i, j] = v
        return r @ h @ np.diag(self.scales)

    def to_affine(self, center: Sequence[float] | Tensor, dtype: torch.dtype = torch.float32,
                  device=None) -> Affine:
        """The transform ``T(x) = A (x - c) + c + t`` with centre `center` (world mm)."""
        return Affine(self.ndim, center=center, translation=self.translation,
                      matrix=self.matrix(), dtype=dtype, device=device)


def _range(values, name: str, low: float = -math.inf, high: float = math.inf) -> tuple[float, float]:
    lo, hi = (float(v) for v in values)
    if not (low <= lo <= hi <= high):
        raise ConfigError(f"{name} range must satisfy {low:g} <= lo <= hi <= {high:g}, got {values}")
    return lo, hi


def _uniform(gen: torch.Generator, n: int, lo: float, hi: float) -> list[float]:
    return (lo + (hi - lo) * torch.rand(n, generator=gen, dtype=torch.float64)).tolist()


def _signed(gen: torch.Generator, n: int, lo: float, hi: float) -> list[float]:
    """Magnitudes uniform in [lo, hi], each with a random sign."""
    mags = _uniform(gen, n, lo, hi)
    signs = torch.where(torch.rand(n, generator=gen, dtype=torch.float64) < 0.5, -1.0, 1.0)
    return [m * s for m, s in zip(mags, signs.tolist())]


def sample_affine_parameters(
    ndim: int,
    seed: int = 0,
    kind: str = "rigid",
    translation_mm: tuple[float, float] = (1.0, 25.0),
    rotation_rad: tuple[float, float] = (0.01, 0.15),
    scale: tuple[float, float] = (0.95, 1.05),
    shear: tuple[float, float] = (-0.01, 0.01),
) -> AffineParameters:
    """Draw the parameters of a random rigid or affine transform (see the module docstring).

    Args:
        ndim: 2 or 3.
        seed: seed of the draws.
        kind: ``"rigid"`` (translation + rotation) or ``"affine"`` (also scale and shear).
        translation_mm: range of each translation's magnitude in mm (random sign).
        rotation_rad: range of each Euler angle's magnitude in radians (random sign).
        scale: range of each axis' scale factor (affine only).
        shear: range of each off-diagonal shear term (affine only).

    Returns:
        The drawn :class:`AffineParameters`.

    Raises:
        ConfigError: for an unknown kind or an invalid range.
        GeometryError: for a dimension other than 2 or 3.
    """
    if ndim not in (2, 3):
        raise GeometryError(f"random transforms are 2D or 3D, got ndim={ndim}")
    if kind not in KINDS:
        raise unknown_name("transform kind", kind, KINDS)
    t_lo, t_hi = _range(translation_mm, "translation_mm", 0.0)
    r_lo, r_hi = _range(rotation_rad, "rotation_rad", 0.0, math.pi)
    s_lo, s_hi = _range(scale, "scale", 1e-6)
    h_lo, h_hi = _range(shear, "shear", -0.99, 0.99)
    gen = torch.Generator().manual_seed(int(seed))
    n_angles = 1 if ndim == 2 else 3
    translation = _signed(gen, ndim, t_lo, t_hi)
    angles = _signed(gen, n_angles, r_lo, r_hi)
    if kind == "affine":
        scales = _uniform(gen, ndim, s_lo, s_hi)
        shears = _uniform(gen, ndim * (ndim - 1), h_lo, h_hi)
    else:
        scales, shears = [1.0] * ndim, [0.0] * (ndim * (ndim - 1))
    return AffineParameters(tuple(translation), tuple(angles), tuple(scales), tuple(shears))


def random_affine(
    ndim: int,
    center: Sequence[float] | Tensor,
    seed: int = 0,
    kind: str = "rigid",
    translation_mm: tuple[float, float] = (1.0, 25.0),
    rotation_rad: tuple[float, float] = (0.01, 0.15),
    scale: tuple[float, float] = (0.95, 1.05),
    shear: tuple[float, float] = (-0.01, 0.01),
    dtype: torch.dtype = torch.float32,
    device=None,
) -> Affine:
    """A random rigid or affine transform with paper 000's ranges (by default).

    Args:
        ndim: 2 or 3.
        center: centre of rotation ``c`` in world mm (for a brain, its centre).
        seed: seed of the draws.
        kind: ``"rigid"`` or ``"affine"``.
        translation_mm: range of each translation's magnitude in mm (random sign).
        rotation_rad: range of each Euler angle's magnitude in radians (random sign).
        scale: range of each axis' scale factor (affine only).
        shear: range of each off-diagonal shear term (affine only).
        dtype: dtype of the transform.
        device: device of the transform.

    Returns:
        An :class:`~itreg.transforms.Affine` mapping fixed-space to moving-space points.
    """
    params = sample_affine_parameters(ndim, seed, kind, translation_mm, rotation_rad, scale,
                                      shear)
    return params.to_affine(center, dtype=dtype, device=device)


def anchor_parameters(ndim: int, seed: int = 0) -> AffineParameters:
    """Parameters with the anchor benchmark's ranges (see :func:`anchor_affine`)."""
    return sample_affine_parameters(ndim, seed, "affine", translation_mm=(0.0, 20.0),
                                    rotation_rad=(0.0, math.radians(15.0)),
                                    scale=(0.95, 1.05), shear=(0.0, 0.0))


def anchor_affine(ndim: int, center: Sequence[float] | Tensor, seed: int = 0,
                  dtype: torch.dtype = torch.float32, device=None) -> Affine:
    """A random affine with the anchor benchmark's ranges (``notes/anchors.md``).

    Euler angles U(-15, 15) degrees, translations U(-20, 20) mm per axis, scales
    U(0.95, 1.05) per axis, no shear.

    Args:
        ndim: 2 or 3.
        center: centre of rotation in world mm.
        seed: seed of the draws.
        dtype: dtype of the transform.
        device: device of the transform.

    Returns:
        An :class:`~itreg.transforms.Affine` mapping fixed-space to moving-space points.
    """
    return anchor_parameters(ndim, seed).to_affine(center, dtype=dtype, device=device)


def _margins(grid: Grid, margin_mm) -> tuple[int, ...]:
    if isinstance(margin_mm, (int, float)):
        margin_mm = (float(margin_mm),) * grid.ndim
    margin_mm = tuple(float(m) for m in margin_mm)
    if len(margin_mm) != grid.ndim or any(not (m >= 0 and math.isfinite(m)) for m in margin_mm):
        raise ConfigError(f"margin_mm must be {grid.ndim} finite values >= 0, got {margin_mm}")
    return tuple(math.ceil(m / s - 1e-9) for m, s in zip(margin_mm, grid.spacing))


def pad_grid(grid: Grid, margin_mm: float | Sequence[float]) -> Grid:
    """The grid enlarged by at least `margin_mm` on both sides of every axis.

    Whole voxels are added (``ceil(margin / spacing)`` per side); spacing and direction are
    kept, and the old voxels keep their world positions.

    Args:
        grid: the grid.
        margin_mm: margin in mm, one value or one per axis (ITK order).

    Returns:
        The padded grid.
    """
    pads = _margins(grid, margin_mm)
    origin = grid.index_to_world(torch.tensor([-p for p in pads], dtype=torch.float64))
    size = tuple(n + 2 * p for n, p in zip(grid.size, pads))
    return Grid(size, grid.spacing, tuple(origin.tolist()), grid.direction)


def pad_image(image: Image, margin_mm: float | Sequence[float], value: float = 0.0) -> Image:
    """Pad an image with a constant on both sides of every axis (see :func:`pad_grid`).

    The template brain touches the bottom of its field of view, so a moving image made by a
    large transform needs room around it.

    Args:
        image: the image (labels stay labels, dtype kept).
        margin_mm: margin in mm, one value or one per axis (ITK order).
        value: the padding value.

    Returns:
        The padded image; its voxels keep their world positions.
    """
    pads = _margins(image.grid, margin_mm)
    # F.pad lists the last tensor axis (ITK axis 0) first.
    flat = [p for p in pads for _ in range(2)]
    data = F.pad(image.data, flat, mode="constant", value=value)
    return Image(data, pad_grid(image.grid, margin_mm), image.is_label)

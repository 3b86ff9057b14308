"""Random free-form deformations (FFD) with a known ground truth.

Paper 003's protocol (KLDivNet, section 4 of ``notes/methods.md``): a cubic B-spline control
grid with 20 mm spacing covering the image, and i.i.d. ``N(0, sigma^2)`` displacements
(``sigma`` = 6 mm) for every component of every control point. The result is an
:class:`~itreg.transforms.BSpline` ``T(x) = x + sum_k B(x - x_k) c_k`` that maps fixed-space
world points to moving-space world points (ITK's convention), in 2D or 3D.

Options:

* ``zero_outside_fov``: control points whose positions lie outside the grid's field of view
  (beyond the outer voxel edges, i.e. the support margin of ITK's control-grid layout) get zero
  displacement, so the deformation fades towards the image border.
* ``mask``: control points whose cubic support (2 control spacings each side) does not reach
  a nonzero voxel of the mask get zero displacement: only the anatomy is deformed.
* ``bound``: invertibility. A cubic B-spline FFD is a diffeomorphism when every coefficient
  component satisfies ``|c| < K * spacing`` with ``K = 0.4`` (Rueckert et al. 2006, from Choi &
  Lee 2000's sufficient condition for 3D; 2D's bound is larger, so 0.4 is safe there too).
  With ``sigma = 6`` mm at 20 mm spacing about 18% of components exceed 8 mm, so the plain
  protocol folds on a small fraction of voxels (measured in the tests). ``bound="clip"``
  clamps each component to ``[-K s, K s]`` (the draw stays Gaussian inside the bound) and
  ``bound="scale"`` scales the whole field down uniformly when its largest component exceeds
  the bound; both guarantee ``det J > 0`` everywhere. ``bound=None`` (default) is paper 003's
  protocol as printed.

Draws come from a CPU ``torch.Generator`` seeded with ``seed`` (float64), so a seed gives the
same deformation on any device.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from itreg.errors import ConfigError, GeometryError, MaskError, unknown_name
from itreg.grid import Grid
from itreg.image import Image
from itreg.transforms import BSpline

#: Choi & Lee / Rueckert sufficient bound on |coefficient| / control spacing for injectivity.
INJECTIVE_FRACTION = 0.4

#: Ways to keep a random FFD invertible (``None``: the plain Gaussian protocol).
BOUND_MODES = ("clip", "scale")


def _spacing_tuple(value: float | Sequence[float], ndim: int) -> tuple[float, ...]:
    vals = (float(value),) * ndim if isinstance(value, (int, float)) else tuple(float(v) for v in value)
    if len(vals) != ndim or any(not (math.isfinite(v) and v > 0) for v in vals):
        raise ConfigError(f"control_spacing_mm must be {ndim} positive finite values, got {value}")
    return vals


def _fov_keep(control: Grid, grid: Grid) -> torch.Tensor:
    """Control points inside the image's field of view (outer voxel edges), ``control.shape``."""
    pts = control.points(dtype=torch.float64)  # (*shape, D)
    index = grid.world_to_index(pts)
    hi = torch.tensor([n - 1 for n in grid.size], dtype=torch.float64)
    return ((index >= -0.5 - 1e-6) & (index <= hi + 0.5 + 1e-6)).all(dim=-1)


def _mask_keep(control: Grid, mask: Image) -> torch.Tensor:
    """Control points whose cubic support reaches a nonzero mask voxel, ``control.shape``.

    A point with continuous control index ``u`` is supported by the control points
    ``floor(u) - 1 ... floor(u) + 2`` on each axis; those are marked for every nonzero voxel.
    """
    inside = mask.data[0] != 0
    if not bool(inside.any()):
        raise MaskError("the deformation mask is empty")
    vox = torch.nonzero(inside.cpu()).to(torch.float64).flip(-1)  # (P, D), ITK order
    cells = torch.floor(control.world_to_index(mask.grid.index_to_world(vox))).to(torch.int64)
    cells = torch.unique(cells, dim=0)
    d = control.ndim
    offsets = torch.stack(torch.meshgrid(*[torch.arange(-1, 3)] * d, indexing="ij"),
                          dim=-1).reshape(-1, d)
    ks = (cells[:, None, :] + offsets[None]).reshape(-1, d)
    size = torch.tensor(control.size)
    ks = ks[((ks >= 0) & (ks < size)).all(dim=-1)]
    keep = torch.zeros(control.shape, dtype=torch.bool)
    keep[tuple(ks.flip(-1).T)] = True  # tensor order (Z, Y, X)
    return keep


def random_ffd(
    grid: Grid,
    control_spacing_mm: float | Sequence[float] = 20.0,
    sigma_mm: float = 6.0,
    seed: int = 0,
    mask: Image | None = None,
    zero_outside_fov: bool = False,
    bound: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> BSpline:
    """A random cubic B-spline FFD with paper 003's protocol (see the module docstring).

    Args:
        grid: the fixed-space grid the deformation covers (2D or 3D); the control grid is
            :class:`~itreg.transforms.BSpline`'s layout for it.
        control_spacing_mm: control point spacing in mm, one value or one per axis (ITK order).
        sigma_mm: standard deviation of each coefficient component in mm (>= 0).
        seed: seed of the draws.
        mask: optional image on any grid; control points whose support misses its nonzero
            voxels are zeroed.
        zero_outside_fov: zero the control points lying outside the grid's field of view.
        bound: ``None`` (plain protocol), ``"clip"`` or ``"scale"`` to keep every component
            below ``INJECTIVE_FRACTION * spacing`` (a sufficient condition for invertibility).
        dtype: dtype of the coefficients.
        device: device of the coefficients (default: the mask's device, else CPU).

    Returns:
        A :class:`~itreg.transforms.BSpline` mapping fixed-space to moving-space points, with
        coefficients ``(D, *control_grid.shape)`` in world mm.

    Raises:
        ConfigError: for a negative or non-finite sigma, a bad spacing or an unknown bound.
        GeometryError: for a grid that is not 2D or 3D, or a mask of another dimension.
        MaskError: for an empty mask.
    """
    if grid.ndim not in (2, 3):
        raise GeometryError(f"random FFDs are 2D or 3D, got a {grid.ndim}D grid")
    if not (math.isfinite(float(sigma_mm)) and float(sigma_mm) >= 0):
        raise ConfigError(f"sigma_mm must be finite and >= 0, got {sigma_mm}")
    if bound is not None and bound not in BOUND_MODES:
        raise unknown_name("FFD bound", bound, BOUND_MODES)
    spacing = _spacing_tuple(control_spacing_mm, grid.ndim)
    if device is None and mask is not None:
        device = mask.device
    shape_tf = BSpline(grid, spacing, dtype=torch.float64)
    control = shape_tf.control_grid
    gen = torch.Generator().manual_seed(int(seed))
    coef = torch.randn((grid.ndim, *control.shape), generator=gen, dtype=torch.float64)
    coef = coef * float(sigma_mm)
    keep = torch.ones(control.shape, dtype=torch.bool)
    if zero_outside_fov:
        keep &= _fov_keep(control, grid)
    if mask is not None:
        if mask.ndim != grid.ndim:
            raise GeometryError(f"mask is {mask.ndim}D but the grid is {grid.ndim}D")
        keep &= _mask_keep(control, mask)
    coef = coef * keep
    if bound is not None:
        # The sufficient condition bounds every component by K times the (smallest) spacing.
        limit = INJECTIVE_FRACTION * min(control.spacing)
        if bound == "clip":
            coef = coef.clamp(-limit, limit)
        else:
            peak = float(coef.abs().max()) if coef.numel() else 0.0
            if peak > limit:
                coef = coef * (limit / peak) * (1.0 - 1e-6)
    return BSpline.from_control_grid(control, coef, dtype=dtype, device=device)


def folding_fraction(transform: BSpline, grid: Grid, mask: Image | None = None) -> float:
    """Fraction of the voxels of `grid` (inside `mask`) where ``det J <= 0``.

    Args:
        transform: the deformation.
        grid: the grid of evaluation points.
        mask: optional mask on `grid` (nonzero voxels count).

    Returns:
        A fraction in ``[0, 1]``.
    """
    from itreg.transforms import jacobian_determinant

    with torch.no_grad():
        det = jacobian_determinant(transform, grid)
    if mask is not None:
        m = mask.data.reshape(grid.shape).to(det.device) != 0
        if not bool(m.any()):
            raise MaskError("the evaluation mask is empty")
        det = det[m]
    return float((det <= 0).to(torch.float64).mean())


__all__ = ["BOUND_MODES", "INJECTIVE_FRACTION", "folding_fraction", "random_ffd"]

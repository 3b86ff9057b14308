"""Random diffeomorphisms from stationary velocity fields, with an exact ground truth.

Deformations that are *not* cubic B-splines, so that a B-spline registration does not get its
own model as the truth. A velocity field ``v`` is drawn as white Gaussian noise smoothed by a
Gaussian of ``smoothness_mm`` (several scales: a sum of independently drawn fields, one per
scale, each normalised to unit RMS per component, so every scale contributes equally), scaled to
an RMS of ``sigma_mm`` per component, and tapered smoothly to zero over ``taper_mm`` at the
border of the image (so that the deformation, which is zero outside the image as ITK's
displacement-field transforms are, stays continuous there). The noise is drawn on a coarse
grid of spacing ``min(smoothness_mm) / 4`` covering the image (the same draw for a seed at any
image spacing) and interpolated linearly onto the image grid.

The ground truth is ``T = exp(v)`` integrated by scaling and squaring on the image grid
(:func:`~itreg.transforms.dense.integrate_velocity`, with enough squarings that the first
step moves less than a quarter voxel), held as a
:class:`~itreg.transforms.DisplacementField`: ``T(x) = x + d(x)`` with ``d`` linearly
interpolated. That field *is* the truth (exact at every point, written to disk without loss),
not an approximation of a continuous one. Its inverse, used to carry the tissue maps into
moving space, starts from ``exp(-v)`` and is refined against ``T`` itself by a damped
fixed-point iteration; the residual ``|T(T^-1(y)) - y|`` is measured on brain voxels
(:class:`~itreg.phantoms.deform.InverseReport`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from itreg.errors import ConfigError, GeometryError
from itreg.grid import Grid
from itreg.image import Image
from itreg.phantoms.deform import InverseReport, refine_preimages
from itreg.transforms import DisplacementField
from itreg.transforms.dense import integrate_velocity
from itreg.warp import sample


def smoothness_scales(smoothness_mm: float | Sequence[float]) -> tuple[float, ...]:
    vals = ((float(smoothness_mm),) if isinstance(smoothness_mm, (int, float))
            else tuple(float(v) for v in smoothness_mm))
    if not vals or any(not (math.isfinite(v) and v > 0) for v in vals):
        raise ConfigError(f"smoothness_mm must be one or more positive values, got "
                          f"{smoothness_mm!r}")
    return vals


def _coarse_grid(grid: Grid, spacing_mm: float) -> Grid:
    """A grid of the given spacing covering `grid`'s voxel centres (same origin, direction)."""
    size = tuple(max(2, math.ceil((n - 1) * s / spacing_mm) + 1)
                 for n, s in zip(grid.size, grid.spacing))
    return Grid(size, (spacing_mm,) * grid.ndim, grid.origin, grid.direction)


def _taper(grid: Grid, taper_mm: float) -> Tensor:
    """``prod_axes sin^2``-ramps from 0 at the outer voxel centres to 1 at `taper_mm` inside
    (float64, ``grid.shape``); all ones for ``taper_mm <= 0``."""
    w = torch.ones(grid.shape, dtype=torch.float64)
    if taper_mm <= 0:
        return w
    for axis in range(grid.ndim):  # ITK axis; tensor axis ndim - 1 - axis
        n, s = grid.size[axis], grid.spacing[axis]
        dist = torch.arange(n, dtype=torch.float64) * s
        dist = torch.minimum(dist, dist.flip(0))
        ramp = torch.sin(0.5 * math.pi * (dist / taper_mm).clamp(max=1.0)) ** 2
        shape = [1] * grid.ndim
        shape[grid.ndim - 1 - axis] = n
        w = w * ramp.view(shape)
    return w


def random_velocity(
    grid: Grid,
    smoothness_mm: float | Sequence[float] = 20.0,
    sigma_mm: float = 3.0,
    seed: int = 0,
    taper_mm: float | None = None,
) -> Tensor:
    """A random smooth velocity field on `grid` (see the module docstring).

    Args:
        grid: the fixed-space grid (2D or 3D).
        smoothness_mm: Gaussian smoothing sigma(s) in mm; several values give a mixture of
            scales.
        sigma_mm: RMS of each velocity component over the grid before tapering, in mm.
        seed: seed of the draws (CPU generator, float64).
        taper_mm: width of the border taper (default: the largest smoothness).

    Returns:
        ``(D, *grid.shape)`` float64 velocity in world mm (component x first).

    Raises:
        ConfigError: bad smoothness, sigma or taper.
        GeometryError: a grid that is not 2D or 3D.
    """
    from itreg.engine.pyramid import smooth

    if grid.ndim not in (2, 3):
        raise GeometryError(f"random velocity fields are 2D or 3D, got a {grid.ndim}D grid")
    if not (math.isfinite(float(sigma_mm)) and float(sigma_mm) >= 0):
        raise ConfigError(f"sigma_mm must be finite and >= 0, got {sigma_mm}")
    scales = smoothness_scales(smoothness_mm)
    taper = max(scales) if taper_mm is None else float(taper_mm)
    if not (math.isfinite(taper) and taper >= 0):
        raise ConfigError(f"taper_mm must be finite and >= 0, got {taper_mm}")
    coarse = _coarse_grid(grid, min(scales) / 4.0)
    gen = torch.Generator().manual_seed(int(seed))
    total = torch.zeros((grid.ndim, *coarse.shape), dtype=torch.float64)
    for s in scales:
        noise = torch.randn((grid.ndim, *coarse.shape), generator=gen, dtype=torch.float64)
        field = smooth(noise, [s / coarse.spacing[0]] * grid.ndim)
        rms = field.pow(2).mean(dim=tuple(range(1, field.dim())), keepdim=True).sqrt()
        total += field / rms.clamp(min=1e-12)
    total *= float(sigma_mm) / math.sqrt(len(scales))
    from itreg.warp import resample

    v = resample(Image(total, coarse, is_label=False), None, grid, mode="linear").data
    return v * _taper(grid, taper)


def squarings_for(velocity: Tensor, grid: Grid, minimum: int = 7) -> int:
    """Squarings so that the first scaled step ``v / 2^n`` moves at most a quarter voxel."""
    peak = float(velocity.norm(dim=0).max()) if velocity.numel() else 0.0
    need = math.ceil(math.log2(max(peak / (0.25 * min(grid.spacing)), 1.0)))
    return max(int(minimum), need)


@torch.no_grad()
def velocity_diffeomorphism(
    grid: Grid,
    smoothness_mm: float | Sequence[float] = 20.0,
    sigma_mm: float = 3.0,
    seed: int = 0,
    taper_mm: float | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> tuple[DisplacementField, Tensor]:
    """The ground-truth map ``T = exp(v)`` of a random velocity field (module docstring).

    Returns:
        ``(T, v)``: a non-learnable :class:`~itreg.transforms.DisplacementField` on `grid`
        (fixed -> moving world points) and the float64 velocity ``(D, *grid.shape)``.
    """
    v = random_velocity(grid, smoothness_mm, sigma_mm, seed, taper_mm)
    disp = integrate_velocity(v, grid, squarings_for(v, grid))
    return DisplacementField(disp.to(dtype=dtype, device=device), grid, learnable=False), v


@torch.no_grad()
def invert_velocity_diffeomorphism(
    transform: DisplacementField,
    velocity: Tensor,
    grid: Grid,
    iterations: int = 20,
    tol_mm: float = 1e-3,
    check_mask: Image | None = None,
    check_points: int = 20000,
    seed: int = 0,
) -> tuple[DisplacementField, InverseReport]:
    """``T^-1`` on `grid` (normally the moving grid): ``exp(-v)``, refined against ``T``.

    For every voxel centre ``y`` of `grid`, ``x`` starts at ``exp(-v)(y)`` and is improved by
    ``x <- x - a (T(x) - y)`` (``a`` = 1 per point, halved when the residual grows), until the
    residual is below `tol_mm` or after `iterations` steps.

    Args:
        transform: the truth ``T`` (a displacement field on the fixed grid).
        velocity: its velocity ``(D, *transform.grid.shape)``.
        grid: where the inverse lives.
        iterations: fixed-point refinement steps.
        tol_mm: per-point stopping residual.
        check_mask: mask selecting, by their preimage, the voxels whose residual is reported
            (for a phantom, the brain); None: every voxel.
        check_points: number of voxels of the report (a seeded random subset).
        seed: seed of that subset.

    Returns:
        ``(inverse, report)``: a non-learnable displacement field on `grid` and the
        :class:`~itreg.phantoms.deform.InverseReport` of ``|T(T^-1(y)) - y|``.
    """
    if grid.ndim != transform.ndim:
        raise GeometryError(f"grid is {grid.ndim}D but the transform is {transform.ndim}D")
    dtype, device = transform.field.dtype, transform.field.device
    vgrid = transform.grid
    back = integrate_velocity(-velocity.to(torch.float64), vgrid, squarings_for(velocity, vgrid))
    start = DisplacementField(back.to(torch.float32).to(device), vgrid, learnable=False)
    exact = DisplacementField(transform.field.to(torch.float32), vgrid, learnable=False)
    y = grid.points(dtype=torch.float32, device=device).reshape(-1, grid.ndim)
    # Converged points stop at once (compacted every step).
    x, _ = refine_preimages(exact, y, start(y), iterations, tol_mm, compact_below=1.0)
    disp = (x - y).to(dtype).T.reshape(grid.ndim, *grid.shape)
    inverse = DisplacementField(disp, grid, learnable=False)
    if check_mask is not None:
        values, inside = sample(check_mask, x, mode="nearest")
        candidates = torch.nonzero(inside & (values[0] != 0)).squeeze(1)
    else:
        candidates = torch.arange(y.shape[0], device=device)
    gen = torch.Generator().manual_seed(int(seed))
    n = candidates.numel()
    pick = candidates[torch.randperm(n, generator=gen)[: min(int(check_points), n)].to(device)]
    exact64 = DisplacementField(transform.field.to(torch.float64), vgrid, learnable=False)
    dist = (exact64(x[pick].double()) - y[pick].double()).norm(dim=-1)
    report = InverseReport(float(dist.mean()) if n else 0.0, float(dist.max()) if n else 0.0,
                           int(pick.numel()), int(iterations))
    return inverse, report


__all__ = ["invert_velocity_diffeomorphism", "random_velocity", "smoothness_scales",
           "squarings_for", "velocity_diffeomorphism"]

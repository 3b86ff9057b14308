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
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from itreg.errors import ConfigError, GeometryError, MaskError, unknown_name
from itreg.grid import Grid
from itreg.image import Image
from itreg.transforms import BSpline, DisplacementField
from itreg.warp import sample

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


@dataclass(frozen=True)
class InverseReport:
    """Accuracy of a numerical inverse: ``|T(T^-1(y)) - y|`` in mm over checked points.

    Attributes:
        mean_mm: mean residual, evaluated with the exact transform.
        max_mm: largest residual.
        points: number of points checked (a seeded random subset of the grid's voxels).
        iterations: fixed-point iterations run.
    """

    mean_mm: float
    max_mm: float
    points: int
    iterations: int

    def as_dict(self) -> dict:
        return asdict(self)


def _valid_region_grid(transform: BSpline, sample_spacing_mm: float) -> Grid:
    """A grid with spacing <= `sample_spacing_mm` over the B-spline's valid region."""
    cg = transform.control_grid
    factors = [max(1, math.ceil(s / sample_spacing_mm - 1e-9)) for s in cg.spacing]
    spacing = tuple(s / f for s, f in zip(cg.spacing, factors))
    size = tuple((n - 3) * f + 1 for n, f in zip(cg.size, factors))
    origin = cg.index_to_world(torch.ones(cg.ndim, dtype=torch.float64))
    return Grid(size, spacing, tuple(origin.tolist()), cg.direction)


def refine_preimages(forward: Callable[[Tensor], Tensor], y: Tensor, x: Tensor,
                     iterations: int, tol_mm: float, residual: Tensor | None = None,
                     compact_below: float = 0.7) -> tuple[Tensor, int]:
    """Points ``x`` with ``forward(x) = y``, by damped fixed-point steps from a start.

    Each step moves every unconverged point by ``x <- x - a (forward(x) - y)``; ``a`` starts
    at 1 per point, is halved when the residual would grow (the step is then not taken) and
    doubled (at most 1) after a step that helped. A point stops once its residual is below
    `tol_mm` or its ``a`` below 0.05. The unconverged points are moved to compacted copies
    (and the others written back) whenever they fall below `compact_below` of the points
    worked on; until then the converged ones keep stepping with them.

    Args:
        forward: the map to invert, ``(P, D) -> (P, D)`` world points.
        y: ``(P, D)`` targets.
        x: ``(P, D)`` the start (modified and returned).
        iterations: most steps.
        tol_mm: per-point residual at which a point stops.
        residual: ``forward(x) - y`` at the start if the caller has it (else computed).
        compact_below: live fraction below which the working set is compacted (1: at every
            step).

    Returns:
        ``(x, steps)``: the preimages and the number of steps taken.
    """
    idx = torch.arange(y.shape[0], device=y.device)
    ya, xa = y, x.clone()
    ra = forward(xa) - ya if residual is None else residual
    ea = ra.norm(dim=-1)
    sa = torch.ones_like(ea)
    done = 0
    for done in range(1, int(iterations) + 1):
        live = (ea >= tol_mm) & (sa > 0.05)
        n_live = int(live.sum())
        if n_live == 0:
            break
        if n_live < compact_below * live.numel():  # compacting is not free
            finished = ~live
            x[idx[finished]] = xa[finished]
            idx, ya, xa, ra, ea, sa = (v[live] for v in (idx, ya, xa, ra, ea, sa))
        cand = xa - sa[:, None] * ra
        rc = forward(cand) - ya
        ec = rc.norm(dim=-1)
        better = ec <= ea
        xa = torch.where(better[:, None], cand, xa)
        ra = torch.where(better[:, None], rc, ra)
        ea = torch.where(better, ec, ea)
        sa = torch.where(better, torch.clamp(sa * 2.0, max=1.0), sa * 0.5)
    x[idx] = xa
    return x, done


@torch.no_grad()
def invert_ffd(
    transform: BSpline,
    grid: Grid,
    sample_spacing_mm: float = 1.0,
    iterations: int = 60,
    tol_mm: float = 1e-3,
    check_mask: Image | None = None,
    check_points: int = 20000,
    seed: int = 0,
) -> tuple[DisplacementField, InverseReport]:
    """Numerical inverse of a B-spline FFD as a displacement field on `grid`.

    For every voxel centre ``y`` of `grid` it solves ``x + d(x) = y`` by the damped fixed-point
    iteration ``x <- x - a (x + d(x) - y)`` (``a`` = 1 per point, halved whenever the residual
    grows, doubled back up to 1 when it shrinks), starting from ``x = y``; points stop once
    their residual is below `tol_mm`. ``d`` is read by linear interpolation from the FFD's
    displacement sampled (exactly, separably) on a grid of spacing <= `sample_spacing_mm`
    covering the B-spline's valid region (zero outside it, as the B-spline). Where the FFD is
    invertible (``det J > 0``) the iteration converges; the residual left is the interpolation
    error, a few thousandths of a mm for a 20 mm control spacing sampled at 1 mm.

    Like ITK's, the FFD's displacement is cut to zero outside its valid region, so ``T`` is
    not onto near that border (outside the image it was built for): voxels there have no
    preimage and keep the iteration's best point. The accuracy report therefore covers the
    voxels whose preimage lies in `check_mask` (for a phantom, the brain), measured with the
    exact B-spline on a seeded random subset.

    Args:
        transform: the FFD ``T`` (fixed -> moving).
        grid: the grid the inverse lives on (normally the moving image grid).
        sample_spacing_mm: spacing of the sampled displacement used in the iteration.
        iterations: maximum fixed-point iterations.
        tol_mm: per-point stopping residual in mm.
        check_mask: mask (any grid of the FFD's dimension) that selects the checked voxels by
            their preimage; ``None`` checks voxels whose preimage lies in the valid region.
        check_points: number of voxels on which the exact residual is measured.
        seed: seed of the checked subset.

    Returns:
        ``(inverse, report)``: a :class:`~itreg.transforms.DisplacementField` (``T^-1(y) = y +
        field(y)``, world mm, not learnable, the FFD's dtype and device) and its
        :class:`InverseReport`.

    Raises:
        ConfigError: for a non-positive sampling spacing or iteration count.
        GeometryError: for a grid whose dimension differs from the transform's.
    """
    if grid.ndim != transform.ndim:
        raise GeometryError(f"grid is {grid.ndim}D but the FFD is {transform.ndim}D")
    if not (sample_spacing_mm > 0 and iterations >= 1 and tol_mm > 0):
        raise ConfigError("sample_spacing_mm and tol_mm must be > 0 and iterations >= 1")
    dtype, device = transform.coefficients.dtype, transform.coefficients.device
    fine = _valid_region_grid(transform, float(sample_spacing_mm))
    # float32 throughout the iteration: coordinates of a few hundred mm keep ~1e-5 mm.
    field = torch.movedim(transform.displacement(fine, dtype=torch.float32, device=device),
                          -1, 0)[None].contiguous()  # (1, D, *fine.shape)
    norm = torch.as_tensor(fine.world_to_normalized_matrix(), dtype=torch.float32, device=device)
    lead = (1,) * (grid.ndim - 1)

    def disp_at(points: Tensor) -> Tensor:
        # Zero padding: the sampled displacement fades to zero half a sample beyond the
        # valid region, where the B-spline's is cut to zero.
        coords = points @ norm[:-1, :-1].T + norm[:-1, -1]
        out = F.grid_sample(field, coords.reshape(1, -1, *lead, grid.ndim), mode="bilinear",
                            padding_mode="zeros", align_corners=True)
        return out.reshape(grid.ndim, -1).T

    y = grid.points(dtype=torch.float32, device=device).reshape(-1, grid.ndim)
    # At x = y the residual x + d(x) - y is d(y) itself.
    x, done = refine_preimages(lambda p: p + disp_at(p), y, y.clone(), iterations, tol_mm,
                               residual=disp_at(y))
    disp = (x - y).to(dtype).T.reshape(grid.ndim, *grid.shape)
    inverse = DisplacementField(disp, grid, learnable=False)

    if check_mask is not None:
        values, inside = sample(check_mask, x, mode="nearest")
        candidates = torch.nonzero(inside & (values[0] != 0)).squeeze(1)
    else:
        index = fine.world_to_index(x)
        hi = torch.tensor([n - 1 for n in fine.size], dtype=index.dtype, device=index.device)
        candidates = torch.nonzero(((index >= 0) & (index <= hi)).all(-1)).squeeze(1)
    gen = torch.Generator().manual_seed(int(seed))
    n = candidates.numel()
    pick = candidates[torch.randperm(n, generator=gen)[: min(int(check_points), n)].to(device)]
    xd = x[pick].to(torch.float64)
    exact = transform(xd) - y[pick].double()  # the exact B-spline, in float64
    dist = exact.norm(dim=-1)
    report = InverseReport(float(dist.mean()) if n else 0.0, float(dist.max()) if n else 0.0,
                           int(pick.numel()), done)
    return inverse, report


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


__all__ = [
    "BOUND_MODES",
    "INJECTIVE_FRACTION",
    "InverseReport",
    "folding_fraction",
    "invert_ffd",
    "random_ffd",
    "refine_preimages",
]

"""Multimodal pairs with a known linear misalignment, from the MNI template.

The fixed image is the real template T1 on its grid. The moving image is a synthetic contrast
(T2-like by default) of the same anatomy seen through a known transform ``T``: the tissue
maps are resampled through ``T^-1`` onto a (padded) moving grid, then the contrast, its bias
field and its Rician noise are synthesised there (so noise is white on the moving grid). Hence
``moving(T(x)) = contrast(x)`` for every fixed-space point ``x``: ``T`` maps fixed-space
points to moving-space points, as a registration's result does (ITK's convention), and
``resample(moving, T, fixed.grid)`` realigns the moving image with the fixed one.

For ``kind="ffd"``, ``T`` is a random cubic B-spline FFD (paper 003's protocol,
:func:`~itreg.phantoms.deform.random_ffd`) stored exactly as an
:class:`~itreg.transforms.BSpline` (an ITK ``BSplineTransform``), and the tissue maps are carried
into moving space through its numerical inverse (:func:`~itreg.phantoms.deform.invert_ffd`,
a fixed-point iteration). The ground truth ``T`` is therefore exact as a transform and the
moving image satisfies ``moving(T(x)) = contrast(x)`` up to the inverse's residual, which is
measured with the exact B-spline on brain voxels and kept in ``PhantomPair.inverse_report``
(a few thousandths of a mm at the default 1 mm sampling). The same B-spline is what gets
written to disk, so a file round trip loses nothing.

For ``kind="svf"``, ``T = exp(v)`` of a random smooth stationary velocity field (one or several
smoothness scales; :func:`~itreg.phantoms.velocity.velocity_diffeomorphism`): a deformation that
is not a B-spline, held exactly as a :class:`~itreg.transforms.DisplacementField` on the fixed
grid, with its inverse refined against it
(:func:`~itreg.phantoms.velocity.invert_velocity_diffeomorphism`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from itreg.errors import ConfigError, MaskError, unknown_name
from itreg.grid import Grid
from itreg.image import Image
from itreg.phantoms._geometry import bounding_corners, centroid
from itreg.phantoms.contrasts import CONTRAST_NAMES, labels, synthesize
from itreg.phantoms.deform import InverseReport, invert_ffd, random_ffd
from itreg.phantoms.misalign import (
    AffineParameters,
    anchor_parameters,
    pad_grid,
    sample_affine_parameters,
)
from itreg.phantoms.mni import load_mni
from itreg.phantoms.slices import axial_slices
from itreg.phantoms.velocity import invert_velocity_diffeomorphism, velocity_diffeomorphism
from itreg.transforms import Affine, BSpline, DisplacementField, Transform
from itreg.warp import resample

#: Misalignment kinds: paper 000's rigid and affine ranges, the anchor benchmark's affine,
#: paper 003's random B-spline FFD, and a random velocity-field diffeomorphism.
PAIR_KINDS = ("rigid", "affine", "anchor", "ffd", "svf")

#: Default sigma (mm) of the deformable kinds: FFD coefficients (paper 003), velocity RMS
#: per component (about the FFD's mean displacement in the brain at 20 mm smoothness).
DEFAULT_SIGMA_MM = {"ffd": 6.0, "svf": 4.0}

#: The linear kinds among :data:`PAIR_KINDS`.
LINEAR_KINDS = ("rigid", "affine", "anchor")

#: Maps resampled into moving space, in this channel order.
_TISSUE_KEYS = ("t1", "csf", "gm", "wm")


@dataclass(frozen=True, eq=False)
class PhantomPair:
    """A fixed/moving pair with its ground truth.

    Attributes:
        fixed: the template T1 (float32, [0, 1]) on the fixed grid.
        moving: the synthetic contrast (float32) on the moving grid.
        fixed_mask: brain mask on the fixed grid (uint8 labels).
        moving_labels: tissue labels on the moving grid (0 background, 1 CSF, 2 GM, 3 WM).
        fixed_labels: tissue labels on the fixed grid.
        true_transform: the true fixed -> moving map ``T``: ``moving(T(x)) = contrast(x)``
            (an :class:`~itreg.transforms.Affine`, a :class:`~itreg.transforms.BSpline` for
            ``kind="ffd"``, a :class:`~itreg.transforms.DisplacementField` for ``"svf"``).
        moving_mask: brain mask on the moving grid (uint8 labels).
        parameters: the drawn parameters of a linear ``T`` (centre: the fixed brain's
            centroid); ``None`` for an FFD.
        inverse_transform: the moving -> fixed map ``T^-1`` used to build the moving image
            (exact for linear kinds; a displacement field on the moving grid otherwise).
        inverse_report: accuracy of a numerical inverse (FFD, SVF), else ``None``.
    """

    fixed: Image
    moving: Image
    fixed_mask: Image
    moving_labels: Image
    fixed_labels: Image
    true_transform: Affine | BSpline | DisplacementField
    moving_mask: Image
    parameters: AffineParameters | None
    inverse_transform: Transform | None = None
    inverse_report: InverseReport | None = None


def brain_center(mask: Image) -> tuple[float, ...]:
    """World centroid of the nonzero voxels of a mask (in mm, ITK order).

    Raises:
        MaskError: if the mask is empty.
    """
    try:
        return tuple(centroid(mask.grid, mask.data[0] != 0).tolist())
    except MaskError:
        raise MaskError("the brain mask is empty") from None


def _draw(kind: str, ndim: int, seed: int) -> AffineParameters:
    if kind not in LINEAR_KINDS:
        raise unknown_name("linear misalignment kind", kind, LINEAR_KINDS)
    if kind == "anchor":
        return anchor_parameters(ndim, seed)
    return sample_affine_parameters(ndim, seed, kind)


def _auto_margin(grid: Grid, mask: Image, transform: Transform) -> tuple[float, ...]:
    """Per-axis margin (mm) that keeps the moved brain in view.

    For a linear map the corners of the brain's index bounding box are mapped (their hull
    contains the moved brain, so the margin is conservative by at most the box's slack); for
    a deformation every brain voxel is mapped.
    """
    inside = mask.data[0] != 0
    with torch.no_grad():
        if transform.is_linear:
            moved = transform(bounding_corners(grid, inside))
        else:
            points = transform.on_grid(grid, dtype=torch.float64)
            moved = points[inside.to(points.device)]
        index = grid.world_to_index(moved)
    lo = (-index.min(dim=0).values).clamp_min(0.0)
    hi = (index.max(dim=0).values - torch.tensor([n - 1 for n in grid.size],
                                                 dtype=torch.float64, device=index.device))
    voxels = torch.maximum(lo, hi.clamp_min(0.0))
    # One voxel more, so that linear interpolation has a zero neighbour at the brain's edge.
    return tuple(float(math.ceil(v) + 1) * s for v, s in zip(voxels.tolist(), grid.spacing))


def pair_from_tissues(
    tissues: Mapping[str, Image],
    contrast: str = "t2",
    kind: str = "affine",
    seed: int = 0,
    pad_mm: float | Sequence[float] | None = None,
    noise_sigma: float = 0.02,
    bias: tuple[float, float] | float | None = (0.80, 1.17),
    control_spacing_mm: float = 20.0,
    sigma_mm: float | None = None,
    smoothness_mm: float | Sequence[float] = 20.0,
) -> PhantomPair:
    """Build a misaligned pair from tissue maps (2D or 3D, one code path).

    Args:
        tissues: maps as :func:`load_mni` returns them (``t1``, ``gm``, ``wm``, ``csf``,
            ``mask``), all on one grid: the fixed grid.
        contrast: the moving image's contrast, ``"t2"``, ``"pd"`` or ``"t1"``.
        kind: ``"rigid"`` or ``"affine"`` (paper 000's ranges, :func:`random_affine`) or
            ``"anchor"`` (the anchor benchmark's affine ranges, :func:`anchor_affine`). The
            centre of rotation is the fixed brain's centroid.
        seed: seed of the transform and of the moving image's bias field and noise.
        pad_mm: margin added around the fixed grid to make the moving grid, in mm (one value
            or one per axis, both sides). ``None`` picks, per axis, the whole-voxel margin
            that keeps the moved brain's bounding box in view, plus one voxel.
        noise_sigma: Rician noise sigma of the moving image (0 for none).
        bias: the moving image's bias field: a ``(lo, hi)`` range of the quadratic field, an
            amplitude ``a`` for the random field of about ``1 +- a`` (0.25: the benchmark's
            MR bias variant; see :func:`~itreg.phantoms.contrasts.synthesize`), or ``None``.
        control_spacing_mm: FFD control point spacing in mm (``kind="ffd"``).
        sigma_mm: FFD coefficient standard deviation (``"ffd"``) or velocity RMS per
            component (``"svf"``) in mm; None: :data:`DEFAULT_SIGMA_MM`.
        smoothness_mm: Gaussian smoothness of the velocity field, one scale or several (a
            mixture; ``kind="svf"``).

    Returns:
        The :class:`PhantomPair`.

    Raises:
        ConfigError: for an unknown kind or contrast, or maps on different grids.
    """
    if contrast not in CONTRAST_NAMES:
        raise unknown_name("contrast", contrast, CONTRAST_NAMES)
    for key in (*_TISSUE_KEYS, "mask"):
        if key not in tissues:
            raise ConfigError(f"tissue map {key!r} missing; have {sorted(tissues)}")
    fixed = tissues["t1"]
    grid = fixed.grid
    if any(not tissues[k].grid.same_as(grid) for k in (*_TISSUE_KEYS, "mask")):
        raise ConfigError("all tissue maps must lie on one grid")
    mask = tissues["mask"]
    if kind not in PAIR_KINDS:
        raise unknown_name("misalignment kind", kind, PAIR_KINDS)
    params: AffineParameters | None = None
    velocity = None
    sigma = DEFAULT_SIGMA_MM.get(kind, 0.0) if sigma_mm is None else float(sigma_mm)
    if kind == "ffd":
        transform = random_ffd(grid, control_spacing_mm, sigma, seed=seed,
                               dtype=torch.float32, device=fixed.device)
        margin = _auto_margin(grid, mask, transform) if pad_mm is None else pad_mm
    elif kind == "svf":
        transform, velocity = velocity_diffeomorphism(grid, smoothness_mm, sigma, seed=seed,
                                                      device=fixed.device)
        margin = _auto_margin(grid, mask, transform) if pad_mm is None else pad_mm
    else:
        params = _draw(kind, grid.ndim, seed)
        center = brain_center(mask)
        transform = params.to_affine(center, dtype=torch.float32, device=fixed.device)
        if pad_mm is None:
            exact = params.to_affine(center, dtype=torch.float64, device=fixed.device)
            margin = _auto_margin(grid, mask, exact)
        else:
            margin = pad_mm
    moving_grid = pad_grid(grid, margin)
    report = None
    if kind == "ffd":
        inverse, report = invert_ffd(transform, moving_grid, check_mask=mask, seed=seed)
    elif kind == "svf":
        inverse, report = invert_velocity_diffeomorphism(transform, velocity, moving_grid,
                                                         check_mask=mask, seed=seed)
    else:
        inverse = transform.inverse()

    # The T1 map is carried into moving space only when it is the moving contrast.
    keys = _TISSUE_KEYS if contrast == "t1" else _TISSUE_KEYS[1:]
    stack = torch.cat([tissues[k].data.to(torch.float32) for k in keys]
                      + [(mask.data != 0).to(torch.float32)])
    with torch.no_grad():
        warped = resample(Image(stack, grid, is_label=False), inverse, moving_grid,
                          mode="linear").data.clamp(0.0, 1.0)
    moving_mask = (warped[-1:] >= 0.5).to(torch.uint8)
    moving_tissues = {k: Image(warped[i:i + 1].contiguous(), moving_grid, is_label=False)
                      for i, k in enumerate(keys)}
    moving_tissues["csf"] = moving_tissues["csf"].with_data(
        moving_tissues["csf"].data * moving_mask, is_label=False)
    moving_tissues["mask"] = Image(moving_mask, moving_grid, is_label=True)

    moving = synthesize(moving_tissues, contrast, noise_sigma=noise_sigma, bias=bias, seed=seed)
    return PhantomPair(
        fixed=fixed,
        moving=moving,
        fixed_mask=mask,
        moving_labels=labels(moving_tissues),
        fixed_labels=labels(tissues),
        true_transform=transform,
        moving_mask=moving_tissues["mask"],
        parameters=params,
        inverse_transform=inverse,
        inverse_report=report,
    )


def brain_pair(
    spacing_mm: float | None = 1.0,
    contrast: str = "t2",
    kind: str = "affine",
    seed: int = 0,
    pad_mm: float | Sequence[float] | None = None,
    noise_sigma: float = 0.02,
    bias: tuple[float, float] | float | None = (0.80, 1.17),
    device: torch.device | str | None = None,
    control_spacing_mm: float = 20.0,
    sigma_mm: float | None = None,
    smoothness_mm: float | Sequence[float] = 20.0,
) -> PhantomPair:
    """A 3D MNI T1 / synthetic-contrast pair with a known random misalignment.

    Args:
        spacing_mm: isotropic spacing of both images (see :func:`load_mni`).
        contrast: the moving image's contrast, ``"t2"``, ``"pd"`` or ``"t1"``.
        kind: ``"rigid"``, ``"affine"``, ``"anchor"`` or ``"ffd"`` (see
            :func:`pair_from_tissues`).
        seed: seed of the transform, bias field and noise.
        pad_mm: moving-grid margin in mm; ``None`` keeps the moved brain in view.
        noise_sigma: Rician noise sigma of the moving image.
        bias: the moving image's bias field: ``(lo, hi)`` range, amplitude or ``None`` (see
            :func:`pair_from_tissues`).
        device: device of the images and transform.
        control_spacing_mm: FFD control point spacing in mm (``kind="ffd"``).
        sigma_mm: FFD coefficient SD or velocity RMS in mm (see :func:`pair_from_tissues`).
        smoothness_mm: velocity smoothness scale(s) in mm (``kind="svf"``).

    Returns:
        The :class:`PhantomPair`.
    """
    tissues = load_mni(spacing_mm, device=device)
    return pair_from_tissues(tissues, contrast, kind, seed, pad_mm, noise_sigma, bias,
                             control_spacing_mm, sigma_mm, smoothness_mm)


def brain_slice_pair(
    spacing_mm: float | None = 1.0,
    contrast: str = "t2",
    kind: str = "affine",
    seed: int = 0,
    slice_index: int | None = None,
    pad_mm: float | Sequence[float] | None = None,
    noise_sigma: float = 0.02,
    bias: tuple[float, float] | float | None = (0.80, 1.17),
    device: torch.device | str | None = None,
    control_spacing_mm: float = 20.0,
    sigma_mm: float | None = None,
    smoothness_mm: float | Sequence[float] = 20.0,
) -> PhantomPair:
    """A 2D pair from one axial slice of the template, with a random 2D misalignment.

    The slice is taken after resampling to `spacing_mm` (see :func:`axial_slice`); the
    misalignment is 2D (one angle, in-plane translation; scale and shear for affine kinds).

    Args:
        spacing_mm: isotropic spacing (see :func:`load_mni`).
        contrast: the moving image's contrast, ``"t2"``, ``"pd"`` or ``"t1"``.
        kind: ``"rigid"``, ``"affine"``, ``"anchor"`` or ``"ffd"`` (a 2D FFD).
        seed: seed of the transform, bias field and noise.
        slice_index: index of the axial slice; ``None`` takes the middle one.
        pad_mm: moving-grid margin in mm; ``None`` keeps the moved brain in view.
        noise_sigma: Rician noise sigma of the moving image.
        bias: the moving image's bias field: ``(lo, hi)`` range, amplitude or ``None`` (see
            :func:`pair_from_tissues`).
        device: device of the images and transform.
        control_spacing_mm: FFD control point spacing in mm (``kind="ffd"``).
        sigma_mm: FFD coefficient SD or velocity RMS in mm (see :func:`pair_from_tissues`).
        smoothness_mm: velocity smoothness scale(s) in mm (``kind="svf"``).

    Returns:
        The 2D :class:`PhantomPair`.
    """
    tissues = axial_slices(load_mni(spacing_mm, device=device), slice_index)
    return pair_from_tissues(tissues, contrast, kind, seed, pad_mm, noise_sigma, bias,
                             control_spacing_mm, sigma_mm, smoothness_mm)

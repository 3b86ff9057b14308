"""Sampling and resampling images through transforms (the only caller of ``grid_sample`` on images).

Interpolation follows ITK's ``ResampleImageFilter`` so results agree with ``SimpleITK.Resample``:

* a point is *inside* an image when its continuous index lies in ``[-0.5, n - 0.5)`` on every
  axis (the voxel extent); outside points get the padding value (ITK's default pixel value);
* ``"linear"``: (bi/tri)linear interpolation, edge voxels repeated in the outer half voxel
  (ITK's ``LinearInterpolateImageFunction``);
* ``"nearest"``: the voxel whose centre is nearest, halves rounded up (ITK's
  ``NearestNeighborInterpolateImageFunction``); keeps the image dtype;
* ``"bspline"``: cubic B-spline interpolation (ITK's ``BSplineInterpolateImageFunction`` of
  order 3, ``sitkBSpline``): the image is prefiltered into B-spline coefficients with mirror
  boundaries, then each point sums its 4^D supporting coefficients; floating-point output;
* ``"label"``: each label present is interpolated linearly as a one-hot image and the label with
  the largest weight wins (ties: the smallest label), as ITK's ``LabelImageGenericInterpolate``
  does; keeps the image dtype, holds only a few one-hot channels at a time;
* ``"label-bspline"``: the same vote with each label's one-hot image interpolated by cubic
  B-splines (on the label's bounding box): one-voxel lines and sheets, whose linear weight
  falls to 1/2 between voxels, survive; keeps the image dtype;
* ``"auto"``: ``"label"`` for label images, ``"linear"`` otherwise.

Coordinates are computed in the image's floating dtype (the points' dtype for integer images) on
the image's device. 2D and 3D share one code path.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F
from torch import Tensor

from itreg.errors import ConfigError, GeometryError
from itreg.grid import Grid
from itreg.image import Image
from itreg.transforms.base import Transform
from itreg.transforms.bspline_basis import cubic_bspline_weights

logger = logging.getLogger(__name__)

MODES = ("linear", "nearest", "bspline", "label", "label-bspline", "auto")

#: Most one-hot voxels held at once by label interpolation (elements).
_LABEL_BUDGET = 2**25


def _resolve_mode(image: Image, mode: str) -> str:
    if mode not in MODES:
        raise ConfigError(f"unknown interpolation mode {mode!r}; valid modes are: "
                          f"{', '.join(MODES)}")
    if mode == "auto":
        return "label" if image.is_label else "linear"
    return mode


def _coordinate_dtype(image: Image, points: Tensor | None) -> torch.dtype:
    if image.data.is_floating_point():
        return image.data.dtype
    if points is not None and points.is_floating_point():
        return points.dtype
    return torch.get_default_dtype()


def _inside(grid: Grid, index: Tensor) -> Tensor:
    upper = torch.tensor([n - 0.5 for n in grid.size], dtype=index.dtype, device=index.device)
    return ((index >= -0.5) & (index < upper)).all(dim=-1)


def _grid_sample(data: Tensor, grid: Grid, points: Tensor) -> Tensor:
    """Linear interpolation of ``data (C, *grid.shape)`` at ``points (P, D)`` -> ``(C, P)``."""
    d = grid.ndim
    coords = grid.world_to_normalized(points).reshape((1, -1) + (1,) * (d - 1) + (d,))
    out = F.grid_sample(data[None], coords, mode="bilinear", padding_mode="border",
                        align_corners=True)
    return out.reshape(data.shape[0], -1)


def _nearest(image: Image, index: Tensor) -> Tensor:
    """Nearest-voxel values ``(C, P)`` at continuous indices ``(P, D)`` (halves round up)."""
    size = image.grid.size
    nearest = torch.floor(index + 0.5).long()
    flat = torch.zeros(index.shape[0], dtype=torch.long, device=index.device)
    stride = 1
    for a, n in enumerate(size):  # x is the fastest-varying axis of the flattened tensor
        flat += stride * nearest[:, a].clamp(0, n - 1)
        stride *= n
    return image.data.reshape(image.channels, -1)[:, flat]


def _prefilter_matrix(n: int, dtype: torch.dtype, device) -> Tensor:
    """``(n, n)`` map from samples to cubic B-spline coefficients along one axis.

    Inverts ``f[k] = (c[k-1] + 4 c[k] + c[k+1]) / 6`` with mirror boundaries ``c[-1] = c[1]``,
    ``c[n] = c[n-2]``: what ITK's recursive ``BSplineDecompositionImageFilter`` computes."""
    if n == 1:
        return torch.ones(1, 1, dtype=dtype, device=device)
    m = torch.zeros(n, n, dtype=torch.float64)
    for k in range(n):
        m[k, k] += 4.0 / 6.0
        m[k, 1 if k == 0 else k - 1] += 1.0 / 6.0
        m[k, n - 2 if k == n - 1 else k + 1] += 1.0 / 6.0
    return torch.linalg.inv(m).to(dtype=dtype, device=device)


def bspline_coefficients(data: Tensor, ndim: int) -> Tensor:
    """Cubic B-spline coefficients of ``data (C, *spatial)`` (ITK's decomposition, mirror
    boundaries), same shape and dtype."""
    coef = data
    for axis in range(1, ndim + 1):  # tensor axes; each is one spatial axis
        mat = _prefilter_matrix(data.shape[axis], data.dtype, data.device)
        coef = torch.movedim(torch.tensordot(coef, mat, dims=([axis], [1])), -1, axis)
    return coef


def _mirror(k: Tensor, n: int) -> Tensor:
    """Indices folded back into ``[0, n)`` by mirroring about the edge samples (ITK)."""
    if n == 1:
        return torch.zeros_like(k)
    period = 2 * (n - 1)
    k = torch.remainder(k, period)
    return torch.where(k >= n, period - k, k)


def _bspline_at(coef: Tensor, size: tuple[int, ...], index: Tensor) -> Tensor:
    """Sum of the 4^D cubic B-spline coefficients ``coef (C, N)`` (an image of ITK `size`,
    flattened x fastest) supporting continuous indices ``(P, D)`` -> ``(C, P)``."""
    d = len(size)
    floor = torch.floor(index.detach())
    weights = cubic_bspline_weights(index - floor)  # (P, D, 4)
    base = floor.long() - 1
    out = torch.zeros(coef.shape[0], index.shape[0], dtype=coef.dtype, device=coef.device)
    for combo in range(4**d):
        flat = torch.zeros(index.shape[0], dtype=torch.long, device=index.device)
        weight = torch.ones(index.shape[0], dtype=weights.dtype, device=weights.device)
        stride = 1
        for a, n in enumerate(size):  # x fastest in the flattened tensor
            o = (combo // 4**a) % 4
            flat = flat + stride * _mirror(base[:, a] + o, n)
            weight = weight * weights[:, a, o]
            stride *= n
        out = out + coef[:, flat] * weight[None].to(coef.dtype)
    return out


def _bspline(image: Image, index: Tensor, cdtype: torch.dtype) -> Tensor:
    """Cubic B-spline interpolated values ``(C, P)`` at continuous indices ``(P, D)``."""
    data = image.data if image.data.is_floating_point() else image.data.to(cdtype)
    coef = bspline_coefficients(data, image.ndim).reshape(image.channels, -1)
    return _bspline_at(coef, image.grid.size, index)


#: Voxels kept around a label's bounding box by cubic label interpolation: the prefilter's
#: influence decays by 0.268 per voxel, so the crop changes weights by < 1e-4.
_LABEL_MARGIN = 8


def _label_bspline(image: Image, index: Tensor, cdtype: torch.dtype) -> Tensor:
    """Per-label cubic B-spline interpolation + argmax, ``(C, P)`` in the image dtype.

    Each label's one-hot image is interpolated by cubic B-splines on its bounding box (plus a
    margin) and the label with the largest value wins (ties: the smallest label). The
    interpolating spline reaches 1 on a one-voxel line or sheet where linear weights stay near
    1/2, so thin structures survive resampling."""
    data = image.data
    d = image.ndim
    out = torch.empty(data.shape[0], index.shape[0], dtype=data.dtype, device=data.device)
    for c in range(data.shape[0]):
        best = torch.full((index.shape[0],), -math.inf, dtype=cdtype, device=data.device)
        best_label = torch.zeros(index.shape[0], dtype=data.dtype, device=data.device)
        for label in torch.unique(data[c]):
            onehot = data[c] == label
            nz = onehot.nonzero()  # tensor order (z, y, x)
            lo = (nz.min(dim=0).values - _LABEL_MARGIN).clamp(min=0)
            hi = nz.max(dim=0).values + _LABEL_MARGIN + 1
            crop = onehot[tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))].to(cdtype)
            lo_xyz = lo.flip(0).to(index.dtype)
            size = tuple(int(n) for n in crop.shape[::-1])
            rel = index - lo_xyz
            upper = torch.tensor(size, dtype=index.dtype, device=index.device)
            near = ((rel > -2) & (rel < upper + 1)).all(dim=-1).nonzero().squeeze(1)
            if near.numel() == 0:
                continue
            coef = bspline_coefficients(crop[None], d).reshape(1, -1)
            value = _bspline_at(coef, size, rel[near])[0]
            better = value > best[near]
            sel = near[better]
            best[sel] = value[better]
            best_label[sel] = label
        out[c] = best_label
    return out


def _label(image: Image, points: Tensor, cdtype: torch.dtype) -> Tensor:
    """One-hot linear interpolation + argmax, ``(C, P)`` in the image dtype."""
    data = image.data
    out = torch.empty(data.shape[0], points.shape[0], dtype=data.dtype, device=data.device)
    chunk = max(1, _LABEL_BUDGET // max(image.grid.numel, 1))
    for c in range(data.shape[0]):
        labels = torch.unique(data[c])
        best = torch.full((points.shape[0],), -1.0, dtype=cdtype, device=data.device)
        best_label = torch.zeros(points.shape[0], dtype=data.dtype, device=data.device)
        for start in range(0, labels.numel(), chunk):
            group = labels[start:start + chunk]
            onehot = (data[c][None] == group.view(-1, *([1] * image.ndim))).to(cdtype)
            weights = _grid_sample(onehot, image.grid, points)  # (k, P)
            value, which = weights.max(dim=0)  # first maximum: smallest label of the group
            better = value > best
            best = torch.where(better, value, best)
            best_label = torch.where(better, group[which], best_label)
            del onehot, weights
        out[c] = best_label
    return out


def sample(
    image: Image, points: Tensor, mode: str = "linear", padding: float = 0.0
) -> tuple[Tensor, Tensor]:
    """Values of `image` at world points.

    Args:
        image: the image to sample, ``(C, *grid.shape)``.
        points: ``(..., D)`` world points (mm, ITK order x, y, z).
        mode: ``"linear"``, ``"nearest"``, ``"bspline"``, ``"label"`` or ``"auto"`` (see the
            module docstring).
        padding: value of points outside the image's voxel extent.

    Returns:
        ``values (C, ...)`` and ``inside (...)`` (bool, point within the voxel extent).
        ``"linear"`` and ``"bspline"`` values are floating point (the image's dtype, or the
        points' for integer images); ``"nearest"`` and ``"label"`` keep the image dtype.
        Differentiable with respect to `points` and the image data for ``"linear"`` and
        ``"bspline"``.

    Raises:
        GeometryError: the points' last dimension is not the image dimension.
        ConfigError: unknown `mode`.
    """
    d = image.ndim
    if points.shape[-1] != d:
        raise GeometryError(f"points have {points.shape[-1]} coordinates, image is {d}D")
    mode = _resolve_mode(image, mode)
    cdtype = _coordinate_dtype(image, points)
    batch = points.shape[:-1]
    flat = points.to(dtype=cdtype, device=image.device).reshape(-1, d)
    index = image.grid.world_to_index(flat.detach())
    inside = _inside(image.grid, index)
    if mode == "linear":
        data = image.data if image.data.is_floating_point() else image.data.to(cdtype)
        values = _grid_sample(data, image.grid, flat)
    elif mode == "nearest":
        values = _nearest(image, index)
    elif mode == "bspline":
        values = _bspline(image, image.grid.world_to_index(flat), cdtype)
    elif mode == "label-bspline":
        values = _label_bspline(image, index, cdtype)
    else:
        values = _label(image, flat, cdtype)
    pad = torch.tensor(padding, dtype=values.dtype, device=values.device)
    values = torch.where(inside[None], values, pad)
    return values.reshape(image.channels, *batch), inside.reshape(batch)


def resample_with_mask(
    image: Image,
    transform: Transform | None,
    grid: Grid,
    mode: str = "auto",
    padding: float = 0.0,
) -> tuple[Image, Tensor]:
    """Resample `image` onto `grid` through `transform`: ``out(x) = image(T(x))``.

    Args:
        image: the moving image.
        transform: maps `grid` (fixed) world points to `image` (moving) world points; None is
            the identity.
        grid: the output grid.
        mode: ``"linear"``, ``"nearest"``, ``"bspline"``, ``"label"`` or ``"auto"``.
        padding: value where ``T(x)`` falls outside the image.

    Returns:
        The resampled :class:`Image` on `grid` (label flag kept by ``"nearest"`` and
        ``"label"``, cleared by ``"linear"`` and ``"bspline"``) and ``inside (*grid.shape)`` bool, True where
        ``T(x)`` lies inside the image's voxel extent.

    Raises:
        GeometryError: `grid`, `image` and `transform` differ in dimension.
    """
    if grid.ndim != image.ndim:
        raise GeometryError(f"cannot resample a {image.ndim}D image onto a {grid.ndim}D grid")
    resolved = _resolve_mode(image, mode)
    cdtype = _coordinate_dtype(image, None)
    if transform is None:
        points = grid.points(dtype=cdtype, device=image.device)
    else:
        if transform.ndim != grid.ndim:
            raise GeometryError(
                f"transform is {transform.ndim}D but the grid is {grid.ndim}D"
            )
        points = transform.on_grid(grid, dtype=cdtype, device=image.device)
    values, inside = sample(image, points, mode=resolved, padding=padding)
    is_label = bool(image.is_label) and resolved in ("nearest", "label", "label-bspline")
    return Image(values, grid, is_label=is_label), inside


def resample(
    image: Image,
    transform: Transform | None,
    grid: Grid,
    mode: str = "auto",
    padding: float = 0.0,
) -> Image:
    """Resample `image` onto `grid` through `transform` (see :func:`resample_with_mask`)."""
    return resample_with_mask(image, transform, grid, mode=mode, padding=padding)[0]


def _linear_and_bspline(transform: Transform) -> tuple[Tensor, Transform | None] | None:
    """``(H, spline)`` with ``T(x) = H [x + spline(x) - x; 1]`` (homogeneous ``H``, float64)
    when `transform` is linear (``spline`` None), a B-spline, or a :class:`Compose` of linear
    transforms applied after one B-spline; else None."""
    from itreg.transforms.bspline import BSpline
    from itreg.transforms.compose import Compose

    parts = list(transform.transforms) if isinstance(transform, Compose) else [transform]
    spline = parts.pop() if isinstance(parts[-1], BSpline) else None
    h = torch.eye(transform.ndim + 1, dtype=torch.float64)
    for t in parts:  # outermost first
        if not t.is_linear:
            return None
        if hasattr(t, "homogeneous"):
            h = h @ t.homogeneous().detach().to("cpu", torch.float64)
        elif type(t).__name__ != "Identity":
            return None
    return h, spline


def _separable_map(grid: Grid, affine, linear, spline: Transform | None, dtype,
                   device) -> Tensor:
    """``affine [x; 1] + linear d(x)`` on every voxel ``x`` of `grid`, ``(*grid.shape, D)``,
    for `spline` the B-spline displacement ``d`` (None: zero) on a control grid of `grid`'s
    direction, ``affine`` a (D+1) x (D+1) and ``linear`` a D x D float64 array.

    Separable: the affine part is linear in each voxel index and the B-spline part is a tensor
    product of per-axis weight matrices (of the coefficients mapped by ``matrix``'s linear
    part), so all but the first tensor axis are contracted on the small coefficient grid, and
    one matrix product over that axis, with two extra rows for the affine part, writes the
    full-resolution result once (no point arrays, no ``affine_grid``)."""
    import numpy as np

    d = grid.ndim
    g = torch.as_tensor((affine @ grid.index_to_world_matrix())[:d], dtype=dtype,
                        device=device)  # index -> output, (D, D + 1)
    rest = tuple(reversed(grid.size[:-1]))  # tensor shape of the other axes
    if spline is None:
        first = torch.zeros(grid.size[-1], 0, dtype=dtype, device=device)
        rows = torch.zeros(0, math.prod(rest) * d, dtype=dtype, device=device)
    else:
        mats = spline.axis_matrices(grid, dtype, device)
        coef = torch.tensordot(torch.as_tensor(np.asarray(linear), device=device),
                               spline.coefficients.detach().to(device, torch.float64),
                               dims=([1], [0]))
        out = torch.movedim(coef.to(dtype), 0, -1)  # (*M, D), tensor order
        for t in range(d - 1, 0, -1):  # tensor axis t is ITK axis d - 1 - t
            out = torch.movedim(torch.tensordot(mats[d - 1 - t], out, dims=([1], [t])), 0, t)
        first, rows = mats[-1], out.reshape(out.shape[0], -1)
    # Affine part over the other axes (a small plane) and its slope along the first one.
    plane = g[:, d].expand(*rest, d).clone()
    for a in range(d - 1):
        index = torch.arange(grid.size[a], dtype=dtype, device=device)
        shape = [1] * (d - 1)
        shape[d - 2 - a] = grid.size[a]
        plane += (index[:, None] * g[:, a]).reshape(*shape, d)
    slope = g[:, d - 1].expand(*rest, d)
    n = grid.size[-1]
    weights = torch.cat([first, torch.ones(n, 1, dtype=dtype, device=device),
                         torch.arange(n, dtype=dtype, device=device)[:, None]], dim=1)
    rows = torch.cat([rows, plane.reshape(1, -1), slope.reshape(1, -1)])
    return (weights @ rows).reshape(*grid.shape, d)


def warp_on_grid(image: Image, transform: Transform, grid: Grid, *,
                 field: bool = False) -> tuple[Image, Tensor | None] | None:
    """Linear resampling of `image` onto `grid` through a linear transform, or linear
    transforms after a cubic B-spline whose control grid has `grid`'s direction (what affine
    and B-spline registration return), without the full-resolution point arrays of
    :func:`resample`; the same values, inside test and padding (0).

    With ``T(x) = H (x + d(x))`` (``H`` affine) and the moving grid's ``grid_sample``
    coordinates ``N_m``, the coordinates of voxel ``x`` are ``N_m H x`` (linear in each voxel
    index) plus ``N_m,lin H_lin d(x)``, a B-spline whose coefficients are ``N_m,lin H_lin c``:
    per-axis matrix products (:func:`_separable_map`). Not differentiable (no_grad).

    Args:
        image: a floating-point intensity image (not a label map), at least 2 voxels per axis.
        transform: fixed -> moving world map.
        grid: the output grid, at least 2 voxels per axis.
        field: also return ``T(x) - x`` on `grid`, ``(*grid.shape, D)`` in world mm.

    Returns:
        ``(warped, field or None)``, or None where this path does not apply (other transforms,
        label or integer images, a control grid of another direction, axes of one voxel):
        use :func:`resample` there.
    """
    import numpy as np

    data = image.data
    if (image.is_label or not data.is_floating_point() or transform.ndim != grid.ndim
            or grid.ndim != image.ndim or min(grid.size) < 2 or min(image.grid.size) < 2):
        return None
    split = _linear_and_bspline(transform)
    if split is None:
        return None
    h, spline = split
    if spline is not None and not spline.same_direction(grid):
        return None
    d, dtype, device = grid.ndim, data.dtype, data.device
    h = h.numpy()
    n_m = image.grid.world_to_normalized_matrix()
    with torch.no_grad():
        # T(x) - x = H [x + d(x); 1] - [x; 1] = (H - I) [x; 1] + H_lin d(x).
        disp = (_separable_map(grid, h - np.eye(d + 1), h[:d, :d], spline, dtype, device)
                if field else None)
        coords = _separable_map(grid, n_m @ h, (n_m @ h)[:d, :d], spline, dtype, device)
        values = F.grid_sample(data[None], coords[None], mode="bilinear",
                               padding_mode="border", align_corners=True)[0]
        # index = (u + 1) (n - 1) / 2 lies in [-0.5, n - 0.5)  <=>  u in [-1 - h, 1 + h).
        half = torch.tensor([1.0 / (n - 1) for n in image.grid.size], dtype=dtype,
                            device=device)
        inside = ((coords >= -1 - half) & (coords < 1 + half)).all(dim=-1)
        values = torch.where(inside[None], values, values.new_zeros(()))
    return Image(values, grid, is_label=False), disp

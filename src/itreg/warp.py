"""Sampling and resampling images through transforms (the only caller of ``grid_sample`` on images).

Interpolation follows ITK's ``ResampleImageFilter`` so results agree with ``SimpleITK.Resample``:

* a point is *inside* an image when its continuous index lies in ``[-0.5, n - 0.5)`` on every
  axis (the voxel extent); outside points get the padding value (ITK's default pixel value);
* ``"linear"``: (bi/tri)linear interpolation, edge voxels repeated in the outer half voxel
  (ITK's ``LinearInterpolateImageFunction``);
* ``"nearest"``: the voxel whose centre is nearest, halves rounded up (ITK's
  ``NearestNeighborInterpolateImageFunction``); keeps the image dtype;
* ``"label"``: each label present is interpolated linearly as a one-hot image and the label with
  the largest weight wins (ties: the smallest label), as ITK's ``LabelImageGenericInterpolate``
  does; keeps the image dtype, holds only a few one-hot channels at a time;
* ``"auto"``: ``"label"`` for label images, ``"linear"`` otherwise.

Coordinates are computed in the image's floating dtype (the points' dtype for integer images) on
the image's device. 2D and 3D share one code path.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import Tensor

from itreg.errors import ConfigError, GeometryError
from itreg.grid import Grid
from itreg.image import Image
from itreg.transforms.base import Transform

logger = logging.getLogger(__name__)

MODES = ("linear", "nearest", "label", "auto")

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
        mode: ``"linear"``, ``"nearest"``, ``"label"`` or ``"auto"`` (see the module docstring).
        padding: value of points outside the image's voxel extent.

    Returns:
        ``values (C, ...)`` and ``inside (...)`` (bool, point within the voxel extent).
        ``"linear"`` values are floating point (the image's dtype, or the points' for integer
        images); ``"nearest"`` and ``"label"`` keep the image dtype. Differentiable with
        respect to `points` and the image data for ``"linear"``.

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
        mode: ``"linear"``, ``"nearest"``, ``"label"`` or ``"auto"``.
        padding: value where ``T(x)`` falls outside the image.

    Returns:
        The resampled :class:`Image` on `grid` (label flag kept by ``"nearest"`` and
        ``"label"``, cleared by ``"linear"``) and ``inside (*grid.shape)`` bool, True where
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
    is_label = bool(image.is_label) and resolved != "linear"
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

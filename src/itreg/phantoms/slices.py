"""2D slices of 3D images, with their world geometry."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from itreg.errors import ConfigError, GeometryError
from itreg.grid import Grid
from itreg.image import Image


def axial_grid(grid: Grid, index: int | None = None) -> Grid:
    """The 2D grid of slice `index` along the third ITK axis (``k``) of a 3D grid.

    The slice keeps the in-plane size, spacing and direction; its origin is the world
    ``(x, y)`` of voxel ``(0, 0, index)``. For the MNI template (LPS, axis-aligned) this is an
    axial slice and the 2D world frame is the slice's ``(x, y)`` in mm.

    Args:
        grid: a 3D grid whose third axis is perpendicular to the first two in world space
            (no obliquity mixing ``z`` into ``x, y``).
        index: slice index; ``None`` takes the middle one, ``size[2] // 2``.

    Returns:
        The 2D grid.

    Raises:
        GeometryError: for a 2D grid or an oblique third axis.
        ConfigError: for an index outside the grid.
    """
    if grid.ndim != 3:
        raise GeometryError(f"axial slices need a 3D grid, got {grid.ndim}D")
    d = grid.direction_matrix()
    if not (np.allclose(d[2, :2], 0.0, atol=1e-6) and np.allclose(d[:2, 2], 0.0, atol=1e-6)):
        raise GeometryError("the grid's third axis is oblique; a 2D world frame of its slices "
                            "is undefined (resample the image onto an axis-aligned grid first)")
    nz = grid.size[2]
    k = nz // 2 if index is None else int(index)
    if not 0 <= k < nz:
        raise ConfigError(f"slice index {k} is outside 0..{nz - 1}")
    origin = grid.index_to_world(torch.tensor([0.0, 0.0, float(k)], dtype=torch.float64))
    return Grid(grid.size[:2], grid.spacing[:2], tuple(origin[:2].tolist()),
                tuple(d[:2, :2].ravel()))


def axial_slice(image: Image, index: int | None = None) -> Image:
    """Slice `index` of a 3D image along its third ITK axis as a 2D image (see :func:`axial_grid`).

    Args:
        image: a 3D image ``(C, Z, Y, X)``.
        index: slice index; ``None`` takes the middle one.

    Returns:
        The 2D image ``(C, Y, X)`` (a copy), same dtype, device and label flag.
    """
    grid2d = axial_grid(image.grid, index)
    k = image.grid.size[2] // 2 if index is None else int(index)
    return Image(image.data[:, k].clone(), grid2d, image.is_label)


def axial_slices(images: Mapping[str, Image], index: int | None = None) -> dict[str, Image]:
    """:func:`axial_slice` of every image of a dict (for example :func:`load_mni`'s)."""
    return {name: axial_slice(img, index) for name, img in images.items()}

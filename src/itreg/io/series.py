"""Image series: a 4D file read as a list of 3D volumes and written back with its 4th axis.

itreg's images are 2D or 3D; a 4D NIfTI (fMRI, DWI, dynamic contrast) is resampled volume by
volume, as ``antsApplyTransforms -e 3`` does. The 4th axis keeps its spacing and origin.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from itreg.errors import ImageFormatError, ImageReadError
from itreg.image import Image
from itreg.io._native import check_input_file, quiet_native_stderr, sitk_message
from itreg.io.images import _open_reader, from_sitk, to_sitk

logger = logging.getLogger("itreg.io")


@dataclass(frozen=True)
class SeriesAxis:
    """The 4th axis of a series: spacing (e.g. TR in s), origin, and its direction cosine."""

    spacing: float
    origin: float
    direction: float


def image_dimension(path: str | os.PathLike) -> tuple[int, tuple[int, ...]]:
    """``(dimension, size)`` of an image file from its header."""
    _, reader = _open_reader(path)
    return reader.GetDimension(), tuple(int(n) for n in reader.GetSize())


def read_series(path: str | os.PathLike, *, is_label: bool | None = None,
                dtype: torch.dtype | None = None) -> tuple[list[Image], SeriesAxis]:
    """Read a 4D image as its 3D volumes, in order, and its 4th axis.

    Raises:
        ImageReadError: missing or unreadable file.
        ImageFormatError: the file is not 4D.
    """
    p = check_input_file(path, "image", ImageReadError)
    try:
        with quiet_native_stderr():
            image = sitk.ReadImage(str(p))
    except RuntimeError as exc:
        raise ImageReadError(f"cannot read image {str(p)!r}: {sitk_message(exc)}") from exc
    if image.GetDimension() != 4:
        raise ImageFormatError(f"image {str(p)!r} is {image.GetDimension()}D, not a 4D series")
    size = list(image.GetSize())
    volumes = []
    for t in range(size[3]):
        vol = sitk.Extract(image, size[:3] + [0], [0, 0, 0, t])
        volumes.append(from_sitk(vol, is_label=is_label, dtype=dtype, name=f"{p} volume {t}"))
    direction = np.asarray(image.GetDirection(), np.float64).reshape(4, 4)
    axis = SeriesAxis(float(image.GetSpacing()[3]), float(image.GetOrigin()[3]),
                      float(direction[3, 3]))
    logger.debug("read %s: %d volumes", p, len(volumes))
    return volumes, axis


def series_to_sitk(volumes: list[Image], axis: SeriesAxis) -> sitk.Image:
    """Join 3D volumes (same grid) into a 4D SimpleITK image with the given 4th axis."""
    parts = [to_sitk(v) for v in volumes]
    joined = sitk.JoinSeries(parts, axis.origin, axis.spacing)
    direction = np.eye(4)
    direction[:3, :3] = np.asarray(parts[0].GetDirection(), np.float64).reshape(3, 3)
    direction[3, 3] = axis.direction
    joined.SetDirection(tuple(direction.ravel()))
    return joined


def write_series(volumes: list[Image], axis: SeriesAxis, path: str | os.PathLike) -> Path:
    """Write 3D volumes on one grid as a 4D image (not atomic: write into a temporary path)."""
    target = Path(path)
    try:
        with quiet_native_stderr():
            sitk.WriteImage(series_to_sitk(volumes, axis), str(target), True)
    except RuntimeError as exc:
        raise ImageFormatError(f"cannot write image {str(target)!r}: {sitk_message(exc)}; use "
                               ".nii.gz, .nrrd or .mha") from exc
    return target

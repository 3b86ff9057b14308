"""Reading and writing images and masks through SimpleITK.

World space is ITK's physical space (LPS, mm); SimpleITK already converts NIfTI's RAS to LPS.
A SimpleITK image of size ``(nx, ny, nz)`` with C components becomes an :class:`~itreg.Image`
whose tensor is ``(C, nz, ny, nx)`` and whose :class:`~itreg.Grid` has the file's size, spacing,
origin and direction.

Pixel types: integer images are label maps and keep an integer dtype (``uint8``, ``int8``,
``int16``, ``int32``, ``int64``; ``uint16`` becomes ``int32`` and ``uint32``/``uint64`` become
``int64`` since torch has no arithmetic on them); floating-point images become ``float32``
(``float64`` only when asked for). Vector images become C channels.

Headers are untrusted: the size a header claims is checked against
:data:`itreg.grid.MAX_VOXELS` and a memory budget before any voxel is read, and NIfTI files are
checked for truncation (SimpleITK zero-fills a truncated ``.nii``/``.nii.gz`` silently).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from itreg.errors import (
    ConfigError,
    GeometryError,
    ImageFormatError,
    ImageReadError,
    InvalidImageError,
    MaskError,
)
from itreg.grid import MAX_VOXELS, Grid
from itreg.image import Image
from itreg.io._native import (
    check_input_file,
    quiet_native_stderr,
    sitk_message,
)
from itreg.io.nifti import _check_nifti_complete, _check_nifti_size
from itreg.io.writing import (  # noqa: F401  (writing's names, importable from here too)
    COMPRESSION,
    compression_mode,
    to_sitk,
    write_image,
    write_sitk_image,
)

logger = logging.getLogger("itreg.io")

#: Environment variable that sets the memory budget (bytes) of one image read.
MAX_BYTES_ENV = "ITREG_MAX_IMAGE_BYTES"

# numpy dtype -> (torch dtype kept for labels) for integer pixel types.
_LABEL_DTYPES = {
    np.dtype(np.uint8): torch.uint8,
    np.dtype(np.int8): torch.int8,
    np.dtype(np.int16): torch.int16,
    np.dtype(np.uint16): torch.int32,
    np.dtype(np.int32): torch.int32,
    np.dtype(np.uint32): torch.int64,
    np.dtype(np.int64): torch.int64,
    np.dtype(np.uint64): torch.int64,
}

_NUMPY_DTYPES = {
    torch.uint8: np.uint8, torch.int8: np.int8, torch.int16: np.int16, torch.int32: np.int32,
    torch.int64: np.int64, torch.float32: np.float32, torch.float64: np.float64,
    torch.bool: np.bool_,
}

# Bytes per component of SimpleITK pixel ids (scalar, vector and label-map variants).
_COMPONENT_BYTES: dict[int, int] = {}
for _name, _nbytes in (
    ("Int8", 1), ("UInt8", 1), ("Int16", 2), ("UInt16", 2), ("Int32", 4), ("UInt32", 4),
    ("Int64", 8), ("UInt64", 8), ("Float32", 4), ("Float64", 8),
):
    for _prefix in ("sitk", "sitkVector", "sitkLabel"):
        _id = getattr(sitk, _prefix + _name, None)
        if isinstance(_id, int) and _id >= 0:
            _COMPONENT_BYTES[_id] = _nbytes
for _name, _nbytes in (("sitkComplexFloat32", 8), ("sitkComplexFloat64", 16)):
    _COMPONENT_BYTES[getattr(sitk, _name)] = _nbytes


def default_max_bytes() -> int:
    """Memory budget of one image read, in bytes.

    ``$ITREG_MAX_IMAGE_BYTES`` if set, otherwise half the physical memory (16 GiB where that
    cannot be determined).
    """
    env = os.environ.get(MAX_BYTES_ENV)
    if env:
        try:
            value = int(float(env))
        except ValueError as exc:
            raise ConfigError(
                f"${MAX_BYTES_ENV}={env!r} is not a number of bytes; set it to e.g. 8e9"
            ) from exc
        if value <= 0:
            raise ConfigError(f"${MAX_BYTES_ENV}={env!r} must be positive")
        return value
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2)
    except (AttributeError, ValueError, OSError):
        return 16 * 2**30


@dataclass(frozen=True)
class ImageHeader:
    """What an image file's header says, read without its voxels.

    Attributes:
        path: the file.
        grid: size, spacing, origin and direction.
        components: number of components per voxel (1 for scalar images).
        pixel_type: SimpleITK's name of the pixel type, e.g. ``"16-bit signed integer"``.
    """

    path: Path
    grid: Grid
    components: int
    pixel_type: str


# ---------------------------------------------------------------------------------- reading
def _grid_from(size, spacing, origin, direction, where: str) -> Grid:
    try:
        return Grid(tuple(size), tuple(spacing), tuple(origin), tuple(direction))
    except (GeometryError, ConfigError) as exc:
        raise GeometryError(f"{where} has invalid geometry: {exc}; fix the file's header") from exc


def _open_reader(path: str | os.PathLike) -> tuple[Path, sitk.ImageFileReader]:
    p = check_input_file(path, "image", ImageReadError)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(p))
    try:
        with quiet_native_stderr():
            reader.ReadImageInformation()
    except RuntimeError as exc:
        raise ImageReadError(
            f"cannot read image {str(p)!r}: {sitk_message(exc)}; it is not an image format "
            "SimpleITK reads (.nii, .nii.gz, .nrrd, .mha, .mhd, ...) or it is corrupt"
        ) from exc
    return p, reader


def _dicom_series_files(folder: Path) -> list[str]:
    """The files of the DICOM series in `folder` (the largest, if it holds several)."""
    if not os.access(folder, os.R_OK | os.X_OK):
        raise ImageReadError(f"image folder {str(folder)!r} is not readable; check its "
                             "permissions")
    with quiet_native_stderr():
        ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(str(folder))
    if not ids:
        raise ImageReadError(f"image {str(folder)!r} is a folder with no DICOM series in it; "
                             "give an image file (.nii.gz, .nrrd, .mha, ...) or a DICOM series "
                             "folder")
    series = [(sid, list(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder), sid)))
              for sid in ids]
    sid, files = max(series, key=lambda item: len(item[1]))
    if len(series) > 1:
        logger.warning("%s holds %d DICOM series; reading the largest (%s, %d files)", folder,
                       len(series), sid, len(files))
    return files


def _open_dicom_series(folder: Path) -> tuple[list[str], sitk.ImageFileReader]:
    """The series' files and a reader of its first file (pixel type, in-plane geometry)."""
    files = _dicom_series_files(folder)
    reader = sitk.ImageFileReader()
    reader.SetFileName(files[0])
    try:
        with quiet_native_stderr():
            reader.ReadImageInformation()
    except RuntimeError as exc:
        raise ImageReadError(f"cannot read DICOM series {str(folder)!r}: {sitk_message(exc)}") \
            from exc
    return files, reader


def _read_dicom_series(folder: Path, files: list[str], first: sitk.ImageFileReader, dtype,
                       is_label, max_bytes) -> Image:
    """The series of :func:`_open_dicom_series` as one volume (size and memory checked first)."""
    size = tuple(first.GetSize()[:2]) + (len(files),)
    _check_voxels(folder, size)
    out_bytes = torch.empty((), dtype=dtype).element_size() if dtype is not None else 4
    _check_budget(folder, size, int(first.GetNumberOfComponents()), first.GetPixelID(),
                  out_bytes, max_bytes if max_bytes is not None else default_max_bytes())
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    try:
        with quiet_native_stderr():
            sitk_image = reader.Execute()
    except RuntimeError as exc:
        raise ImageReadError(f"cannot read DICOM series {str(folder)!r}: {sitk_message(exc)}; "
                             "a file of the series is missing or corrupt") from exc
    _grid_from(sitk_image.GetSize(), sitk_image.GetSpacing(), sitk_image.GetOrigin(),
               sitk_image.GetDirection(), f"DICOM series {str(folder)!r}")
    image = from_sitk(sitk_image, dtype=dtype, is_label=is_label, name=str(folder))
    logger.debug("read DICOM series %s (%d files): %r", folder, len(files), image)
    return image


def read_header(path: str | os.PathLike) -> ImageHeader:
    """Read an image file's geometry and pixel type without reading its voxels.

    Args:
        path: image file.

    Returns:
        The header (grid, number of components, pixel type name).

    Raises:
        ImageReadError: the file is missing, a directory, or not a readable image.
        ImageFormatError: the image is not 2D or 3D.
        GeometryError: the header's geometry is invalid (zero spacing, degenerate direction).
    """
    if Path(path).is_dir():
        files, first = _open_dicom_series(Path(path))
        image = _read_dicom_series(Path(path), files, first, None, None, None)
        return ImageHeader(Path(path), image.grid, image.channels,
                           sitk.GetPixelIDValueAsString(first.GetPixelID()))
    p, reader = _open_reader(path)
    _check_nifti_size(p)
    size = reader.GetSize()
    _check_dimension(p, size)
    size, spacing, origin, direction = _squeeze_4d(
        size, reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection())
    _check_voxels(p, size)
    grid = _grid_from(size, spacing, origin, direction, f"image {str(p)!r}")
    return ImageHeader(p, grid, int(reader.GetNumberOfComponents()),
                       sitk.GetPixelIDValueAsString(reader.GetPixelID()))


def _check_dimension(path: Path | None, size) -> None:
    where = f"image {str(path)!r}" if path is not None else "SimpleITK image"
    d = len(size)
    if d == 4 and size[3] == 1:
        return
    if d not in (2, 3):
        raise ImageFormatError(
            f"{where} is {d}D (size {tuple(size)}); itreg registers 2D and 3D images: extract one "
            "3D volume first (e.g. sitk.Extract, or fslroi for a 4D NIfTI)"
        )


def _squeeze_4d(size, spacing, origin, direction):
    """Drop a trailing singleton 4th axis (a 4D file holding one volume)."""
    if len(size) != 4:
        return size, spacing, origin, direction
    d = np.asarray(direction, dtype=np.float64).reshape(4, 4)[:3, :3]
    return tuple(size[:3]), tuple(spacing[:3]), tuple(origin[:3]), tuple(d.ravel())


def _check_voxels(path: Path | None, size) -> None:
    where = f"image {str(path)!r}" if path is not None else "SimpleITK image"
    n = math.prod(int(s) for s in size)
    if n > MAX_VOXELS:
        raise ImageReadError(
            f"{where} claims {tuple(size)} = {n:.3g} voxels, more than itreg's limit of "
            f"{MAX_VOXELS:.3g} (itreg.grid.MAX_VOXELS); the header is corrupt or the image must "
            "be cropped or downsampled first"
        )
    if n == 0:
        raise InvalidImageError(f"{where} is empty (size {tuple(size)})")


def _check_budget(path: Path, size, components: int, pixel_id: int, out_bytes: int,
                  max_bytes: int) -> None:
    n = math.prod(int(s) for s in size) * max(components, 1)
    need = n * (_COMPONENT_BYTES.get(pixel_id, 8) + out_bytes)
    if need > max_bytes:
        raise ImageReadError(
            f"image {str(path)!r} ({tuple(size)} x {components} component(s), "
            f"{sitk.GetPixelIDValueAsString(pixel_id)}) needs about {need / 2**30:.3g} GiB to read, "
            f"more than the budget of {max_bytes / 2**30:.3g} GiB; crop or downsample it, or raise "
            f"the budget with max_bytes= or ${MAX_BYTES_ENV}"
        )


def _label_dtype(arr: np.ndarray, where: str) -> torch.dtype:
    dt = _LABEL_DTYPES.get(arr.dtype)
    if dt is None:
        raise ImageFormatError(f"{where} has unsupported pixel type {arr.dtype}")
    if arr.dtype == np.uint64 and arr.size and int(arr.max()) > np.iinfo(np.int64).max:
        raise ImageFormatError(
            f"{where} has uint64 labels above 2^63 that torch cannot hold; relabel the image"
        )
    return dt


def _integral_labels(data: torch.Tensor, where: str) -> torch.Tensor:
    """Float data declared as labels -> the smallest integer dtype holding them."""
    if not bool(torch.isfinite(data).all()):
        raise InvalidImageError(f"{where} is read as labels but has NaN/Inf voxels")
    if not bool((data == torch.round(data)).all()):
        raise InvalidImageError(
            f"{where} is read as labels but has non-integer values; read it with "
            "is_label=False, or round it to integer labels"
        )
    lo, hi = (float(data.min()), float(data.max())) if data.numel() else (0.0, 0.0)
    for dt in (torch.uint8, torch.int16, torch.int32):
        info = torch.iinfo(dt)
        if info.min <= lo and hi <= info.max:
            return data.to(dt)
    return data.to(torch.int64)


def from_sitk(sitk_image: sitk.Image, *, dtype: torch.dtype | None = None,
              is_label: bool | None = None, name: str | None = None) -> Image:
    """Convert a SimpleITK image to an :class:`~itreg.Image`.

    Args:
        sitk_image: a 2D or 3D SimpleITK image (scalar or vector pixels). A 4D image with a
            single volume along the 4th axis is accepted as 3D.
        dtype: torch dtype of the result; by default integer pixels keep an integer dtype
            (``uint16`` -> ``int32``, ``uint32``/``uint64`` -> ``int64``) and floating-point
            pixels become ``float32``.
        is_label: label flag. ``None``: integer pixels are labels, floating ones intensities.
            ``True`` with floating pixels converts integral values to an integer dtype;
            ``False`` with integer pixels (and no `dtype`) converts to ``float32``.
        name: how to name the image in error messages (default ``"SimpleITK image"``).

    Returns:
        The image; tensor ``(C, *grid.shape)``.

    Raises:
        ImageFormatError: unsupported dimension or pixel type (complex, label maps).
        GeometryError: invalid spacing or direction.
    """
    where = name or "SimpleITK image"
    size = sitk_image.GetSize()
    _check_dimension(None if name is None else Path(name), size)
    if len(size) == 4:
        sitk_image = sitk_image[:, :, :, 0]
        size = sitk_image.GetSize()
    _check_voxels(None if name is None else Path(name), size)
    grid = _grid_from(size, sitk_image.GetSpacing(), sitk_image.GetOrigin(),
                      sitk_image.GetDirection(), where)
    try:
        arr = sitk.GetArrayViewFromImage(sitk_image)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ImageFormatError(
            f"{where} has pixel type {sitk_image.GetPixelIDTypeAsString()!r} that itreg cannot "
            "use; convert it to a scalar or vector integer/float image"
        ) from exc
    if np.iscomplexobj(arr):
        raise ImageFormatError(
            f"{where} has complex pixels; save the magnitude (or real part) as a float image"
        )
    components = sitk_image.GetNumberOfComponentsPerPixel()
    if components > 1:
        arr = np.moveaxis(arr, -1, 0)
    else:
        arr = arr[None]
    if arr.dtype.kind == "f":
        if is_label and dtype is None:
            data = _integral_labels(torch.from_numpy(np.array(arr, dtype=np.float64)), where)
        elif dtype is None or dtype.is_floating_point:
            dtype = dtype or torch.float32
            np_dt = {torch.float32: np.float32, torch.float64: np.float64}.get(dtype, np.float32)
            data = torch.from_numpy(np.array(arr, dtype=np_dt)).to(dtype)
        else:  # integer dtype asked for: the values must be integral
            data = _integral_labels(torch.from_numpy(np.array(arr, dtype=np.float64)), where)
            data = data.to(dtype)
    else:
        if dtype is None:
            dtype = _label_dtype(arr, where) if is_label is not False else torch.float32
        elif not dtype.is_floating_point:
            _label_dtype(arr, where)  # range check of uint64 labels
        np_dt = _NUMPY_DTYPES.get(dtype)
        if np_dt is not None:
            data = torch.from_numpy(np.array(arr, dtype=np_dt))
        else:
            data = torch.from_numpy(np.array(arr, dtype=np.float64)).to(dtype)
    return Image(data, grid, is_label)


def read_image(path: str | os.PathLike, *, dtype: torch.dtype | None = None,
               is_label: bool | None = None, max_bytes: int | None = None) -> Image:
    """Read an image file (.nii, .nii.gz, .nrrd, .mha, .mhd, ... anything SimpleITK reads), or
    a folder holding a DICOM series (read as one volume by SimpleITK's series reader; the
    largest series if there are several).

    The header is read first: a size above :data:`itreg.grid.MAX_VOXELS` or a read that would
    need more than `max_bytes` raises before any voxel is allocated.

    Args:
        path: image file.
        dtype: torch dtype of the result (see :func:`from_sitk` for the defaults);
            ``torch.float64`` keeps double-precision files exact.
        is_label: label flag (see :func:`from_sitk`); ``None`` derives it from the pixel type.
        max_bytes: memory budget of the read in bytes; default :func:`default_max_bytes`.

    Returns:
        The image, tensor ``(C, Z, Y, X)`` (``(C, Y, X)`` in 2D) on the file's grid.

    Raises:
        ImageReadError: missing file, a directory, not an image, truncated or corrupt, or
            too large for the voxel limit or the memory budget.
        ImageFormatError: not 2D/3D, or an unsupported pixel type.
        GeometryError: invalid spacing or direction in the header.
    """
    if Path(path).is_dir():
        files, first = _open_dicom_series(Path(path))
        return _read_dicom_series(Path(path), files, first, dtype, is_label, max_bytes)
    p, reader = _open_reader(path)
    size = reader.GetSize()
    _check_dimension(p, size)
    _check_voxels(p, size)
    _grid_from(*_squeeze_4d(size, reader.GetSpacing(), reader.GetOrigin(), reader.GetDirection()),
               f"image {str(p)!r}")  # geometry errors name the file, before the voxels are read
    out_bytes = torch.empty((), dtype=dtype).element_size() if dtype is not None else 4
    _check_budget(p, size, int(reader.GetNumberOfComponents()), reader.GetPixelID(), out_bytes,
                  max_bytes if max_bytes is not None else default_max_bytes())
    _check_nifti_complete(p)
    try:
        with quiet_native_stderr():
            sitk_image = reader.Execute()
    except RuntimeError as exc:
        raise ImageReadError(
            f"cannot read the voxels of image {str(p)!r}: {sitk_message(exc)}; the file is "
            "truncated or corrupt (re-export it), or a data file it names is missing"
        ) from exc
    except MemoryError as exc:
        raise ImageReadError(
            f"not enough memory to read image {str(p)!r} (size {tuple(size)}); crop or "
            "downsample it first"
        ) from exc
    image = from_sitk(sitk_image, dtype=dtype, is_label=is_label, name=str(p))
    logger.debug("read %s: %r", p, image)
    return image


def check_image(image: Image, name: str = "image") -> Image:
    """Check that an image can be registered: finite voxels and some contrast.

    Args:
        image: the image.
        name: how to name it in messages (e.g. the file name).

    Returns:
        The same image, for chaining.

    Raises:
        InvalidImageError: NaN/Inf voxels (the message gives their count), an empty or a
            constant image.
    """
    image.check_finite(name)
    image.check_not_constant(name)
    return image


# ---------------------------------------------------------------------------------- masks
def read_mask(path: str | os.PathLike, reference: Grid | None = None) -> Image:
    """Read a mask image: nonzero voxels are inside.

    Args:
        path: mask file (any scalar pixel type; non-binary values are accepted, nonzero = inside,
            with a warning).
        reference: the grid the mask must lie on (the grid of the image it masks), or None.

    Returns:
        A one-channel ``bool`` label image.

    Raises:
        ImageReadError: the file cannot be read (see :func:`read_image`).
        MaskError: vector mask, NaN voxels, all-zero mask, or a mask on another grid than
            `reference`.
    """
    image = read_image(path, is_label=None)
    where = f"mask {str(Path(path))!r}"
    if image.channels != 1:
        raise MaskError(f"{where} has {image.channels} components; a mask must be a scalar image")
    data = image.data
    if data.is_floating_point() and not bool(torch.isfinite(data).all()):
        bad = int((~torch.isfinite(data)).sum())
        raise MaskError(f"{where} has {bad} NaN/Inf voxels; masks must hold 0 (outside) / 1")
    if reference is not None and not image.grid.same_as(reference):
        raise MaskError(
            f"{where} lies on another grid than the image it masks: mask {image.grid!r} vs "
            f"image {reference!r}; resample the mask onto the image's grid (nearest neighbour) "
            "or pass the mask made for this image"
        )
    inside = data != 0
    count = int(inside.sum())
    if count == 0:
        raise MaskError(f"{where} is all zero (empty); a mask needs nonzero voxels inside")
    values = torch.unique(data) if data.numel() <= 50_000_000 else None
    if values is not None and not bool(((values == 0) | (values == 1)).all()):
        shown = ", ".join(f"{float(v):g}" for v in values[:6]) + (", ..." if len(values) > 6 else "")
        logger.warning("%s is not binary (values %s); treating every nonzero voxel as inside",
                       where, shown)
    grid = reference if reference is not None else image.grid
    return Image(inside, grid, is_label=True)

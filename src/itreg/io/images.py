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

import gzip
import itertools
import logging
import math
import os
import struct
import zlib
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
    atomic_write,
    check_input_file,
    full_suffix,
    quiet_native_stderr,
    sitk_message,
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


# ---------------------------------------------------------------------------------- NIfTI checks
def _nifti_layout(header: bytes) -> tuple[int, int] | None:
    """``(voxel data offset, data bytes)`` from a NIfTI-1/2 header, or None if not NIfTI."""
    info = _nifti_info(header)
    return None if info is None else info[:2]


def _nifti_info(header: bytes) -> tuple[int, int, np.dtype | None] | None:
    """``(offset, data bytes, float dtype or None)`` from a NIfTI-1/2 header, or None."""
    for endian in ("<", ">"):
        if len(header) >= 348 and struct.unpack(endian + "i", header[:4])[0] == 348:
            dims = struct.unpack(endian + "8h", header[40:56])
            datatype = struct.unpack(endian + "h", header[70:72])[0]
            bitpix = struct.unpack(endian + "h", header[72:74])[0]
            offset = max(int(struct.unpack(endian + "f", header[108:112])[0]), 352)
            break
        if len(header) >= 540 and struct.unpack(endian + "i", header[:4])[0] == 540:
            dims = struct.unpack(endian + "8q", header[16:80])
            datatype = struct.unpack(endian + "h", header[12:14])[0]
            bitpix = struct.unpack(endian + "h", header[14:16])[0]
            offset = max(int(struct.unpack(endian + "q", header[168:176])[0]), 544)
            break
    else:
        return None
    ndim = dims[0]
    if not 1 <= ndim <= 7 or bitpix <= 0:
        return None
    count = math.prod(max(int(n), 1) for n in dims[1 : ndim + 1])
    # NIfTI datatype codes 16 and 64 are float32 and float64 (the types that can hold NaN).
    floating = {16: "f4", 64: "f8"}.get(int(datatype))
    return offset, count * bitpix // 8, (np.dtype(endian + floating) if floating else None)


def _check_nifti_complete(path: Path) -> None:
    """Raise ImageReadError if a ``.nii``/``.nii.gz`` file is shorter than its header says.

    SimpleITK reads truncated NIfTI files without error and fills the missing voxels with zeros,
    so this check is ours. For ``.nii.gz`` the whole stream is decompressed (in chunks), which
    also verifies gzip's CRC.
    """
    suffix = full_suffix(path)
    fix = "the file is truncated or corrupt; re-export or re-download it"
    if suffix == ".nii":
        with open(path, "rb") as f:
            layout = _nifti_layout(f.read(540))
        if layout is not None:
            offset, nbytes = layout
            actual = path.stat().st_size
            if actual < offset + nbytes:
                raise ImageReadError(
                    f"image {str(path)!r} has {actual} bytes but its header needs "
                    f"{offset + nbytes}; {fix}"
                )
            with open(path, "rb") as f:
                header = f.read(540)
            dt = _nifti_info(header)[2]
            if dt is not None:
                values = np.memmap(path, dtype=dt, mode="r", offset=offset,
                                   shape=(nbytes // dt.itemsize,))
                _refuse_nonfinite(path, int(values.size - np.isfinite(values).sum()))
        return
    if suffix != ".nii.gz":
        return
    total = 0
    header = b""
    info = None
    nonfinite = 0
    pending = b""  # bytes of the voxel data not yet scanned (element alignment)
    try:
        with gzip.open(path, "rb") as f:
            while True:
                chunk = f.read(1 << 22)
                if not chunk:
                    break
                start = total
                total += len(chunk)
                if len(header) < 540:
                    header += chunk[: 540 - len(header)]
                    if len(header) >= 348 and info is None:
                        info = _nifti_info(header)
                if info is not None and info[2] is not None:
                    offset, nbytes, dt = info
                    lo = max(offset - start, 0)
                    hi = min(offset + nbytes - start, len(chunk))
                    if hi > lo:
                        pending += chunk[lo:hi]
                        usable = len(pending) - len(pending) % dt.itemsize
                        values = np.frombuffer(pending[:usable], dtype=dt)
                        nonfinite += int(values.size - np.isfinite(values).sum())
                        pending = pending[usable:]
    except (EOFError, OSError, zlib.error) as exc:
        raise ImageReadError(
            f"image {str(path)!r} is not a complete gzip stream ({exc}); {fix}"
        ) from exc
    layout = _nifti_layout(header)
    if layout is None:
        raise ImageReadError(f"image {str(path)!r} does not start with a NIfTI header; {fix}")
    offset, nbytes = layout
    if total < offset + nbytes:
        raise ImageReadError(
            f"image {str(path)!r} decompresses to {total} bytes but its header needs "
            f"{offset + nbytes}; {fix}"
        )
    _refuse_nonfinite(path, nonfinite)


def _check_nifti_size(path: Path) -> None:
    """A cheap completeness check for header-only reads (a reference grid): ``.nii`` by its
    size, ``.nii.gz`` by the uncompressed size gzip records at the end of the stream; only when
    that disagrees is the stream decompressed (:func:`_check_nifti_complete`)."""
    suffix = full_suffix(path)
    if suffix == ".nii":
        _check_nifti_complete(path)
        return
    if suffix != ".nii.gz":
        return
    try:
        with gzip.open(path, "rb") as f:
            layout = _nifti_layout(f.read(540))
        with open(path, "rb") as f:
            f.seek(-4, os.SEEK_END)
            recorded = int.from_bytes(f.read(4), "little")
    except (EOFError, OSError, zlib.error):
        layout, recorded = None, -1
    if layout is not None and recorded == (layout[0] + layout[1]) % 2 ** 32:
        return
    _check_nifti_complete(path)


def _refuse_nonfinite(path: Path, count: int) -> None:
    """ITK's NIfTI reader turns NaN voxels into 0 silently; we refuse such files instead."""
    if count:
        raise InvalidImageError(
            f"image {str(path)!r} has {count} NaN/Inf voxels (which SimpleITK would read as "
            "0); replace or mask them before registering"
        )


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


# ---------------------------------------------------------------------------------- writing
def to_sitk(image: Image) -> sitk.Image:
    """Convert an :class:`~itreg.Image` to a SimpleITK image (scalar for C = 1, else vector).

    ``bool`` data becomes ``uint8``, ``float16``/``bfloat16`` become ``float32``; other dtypes
    are kept. Geometry (spacing, origin, direction) is copied from the grid.
    """
    data = image.data.detach()
    if data.dtype == torch.bool:
        data = data.to(torch.uint8)
    elif data.dtype in (torch.float16, torch.bfloat16):
        data = data.to(torch.float32)
    arr = data.cpu().numpy()
    if image.channels == 1:
        out = sitk.GetImageFromArray(arr[0], isVector=False)
    else:
        out = sitk.GetImageFromArray(np.ascontiguousarray(np.moveaxis(arr, 0, -1)), isVector=True)
    g = image.grid
    out.SetSpacing(g.spacing)
    out.SetOrigin(g.origin)
    out.SetDirection(g.direction)
    return out


#: Compression settings of :func:`write_image` and :func:`write_sitk_image` for ``.nii.gz``:
#: ``fast`` is gzip level 1 with zlib's run-length strategy (entropy coding and zero runs: about
#: a quarter of the CPU time of SimpleITK's default deflate for float images, whose mantissas
#: do not compress; within a few per cent of its size on the brain phantoms), ``best`` is
#: deflate level 9, ``none`` a valid gzip file of stored blocks (any reader opens it; no CPU).
COMPRESSION = ("fast", "best", "none")

_GZIP_SETTINGS = {"fast": (1, zlib.Z_RLE), "best": (9, zlib.Z_DEFAULT_STRATEGY),
                  "none": (0, zlib.Z_DEFAULT_STRATEGY)}
_GZIP_CHUNK = 1 << 23  # bytes per zlib call (zlib releases the GIL during each)


def compression_mode(compress: bool | str) -> str:
    """``True`` -> ``"fast"``, ``False`` -> ``"none"``, else one of :data:`COMPRESSION`.

    Raises:
        ConfigError: another value.
    """
    if compress is True:
        return "fast"
    if compress is False:
        return "none"
    if compress not in COMPRESSION:
        raise ConfigError(f"compression {compress!r}: valid: {', '.join(COMPRESSION)}")
    return str(compress)


def _deflate_part(data: memoryview, level: int, strategy: int, last: bool) -> bytes:
    comp = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS, 9, strategy)
    out = comp.compress(data)
    # A sync flush ends a part on a byte boundary without ending the stream, so the parts
    # concatenate into one valid deflate stream (as pigz does).
    return out + comp.flush(zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH)


def _gzip_file(src: Path, dest: Path, mode: str) -> None:
    """gzip `src` into `dest` (one gzip member, as any reader expects) at the `mode` level;
    parts of the data are deflated in parallel threads (zlib releases the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    level, strategy = _GZIP_SETTINGS[mode]
    data = memoryview(src.read_bytes())
    n = len(data)
    workers = max(1, min(os.cpu_count() or 1, 4, n // _GZIP_CHUNK))
    bounds = [n * i // workers for i in range(workers + 1)]
    parts = [data[a:b] for a, b in itertools.pairwise(bounds)]
    lasts = [i == workers - 1 for i in range(workers)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        crc = pool.submit(zlib.crc32, data)
        deflated = list(pool.map(_deflate_part, parts, [level] * workers, [strategy] * workers,
                                 lasts))
    with open(dest, "wb") as fout:
        # RFC 1952 header: magic, deflate, no flags, mtime 0 (reproducible), XFL, OS unknown.
        fout.write(b"\x1f\x8b\x08\x00\x00\x00\x00\x00" + (b"\x02" if level == 9 else b"\x04")
                   + b"\xff")
        fout.writelines(deflated)
        fout.write(struct.pack("<II", crc.result() & 0xFFFFFFFF, n & 0xFFFFFFFF))


def write_sitk_image(image: sitk.Image, tmp: Path, target: Path, compress: bool | str) -> None:
    """Write a SimpleITK image to the temporary path `tmp` of `target` (whose extension picks
    the format). ``.nii.gz`` is written as ``.nii`` by SimpleITK and gzipped here at the
    :func:`compression_mode` of `compress`; other formats take SimpleITK's own compression
    when `compress` is not ``"none"``/False (.nrrd, .mha). Releases the GIL for most of its
    time (SimpleITK's writer, zlib), so writes in threads overlap."""
    mode = compression_mode(compress)
    if full_suffix(target) != ".nii.gz":
        sitk.WriteImage(image, str(tmp), mode != "none")
        return
    raw = tmp.with_name(tmp.name[:-len(".gz")] if tmp.name.lower().endswith(".gz")
                        else tmp.name + ".nii")
    try:
        sitk.WriteImage(image, str(raw), False)
        _gzip_file(raw, tmp, mode)
    finally:
        raw.unlink(missing_ok=True)


def write_image(image: Image, path: str | os.PathLike, *, compress: bool | str = True) -> Path:
    """Write an image; the format follows the extension (.nii.gz, .nii, .nrrd, .mha, ...).

    Label images keep their integer type, ``float32`` stays ``float32``. Single-file formats are
    written to a temporary file beside `path` and renamed, so a crash never leaves half a file.
    Missing parent folders are created. An existing file is replaced (use
    :func:`itreg.io.atomic_output_file` to refuse that).

    Args:
        image: the image.
        path: output file.
        compress: ``.nii.gz``: ``"fast"`` (default, also True), ``"best"`` or ``"none"`` (also
            False; still a gzip file), see :data:`COMPRESSION`; .nrrd and .mha: SimpleITK's
            compression unless ``"none"``/False; .nii is never compressed.

    Returns:
        The path written.

    Raises:
        ImageFormatError: SimpleITK cannot write this image to this extension.
        ConfigError: an unknown `compress` value.
    """
    target = Path(path)
    compression_mode(compress)
    if target.is_dir():
        raise ImageFormatError(f"cannot write image to {str(target)!r}: it is a directory")
    sitk_image = to_sitk(image)
    try:
        with atomic_write(target) as tmp, quiet_native_stderr():
            write_sitk_image(sitk_image, tmp, target, compress)
    except RuntimeError as exc:
        raise ImageFormatError(
            f"cannot write image {str(target)!r}: {sitk_message(exc)}; use an extension "
            "SimpleITK writes (.nii.gz, .nii, .nrrd, .mha) and check the folder is writable"
        ) from exc
    logger.debug("wrote %s: %r", target, image)
    return target

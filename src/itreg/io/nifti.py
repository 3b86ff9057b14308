"""NIfTI header checks made before SimpleITK reads a file: a truncated ``.nii``/``.nii.gz``
(shorter than its header says) and non-finite float voxels are refused with the file named
(:mod:`itreg.io.images` calls them; no torch).
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from itreg.errors import ImageReadError, InvalidImageError
from itreg.io._native import full_suffix


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

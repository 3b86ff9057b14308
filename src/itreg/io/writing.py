"""Writing images: :func:`write_image` (any SimpleITK format, atomically), :func:`to_sitk`, and
the ``.nii.gz`` compression settings (:data:`COMPRESSION`, parallel deflate into one gzip
member). Reading is :mod:`itreg.io.images`.
"""

from __future__ import annotations

import itertools
import logging
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from itreg.errors import ConfigError, ImageFormatError
from itreg.image import Image
from itreg.io._native import atomic_write, full_suffix, quiet_native_stderr, sitk_message

logger = logging.getLogger("itreg.io")

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

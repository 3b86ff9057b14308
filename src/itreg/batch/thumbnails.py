"""Checkerboard thumbnails for the batch summary: two images on one grid, alternating tiles.

A registration is judged by eye at the tile borders: edges run on across them when the images
are aligned. 3D images show their middle slice across the last axis (axial for LPS brains).
Pixels are square in millimetres whatever the spacing. PNG bytes are encoded here (grey, 8 bit)
so workers need no plotting library.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

from itreg.image import Image

#: Longest side of a thumbnail in pixels.
SIZE = 160
#: Tiles along the longest side.
TILES = 6


def _slice(image: Image) -> tuple[np.ndarray, tuple[float, float]]:
    """The middle 2D slice ``(rows, cols)`` of a one-channel image, and its (row, col) spacing."""
    data = image.data[0].detach().float().cpu().numpy()
    spacing = tuple(float(s) for s in image.grid.spacing)  # (x, y[, z])
    if data.ndim == 3:
        data = data[data.shape[0] // 2]
    return data, (spacing[1], spacing[0])


def _scaled(values: np.ndarray) -> np.ndarray:
    """Robust 0..1 scaling (1st to 99th percentile)."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return np.zeros_like(values)
    lo, hi = np.percentile(finite, [1, 99])
    if hi <= lo:
        hi = lo + 1.0
    return np.clip((np.nan_to_num(values, nan=lo) - lo) / (hi - lo), 0.0, 1.0)


def checkerboard(a: Image, b: Image, size: int = SIZE, tiles: int = TILES) -> np.ndarray:
    """A ``uint8`` checkerboard of `a` and `b` (same grid), at most `size` pixels a side."""
    sa, (sy, sx) = _slice(a)
    sb, _ = _slice(b)
    if sa.shape != sb.shape:
        raise ValueError(f"checkerboard of images of shapes {sa.shape} and {sb.shape}")
    rows, cols = sa.shape
    height_mm, width_mm = rows * sy, cols * sx
    scale = size / max(height_mm, width_mm)  # pixels per mm
    out_rows = max(1, round(height_mm * scale))
    out_cols = max(1, round(width_mm * scale))
    r = np.minimum((np.arange(out_rows) + 0.5) / scale / sy, rows - 1).astype(int)
    c = np.minimum((np.arange(out_cols) + 0.5) / scale / sx, cols - 1).astype(int)
    va, vb = _scaled(sa)[np.ix_(r, c)], _scaled(sb)[np.ix_(r, c)]
    tile = max(out_rows, out_cols) / tiles
    pick = ((np.arange(out_rows)[:, None] // tile + np.arange(out_cols)[None, :] // tile) % 2
            ).astype(bool)
    return (np.where(pick, vb, va) * 255 + 0.5).astype(np.uint8)


def png_bytes(grey: np.ndarray) -> bytes:
    """Encode a 2D ``uint8`` array as a greyscale PNG."""
    grey = np.ascontiguousarray(grey, dtype=np.uint8)
    height, width = grey.shape
    raw = b"".join(b"\x00" + grey[i].tobytes() for i in range(height))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + tag + data
                + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def checkerboard_png(a: Image, b: Image) -> bytes | None:
    """PNG bytes of :func:`checkerboard`, or None when the images cannot be shown together."""
    try:
        return png_bytes(checkerboard(a, b))
    except (ValueError, IndexError):
        return None

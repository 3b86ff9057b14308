"""Landmark (point) files in world millimetres (ITK's LPS space).

Read formats:

* CSV: one point per line, ``x,y`` or ``x,y,z`` (commas, semicolons, tabs or spaces), with an
  optional header. A header that names ``x``, ``y`` (and ``z``) columns selects those columns,
  so files with extra columns (``label,x,y,z``) work. Lines starting with ``#`` are comments.
* 3D Slicer markups ``.fcsv``: coordinates in the system its header names
  (``# CoordinateSystem = LPS`` / ``RAS``, or ``1`` / ``0`` in older files; RAS when absent);
  RAS points are converted to LPS (``x, y -> -x, -y``).
* elastix / transformix point files: ``point``, the number of points, then one point per line.
  (``index`` files hold voxel indices, not world points, and are refused.)

:func:`write_landmarks` writes CSV with an ``x,y[,z]`` header, Slicer ``.fcsv`` (LPS) or
elastix ``point`` files (``.pts``), chosen by the extension.
"""

from __future__ import annotations

import logging
import math
import os
import re
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from itreg.errors import ConfigError, GeometryError
from itreg.io._native import atomic_write, check_input_file

logger = logging.getLogger("itreg.io")

_SPLIT = re.compile(r"[,;\t ]+")


def _floats(fields: list[str], path: Path, lineno: int) -> list[float]:
    try:
        values = [float(f) for f in fields]
    except ValueError:
        raise ConfigError(
            f"landmark file {str(path)!r}, line {lineno}: expected numbers, got "
            f"{','.join(fields)!r}; each line must hold one point's x,y[,z] in mm"
        ) from None
    if not all(math.isfinite(v) for v in values):
        raise ConfigError(f"landmark file {str(path)!r}, line {lineno}: non-finite coordinate")
    return values


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _read_fcsv(lines: list[str], path: Path) -> np.ndarray:
    system = "RAS"
    columns = ["id", "x", "y", "z"]
    points = []
    for lineno, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line:
            continue
        if line.startswith("#"):
            key, _, value = line[1:].partition("=")
            key, value = key.strip().lower(), value.strip()
            if key == "coordinatesystem":
                value = {"0": "RAS", "1": "LPS"}.get(value, value.upper())
                if value not in ("RAS", "LPS"):
                    raise ConfigError(
                        f"landmark file {str(path)!r}, line {lineno}: unknown CoordinateSystem "
                        f"{value!r}; expected LPS or RAS"
                    )
                system = value
            elif key == "columns":
                columns = [c.strip().lower() for c in value.split(",")]
            continue
        fields = [f.strip() for f in line.split(",")]
        try:
            idx = [columns.index(c) for c in ("x", "y", "z")]
        except ValueError:
            raise ConfigError(
                f"landmark file {str(path)!r}: the columns header {','.join(columns)!r} has no "
                "x, y, z columns"
            ) from None
        if len(fields) <= max(idx):
            raise ConfigError(
                f"landmark file {str(path)!r}, line {lineno}: {len(fields)} fields, expected the "
                f"columns {','.join(columns)}"
            )
        points.append(_floats([fields[i] for i in idx], path, lineno))
    arr = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    if system == "RAS":
        arr[:, :2] *= -1.0
    return arr


def _read_elastix(lines: list[str], path: Path) -> np.ndarray:
    content = [(n, ln.strip()) for n, ln in enumerate(lines, start=1) if ln.strip()]
    kind = content[0][1].lower()
    if kind == "index":
        raise ConfigError(
            f"landmark file {str(path)!r} holds elastix voxel indices ('index'); itreg reads "
            "world points: write the file in elastix's 'point' format (physical mm)"
        )
    if len(content) < 2 or not content[1][1].isdigit():
        raise ConfigError(
            f"landmark file {str(path)!r}: an elastix point file needs the number of points on "
            "its second line"
        )
    count = int(content[1][1])
    rows = content[2:]
    if len(rows) != count:
        raise ConfigError(
            f"landmark file {str(path)!r} says it has {count} points but holds {len(rows)}; "
            "fix the count on line 2"
        )
    return np.asarray([_floats(_SPLIT.split(text), path, n) for n, text in rows],
                      dtype=np.float64).reshape(count, -1)


def _read_csv(lines: list[str], path: Path) -> np.ndarray:
    columns: list[int] | None = None
    points: list[list[float]] = []
    first_line = 0
    for lineno, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = [f.strip().strip('"').strip("'") for f in _SPLIT.split(line) if f.strip()]
        if columns is None and not points and not all(_is_number(f) for f in fields):
            names = [f.lower() for f in fields]
            wanted = [n for n in ("x", "y", "z") if n in names]
            if wanted[:2] != ["x", "y"]:
                raise ConfigError(
                    f"landmark file {str(path)!r}, line {lineno}: header {line!r} does not name "
                    "x and y columns; use a header 'x,y[,z]' or none"
                )
            columns = [names.index(n) for n in wanted]
            continue
        if columns is not None:
            if len(fields) <= max(columns):
                raise ConfigError(
                    f"landmark file {str(path)!r}, line {lineno}: {len(fields)} fields but the "
                    f"header has {max(columns) + 1} columns"
                )
            fields = [fields[i] for i in columns]
        values = _floats(fields, path, lineno)
        if points and len(values) != len(points[0]):
            raise ConfigError(
                f"landmark file {str(path)!r}, line {lineno}: {len(values)} coordinates, but line "
                f"{first_line} has {len(points[0])}; all points must have the same dimension"
            )
        if not points:
            first_line = lineno
        points.append(values)
    if not points:
        return np.zeros((0, 0))
    return np.asarray(points, dtype=np.float64)


def read_landmarks(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32) -> Tensor:
    """Read world-mm (LPS) points from a CSV, Slicer ``.fcsv`` or elastix point file.

    Args:
        path: the landmark file (formats in the module docstring).
        dtype: dtype of the result.

    Returns:
        Points ``(N, D)`` in ITK order ``(x, y[, z])``, LPS mm.

    Raises:
        ConfigError: missing file, malformed line (the message names the line), unknown
            coordinate system, no points, or points that are not 2D or 3D.
    """
    p = check_input_file(path, "landmark file", ConfigError)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except (UnicodeDecodeError, OSError) as exc:
        raise ConfigError(f"landmark file {str(p)!r} is not a text file ({exc})") from exc
    lines = text.splitlines()
    first = next((ln.strip().lower() for ln in lines if ln.strip()), "")
    if p.suffix.lower() == ".fcsv" or first.startswith("# markups fiducial"):
        arr = _read_fcsv(lines, p)
    elif first in ("point", "index"):
        arr = _read_elastix(lines, p)
    else:
        arr = _read_csv(lines, p)
    if arr.shape[0] == 0:
        raise ConfigError(f"landmark file {str(p)!r} holds no points")
    if arr.shape[1] not in (2, 3):
        raise ConfigError(
            f"landmark file {str(p)!r} has points with {arr.shape[1]} coordinates; expected 2 "
            "or 3 (x,y[,z]); add a header naming the x, y, z columns if there are others"
        )
    logger.debug("read %d %dD landmarks from %s", arr.shape[0], arr.shape[1], p)
    return torch.as_tensor(arr, dtype=dtype)


def _points_array(points) -> np.ndarray:
    if isinstance(points, Tensor):
        points = points.detach().to("cpu", torch.float64).numpy()
    arr = np.asarray(points, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] not in (2, 3):
        raise GeometryError(
            f"landmarks must be an (N, 2) or (N, 3) array of world points, got shape {arr.shape}"
        )
    if not np.isfinite(arr).all():
        raise GeometryError(f"landmarks hold {int((~np.isfinite(arr)).sum())} NaN/Inf values")
    return arr


def write_landmarks(points: Tensor | np.ndarray, path: str | os.PathLike) -> Path:
    """Write world-mm (LPS) points; the format follows the extension.

    ``.fcsv``: 3D Slicer markups (``CoordinateSystem = LPS``; 3D points only); ``.pts``:
    elastix/transformix ``point`` file; anything else: CSV with an ``x,y[,z]`` header. Values are
    written with full precision (they read back bit for bit). The file is written under a
    temporary name and renamed.

    Args:
        points: ``(N, D)`` points, D = 2 or 3.
        path: output file.

    Returns:
        The path written.

    Raises:
        GeometryError: points are not ``(N, 2|3)`` or are not finite; 2D points to ``.fcsv``.
    """
    arr = _points_array(points)
    target = Path(path)
    d = arr.shape[1]
    fmt = lambda v: repr(float(v))
    suffix = target.suffix.lower()
    if suffix == ".fcsv":
        if d != 3:
            raise GeometryError(f"Slicer .fcsv files hold 3D points; got {d}D for {str(target)!r}")
        lines = [
            "# Markups fiducial file version = 4.11",
            "# CoordinateSystem = LPS",
            "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID",
        ]
        lines += [f"{i + 1},{','.join(fmt(v) for v in row)},0,0,0,1,1,1,0,F-{i + 1},,"
                  for i, row in enumerate(arr)]
    elif suffix == ".pts":
        lines = ["point", str(len(arr))] + [" ".join(fmt(v) for v in row) for row in arr]
    else:
        lines = [",".join("xyz"[:d])] + [",".join(fmt(v) for v in row) for row in arr]
    with atomic_write(target) as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    logger.debug("wrote %d landmarks to %s", len(arr), target)
    return target

"""Point lists that keep everything but their coordinates: CSV, Slicer ``.fcsv``, ``.mrk.json``.

:func:`read_point_table` reads the points of a file in world mm and converts them to ITK's LPS;
:func:`write_point_table` writes the same file back with new coordinates, converted back to
the file's own coordinate system, every other column, comment and JSON field untouched. So a
Slicer markups file carried through a transform opens in Slicer with its labels, and an ANTs
points CSV (``x,y,z,t,label,comment``) keeps its extra columns.

Coordinate systems:

* CSV: LPS unless the caller says ``"ras"`` (ANTs' ``antsApplyTransformsToPoints`` reads LPS
  CSVs; Slicer tables are RAS). Columns named ``x``, ``y`` (and ``z``) in a header are the
  coordinates; without a header the first two or three columns are.
* ``.fcsv``: the system in its ``# CoordinateSystem =`` header (``LPS``/``RAS``, or ``1``/``0``
  in old files; RAS when absent).
* ``.mrk.json``: each markup's ``coordinateSystem`` (LPS or RAS; RAS when absent, as Slicer).
"""

from __future__ import annotations

import copy
import csv
import io as _io
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from itreg.errors import ConfigError
from itreg.io._native import atomic_write, check_input_file

logger = logging.getLogger("itreg.io")

SYSTEMS = ("lps", "ras")


def point_format(path: str | os.PathLike) -> str:
    """``"mrk.json"``, ``"fcsv"`` or ``"csv"`` from the file name."""
    name = str(path).lower()
    if name.endswith(".json"):
        return "mrk.json"
    if name.endswith(".fcsv"):
        return "fcsv"
    return "csv"


@dataclass
class PointTable:
    """Points of a file, LPS world mm ``(N, D)``, and what is needed to write the file back.

    Attributes:
        points: ``(N, D)`` float64 LPS coordinates.
        format: ``"csv"``, ``"fcsv"`` or ``"mrk.json"``.
        systems: per point, the file's coordinate system (``"lps"``/``"ras"``).
        path: the file read.
    """

    points: np.ndarray
    format: str
    systems: list[str]
    path: Path
    _rows: list = field(default_factory=list, repr=False)
    _columns: list[int] = field(default_factory=list, repr=False)
    _json: dict | None = field(default=None, repr=False)
    _dialect: str = ","


def _to_lps(p: np.ndarray, system: str) -> np.ndarray:
    p = np.array(p, dtype=np.float64)
    if system == "ras":
        p[..., :2] *= -1.0
    return p


def _number(text: str) -> float | None:
    try:
        v = float(text)
    except ValueError:
        return None
    return v


def _bad(path: Path, lineno: int | None, what: str) -> ConfigError:
    where = f"point file {str(path)!r}" + (f", line {lineno}" if lineno else "")
    return ConfigError(f"{where}: {what}")


def _check(values: list[float], path: Path, lineno: int) -> list[float]:
    if not all(math.isfinite(v) for v in values):
        raise _bad(path, lineno, "non-finite coordinate")
    return values


def _read_csv(text: str, path: Path, system: str) -> PointTable:
    sample = "\n".join(ln for ln in text.splitlines() if ln and not ln.startswith("#"))[:4096]
    delimiter = ";" if sample.count(";") > sample.count(",") else (
        "\t" if "\t" in sample and "," not in sample else ",")
    rows = list(csv.reader(_io.StringIO(text), delimiter=delimiter))
    columns: list[int] | None = None
    points, kinds = [], []
    for lineno, row in enumerate(rows, 1):
        kinds.append("data")
        if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
            kinds[-1] = "keep"
            continue
        cells = [c.strip() for c in row]
        if columns is None and not points:
            names = [c.lower() for c in cells]
            if not all(_number(c) is not None for c in cells):
                if "x" not in names or "y" not in names:
                    raise _bad(path, lineno, f"header {','.join(cells)!r} does not name x and y "
                               "columns; use a header 'x,y[,z]' or none")
                columns = [names.index(n) for n in ("x", "y", "z") if n in names]
                kinds[-1] = "keep"
                continue
            columns = [0, 1, 2] if len(cells) >= 3 else [0, 1]
        if len(cells) <= max(columns):
            raise _bad(path, lineno, f"{len(cells)} fields, expected at least {max(columns) + 1}")
        values = [_number(cells[i]) for i in columns]
        if any(v is None for v in values):
            raise _bad(path, lineno, f"expected numbers in the coordinate columns, got "
                       f"{','.join(cells)!r}")
        points.append(_check(values, path, lineno))
    if not points:
        raise _bad(path, None, "holds no points")
    arr = _to_lps(np.asarray(points), system)
    table = PointTable(arr, "csv", [system] * len(points), path, _dialect=delimiter)
    table._rows = list(zip(kinds, rows))
    table._columns = columns or []
    return table


def _read_fcsv(text: str, path: Path) -> PointTable:
    system = "ras"
    columns = ["id", "x", "y", "z"]
    rows, points = [], []
    for lineno, line in enumerate(text.splitlines(), 1):
        if line.startswith("#") or not line.strip():
            key, _, value = line[1:].partition("=")
            key, value = key.strip().lower(), value.strip()
            if key == "coordinatesystem":
                value = {"0": "RAS", "1": "LPS"}.get(value, value.upper())
                if value not in ("RAS", "LPS"):
                    raise _bad(path, lineno, f"unknown CoordinateSystem {value!r}; expected LPS "
                               "or RAS")
                system = value.lower()
            elif key == "columns":
                columns = [c.strip().lower() for c in value.split(",")]
            rows.append(("keep", line))
            continue
        cells = next(csv.reader([line]))
        try:
            idx = [columns.index(c) for c in ("x", "y", "z")]
        except ValueError:
            raise _bad(path, None, f"the columns header {','.join(columns)!r} has no x, y, z "
                       "columns") from None
        if len(cells) <= max(idx):
            raise _bad(path, lineno, f"{len(cells)} fields, expected the columns "
                       f"{','.join(columns)}")
        values = [_number(cells[i]) for i in idx]
        if any(v is None for v in values):
            raise _bad(path, lineno, f"expected numbers for x, y, z, got {line!r}")
        points.append(_check(values, path, lineno))
        rows.append(("data", cells))
    if not points:
        raise _bad(path, None, "holds no points")
    table = PointTable(_to_lps(np.asarray(points), system), "fcsv", [system] * len(points), path)
    table._rows = rows
    table._columns = idx
    return table


def _read_json(text: str, path: Path) -> PointTable:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _bad(path, exc.lineno, f"not valid JSON ({exc.msg})") from None
    markups = doc.get("markups") if isinstance(doc, dict) else None
    if not isinstance(markups, list):
        raise _bad(path, None, "has no 'markups' list; expected a 3D Slicer .mrk.json file")
    points, systems = [], []
    for markup in markups:
        system = str(markup.get("coordinateSystem", "RAS")).lower()
        if system not in SYSTEMS:
            raise _bad(path, None, f"unknown coordinateSystem {system!r}; expected LPS or RAS")
        for cp in markup.get("controlPoints", []) or []:
            pos = cp.get("position")
            if not (isinstance(pos, list) and len(pos) == 3
                    and all(isinstance(v, (int, float)) for v in pos)):
                raise _bad(path, None, f"control point {cp.get('id', '?')!r} has no 3-number "
                           "position")
            points.append(_to_lps(_check([float(v) for v in pos], path, 0), system))
            systems.append(system)
    if not points:
        raise _bad(path, None, "holds no control points")
    return PointTable(np.asarray(points), "mrk.json", systems, path, _json=doc)


def read_point_table(path: str | os.PathLike, coordinates: str = "lps") -> PointTable:
    """Read a point file, converting its points to LPS world mm (see the module docstring).

    Args:
        path: a ``.csv``, ``.fcsv`` or ``.mrk.json`` file.
        coordinates: the system of a CSV's coordinates, ``"lps"`` or ``"ras"`` (Slicer files
            name their own).

    Raises:
        ConfigError: missing file, no coordinates, non-numeric or non-finite values, unknown
            coordinate system.
    """
    p = check_input_file(path, "point file", ConfigError)
    system = coordinates.lower()
    if system not in SYSTEMS:
        raise ConfigError(f"unknown coordinate system {coordinates!r}; valid: lps, ras")
    try:
        text = p.read_text(encoding="utf-8-sig")
    except (UnicodeDecodeError, OSError) as exc:
        raise ConfigError(f"cannot read point file {str(p)!r}: {exc}") from None
    kind = point_format(p)
    if kind == "mrk.json":
        return _read_json(text, p)
    if kind == "fcsv":
        return _read_fcsv(text, p)
    return _read_csv(text, p, system)


def _fmt(v: float) -> str:
    return repr(float(v))


def render_point_table(table: PointTable, points: np.ndarray) -> str:
    """The text of `table`'s file with its coordinates replaced by `points` (LPS, ``(N, D)``)."""
    points = np.asarray(points, dtype=np.float64)
    if points.shape != table.points.shape:
        raise ConfigError(f"expected {table.points.shape} points, got {points.shape}")
    native = np.stack([_to_lps(p, s) for p, s in zip(points, table.systems)])  # RAS flip is
    # its own inverse
    if table.format == "mrk.json":
        doc = copy.deepcopy(table._json)
        i = 0
        for markup in doc["markups"]:
            for cp in markup.get("controlPoints", []) or []:
                cp["position"] = [float(v) for v in native[i]]
                i += 1
        return json.dumps(doc, indent=4) + "\n"
    out = _io.StringIO()
    writer = csv.writer(out, delimiter=table._dialect, lineterminator="\n")
    i = 0
    for kind, row in table._rows:
        if kind == "keep" and isinstance(row, str):
            out.write(row + "\n")
            continue
        if kind == "keep":
            writer.writerow(row)
            continue
        cells = list(row)
        for axis, col in enumerate(table._columns):
            cells[col] = _fmt(native[i, axis])
        writer.writerow(cells)
        i += 1
    return out.getvalue()


def write_point_table(table: PointTable, points: np.ndarray, path: str | os.PathLike) -> Path:
    """Write `table`'s file with new LPS `points`, in its own format and coordinate system.

    Raises:
        ConfigError: the output extension is another format than the input's.
    """
    target = Path(path)
    if point_format(target) != table.format:
        raise ConfigError(f"output {str(target)!r} is not a {table.format} file like the input "
                          f"{str(table.path)!r}; give the output the input's extension")
    text = render_point_table(table, points)
    with atomic_write(target) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    return target

"""Tiny image files and manifests for the batch tests (built in code, written to tmp_path)."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import SimpleITK as sitk

#: A fast pair setting: translation, a few iterations at two levels.
FAST_SETS = {"set.stages.0.iterations": "15"}


def blob(shape=(32, 32), shift=(0.0, 0.0), remap=False, seed=0) -> sitk.Image:
    """A smooth 2D phantom; `shift` moves the content by +shift mm, `remap` changes contrast."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[: shape[0], : shape[1]].astype(np.float64)
    x, y = x - shift[0], y - shift[1]
    img = np.zeros(shape)
    centres = [(16, 16, 7, 1.0), (11, 19, 3, 0.4), (21, 12, 3, 0.7)]
    for cx, cy, r, v in centres:
        img += v * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r**2))
    img += 0.01 * rng.standard_normal(shape)
    if remap:
        img = np.exp(-2.5 * img)
    return sitk.GetImageFromArray(img.astype(np.float32))


def write_pairs(folder: Path, n: int, shift=(2.0, -1.0)) -> list[dict]:
    """`n` pairs of files in `folder`; returns manifest rows (relative paths)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        sitk.WriteImage(blob(seed=i), str(folder / f"f{i}.nii.gz"))
        sitk.WriteImage(blob(shift=shift, remap=True, seed=100 + i), str(folder / f"m{i}.nii.gz"))
        rows.append({"id": f"s{i}", "fixed": f"f{i}.nii.gz", "moving": f"m{i}.nii.gz"})
    return rows


def write_manifest(path: Path, rows: list[dict]) -> Path:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow(row)
    return path

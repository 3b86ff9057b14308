"""Intensity ranges of a level's images for metrics that scale intensities (computed on a
regular subsample, once per level and metric setting)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from itreg.engine.pyramid import Level

#: Intensity ranges are computed on a regular subsample of at most about this many voxels.
RANGE_VOXELS = 1 << 18


def _subsample(data: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Every k-th voxel along each axis so that about :data:`RANGE_VOXELS` remain."""
    spatial = data.shape[1:]
    k = math.ceil((math.prod(spatial) / RANGE_VOXELS) ** (1.0 / len(spatial)))
    if k <= 1:
        return data, mask
    index = (slice(None, None, k),) * len(spatial)
    return data[(slice(None), *index)], (mask[index] if mask is not None else None)


def _range(metric, data: Tensor, mask: Tensor | None, cache: dict) -> Any:
    key = (id(data), id(mask), getattr(metric, "intensity", None),
           tuple(getattr(metric, "percentiles", ()) or ()))
    if key not in cache:
        values, sub_mask = _subsample(data, mask)
        if sub_mask is not None and not bool(sub_mask.any()):
            values, sub_mask = data, mask
        cache[key] = metric.intensity_range(values, sub_mask)
    return cache[key]


def level_ranges(metric, level: Level, cache: dict) -> tuple[Any, Any]:
    """Fixed and moving intensity ranges of a level (once per level and metric setting), or
    (None, None) for metrics without intensity scaling."""
    if not getattr(metric, "uses_intensity_range", False):
        return None, None
    fixed_range = _range(metric, level.fixed.data, level.fixed_mask, cache)
    mmask = None
    if level.moving_mask is not None:
        key = ("moving-mask", id(level.moving))
        if key not in cache:
            from itreg.warp import resample

            with torch.no_grad():
                m = resample(level.moving_mask, None, level.moving.grid, mode="nearest")
            cache[key] = m.data[0] > 0.5
        mmask = cache[key]
    moving_range = _range(metric, level.moving.data, mmask, cache)
    return fixed_range, moving_range


__all__ = ["RANGE_VOXELS", "level_ranges"]

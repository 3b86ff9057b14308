"""Intensity ranges and scaling for the metrics: a named, recorded setting, never a hidden clamp.

A histogram metric maps intensities to bins through an intensity range ``(lo, hi)``. Where the
range comes from is the metric's ``intensity`` setting (recorded in its :meth:`config`):

- ``"percentile"`` (default): ``robust_range(values, mask, percentiles)``, by default the 0.5th
  and 99.5th percentiles of the voxels inside the mask. Values outside the range are clamped
  to its ends (they fall in the first/last interior bin) and get no gradient.
- ``"minmax"``: the minimum and maximum inside the mask (what ITK's Mattes and joint-histogram
  metrics use); nothing is clamped.
- ``"none"``: no scaling: the intensities are taken as already normalised to ``[0, 1]``, the
  range is ``(0, 1)``; values outside are clamped to it.

An explicit ``fixed_range`` / ``moving_range`` passed to a metric call always wins. The engine
computes the ranges once per pyramid level with :func:`intensity_range` so that the objective
does not change while optimising.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from itreg.errors import ConfigError, InvalidImageError, MaskError

logger = logging.getLogger(__name__)

INTENSITY_MODES = ("percentile", "minmax", "none")
"""Names of the intensity-range settings."""

DEFAULT_PERCENTILES = (0.5, 99.5)
"""Default robust range, in percent."""

__all__ = [
    "DEFAULT_PERCENTILES",
    "INTENSITY_MODES",
    "check_intensity",
    "intensity_range",
    "rescale",
    "robust_range",
]


def check_intensity(
    mode: str, percentiles: Sequence[float] = DEFAULT_PERCENTILES
) -> tuple[float, float]:
    """Validate an intensity setting; return the percentiles as a float pair.

    Raises:
        ConfigError: unknown ``mode`` or percentiles not ``0 <= lo < hi <= 100``.
    """
    if mode not in INTENSITY_MODES:
        raise ConfigError(
            f"unknown intensity scaling {mode!r}; valid settings are: {', '.join(INTENSITY_MODES)}"
        )
    try:
        lo, hi = (float(p) for p in percentiles)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"percentiles must be a pair of numbers, got {percentiles!r}") from exc
    if not (0.0 <= lo < hi <= 100.0):
        raise ConfigError(f"percentiles must satisfy 0 <= lo < hi <= 100, got {percentiles!r}")
    return lo, hi


def _selected_values(values: Tensor, mask: Tensor | None) -> Tensor:
    v = values.detach()
    if mask is not None:
        m = mask.detach()
        if m.shape != v.shape:
            if m.dim() > v.dim() or tuple(m.shape) != tuple(v.shape[v.dim() - m.dim() :]):
                raise MaskError(
                    f"mask of shape {tuple(m.shape)} does not match values of shape {tuple(v.shape)}"
                )
            m = m.expand_as(v)
        v = v[m > 0] if m.dtype != torch.bool else v[m]
        if v.numel() == 0:
            raise MaskError("the mask selects no voxels")
    v = v.reshape(-1)
    if not v.is_floating_point() or v.dtype in (torch.float16, torch.bfloat16):
        v = v.to(torch.float32)
    finite = torch.isfinite(v)
    if not bool(finite.all()):
        v = v[finite]
        if v.numel() == 0:
            raise InvalidImageError("no finite intensities to compute a range from")
    return v


def robust_range(
    values: Tensor,
    mask: Tensor | None = None,
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
    max_samples: int = 1 << 20,
) -> tuple[float, float]:
    """Percentile intensity range of the voxels inside a mask (detached, deterministic).

    Args:
        values: intensities, any shape (for instance an image ``(C, *S)``).
        mask: optional mask of the same shape as ``values`` or of its trailing (spatial)
            shape; bool, or float weights of which the positive ones select voxels.
        percentiles: ``(lo, hi)`` in percent; ``(0, 100)`` gives the exact min and max.
        max_samples: above this many selected values the percentiles are computed on a strided
            subsample (every ``ceil(n / max_samples)``-th value), which is deterministic.

    Returns:
        ``(lo, hi)`` as Python floats. If the percentiles coincide (an image that is mostly one
        value), the range falls back to the min and max of the selection, with a logged warning.
        Non-finite values are ignored.

    Raises:
        MaskError: the mask selects nothing or has the wrong shape.
        InvalidImageError: the selected values are constant or none is finite.
    """
    p_lo, p_hi = check_intensity("percentile", percentiles)
    v = _selected_values(values, mask)
    if p_lo == 0.0 and p_hi == 100.0:
        lo, hi = float(v.min()), float(v.max())
    else:
        n = v.numel()
        if n > max_samples:
            v = v[:: math.ceil(n / max_samples)]
        q = torch.tensor([p_lo / 100.0, p_hi / 100.0], dtype=v.dtype, device=v.device)
        lo, hi = (float(x) for x in torch.quantile(v, q))
        if not hi > lo:
            lo, hi = float(v.min()), float(v.max())
            if hi > lo:
                logger.warning(
                    "percentiles %s of the intensities coincide; using the min/max range (%g, %g)",
                    tuple(percentiles),
                    lo,
                    hi,
                )
    if not hi > lo:
        raise InvalidImageError(f"the intensities are constant ({lo}); no intensity range")
    return lo, hi


def intensity_range(
    values: Tensor,
    mask: Tensor | None = None,
    mode: str = "percentile",
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
) -> tuple[float, float]:
    """The intensity range that the setting ``mode`` gives for these values.

    ``"percentile"``: :func:`robust_range` with ``percentiles``; ``"minmax"``: min and max inside
    the mask; ``"none"``: ``(0.0, 1.0)``. See the module docstring.
    """
    check_intensity(mode, percentiles)
    if mode == "none":
        return 0.0, 1.0
    if mode == "minmax":
        return robust_range(values, mask, (0.0, 100.0))
    return robust_range(values, mask, percentiles)


def rescale(values: Tensor, lo: float, hi: float, clamp: bool = True) -> Tensor:
    """Map ``[lo, hi]`` linearly to ``[0, 1]``; with ``clamp``, clamp the result to ``[0, 1]``.

    Raises:
        InvalidImageError: ``hi <= lo``.
    """
    lo, hi = float(lo), float(hi)
    if not hi > lo:
        raise InvalidImageError(f"intensity range ({lo}, {hi}) is empty")
    out = (values - lo) / (hi - lo)
    return out.clamp(0.0, 1.0) if clamp else out

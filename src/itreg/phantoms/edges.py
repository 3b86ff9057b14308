"""Canny edge maps (paper 000, experiment 3: edges of the T1 registered to T2 intensities).

Paper 000 does not give its Canny parameters; ours, with scipy.ndimage only (2D and 3D, one
code path, anisotropic spacing in mm):

1. Gaussian smoothing with ``sigma_mm`` (per axis ``sigma_mm / spacing`` voxels).
2. Gradient by central differences in world mm (``numpy.gradient`` with the spacing).
3. Non-maximum suppression: a voxel is kept when its gradient magnitude is at least the
   (linearly interpolated) magnitude one step of ``min(spacing)`` mm away on either side along
   the gradient direction.
4. Hysteresis: ``high`` and ``low`` are fractions of the largest gradient magnitude; suppressed
   voxels above ``low`` form candidate edges (connected with the full ``3^D - 1``
   neighbourhood, via ``scipy.ndimage.label``), and a component is kept when it holds at
   least one voxel above ``high``.

Defaults: ``sigma_mm = 1``, ``low = 0.1``, ``high = 0.2`` (skimage's relative defaults are
similar). The map is a uint8 label image (1 = edge).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from scipy import ndimage

from itreg.errors import ConfigError
from itreg.image import Image


def canny(
    image: Image,
    sigma_mm: float = 1.0,
    low: float = 0.1,
    high: float = 0.2,
    mask: Image | None = None,
) -> Image:
    """Canny edge map of a scalar image (see the module docstring for the steps).

    Args:
        image: scalar image ``(1, *S)``, 2D or 3D.
        sigma_mm: Gaussian smoothing sigma in mm (0: none).
        low: low hysteresis threshold, a fraction of the largest gradient magnitude.
        high: high hysteresis threshold, a fraction of the largest gradient magnitude
            (``0 <= low <= high <= 1``).
        mask: optional mask on the image's grid: edges outside it are removed.

    Returns:
        A uint8 label image (1 on edges) on the image's grid and device.

    Raises:
        ConfigError: invalid thresholds or sigma, or a multi-channel image.
    """
    if image.channels != 1:
        raise ConfigError(f"canny needs a scalar image, got {image.channels} channels")
    if not (0.0 <= low <= high <= 1.0):
        raise ConfigError(f"need 0 <= low <= high <= 1, got low={low}, high={high}")
    if not (sigma_mm >= 0 and np.isfinite(sigma_mm)):
        raise ConfigError(f"sigma_mm must be finite and >= 0, got {sigma_mm}")
    spacing = np.asarray(image.grid.spacing, dtype=np.float64)[::-1]  # tensor order
    data = image.data[0].detach().to(torch.float64).cpu().numpy()
    if sigma_mm > 0:
        data = ndimage.gaussian_filter(data, sigma=sigma_mm / spacing, mode="nearest")
    grads = np.gradient(data, *spacing)
    grads = grads if isinstance(grads, (list, tuple)) else [grads]
    mag = np.sqrt(sum(g * g for g in grads))
    peak = float(mag.max())
    out = np.zeros(data.shape, dtype=np.uint8)
    if peak > 0:
        step = float(spacing.min())
        safe = np.where(mag > 0, mag, 1.0)
        coords = np.indices(data.shape, dtype=np.float64)
        # One step of `step` mm along the unit gradient, in voxel units per tensor axis.
        offset = np.stack([g / safe * step / s for g, s in zip(grads, spacing)])
        ahead = ndimage.map_coordinates(mag, coords + offset, order=1, mode="nearest")
        behind = ndimage.map_coordinates(mag, coords - offset, order=1, mode="nearest")
        thin = (mag > 0) & (mag >= ahead) & (mag >= behind)
        weak = thin & (mag >= low * peak)
        strong = thin & (mag >= high * peak)
        lab, count = ndimage.label(weak, structure=np.ones((3,) * data.ndim, dtype=bool))
        if count:
            keep = np.zeros(count + 1, dtype=bool)
            keep[np.unique(lab[strong])] = True
            keep[0] = False
            out = keep[lab].astype(np.uint8)
    result = torch.from_numpy(out)[None].to(image.device)
    if mask is not None:
        result = result * (mask.data.to(result.device) != 0).to(torch.uint8)
    return Image(result, image.grid, is_label=True)


def t1_edges(tissues: Mapping[str, Image], sigma_mm: float = 1.0, low: float = 0.1,
             high: float = 0.2) -> Image:
    """Canny edges of the template T1 (``tissues["t1"]`` of :func:`load_mni`).

    Args:
        tissues: the maps of :func:`itreg.phantoms.load_mni` (or of :func:`axial_slices`).
        sigma_mm: Gaussian sigma in mm.
        low: low hysteresis threshold (fraction of the largest gradient magnitude).
        high: high hysteresis threshold.

    Returns:
        The uint8 edge map on the T1's grid.
    """
    if "t1" not in tissues:
        raise ConfigError(f"tissue map 't1' missing; have {sorted(tissues)}")
    return canny(tissues["t1"], sigma_mm, low, high)

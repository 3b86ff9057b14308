"""N4 bias-field estimation through SimpleITK (Tustison et al. 2010), for itreg images.

Kept in :mod:`itreg.io`, the only package that imports SimpleITK; the groupwise preprocessing
(:mod:`itreg.groupwise.bias`) calls it.
"""

from __future__ import annotations

import math

import numpy as np
import SimpleITK as sitk
import torch

from itreg.image import Image
from itreg.io.images import from_sitk, to_sitk

#: Voxels above which N4 fits on a shrunk image (the field is still evaluated at full size).
N4_MAX_VOXELS = 2 ** 18

__all__ = ["N4_MAX_VOXELS", "n4_log_field"]


def n4_log_field(image: Image, mask: Image | None, levels: int, iterations: int,
                 max_voxels: int | None = None) -> torch.Tensor:
    """The log of N4's multiplicative bias field of a positive single-channel image.

    Args:
        image: one channel, intensities >= 0 (N4 works on log intensities inside the mask).
        mask: foreground to fit in (nonzero inside, on the image's grid); None: Otsu threshold
            (200 bins), or the whole image if that is empty.
        levels: B-spline fitting levels (the mesh starts with one span per axis, cubic, and is
            refined once per level).
        iterations: iterations per level.
        max_voxels: fit on the image shrunk by an integer factor to at most about this many
            voxels (None: :data:`N4_MAX_VOXELS`).

    Returns:
        ``(1, *grid.shape)`` float64 CPU tensor ``log b`` (image = b * corrected).
    """
    full = sitk.Cast(to_sitk(image.with_data(image.data.detach().to(torch.float64).cpu())),
                     sitk.sitkFloat64)
    if mask is not None:
        fg = sitk.Cast(to_sitk(mask.with_data((mask.data != 0).to(torch.uint8).cpu())),
                       sitk.sitkUInt8)
    else:
        fg = sitk.OtsuThreshold(full, 0, 1, 200)
    if int(np.count_nonzero(sitk.GetArrayViewFromImage(fg))) == 0:
        fg = sitk.Cast(full * 0 + 1, sitk.sitkUInt8)
    limit = N4_MAX_VOXELS if max_voxels is None else int(max_voxels)
    shrink = max(1, math.ceil((image.grid.numel / limit) ** (1.0 / image.ndim)))
    small, small_fg = full, fg
    if shrink > 1:
        small = sitk.Shrink(full, [shrink] * image.ndim)
        small_fg = sitk.Shrink(fg, [shrink] * image.ndim)
    n4 = sitk.N4BiasFieldCorrectionImageFilter()
    n4.SetMaximumNumberOfIterations([int(iterations)] * int(levels))
    n4.Execute(small, small_fg)
    return from_sitk(n4.GetLogBiasFieldAsImage(full), dtype=torch.float64).data

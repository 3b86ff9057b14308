"""Optional intensity-nonuniformity (bias field) correction of a group before registration.

MR images carry a smooth multiplicative bias field. Groupwise metrics that model the joint
intensity distribution with a few classes (X-metric, GMM, CTE) see a bias as large as a tissue
contrast as extra structure: on 2D BrainWeb-style groups with a 0.9-1.1 field (the PD-like
slice has about 10 % grey/white contrast) X-CoReg's mean gWI over 10 groups was 0.72 mm with
the field and 0.54 mm without it (benchmarks/results/2026-11-22-groupwise-2d-bias.md). As in
ANTs and elastix pipelines, the field can be removed first by N4 (Tustison et al. 2010,
SimpleITK's ``N4BiasFieldCorrectionImageFilter``), image by image.

``"n4"``: each image is shifted to a minimum of 0 (N4 works on positive log intensities; a
z-scored image is negative in the background), corrected inside its Otsu foreground (the
usual N4 mask when no brain mask is given), and shifted back, so the background keeps its
level. The B-spline mesh starts with one span per axis (4 control points, cubic) and is
refined `levels` times; the field is estimated on an image shrunk to about ``2**18`` voxels
and evaluated at full resolution. :func:`n4_correct` and the SimpleITK call live in
:mod:`itreg.io.n4` (shared with the pairwise ``register(..., bias_correction="n4")``).
"""

from __future__ import annotations

from itreg.errors import unknown_name
from itreg.image import Image
from itreg.io.n4 import BIAS_CORRECTIONS, n4_correct

__all__ = ["BIAS_CORRECTIONS", "correct_bias_fields", "n4_correct"]


def correct_bias_fields(images: list[Image], method: str, levels: int = 3) -> list[Image]:
    """Apply the bias correction `method` (:data:`BIAS_CORRECTIONS`) to every image.

    Raises:
        ConfigError: unknown method.
    """
    if method not in BIAS_CORRECTIONS:
        raise unknown_name("bias correction", method, BIAS_CORRECTIONS)
    if method == "none":
        return list(images)
    return [n4_correct(img, levels=levels)[0] for img in images]

"""Groups of N misaligned images of mixed contrasts (paper 002's BrainWeb protocol).

Each image ``j`` shows the template anatomy in contrast ``contrasts[j % len(contrasts)]``
through its own random misalignment ``T_j`` (common space -> image ``j``): it is built exactly
as a :func:`~itreg.phantoms.pair_from_tissues` moving image, so
``image_j(T_j(x)) = contrast_j(x)`` for every common-space point ``x`` (up to the numerical
inverse's residual for FFDs, reported per image). All images share one grid: the common grid
padded by ``pad_mm`` on every side. Paper 002 registers the middle axial slice (``ndim=2``),
z-scored per image; its BrainWeb FFD magnitudes are not published, so the FFD defaults are
paper 003's (20 mm spacing, 6 mm sigma).

Paper 002's measures take the *initial misalignments* ``phi_dag_j``, image ``j`` -> common
space: they are :attr:`PhantomGroup.misalignments` (``T_j^-1``), ready for
:func:`itreg.evaluate.groupwise_warping_index`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from itreg.errors import ConfigError, GeometryError, unknown_name
from itreg.grid import Grid
from itreg.image import Image
from itreg.phantoms.contrasts import CONTRAST_NAMES, labels
from itreg.phantoms.deform import InverseReport
from itreg.phantoms.mni import load_mni
from itreg.phantoms.pairs import PAIR_KINDS, pair_from_tissues
from itreg.phantoms.slices import axial_slices
from itreg.transforms import Transform


@dataclass(frozen=True, eq=False)
class PhantomGroup:
    """N misaligned images with their ground truth.

    Attributes:
        images: ``N`` float32 images on one grid (z-scored when asked).
        labels: ``N`` tissue label maps (0 background, 1 CSF, 2 GM, 3 WM) on that grid.
        masks: ``N`` brain masks (uint8) on that grid.
        transforms: ``T_j``, common space -> image ``j`` (Affine or BSpline).
        misalignments: ``T_j^-1``, image ``j`` -> common space (paper 002's ``phi_dag_j``).
        contrasts: contrast name of each image.
        common_labels: labels of the anatomy in common space (on the common grid).
        common_mask: brain mask in common space (paper 002's foreground ``F``).
        inverse_reports: accuracy of each numerical inverse (FFD), else ``None``.
    """

    images: list[Image]
    labels: list[Image]
    masks: list[Image]
    transforms: list[Transform]
    misalignments: list[Transform]
    contrasts: tuple[str, ...]
    common_labels: Image
    common_mask: Image
    inverse_reports: list[InverseReport | None]

    @property
    def grid(self) -> Grid:
        """The grid of the N images."""
        return self.images[0].grid

    @property
    def common_grid(self) -> Grid:
        """The common-space grid (the template's)."""
        return self.common_mask.grid


def zscore(image: Image) -> Image:
    """``(image - mean) / std`` over all voxels (paper 002's per-image normalisation)."""
    data = image.data.to(torch.float32)
    std = data.std()
    if not float(std) > 0:
        from itreg.errors import InvalidImageError

        raise InvalidImageError("cannot z-score a constant image")
    return image.with_data((data - data.mean()) / std, is_label=False)


def group_from_tissues(
    tissues,
    n: int = 3,
    contrasts: Sequence[str] = ("t1", "t2", "pd"),
    kind: str = "ffd",
    zscore_images: bool = True,
    seed: int = 0,
    pad_mm: float = 20.0,
    noise_sigma: float = 0.02,
    bias: tuple[float, float] | float | None = (0.80, 1.17),
    control_spacing_mm: float = 20.0,
    sigma_mm: float = 6.0,
) -> PhantomGroup:
    """Build a group from tissue maps (2D or 3D, one code path); see :func:`brain_group`."""
    if int(n) < 2:
        raise ConfigError(f"a group needs n >= 2 images, got {n}")
    contrasts = tuple(contrasts)
    if not contrasts:
        raise ConfigError("contrasts must name at least one contrast")
    for c in contrasts:
        if c not in CONTRAST_NAMES:
            raise unknown_name("contrast", c, CONTRAST_NAMES)
    if kind not in PAIR_KINDS:
        raise unknown_name("misalignment kind", kind, PAIR_KINDS)
    seeds = torch.randint(0, 2**31 - 1, (int(n),),
                          generator=torch.Generator().manual_seed(int(seed))).tolist()
    images, labs, masks, fwd, inv, reports, names = [], [], [], [], [], [], []
    for j in range(int(n)):
        contrast = contrasts[j % len(contrasts)]
        pair = pair_from_tissues(tissues, contrast, kind, seeds[j], pad_mm, noise_sigma, bias,
                                 control_spacing_mm, sigma_mm)
        image = zscore(pair.moving) if zscore_images else pair.moving
        images.append(image)
        labs.append(pair.moving_labels)
        masks.append(pair.moving_mask)
        fwd.append(pair.true_transform)
        inv.append(pair.inverse_transform)
        reports.append(pair.inverse_report)
        names.append(contrast)
    return PhantomGroup(images, labs, masks, fwd, inv, tuple(names), labels(tissues),
                        tissues["mask"], reports)


def brain_group(
    n: int = 3,
    contrasts: Sequence[str] = ("t1", "t2", "pd"),
    kind: str = "ffd",
    ndim: int = 2,
    spacing_mm: float | None = 1.0,
    zscore: bool = True,
    seed: int = 0,
    slice_index: int | None = None,
    pad_mm: float = 20.0,
    noise_sigma: float = 0.02,
    bias: tuple[float, float] | float | None = (0.80, 1.17),
    control_spacing_mm: float = 20.0,
    sigma_mm: float = 6.0,
    device: torch.device | str | None = None,
) -> PhantomGroup:
    """N images of the MNI anatomy in mixed contrasts, each with its own misalignment.

    Args:
        n: number of images (>= 2).
        contrasts: contrasts cycled over the images (``"t1"``, ``"t2"``, ``"pd"``).
        kind: ``"ffd"`` (random B-spline FFD), ``"rigid"``, ``"affine"`` or ``"anchor"``.
        ndim: 2 (the middle axial slice, paper 002's protocol) or 3.
        spacing_mm: isotropic spacing (see :func:`load_mni`).
        zscore: z-score each image (paper 002).
        seed: seed of every image's misalignment, bias and noise (one sub-seed per image).
        slice_index: axial slice for ``ndim=2`` (``None``: the middle one).
        pad_mm: margin (mm) around the common grid that makes the images' grid.
        noise_sigma: Rician noise sigma (before z-scoring).
        bias: bias-field range, or ``None``.
        control_spacing_mm: FFD control spacing in mm.
        sigma_mm: FFD coefficient standard deviation in mm.
        device: device of the images and transforms.

    Returns:
        The :class:`PhantomGroup`.

    Raises:
        ConfigError: bad n, contrast or kind.
        GeometryError: ndim not 2 or 3.
    """
    if ndim not in (2, 3):
        raise GeometryError(f"brain groups are 2D or 3D, got ndim={ndim}")
    tissues = load_mni(spacing_mm, device=device)
    if ndim == 2:
        tissues = axial_slices(tissues, slice_index)
    return group_from_tissues(tissues, n, contrasts, kind, zscore, seed, pad_mm, noise_sigma,
                              bias, control_spacing_mm, sigma_mm)

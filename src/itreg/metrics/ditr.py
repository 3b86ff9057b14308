"""The DITR metric (paper 000, Eq. 11): minus the sum of classifier logits over patch pairs.

With a classifier ``f(u, v)`` trained to tell registered patch pairs (z=1) from independent ones
(z=0), ``ln p(u, v | z=1) = ln p(u, v | z=0) + f(u, v) + C`` (Eq. 10), and registration
maximises ``sum_i f(u_i, beta v_i)`` over corresponding patches (Eq. 11; the z=0 term is taken
as constant in ``beta``). As an itreg metric the loss is ``-sum_i f(u_i, v_i)`` (or the mean,
``reduction="mean"``; the paper's Eq. 11 is the sum, the default).

Patch layout (``notes/methods.md`` section 1, our choice): centres on a regular grid with a
stride of ``stride`` voxels (default 8) over the image, kept where the mask (the engine passes
the fixed foreground intersected with the moving image's extent) is set at the centre and the
fixed patch is not constant (so pure background is skipped). On small images the stride is
reduced until at least ``min_patches`` centres (default 64) fall in the mask: a sum over ten
or so patches is too noisy to register with. Measured on 2D slices at 6 and 3 mm, where stride
8 leaves 10-40 patches: re-registering the IML training pairs with stride 8 made them *worse*
(mean error 3.0 -> 6.7 -> 5.1 mm over the stages), with stride 2 better (3.0 -> 2.6 -> 1.7 mm);
training asks for 256 (:class:`itreg.train.ditr.DITRTrainConfig`). At test time on 3 mm slices,
600 instead of 40 patches did not change the error (0.94 vs 0.88 mm), so the default stays
cheap. In 3D at 1-2 mm, stride 8 already gives thousands of patches and is kept. The moving image is the warped
moving image on the fixed grid (``requires_spatial``): the engine resamples it through the
transform, and the patches are cropped at the same centres from both. Outside the image, patches
are padded with 0 (the background of intensities scaled to ``[0, 1]``).

Intensities are scaled to ``[0, 1]`` exactly as in training
(:func:`itreg.metrics.frozen.scale_intensity`, min-max by default; paper 000: "intensity scaled
to [0, 1]"), from the ranges the engine passes once per level, or from the images themselves.

The classifier was trained at one voxel spacing (``spacing_mm`` in the model file): register
images at that spacing, with a single pyramid level (``shrink=[1]``), for example with
:func:`ditr_overrides`. The network is frozen and in eval mode; gradients flow to the moving
image, so gradient optimisers work too, but the paper (and the default here) uses Powell.

Example:
    >>> import itreg                                                     # doctest: +SKIP
    >>> res = itreg.register(fixed, moving, "rigid", metric="ditr:model.pt",
    ...                      overrides=ditr_overrides("model.pt"))       # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
from typing import Any

import torch
from torch import Tensor

from itreg.blocks.ditr import MODEL_KIND, DITRNet, extract_patches
from itreg.blocks.modelfile import load_model
from itreg.errors import ConfigError
from itreg.metrics.base import Range
from itreg.metrics.frozen import FrozenNetworkMetric
from itreg.metrics.registry import register_metric

logger = logging.getLogger(__name__)

__all__ = ["REDUCTIONS", "DITRMetric", "ditr_metric", "ditr_overrides", "patch_centres"]

#: Ways to combine the patch logits.
REDUCTIONS = ("sum", "mean")


def patch_centres(mask: Tensor, stride: int, fixed: Tensor | None = None,
                  size: int | None = None, min_count: int = 0) -> Tensor:
    """Voxel centres ``(P, D)`` (tensor order) on a regular grid inside a mask.

    The grid has spacing `stride` voxels and is centred in the image; the spacing is reduced
    (down to 1) while fewer than `min_count` grid centres fall in the mask. With `fixed` and `size`,
    centres whose fixed patch is constant (pure background) are dropped. If nothing is left, the
    grid centres inside the mask are used; if the grid misses the mask entirely, the mask voxel
    nearest the mask's centroid is used, so there is always at least one centre.

    Args:
        mask: ``(*S)`` bool (or weights; positive selects).
        stride: grid spacing in voxels (>= 1).
        fixed: optional fixed image ``(C, *S)`` for the background test.
        size: patch edge length for the background test.
        min_count: the least number of grid centres wanted inside the mask.
    """
    sel = mask if mask.dtype == torch.bool else mask > 0
    for s in range(int(stride), 0, -1):
        axes = [torch.arange(((n - 1) % s) // 2, n, s, device=sel.device) for n in sel.shape]
        grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, sel.dim())
        centres = grid[sel[tuple(grid.unbind(-1))]]
        if centres.shape[0] >= min_count:
            break
    if centres.shape[0] and fixed is not None and size is not None:
        with torch.no_grad():
            patches = extract_patches(fixed.detach(), centres, size)
            flat = patches.flatten(1)
            span = flat.max(dim=1).values - flat.min(dim=1).values
        keep = span > 1e-6
        if bool(keep.any()):
            centres = centres[keep]
    if centres.shape[0] == 0:
        idx = torch.nonzero(sel, as_tuple=False)
        if idx.shape[0] == 0:
            idx = torch.nonzero(torch.ones_like(sel), as_tuple=False)
        mean = idx.double().mean(0, keepdim=True)
        centres = idx[((idx.double() - mean) ** 2).sum(-1).argmin()][None]
    return centres


class DITRMetric(FrozenNetworkMetric):
    """DITR similarity: ``-sum_i f(u_i, v_i)`` over patch pairs (paper 000, Eq. 11).

    Args:
        network: the trained :class:`~itreg.blocks.ditr.DITRNet` (frozen and put in eval mode).
        stride: patch-centre grid spacing in voxels (the largest one used).
        min_patches: reduce the stride (down to 1) until at least this many centres fall in
            the mask (0: always `stride`).
        reduction: ``"sum"`` (Eq. 11) or ``"mean"`` of the logits over patches.
        batch_size: patches per forward pass (memory bound, not a result-changing setting).
        intensity: intensity scaling to ``[0, 1]``: ``"minmax"`` (default, as in training),
            ``"percentile"`` or ``"none"``.
        source: the model file it came from (for reports).

    Shapes:
        ``forward(fixed, moving, mask)``: ``fixed``, ``moving`` ``(1, *S)`` (2D or 3D, the
        dimension of the network), ``mask (*S)``; returns a 0-d loss.
    """

    name = "ditr"
    requires_spatial = True
    quantity_name = "sum of DITR logits"
    quantity_sign = -1.0
    uses_intensity_range = True
    network_type = DITRNet
    model_kind = MODEL_KIND

    def __init__(self, network: DITRNet, stride: int = 8, reduction: str = "sum",
                 batch_size: int = 4096, intensity: str = "minmax",
                 source: str | None = None, min_patches: int = 64) -> None:
        super().__init__(network, intensity=intensity)
        if isinstance(stride, bool) or int(stride) != stride or int(stride) < 1:
            raise ConfigError(f"stride must be an integer >= 1, got {stride!r}")
        if reduction not in REDUCTIONS:
            raise ConfigError(f"unknown reduction {reduction!r}; valid: {', '.join(REDUCTIONS)}")
        if isinstance(min_patches, bool) or int(min_patches) != min_patches or min_patches < 0:
            raise ConfigError(f"min_patches must be an integer >= 0, got {min_patches!r}")
        if int(batch_size) < 1:
            raise ConfigError(f"batch_size must be >= 1, got {batch_size!r}")
        self.stride = int(stride)
        self.min_patches = int(min_patches)
        self.reduction = reduction
        self.batch_size = int(batch_size)
        if reduction == "mean":
            self.quantity_name = "mean DITR logit"
        self.settings = {"model": source, "stride": self.stride,
                         "min_patches": self.min_patches, "reduction": reduction,
                         "spacing_mm": network.spacing_mm, "patch_size": network.patch_size}

    def logits(self, fixed: Tensor, moving: Tensor, mask: Tensor | None = None,
               fixed_range: Range = None, moving_range: Range = None) -> Tensor:
        """The logits ``f(u_i, v_i)`` ``(P,)`` of the patch pairs the loss sums.

        Args: as :meth:`forward`.
        """
        if fixed.shape[0] != 1:
            raise ConfigError(f"DITR works on single-channel images, got {fixed.shape[0]} "
                              "channels")
        if fixed.dim() - 1 != self.network.ndim:
            raise ConfigError(f"this DITR model is {self.network.ndim}D but the images are "
                              f"{fixed.dim() - 1}D")
        sel = mask if mask is not None else torch.ones(fixed.shape[1:], dtype=torch.bool,
                                                       device=fixed.device)
        sel_b = sel if sel.dtype == torch.bool else sel > 0
        u, v = self.scaled_pair(fixed, moving, fixed_range, moving_range)
        size = self.network.patch_size
        centres = patch_centres(sel_b, self.stride, u, size, self.min_patches)
        param = self.network_on(fixed.device)
        out = []
        for start in range(0, centres.shape[0], self.batch_size):
            c = centres[start:start + self.batch_size]
            pairs = torch.cat([extract_patches(u, c, size), extract_patches(v, c, size)], dim=1)
            out.append(self.network(pairs.to(param.dtype)).to(fixed.dtype))
        return torch.cat(out)

    def loss(self, fixed: Tensor, moving: Tensor, mask: Tensor | None, fixed_range: Range,
             moving_range: Range) -> Tensor:
        f = self.logits(fixed, moving, mask, fixed_range, moving_range)
        total = f.sum() if self.reduction == "sum" else f.mean()
        return -total


def ditr_metric(path: str | os.PathLike, stride: int = 8, reduction: str = "sum",
                batch_size: int = 4096, intensity: str = "minmax",
                min_patches: int = 64) -> DITRMetric:
    """Registry factory of ``"ditr:model.pt"``: :meth:`DITRMetric.from_file`."""
    return DITRMetric.from_file(path, stride=stride, reduction=reduction, batch_size=batch_size,
                                intensity=intensity, min_patches=min_patches)


def ditr_overrides(path: str | os.PathLike, optimizer: str = "powell",
                   iterations: int = 30) -> dict[str, Any]:
    """Engine overrides for registering with a DITR model: Powell, one level, no smoothing.

    The classifier only knows patches at its training spacing, so the pyramid has one level
    (``shrink=[1]``, ``smoothing_mm=[0]``); give the images at the model's ``spacing_mm``
    (stored in the model file, see :func:`itreg.nets.load_model`).

    Args:
        path: the DITR model file (read to check it).
        optimizer: the engine optimiser (paper 000: Powell).
        iterations: maximum optimiser iterations (Powell: sweeps over all directions).

    Returns:
        A dict for ``itreg.register(..., overrides=...)``.
    """
    load_model(path, expected_kind=MODEL_KIND)
    return {"optimizer": optimizer, "shrink": [1], "smoothing_mm": [0.0],
            "learning_rate": [1.0], "iterations": [iterations]}


register_metric("ditr", ditr_metric, overwrite=True)

"""Training data of DCC (:func:`itreg.train.dcc.train_dcc`): groups of images with labels
(:class:`DCCGroup`), groups of MNI phantom slices generated on the fly
(:class:`PhantomGroupSource`), and which images of a group are labelled for each strategy
(:func:`labelled_mask`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from itreg.errors import ConfigError, GeometryError
from itreg.grid import Grid

__all__ = ["STRATEGIES", "DCCGroup", "PhantomGroupSource", "labelled_mask"]


#: Training strategies, from unsupervised to fully supervised.
STRATEGIES = ("unsupervised", "weak", "all")


# ------------------------------------------------------------------------------- data
@dataclass(frozen=True, eq=False)
class DCCGroup:
    """One group of N images on one grid, with labels.

    Attributes:
        images: ``(N, 1, *S)`` float intensities (normalised per image).
        labels: ``(N, *S)`` int64 labels ``0..K-1`` (or None for unlabelled data).
        domains: ``(N,)`` int64 domain (modality) index of each image.
        grid: the images' grid (the common grid of the group).
        index: the group's index in its source (seeds the per-group random choices).
    """

    images: Tensor
    labels: Tensor | None
    domains: Tensor
    grid: Grid
    index: int = 0

    @property
    def n(self) -> int:
        return int(self.images.shape[0])


def _sub_seed(*parts: Any) -> int:
    text = "/".join(str(p) for p in parts).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:4], "little") & 0x7FFFFFFF


class PhantomGroupSource:
    """Groups of misaligned T1/T2-like/PD-like phantom images, built on the fly.

    Group ``i`` is :func:`itreg.phantoms.group_from_tissues` of the axial slice
    ``middle + slice_offsets[i % len(slice_offsets)]`` (2D) or of the volume (3D), with its own
    random FFD per image (paper 003's protocol: control spacing and sigma in mm), seeded by
    ``(seed, i)``: the same index always gives the same group. Use disjoint slice offsets (or
    seeds) for training and held-out groups.

    Args:
        n_images: images per group.
        contrasts: contrasts cycled over the images; the domain of an image is the index of its
            contrast in `contrasts`.
        ndim: 2 (axial slices, paper 002's BrainWeb protocol) or 3.
        spacing_mm: isotropic spacing of the template.
        slice_offsets: axial slice offsets from the middle slice (2D).
        control_spacing_mm: FFD control-point spacing.
        sigma_mm: FFD coefficient standard deviation.
        pad_mm: margin of the images' grid around the template's.
        noise_sigma: Rician noise.
        seed: seed of the groups.
        device: device of the tensors.
    """

    def __init__(self, n_images: int = 3, contrasts: Sequence[str] = ("t1", "t2", "pd"),
                 ndim: int = 2, spacing_mm: float = 3.0, slice_offsets: Sequence[int] = (0,),
                 control_spacing_mm: float = 20.0, sigma_mm: float = 6.0, pad_mm: float = 6.0,
                 noise_sigma: float = 0.02, seed: int = 0, device=None) -> None:
        from itreg.phantoms import load_mni

        if int(n_images) < 2:
            raise ConfigError(f"a group needs at least two images, got {n_images}")
        if ndim not in (2, 3):
            raise GeometryError(f"phantom groups are 2D or 3D, got ndim={ndim}")
        if not len(slice_offsets):
            raise ConfigError("slice_offsets must hold at least one offset")
        self.n_images, self.contrasts, self.ndim = int(n_images), tuple(contrasts), int(ndim)
        self.spacing_mm = float(spacing_mm)
        self.slice_offsets = tuple(int(o) for o in slice_offsets)
        self.control_spacing_mm, self.sigma_mm = float(control_spacing_mm), float(sigma_mm)
        self.pad_mm, self.noise_sigma, self.seed = float(pad_mm), float(noise_sigma), int(seed)
        self._tissues = load_mni(self.spacing_mm, device=device)
        if self.ndim == 2:
            depth = self._tissues["t1"].grid.size[2]
            for o in self.slice_offsets:
                if not 0 <= depth // 2 + o < depth:
                    raise ConfigError(f"slice offset {o} is outside the {depth} axial slices")

    def phantom(self, index: int):
        """The :class:`~itreg.phantoms.PhantomGroup` of group `index` (with its ground truth)."""
        from itreg.phantoms import axial_slices, group_from_tissues

        tissues = self._tissues
        if self.ndim == 2:
            depth = tissues["t1"].grid.size[2]
            offset = self.slice_offsets[int(index) % len(self.slice_offsets)]
            tissues = axial_slices(tissues, depth // 2 + offset)
        return group_from_tissues(tissues, self.n_images, self.contrasts, "ffd", True,
                                  _sub_seed(self.seed, int(index)), self.pad_mm,
                                  self.noise_sigma, (0.80, 1.17), self.control_spacing_mm,
                                  self.sigma_mm)

    def __getitem__(self, index: int) -> DCCGroup:
        g = self.phantom(index)
        images = torch.stack([im.data.float() for im in g.images])
        labels = torch.stack([lab.data[0].long() for lab in g.labels])
        domains = torch.tensor([self.contrasts.index(c) for c in g.contrasts], dtype=torch.long)
        return DCCGroup(images, labels, domains.to(images.device), g.grid, int(index))

    def groups(self, indices: Sequence[int]) -> list[DCCGroup]:
        """The groups of `indices`, in order."""
        return [self[i] for i in indices]


def labelled_mask(strategy: str, n: int, labelled_images: Sequence[int] = (0,),
                  label_fraction: float | None = None, group_index: int = 0,
                  seed: int = 0) -> Tensor:
    """Which images of a group are labelled (the index set ``J``), as an ``(n,)`` bool tensor.

    Args:
        strategy: ``"unsupervised"`` (none), ``"weak"`` or ``"all"``.
        n: images in the group.
        labelled_images: the labelled image indices of the ``"weak"`` strategy.
        label_fraction: if given (``"weak"``), label ``max(1, round(fraction * n))`` images
            chosen at random per group (seeded by `seed` and `group_index`) instead.
        group_index: the group's index.
        seed: seed of the random choice.
    """
    if strategy not in STRATEGIES:
        raise ConfigError(f"unknown DCC strategy {strategy!r}; valid: {', '.join(STRATEGIES)}")
    mask = torch.zeros(int(n), dtype=torch.bool)
    if strategy == "all":
        mask[:] = True
    elif strategy == "weak":
        if label_fraction is not None:
            if not 0.0 < float(label_fraction) <= 1.0:
                raise ConfigError(f"label_fraction must be in (0, 1], got {label_fraction}")
            m = max(1, round(float(label_fraction) * n))
            g = torch.Generator().manual_seed(_sub_seed("labels", seed, group_index))
            mask[torch.randperm(n, generator=g)[:m]] = True
        else:
            for j in labelled_images:
                if not 0 <= int(j) < n:
                    raise ConfigError(f"labelled image {j} is not in 0..{n - 1}")
                mask[int(j)] = True
    return mask

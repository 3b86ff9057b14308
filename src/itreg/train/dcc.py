"""Training deep combined computing (DCC, Luo & Zhuang 2022, sec. 3.5) on groups of images.

The network is :class:`itreg.nets.dcc.DCCNet`. For a group ``U_1..U_N`` with labels ``Y_j`` on
the images of an index set ``J`` (the labelled images), one step computes, on the common grid
(the images' grid):

- ``rho_hat_j = softmax(D_s(E(U_j)))`` on image ``j``'s grid and the fields ``d_j`` (zero group
  mean, Eq. 37), ``phi_j(x) = x + d_j(x)``;
- the label model ``rho_j ∝ exp(tau D_jk)`` for ``j in J`` (signed distance maps, Eq. 38);
  ``rho`` and ``rho_hat`` are clipped to ``[zeta, 1 - (K-1) zeta]`` wherever they act as the
  label model of Eq. 38 (posterior, L2), as the paper does;
- the common anatomy ``Z^[2]`` (:func:`itreg.nets.dcc.common_anatomy`: Eq. 39 at ``t = 0``, the
  posterior of Eq. 40, then one EM update with Eq. 20), detached;
- **L1** (Eq. 41) ``= -X(U[phi], Z^[2]) + lambda * N * BE(d)``: the X-metric of
  :func:`itreg.groupwise.xmetric.x_metric` on a Bernoulli sample of the overlap, with each
  image's bins over its own intensity range, and the bending energy of
  :func:`itreg.regularisers.bending_energy` (world mm, mean over voxels and images) times
  ``N``, as the authors' code scales it;
- **L2** (Eqs. 42-44) ``= sum_j mean_{x in overlap} -sum_k gamma_xk log rho_jk(phi_j(x))`` with
  ``rho_j`` for ``j in J`` (gradient through ``phi_j`` only) and ``rho_hat_j`` otherwise
  (gradient through ``phi_j`` and ``rho_hat_j``);
- **L3** (Eqs. 45-46) ``= -sum_j I(U_j, Y_hat_j) + sum_{j not in J} H(Y_hat_j) +
  sum_{j in J} [CE(Y_j, rho_hat_j) + 1 - Dice(Y_j, rho_hat_j)]``.

The total is ``L = w1 L1 + w2 L2 + w3 L3`` (Eq. 47 with unit weights).

**Alternating training** (paper sec. 3.5.3, 4.4): two Adam optimisers, one over the encoder
and the segmentation decoder (``E``, ``D_s``; paper lr 1e-3), one over the fusion and the
registration decoder (``D_r``; paper lr 1e-4), alternate every ``alternate_every`` steps (paper
5), starting with the segmentation branch. A segmentation step computes ``L2 + L3`` with the
fields held fixed; a registration step ``L1 + L2`` with the segmentation held fixed. Only the
segmentation optimiser updates the encoder (``D_r`` sees detached encoder features). Training
runs through :func:`itreg.train.fit` (validation each epoch, best weights kept by validation
registration Dice as in the paper, early stopping, checkpoints, NaN protection, progress bar).

**Strategies** (paper sec. 4.4): ``"unsupervised"`` (DGR, ``J`` empty), ``"weak"`` (labels on
``labelled_images`` of every group, e.g. ``(0,)`` as DCC+BS with ``J = {2}``, or on a seeded
random ``label_fraction`` of each group's images) and ``"all"`` (DCC+All). The test-time
posterior (Eq. 53) multiplies ``rho_hat`` of the images that were labelled in training.

**Ambiguities, and what we chose** (in addition to methods.md section 3, "Ambiguities"):

1. ``H(Y_hat_j)`` in Eq. 45 "encourages the probability vector to be concentrated": we use the
   mean over voxels of the per-voxel entropy ``-sum_k rho_hat log rho_hat`` (the entropy of the
   label marginal would push towards one class).
2. ``I(U_j, Y_hat_j)`` uses the joint table of Eq. 21 with ``rho_hat_j`` as class weights on
   image ``j``'s own voxels (all of them, no sampling), gradient through ``rho_hat_j``.
3. ``L_seg`` (Eq. 46) uses the one-hot labels (the paper; the authors' code uses the distance
   probabilities) and a soft Dice averaged over the K classes.
4. Terms are means over voxels and sums over images, as written; weights ``w1, w2, w3`` default
   to 1. ``lambda`` refers to our bending energy in world mm (1/mm^2), not the code's pixels:
   paper 002's ``lambda = 100`` (pixel units, mean over the flow components) is
   ``100 s^2 / D`` here on a grid of ``s`` mm (:func:`bending_weight_from_pixels`: 800 on the
   4 mm 2D groups of the benchmark, 450 at 3 mm, 50 at 1 mm).
5. The overlap of L1/L2 and of ``Z^[2]`` is the set of common points inside every warped image.

Settings: :meth:`DCCTrainConfig.small` trains 2D groups at 3-4 mm in minutes on two CPU cores
(C = 8, 3 levels, batch 4); :meth:`DCCTrainConfig.full` is the paper's scale (C = 16, L_R = 4,
L = 32, batch 20, lr 1e-3 / 1e-4 alternating every 5 steps, 100 epochs; a GPU: put the groups
on it, the network follows).

Data: :class:`PhantomGroupSource` makes groups on the fly from the phantom builder
(:func:`itreg.phantoms.group_from_tissues`: T1, T2-like, PD-like axial slices, each with its own
random FFD), deterministic per index.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from itreg.blocks.modelfile import save_model
from itreg.errors import ConfigError, GeometryError, OutputExistsError
from itreg.grid import Grid
from itreg.groupwise.base import sample_mask
from itreg.groupwise.em import POSTERIOR_EPS
from itreg.groupwise.xmetric import PADDING, bin_coordinates, x_metric
from itreg.nets.dcc import (
    FLOWS,
    MODEL_KIND,
    NORMS,
    DCCNet,
    clip_probabilities,
    common_anatomy,
    distance_probabilities,
    image_ranges,
    warp_group,
    world_displacements,
)
from itreg.regularisers import bending_energy
from itreg.runtime import limited_threads
from itreg.train import FitCheckpoint, TrainResult, checkpoint_path, fit, make_generator, seeded

logger = logging.getLogger(__name__)

#: Settings that may change when an interrupted training is resumed.
_RESUMABLE = ("epochs", "patience", "threads", "progress")

__all__ = [
    "PAPER_BENDING_WEIGHT",
    "STRATEGIES",
    "DCCGroup",
    "DCCLoss",
    "DCCTrainConfig",
    "DCCTrainingResult",
    "PhantomGroupSource",
    "bending_weight_from_pixels",
    "evaluate_groups",
    "initial_network",
    "labelled_mask",
    "train_dcc",
]

#: Training strategies, from unsupervised to fully supervised.
STRATEGIES = ("unsupervised", "weak", "all")

#: Paper 002's ``lambda`` for DCC on MS-CMR (sec. 4.4), a weight of the authors' bending energy
#: in pixel units (see :func:`bending_weight_from_pixels`).
PAPER_BENDING_WEIGHT = 100.0


def bending_weight_from_pixels(weight_px: float, spacing_mm: float, ndim: int) -> float:
    """itreg's bending weight equal to a weight of the authors' pixel-unit bending energy.

    The authors' code (``core/register/LocalDisplacementEnergy.py``, ``BendingEnergy``) takes
    the dense flow in pixels, second derivatives per pixel (central differences of central
    differences) and ``torch.mean`` over voxels *and* the ``D`` flow components. itreg's
    :func:`~itreg.regularisers.bending_energy` takes the displacement in world mm, derivatives
    per mm, and sums over the components. With an isotropic pixel size ``s`` mm,
    ``d_px = d_mm / s`` and ``d/dp = s d/dx``, so ``BE_px = (s^2 / D) BE_mm`` and the same
    penalty needs ``lambda_mm = lambda_px s^2 / D`` (both are then multiplied by ``N``).

    Paper 002's ``lambda = 100`` per pixel is therefore 800 on 4 mm 2D grids and 50 on 1 mm
    ones: the conversion depends on the grid the network predicts on.

    Args:
        weight_px: the weight of the pixel-unit energy (paper 002: 100).
        spacing_mm: pixel size in mm of the grid the fields live on.
        ndim: ``D``.

    Returns:
        The weight of itreg's world-mm energy (``DCCTrainConfig.bending_weight``).
    """
    if not spacing_mm > 0 or int(ndim) < 1:
        raise ConfigError(f"need spacing_mm > 0 and ndim >= 1, got {spacing_mm}, {ndim}")
    return float(weight_px) * float(spacing_mm) ** 2 / int(ndim)


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


# ------------------------------------------------------------------------------ losses
def _label_dice(a: Tensor, b: Tensor, labels: Sequence[int]) -> float:
    """Mean Dice of two label maps over `labels` present in either (NaN if none)."""
    scores = []
    for k in labels:
        ma, mb = a == k, b == k
        s = int(ma.sum()) + int(mb.sum())
        if s:
            scores.append(2.0 * int((ma & mb).sum()) / s)
    return sum(scores) / len(scores) if scores else math.nan


class DCCLoss:
    """The DCC losses L1, L2, L3 (Eqs. 41-47) of a batch of groups; see the module docstring.

    Args:
        levels: ``L``, intensity levels of the appearance model and the MIs.
        sample_rate: Bernoulli rate of the X-metric's and Eq. 20's samples.
        bending_weight: ``lambda`` (world-mm bending energy, times N). None: paper 002's
            ``lambda = 100`` per pixel converted to the fields' grid,
            ``bending_weight_from_pixels(100, mean spacing, D)`` (:meth:`weight_for`).
        tau: slope of the label model (per mm).
        zeta: probability clip (paper: 0.05 in training).
        weights: ``(w1, w2, w3)``.
        eps: posterior clamp.
    """

    def __init__(self, levels: int = 32, sample_rate: float = 0.1,
                 bending_weight: float | None = None,
                 tau: float = 1.0, zeta: float = 0.05, weights: Sequence[float] = (1.0, 1.0, 1.0),
                 eps: float = POSTERIOR_EPS) -> None:
        if int(levels) < 4:
            raise ConfigError(f"levels must be >= 4, got {levels}")
        if not 0.0 < float(sample_rate) <= 1.0:
            raise ConfigError(f"sample_rate must be in (0, 1], got {sample_rate}")
        if len(weights) != 3:
            raise ConfigError(f"weights must be three numbers (w1, w2, w3), got {weights}")
        self.levels, self.sample_rate = int(levels), float(sample_rate)
        self.bending_weight = None if bending_weight is None else float(bending_weight)
        self.tau, self.zeta = float(tau), float(zeta)
        self.weights = tuple(float(w) for w in weights)
        self.eps = float(eps)
        self.bins = self.levels + 2 * PADDING

    def weight_for(self, grid: Grid) -> float:
        """The bending weight on `grid`: the explicit one, or paper 002's 100 per pixel
        converted by :func:`bending_weight_from_pixels` with the grid's mean spacing."""
        if self.bending_weight is not None:
            return self.bending_weight
        spacing = sum(float(v) for v in grid.spacing) / grid.ndim
        return bending_weight_from_pixels(PAPER_BENDING_WEIGHT, spacing, grid.ndim)

    def __call__(self, net: DCCNet, groups: Sequence[DCCGroup], labelled: Sequence[Tensor],
                 phase: str = "all", generator: torch.Generator | None = None
                 ) -> tuple[Tensor, dict[str, float]]:
        """Total loss of a batch and its terms (means over the groups).

        Args:
            net: the network (its mode, train or eval, is the caller's).
            groups: groups on one grid, with the same number of images.
            labelled: per group, the ``(N,)`` bool index set ``J``; labels of other images are
                never read.
            phase: ``"all"`` (L1 + L2 + L3, every branch gets gradients), ``"seg"`` (L2 + L3,
                fields fixed) or ``"reg"`` (L1 + L2, segmentation fixed).
            generator: CPU generator of the samples.

        Returns:
            ``(loss, terms)``; terms hold ``L1``, ``L2``, ``L3``, ``X`` (nats) and ``BE``.
        """
        if not groups:
            raise ConfigError("a batch needs at least one group")
        grid = groups[0].grid
        n = groups[0].n
        for g in groups:
            if not g.grid.same_as(grid) or g.n != n:
                raise GeometryError("the groups of a batch must share one grid and group size")
        images = torch.stack([g.images for g in groups])
        domains = torch.stack([g.domains for g in groups])
        out = net(images, domains, train=phase)
        probs = out.probabilities
        disp = world_displacements(out.field, grid, net.flow, net.svf_steps)
        k = net.classes
        total = images.new_zeros(())
        sums = {"L1": 0.0, "L2": 0.0, "L3": 0.0, "X": 0.0, "BE": 0.0}
        for b, g in enumerate(groups):
            lab = labelled[b].to(torch.bool).cpu()
            if lab.shape != (n,):
                raise ConfigError(f"labelled mask of group {b} has shape {tuple(lab.shape)}")
            if bool(lab.any()) and g.labels is None:
                raise ConfigError(f"group {g.index} has no labels but images are marked labelled")
            rho = {j: clip_probabilities(distance_probabilities(g.labels[j], grid, k, self.tau),
                                         self.zeta) for j in range(n) if lab[j]}
            rho_hat = probs[b]
            rho_hat_c = clip_probabilities(rho_hat, self.zeta, dim=1)
            label_model = torch.stack([rho[j].to(rho_hat.dtype) if lab[j] else rho_hat_c[j]
                                       for j in range(n)])
            channels = torch.cat([g.images, label_model], dim=1)
            warped, inside = warp_group(channels, disp[b], grid)
            overlap = inside.reshape(n, -1).all(dim=0)
            values = warped[:, 0].reshape(n, -1)
            warped_rho = warped[:, 1:].reshape(n, k, -1)
            own = [g.images[j, 0] for j in range(n)]
            priors = warped_rho[lab].detach() if bool(lab.any()) else None
            gamma, _ = common_anatomy(own, [label_model[j].detach() for j in range(n)],
                                      values.detach(), overlap, priors, self.levels,
                                      self.sample_rate, generator, self.eps)
            # L2 (Eqs. 42-44): -sum_k gamma log rho_j(phi_j(x)), mean over the overlap.
            log_rho = torch.log(warped_rho[:, :, overlap].clamp_min(1e-12))  # (N, K, P)
            l2 = -(gamma.T.unsqueeze(0) * log_rho).sum(dim=1).mean(dim=1).sum()
            loss = self.weights[1] * l2
            sums["L2"] += float(l2.detach())
            ranges = image_ranges(own)
            if phase in ("all", "reg"):
                sample = sample_mask(torch.ones(int(overlap.sum()), dtype=torch.bool),
                                     self.sample_rate, generator).to(values.device)
                coords = bin_coordinates(values[:, overlap][:, sample], None, self.levels,
                                         ranges=ranges)
                x, _ = x_metric(coords, gamma[sample], self.bins)
                be = bending_energy(disp[b], grid) * n
                l1 = -x + self.weight_for(grid) * be
                loss = loss + self.weights[0] * l1
                sums["L1"] += float(l1.detach())
                sums["X"] += float(x.detach())
                sums["BE"] += float(be.detach())
            if phase in ("all", "seg"):
                l3 = self._segmentation_loss(g, lab, rho_hat, ranges)
                loss = loss + self.weights[2] * l3
                sums["L3"] += float(l3.detach())
            total = total + loss
        m = len(groups)
        return total / m, {key: v / m for key, v in sums.items()}

    def _segmentation_loss(self, g: DCCGroup, lab: Tensor, rho_hat: Tensor,
                           ranges: list[tuple[float, float]]) -> Tensor:
        """L3 (Eqs. 45-46) of one group; `rho_hat` is ``(N, K, *S)`` (not clipped)."""
        n, k = rho_hat.shape[:2]
        l3 = rho_hat.new_zeros(())
        for j in range(n):
            p = rho_hat[j].reshape(k, -1)
            coords = bin_coordinates(g.images[j].reshape(1, -1), None, self.levels,
                                     ranges=ranges[j:j + 1])
            mi, _ = x_metric(coords, p.T, self.bins)
            l3 = l3 - mi
            if lab[j]:
                y = g.labels[j].reshape(-1)
                onehot = F.one_hot(y, k).T.to(p.dtype)
                ce = -(onehot * torch.log(p.clamp_min(1e-8))).sum(dim=0).mean()
                inter = (onehot * p).sum(dim=1)
                dice = (2.0 * inter + 1e-5) / (onehot.sum(dim=1) + p.sum(dim=1) + 1e-5)
                l3 = l3 + ce + 1.0 - dice.mean()
            else:
                l3 = l3 - (p * torch.log(p.clamp_min(1e-12))).sum(dim=0).mean()
        return l3


# ---------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate_groups(net: DCCNet, groups: Sequence[DCCGroup], zeta: float = 0.01,
                    priors: Sequence[int] = (), levels: int = 32, sample_rate: float = 0.1,
                    seed: int = 0) -> dict[str, float]:
    """Registration and segmentation Dice of a network on labelled groups (eval mode).

    - ``reg_dice_before`` / ``reg_dice``: mean over all image pairs of the Dice (classes
      ``1..K-1``) of the labels propagated to the common grid, before (identity) and after
      registration (paper 002's Reg DSC).
    - ``seg_dice``: Dice of each image's ``argmax rho_hat_j`` against its own labels.
    - ``posterior_dice``: Dice of the argmax of the test-time posterior (Eq. 53; ``rho_hat`` of
      the images in `priors` multiply in, probabilities clipped at `zeta`) against each image's
      propagated labels (paper 002's Seg DSC).

    The network's mode is restored afterwards.
    """
    was_training = net.training
    net.eval()
    gen = make_generator(seed)
    keys = ("reg_dice_before", "reg_dice", "seg_dice", "posterior_dice")
    acc: dict[str, list[float]] = {key: [] for key in keys}
    try:
        for g in groups:
            if g.labels is None:
                raise ConfigError(f"group {g.index} has no labels to evaluate against")
            n, k = g.n, net.classes
            out = net(g.images[None], g.domains)
            disp = world_displacements(out.field[0], g.grid, net.flow, net.svf_steps)
            rho_hat = clip_probabilities(out.probabilities[0], zeta, dim=1)
            onehot = F.one_hot(g.labels, k).movedim(-1, 1).to(g.images.dtype)
            warped, inside = warp_group(torch.cat([g.images, onehot, rho_hat], dim=1), disp,
                                        g.grid)
            wl = warped[:, 1:1 + k].argmax(dim=1)
            labels = range(1, k)
            pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
            acc["reg_dice_before"].append(sum(_label_dice(g.labels[i], g.labels[j], labels)
                                              for i, j in pairs) / len(pairs))
            acc["reg_dice"].append(sum(_label_dice(wl[i], wl[j], labels)
                                       for i, j in pairs) / len(pairs))
            seg = out.logits[0].argmax(dim=1)
            acc["seg_dice"].append(sum(_label_dice(seg[j], g.labels[j], labels)
                                       for j in range(n)) / n)
            overlap = inside.reshape(n, -1).all(dim=0)
            own = [g.images[j, 0] for j in range(n)]
            pri = list(priors)
            prior_maps = warped[pri, 1 + k:].reshape(len(pri), k, -1) if pri else None
            gamma, _ = common_anatomy(own, list(rho_hat), warped[:, 0].reshape(n, -1), overlap,
                                      prior_maps, levels, sample_rate, gen)
            post = gamma.argmax(dim=1)
            acc["posterior_dice"].append(sum(
                _label_dice(post, wl[j].reshape(-1)[overlap], labels) for j in range(n)) / n)
    finally:
        net.train(was_training)
    return {key: sum(v) / len(v) for key, v in acc.items() if v}


# ------------------------------------------------------------------------------ training
@dataclass(frozen=True)
class DCCTrainConfig:
    """Settings of :func:`train_dcc`.

    Args:
        strategy: ``"unsupervised"``, ``"weak"`` or ``"all"`` (see :data:`STRATEGIES`).
        labelled_images: labelled image indices of every group (``"weak"``).
        label_fraction: instead, a seeded random fraction of each group's images (``"weak"``).
        classes: ``K`` (labels ``0..K-1``; the phantoms have 4: background, CSF, GM, WM).
        channels: ``C`` of the network.
        net_levels: ``L_R`` of the network.
        flow: ``"displacement"`` or ``"svf"``.
        reg_norm: normalisation of ``D_r`` (``"batch"``, ``"instance"``, ``"none"``).
        field_scale: mm per unit of the flow heads' output (see :class:`DCCNet`); None: the
            grid's mean spacing (one voxel).
        momentum: batch-norm momentum (authors' code 0.01; short trainings need more, or the
            running statistics used in eval mode lag far behind the batch statistics).
        dropout: channel dropout (authors' code: 0.2).
        levels: ``L`` intensity levels (paper: 32).
        sample_rate: sample rate of the X-metric and Eq. 20.
        bending_weight: ``lambda`` of itreg's world-mm bending energy (times ``N``). None
            (default): paper 002's ``lambda = 100``, which weighs the authors' pixel-unit
            energy, converted to the training grid: ``bending_weight_from_pixels(100, s, D)
            = 100 s^2 / D`` on a grid of ``s`` mm (800 on 4 mm 2D grids). Until 2026-12-08 the
            default was 10 (a pixel-unit ``lambda`` of ``10 D / s^2``: 1.25 at 4 mm); on the
            benchmark's 4 mm groups the converted value registered better (unsupervised,
            Reg Dice 0.773 -> 0.784, gWI 2.65 -> 2.35 mm;
            ``benchmarks/results/2026-12-08-dcc-bending-weight.md``).
        tau: label-model slope per mm.
        zeta: probability clip in training (paper 0.05).
        zeta_test: probability clip at test (paper 0.01; stored in the model file).
        loss_weights: ``(w1, w2, w3)``.
        seg_lr: Adam step size of ``E`` and ``D_s`` (paper 1e-3).
        reg_lr: Adam step size of ``D_r`` (paper 1e-4).
        alternate_every: steps before switching branch (paper 5).
        batch_size: groups per step (paper 20).
        steps_per_epoch: optimiser steps per epoch.
        train_groups: size of the pool of training groups (indices ``0..train_groups-1`` of
            the training source), reshuffled every epoch.
        val_groups: held-out groups for validation (indices ``0..val_groups-1`` of the
            validation source).
        epochs: maximum epochs.
        patience: early-stopping patience on the validation registration Dice (0: none).
        grad_clip: gradient-norm clip (None: none).
        seed: seed of the weights, the sampling and the batches.
        threads: torch CPU threads while training (None: unchanged).
        progress: progress bar on stderr.
    """

    strategy: str = "weak"
    labelled_images: tuple[int, ...] = (0,)
    label_fraction: float | None = None
    classes: int = 4
    channels: int = 16
    net_levels: int = 4
    flow: str = "displacement"
    reg_norm: str = "batch"
    field_scale: float | None = None
    momentum: float = 0.01
    dropout: float = 0.2
    levels: int = 32
    sample_rate: float = 0.1
    bending_weight: float | None = None
    tau: float = 1.0
    zeta: float = 0.05
    zeta_test: float = 0.01
    loss_weights: tuple[float, float, float] = (1.0, 1.0, 1.0)
    seg_lr: float = 1e-3
    reg_lr: float = 1e-4
    alternate_every: int = 5
    batch_size: int = 20
    steps_per_epoch: int = 100
    train_groups: int = 1000
    val_groups: int = 20
    epochs: int = 100
    patience: int = 10
    grad_clip: float | None = None
    seed: int = 0
    threads: int | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"unknown DCC strategy {self.strategy!r}; valid: "
                              f"{', '.join(STRATEGIES)}")
        object.__setattr__(self, "labelled_images", tuple(int(j) for j in self.labelled_images))
        object.__setattr__(self, "loss_weights", tuple(float(w) for w in self.loss_weights))
        if self.flow not in FLOWS:
            raise ConfigError(f"unknown flow {self.flow!r}; valid: {', '.join(FLOWS)}")
        if self.reg_norm not in NORMS:
            raise ConfigError(f"unknown reg_norm {self.reg_norm!r}; valid: {', '.join(NORMS)}")
        for name in ("batch_size", "steps_per_epoch", "train_groups", "val_groups",
                     "alternate_every"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("seg_lr", "reg_lr"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")

    @classmethod
    def small(cls, **overrides: Any) -> DCCTrainConfig:
        """A 2D setting that trains in minutes on two CPU cores (3-4 mm groups, C = 8, 3 levels,
        no dropout; BN momentum 0.1 and no normalisation in ``D_r``, because with a few hundred
        steps the running statistics of momentum 0.01 lag far behind and eval-mode fields
        collapse)."""
        base: dict[str, Any] = {
            "channels": 8, "net_levels": 3, "dropout": 0.0, "batch_size": 4,
            "steps_per_epoch": 20, "train_groups": 48, "val_groups": 6, "epochs": 8,
            "patience": 4, "seg_lr": 3e-3, "reg_lr": 1e-3, "alternate_every": 5,
            "sample_rate": 0.25, "momentum": 0.1, "reg_norm": "none"}
        base.update(overrides)
        return cls(**base)

    @classmethod
    def full(cls, **overrides: Any) -> DCCTrainConfig:
        """The paper's scale (sec. 4.4): C = 16, L_R = 4, batch 20, 100 epochs (a GPU)."""
        base: dict[str, Any] = {"channels": 16, "net_levels": 4, "batch_size": 20,
                                "steps_per_epoch": 1000, "train_groups": 19500,
                                "val_groups": 300, "epochs": 100, "patience": 10}
        base.update(overrides)
        return cls(**base)

    def loss(self) -> DCCLoss:
        """The :class:`DCCLoss` of these settings."""
        return DCCLoss(self.levels, self.sample_rate, self.bending_weight, self.tau, self.zeta,
                       self.loss_weights)

    def labelled(self, n: int, group_index: int) -> Tensor:
        """``J`` of group `group_index` with `n` images."""
        return labelled_mask(self.strategy, n, self.labelled_images, self.label_fraction,
                             group_index, self.seed)


class _Alternating:
    """Two optimisers used in turn, `every` steps each, starting with the segmentation one
    (duck-types the optimiser :func:`itreg.train.fit` drives)."""

    def __init__(self, seg: torch.optim.Optimizer, reg: torch.optim.Optimizer,
                 every: int) -> None:
        self.seg, self.reg, self.every, self.steps = seg, reg, int(every), 0

    @property
    def phase(self) -> str:
        return "seg" if (self.steps // self.every) % 2 == 0 else "reg"

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.seg.zero_grad(set_to_none=set_to_none)
        self.reg.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        (self.seg if self.phase == "seg" else self.reg).step()
        self.steps += 1

    def state_dict(self) -> dict[str, Any]:
        """Both optimisers' states and the step count (for resumable checkpoints)."""
        return {"seg": self.seg.state_dict(), "reg": self.reg.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.seg.load_state_dict(state["seg"])
        self.reg.load_state_dict(state["reg"])
        self.steps = int(state["steps"])


@dataclass
class DCCTrainingResult:
    """What :func:`train_dcc` produced.

    Attributes:
        model: the trained network (best validation registration Dice), in eval mode.
        train: the :class:`~itreg.train.TrainResult` (history per epoch, stop reason).
        config: the settings.
        before: validation measures of the initial network.
        after: validation measures of the kept network.
        path: the written model file, or None.
    """

    model: DCCNet
    train: TrainResult
    config: DCCTrainConfig
    before: dict[str, float]
    after: dict[str, float]
    path: Path | None = None


def _prior_images(config: DCCTrainConfig, n: int) -> list[int]:
    """Images whose ``rho_hat`` multiplies into the test-time posterior (Eq. 53)."""
    if config.strategy == "all":
        return list(range(n))
    if config.strategy == "weak" and config.label_fraction is None:
        return [j for j in config.labelled_images if j < n]
    return []


def initial_network(config: DCCTrainConfig, grid: Grid, domains: int,
                    domain_names: Sequence[str] | None = None) -> DCCNet:
    """The untrained network :func:`train_dcc` starts from (seeded by ``config.seed``)."""
    cfg = config
    with seeded(cfg.seed):
        return DCCNet(grid.ndim, domains, cfg.classes, cfg.channels, cfg.net_levels, cfg.flow,
                      zero_mean=True, reg_norm=cfg.reg_norm, dropout=cfg.dropout,
                      domain_names=domain_names, spacing_mm=list(grid.spacing),
                      momentum=cfg.momentum,
                      field_scale=cfg.field_scale or sum(grid.spacing) / grid.ndim)


def train_dcc(
    train_source: PhantomGroupSource | Sequence[DCCGroup],
    val_source: PhantomGroupSource | Sequence[DCCGroup],
    config: DCCTrainConfig | None = None,
    output: str | os.PathLike | None = None,
    force: bool = False,
    domain_names: Sequence[str] | None = None,
    resume: bool = True,
) -> DCCTrainingResult:
    """Train a DCC network with the alternating scheme of paper 002 (sec. 3.5, 4.4).

    Args:
        train_source: a :class:`PhantomGroupSource` (groups ``0..train_groups-1``) or a list
            of groups (all on one grid, one group size, with labels where ``J`` needs them).
        val_source: the held-out groups (source: ``0..val_groups-1``), with labels.
        config: settings (default :class:`DCCTrainConfig`).
        output: model file to write (the best weights as a checkpoint whenever they improve,
            and at the end); None writes nothing.
        force: replace an existing `output`.
        domain_names: names of the domains (default: the source's contrasts).
        resume: with an `output`, training keeps a resumable checkpoint ``output + ".ckpt"``
            after every epoch (:class:`~itreg.train.FitCheckpoint`); when it exists, training
            continues from it (its settings must match, except ``epochs``, ``patience``,
            ``threads`` and ``progress``), and the `output` the interrupted run wrote is
            replaced without `force`. False starts afresh.

    Returns:
        :class:`DCCTrainingResult`.

    Raises:
        OutputExistsError: `output` exists, `force` is False and there is no checkpoint of an
            interrupted run to resume (checked before training).
        TrainingError: a non-finite loss or gradient (the last good weights are written).
        ConfigError, GeometryError: bad settings or groups, or a checkpoint written with other
            settings.
        ModelFileError: an unreadable checkpoint.
    """
    cfg = config or DCCTrainConfig()
    ckpt = None if output is None else checkpoint_path(output)
    resuming = resume and ckpt is not None and ckpt.is_file()
    if output is not None and Path(output).exists() and not force and not resuming:
        raise OutputExistsError(f"model file {str(output)!r} exists; pass force=True to replace")
    if isinstance(train_source, PhantomGroupSource):
        train = train_source.groups(range(cfg.train_groups))
        domain_names = domain_names or list(train_source.contrasts)
    else:
        train = list(train_source)
    val = (val_source.groups(range(cfg.val_groups))
           if isinstance(val_source, PhantomGroupSource) else list(val_source))
    if not train or not val:
        raise ConfigError("training needs at least one training and one validation group")
    grid, n = train[0].grid, train[0].n
    for g in [*train, *val]:
        if not g.grid.same_as(grid) or g.n != n:
            raise GeometryError("all groups must share one grid and group size")
    domains = int(max(int(g.domains.max()) for g in train)) + 1
    if domain_names is not None and len(domain_names) < domains:
        raise ConfigError(f"{len(domain_names)} domain names for {domains} domains")
    if domain_names is not None:
        domains = len(domain_names)
    net = initial_network(cfg, grid, domains, domain_names).to(train[0].images.device)
    seg_opt = torch.optim.Adam(net.segmentation_parameters(), lr=cfg.seg_lr)
    reg_opt = torch.optim.Adam(net.registration_parameters(), lr=cfg.reg_lr)
    opt = _Alternating(seg_opt, reg_opt, cfg.alternate_every)
    loss = cfg.loss()
    gen = make_generator(cfg.seed)
    priors = _prior_images(cfg, n)
    eval_kw = {"zeta": cfg.zeta_test, "priors": priors, "levels": cfg.levels,
               "sample_rate": cfg.sample_rate, "seed": cfg.seed}
    labelled = [cfg.labelled(n, g.index) for g in train]

    def batches(epoch: int):
        order = torch.randperm(len(train), generator=gen).tolist()
        for s in range(cfg.steps_per_epoch):
            idx = [order[(s * cfg.batch_size + i) % len(order)] for i in range(cfg.batch_size)]
            yield idx

    def loss_fn(idx: list[int]) -> Tensor:
        value, _ = loss(net, [train[i] for i in idx], [labelled[i] for i in idx],
                        phase=opt.phase, generator=gen)
        return value

    def validate() -> dict[str, float]:
        return evaluate_groups(net, val, **eval_kw)

    def extra(info: dict[str, Any]) -> dict[str, Any]:
        return {"training": dataclasses.asdict(cfg),
                "inference": {"zeta": cfg.zeta_test, "priors": priors, "levels": cfg.levels,
                              "sample_rate": cfg.sample_rate},
                "info": {k: (v if not isinstance(v, float) or math.isfinite(v) else None)
                         for k, v in info.items()}}

    def checkpoint(model, info: dict[str, Any]) -> None:
        if output is not None:
            save_model(output, MODEL_KIND, net.config(), model.state_dict(), extra(info),
                       force=True)

    before: dict[str, float] = {}

    def get_state() -> dict[str, Any]:
        return {"generator": gen.get_state(), "before": before}

    def set_state(state: dict[str, Any]) -> None:
        gen.set_state(state["generator"])
        before.update(state["before"])

    resumable = None
    if ckpt is not None:
        settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _RESUMABLE}
        settings["domain_names"] = list(domain_names) if domain_names is not None else None
        resumable = FitCheckpoint(ckpt, json.loads(json.dumps(settings)), get_state, set_state,
                                  resume=resume)

    with limited_threads(cfg.threads):
        if resumable is None or not resumable.exists():
            before.update(evaluate_groups(net, val, **eval_kw))
            logger.info("DCC before training: %s", before)
        # A non-finite value raises TrainingError after `checkpoint` kept the last good weights.
        result = fit(net, opt, batches, loss_fn, validate, epochs=cfg.epochs,
                     monitor="reg_dice", mode="max", patience=cfg.patience,
                     checkpoint=checkpoint, grad_clip=cfg.grad_clip, progress=cfg.progress,
                     description=f"DCC ({cfg.strategy})", steps_per_epoch=cfg.steps_per_epoch,
                     resume=resumable)
        after = evaluate_groups(net, val, **eval_kw)
    net.eval()
    path = None
    if output is not None:
        path = save_model(output, MODEL_KIND, net.config(), net.state_dict(),
                          extra({"before": before, "after": after,
                                 "train": result.to_dict()}), force=True)
    return DCCTrainingResult(net, result, cfg, before, after, path)

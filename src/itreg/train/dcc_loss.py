"""The loss and the evaluation of DCC training (:func:`itreg.train.dcc.train_dcc`): the
bending weight in the paper's pixel units, :class:`DCCLoss` (registration, segmentation and
consistency terms of paper 002) and :func:`evaluate_groups` (Dice of the predicted
registrations and segmentations).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from itreg.errors import ConfigError, GeometryError
from itreg.grid import Grid
from itreg.groupwise.base import sample_mask
from itreg.groupwise.em import POSTERIOR_EPS
from itreg.groupwise.xmetric import PADDING, bin_coordinates, x_metric
from itreg.nets.dcc import (
    DCCNet,
    clip_probabilities,
    common_anatomy,
    distance_probabilities,
    image_ranges,
    warp_group,
    world_displacements,
)
from itreg.regularisers import bending_energy
from itreg.train import make_generator
from itreg.train.dcc_data import DCCGroup

__all__ = ["PAPER_BENDING_WEIGHT", "DCCLoss", "bending_weight_from_pixels", "evaluate_groups"]


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

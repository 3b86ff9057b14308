"""DeepSim (paper 004, Eq. 5): mean cosine similarity of learned features, as a loss.

``DeepSim(I o Phi, J) = (1/L) sum_l (1/|Omega_l|) sum_{p in Omega_l} cos(F^l_p(I o Phi),
F^l_p(J))``: features ``F^l`` are the outputs of the ``L = 3`` encoder stages of a trained
extractor (:class:`~itreg.blocks.deepsim.DeepSimNet`, auto-encoder or segmentation net), the
cosine is taken over the channels at each position, without mean-centring. As in the authors'
code, squared feature norms are clamped at ``1e-6`` and the extractor is frozen and forced into
eval mode at every call (BatchNorm running statistics, no dropout). The loss is
``1 - DeepSim`` (0 for an image compared with itself); :meth:`DeepSimMetric.quantity` gives
DeepSim back.

Intensities are min-max scaled to ``[0, 1]`` (the scaling of :mod:`itreg.train.deepsim`) from
the ranges the engine passes once per level, or from the images. With a mask, each level
averages over the positions whose (average-pooled) mask weight is positive, weighted by it.

``stages`` picks the encoder stages that are averaged (1 = 1/2 resolution, 2 = 1/4, 3 = 1/8;
default all three, the paper's L = 3). The deeper stages of an extractor trained on several
contrasts with intensity augmentation (:mod:`itreg.train.deepsim`) are the most
contrast-invariant; the first stage stays close to the intensities.

Registered as ``"deepsim:model.pt"`` (``--set stages=[2,3]`` on the command line); the model
file says which extractor it holds.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from itreg.blocks.deepsim import MODEL_KIND, DeepSimNet
from itreg.errors import ConfigError
from itreg.metrics.base import Range
from itreg.metrics.frozen import FrozenNetworkMetric
from itreg.metrics.registry import register_metric

__all__ = ["DeepSimMetric", "deepsim_metric", "feature_cosine"]

#: Clamp of squared feature norms (authors' code).
NORM_EPS = 1e-6


def feature_cosine(a: Tensor, b: Tensor, weights: Tensor | None = None) -> Tensor:
    """Mean over positions of the cosine similarity over channels of two feature maps.

    Args:
        a: features ``(B, C, *S)``.
        b: features of the same shape.
        weights: optional non-negative ``(B, 1, *S)`` position weights.

    Returns:
        0-d mean cosine (weighted mean with `weights`).
    """
    dot = (a * b).sum(1, keepdim=True)
    na = (a * a).sum(1, keepdim=True).clamp_min(NORM_EPS)
    nb = (b * b).sum(1, keepdim=True).clamp_min(NORM_EPS)
    cos = dot / torch.sqrt(na * nb)
    if weights is None:
        return cos.mean()
    return (cos * weights).sum() / weights.sum().clamp_min(1e-12)


class DeepSimMetric(FrozenNetworkMetric):
    """DeepSim loss ``1 - mean_l mean_p cos(F^l_p(moving), F^l_p(fixed))`` (paper 004, Eq. 5).

    Args:
        network: a trained :class:`~itreg.blocks.deepsim.DeepSimNet` (frozen, eval mode).
        intensity: ``"minmax"`` (default, as in training), ``"percentile"`` or ``"none"``.
        source: the model file it came from (for reports).
        stages: encoder stages (1-based, from 1 to 3) averaged in Eq. 5; None: all three.

    Shapes:
        ``forward(fixed, moving, mask)``: ``(C, *S)`` images (C = the network's input
        channels), ``mask (*S)``; returns a 0-d loss in ``[0, 2]``.
    """

    name = "deepsim"
    requires_spatial = True
    quantity_name = "DeepSim (mean feature cosine)"
    uses_intensity_range = True
    network_type = DeepSimNet
    model_kind = MODEL_KIND

    def __init__(self, network: DeepSimNet, intensity: str = "minmax",
                 source: str | None = None, stages: Sequence[int] | None = None) -> None:
        super().__init__(network, intensity=intensity)
        n = len(network.channels)
        if isinstance(stages, (int, float, str)):
            stages = [stages]
        picked = list(range(1, n + 1)) if stages is None else [int(k) for k in stages]
        if not picked or len(set(picked)) != len(picked) or any(k < 1 or k > n for k in picked):
            raise ConfigError(f"DeepSim stages must be distinct numbers from 1 to {n}, "
                              f"got {stages}")
        self.stages = tuple(sorted(picked))
        self.settings = {"model": source, "extractor": network.mode,
                         "channels": list(network.channels), "stages": list(self.stages)}

    def quantity(self, loss: Tensor | float) -> Tensor | float:
        """DeepSim (mean cosine, 1 = identical features) from the loss."""
        return 1.0 - loss

    def loss(self, fixed: Tensor, moving: Tensor, mask: Tensor | None, fixed_range: Range,
             moving_range: Range) -> Tensor:
        net = self.network
        net.eval()
        if fixed.dim() - 1 != net.ndim or fixed.shape[0] != net.in_channels:
            raise ConfigError(f"this DeepSim model takes {net.in_channels}-channel {net.ndim}D "
                              f"images, got {tuple(fixed.shape)}")
        param = self.network_on(fixed.device)
        u, v = self.scaled_pair(fixed, moving, fixed_range, moving_range)
        u, v = u[None].to(param.dtype), v[None].to(param.dtype)
        feats_f = net.features(u)
        feats_m = net.features(v)
        weights = None
        if mask is not None:
            w = mask.to(param.dtype)[None, None]
            pad: list[int] = []
            for n in reversed(w.shape[2:]):
                pad += [0, (-n) % 8]
            w = nn.functional.pad(w, pad)
            pool = nn.functional.avg_pool2d if net.ndim == 2 else nn.functional.avg_pool3d
            weights = []
            for _ in feats_f:
                w = pool(w, 2)
                weights.append(w)
        weights = weights or [None] * len(feats_f)
        sims = [feature_cosine(feats_m[k - 1], feats_f[k - 1], weights[k - 1])
                for k in self.stages]
        value = torch.stack(sims).mean()
        return (1.0 - value).to(fixed.dtype)


def deepsim_metric(path: str | os.PathLike, intensity: str = "minmax",
                   stages: Sequence[int] | None = None) -> DeepSimMetric:
    """Registry factory of ``"deepsim:model.pt"``: :meth:`DeepSimMetric.from_file`."""
    return DeepSimMetric.from_file(path, intensity=intensity, stages=stages)


register_metric("deepsim", deepsim_metric, overwrite=True)

"""Critics of the neural MI/KL estimators: voxel-wise two-branch (Y-shaped) networks.

One module family, :class:`Critic`, serves both papers (``notes/methods.md`` sections 2 and 4):

- ``arch="kldiv"`` (KLDivNet, paper 003): per-image branches of two blocks
  ``1x1(x1) conv + LeakyReLU(0.2)`` (1 -> 32 -> 32 channels) followed by an average-pooling
  downsampling layer (factor 2), unshared; the branch outputs are concatenated and a joint
  branch of two blocks (64 -> 64 LeakyReLU, 64 -> 1 linear) gives the score map ``Z``. No
  normalisation.
- ``arch="mine"`` (MIRegNet's two-entrance critic, paper 001): each image enters its own branch
  (one ``1x1 conv + LeakyReLU`` block, 1 -> 32), the feature maps are concatenated and three
  joint blocks (64 -> 64 -> 64 -> 1) give ``T``. No pooling.

**Why voxel-wise.** The product of marginals is made by shuffling the fixed image's voxels. A
critic with a spatial receptive field *before* the shuffle could tell real from shuffled
fixed images by their texture (smoothness) alone, and its bound would not be MI. All
convolutions are therefore ``1x1(x1)`` (implemented as :class:`torch.nn.Linear` on the channel
axis, so 2D and 3D share one code path and one state dict), and the shuffle permutes the
fixed branch's **output feature vectors** (:meth:`Critic.pair_scores` with ``perm``). With
pooling (``kldiv`` on images) each feature vector summarises a ``2^D`` block; permuting whole
vectors keeps both marginals exactly, so the bound stays valid.

Inputs are either images ``(C, *S)`` with ``S`` 2D ``(Y, X)`` or 3D ``(Z, Y, X)`` (pooling
applies), or flat samples ``(C, P)`` of voxel values (the engine's sampled points; there is no
neighbourhood, so pooling is skipped). Scores are unbounded reals (no final activation).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from itreg.errors import ConfigError

__all__ = ["ARCHITECTURES", "MODEL_KIND", "Critic", "build_critic"]

ARCHITECTURES: dict[str, dict[str, Any]] = {
    "kldiv": {"width": 32, "branch_blocks": 2, "joint_blocks": 2, "pool": 2, "slope": 0.2},
    "mine": {"width": 32, "branch_blocks": 1, "joint_blocks": 3, "pool": 1, "slope": 0.2},
}
"""Default settings of the two critic architectures."""

MODEL_KIND = "neural-critic"
"""The model-file kind of a saved critic (see :mod:`itreg.blocks.modelfile`)."""

_POOL = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}


def _blocks(c_in: int, width: int, n: int, slope: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(n):
        layers += [nn.Linear(c_in if i == 0 else width, width), nn.LeakyReLU(slope)]
    return nn.Sequential(*layers)


class Critic(nn.Module):
    """A voxel-wise two-branch critic ``f(fixed, moving) -> score`` (see the module docstring).

    Args:
        arch: ``"kldiv"`` or ``"mine"``; picks the defaults of the other settings.
        channels: channels ``C`` of each input image.
        width: channels of each branch's feature vectors; the joint branch has ``2 * width``.
        branch_blocks: ``1x1 conv + LeakyReLU`` blocks per input branch (>= 1).
        joint_blocks: blocks of the joint branch (>= 1); the last one is linear to 1 channel.
        pool: average-pooling factor of the branches on images (1 = none); ignored for flat
            samples.
        slope: LeakyReLU negative slope.

    Raises:
        ConfigError: unknown ``arch`` or invalid sizes.
    """

    def __init__(
        self,
        arch: str = "kldiv",
        channels: int = 1,
        width: int | None = None,
        branch_blocks: int | None = None,
        joint_blocks: int | None = None,
        pool: int | None = None,
        slope: float | None = None,
    ) -> None:
        super().__init__()
        if arch not in ARCHITECTURES:
            names = ", ".join(sorted(ARCHITECTURES))
            raise ConfigError(f"unknown critic architecture {arch!r}; valid ones are: {names}")
        d = ARCHITECTURES[arch]
        self.arch = arch
        self.channels = int(channels)
        self.width = int(d["width"] if width is None else width)
        self.branch_blocks = int(d["branch_blocks"] if branch_blocks is None else branch_blocks)
        self.joint_blocks = int(d["joint_blocks"] if joint_blocks is None else joint_blocks)
        self.pool = int(d["pool"] if pool is None else pool)
        self.slope = float(d["slope"] if slope is None else slope)
        if min(self.channels, self.width, self.branch_blocks, self.joint_blocks, self.pool) < 1:
            raise ConfigError("critic channels, width, blocks and pool must all be >= 1")
        self.fixed_branch = _blocks(self.channels, self.width, self.branch_blocks, self.slope)
        self.moving_branch = _blocks(self.channels, self.width, self.branch_blocks, self.slope)
        hidden = 2 * self.width
        joint: list[nn.Module] = []
        for _ in range(self.joint_blocks - 1):
            joint += [nn.Linear(hidden, hidden), nn.LeakyReLU(self.slope)]
        joint.append(nn.Linear(hidden, 1))
        self.joint = nn.Sequential(*joint)

    def config(self) -> dict[str, Any]:
        """The constructor settings (plain data) that rebuild this critic."""
        return {"arch": self.arch, "channels": self.channels, "width": self.width,
                "branch_blocks": self.branch_blocks, "joint_blocks": self.joint_blocks,
                "pool": self.pool, "slope": self.slope}

    # ------------------------------------------------------------------ branches
    def features(
        self, x: Tensor, branch: str, mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """Per-position feature vectors of one input branch.

        Args:
            x: an image ``(C, *S)`` (``S`` 2D or 3D) or flat samples ``(C, P)``.
            branch: ``"fixed"`` or ``"moving"``.
            mask: optional bool mask of shape ``S`` (images only; flat samples are selected
                by the caller).

        Returns:
            ``(features (N, width), keep)``: for flat samples ``N = P`` and ``keep`` is None;
            for images ``N`` is the number of pooled positions and ``keep (N,)`` marks the
            positions whose whole pooling block lies inside ``mask`` (None without a mask).
        """
        net = self.fixed_branch if branch == "fixed" else self.moving_branch
        if x.dim() == 2:
            return net(x.transpose(0, 1)), None
        nd = x.dim() - 1
        h = net(x.movedim(0, -1)).movedim(-1, 0)  # (width, *S)
        keep = None
        if self.pool > 1:
            h = _POOL[nd](h.unsqueeze(0), self.pool).squeeze(0)
            if mask is not None:
                m = _POOL[nd](mask.to(h.dtype)[None, None], self.pool)[0, 0]
                keep = (m > 1.0 - 1e-6).reshape(-1)
        elif mask is not None:
            keep = mask.reshape(-1).to(torch.bool)
        return h.reshape(h.shape[0], -1).transpose(0, 1), keep

    # ------------------------------------------------------------------ scores
    def pair_scores(self, hf: Tensor, hm: Tensor, perm: Tensor | None = None) -> Tensor:
        """Scores ``f(hf[perm[i]], hm[i])`` of paired feature vectors ``(N, width)`` -> ``(N,)``.

        With ``perm=None`` the pairs are the joint (aligned) ones; with a permutation of the
        fixed features they are product-of-marginal samples.
        """
        if perm is not None:
            hf = hf[perm]
        return self.joint(torch.cat([hf, hm], dim=-1)).squeeze(-1)

    def score_matrix(self, hf: Tensor, hm: Tensor) -> Tensor:
        """All scores ``S_ij = f(hf_i, hm_j)`` of ``K`` fixed and ``K`` moving vectors, ``(K, K)``.

        The first joint layer is linear in the concatenation, so it is split into a fixed and a
        moving part and broadcast (``K^2 x 2 width`` activations, no ``K^2`` concatenations).
        """
        first = self.joint[0]
        w = self.width
        a = hf @ first.weight[:, :w].T  # (K, H)
        b = hm @ first.weight[:, w:].T + first.bias  # (K, H)
        z = a[:, None, :] + b[None, :, :]
        for layer in list(self.joint)[1:]:
            z = layer(z)
        return z.squeeze(-1)

    def forward(self, fixed: Tensor, moving: Tensor) -> Tensor:
        """Joint score map of aligned inputs: ``(N,)`` scores (pooled positions for images)."""
        hf, _ = self.features(fixed, "fixed")
        hm, _ = self.features(moving, "moving")
        return self.pair_scores(hf, hm)


def build_critic(config: dict[str, Any]) -> Critic:
    """Rebuild a :class:`Critic` from its :meth:`Critic.config` (model-file builder)."""
    try:
        return Critic(**config)
    except TypeError as exc:
        raise ConfigError(f"invalid critic config {config!r}: {exc}") from exc


def _register() -> None:
    from itreg.blocks.modelfile import register_model_kind

    register_model_kind(MODEL_KIND, build_critic, overwrite=True)


_register()

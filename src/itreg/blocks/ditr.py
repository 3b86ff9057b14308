"""DITR's patch classifier f(u, v) (paper 000, Eqs. 9-11): a 2-channel CNN on patch pairs.

The fixed patch ``u`` and the moving patch ``v`` are the two input channels. The network is the
one of ``notes/methods.md`` section 1 (the paper gives only "5 strided 3x3x3 convolutions with
ReLU, average pooling"): five convolutions with kernel 3, padding 1 and stride 2, channels
``2 -> 32 -> 64 -> 128 -> 256 -> 1`` (configurable), ReLU after the first four, then global
average pooling to one logit ``f(u, v)`` per pair. A 17-voxel patch shrinks 17 -> 9 -> 5 -> 3
-> 2 -> 1. The same module serves 2D (``17 x 17``) and 3D (``17 x 17 x 17``) patches; only the
convolution class differs.

The output is the **pre-sigmoid** logit: ``p(z=1 | u, v) = sigmoid(f(u, v))`` (Eq. 9) and the
registration metric sums ``f`` over patch pairs (Eq. 11, :mod:`itreg.metrics.ditr`).

**Flip symmetry** (``symmetric=True``, our addition): the logit is the mean of ``f`` over the
``2^D`` axis flips applied to both channels, ``f_sym(u, v) = mean_F f(Fu, Fv)``. A plain CNN is
trained only on exactly corresponding (z=1) and far-apart (z=0) pairs, so nothing makes its
logit peak at zero displacement among small shifts; with strided layers its response to a
small shift of ``v`` is lopsided and the registration optimum lands a fraction of a voxel off
(measured: about 1 mm at 3 mm voxels, even with perfectly aligned training pairs). The flip
average satisfies ``f_sym(u, S_d v) = f_sym(Fu, S_{Fd} Fv)``: the network itself prefers no
direction, so a remaining shift of the optimum can only come from the images. It costs
``2^D`` forward passes. Models saved before this option load with ``symmetric=False``.

**Per-patch normalisation** (``normalize=True``, our addition): before the convolutions, each
channel of each patch pair is standardised by its own mean and standard deviation,
``(u - mean u) / max(std u, eps)``, so the logit is invariant to an affine intensity change
``a u + b`` (``a > 0``) of either channel of a patch (exactly where ``a std u >= eps``). A smooth
multiplicative bias field is nearly a constant gain over one patch, so this removes most of
its effect; patches that are (nearly) constant become zero. Models saved before this option
load with ``normalize=False`` and behave as before.

The model-file kind is ``"ditr"`` (:data:`MODEL_KIND`); :func:`build_ditr` rebuilds the module
from the stored config.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from itreg.blocks.modelfile import register_model_kind
from itreg.errors import ConfigError

__all__ = ["DEFAULT_CHANNELS", "MODEL_KIND", "NORMALIZE_EPS", "PATCH_SIZE", "DITRNet",
           "build_ditr", "extract_patches", "normalize_patches"]

#: Model-file kind of DITR classifiers.
MODEL_KIND = "ditr"
#: Default hidden channel widths (the last convolution maps to 1 logit).
DEFAULT_CHANNELS = (32, 64, 128, 256)
#: Default patch edge length in voxels (paper 000: 17^3).
PATCH_SIZE = 17
#: Least standard deviation used by the per-patch normalisation (intensities scaled to ~[0, 1]).
NORMALIZE_EPS = 1e-3


def normalize_patches(pairs: Tensor, eps: float = NORMALIZE_EPS) -> Tensor:
    """Each channel of each patch standardised: ``(x - mean x) / max(std x, eps)``.

    Args:
        pairs: ``(B, C, *P)``.
        eps: least standard deviation divided by (constant patches become 0).

    Returns:
        The standardised patches, same shape.
    """
    flat = pairs.flatten(2)
    mean = flat.mean(dim=2, keepdim=True)
    std = flat.std(dim=2, unbiased=False, keepdim=True).clamp_min(eps)
    return ((flat - mean) / std).reshape(pairs.shape)


class DITRNet(nn.Module):
    """The 2-channel patch classifier ``f(u, v)`` of DITR (2D or 3D).

    Args:
        ndim: spatial dimension of the patches, 2 or 3.
        channels: widths of the hidden convolutions; one more convolution maps to 1 channel.
            The paper's layer count (5 convolutions) is ``len(channels) + 1 = 5``.
        patch_size: edge length of the (square or cubic) patches in voxels, odd.
        spacing_mm: voxel spacing in mm of the images the classifier was trained on (recorded
            for users of the model; patches must be cropped at this spacing).
        symmetric: average the logit over the ``2^ndim`` axis flips of the pair (see the
            module docstring).
        normalize: standardise each channel of each patch by its own mean and standard
            deviation before the convolutions (see the module docstring).

    Shapes:
        ``forward(pairs)``: ``pairs (B, 2, *[patch_size] * ndim)`` -> logits ``(B,)``.
    """

    def __init__(self, ndim: int = 3, channels: Sequence[int] = DEFAULT_CHANNELS,
                 patch_size: int = PATCH_SIZE, spacing_mm: float = 1.0,
                 symmetric: bool = False, normalize: bool = False) -> None:
        super().__init__()
        if ndim not in (2, 3):
            raise ConfigError(f"a DITR classifier is 2D or 3D, got ndim={ndim}")
        channels = tuple(int(c) for c in channels)
        if not channels or any(c < 1 for c in channels):
            raise ConfigError(f"DITR channels must be positive integers, got {channels}")
        if int(patch_size) < 3 or int(patch_size) % 2 == 0:
            raise ConfigError(f"the DITR patch size must be odd and >= 3, got {patch_size}")
        if not float(spacing_mm) > 0:
            raise ConfigError(f"spacing_mm must be > 0, got {spacing_mm}")
        self.ndim = int(ndim)
        self.channels = channels
        self.patch_size = int(patch_size)
        self.spacing_mm = float(spacing_mm)
        self.symmetric = bool(symmetric)
        self.normalize = bool(normalize)
        conv = nn.Conv2d if ndim == 2 else nn.Conv3d
        layers: list[nn.Module] = []
        widths = (2, *channels)
        for c_in, c_out in itertools.pairwise(widths):
            layers += [conv(c_in, c_out, 3, stride=2, padding=1), nn.ReLU(inplace=True)]
        layers.append(conv(widths[-1], 1, 3, stride=2, padding=1))
        self.features = nn.Sequential(*layers)

    def config(self) -> dict[str, Any]:
        """Constructor settings as plain data (stored in model files)."""
        return {"ndim": self.ndim, "channels": list(self.channels),
                "patch_size": self.patch_size, "spacing_mm": self.spacing_mm,
                "symmetric": self.symmetric, "normalize": self.normalize}

    def forward(self, pairs: Tensor) -> Tensor:
        """Logits ``f(u, v)`` of patch pairs.

        Args:
            pairs: ``(B, 2, *[patch_size] * ndim)``; channel 0 the fixed patch ``u``, channel 1
                the moving patch ``v``, intensities scaled to about ``[0, 1]``.

        Returns:
            Pre-sigmoid logits ``(B,)``.
        """
        if pairs.dim() != self.ndim + 2 or pairs.shape[1] != 2:
            raise ConfigError(
                f"DITR expects patch pairs (B, 2, {', '.join(['P'] * self.ndim)}), got "
                f"{tuple(pairs.shape)}")
        if self.normalize:
            pairs = normalize_patches(pairs)
        if not self.symmetric:
            return self.features(pairs).flatten(2).mean(dim=2)[:, 0]
        flips = [[2 + a for a in range(self.ndim) if (k >> a) & 1] for k in range(2 ** self.ndim)]
        batch = torch.cat([torch.flip(pairs, f) if f else pairs for f in flips])
        out = self.features(batch).flatten(2).mean(dim=2)[:, 0]
        return out.reshape(len(flips), pairs.shape[0]).mean(dim=0)


def build_ditr(config: Mapping[str, Any]) -> DITRNet:
    """Rebuild a :class:`DITRNet` from its stored config (model-file builder)."""
    return DITRNet(ndim=int(config["ndim"]), channels=config.get("channels", DEFAULT_CHANNELS),
                   patch_size=int(config.get("patch_size", PATCH_SIZE)),
                   spacing_mm=float(config.get("spacing_mm", 1.0)),
                   symmetric=bool(config.get("symmetric", False)),
                   normalize=bool(config.get("normalize", False)))


register_model_kind(MODEL_KIND, build_ditr, overwrite=True)


def extract_patches(image: Tensor, centres: Tensor, size: int, pad_value: float = 0.0) -> Tensor:
    """Crop cubic (square) patches around voxel centres, padding outside the image.

    One code path for 2D and 3D; differentiable with respect to `image` (a gather).

    Args:
        image: ``(C, *S)`` with ``S`` 2D ``(Y, X)`` or 3D ``(Z, Y, X)``.
        centres: integer voxel indices ``(P, D)`` in tensor order (``(z, y, x)`` in 3D).
        size: odd patch edge length in voxels.
        pad_value: value of patch voxels outside the image.

    Returns:
        Patches ``(P, C, *[size] * D)``.
    """
    c = image.shape[0]
    d = image.dim() - 1
    r = size // 2
    padded = nn.functional.pad(image, [r] * (2 * d), value=pad_value)
    shape = padded.shape[1:]
    strides = [1] * d
    for a in range(d - 2, -1, -1):
        strides[a] = strides[a + 1] * shape[a + 1]
    ar = torch.arange(size, device=image.device)
    offsets = torch.stack(torch.meshgrid(*([ar] * d), indexing="ij"), dim=-1).reshape(-1, d)
    idx = centres.to(image.device).long()[:, None, :] + offsets[None]  # padded coordinates
    stride_t = torch.tensor(strides, device=image.device)
    flat = (idx * stride_t).sum(-1)  # (P, K)
    values = padded.reshape(c, -1)[:, flat.reshape(-1)].reshape(c, centres.shape[0], -1)
    return values.permute(1, 0, 2).reshape(centres.shape[0], c, *([size] * d))

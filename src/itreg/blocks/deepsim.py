"""DeepSim feature extractors (paper 004): an auto-encoder and a segmentation U-Net, 2D or 3D.

The architecture follows the authors' code (``src/models/backbone.py``; ``notes/methods.md``
section 5):

- **encoder stage**: BatchNorm on the stage input -> conv k4 s2 p1 -> LeakyReLU(0.2) -> conv k3
  s1 p1 -> LeakyReLU(0.2) -> channel dropout (``Dropout2d``/``Dropout3d``, p=0.5). Three stages
  at 1/2, 1/4 and 1/8 resolution; their outputs are the DeepSim features (in eval mode, where
  dropout is the identity).
- **decoder stage**: conv k3 -> LeakyReLU -> conv k3 -> LeakyReLU -> channel dropout (no BN),
  then x2 (bi/tri)linear upsampling and, in the segmentation U-Net, concatenation of the skip
  connection (the encoder stage input of that resolution). The auto-encoder is the same net
  without skips (paper 004: "the same net without skips").
- three smoothing convolutions (k3 + LeakyReLU) after the last decoder stage and a 1x1 head:
  ``classes`` logits (segmentation; softmax / cross-entropy in training) or one channel
  (auto-encoder; sigmoid output, MSE in training).

Channel widths are configurable: the paper uses 64/128/256 in 2D and 32/64/128 in 3D.
Inputs of any size are padded (replicate) to a multiple of 8 and outputs cropped back.

The model-file kind is ``"deepsim"`` (:data:`MODEL_KIND`); the stored config says whether it is
the auto-encoder (``mode="ae"``) or the segmentation net (``mode="seg"``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from itreg.blocks.modelfile import register_model_kind
from itreg.errors import ConfigError

__all__ = ["DEFAULT_CHANNELS", "MODEL_KIND", "MODES", "DeepSimNet", "build_deepsim"]

#: Model-file kind of DeepSim extractors.
MODEL_KIND = "deepsim"
#: Extractor variants: auto-encoder and segmentation network.
MODES = ("ae", "seg")
#: Paper 004's encoder widths per dimension.
DEFAULT_CHANNELS = {2: (64, 128, 256), 3: (32, 64, 128)}


def _layers(ndim: int):
    if ndim == 2:
        return nn.Conv2d, nn.BatchNorm2d, nn.Dropout2d
    return nn.Conv3d, nn.BatchNorm3d, nn.Dropout3d


class _EncoderStage(nn.Module):
    def __init__(self, ndim: int, c_in: int, c_out: int, dropout: float) -> None:
        super().__init__()
        conv, bn, drop = _layers(ndim)
        self.block = nn.Sequential(
            bn(c_in), conv(c_in, c_out, 4, stride=2, padding=1), nn.LeakyReLU(0.2),
            conv(c_out, c_out, 3, padding=1), nn.LeakyReLU(0.2))
        self.drop = drop(dropout)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(features before dropout, stage output after dropout)``; equal in eval mode."""
        h = self.block(x)
        return h, self.drop(h)


class _DecoderStage(nn.Module):
    def __init__(self, ndim: int, c_in: int, c_out: int, dropout: float) -> None:
        super().__init__()
        conv, _, drop = _layers(ndim)
        self.block = nn.Sequential(
            conv(c_in, c_out, 3, padding=1), nn.LeakyReLU(0.2),
            conv(c_out, c_out, 3, padding=1), nn.LeakyReLU(0.2), drop(dropout))
        self.mode = "bilinear" if ndim == 2 else "trilinear"

    def forward(self, x: Tensor) -> Tensor:
        x = self.block(x)
        return nn.functional.interpolate(x, scale_factor=2, mode=self.mode, align_corners=False)


class DeepSimNet(nn.Module):
    """DeepSim's auto-encoder or segmentation U-Net; :meth:`features` gives the encoder stages.

    Args:
        ndim: 2 or 3.
        mode: ``"ae"`` (auto-encoder, no skips, 1 sigmoid output channel) or ``"seg"``
            (U-Net with skips, ``classes`` logits).
        channels: widths of the three encoder stages (default: the paper's for `ndim`).
        classes: number of segmentation classes (``"seg"``; background included).
        in_channels: image channels.
        dropout: channel-dropout probability of every stage (code: 0.5).

    Shapes:
        ``forward(x)``: ``x (B, in_channels, *S)`` -> ``(B, out, *S)`` (``out`` = 1 or
        ``classes``); ``features(x)`` -> list of ``(B, C_l, *S_l)`` at 1/2, 1/4, 1/8 resolution
        of ``S`` padded to a multiple of 8.
    """

    def __init__(self, ndim: int = 2, mode: str = "ae", channels: Sequence[int] | None = None,
                 classes: int = 2, in_channels: int = 1, dropout: float = 0.5) -> None:
        super().__init__()
        if ndim not in (2, 3):
            raise ConfigError(f"a DeepSim network is 2D or 3D, got ndim={ndim}")
        if mode not in MODES:
            raise ConfigError(f"unknown DeepSim mode {mode!r}; valid: {', '.join(MODES)}")
        channels = tuple(int(c) for c in (channels or DEFAULT_CHANNELS[ndim]))
        if len(channels) != 3 or any(c < 1 for c in channels):
            raise ConfigError(f"DeepSim needs three positive encoder widths, got {channels}")
        if mode == "seg" and int(classes) < 2:
            raise ConfigError(f"a segmentation extractor needs >= 2 classes, got {classes}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {dropout}")
        self.ndim, self.mode, self.channels = int(ndim), mode, channels
        self.classes, self.in_channels, self.dropout = int(classes), int(in_channels), float(
            dropout)
        conv, _, _ = _layers(ndim)
        widths = (self.in_channels, *channels)
        self.encoder = nn.ModuleList(
            _EncoderStage(ndim, widths[i], widths[i + 1], self.dropout) for i in range(3))
        skip = mode == "seg"
        dec = []
        c_in = channels[2]
        for level in (2, 1, 0):  # outputs at the resolution of encoder input `level`
            c_out = channels[level]
            dec.append(_DecoderStage(ndim, c_in, c_out, self.dropout))
            c_in = c_out + (widths[level] if skip else 0)
        self.decoder = nn.ModuleList(dec)
        c_s = channels[0]
        self.smooth = nn.Sequential(
            conv(c_in, c_s, 3, padding=1), nn.LeakyReLU(0.2),
            conv(c_s, c_s, 3, padding=1), nn.LeakyReLU(0.2),
            conv(c_s, c_s, 3, padding=1), nn.LeakyReLU(0.2))
        self.head = conv(c_s, self.classes if mode == "seg" else 1, 1)

    def config(self) -> dict[str, Any]:
        """Constructor settings as plain data (stored in model files)."""
        return {"ndim": self.ndim, "mode": self.mode, "channels": list(self.channels),
                "classes": self.classes, "in_channels": self.in_channels,
                "dropout": self.dropout}

    def _pad(self, x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
        if x.dim() != self.ndim + 2 or x.shape[1] != self.in_channels:
            raise ConfigError(f"DeepSim expects (B, {self.in_channels}, *S) with {self.ndim} "
                              f"spatial axes, got {tuple(x.shape)}")
        size = tuple(x.shape[2:])
        pad: list[int] = []
        for n in reversed(size):
            pad += [0, (-n) % 8]
        if any(pad):
            x = nn.functional.pad(x, pad, mode="replicate")
        return x, size

    def features(self, x: Tensor) -> list[Tensor]:
        """Outputs of the three encoder stages (the DeepSim features)."""
        return self.forward_features(x)[1]

    def forward_features(self, x: Tensor) -> tuple[Tensor, list[Tensor]]:
        """:meth:`forward` and the encoder features of the same pass.

        In training mode the features are the stage outputs before channel dropout (what the
        frozen metric sees in eval mode), while the next stage and the decoder take the
        dropped-out outputs.

        Returns:
            ``(output (B, out, *S), [features (B, C_l, *S_l) for the three stages])``.
        """
        x, size = self._pad(x)
        skips = [x]
        feats = []
        h = x
        for stage in self.encoder:
            f, h = stage(h)
            feats.append(f)
            skips.append(h)
        for i, stage in enumerate(self.decoder):
            h = stage(h)
            if self.mode == "seg":
                h = torch.cat([h, skips[2 - i]], dim=1)
        out = self.head(self.smooth(h))
        return out[(slice(None), slice(None)) + tuple(slice(0, n) for n in size)], feats

    def forward(self, x: Tensor) -> Tensor:
        """Reconstruction logits (``"ae"``) or class logits (``"seg"``), cropped to ``S``."""
        return self.forward_features(x)[0]


def build_deepsim(config: Mapping[str, Any]) -> DeepSimNet:
    """Rebuild a :class:`DeepSimNet` from its stored config (model-file builder)."""
    return DeepSimNet(ndim=int(config["ndim"]), mode=str(config["mode"]),
                      channels=config.get("channels"), classes=int(config.get("classes", 2)),
                      in_channels=int(config.get("in_channels", 1)),
                      dropout=float(config.get("dropout", 0.5)))


register_model_kind(MODEL_KIND, build_deepsim, overwrite=True)

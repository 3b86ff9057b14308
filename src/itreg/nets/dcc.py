"""Deep combined computing (DCC, Luo & Zhuang 2022, sec. 3.5): one network that registers a group
of N multimodal images to a common space and segments them.

Network (:class:`DCCNet`, Fig. 5 of paper 002; 2D and 3D from one code path):

- **Shared encoder** ``E`` of residual convolutional blocks (RCBs: conv3-norm-LeakyReLU-dropout-
  conv3-norm, a 1x1 projection on the residual path when the width changes), ``levels`` levels of
  ``channels * 2**(l-1)`` feature maps with 2x max pooling between them (the last level is the
  bottleneck). Its convolutions are shared by all images; its batch normalisation is
  **domain-specific** (:class:`DomainBatchNorm`): one ``BatchNorm`` per modality/domain index,
  each normalising only the images of its domain with its own statistics.
- **Segmentation decoder** ``D_s``: a U-Net decoder per image (skips from the encoder, domain-
  specific BN), a 1x1 head with ``classes`` logits; ``softmax`` gives ``rho_hat_j`` on image
  ``j``'s own grid.
- **Moment fusion**: at every level the features of the N images are fused by their mean and
  (biased) variance over the group, concatenated and passed through an RCB. Both moments are
  symmetric functions of the images, so the fusion works for any N and does not depend on the
  order of the images.
- **Registration decoder** ``D_r``: for each image, a decoder over the image's own encoder
  features concatenated with the fused features of the group (a permutation-equivariant
  design: permuting the inputs permutes the outputs). The encoder features enter ``D_r``
  detached: as in the authors' code, only the segmentation optimiser updates the encoder.
  Every decoder level has a zero-initialised 1x1 flow head; the heads' outputs are upsampled
  to full resolution and summed (authors' code), so the network starts at the identity.
- **Unbiased constraint** (Eq. 37): the N predicted fields are projected to zero group mean,
  ``d_j <- d_j - mean_i d_i`` (the code's ``zero_avg_flow``; :func:`itreg.groupwise.coreg.
  project_zero_mean` does the same on FFD parameters), so ``mean_j phi_j(x) = x``.

The network's field is a displacement (``flow="displacement"``) or a stationary velocity field
(``flow="svf"``, integrated by scaling and squaring) in **millimetres along the grid's index
axes** (component x first, like world vectors); :func:`world_displacements` rotates it by the
grid's direction matrix into world mm (LPS) and integrates an SVF, giving ``d_j`` on the common
grid with ``phi_j(x) = x + d_j(x)``: common-space world points -> image ``j``'s world points
(itreg's fixed -> moving convention). Working in index-axis mm makes a trained model independent
of the images' orientation.

The inference pieces of the extended framework (world displacements, group warping, distance
probabilities, the common anatomy ``Z^[2]``) live in :mod:`itreg.nets.dcc_group` and are
re-exported here.

The model-file kind is ``"dcc"`` (:data:`MODEL_KIND`); config + weights, rebuilt from the file
alone with ``weights_only=True`` (:func:`itreg.blocks.modelfile.build_model`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from itreg.blocks.modelfile import register_model_kind
from itreg.errors import ConfigError
from itreg.nets.dcc_group import (  # re-exported: imported from here by train and tests
    FLOWS,
    clip_probabilities,
    common_anatomy,
    distance_probabilities,
    image_ranges,
    warp_group,
    world_displacements,
)

__all__ = [
    "FLOWS",
    "MODEL_KIND",
    "NORMS",
    "DCCNet",
    "DCCOutput",
    "DomainBatchNorm",
    "build_dcc",
    "clip_probabilities",
    "common_anatomy",
    "distance_probabilities",
    "image_ranges",
    "warp_group",
    "world_displacements",
]

#: Model-file kind of deep-combined-computing networks.
MODEL_KIND = "dcc"
#: Normalisations of the registration decoder (the encoder and ``D_s`` use domain-specific BN).
NORMS = ("batch", "instance", "none")


def _ops(ndim: int):
    if ndim == 2:
        return nn.Conv2d, nn.BatchNorm2d, nn.InstanceNorm2d, nn.Dropout2d, F.max_pool2d
    return nn.Conv3d, nn.BatchNorm3d, nn.InstanceNorm3d, nn.Dropout3d, F.max_pool3d


class DomainBatchNorm(nn.Module):
    """Batch normalisation with one set of statistics and affine parameters per domain.

    Args:
        ndim: 2 or 3.
        channels: feature channels.
        domains: number of domains (modalities).
        momentum: running-statistics momentum (authors' code: 0.01).

    Shapes:
        ``forward(x (B, C, *S), domain (B,) long)``: sample ``b`` is normalised by the
        ``BatchNorm`` of ``domain[b]`` with the batch statistics of the samples of that domain
        only (training) or that domain's running statistics (eval).
    """

    def __init__(self, ndim: int, channels: int, domains: int, momentum: float = 0.01) -> None:
        super().__init__()
        bn = _ops(ndim)[1]
        self.norms = nn.ModuleList(bn(channels, momentum=momentum) for _ in range(int(domains)))

    def forward(self, x: Tensor, domain: Tensor) -> Tensor:
        if domain.shape != (x.shape[0],):
            raise ConfigError(f"domain indices {tuple(domain.shape)} do not match a batch of "
                              f"{x.shape[0]}")
        out = torch.zeros_like(x)
        for d in torch.unique(domain).tolist():
            idx = torch.nonzero(domain == d).reshape(-1)
            out = out.index_copy(0, idx, self.norms[int(d)](x.index_select(0, idx)))
        return out


class _Norm(nn.Module):
    """Domain BN, shared BN, instance norm or identity behind one ``forward(x, domain)``."""

    def __init__(self, ndim: int, channels: int, kind: str, domains: int, momentum: float):
        super().__init__()
        _, bn, inorm, _, _ = _ops(ndim)
        self.kind = kind
        if kind == "domain":
            self.norm: nn.Module = DomainBatchNorm(ndim, channels, domains, momentum)
        elif kind == "batch":
            self.norm = bn(channels, momentum=momentum)
        elif kind == "instance":
            self.norm = inorm(channels, affine=True)
        else:
            self.norm = nn.Identity()

    def forward(self, x: Tensor, domain: Tensor | None) -> Tensor:
        return self.norm(x, domain) if self.kind == "domain" else self.norm(x)


class _RCB(nn.Module):
    """Residual convolutional block: conv3-norm-act-dropout-conv3-norm (+ residual) -act."""

    def __init__(self, ndim: int, c_in: int, c_out: int, norm: str, domains: int,
                 momentum: float, dropout: float) -> None:
        super().__init__()
        conv, _, _, drop, _ = _ops(ndim)
        self.conv1 = conv(c_in, c_out, 3, padding=1)
        self.norm1 = _Norm(ndim, c_out, norm, domains, momentum)
        self.conv2 = conv(c_out, c_out, 3, padding=1)
        self.norm2 = _Norm(ndim, c_out, norm, domains, momentum)
        self.skip = conv(c_in, c_out, 1) if c_in != c_out else nn.Identity()
        self.drop = drop(dropout) if dropout > 0 else nn.Identity()
        self.act = nn.LeakyReLU(0.2)

    def forward(self, x: Tensor, domain: Tensor | None = None) -> Tensor:
        h = self.drop(self.act(self.norm1(self.conv1(x), domain)))
        h = self.norm2(self.conv2(h), domain)
        return self.act(h + self.skip(x))


@dataclass
class DCCOutput:
    """What :class:`DCCNet` predicts for ``B`` groups of ``N`` images.

    Attributes:
        logits: ``(B, N, K, *S)`` segmentation logits of each image on its own grid.
        field: ``(B, N, D, *S)`` zero-mean displacement or velocity in mm along the grid's index
            axes (component x first); see :func:`world_displacements`.
    """

    logits: Tensor
    field: Tensor

    @property
    def probabilities(self) -> Tensor:
        """``rho_hat``: ``softmax`` of the logits over the classes, ``(B, N, K, *S)``."""
        return torch.softmax(self.logits, dim=2)


class DCCNet(nn.Module):
    """The deep-combined-computing network of paper 002 (Fig. 5).

    Args:
        ndim: 2 or 3.
        domains: number of image domains (modalities); each gets its own BN statistics.
        classes: ``K``, segmentation classes (background included).
        channels: ``C``, width of the first level (level ``l`` has ``C * 2**(l-1)``; paper 16).
        levels: ``L_R``, number of levels, the last being the bottleneck (paper 4).
        flow: ``"displacement"`` (paper) or ``"svf"`` (diffeomorphic, scaling and squaring).
        svf_steps: squarings of an SVF.
        zero_mean: project the N fields to zero group mean (Eq. 37; the paper's setting).
        reg_norm: normalisation of the fusion and registration blocks (``NORMS``).
        dropout: channel dropout of every block (authors' code: 0.2).
        momentum: batch-norm momentum (authors' code: 0.01).
        domain_names: optional names of the domains (e.g. ``["t1", "t2", "pd"]``), stored in
            the model file so an application can pass contrasts by name.
        spacing_mm: the grid spacing the model was trained at (stored; applications resample
            to it), or None.
        field_scale: millimetres per unit of the flow heads' output (a larger scale makes the
            same Adam step move the field further; about one voxel suits small trainings).

    Shapes:
        ``forward(images (B, N, 1, *S) or (B, N, *S), domains (N,) or (B, N))`` ->
        :class:`DCCOutput`. Inputs of any size are padded (replicate) to a multiple of
        ``2**(levels-1)`` and the outputs cropped back.
    """

    def __init__(self, ndim: int = 2, domains: int = 3, classes: int = 4, channels: int = 16,
                 levels: int = 4, flow: str = "displacement", svf_steps: int = 7,
                 zero_mean: bool = True, reg_norm: str = "batch", dropout: float = 0.2,
                 momentum: float = 0.01, domain_names: Sequence[str] | None = None,
                 spacing_mm: Sequence[float] | float | None = None,
                 field_scale: float = 1.0) -> None:
        super().__init__()
        if ndim not in (2, 3):
            raise ConfigError(f"a DCC network is 2D or 3D, got ndim={ndim}")
        if int(domains) < 1:
            raise ConfigError(f"a DCC network needs at least one domain, got {domains}")
        if int(classes) < 2:
            raise ConfigError(f"a DCC network needs at least 2 classes, got {classes}")
        if int(channels) < 1 or int(levels) < 1:
            raise ConfigError(f"channels and levels must be >= 1, got {channels}, {levels}")
        if flow not in FLOWS:
            raise ConfigError(f"unknown DCC flow {flow!r}; valid: {', '.join(FLOWS)}")
        if reg_norm not in NORMS:
            raise ConfigError(f"unknown registration norm {reg_norm!r}; valid: {', '.join(NORMS)}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {dropout}")
        if not float(field_scale) > 0:
            raise ConfigError(f"field_scale must be > 0, got {field_scale}")
        if domain_names is not None and len(domain_names) != int(domains):
            raise ConfigError(f"{len(domain_names)} domain names for {domains} domains")
        if isinstance(spacing_mm, (int, float)):
            spacing_mm = [float(spacing_mm)] * int(ndim)
        self.ndim, self.domains, self.classes = int(ndim), int(domains), int(classes)
        self.channels, self.levels, self.flow = int(channels), int(levels), flow
        self.svf_steps, self.zero_mean, self.reg_norm = int(svf_steps), bool(zero_mean), reg_norm
        self.dropout, self.momentum = float(dropout), float(momentum)
        self.domain_names = None if domain_names is None else [str(n) for n in domain_names]
        self.spacing_mm = None if spacing_mm is None else [float(s) for s in spacing_mm]
        self.field_scale = float(field_scale)
        conv = _ops(ndim)[0]
        w = [self.channels * 2**i for i in range(self.levels)]
        self.widths = w
        blk = {"domains": self.domains, "momentum": self.momentum, "dropout": self.dropout}
        self.encoder = nn.ModuleList(
            _RCB(ndim, 1 if i == 0 else w[i - 1], w[i], "domain", **blk)
            for i in range(self.levels))
        self.seg_decoder = nn.ModuleList(
            _RCB(ndim, w[i + 1] + w[i], w[i], "domain", **blk)
            for i in reversed(range(self.levels - 1)))
        self.seg_head = conv(w[0], self.classes, 1)
        self.fusion = nn.ModuleList(_RCB(ndim, 2 * w[i], w[i], reg_norm, **blk)
                                    for i in range(self.levels))
        top = self.levels - 1
        reg = [_RCB(ndim, 2 * w[top], w[top], reg_norm, **blk)]
        reg += [_RCB(ndim, w[i + 1] + 2 * w[i], w[i], reg_norm, **blk)
                for i in reversed(range(self.levels - 1))]
        self.reg_decoder = nn.ModuleList(reg)
        heads = []
        for i in reversed(range(self.levels)):
            head = conv(w[i], self.ndim, 1)
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
            heads.append(head)
        self.flow_heads = nn.ModuleList(heads)

    # ----------------------------------------------------------------- parameter groups
    def segmentation_parameters(self) -> list[nn.Parameter]:
        """Parameters of the encoder and the segmentation decoder (``E``, ``D_s``)."""
        mods = [self.encoder, self.seg_decoder, self.seg_head]
        return [p for m in mods for p in m.parameters()]

    def registration_parameters(self) -> list[nn.Parameter]:
        """Parameters of the moment fusion and the registration decoder (``D_r``)."""
        mods = [self.fusion, self.reg_decoder, self.flow_heads]
        return [p for m in mods for p in m.parameters()]

    def config(self) -> dict[str, Any]:
        """Constructor settings as plain data (stored in model files)."""
        return {"ndim": self.ndim, "domains": self.domains, "classes": self.classes,
                "channels": self.channels, "levels": self.levels, "flow": self.flow,
                "svf_steps": self.svf_steps, "zero_mean": self.zero_mean,
                "reg_norm": self.reg_norm, "dropout": self.dropout, "momentum": self.momentum,
                "domain_names": self.domain_names, "spacing_mm": self.spacing_mm,
                "field_scale": self.field_scale}

    # ----------------------------------------------------------------------- forward
    def _inputs(self, images: Tensor, domains: Tensor | Sequence[int]) -> tuple[Tensor, Tensor]:
        d = self.ndim
        if images.dim() == d + 2:
            images = images.unsqueeze(2)
        if images.dim() != d + 3 or images.shape[2] != 1:
            raise ConfigError(f"DCCNet expects images (B, N, 1, *S) with {d} spatial axes, got "
                              f"{tuple(images.shape)}")
        b, n = images.shape[:2]
        if n < 2:
            raise ConfigError(f"a group needs at least two images, got {n}")
        dom = torch.as_tensor(domains, dtype=torch.long, device=images.device)
        if dom.dim() == 1:
            dom = dom.unsqueeze(0).expand(b, n)
        if tuple(dom.shape) != (b, n):
            raise ConfigError(f"domains must be (N,) or (B, N) = {(b, n)}, got "
                              f"{tuple(dom.shape)}")
        if int(dom.min()) < 0 or int(dom.max()) >= self.domains:
            raise ConfigError(f"domain indices must lie in 0..{self.domains - 1}, got "
                              f"{sorted(set(dom.reshape(-1).tolist()))}")
        return images, dom

    def forward(self, images: Tensor, domains: Tensor | Sequence[int],
                train: str = "all") -> DCCOutput:
        """Segment every image and predict every image's field.

        Args:
            images: ``(B, N, 1, *S)`` (or ``(B, N, *S)``) intensities, normalised per image.
            domains: ``(N,)`` or ``(B, N)`` domain index of each image.
            train: which branch gets gradients: ``"all"``, ``"seg"`` (``E`` and ``D_s``; the
                field is computed without gradients) or ``"reg"`` (``D_r``; the segmentation
                without gradients). Used by the alternating training.

        Returns:
            :class:`DCCOutput`.
        """
        if train not in ("all", "seg", "reg"):
            raise ConfigError(f"train must be 'all', 'seg' or 'reg', got {train!r}")
        images, dom = self._inputs(images, domains)
        b, n = images.shape[:2]
        size = tuple(images.shape[3:])
        x = images.reshape(b * n, 1, *size)
        mult = 2 ** (self.levels - 1)
        pad: list[int] = []
        for s in reversed(size):
            pad += [0, (-s) % mult]
        if any(pad):
            x = F.pad(x, pad, mode="replicate")
        dflat = dom.reshape(-1)
        pool = _ops(self.ndim)[4]
        no_seg = torch.no_grad() if train == "reg" else contextlib.nullcontext()
        with no_seg:
            feats = []
            h = x
            for i, block in enumerate(self.encoder):
                if i > 0:
                    h = pool(h, 2)
                h = block(h, dflat)
                feats.append(h)
            s = feats[-1]
            for j, block in enumerate(self.seg_decoder):
                level = self.levels - 2 - j
                s = self._up(s, feats[level].shape[2:])
                s = block(torch.cat([s, feats[level]], dim=1), dflat)
            logits = self.seg_head(s)
        no_reg = torch.no_grad() if train == "seg" else contextlib.nullcontext()
        with no_reg:
            field = self._register([f.detach() for f in feats], b, n)
        crop = (slice(None), slice(None)) + tuple(slice(0, s_) for s_ in size)
        logits = logits[crop].reshape(b, n, self.classes, *size)
        field = field[crop].reshape(b, n, self.ndim, *size) * self.field_scale
        if self.zero_mean:
            field = field - field.mean(dim=1, keepdim=True)
        return DCCOutput(logits, field)

    def _up(self, h: Tensor, shape) -> Tensor:
        mode = "bilinear" if self.ndim == 2 else "trilinear"
        return F.interpolate(h, size=tuple(shape), mode=mode, align_corners=False)

    def _register(self, feats: list[Tensor], b: int, n: int) -> Tensor:
        fused = []
        for level, f in enumerate(feats):
            g = f.reshape(b, n, *f.shape[1:])
            moments = torch.cat([g.mean(dim=1), g.var(dim=1, unbiased=False)], dim=1)
            fused.append(self.fusion[level](moments))
        full = feats[0].shape[2:]
        field = None
        h = None
        for j, block in enumerate(self.reg_decoder):
            level = self.levels - 1 - j
            f = feats[level]
            g = fused[level].repeat_interleave(n, dim=0)
            parts = [f, g] if h is None else [self._up(h, f.shape[2:]), f, g]
            h = block(torch.cat(parts, dim=1))
            flow = self.flow_heads[j](h)
            if tuple(flow.shape[2:]) != tuple(full):
                flow = self._up(flow, full)
            field = flow if field is None else field + flow
        return field


def build_dcc(config: Mapping[str, Any]) -> DCCNet:
    """Rebuild a :class:`DCCNet` from its stored config (model-file builder)."""
    keys = ("ndim", "domains", "classes", "channels", "levels", "flow", "svf_steps",
            "zero_mean", "reg_norm", "dropout", "momentum", "domain_names", "spacing_mm",
            "field_scale")
    return DCCNet(**{k: config[k] for k in keys if k in config})


register_model_kind(MODEL_KIND, build_dcc, overwrite=True)

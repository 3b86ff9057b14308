"""Pairwise registration networks: AffineNet, DeformNet (U-Net) and their Cascade.

The networks of papers 001 (MIRegNet: AffineNet + DeformNet), 003 (DivRegNet: a VoxelMorph-style
U-Net with squeeze-and-excitation in the decoder) and 004 (DeepSim's registration U-Net), built
on itreg's transforms, warps and grids so that their predictions are ordinary itreg transforms:

- :class:`AffineNet`: a strided CNN on the concatenated fixed and moving images, global average
  pooling and a zero-initialised linear head (identity at initialisation). It predicts a
  ``D x (D+1)`` matrix acting on the ``grid_sample`` (normalised) coordinates of the fixed grid;
  :class:`~itreg.grid.Grid`'s ``world_to_normalized_matrix`` turns it into a world-space affine
  ``T(x) = A (x - c) + c + t`` with the centre of rotation ``c`` at the fixed image centre,
  valid for any spacing, direction and origin and written to ``.tfm`` by
  :func:`itreg.io.write_transform` exactly like the engine's.
- :class:`DeformNet`: a U-Net with ``levels`` stride-2 encoder levels and as many decoder levels
  with skip connections, optional squeeze-and-excitation blocks in the decoder (DivRegNet) and
  instance/batch/no normalisation. Its flow head (zero-initialised: the identity at
  initialisation) predicts a displacement in voxels along the ITK axes, converted to world mm
  with the grid's ``direction @ diag(spacing)``; with ``field="svf"`` that is a stationary
  velocity integrated by scaling and squaring
  (:func:`itreg.transforms.dense.integrate_velocity`, the transforms' own code).
- :class:`Cascade`: AffineNet first, then DeformNet on the fixed image and the affinely warped
  moving image; the whole map is ``Compose(affine, field)`` (the field deforms fixed points
  first, then the affine maps them into the moving image, as staged registration composes).

Their blocks (convolutions, squeeze-and-excitation, padding, batch warping, :class:`RegOutput`,
the affine algebra) are in :mod:`itreg.nets.regnet_blocks`, re-exported here.

Any input size works: the networks pad their input with zeros to a multiple of ``2**levels``
(at least ``2**(levels+1)`` voxels per axis) and crop the output back. 2D and 3D share one code
path (``ndim`` picks the layer types).

**Batch forward (training).** ``net(fixed, moving, grid)`` takes intensity-normalised tensors
``(B, C, *S)`` on one grid (the moving images already resampled onto it) and returns a
:class:`RegOutput`: the warped moving images, the displacement ``T(x) - x`` of the whole map in
world mm ``(B, D, *S)``, the mapped points and, where present, the world affine matrices and the
deformable part's displacement (for regularisers). Warping goes through
:func:`itreg.warp.sample`, so it follows itreg's conventions (linear interpolation, zero outside
the moving image's voxel extent) and is differentiable.

**Prediction.** ``net.predict(fixed, moving)`` takes two :class:`~itreg.image.Image` on any grids,
resamples the moving image onto the fixed grid (the identity in world space, so a map into the
resampled image is a map into the original moving image: nothing else to compose), normalises
the intensities with the setting stored in the network's config and returns the fixed -> moving
world transform: an :class:`~itreg.transforms.Affine`, a
:class:`~itreg.transforms.DisplacementField` on the fixed grid (an SVF network returns its
integrated field) or ``Compose(Affine, DisplacementField)``.

**Model files.** :func:`save_regnet` / :func:`load_regnet` use :mod:`itreg.blocks.modelfile`
(kinds ``"regnet-affine"``, ``"regnet-deform"``, ``"regnet-cascade"``): configuration and
weights, loaded from the file alone with ``weights_only=True``.

Example:
    >>> import torch
    >>> from itreg.grid import Grid
    >>> net = DeformNet(2, features=(4, 4, 4, 4, 4))
    >>> grid = Grid((20, 17), spacing=(2.0, 2.0))
    >>> x = torch.rand(1, 1, 17, 20)
    >>> out = net(x, x, grid)
    >>> tuple(out.displacement.shape), float(out.displacement.abs().max())
    ((1, 2, 17, 20), 0.0)
"""

from __future__ import annotations

import abc
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from itreg.blocks.modelfile import build_model, load_model, register_model_kind, save_model
from itreg.errors import ConfigError, GeometryError, ModelFileError
from itreg.grid import Grid
from itreg.image import Image
from itreg.metrics.intensity import DEFAULT_PERCENTILES, check_intensity, intensity_range, rescale
from itreg.nets.regnet_blocks import (  # re-exported: train and tests import them from here
    FIELDS,
    NORMS,
    ConvBlock,
    RegOutput,
    SqueezeExcitation,
    _affine_transform,
    _check_choice,
    _check_features,
    _check_ndim,
    _field_transform,
    _layer,
    _pad,
    apply_affine,
    warp_batch,
    world_affine,
)
from itreg.transforms import Compose, Transform
from itreg.transforms.dense import integrate_velocity
from itreg.warp import resample

logger = logging.getLogger(__name__)

__all__ = [
    "FIELDS",
    "MODEL_KINDS",
    "NORMS",
    "AffineNet",
    "Cascade",
    "DeformNet",
    "RegNet",
    "RegOutput",
    "load_regnet",
    "save_regnet",
    "warp_batch",
]

MODEL_KINDS = {"affine": "regnet-affine", "deform": "regnet-deform", "cascade": "regnet-cascade"}
"""Model-file kinds of the three network types."""


# ---------------------------------------------------------------------------------- base
class RegNet(nn.Module, abc.ABC):
    """Base class: input checks, intensity normalisation, ``predict`` and the model config.

    Args:
        ndim: 2 or 3.
        in_channels: channels of the concatenated input (fixed + moving); each image has
            ``in_channels // 2``.
        intensity: intensity normalisation of :meth:`normalise` (``"percentile"``,
            ``"minmax"`` or ``"none"``, see :mod:`itreg.metrics.intensity`): each image is
            mapped linearly from its range to ``[0, 1]`` and clamped.
        percentiles: the robust range of ``"percentile"``.
    """

    kind: str = ""

    def __init__(self, ndim: int, in_channels: int = 2, intensity: str = "percentile",
                 percentiles: Sequence[float] = DEFAULT_PERCENTILES) -> None:
        super().__init__()
        self.ndim = _check_ndim(ndim)
        if isinstance(in_channels, bool) or int(in_channels) != in_channels or \
                int(in_channels) < 2 or int(in_channels) % 2:
            raise ConfigError(f"in_channels must be an even integer >= 2 (fixed + moving), got "
                              f"{in_channels!r}")
        self.in_channels = int(in_channels)
        self.percentiles = tuple(float(p) for p in check_intensity(intensity, percentiles))
        self.intensity = intensity

    @property
    def model_kind(self) -> str:
        """The model-file kind of this network."""
        return MODEL_KINDS[self.kind]

    def intensity_config(self) -> dict[str, Any]:
        return {"intensity": self.intensity, "percentiles": list(self.percentiles)}

    @abc.abstractmethod
    def config(self) -> dict[str, Any]:
        """Plain JSON-able constructor settings (stored in model files)."""

    # ---------------------------------------------------------------- inputs
    def normalise(self, data: Tensor, mask: Tensor | None = None) -> Tensor:
        """Map one image ``(C, *S)`` from its intensity range to ``[0, 1]`` (clamped), float32.

        Raises:
            InvalidImageError: a constant image (no range).
        """
        data = data.to(torch.float32) if not data.is_floating_point() else data
        lo, hi = intensity_range(data.detach(), mask, self.intensity, self.percentiles)
        return rescale(data, lo, hi, clamp=True)

    def check_inputs(self, fixed: Tensor, moving: Tensor, grid: Grid) -> None:
        """Validate a batch ``(B, C, *S)`` pair and its grid.

        Raises:
            GeometryError: wrong dimension, shapes, channels or grid.
        """
        for name, t in (("fixed", fixed), ("moving", moving)):
            if not isinstance(t, Tensor) or t.dim() != self.ndim + 2:
                shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
                raise GeometryError(
                    f"{name} must be a batch (B, C, *S) of {self.ndim}D images, got {shape}; "
                    f"this is a {self.ndim}D network")
        if fixed.shape != moving.shape:
            raise GeometryError(f"fixed {tuple(fixed.shape)} and moving {tuple(moving.shape)} "
                                "must have the same shape (resample moving onto the fixed grid)")
        if 2 * fixed.shape[1] != self.in_channels:
            raise GeometryError(
                f"the network takes {self.in_channels // 2} channel(s) per image, got "
                f"{fixed.shape[1]}")
        if not isinstance(grid, Grid) or grid.ndim != self.ndim or \
                tuple(grid.shape) != tuple(fixed.shape[2:]):
            raise GeometryError(f"grid {grid!r} does not match the images' spatial shape "
                                f"{tuple(fixed.shape[2:])}")

    def _device(self) -> torch.device:
        return next(self.parameters()).device

    # ---------------------------------------------------------------- prediction
    def prepare(self, fixed: Image, moving: Image) -> tuple[Tensor, Tensor]:
        """Normalised ``(1, C, *S)`` tensors of a pair on the fixed grid (moving resampled)."""
        if not isinstance(fixed, Image) or not isinstance(moving, Image):
            raise ConfigError("predict takes two itreg Images (fixed, moving)")
        if fixed.ndim != self.ndim or moving.ndim != self.ndim:
            raise GeometryError(f"this is a {self.ndim}D network; got a {fixed.ndim}D fixed and "
                                f"a {moving.ndim}D moving image")
        if moving.channels != fixed.channels:
            raise GeometryError(f"fixed has {fixed.channels} channel(s), moving "
                                f"{moving.channels}")
        fixed.check_finite("fixed image")
        moving.check_finite("moving image")
        mov = moving.float() if not moving.data.is_floating_point() else moving
        mov = Image(mov.data, mov.grid, is_label=False)
        if not mov.grid.same_as(fixed.grid):
            mov = resample(mov, None, fixed.grid, mode="linear")
        f = self.normalise(fixed.data)
        m = self.normalise(mov.data)
        return f[None], m[None]

    def predict(self, fixed: Image, moving: Image) -> Transform:
        """The fixed -> moving world transform of one pair (any grids, any size).

        The moving image is resampled onto the fixed grid by the identity (world points are
        kept, so the returned map reaches the original moving image's world points directly),
        both are normalised (:meth:`normalise`), and the network runs once in eval mode on the
        images' device (the network moves there).

        Returns:
            An :class:`~itreg.transforms.Affine` (AffineNet), a
            :class:`~itreg.transforms.DisplacementField` on the fixed grid (DeformNet) or
            ``Compose(Affine, DisplacementField)`` (Cascade); float32, parameters not requiring
            gradients (call ``requires_grad_()`` to optimise them further).

        Raises:
            GeometryError: dimension or channel mismatch.
            InvalidImageError: NaN/Inf voxels or a constant image.
        """
        if self._device() != fixed.device:
            self.to(fixed.device)
        f, m = self.prepare(fixed, moving.to(fixed.device))
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                out = self(f, m, fixed.grid)
        finally:
            self.train(was_training)
        return self.transform_from_output(out, fixed.grid).requires_grad_(False)

    @abc.abstractmethod
    def transform_from_output(self, out: RegOutput, grid: Grid, index: int = 0) -> Transform:
        """The itreg transform of batch item `index` of a forward output on `grid`."""


# ---------------------------------------------------------------------------------- AffineNet
class AffineNet(RegNet):
    """CNN predicting an affine map from the concatenated fixed and moving images.

    ``len(features)`` stride-2 convolution blocks, global average pooling, and a linear head
    whose weights and bias are zero, added to the identity: the prediction at initialisation
    is the identity. The head's ``D x (D+1)`` output ``[A_n | t_n]`` maps normalised fixed
    coordinates ``u`` (``grid_sample``'s, ITK order) to ``A_n u + t_n``; in world space that
    is ``H_w = M^-1 H_n M`` with ``M`` the grid's ``world_to_normalized_matrix``. The normalised
    origin is the grid centre, so rotations and scalings turn about the fixed image centre.

    Args:
        ndim: 2 or 3.
        in_channels: input channels (fixed + moving), default 2.
        features: widths of the stride-2 blocks.
        norm: ``"instance"`` (paper 001), ``"batch"`` or ``"none"``.
        intensity: intensity normalisation of :meth:`predict` (see :class:`RegNet`).
        percentiles: its robust range.
    """

    kind = "affine"

    def __init__(self, ndim: int, in_channels: int = 2,
                 features: Sequence[int] = (16, 32, 64, 128), norm: str = "instance",
                 intensity: str = "percentile",
                 percentiles: Sequence[float] = DEFAULT_PERCENTILES) -> None:
        super().__init__(ndim, in_channels, intensity, percentiles)
        self.features = _check_features(features, None, "AffineNet features")
        self.norm = _check_choice("normalisation", norm, NORMS)
        blocks: list[nn.Module] = []
        c = self.in_channels
        for f in self.features:
            blocks.append(ConvBlock(self.ndim, c, f, stride=2, norm=self.norm))
            c = f
        self.encoder = nn.Sequential(*blocks)
        d = self.ndim
        self.head = nn.Linear(c, d * (d + 1))
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)
        self.register_buffer("identity", torch.eye(d, d + 1), persistent=False)

    def config(self) -> dict[str, Any]:
        return {"ndim": self.ndim, "in_channels": self.in_channels,
                "features": list(self.features), "norm": self.norm, **self.intensity_config()}

    def normalized_matrix(self, fixed: Tensor, moving: Tensor) -> Tensor:
        """``(B, D, D+1)`` map in normalised coordinates (identity at initialisation)."""
        x, _ = _pad(torch.cat([fixed, moving], dim=1), len(self.features))
        h = self.encoder(x).mean(dim=tuple(range(2, x.dim())))
        b, d = fixed.shape[0], self.ndim
        return self.identity.to(h.dtype) + self.head(h).view(b, d, d + 1)

    def forward(self, fixed: Tensor, moving: Tensor, grid: Grid) -> RegOutput:
        """Batch forward: see :class:`RegOutput` (``field`` is None)."""
        self.check_inputs(fixed, moving, grid)
        theta = self.normalized_matrix(fixed, moving)
        world = world_affine(theta, grid)
        points = grid.points(dtype=fixed.dtype, device=fixed.device)
        mapped = apply_affine(world, points)
        warped = warp_batch(moving, grid, mapped)
        disp = torch.movedim(mapped - points, -1, 1)
        return RegOutput(warped=warped, displacement=disp, points=mapped, affine=world)

    def transform_from_output(self, out: RegOutput, grid: Grid, index: int = 0) -> Transform:
        return _affine_transform(out.affine[index], grid)


# ---------------------------------------------------------------------------------- DeformNet
class DeformNet(RegNet):
    """VoxelMorph-style U-Net predicting a dense displacement (or velocity) in world mm.

    Encoder: a full-resolution block of width ``features[0]`` and ``levels`` stride-2 blocks of
    widths ``features[1:]``. Decoder: ``levels`` blocks, each upsampling by 2 (linear),
    concatenating the encoder's skip of that resolution and convolving to ``features[i]``,
    followed by squeeze-and-excitation when ``se``. Flow head: a 3x3 convolution to ``D``
    channels, zero-initialised (identity at initialisation). The head's output is a
    displacement in voxels along the ITK axes (channel 0 = x), converted to world mm with
    ``direction @ diag(spacing)`` of the grid (the linear part of its index-to-world matrix).

    Args:
        ndim: 2 or 3.
        features: ``levels + 1`` widths (None: ``(16, 32, ..., 32)``).
        levels: number of down-/up-sampling levels (4 as VoxelMorph and DivRegNet).
        se: squeeze-and-excitation blocks in the decoder (DivRegNet).
        norm: ``"instance"``, ``"batch"`` or ``"none"``.
        field: ``"displacement"`` or ``"svf"`` (stationary velocity, diffeomorphic).
        steps: scaling-and-squaring steps of an SVF.
        in_channels: input channels (fixed + moving), default 2.
        intensity: intensity normalisation of :meth:`predict` (see :class:`RegNet`).
        percentiles: its robust range.
    """

    kind = "deform"

    def __init__(self, ndim: int, features: Sequence[int] | None = None, levels: int = 4,
                 se: bool = False, norm: str = "instance", field: str = "displacement",
                 steps: int = 7, in_channels: int = 2, intensity: str = "percentile",
                 percentiles: Sequence[float] = DEFAULT_PERCENTILES) -> None:
        super().__init__(ndim, in_channels, intensity, percentiles)
        if isinstance(levels, bool) or int(levels) != levels or not 1 <= int(levels) <= 6:
            raise ConfigError(f"levels must be an integer in 1..6, got {levels!r}")
        self.levels = int(levels)
        if features is None:
            features = (16,) + (32,) * self.levels
        self.features = _check_features(features, self.levels + 1, "DeformNet features")
        self.norm = _check_choice("normalisation", norm, NORMS)
        self.field_kind = _check_choice("field", field, FIELDS)
        if isinstance(steps, bool) or int(steps) != steps or int(steps) < 0:
            raise ConfigError(f"steps must be an integer >= 0, got {steps!r}")
        self.steps = int(steps)
        self.se = bool(se)
        nd, fs = self.ndim, self.features
        self.inc = ConvBlock(nd, self.in_channels, fs[0], norm=self.norm)
        self.down = nn.ModuleList(ConvBlock(nd, fs[i], fs[i + 1], stride=2, norm=self.norm)
                                  for i in range(self.levels))
        self.up = nn.ModuleList(ConvBlock(nd, fs[i + 1] + fs[i], fs[i], norm=self.norm)
                                for i in range(self.levels))
        self.attention = nn.ModuleList(SqueezeExcitation(fs[i]) if self.se else nn.Identity()
                                       for i in range(self.levels))
        self.head = _layer("Conv", nd)(fs[0], nd, 3, padding=1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def config(self) -> dict[str, Any]:
        return {"ndim": self.ndim, "in_channels": self.in_channels,
                "features": list(self.features), "levels": self.levels, "se": self.se,
                "norm": self.norm, "field": self.field_kind, "steps": self.steps,
                **self.intensity_config()}

    def flow(self, fixed: Tensor, moving: Tensor) -> Tensor:
        """The head's output ``(B, D, *S)`` in voxels along the ITK axes (before conversion)."""
        x, crop = _pad(torch.cat([fixed, moving], dim=1), self.levels)
        skips = [self.inc(x)]
        for block in self.down:
            skips.append(block(skips[-1]))
        h = skips[-1]
        mode = "bilinear" if self.ndim == 2 else "trilinear"
        for i in reversed(range(self.levels)):
            h = F.interpolate(h, size=skips[i].shape[2:], mode=mode, align_corners=False)
            h = self.attention[i](self.up[i](torch.cat([h, skips[i]], dim=1)))
        out = self.head(h)
        return out[(slice(None), slice(None), *crop)]

    def world_field(self, fixed: Tensor, moving: Tensor, grid: Grid) -> tuple[Tensor, Tensor | None]:
        """``(displacement, velocity)`` ``(B, D, *S)`` in world mm (velocity None unless SVF)."""
        voxels = self.flow(fixed, moving)
        lin = torch.as_tensor(grid.index_to_world_matrix()[:-1, :-1], dtype=voxels.dtype,
                              device=voxels.device)
        world = torch.einsum("ij,bj...->bi...", lin, voxels)
        if self.field_kind == "displacement":
            return world, None
        disp = torch.stack([integrate_velocity(v, grid, self.steps) for v in world])
        return disp, world

    def forward(self, fixed: Tensor, moving: Tensor, grid: Grid) -> RegOutput:
        """Batch forward: see :class:`RegOutput` (``affine`` is None)."""
        self.check_inputs(fixed, moving, grid)
        disp, velocity = self.world_field(fixed, moving, grid)
        points = grid.points(dtype=fixed.dtype, device=fixed.device)
        mapped = points + torch.movedim(disp, 1, -1)
        warped = warp_batch(moving, grid, mapped)
        return RegOutput(warped=warped, displacement=disp, points=mapped, field=disp,
                         velocity=velocity)

    def transform_from_output(self, out: RegOutput, grid: Grid, index: int = 0) -> Transform:
        return _field_transform(out.field[index], grid)


# ---------------------------------------------------------------------------------- Cascade
class Cascade(RegNet):
    """AffineNet, then DeformNet on the fixed image and the affinely warped moving image.

    The whole map is ``T = A o phi`` (``Compose(affine, field)``): ``T(x) = A (x + d(x)) + b``;
    the moving image is warped once through it (no double interpolation in the output).
    The cascade's intensity setting and input channels are the affine network's.

    Args:
        affine: the :class:`AffineNet`.
        deform: the :class:`DeformNet` (same ``ndim`` and ``in_channels``).
    """

    kind = "cascade"

    def __init__(self, affine: AffineNet, deform: DeformNet) -> None:
        if not isinstance(affine, AffineNet) or not isinstance(deform, DeformNet):
            raise ConfigError("Cascade takes an AffineNet and a DeformNet")
        if affine.ndim != deform.ndim or affine.in_channels != deform.in_channels:
            raise GeometryError(f"cascade parts differ: {affine.ndim}D/{affine.in_channels} "
                                f"channels vs {deform.ndim}D/{deform.in_channels} channels")
        super().__init__(affine.ndim, affine.in_channels, affine.intensity, affine.percentiles)
        self.affine = affine
        self.deform = deform

    def config(self) -> dict[str, Any]:
        return {"affine": self.affine.config(), "deform": self.deform.config()}

    def forward(self, fixed: Tensor, moving: Tensor, grid: Grid,
                freeze_affine: bool = False) -> RegOutput:
        """Batch forward; ``freeze_affine`` runs the affine part without gradients (two-stage
        training of the deformable part)."""
        self.check_inputs(fixed, moving, grid)
        if freeze_affine:
            with torch.no_grad():
                first = self.affine(fixed, moving, grid)
        else:
            first = self.affine(fixed, moving, grid)
        disp, velocity = self.deform.world_field(fixed, first.warped, grid)
        points = grid.points(dtype=fixed.dtype, device=fixed.device)
        inner = points + torch.movedim(disp, 1, -1)
        mapped = apply_affine(first.affine, inner, batched=True)
        warped = warp_batch(moving, grid, mapped)
        return RegOutput(warped=warped, displacement=torch.movedim(mapped - points, -1, 1),
                         points=mapped, affine=first.affine, field=disp, velocity=velocity,
                         affine_warped=first.warped)

    def transform_from_output(self, out: RegOutput, grid: Grid, index: int = 0) -> Transform:
        return Compose(_affine_transform(out.affine[index], grid),
                       _field_transform(out.field[index], grid))


# ---------------------------------------------------------------------------------- files
def _build_affine(config: dict[str, Any]) -> AffineNet:
    return AffineNet(**config)


def _build_deform(config: dict[str, Any]) -> DeformNet:
    return DeformNet(**config)


def _build_cascade(config: dict[str, Any]) -> Cascade:
    try:
        return Cascade(AffineNet(**config["affine"]), DeformNet(**config["deform"]))
    except KeyError as exc:
        raise ConfigError(f"a cascade config needs 'affine' and 'deform' parts: {exc}") from exc


register_model_kind(MODEL_KINDS["affine"], _build_affine)
register_model_kind(MODEL_KINDS["deform"], _build_deform)
register_model_kind(MODEL_KINDS["cascade"], _build_cascade)


def save_regnet(path: str | os.PathLike, net: RegNet, extra: dict[str, Any] | None = None,
                force: bool = False) -> Path:
    """Write a registration network's config and weights as an itreg model file.

    Args:
        path: output file (``.pt``).
        net: an :class:`AffineNet`, :class:`DeformNet` or :class:`Cascade`.
        extra: plain JSON-able metadata (the training configuration and log).
        force: replace an existing file.

    Raises:
        ConfigError: `net` is not a registration network, or `extra` is not plain data.
        OutputExistsError: `path` exists and `force` is False.
    """
    if not isinstance(net, RegNet):
        raise ConfigError(f"save_regnet takes an AffineNet, DeformNet or Cascade, got "
                          f"{type(net).__name__}")
    return save_model(path, net.model_kind, net.config(), net.state_dict(), extra, force=force)


def load_regnet(path: str | os.PathLike, map_location: Any = "cpu") -> RegNet:
    """Rebuild a registration network from its model file alone (``weights_only=True``).

    The file's ``extra`` metadata is attached as ``net.extra``. The network is in eval mode, on
    `map_location` (a device name or ``torch.device``).

    Raises:
        ModelFileError: not an itreg model file, another version, or not a registration
            network.
    """
    kind, _, _, _ = load_model(path, map_location=map_location)
    if kind not in MODEL_KINDS.values():
        raise ModelFileError(f"model file {str(path)!r} holds a {kind!r} model, not a "
                             f"registration network ({', '.join(MODEL_KINDS.values())})")
    net, extra = build_model(path, expected_kind=kind, map_location=map_location)
    if isinstance(map_location, (str, torch.device)):
        net.to(torch.device(map_location))  # the module is built on the CPU
    net.extra = extra
    return net

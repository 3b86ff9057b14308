"""Training data of DITR (:func:`itreg.train.ditr.train_ditr`): aligned pairs and their masks,
the images of one IML stage, patch sampling with augmentation and random bias fields, and the
classifier's accuracy on labelled patch pairs.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from itreg.blocks.ditr import DITRNet, extract_patches
from itreg.errors import GeometryError, InvalidImageError
from itreg.image import Image
from itreg.metrics.frozen import safe_range, scale_intensity
from itreg.train.ditr_config import IMLStage
from itreg.transforms import Transform

__all__ = ["PatchSampler", "StageImages", "TrainingPair", "augment_pairs", "classifier_accuracy",
           "prepare_stage", "random_bias_fields"]


@dataclass
class TrainingPair:
    """One roughly aligned training pair.

    Attributes:
        fixed: the fixed image (scalar, 2D or 3D).
        moving: the moving image (any grid of the same dimension).
        mask: foreground of the fixed image (an Image on the fixed grid, or a bool tensor of
            its shape); None thresholds the fixed image (scaled > 0.05, dilated 2 voxels).
        init: initial fixed -> moving transform ``beta^0`` (None: identity).
    """

    fixed: Image
    moving: Image
    mask: Image | Tensor | None = None
    init: Transform | None = None


@dataclass
class StageImages:
    """A pair at one IML stage's resolution, intensities scaled to ``[0, 1]``.

    Attributes:
        fixed: fixed image on the decimated fixed grid.
        moving: moving image on its decimated grid.
        mask: bool foreground ``(*S)`` of the decimated fixed grid.
        foreground: its voxel indices ``(N, D)`` in tensor order.
    """

    fixed: Image
    moving: Image
    mask: Tensor
    foreground: Tensor


def _default_mask(fixed: Image) -> Tensor:
    data = scale_intensity(fixed.data, safe_range(fixed.data, None, "minmax", (0.0, 100.0)))
    m = (data[0] > 0.05).float()[None, None]
    pool = nn.functional.max_pool2d if fixed.ndim == 2 else nn.functional.max_pool3d
    return pool(m, 5, stride=1, padding=2)[0, 0] > 0


def pair_mask(pair: TrainingPair) -> Tensor:
    if pair.mask is None:
        return _default_mask(pair.fixed)
    m = pair.mask.data[0] if isinstance(pair.mask, Image) else torch.as_tensor(pair.mask)
    if tuple(m.shape) != tuple(pair.fixed.grid.shape):
        raise GeometryError(f"a training mask of shape {tuple(m.shape)} does not match its "
                            f"fixed image {tuple(pair.fixed.grid.shape)}")
    m = m.to(pair.fixed.device) != 0
    if not bool(m.any()):
        raise InvalidImageError("a training mask selects no voxels")
    return m


def _downsample(image: Image, stride: int) -> Image:
    from itreg.engine.pyramid import smooth_image

    data = image.data if image.data.is_floating_point() else image.data.float()
    image = Image(data, image.grid, is_label=False)
    if stride <= 1:
        return image
    sigma = 0.5 * stride * min(image.grid.spacing)
    return smooth_image(image, sigma, stride)


def prepare_stage(pair: TrainingPair, stage: IMLStage) -> StageImages:
    """Downsample (blur + decimate) and scale a pair for an IML stage.

    Intensities are min-max scaled to ``[0, 1]`` per image, the scaling the DITR metric uses.
    """
    for name, img in (("fixed", pair.fixed), ("moving", pair.moving)):
        if img.channels != 1:
            raise GeometryError(f"DITR trains on scalar images; a {name} image has "
                                f"{img.channels} channels")
        if not bool(torch.isfinite(img.data).all()):
            raise InvalidImageError(f"a {name} training image has NaN or Inf voxels")
    if pair.fixed.ndim != pair.moving.ndim or pair.fixed.ndim not in (2, 3):
        raise GeometryError("training pairs must be both 2D or both 3D")
    s = stage.stride
    fixed = _downsample(pair.fixed, s)
    moving = _downsample(pair.moving, s)
    fixed = fixed.with_data(scale_intensity(fixed.data, safe_range(
        fixed.data, None, "minmax", (0.0, 100.0))), is_label=False)
    moving = moving.with_data(scale_intensity(moving.data, safe_range(
        moving.data, None, "minmax", (0.0, 100.0))), is_label=False)
    mask = pair_mask(pair)
    mask = mask[(slice(None, None, s),) * mask.dim()].contiguous()
    if tuple(mask.shape) != tuple(fixed.grid.shape):
        raise GeometryError("internal: decimated mask and image disagree")
    fg = torch.nonzero(mask, as_tuple=False)
    if fg.shape[0] == 0:
        raise InvalidImageError("a training mask selects no voxels at this resolution")
    return StageImages(fixed, moving, mask, fg)


def augment_pairs(pairs: Tensor, generator: torch.Generator) -> Tensor:
    """The same random 90-degree rotation and flips on both channels of each pair.

    Args:
        pairs: ``(B, 2, *P)`` square/cubic patches.
        generator: CPU generator of the random choices.

    Returns:
        Augmented pairs, same shape.
    """
    b, nd = pairs.shape[0], pairs.dim() - 2
    out = pairs.clone()
    k = torch.randint(4, (b,), generator=generator)
    flips = torch.rand((b, nd), generator=generator) < 0.5
    dims = (pairs.dim() - 2, pairs.dim() - 1)
    for i in range(b):
        x = out[i]
        if int(k[i]):
            x = torch.rot90(x, int(k[i]), dims=(dims[0] - 1, dims[1] - 1))
        fd = [a + 1 for a in range(nd) if bool(flips[i, a])]
        if fd:
            x = torch.flip(x, fd)
        out[i] = x
    return out


def random_bias_fields(n: int, ndim: int, size: int, amplitude: float,
                       generator: torch.Generator, channels: int = 2) -> Tensor:
    """Random smooth positive multiplicative fields over patches (bias-field augmentation).

    Field ``k, c``: ``exp(s (a + sum_d g_d x_d))`` with ``a, g_d ~ U(-1, 1)`` independent per
    patch and channel, ``s = amplitude`` and ``x_d`` the voxel position along patch axis ``d``
    mapped linearly to [-1, 1]: a random gain and a random linear ramp of the log-intensity.
    Every value lies in ``[exp(-(1 + ndim) s), exp((1 + ndim) s)]``.

    Args:
        n: number of patches.
        ndim: patch dimension (2 or 3).
        size: patch edge length in voxels.
        amplitude: ``s >= 0``.
        generator: CPU generator of the coefficients.
        channels: fields per patch.

    Returns:
        Fields ``(n, channels, *[size] * ndim)`` (float32, CPU).
    """
    coefs = torch.rand((n, channels, ndim + 1), generator=generator, dtype=torch.float64) * 2 - 1
    ar = torch.linspace(-1.0, 1.0, size, dtype=torch.float64) if size > 1 else torch.zeros(1)
    grids = torch.meshgrid(*([ar] * ndim), indexing="ij")
    shape = (n, channels, *([1] * ndim))
    log = coefs[..., 0].reshape(shape)  # broadcast to (n, channels, *patch) by the ramps
    for d in range(ndim):
        log = log + coefs[..., d + 1].reshape(shape) * grids[d]
    return torch.exp(float(amplitude) * log).float()


class PatchSampler:
    """Draws labelled patch pairs from stage images with the current transforms.

    Positives (label 1): fixed patch at a foreground voxel ``c``; moving patch sampled at
    ``beta(x + d)`` for the fixed patch's voxel positions ``x``, with one dither displacement
    ``d ~ N(0, sigma^2 I)`` (mm) per pair. Negatives (label 0): the fixed patch at ``c`` and the
    moving patch of an independent uniform foreground voxel ``c'`` (``beta(x')``), same pair.

    Args:
        images: stage images of the pairs.
        transforms: current fixed -> moving transform per pair (None: identity).
        size: patch edge length in voxels.
        sigma2_mm2: dither variance in mm^2.
        generator: CPU generator of all random draws.
        bias_augment: amplitude of the bias-field augmentation applied to every drawn pair
            (:func:`random_bias_fields`, drawn after the patches; 0: none, and no draws).
    """

    def __init__(self, images: Sequence[StageImages], transforms: Sequence[Transform | None],
                 size: int, sigma2_mm2: float, generator: torch.Generator,
                 bias_augment: float = 0.0) -> None:
        self.images = list(images)
        self.transforms = list(transforms)
        self.size = int(size)
        self.sigma = math.sqrt(float(sigma2_mm2))
        self.generator = generator
        self.bias_augment = float(bias_augment)
        d = self.images[0].fixed.ndim
        ar = torch.arange(self.size, dtype=torch.float64) - self.size // 2
        self.offsets = torch.stack(torch.meshgrid(*([ar] * d), indexing="ij"),
                                   dim=-1).reshape(-1, d)  # tensor order

    def _moving_patches(self, k: int, centres: Tensor, dither: bool) -> Tensor:
        st = self.images[k]
        grid = st.fixed.grid
        idx = centres.double()[:, None, :] + self.offsets[None]  # (P, K, D) tensor order
        world = grid.index_to_world(idx.flip(-1).reshape(-1, grid.ndim))
        world = world.reshape(centres.shape[0], -1, grid.ndim)
        if dither and self.sigma > 0:
            d = torch.randn((centres.shape[0], 1, grid.ndim), generator=self.generator,
                            dtype=torch.float64) * self.sigma
            world = world + d
        dev = st.moving.device
        points = world.to(dtype=st.moving.dtype, device=dev)
        t = self.transforms[k]
        with torch.no_grad():
            if t is not None:
                points = t.to(dev)(points)
            from itreg.warp import sample

            values, _ = sample(st.moving, points, padding=0.0)
        return values[0].reshape(centres.shape[0], 1, *([self.size] * grid.ndim))

    def draw(self, n: int, augment: bool = False) -> tuple[Tensor, Tensor]:
        """``n`` labelled patch pairs: ``(pairs (n, 2, *P), labels (n,) float)``, 1:1."""
        n_pos = n // 2
        labels = torch.cat([torch.ones(n_pos), torch.zeros(n - n_pos)])
        which = torch.randint(len(self.images), (n,), generator=self.generator)
        out = None
        for k in torch.unique(which).tolist():
            rows = torch.nonzero(which == k).reshape(-1)
            st = self.images[k]
            fg = st.foreground.cpu()
            ci = fg[torch.randint(fg.shape[0], (rows.numel(),), generator=self.generator)]
            cj = fg[torch.randint(fg.shape[0], (rows.numel(),), generator=self.generator)]
            pos = labels[rows] > 0.5
            centres_m = torch.where(pos[:, None], ci, cj)
            u = extract_patches(st.fixed.data, ci.to(st.fixed.device), self.size)
            v = torch.empty_like(u)
            if bool(pos.any()):
                v[pos.to(v.device)] = self._moving_patches(k, centres_m[pos], True).to(u.dtype)
            if bool((~pos).any()):
                v[(~pos).to(v.device)] = self._moving_patches(k, centres_m[~pos],
                                                              False).to(u.dtype)
            block = torch.cat([u, v], dim=1)
            if out is None:
                out = torch.empty((n, *block.shape[1:]), dtype=block.dtype, device=block.device)
            out[rows.to(block.device)] = block
        if self.bias_augment > 0:
            fields = random_bias_fields(n, out.dim() - 2, self.size, self.bias_augment,
                                        self.generator, out.shape[1])
            out = out * fields.to(out.device, out.dtype)
        if augment:
            out = augment_pairs(out.cpu(), self.generator).to(out.device)
        return out, labels.to(out.device, out.dtype)


def classifier_accuracy(net: DITRNet, pairs: Tensor, labels: Tensor,
                        batch_size: int = 1024) -> tuple[float, float]:
    """``(mean BCE loss, accuracy)`` of the classifier on labelled pairs (no grad)."""
    net.eval()
    losses, correct = 0.0, 0.0
    with torch.no_grad():
        for s in range(0, pairs.shape[0], batch_size):
            logit = net(pairs[s:s + batch_size])
            y = labels[s:s + batch_size]
            losses += float(nn.functional.binary_cross_entropy_with_logits(
                logit, y, reduction="sum"))
            correct += float(((logit > 0).to(y.dtype) == y).sum())
    n = max(pairs.shape[0], 1)
    return losses / n, correct / n

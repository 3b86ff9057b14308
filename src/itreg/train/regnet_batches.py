"""Batches of :func:`itreg.train.regnet.train_regnet`: loading pairs onto a device, random
affine augmentation, random crops, and the soft-Dice term of the loss.

Every random draw comes from a ``torch.Generator`` the trainer seeds from the run's seed, stage,
epoch and step, so a batch is a function of those alone (a resumed run sees the same batches).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from itreg.errors import ConfigError
from itreg.grid import Grid
from itreg.image import Image
from itreg.nets.regnets import RegNet
from itreg.train.regnet_config import TrainNetConfig
from itreg.train.sources import PairSample
from itreg.transforms import Affine, rotation_matrix
from itreg.warp import sample

__all__ = ["Batch", "augment_batch", "crop_batch", "load_batch", "one_hot", "random_affine",
           "soft_dice"]


def soft_dice(fixed: Tensor, warped: Tensor, eps: float = 1e-6) -> Tensor:
    """Mean soft Dice over the foreground classes present in `fixed`.

    Args:
        fixed: ``(B, K, *S)`` one-hot (or probabilistic) fixed labels, class 0 = background.
        warped: ``(B, K, *S)`` warped moving labels.

    Returns:
        0-d mean over batch items and the classes ``k >= 1`` with ``sum(fixed_k) > 0``.
    """
    dims = tuple(range(2, fixed.dim()))
    inter = (fixed * warped).sum(dims)[:, 1:]
    total = (fixed.sum(dims) + warped.sum(dims))[:, 1:]
    present = fixed.sum(dims)[:, 1:] > 0
    scores = 2.0 * inter / (total + eps)
    return scores[present].mean() if bool(present.any()) else scores.sum() * 0.0


def one_hot(labels: Tensor, classes: int) -> Tensor:
    """``(B, 1, *S)`` integer labels -> ``(B, K, *S)`` float one-hot."""
    oh = torch.nn.functional.one_hot(labels[:, 0].clamp(0, classes - 1), classes)
    return torch.movedim(oh, -1, 1).to(torch.float32)


@dataclass
class Batch:
    fixed: Tensor
    moving: Tensor
    fixed_labels: Tensor | None
    moving_labels: Tensor | None
    #: The voxels the similarity and Dice terms count (a crop's interior), None: all.
    region: tuple[slice, ...] | None = None

    def inner(self, t: Tensor) -> Tensor:
        """`t` (``(B, C, *S)``) restricted to :attr:`region`."""
        return t if self.region is None else t[(slice(None), slice(None), *self.region)]


def crop_batch(batch: Batch, grid: Grid, size: int | tuple[int, ...], margin: int,
          gen: torch.Generator) -> tuple[Batch, Grid]:
    """One random crop (the same for every tensor of the batch) and its grid: the crop's voxel
    ``i`` is the whole grid's voxel ``corner + i`` (same spacing and direction, origin moved),
    so world coordinates are unchanged. A crop whose fixed images are constant inside the
    region (background only: no similarity there) is drawn again, up to 20 times."""
    shape = grid.shape  # (Z, Y, X)
    sizes = (size,) * len(shape) if isinstance(size, int) else tuple(size)
    if len(sizes) != len(shape):
        raise ConfigError(f"crop_size {size!r} has {len(sizes)} sizes for {len(shape)}D images")
    sizes = tuple(min(s, n) for s, n in zip(sizes, shape))
    region = tuple(slice(margin, s - margin) if s > 2 * margin else slice(None) for s in sizes)
    for _ in range(20):
        corner = [int(torch.randint(n - s + 1, (1,), generator=gen))
                  for s, n in zip(sizes, shape)]
        window = tuple(slice(c, c + s) for c, s in zip(corner, sizes))
        inner = batch.fixed[(slice(None), slice(None), *window)][
            (slice(None), slice(None), *region)].flatten(1)
        if bool((inner.amax(1) > inner.amin(1)).all()):
            break

    def cut(t: Tensor | None) -> Tensor | None:
        return None if t is None else t[(slice(None), slice(None), *window)]

    origin = grid.index_to_world(torch.tensor([list(reversed(corner))], dtype=torch.float64))
    sub = Grid(tuple(reversed(sizes)), grid.spacing, tuple(origin[0].tolist()), grid.direction)
    return Batch(cut(batch.fixed), cut(batch.moving), cut(batch.fixed_labels),
                  cut(batch.moving_labels), region), sub


def load_batch(source: Any, indices: list[int], net: RegNet, device: torch.device) -> tuple[Batch,
                                                                                        Grid]:
    samples: list[PairSample] = [source[i] for i in indices]
    grid = samples[0].fixed.grid
    for s in samples:
        if not s.fixed.grid.same_as(grid) or not s.moving.grid.same_as(grid):
            raise ConfigError("all pairs of a source must lie on its common grid "
                              f"({s.name!r} does not)")
    fixed = torch.stack([net.normalise(s.fixed.data.to(device)) for s in samples])
    moving = torch.stack([net.normalise(s.moving.data.to(device)) for s in samples])
    labelled = all(s.has_labels for s in samples)
    fl = torch.stack([s.fixed_labels.data.long() for s in samples]).to(device) if labelled \
        else None
    ml = torch.stack([s.moving_labels.data.long() for s in samples]).to(device) if labelled \
        else None
    return Batch(fixed, moving, fl, ml), grid


def random_affine(grid: Grid, config: TrainNetConfig, gen: torch.Generator) -> Affine:
    d = grid.ndim

    def uniform(n: int, r: float) -> Tensor:
        return (torch.rand(n, generator=gen, dtype=torch.float64) * 2.0 - 1.0) * r

    angles = uniform(1 if d == 2 else 3, math.radians(config.aug_rotation_deg))
    scale = torch.exp(uniform(d, math.log1p(config.aug_scale)))
    matrix = rotation_matrix(angles, d) @ torch.diag(scale)
    return Affine(d, center=grid.center, translation=uniform(d, config.aug_translation_mm),
                  matrix=matrix, dtype=torch.float64)


def augment_batch(batch: Batch, grid: Grid, config: TrainNetConfig, gen: torch.Generator) -> Batch:
    """Random affine (and flips) per pair; labels by nearest neighbour."""
    fixed, moving = batch.fixed.clone(), batch.moving.clone()
    fl = None if batch.fixed_labels is None else batch.fixed_labels.clone()
    ml = None if batch.moving_labels is None else batch.moving_labels.clone()
    both = config.aug_target == "both"
    for b in range(fixed.shape[0]):
        tf = random_affine(grid, config, gen)
        with torch.no_grad():
            pts = tf.on_grid(grid, dtype=fixed.dtype, device=fixed.device)
        pairs = [(moving, False), (ml, True)] + ([(fixed, False), (fl, True)] if both else [])
        for t, label in pairs:
            if t is None:
                continue
            img = Image(t[b].to(torch.float32), grid, is_label=False)
            values = sample(img, pts, mode="nearest" if label else "linear")[0]
            t[b] = values.to(t.dtype)
        if config.aug_flip:
            flips = [2 + a for a in range(grid.ndim)
                     if bool(torch.rand(1, generator=gen) < 0.5)]
            if flips:
                for t in (fixed, moving, fl, ml):
                    if t is not None:
                        t[b] = torch.flip(t[b:b + 1], flips)[0]
    return Batch(fixed, moving, fl, ml)


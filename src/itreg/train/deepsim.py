"""Training DeepSim feature extractors (paper 004): auto-encoder and segmentation network.

Step one of DeepSim's two-step training: an extractor is trained alone, then frozen and used as
the metric :mod:`itreg.metrics.deepsim`. Two variants:

- ``mode="ae"`` (unsupervised, DeepSim_ae): a deterministic auto-encoder, sigmoid output, mean
  squared error against the input.
- ``mode="seg"`` (semi-supervised, DeepSim_seg): a segmentation U-Net, softmax output,
  cross-entropy against label maps.

Training samples are random crops (``crop_size`` voxels, padded with 0 where the image is
smaller) of the images min-max scaled to ``[0, 1]``, with random flips along every axis (the
authors augment with random affines; flips are the part that needs no resampling of labels).

**Contrast invariance (not in paper 004; off by default).** Paper 004 compares images of one
contrast, and its features follow the intensities: on a T1 / T2-like pair the DeepSim optimum
lies millimetres off alignment (``benchmarks/results/2026-11-22-landscapes.md``). Two options
make the features contrast-invariant, for multimodal pairs:

- ``intensity_remap = p``: with probability ``p`` a crop's intensities go through a random
  piecewise-linear map (:func:`random_remap`, ``remap_knots`` knots): increasing (a monotone
  change of contrast) or, with probability ``nonmonotone``, arbitrary (T1 -> T2-like changes
  are non-monotone), re-scaled to ``[0, 1]`` as the metric scales its inputs. The
  auto-encoder then reconstructs the crop *before* remapping, so its code has to describe the
  anatomy whatever the contrast of its input.
- ``invariance_weight = w``: every crop is shown in two independent random remappings (one
  batch, so BatchNorm sees both) and ``w * (1 - mean_l cos(F_l(view 1), F_l(view 2)))`` is added
  to the task loss: the DeepSim of a crop with its own remapping is pushed to 1, which is what
  the metric needs on multimodal pairs. Features are taken before channel dropout (as the
  frozen metric sees them).

Train on images of every contrast the metric will compare (with their label maps for
``"seg"``) and compare the deeper stages (``DeepSimMetric(stages=[2, 3])``) when the pair is
multimodal. :meth:`DeepSimTrainConfig.multimodal` is the small setting with both options; on
the command line: ``itreg train-metric --kind deepsim-seg --small --set intensity_remap=1
--set invariance_weight=1 --set epochs=15 --set patience=5 ...`` and ``--metric
deepsim:model.pt --set stages=[2,3]`` where the metric is used.
Adam (paper: lr 1e-4), validation on held-out images (when there are >= 3, else on fresh crops
of the training images with another seed), early stopping, the best weights kept, and a
non-finite loss stops training with :class:`~itreg.train.TrainingError` after writing the last
good weights to the output file.

Settings:

- **Small CPU setting** (:meth:`DeepSimTrainConfig.small`, minutes on two cores): 2D slices at
  2-4 mm (or 3D at 4 mm), channels 16/32/64, crops of 64^2 (32^3), batch 8, 40 steps per epoch,
  up to 10 epochs, lr 1e-3.
- **Full-scale GPU setting** (:meth:`DeepSimTrainConfig.full`, paper scale): 3D brain volumes at
  1 mm (160 x 192 x 224 crops, channels 32/64/128; in 2D 64/128/256), batch 1 (x4 gradient
  accumulation in the paper; here batch 4), lr 1e-4, up to 30,000-100,000 steps (AE 30k, seg
  100k in the authors' code), early stopping with patience 10 epochs. Put the images on the GPU;
  network and sampling follow them.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from itreg.blocks.deepsim import MODEL_KIND, MODES, DeepSimNet
from itreg.blocks.modelfile import save_model
from itreg.errors import ConfigError, GeometryError, InvalidImageError, OutputExistsError
from itreg.image import Image
from itreg.metrics.deepsim import feature_cosine
from itreg.metrics.frozen import safe_range, scale_intensity
from itreg.runtime import limited_threads
from itreg.train import TrainingError, TrainResult, fit, make_generator, seeded
from itreg.train.config import TrainingConfig

logger = logging.getLogger(__name__)

__all__ = ["CropSampler", "DeepSimTrainConfig", "DeepSimTrainingResult", "random_remap",
           "train_deepsim"]


@dataclass(frozen=True)
class DeepSimTrainConfig(TrainingConfig):
    """Settings of :func:`train_deepsim`.

    Args:
        mode: ``"ae"`` or ``"seg"``.
        channels: encoder widths (None: the paper's, 64/128/256 in 2D, 32/64/128 in 3D).
        dropout: channel-dropout probability (authors' code: 0.5).
        crop_size: edge length of the random training crops in voxels (multiple of 8).
        batch_size: crops per step.
        steps_per_epoch: optimiser steps per epoch.
        val_crops: crops in the fixed validation set.
        epochs: maximum epochs.
        patience: early-stopping patience (0: none).
        learning_rate: Adam step size (paper: 1e-4).
        weight_decay: Adam weight decay.
        flips: random flips along every axis (augmentation).
        intensity_remap: probability of a random intensity remapping of a crop (0: none, the
            paper's setting; see the module docstring).
        nonmonotone: probability that a remapping is non-monotone.
        remap_knots: knots of the random piecewise-linear intensity maps (>= 2).
        invariance_weight: weight of the feature-consistency term between two random
            remappings of each crop (0: none, the paper's setting).
        val_fraction: fraction of images held out for validation when there are >= 3.
        seed: seed of the weights, crops and augmentation.
        threads: torch CPU threads while training (None: unchanged).
        progress: show a progress bar.
    """

    mode: str = "ae"
    channels: tuple[int, ...] | None = None
    dropout: float = 0.5
    crop_size: int = 64
    batch_size: int = 4
    steps_per_epoch: int = 200
    val_crops: int = 32
    epochs: int = 50
    patience: int = 5
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    flips: bool = True
    intensity_remap: float = 0.0
    nonmonotone: float = 0.5
    remap_knots: int = 6
    invariance_weight: float = 0.0
    val_fraction: float = 0.2
    progress: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode not in MODES:
            raise ConfigError(f"unknown DeepSim mode {self.mode!r}; valid: {', '.join(MODES)}")
        if self.channels is not None:
            object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        if int(self.crop_size) < 8 or int(self.crop_size) % 8:
            raise ConfigError(f"crop_size must be a multiple of 8, got {self.crop_size}")
        for name in ("batch_size", "steps_per_epoch", "val_crops"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise ConfigError(f"learning_rate must be > 0, got {self.learning_rate}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in [0, 1), got {self.val_fraction}")
        for name in ("intensity_remap", "nonmonotone"):
            if not 0.0 <= float(getattr(self, name)) <= 1.0:
                raise ConfigError(f"{name} is a probability in [0, 1], got "
                                  f"{getattr(self, name)}")
        if int(self.remap_knots) < 2:
            raise ConfigError(f"remap_knots must be >= 2, got {self.remap_knots}")
        if not float(self.invariance_weight) >= 0.0:
            raise ConfigError(f"invariance_weight must be >= 0, got {self.invariance_weight}")

    @classmethod
    def small(cls, **overrides: Any) -> DeepSimTrainConfig:
        """The small CPU setting (2D slices or 3D at 4 mm, minutes on two cores)."""
        base = {"channels": (16, 32, 64), "crop_size": 64, "batch_size": 8,
                "steps_per_epoch": 40, "val_crops": 16, "epochs": 10, "patience": 3,
                "learning_rate": 1e-3}
        base.update(overrides)
        return cls(**base)

    @classmethod
    def multimodal(cls, **overrides: Any) -> DeepSimTrainConfig:
        """The small setting with contrast invariance: every crop remapped (half of the maps
        non-monotone), the two-view feature-consistency term with weight 1, and up to 15
        epochs (patience 5), since the two-view loss is noisier."""
        base = {"intensity_remap": 1.0, "nonmonotone": 0.5, "invariance_weight": 1.0,
                "epochs": 15, "patience": 5}
        base.update(overrides)
        return cls.small(**base)

    @classmethod
    def full(cls, **overrides: Any) -> DeepSimTrainConfig:
        """The paper-scale setting for a GPU."""
        base = {"channels": None, "crop_size": 160, "batch_size": 4, "steps_per_epoch": 1000,
                "val_crops": 64, "epochs": 100, "patience": 10, "learning_rate": 1e-4}
        base.update(overrides)
        return cls(**base)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data settings (stored in the model file)."""
        out = dataclasses.asdict(self)
        out["channels"] = None if self.channels is None else list(self.channels)
        return out


def random_remap(x: Tensor, generator: torch.Generator, knots: int = 6,
                 nonmonotone: float = 0.5, probability: float = 1.0) -> Tensor:
    """Random piecewise-linear intensity maps of ``[0, 1]`` crops, one map per crop.

    A map has ``knots`` equally spaced knots on ``[0, 1]``. Monotone maps are increasing from 0
    to 1 (sorted uniform values in between); non-monotone maps (probability `nonmonotone`) take
    independent uniform values, and their output is rescaled by the map's own minimum and
    maximum, so every remapped crop lies in ``[0, 1]``.

    Args:
        x: crops ``(B, 1, *S)`` with values in ``[0, 1]``.
        generator: the generator of all draws (on the CPU).
        knots: number of knots (>= 2).
        nonmonotone: probability of a non-monotone map.
        probability: probability that a crop is remapped at all (else it is returned as is).

    Returns:
        Remapped crops, same shape and dtype.
    """
    n = x.shape[0]
    k = int(knots)
    values = torch.rand(n, k, generator=generator, dtype=torch.float64)
    mono = torch.sort(values, dim=1).values
    mono[:, 0], mono[:, -1] = 0.0, 1.0
    free = torch.rand(n, generator=generator) < nonmonotone
    lut = torch.where(free[:, None], values, mono)
    lo, hi = lut.min(1, keepdim=True).values, lut.max(1, keepdim=True).values
    lut = (lut - lo) / (hi - lo).clamp_min(1e-6)
    keep = torch.rand(n, generator=generator) >= probability
    lut = lut.to(device=x.device, dtype=x.dtype)
    flat = x.reshape(n, -1).clamp(0.0, 1.0) * (k - 1)
    idx = flat.floor().clamp(max=k - 2).long()
    t = flat - idx.to(x.dtype)
    y = torch.gather(lut, 1, idx) * (1 - t) + torch.gather(lut, 1, idx + 1) * t
    y = torch.where(keep.to(x.device)[:, None], x.reshape(n, -1), y)
    return y.reshape(x.shape)


class CropSampler:
    """Random crops of scaled images (and their labels), with optional random flips.

    Args:
        images: ``(1, *S_i)`` scaled images (2D or 3D, any sizes).
        labels: matching ``(*S_i)`` integer label maps, or None.
        size: crop edge length (images smaller than it are zero-padded).
        generator: CPU generator of all draws.
        flips: random flips along every spatial axis.
    """

    def __init__(self, images: Sequence[Tensor], labels: Sequence[Tensor] | None, size: int,
                 generator: torch.Generator, flips: bool = True) -> None:
        self.images, self.labels = list(images), None if labels is None else list(labels)
        self.size, self.generator, self.flips = int(size), generator, bool(flips)

    def _crop(self, x: Tensor, starts: list[int]) -> Tensor:
        nd = len(starts)
        pad: list[int] = []
        for n in reversed(x.shape[-nd:]):
            pad += [0, max(0, self.size - n)]
        if any(pad):
            x = nn.functional.pad(x, pad)
        return x[(...,) + tuple(slice(s, s + self.size) for s in starts)]

    def draw(self, n: int) -> tuple[Tensor, Tensor | None]:
        """``(crops (n, 1, *[size]*D), labels (n, *[size]*D) long or None)``."""
        xs, ys = [], []
        for _ in range(n):
            k = int(torch.randint(len(self.images), (1,), generator=self.generator))
            img = self.images[k]
            shape = img.shape[1:]
            starts = [int(torch.randint(max(1, s - self.size + 1), (1,),
                                        generator=self.generator)) for s in shape]
            x = self._crop(img, starts)
            y = None if self.labels is None else self._crop(self.labels[k][None], starts)[0]
            if self.flips:
                dims = [a for a in range(len(shape))
                        if bool(torch.rand(1, generator=self.generator) < 0.5)]
                if dims:
                    x = torch.flip(x, [a + 1 for a in dims])
                    y = None if y is None else torch.flip(y, dims)
            xs.append(x)
            ys.append(y)
        crops = torch.stack(xs)
        return crops, None if self.labels is None else torch.stack(ys).long()


@dataclass
class DeepSimTrainingResult:
    """What :func:`train_deepsim` produced: the network, the training log and the file."""

    network: DeepSimNet
    train: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None


def _prepare(images: Sequence[Image], labels: Sequence[Image] | None, mode: str
             ) -> tuple[list[Tensor], list[Tensor] | None, int, int]:
    if not images:
        raise ConfigError("train_deepsim needs at least one image")
    ndim = images[0].ndim
    out, labs = [], None
    for i, img in enumerate(images):
        if img.ndim != ndim or ndim not in (2, 3):
            raise GeometryError("DeepSim training images must all be 2D or all 3D")
        if not bool(torch.isfinite(img.data).all()):
            raise InvalidImageError(f"training image {i} has NaN or Inf voxels")
        data = img.data.float() if not img.data.is_floating_point() else img.data
        out.append(scale_intensity(data, safe_range(data, None, "minmax", (0.0, 100.0))))
    classes = 2
    if mode == "seg":
        if labels is None or len(labels) != len(images):
            raise ConfigError("a segmentation extractor (deepsim-seg) needs one label map per "
                              "image (--labels)")
        labs = []
        for i, (lab, img) in enumerate(zip(labels, images)):
            if tuple(lab.grid.shape) != tuple(img.grid.shape):
                raise GeometryError(f"label map {i} has shape {lab.grid.shape}, its image "
                                    f"{img.grid.shape}")
            lv = lab.data[0].round().long()
            if bool((lv < 0).any()):
                raise InvalidImageError(f"label map {i} has negative labels")
            labs.append(lv.to(out[i].device))
        classes = max(2, int(max(int(lv.max()) for lv in labs)) + 1)
    return out, labs, ndim, classes


def train_deepsim(images: Sequence[Image], labels: Sequence[Image] | None = None,
                  config: DeepSimTrainConfig | None = None,
                  output: str | os.PathLike | None = None,
                  force: bool = False) -> DeepSimTrainingResult:
    """Train a DeepSim feature extractor and optionally save it.

    Args:
        images: training images (2D or 3D, one channel; any sizes).
        labels: label maps on the images' grids (``mode="seg"`` only).
        config: settings (default :class:`DeepSimTrainConfig`).
        output: model file to write (checkpointed after every improvement); None: none.
        force: overwrite an existing `output`.

    Returns:
        The :class:`DeepSimTrainingResult`.

    Raises:
        TrainingError: a non-finite loss or gradient (the last good weights are in `output`).
        ConfigError, GeometryError, InvalidImageError: bad settings or inputs.
        OutputExistsError: `output` exists and `force` is False.
    """
    cfg = config or DeepSimTrainConfig()
    if output is not None and Path(output).exists() and not force:
        raise OutputExistsError(f"model file {str(output)!r} exists; pass force to replace it")
    data, labs, ndim, classes = _prepare(list(images), labels, cfg.mode)
    device = data[0].device
    with limited_threads(cfg.threads):
        gen = make_generator(cfg.seed)
        with seeded(cfg.seed):
            net = DeepSimNet(ndim, cfg.mode, cfg.channels, classes, 1, cfg.dropout).to(device)
        n = len(data)
        if n >= 3 and cfg.val_fraction > 0:
            perm = torch.randperm(n, generator=gen).tolist()
            n_val = max(1, round(cfg.val_fraction * n))
            val_idx, train_idx = perm[:n_val], perm[n_val:]
        else:
            train_idx, val_idx = list(range(n)), list(range(n))

        def pick(idx, seq):
            return None if seq is None else [seq[i] for i in idx]

        sampler = CropSampler(pick(train_idx, data), pick(train_idx, labs), cfg.crop_size, gen,
                              cfg.flips)
        val_sampler = CropSampler(pick(val_idx, data), pick(val_idx, labs), cfg.crop_size,
                                  make_generator(cfg.seed + 104729), flips=False)
        vx, vy = val_sampler.draw(cfg.val_crops)

        two_views = cfg.invariance_weight > 0

        def views(x: Tensor, y: Tensor | None, g: torch.Generator
                  ) -> tuple[Tensor, Tensor | None, Tensor]:
            # (inputs, labels, auto-encoder targets = the crops before remapping)
            if two_views:
                remapped = torch.cat([random_remap(x, g, cfg.remap_knots, cfg.nonmonotone,
                                                   cfg.intensity_remap) for _ in range(2)])
                return remapped, None if y is None else torch.cat([y, y]), torch.cat([x, x])
            if cfg.intensity_remap > 0:
                return random_remap(x, g, cfg.remap_knots, cfg.nonmonotone,
                                    cfg.intensity_remap), y, x
            return x, y, x

        def objective(x: Tensor, y: Tensor | None, target: Tensor) -> Tensor:
            out, feats = net.forward_features(x)
            if cfg.mode == "ae":
                task = nn.functional.mse_loss(torch.sigmoid(out), target)
            else:
                task = nn.functional.cross_entropy(out, y)
            if not two_views:
                return task
            half = x.shape[0] // 2
            sim = torch.stack([feature_cosine(f[:half], f[half:]) for f in feats]).mean()
            return task + cfg.invariance_weight * (1.0 - sim)

        def batches(epoch: int):
            for _ in range(cfg.steps_per_epoch):
                yield views(*sampler.draw(cfg.batch_size), gen)

        val_gen = make_generator(cfg.seed + 7919)
        val_batches = [views(vx[s:s + cfg.batch_size],
                             None if vy is None else vy[s:s + cfg.batch_size], val_gen)
                       for s in range(0, vx.shape[0], cfg.batch_size)]

        def validate():
            total = sum(float(objective(*b)) * b[0].shape[0] for b in val_batches)
            return {"val_loss": total / sum(b[0].shape[0] for b in val_batches)}

        def write(extra: dict[str, Any]) -> None:
            save_model(output, MODEL_KIND, net.config(), net.state_dict(),
                       {"training": cfg.to_dict(), **extra}, force=True)

        def checkpoint(model, info):
            if output is not None:
                write({"checkpoint": {k: v for k, v in info.items()
                                      if isinstance(v, (int, float, str))}})

        opt = torch.optim.Adam(net.parameters(), lr=cfg.learning_rate,
                               weight_decay=cfg.weight_decay)
        try:
            tr: TrainResult = fit(net, opt, batches, lambda b: objective(*b), validate,
                                  epochs=cfg.epochs, patience=cfg.patience,
                                  checkpoint=checkpoint, progress=cfg.progress,
                                  description=f"DeepSim-{cfg.mode}",
                                  steps_per_epoch=cfg.steps_per_epoch)
        except TrainingError as exc:
            where = f" in {str(output)!r}" if output is not None else ""
            raise TrainingError(f"DeepSim-{cfg.mode}: {exc}{where}", exc.result) from None
        net.eval()
        result = DeepSimTrainingResult(net, tr.to_dict())
        if output is not None:
            write({"train": tr.to_dict()})
            result.path = Path(output)
        logger.info("DeepSim-%s: %s", cfg.mode, tr.message)
        return result

"""Training registration networks (AffineNet, DeformNet, Cascade) with any itreg metric.

:func:`train_regnet` trains one of the networks of :mod:`itreg.nets.regnets` on a pair source
(:mod:`itreg.train.sources`) and writes it with :func:`~itreg.nets.regnets.save_regnet`, the
training configuration and log stored in the model file's ``extra`` (``extra["train"]`` is
:meth:`TrainNetConfig.to_dict`).

**Loss** (per batch, averaged over its pairs)::

    loss_weight * metric(fixed, warped) + reg_weight * R(field) + dice_weight * (1 - soft Dice)

- ``metric``: any registry metric (:func:`itreg.metrics.get_metric`): ``"mse"``, ``"ncc"``,
  ``"lncc"``, ``"mi"`` (``loss_kwargs={"bins": 64}``), ``"nmi"``, ``"mine"``, ``"kldiv"``,
  ``"deepsim:extractor.pt"``, ... on the intensity-normalised images.
- ``R``: ``"diffusion"``, ``"bending"`` or ``"tv"`` (:mod:`itreg.regularisers`) on the world-mm
  displacement of the deformable part (affine networks have none).
- soft Dice: MIDiceRegNet's weak supervision (paper 001, Eq. 7): the one-hot label maps of the
  moving image are warped linearly through the predicted map and compared with the fixed
  image's, averaged over the foreground labels present. Labels are used in training only.

**Neural metrics (``"mine"``, ``"kldiv"``).** Their critic is trained together with the network in
one stage (DivRegNet, MIRegNet). It has its own Adam optimiser (``critic_lr``, default the
metric's). Each step back-propagates the one loss once; the network's optimiser then steps its
weights (descending the loss, i.e. ascending the MI estimate) and the critic's optimiser steps
the critic (descending the same loss, also ascending the estimate), followed by
``critic_steps - 1`` critic-only steps on the same batch with the network's output detached.
Both optimisers maximise the same bound: the training is cooperative, not adversarial (the bound
is a supremum over critics, so the critic must track the network). Before the first step,
``critic_warmup`` critic-only steps fit the critic at the initial predictions.

**Also:** augmentation (a random affine per pair, applied to both images and their labels, or to
the moving image only with ``aug_target="moving"`` to create misalignment for affine
networks; random flips of whole pairs), an exponential moving average of the weights
(``ema_decay``; the average is what is validated and saved), validation after every epoch
(mean Dice of the warped moving labels when the validation pairs have labels, else the
validation loss), early stopping, a checkpoint after every epoch (``out_path`` +
``".ckpt"``, with optimiser, EMA, critic and random-generator states: ``resume=True`` continues
a run from it and gives the same weights as an uninterrupted run), seeds, and a ``rich``
progress bar. A non-finite loss or gradient stops training with
:class:`~itreg.train.TrainingError`; the checkpoint of the last good epoch is kept.

A cascade trains ``"two-stage"`` (MIRegNet: the AffineNet first, then the DeformNet on the frozen
AffineNet's output, each stage with its own epochs and early stopping) or ``"joint"`` (end to
end).

A bespoke loop rather than :func:`itreg.train.fit`: it needs two optimisers, EMA weights,
resumable optimiser states and stages, which ``fit`` does not have; it reuses fit's helpers
(:class:`~itreg.train.EarlyStopping`, :func:`~itreg.train.progress_bar`,
:func:`~itreg.train.seeded`, :func:`~itreg.train.make_generator`, :class:`~itreg.train.TrainResult`).

Settings:

- **Small CPU setting** (:meth:`TrainNetConfig.small`, minutes on two cores): 2D phantom slices
  at 2-4 mm (or 3D at 4 mm), features 8-16, batch 4, 20 epochs of at most 16 steps, lr 1e-3.
- **3D at 2 mm on a CPU**: train on random crops (``crop_size=64``, ``crop_margin=6``,
  ``norm="batch"``): a DeformNet step (features 8-16, batch 1, one thread) costs about 1 s of
  CPU on a 64^3 crop against 5 s on a whole 94 x 116 x 98 volume; validation and prediction
  use whole volumes (``benchmarks/regnet_phantoms.py`` documents its 3D table).
- **Full scale on a GPU**: 3D phantoms at 2 mm (150 training pairs, paper 003), the default
  features (16/32/32/32/32, 4 levels), batch 2-4, lr 1e-4 to 1e-3, 100-300 epochs, patience 20,
  ``ema_decay=0.999``, ``device="cuda"``.

Example:
    >>> from itreg.train.regnet import TrainNetConfig, train_regnet        # doctest: +SKIP
    >>> from itreg.train.sources import PhantomPairs
    >>> cfg = TrainNetConfig.small(kind="deform", loss="mi", loss_kwargs={"bins": 32})
    >>> res = train_regnet(cfg, PhantomPairs(32), PhantomPairs(8, seed=1000), "net.pt")
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import itreg.metrics.neural  # noqa: F401  (registers "mine" and "kldiv")
from itreg.errors import ConfigError, OutputExistsError, unknown_name
from itreg.evaluate import dice as dice_score
from itreg.grid import Grid
from itreg.image import Image
from itreg.metrics import available_metrics, get_metric
from itreg.nets.regnets import (
    FIELDS,
    NORMS,
    AffineNet,
    Cascade,
    DeformNet,
    RegNet,
    RegOutput,
    save_regnet,
    warp_batch,
)
from itreg.regularisers import get_regulariser
from itreg.runtime import limited_threads
from itreg.train import (
    EarlyStopping,
    TrainingError,
    TrainResult,
    checkpoint_path,
    make_generator,
    progress_bar,
    seeded,
    state_copy,
)
from itreg.train.sources import PairSample, check_source
from itreg.transforms import Affine, rotation_matrix
from itreg.warp import sample

logger = logging.getLogger(__name__)

__all__ = ["KINDS", "RegNetTrainResult", "TrainNetConfig", "build_network", "checkpoint_path",
           "soft_dice", "train_regnet"]

KINDS = ("affine", "deform", "cascade")
"""Network kinds :func:`train_regnet` trains."""

REGULARISERS = ("diffusion", "bending", "tv")
CASCADE_MODES = ("two-stage", "joint")
AUG_TARGETS = ("both", "moving")

CHECKPOINT_FORMAT = "itreg-regnet-checkpoint"
CHECKPOINT_VERSION = 1

#: Settings that may change when a run is resumed.
_RESUMABLE = ("epochs", "patience", "device", "threads")


def _positive(name: str, value: Any, integer: bool = False, zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if ok and integer:
        ok = int(value) == value
    if ok:
        ok = value >= 0 if zero else value > 0
    if not ok:
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"{name} must be {kind} {'>= 0' if zero else '> 0'}, got {value!r}")


@dataclass(frozen=True)
class TrainNetConfig:
    """Settings of :func:`train_regnet` (see the module docstring).

    Args:
        kind: ``"affine"``, ``"deform"`` or ``"cascade"``.
        loss: registry metric name (``"lncc"``, ``"mi"``, ``"mine"``, ``"deepsim:ae.pt"``, ...).
        loss_kwargs: the metric's settings (``{"bins": 64}`` for MI, ``{"window": 9}`` for
            LNCC, ``{"estimator": "dv"}`` for MINE, ...).
        loss_weight: weight of the metric term (paper 001's lambda).
        regulariser: ``"diffusion"``, ``"bending"``, ``"tv"`` or None.
        reg_weight: its weight (paper 001's mu = 0.01 with TV).
        dice_weight: weight of the soft-Dice term (0: unsupervised; MIDiceRegNet: 1).
        features: DeformNet widths (``levels + 1`` values; None: 16, 32, ...).
        affine_features: AffineNet widths.
        levels: DeformNet levels.
        se: squeeze-and-excitation in the DeformNet decoder (DivRegNet).
        norm: ``"instance"``, ``"batch"`` or ``"none"``.
        field: ``"displacement"`` or ``"svf"``.
        steps: SVF scaling-and-squaring steps.
        intensity: the networks' intensity normalisation (``"percentile"``, ``"minmax"``).
        augment: random affine augmentation of every training pair.
        aug_rotation_deg: largest rotation (degrees, per angle).
        aug_scale: largest relative scaling per axis.
        aug_translation_mm: largest translation per axis.
        aug_flip: random flips of whole pairs along every axis.
        aug_target: ``"both"`` images (and labels) or the ``"moving"`` one only.
        ema_decay: decay of the weights' moving average (0: none).
        lr: Adam learning rate of the network.
        weight_decay: Adam weight decay.
        grad_clip: clip the network's gradient norm (None: no clipping).
        epochs: maximum epochs (per stage).
        batch_size: pairs per step.
        steps_per_epoch: steps per epoch (None: one pass over the training pairs).
        patience: epochs without validation improvement before stopping (0: never).
        cascade_mode: ``"two-stage"`` or ``"joint"``.
        critic_lr: Adam learning rate of a neural metric's critic (None: the metric's).
        critic_steps: critic steps per network step (>= 1).
        critic_warmup: critic-only steps before the first network step.
        val_max_pairs: validate on at most this many pairs (None: all).
        crop_size: train on random crops of this many voxels per axis (one int for every
            axis, or one per axis in ``(Z, Y, X)`` order; larger than an image: the whole
            axis), the same crop of both images and their labels, a new place every step; None
            trains on whole images. The networks are fully convolutional, so prediction and
            validation still use whole images. A 3D setting for CPUs (see the module docstring).
            Use it with ``norm="batch"`` (evaluated with its running statistics) or
            ``"none"``: instance normalisation's statistics over a crop differ from those over
            a whole image, so such a network meets other features at prediction (measured in
            3D: validation Dice fell below the identity's; a warning is logged).
        crop_margin: voxels at each face of a crop that the similarity and Dice terms leave
            out (their moving values may come from outside the crop, which the crop lacks);
            the regulariser covers the whole crop.
        seed: seed of the weights, batch order, augmentation and critic.
        device: ``"cpu"``, ``"cuda"``, ...
        threads: torch CPU threads while training (None: unchanged).
    """

    kind: str = "deform"
    loss: str = "lncc"
    loss_kwargs: dict[str, Any] = field(default_factory=dict)
    loss_weight: float = 1.0
    regulariser: str | None = "diffusion"
    reg_weight: float = 1.0
    dice_weight: float = 0.0
    features: tuple[int, ...] | None = None
    affine_features: tuple[int, ...] = (16, 32, 64, 128)
    levels: int = 4
    se: bool = False
    norm: str = "instance"
    field: str = "displacement"
    steps: int = 7
    intensity: str = "percentile"
    augment: bool = False
    aug_rotation_deg: float = 10.0
    aug_scale: float = 0.05
    aug_translation_mm: float = 5.0
    aug_flip: bool = False
    aug_target: str = "both"
    ema_decay: float = 0.99
    lr: float = 1e-3
    weight_decay: float = 0.0
    grad_clip: float | None = None
    epochs: int = 50
    batch_size: int = 4
    steps_per_epoch: int | None = None
    patience: int = 10
    cascade_mode: str = "two-stage"
    critic_lr: float | None = None
    critic_steps: int = 1
    critic_warmup: int = 50
    val_max_pairs: int | None = None
    crop_size: int | tuple[int, ...] | None = None
    crop_margin: int = 8
    seed: int = 0
    device: str = "cpu"
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise unknown_name("network kind", str(self.kind), KINDS)
        prefix = str(self.loss).partition(":")[0].strip().lower()
        if prefix not in available_metrics():
            raise unknown_name("metric", str(self.loss), available_metrics())
        if not isinstance(self.loss_kwargs, dict):
            raise ConfigError(f"loss_kwargs must be a dict, got {self.loss_kwargs!r}")
        if ":" not in str(self.loss):  # cheap to build: check the settings now
            get_metric(self.loss, **self.loss_kwargs)
        if self.regulariser is not None and self.regulariser not in REGULARISERS:
            raise unknown_name("regulariser", str(self.regulariser), REGULARISERS)
        if self.norm not in NORMS:
            raise unknown_name("normalisation", str(self.norm), NORMS)
        if self.field not in FIELDS:
            raise unknown_name("field", str(self.field), FIELDS)
        if self.cascade_mode not in CASCADE_MODES:
            raise unknown_name("cascade mode", str(self.cascade_mode), CASCADE_MODES)
        if self.aug_target not in AUG_TARGETS:
            raise unknown_name("augmentation target", str(self.aug_target), AUG_TARGETS)
        if self.features is not None:
            object.__setattr__(self, "features", tuple(int(f) for f in self.features))
        object.__setattr__(self, "affine_features", tuple(int(f) for f in self.affine_features))
        for name in ("loss_weight", "reg_weight", "dice_weight", "aug_rotation_deg",
                     "aug_scale", "aug_translation_mm", "weight_decay"):
            _positive(name, getattr(self, name), zero=True)
        _positive("lr", self.lr)
        for name in ("epochs", "patience", "critic_warmup", "crop_margin"):
            _positive(name, getattr(self, name), integer=True, zero=True)
        if self.crop_size is not None:
            sizes = (tuple(self.crop_size) if isinstance(self.crop_size, (list, tuple))
                     else (self.crop_size,))
            if not sizes or len(sizes) > 3 or any(
                    isinstance(s, bool) or not isinstance(s, int) or s <= 2 * self.crop_margin
                    for s in sizes):
                raise ConfigError("crop_size must be None, or one or one-per-axis integers "
                                  f"larger than 2 * crop_margin, got {self.crop_size!r}")
            object.__setattr__(self, "crop_size", sizes[0] if len(sizes) == 1 else sizes)
        for name in ("batch_size", "critic_steps"):
            _positive(name, getattr(self, name), integer=True)
        for name in ("steps_per_epoch", "val_max_pairs", "threads"):
            if getattr(self, name) is not None:
                _positive(name, getattr(self, name), integer=True)
        for name in ("critic_lr", "grad_clip"):
            if getattr(self, name) is not None:
                _positive(name, getattr(self, name))
        if not 0.0 <= float(self.ema_decay) < 1.0:
            raise ConfigError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if isinstance(self.seed, bool) or int(self.seed) != self.seed:
            raise ConfigError(f"seed must be an integer, got {self.seed!r}")

    @classmethod
    def small(cls, **overrides: Any) -> TrainNetConfig:
        """The small CPU setting (2D slices or 3D at 4 mm; minutes on two cores)."""
        base: dict[str, Any] = {"features": (8, 16, 16, 16, 16), "affine_features": (8, 16, 32),
                                "batch_size": 4, "epochs": 20, "steps_per_epoch": 16,
                                "patience": 5, "lr": 1e-3, "critic_warmup": 50}
        base.update(overrides)
        return cls(**base)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able settings (tuples become lists)."""
        out = dataclasses.asdict(self)
        for k, v in out.items():
            if isinstance(v, tuple):
                out[k] = list(v)
        return out


# ---------------------------------------------------------------------------------- building
def build_network(config: TrainNetConfig, ndim: int) -> RegNet:
    """The (untrained) network of `config` for `ndim`-D images, seeded by ``config.seed``."""
    common = {"norm": config.norm, "intensity": config.intensity}
    with seeded(config.seed):
        affine = AffineNet(ndim, features=config.affine_features, **common)
        deform = DeformNet(ndim, features=config.features, levels=config.levels, se=config.se,
                           field=config.field, steps=config.steps, **common)
    if config.kind == "affine":
        return affine
    if config.kind == "deform":
        return deform
    return Cascade(affine, deform)


def build_loss_metric(config: TrainNetConfig) -> nn.Module:
    """The similarity metric of `config` (a neural metric gets the training seed)."""
    kwargs = dict(config.loss_kwargs)
    prefix = str(config.loss).partition(":")[0].strip().lower()
    if prefix in ("mine", "kldiv") and "seed" not in kwargs:
        kwargs["seed"] = int(config.seed)
    return get_metric(config.loss, **kwargs)


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


def _one_hot(labels: Tensor, classes: int) -> Tensor:
    """``(B, 1, *S)`` integer labels -> ``(B, K, *S)`` float one-hot."""
    oh = torch.nn.functional.one_hot(labels[:, 0].clamp(0, classes - 1), classes)
    return torch.movedim(oh, -1, 1).to(torch.float32)


# ---------------------------------------------------------------------------------- batches
@dataclass
class _Batch:
    fixed: Tensor
    moving: Tensor
    fixed_labels: Tensor | None
    moving_labels: Tensor | None
    #: The voxels the similarity and Dice terms count (a crop's interior), None: all.
    region: tuple[slice, ...] | None = None

    def inner(self, t: Tensor) -> Tensor:
        """`t` (``(B, C, *S)``) restricted to :attr:`region`."""
        return t if self.region is None else t[(slice(None), slice(None), *self.region)]


def _crop(batch: _Batch, grid: Grid, size: int | tuple[int, ...], margin: int,
          gen: torch.Generator) -> tuple[_Batch, Grid]:
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
    return _Batch(cut(batch.fixed), cut(batch.moving), cut(batch.fixed_labels),
                  cut(batch.moving_labels), region), sub


def _load(source: Any, indices: list[int], net: RegNet, device: torch.device) -> tuple[_Batch,
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
    return _Batch(fixed, moving, fl, ml), grid


def _random_affine(grid: Grid, config: TrainNetConfig, gen: torch.Generator) -> Affine:
    d = grid.ndim

    def uniform(n: int, r: float) -> Tensor:
        return (torch.rand(n, generator=gen, dtype=torch.float64) * 2.0 - 1.0) * r

    angles = uniform(1 if d == 2 else 3, math.radians(config.aug_rotation_deg))
    scale = torch.exp(uniform(d, math.log1p(config.aug_scale)))
    matrix = rotation_matrix(angles, d) @ torch.diag(scale)
    return Affine(d, center=grid.center, translation=uniform(d, config.aug_translation_mm),
                  matrix=matrix, dtype=torch.float64)


def _augment(batch: _Batch, grid: Grid, config: TrainNetConfig, gen: torch.Generator) -> _Batch:
    """Random affine (and flips) per pair; labels by nearest neighbour."""
    fixed, moving = batch.fixed.clone(), batch.moving.clone()
    fl = None if batch.fixed_labels is None else batch.fixed_labels.clone()
    ml = None if batch.moving_labels is None else batch.moving_labels.clone()
    both = config.aug_target == "both"
    for b in range(fixed.shape[0]):
        tf = _random_affine(grid, config, gen)
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
    return _Batch(fixed, moving, fl, ml)


# ---------------------------------------------------------------------------------- results
@dataclass
class RegNetTrainResult:
    """What :func:`train_regnet` did.

    Attributes:
        net: the trained network (best EMA weights, eval mode).
        path: the written model file.
        checkpoint: the checkpoint file beside it.
        stages: one :class:`~itreg.train.TrainResult` per stage (``"affine"``, ``"deform"``,
            or the network's kind).
        monitor: the validation value that selected the weights (``"val_dice"`` or
            ``"val_loss"``).
        wall_time_s: seconds of this call.
        config: the settings.
    """

    net: RegNet
    path: Path
    checkpoint: Path
    stages: dict[str, TrainResult]
    monitor: str
    wall_time_s: float
    config: TrainNetConfig

    @property
    def last(self) -> TrainResult:
        return list(self.stages.values())[-1]

    @property
    def history(self) -> list[dict[str, float]]:
        """Per-epoch records of the last stage."""
        return self.last.history

    @property
    def stop_reason(self) -> str:
        return self.last.stop_reason

    @property
    def best_value(self) -> float:
        return self.last.best_value

    def to_dict(self) -> dict[str, Any]:
        return {"path": str(self.path), "monitor": self.monitor,
                "wall_time_s": self.wall_time_s,
                "stages": {k: v.to_dict() for k, v in self.stages.items()}}


def _result_from(d: dict[str, Any]) -> TrainResult:
    r = TrainResult(epochs=int(d["epochs"]), steps=int(d["steps"]),
                    best_epoch=int(d["best_epoch"]),
                    best_value=math.nan if d["best_value"] is None else float(d["best_value"]),
                    stop_reason=str(d["stop_reason"]), message=str(d.get("message", "")))
    r.history = [{k: (math.nan if v is None else float(v)) for k, v in h.items()}
                 for h in d["history"]]
    return r


# ---------------------------------------------------------------------------------- trainer
class _Trainer:
    """One training run: the network, metric, sources and the checkpointed state."""

    def __init__(self, config: TrainNetConfig, train_source: Any, val_source: Any,
                 out_path: Path, progress: bool, callback: Callable | None) -> None:
        self.config = config
        self.train_source, self.val_source = train_source, val_source
        self.out_path = out_path
        self.ckpt_path = checkpoint_path(out_path)
        self.progress = progress
        self.callback = callback
        self.device = torch.device(config.device)
        grid = train_source.grid
        self.ndim = grid.ndim
        self.net = build_network(config, self.ndim).to(self.device)
        self.metric = build_loss_metric(config).to(self.device)
        self.trainable = bool(getattr(self.metric, "trainable", False)) and hasattr(
            self.metric, "critic_parameters")
        self.reg = get_regulariser(config.regulariser) if config.regulariser else None
        self.has_labels = self._labelled(train_source)
        self.val_labels = self._labelled(val_source)
        if config.dice_weight > 0 and not self.has_labels:
            raise ConfigError("dice_weight > 0 needs label maps for every training pair "
                              "(fixed_labels and moving_labels)")
        self.classes = self._classes() if self.has_labels or self.val_labels else 0
        self.monitor = "val_dice" if self.val_labels else "val_loss"
        self.mode = "max" if self.val_labels else "min"
        if self.config.kind == "cascade" and self.config.cascade_mode == "two-stage":
            self.stages = ["affine", "deform"]
        else:
            self.stages = [self.config.kind]

    @staticmethod
    def _labelled(source: Any) -> bool:
        flag = getattr(source, "has_labels", None)
        return bool(flag) if flag is not None else bool(source[0].has_labels)

    def _classes(self) -> int:
        top = 0
        for src in (self.train_source, self.val_source):
            for i in range(min(len(src), 4)):
                s = src[i]
                if s.has_labels:
                    top = max(top, int(s.fixed_labels.data.max()), int(s.moving_labels.data.max()))
        return top + 1

    # ------------------------------------------------------------ stage pieces
    def _module(self, stage: str) -> nn.Module:
        if isinstance(self.net, Cascade) and stage == "affine":
            return self.net.affine
        if isinstance(self.net, Cascade) and stage == "deform" and \
                self.config.cascade_mode == "two-stage":
            return self.net.deform
        return self.net

    def _forward(self, stage: str, fixed: Tensor, moving: Tensor, grid: Grid) -> RegOutput:
        if isinstance(self.net, Cascade):
            if stage == "affine":
                return self.net.affine(fixed, moving, grid)
            return self.net(fixed, moving, grid,
                            freeze_affine=self.config.cascade_mode == "two-stage")
        return self.net(fixed, moving, grid)

    def _set_train(self, stage: str) -> None:
        self.net.train()
        if isinstance(self.net, Cascade) and stage == "deform" and \
                self.config.cascade_mode == "two-stage":
            self.net.affine.eval()

    def _similarity(self, fixed: Tensor, warped: Tensor) -> Tensor:
        return torch.stack([self.metric(fixed[b], warped[b])
                            for b in range(fixed.shape[0])]).mean()

    def _loss(self, out: RegOutput, batch: _Batch, grid: Grid) -> tuple[Tensor, dict[str, float]]:
        cfg = self.config
        sim = self._similarity(batch.inner(batch.fixed), batch.inner(out.warped))
        total = cfg.loss_weight * sim
        parts = {"similarity": float(sim.detach())}
        if self.reg is not None and out.field is not None and cfg.reg_weight > 0:
            r = self.reg(out.field, grid)
            total = total + cfg.reg_weight * r
            parts["regulariser"] = float(r.detach())
        if cfg.dice_weight > 0 and batch.fixed_labels is not None:
            warped = warp_batch(_one_hot(batch.moving_labels, self.classes), grid, out.points)
            d = soft_dice(batch.inner(_one_hot(batch.fixed_labels, self.classes)),
                          batch.inner(warped))
            total = total + cfg.dice_weight * (1.0 - d)
            parts["soft_dice"] = float(d.detach())
        return total, parts

    def _batches(self, stage_index: int, epoch: int) -> list[list[int]]:
        """The epoch's batches of training indices (a function of seed, stage and epoch)."""
        n, bs = len(self.train_source), self.config.batch_size
        gen = make_generator(self.config.seed * 1_000_003 + stage_index * 10_007 + epoch)
        if self.config.steps_per_epoch is None:  # one pass over the pairs
            order = torch.randperm(n, generator=gen).tolist()
            return [order[i:i + bs] for i in range(0, n, bs)]
        steps = self.config.steps_per_epoch
        order = []
        while len(order) < steps * bs:
            order += torch.randperm(n, generator=gen).tolist()
        return [order[i * bs:(i + 1) * bs] for i in range(steps)]

    def _train_batch(self, stage_index: int, epoch: int, step: int, indices: list[int]
                     ) -> tuple[_Batch, Grid]:
        batch, grid = _load(self.train_source, indices, self.net, self.device)
        if self.config.augment:
            gen = make_generator(self.config.seed * 7_919 + stage_index * 1_000_003
                                 + epoch * 10_007 + step)
            batch = _augment(batch, grid, self.config, gen)
        if self.config.crop_size is not None:
            gen = make_generator(self.config.seed * 6_007 + stage_index * 1_000_033
                                 + epoch * 10_009 + step)
            batch, grid = _crop(batch, grid, self.config.crop_size, self.config.crop_margin,
                                gen)
        return batch, grid

    # ------------------------------------------------------------ EMA
    def _ema_update(self, ema: dict[str, Tensor], updates: int) -> None:
        decay = min(self.config.ema_decay, (1.0 + updates) / (10.0 + updates))
        with torch.no_grad():
            for k, v in self.net.state_dict().items():
                if v.is_floating_point() and decay > 0:
                    ema[k].mul_(decay).add_(v.detach(), alpha=1.0 - decay)
                else:
                    ema[k].copy_(v)

    # ------------------------------------------------------------ validation
    def _metric_state(self) -> tuple[Any, Any]:
        gen = getattr(self.metric, "generator", None)
        return (gen.get_state() if gen is not None else None,
                getattr(self.metric, "_log_ema", None))

    def _restore_metric_state(self, state: tuple[Any, Any]) -> None:
        gen = getattr(self.metric, "generator", None)
        if gen is not None and state[0] is not None:
            gen.set_state(state[0])
        if hasattr(self.metric, "_log_ema"):
            self.metric._log_ema = state[1]

    def validate(self, stage: str) -> dict[str, float]:
        """Validation loss (and Dice) with the current weights, in eval mode."""
        saved = self._metric_state()
        gen = getattr(self.metric, "generator", None)
        if gen is not None:
            gen.manual_seed(self.config.seed + 1)
        n = len(self.val_source)
        if self.config.val_max_pairs is not None:
            n = min(n, self.config.val_max_pairs)
        losses, dices = [], []
        self.net.eval()
        with torch.no_grad():
            for i in range(n):
                batch, grid = _load(self.val_source, [i], self.net, self.device)
                out = self._forward(stage, batch.fixed, batch.moving, grid)
                loss, _ = self._loss(out, batch, grid)
                losses.append(float(loss))
                if self.val_labels and batch.fixed_labels is not None:
                    warped = warp_batch(batch.moving_labels.to(torch.float32), grid, out.points,
                                        mode="nearest")
                    fl = batch.fixed_labels[0]
                    labels = [int(v) for v in torch.unique(fl).tolist() if v != 0]
                    dices.append(dice_score(fl, warped[0].round().long(), labels).mean)
        self._restore_metric_state(saved)
        record = {"val_loss": sum(losses) / len(losses)}
        if dices:
            record["val_dice"] = sum(dices) / len(dices)
        return record

    # ------------------------------------------------------------ critic
    def _critic_optimizer(self) -> torch.optim.Optimizer | None:
        if not self.trainable:
            return None
        lr = self.config.critic_lr or float(getattr(self.metric, "critic_lr", 1e-3))
        self.metric.critic.requires_grad_(True)
        return torch.optim.Adam(self.metric.critic_parameters(), lr=lr)

    def _critic_step(self, copt: torch.optim.Optimizer, fixed: Tensor, warped: Tensor) -> bool:
        copt.zero_grad(set_to_none=True)
        loss = self._similarity(fixed, warped.detach())
        if not bool(torch.isfinite(loss)):
            return False
        loss.backward()
        if not all(p.grad is None or bool(torch.isfinite(p.grad).all())
                   for p in self.metric.critic_parameters()):
            return False
        copt.step()
        return True

    def _critic_warmup(self, stage: str, stage_index: int, copt: torch.optim.Optimizer) -> None:
        n = self.config.critic_warmup
        if n <= 0:
            return
        gen = make_generator(self.config.seed * 31 + stage_index + 17)
        self.net.eval()
        for _ in range(n):
            idx = torch.randint(len(self.train_source), (self.config.batch_size,),
                                generator=gen).tolist()
            batch, grid = _load(self.train_source, idx, self.net, self.device)
            with torch.no_grad():
                out = self._forward(stage, batch.fixed, batch.moving, grid)
            if not self._critic_step(copt, batch.fixed, out.warped):
                break

    # ------------------------------------------------------------ checkpoints
    def _save_checkpoint(self, state: dict[str, Any]) -> None:
        from itreg.io.outputs import atomic_output_file

        payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION,
                   "config": self.config.to_dict(), **state}
        with atomic_output_file(self.ckpt_path, force=True) as tmp:
            torch.save(payload, tmp)

    def load_checkpoint(self) -> dict[str, Any] | None:
        """The checkpoint's state if one exists and fits this configuration."""
        if not self.ckpt_path.is_file():
            return None
        from itreg.errors import ModelFileError

        try:
            payload = torch.load(self.ckpt_path, map_location=self.device, weights_only=True)
        except Exception as exc:
            raise ModelFileError(f"checkpoint {str(self.ckpt_path)!r} cannot be read ({exc}); "
                                 "delete it or pass resume=False") from exc
        if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT or \
                payload.get("version") != CHECKPOINT_VERSION:
            raise ModelFileError(f"{str(self.ckpt_path)!r} is not a registration-network "
                                 f"checkpoint of version {CHECKPOINT_VERSION}; delete it or pass "
                                 "resume=False")
        old = {k: v for k, v in payload["config"].items() if k not in _RESUMABLE}
        new = {k: v for k, v in self.config.to_dict().items() if k not in _RESUMABLE}
        if old != new:
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise ConfigError(f"checkpoint {str(self.ckpt_path)!r} was written with other "
                              f"settings ({', '.join(diff)}); delete it or pass resume=False")
        return payload

    # ------------------------------------------------------------ one stage
    def run_stage(self, stage_index: int, resume_state: dict[str, Any] | None,
                  finished: dict[str, Any]) -> TrainResult:
        stage = self.stages[stage_index]
        cfg = self.config
        module = self._module(stage)
        params = [p for p in module.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        copt = self._critic_optimizer()
        ema = state_copy(self.net)
        best = state_copy(self.net)
        stopper = EarlyStopping(patience=cfg.patience, mode=self.mode)
        result = TrainResult()
        start, warm = 0, False
        if resume_state is not None:
            self.net.load_state_dict(resume_state["net"])
            ema = resume_state["ema"]
            best = resume_state["best"]
            opt.load_state_dict(resume_state["optimizer"])
            if copt is not None and resume_state.get("critic") is not None:
                self.metric.critic.load_state_dict(resume_state["critic"])
                copt.load_state_dict(resume_state["critic_optimizer"])
            self._restore_metric_state((resume_state.get("metric_generator"),
                                        resume_state.get("log_ema")))
            s = resume_state["stopper"]
            stopper.best, stopper.best_epoch, stopper.bad_epochs = (
                float(s["best"]), int(s["best_epoch"]), int(s["bad_epochs"]))
            result = _result_from(resume_state["result"])
            start, warm = result.epochs, bool(resume_state.get("critic_warm", False))
            logger.info("resuming stage %s at epoch %d from %s", stage, start + 1, self.ckpt_path)

        def state(done: bool) -> dict[str, Any]:
            gen_state, log_ema = self._metric_state()
            return {"stage": stage_index, "stage_done": done, "net": self.net.state_dict(),
                    "ema": ema, "best": best, "optimizer": opt.state_dict(),
                    "critic": self.metric.critic.state_dict() if copt is not None else None,
                    "critic_optimizer": copt.state_dict() if copt is not None else None,
                    "critic_warm": warm, "metric_generator": gen_state, "log_ema": log_ema,
                    "stopper": {"best": stopper.best, "best_epoch": stopper.best_epoch,
                                "bad_epochs": stopper.bad_epochs},
                    "result": result.to_dict(), "finished": finished}

        def fail(where: str, epoch: int) -> TrainingError:
            self.net.load_state_dict(best)
            result.stop_reason = "non-finite"
            kept = (f"epoch {result.best_epoch + 1}" if result.best_epoch >= 0
                    else "the initial weights")
            result.message = (f"training stopped in stage {stage!r} at epoch {epoch + 1}, step "
                              f"{result.steps}: {where} became NaN or infinite; the best weights "
                              f"({kept}) were kept and the checkpoint {str(self.ckpt_path)!r} "
                              "holds the last good epoch. Lower lr (or critic_lr), set "
                              "grad_clip, or check the inputs.")
            logger.warning(result.message)
            return TrainingError(result.message, result)

        steps_per_epoch = len(self._batches(stage_index, 0))
        total = float(steps_per_epoch * cfg.epochs)
        desc = f"{stage} net, {cfg.loss}"
        with progress_bar(self.progress, desc, total) as bar:
            bar.update(advance=float(start * steps_per_epoch))
            if copt is not None and not warm:
                self._critic_warmup(stage, stage_index, copt)
                warm = True
            for epoch in range(start, cfg.epochs):
                if stopper.should_stop:
                    break
                self._set_train(stage)
                losses: list[float] = []
                sims: list[float] = []
                for step, indices in enumerate(self._batches(stage_index, epoch)):
                    batch, grid = self._train_batch(stage_index, epoch, step, indices)
                    opt.zero_grad(set_to_none=True)
                    if copt is not None:
                        copt.zero_grad(set_to_none=True)
                    out = self._forward(stage, batch.fixed, batch.moving, grid)
                    loss, parts = self._loss(out, batch, grid)
                    value = float(loss.detach())
                    if not math.isfinite(value):
                        raise fail("the training loss", epoch)
                    loss.backward()
                    if not all(p.grad is None or bool(torch.isfinite(p.grad).all())
                               for p in params):
                        raise fail("a network gradient", epoch)
                    if cfg.grad_clip is not None:
                        nn.utils.clip_grad_norm_(params, float(cfg.grad_clip))
                    opt.step()
                    if copt is not None:
                        if all(p.grad is None or bool(torch.isfinite(p.grad).all())
                               for p in self.metric.critic_parameters()):
                            copt.step()
                        for _ in range(cfg.critic_steps - 1):
                            self._critic_step(copt, batch.inner(batch.fixed),
                                              batch.inner(out.warped))
                    result.steps += 1
                    self._ema_update(ema, result.steps)
                    losses.append(value)
                    sims.append(parts["similarity"])
                    bar.update(advance=1.0, epoch=epoch + 1, loss=value)
                live = state_copy(self.net)
                self.net.load_state_dict(ema)
                record = {"epoch": float(epoch), "train_loss": sum(losses) / max(len(losses), 1),
                          "train_similarity": sum(sims) / max(len(sims), 1)}
                record.update(self.validate(stage))
                if not all(math.isfinite(v) for v in record.values()):
                    self.net.load_state_dict(live)
                    raise fail("a validation value", epoch)
                result.history.append(record)
                result.epochs = epoch + 1
                if stopper.update(record[self.monitor], epoch):
                    best = state_copy(self.net)
                    result.best_epoch, result.best_value = epoch, record[self.monitor]
                self.net.load_state_dict(live)
                if stopper.should_stop:
                    result.stop_reason = "early-stopping"
                self._save_checkpoint(state(False))
                bar.update(advance=0.0, epoch=epoch + 1, **{self.monitor: record[self.monitor]})
                if self.callback is not None:
                    self.callback({"stage": stage, **record})
                if stopper.should_stop:
                    break
        result.message = (f"stage {stage}: {result.epochs} epochs, {result.steps} steps, stopped "
                          f"by {result.stop_reason}; best {self.monitor} {result.best_value:.6g} "
                          f"at epoch {result.best_epoch + 1}")
        logger.info(result.message)
        finished[stage] = result.to_dict()
        self._save_checkpoint(state(True))  # live weights (a later run may continue them)
        self.net.load_state_dict(best)
        return result


def train_regnet(
    config: TrainNetConfig,
    train_source: Any,
    val_source: Any,
    out_path: str | os.PathLike,
    progress: bool = True,
    resume: bool = True,
    *,
    force: bool = False,
    callback: Callable[[dict[str, Any]], None] | None = None,
) -> RegNetTrainResult:
    """Train a registration network and write it as a model file (see the module docstring).

    Args:
        config: the settings.
        train_source: training pairs (a :class:`~itreg.train.sources.PairSource`).
        val_source: validation pairs (None: the training pairs, without augmentation).
        out_path: the model file to write (:func:`~itreg.nets.regnets.load_regnet` reads it);
            the checkpoint is ``out_path + ".ckpt"``.
        progress: show a progress bar on stderr.
        resume: continue from the checkpoint if there is one (its settings must match, except
            ``epochs``, ``patience``, ``device`` and ``threads``).
        force: overwrite an existing model file.
        callback: called after every epoch with the epoch's record (``stage``, ``epoch``,
            ``train_loss``, ``val_loss``, ``val_dice``).

    Returns:
        :class:`RegNetTrainResult`.

    Raises:
        ConfigError: invalid settings, empty sources, ``dice_weight`` without labels, or a
            checkpoint written with other settings.
        OutputExistsError: `out_path` exists and `force` is False (checked before training).
        TrainingError: a non-finite loss, gradient or validation value.
    """
    t0 = time.perf_counter()
    if not isinstance(config, TrainNetConfig):
        raise ConfigError(f"config must be a TrainNetConfig, got {type(config).__name__}")
    check_source(train_source, "training source")
    if config.crop_size is not None and config.norm == "instance":
        logger.warning("training on crops with instance normalisation: its statistics over a "
                       "crop differ from those over a whole image at prediction; "
                       "norm='batch' or 'none' is advised")
    if val_source is None:
        val_source = train_source
    check_source(val_source, "validation source")
    out = Path(out_path)
    if out.exists() and not force:
        raise OutputExistsError(f"model file {str(out)!r} exists; pass force=True (--force) to "
                                "overwrite it")
    with limited_threads(config.threads):
        trainer = _Trainer(config, train_source, val_source, out, progress, callback)
        payload = trainer.load_checkpoint() if resume else None
        finished: dict[str, Any] = {}
        results: dict[str, TrainResult] = {}
        first, resume_state = 0, None
        if payload is not None:
            finished = dict(payload["finished"])
            first = int(payload["stage"])
            if payload["stage_done"] and not _reopen(payload, config):
                trainer.net.load_state_dict(payload["best"])  # that stage is complete
                first += 1
            else:
                resume_state = payload
            for stage in trainer.stages[:first]:
                results[stage] = _result_from(finished[stage])
        for i in range(first, len(trainer.stages)):
            stage = trainer.stages[i]
            finished.pop(stage, None)
            results[stage] = trainer.run_stage(i, resume_state if i == first else None, finished)
        net = trainer.net.eval()
        wall = time.perf_counter() - t0
        extra = {"train": config.to_dict(), "monitor": trainer.monitor,
                 "classes": trainer.classes, "wall_time_s": wall,
                 "result": {k: v.to_dict() for k, v in results.items()},
                 "sources": {name: src.config() for name, src in
                             (("train", train_source), ("validation", val_source))
                             if hasattr(src, "config")}}
        save_regnet(out, net, extra=extra, force=True)
    logger.info("registration network written to %s (%.1f s)", out, wall)
    return RegNetTrainResult(net, out, trainer.ckpt_path, results, trainer.monitor, wall, config)


def _reopen(payload: dict[str, Any], config: TrainNetConfig) -> bool:
    """Whether a finished stage of a checkpoint continues (it ran out of epochs and more are
    allowed now)."""
    r = payload["result"]
    return r["stop_reason"] == "max-epochs" and int(r["epochs"]) < config.epochs

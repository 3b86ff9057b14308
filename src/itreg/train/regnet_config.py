"""Settings of :func:`itreg.train.regnet.train_regnet`: :class:`TrainNetConfig`.

See :mod:`itreg.train.regnet` for what each setting does in training; the small CPU setting is
:meth:`TrainNetConfig.small`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from itreg.errors import ConfigError, unknown_name
from itreg.metrics import available_metrics, get_metric
from itreg.nets.regnets import FIELDS, NORMS
from itreg.train.config import TrainingConfig, check_integer, check_number

__all__ = ["AUG_TARGETS", "CASCADE_MODES", "KINDS", "REGULARISERS", "RESUMABLE", "TrainNetConfig"]

KINDS = ("affine", "deform", "cascade")
"""Network kinds :func:`train_regnet` trains."""

REGULARISERS = ("diffusion", "bending", "tv")
CASCADE_MODES = ("two-stage", "joint")
AUG_TARGETS = ("both", "moving")

#: Settings that may change when a run is resumed.
RESUMABLE = ("epochs", "patience", "device", "threads")


@dataclass(frozen=True)
class TrainNetConfig(TrainingConfig):
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
    device: str = "cpu"

    def __post_init__(self) -> None:
        super().__post_init__()
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
            check_number(name, getattr(self, name), 0.0, strict=False)
        check_number("lr", self.lr)
        for name in ("critic_warmup", "crop_margin"):
            check_integer(name, getattr(self, name), 0)
        if self.crop_size is not None:
            sizes = (tuple(self.crop_size) if isinstance(self.crop_size, (list, tuple))
                     else (self.crop_size,))
            if not sizes or len(sizes) > 3 or any(
                    isinstance(s, bool) or not isinstance(s, int) or s <= 2 * self.crop_margin
                    for s in sizes):
                raise ConfigError("crop_size must be None, or one or one-per-axis integers "
                                  f"larger than 2 * crop_margin, got {self.crop_size!r}")
            object.__setattr__(self, "crop_size", sizes[0] if len(sizes) == 1 else sizes)
        check_integer("critic_steps", self.critic_steps, 1)
        for name in ("steps_per_epoch", "val_max_pairs"):
            if getattr(self, name) is not None:
                check_integer(name, getattr(self, name), 1)
        for name in ("critic_lr", "grad_clip"):
            if getattr(self, name) is not None:
                check_number(name, getattr(self, name))
        if not 0.0 <= float(self.ema_decay) < 1.0:
            raise ConfigError(f"ema_decay must be in [0, 1), got {self.ema_decay}")

    @classmethod
    def small(cls, **overrides: Any) -> TrainNetConfig:
        """The small CPU setting (2D slices or 3D at 4 mm; minutes on two cores)."""
        base: dict[str, Any] = {"features": (8, 16, 16, 16, 16), "affine_features": (8, 16, 32),
                                "batch_size": 4, "epochs": 20, "steps_per_epoch": 16,
                                "patience": 5, "lr": 1e-3, "critic_warmup": 50}
        base.update(overrides)
        return cls(**base)

"""Settings of DITR training (:func:`itreg.train.ditr.train_ditr`): the IML schedule
(:class:`IMLStage`, :data:`SCHEDULES`) and :class:`DITRTrainConfig`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from itreg.blocks.ditr import DEFAULT_CHANNELS, PATCH_SIZE
from itreg.errors import ConfigError, unknown_name
from itreg.train.config import TrainingConfig

__all__ = ["SCHEDULES", "DITRTrainConfig", "IMLStage"]


@dataclass(frozen=True)
class IMLStage:
    """One stage ``IML(l, sigma^2)``.

    Attributes:
        factor: downsampling factor ``l`` of the input images (0 or 1: none).
        sigma2_mm2: dither variance ``sigma^2`` in mm^2 (0: no dithering).
    """

    factor: int
    sigma2_mm2: float

    def __post_init__(self) -> None:
        if isinstance(self.factor, bool) or int(self.factor) != self.factor or self.factor < 0:
            raise ConfigError(f"an IML downsampling factor is an integer >= 0, got "
                              f"{self.factor!r}")
        if not (float(self.sigma2_mm2) >= 0 and math.isfinite(float(self.sigma2_mm2))):
            raise ConfigError(f"a dither variance is a finite number >= 0 (mm^2), got "
                              f"{self.sigma2_mm2!r}")
        object.__setattr__(self, "factor", int(self.factor))
        object.__setattr__(self, "sigma2_mm2", float(self.sigma2_mm2))

    @property
    def stride(self) -> int:
        """The decimation factor (``max(l, 1)``)."""
        return max(self.factor, 1)


#: Paper 000's schedules ``IML(l, sigma^2)``.
SCHEDULES: dict[str, tuple[IMLStage, ...]] = {
    "rigid": (IMLStage(4, 100.0), IMLStage(2, 15.0), IMLStage(0, 0.0)),
    "affine": (IMLStage(4, 100.0), IMLStage(2, 15.0), IMLStage(0, 0.0)),
    "edges": (IMLStage(2, 20.0), IMLStage(2, 10.0), IMLStage(0, 0.0)),
}


def _schedule(value: Any) -> tuple[IMLStage, ...]:
    if isinstance(value, str):
        if value not in SCHEDULES:
            raise unknown_name("IML schedule", value, SCHEDULES)
        return SCHEDULES[value]
    try:
        stages = tuple(s if isinstance(s, IMLStage) else IMLStage(*s) for s in value)
    except TypeError as exc:
        raise ConfigError(f"an IML schedule is a name or a list of (factor, sigma2_mm2), got "
                          f"{value!r}") from exc
    if not stages:
        raise ConfigError("an IML schedule needs at least one stage")
    return stages


@dataclass(frozen=True)
class DITRTrainConfig(TrainingConfig):
    """Settings of :func:`train_ditr` (defaults: the paper's where it gives them).

    Args:
        schedule: ``"rigid"``, ``"affine"``, ``"edges"`` or a list of ``(factor, sigma2_mm2)``.
        channels: hidden widths of the classifier (methods.md: 32, 64, 128, 256).
        patch_size: patch edge length in voxels (17).
        patches_per_epoch: patch pairs (positives + negatives, 1:1) drawn fresh per epoch.
        val_patches: size of the fixed validation set per stage.
        epochs: maximum epochs per stage.
        patience: early-stopping patience in epochs (0: none).
        batch_size: patch pairs per step (paper: 256).
        learning_rate: Adam step size (paper: 5e-5).
        weight_decay: L2 weight decay (paper: 0.005).
        augment: random 90-degree rotations and flips, the same for both channels.
        transform: transform re-registered between stages (``"rigid"``, ``"affine"``,
            ``"translation"``, ``"similarity"``). None (default): the schedule's: ``"affine"``
            for the ``"affine"`` schedule (paper 000's affine experiment re-registers the
            training pairs with the affine model it is trained for), ``"rigid"`` otherwise.
        reregister: re-register the training pairs between stages (IML, Eq. 12). False trains
            every stage on the initial transforms (plain maximum likelihood on rough data).
        register_iterations: Powell iterations per re-registration.
        stride: patch-centre stride of the metric during re-registration, in voxels.
        min_patches: the metric's least number of patches during re-registration (the stride
            shrinks until the mask holds that many; see :mod:`itreg.metrics.ditr`).
        symmetric: build a flip-symmetric classifier (logit averaged over the axis flips of
            the pair, :class:`~itreg.blocks.ditr.DITRNet`), so the response peaks without a
            direction preferred by the network.
        zero_mean_updates: after every re-registration, remove the mean update over all
            training pairs (translation at the fixed-mask centroids and log-Euclidean mean of
            the linear parts, :func:`remove_mean_update`), so IML cannot drift in the common
            mode that the data do not identify. Off by default: it made no measurable
            difference in the 2D benchmark (see the module docstring).
        bias_augment: amplitude ``s`` of the bias-field augmentation of the training patches
            (0: none). Each channel of every training pair (z=1 and z=0 alike) is multiplied
            by its own random smooth positive field ``exp(s (a + sum_d g_d x_d))``, with
            ``a, g_d ~ U(-1, 1)`` and ``x_d`` the patch position normalised to [-1, 1]
            (:func:`random_bias_fields`): a random gain and linear log-ramp, within
            ``[exp(-(1 + D) s), exp((1 + D) s)]``. The phantoms' bias field spans 0.80-1.17
            over the brain (log range 0.38), about a third of that over a 17-voxel patch at
            3 mm; ``s = 0.1`` covers that with room. The validation patches are not
            augmented. Off by default: neither 0.1 nor 0.3 changed the errors or the response
            peaks in the 2D benchmark (``2026-12-06-ditr-bias-robust.md``).
        normalize_patches: build the classifier with per-patch intensity normalisation
            (:class:`~itreg.blocks.ditr.DITRNet` ``normalize``): each channel of each patch
            standardised by its own mean and standard deviation. Off by default: in the 2D
            benchmark it about halved the errors of T1 -> T2-like registrations with a bias
            field and took the response peaks to within 0.1 mm, but it narrowed the response
            (FWHM 34 -> 17 mm) and the capture range (no dither: 3 of 5 missed at 25 mm;
            edges model: 60% / 0% instead of 80% / 80% at 15 / 25 mm). Use it when the start
            is within about 15 mm, with a dithered schedule. ``False`` gives the classifier
            of models trained before.
        val_fraction: fraction of pairs held out for validation when there are >= 5 pairs.
        seed: seed of the initial weights, sampling and augmentation.
        threads: torch CPU threads while training (None: unchanged). On a shared CPU, 1 is
            often fastest for these small convolutions.
        progress: show progress bars on stderr.
    """

    schedule: Any = "rigid"
    channels: tuple[int, ...] = DEFAULT_CHANNELS
    patch_size: int = PATCH_SIZE
    patches_per_epoch: int = 65536
    val_patches: int = 8192
    epochs: int = 20
    patience: int = 3
    batch_size: int = 256
    learning_rate: float = 5e-5
    weight_decay: float = 0.005
    augment: bool = False
    transform: str | None = None
    reregister: bool = True
    register_iterations: int = 20
    stride: int = 8
    min_patches: int = 256
    symmetric: bool = True
    zero_mean_updates: bool = False
    bias_augment: float = 0.0
    normalize_patches: bool = False
    val_fraction: float = 0.2
    progress: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.transform is None:
            named_affine = isinstance(self.schedule, str) and self.schedule == "affine"
            object.__setattr__(self, "transform", "affine" if named_affine else "rigid")
        object.__setattr__(self, "schedule", _schedule(self.schedule))
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))
        for name in ("patches_per_epoch", "val_patches", "batch_size", "epochs"):
            v = getattr(self, name)
            if isinstance(v, bool) or int(v) != v or int(v) < (0 if name == "epochs" else 2):
                raise ConfigError(f"{name} must be an integer >= {0 if name == 'epochs' else 2}"
                                  f", got {v!r}")
        if not self.learning_rate > 0 or not self.weight_decay >= 0:
            raise ConfigError("learning_rate must be > 0 and weight_decay >= 0")
        if self.transform not in ("translation", "rigid", "similarity", "affine"):
            raise unknown_name("IML transform", self.transform,
                               ("translation", "rigid", "similarity", "affine"))
        if not 0.0 <= float(self.bias_augment) < float("inf"):
            raise ConfigError(f"bias_augment must be >= 0, got {self.bias_augment}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"val_fraction must be in [0, 1), got {self.val_fraction}")

    @classmethod
    def small(cls, **overrides: Any) -> DITRTrainConfig:
        """The small CPU setting (2D slices or 3D at 3-4 mm; minutes on two cores)."""
        base = {"schedule": ((2, 100.0), (1, 15.0), (1, 0.0)), "patches_per_epoch": 16384,
                "val_patches": 4096, "epochs": 8, "patience": 2, "learning_rate": 1e-3,
                "weight_decay": 1e-4, "register_iterations": 10}
        base.update(overrides)
        return cls(**base)

    @classmethod
    def full(cls, **overrides: Any) -> DITRTrainConfig:
        """The paper-scale setting for a GPU (3D at 1 mm, 10^6 patch pairs per stage)."""
        base = {"schedule": "rigid", "patches_per_epoch": 200_000, "val_patches": 20_000,
                "epochs": 30, "patience": 5, "learning_rate": 5e-5, "weight_decay": 0.005,
                "register_iterations": 30}
        base.update(overrides)
        return cls(**base)

    def to_dict(self) -> dict[str, Any]:
        """Plain-data settings (stored in the model file)."""
        out = dataclasses.asdict(self)
        out["schedule"] = [[s.factor, s.sigma2_mm2] for s in self.schedule]
        out["channels"] = list(self.channels)
        return out

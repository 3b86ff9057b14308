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

Every stage runs through :func:`itreg.train.fit` (the one training loop): the critic's steps are
its ``after_step`` hook, its warm-up the ``on_start`` hook, the moving average its
:class:`~itreg.train.EMA`, and the checkpoint its :class:`~itreg.train.FitCheckpoint` (the extra
state holds the stage, the finished stages' results, the critic, its optimiser and the metric's
random generator). The settings are :class:`~itreg.train.regnet_config.TrainNetConfig`; batches,
augmentation, crops and the soft Dice are in :mod:`itreg.train.regnet_batches`.

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

import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import itreg.metrics.neural  # noqa: F401  (registers "mine" and "kldiv")
from itreg.errors import ConfigError, OutputExistsError
from itreg.evaluate import dice as dice_score
from itreg.grid import Grid
from itreg.metrics import get_metric
from itreg.metrics.neural import critic_steps
from itreg.nets.regnets import (
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
from itreg.train.loop import (
    EMA,
    FitCheckpoint,
    FitHooks,
    TrainingError,
    TrainResult,
    checkpoint_path,
    finite_grads,
    fit,
    make_generator,
    result_from_dict,
    seeded,
)
from itreg.train.regnet_batches import (
    Batch,
    augment_batch,
    crop_batch,
    load_batch,
    one_hot,
    soft_dice,
)
from itreg.train.regnet_config import KINDS, RESUMABLE, TrainNetConfig
from itreg.train.sources import check_source

logger = logging.getLogger(__name__)

__all__ = ["KINDS", "RegNetTrainResult", "TrainNetConfig", "build_network", "checkpoint_path",
           "soft_dice", "train_regnet"]




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

    def _loss(self, out: RegOutput, batch: Batch, grid: Grid) -> tuple[Tensor, dict[str, float]]:
        cfg = self.config
        sim = self._similarity(batch.inner(batch.fixed), batch.inner(out.warped))
        total = cfg.loss_weight * sim
        parts = {"similarity": float(sim.detach())}
        if self.reg is not None and out.field is not None and cfg.reg_weight > 0:
            r = self.reg(out.field, grid)
            total = total + cfg.reg_weight * r
            parts["regulariser"] = float(r.detach())
        if cfg.dice_weight > 0 and batch.fixed_labels is not None:
            warped = warp_batch(one_hot(batch.moving_labels, self.classes), grid, out.points)
            d = soft_dice(batch.inner(one_hot(batch.fixed_labels, self.classes)),
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
                     ) -> tuple[Batch, Grid]:
        batch, grid = load_batch(self.train_source, indices, self.net, self.device)
        if self.config.augment:
            gen = make_generator(self.config.seed * 7_919 + stage_index * 1_000_003
                                 + epoch * 10_007 + step)
            batch = augment_batch(batch, grid, self.config, gen)
        if self.config.crop_size is not None:
            gen = make_generator(self.config.seed * 6_007 + stage_index * 1_000_033
                                 + epoch * 10_009 + step)
            batch, grid = crop_batch(batch, grid, self.config.crop_size, self.config.crop_margin,
                                gen)
        return batch, grid

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
                batch, grid = load_batch(self.val_source, [i], self.net, self.device)
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
        return critic_steps(self.metric, copt,
                            lambda: self._similarity(fixed, warped.detach())) == 1

    def _critic_warmup(self, stage: str, stage_index: int, copt: torch.optim.Optimizer) -> None:
        n = self.config.critic_warmup
        if n <= 0:
            return
        gen = make_generator(self.config.seed * 31 + stage_index + 17)
        self.net.eval()
        for _ in range(n):
            idx = torch.randint(len(self.train_source), (self.config.batch_size,),
                                generator=gen).tolist()
            batch, grid = load_batch(self.train_source, idx, self.net, self.device)
            with torch.no_grad():
                out = self._forward(stage, batch.fixed, batch.moving, grid)
            if not self._critic_step(copt, batch.fixed, out.warped):
                break

    # ------------------------------------------------------------ one stage
    def settings(self) -> dict[str, Any]:
        """What a checkpoint must share with this run to resume it (all but RESUMABLE)."""
        return {k: v for k, v in self.config.to_dict().items() if k not in RESUMABLE}

    def checkpoint(self, stage_index: int, finished: dict[str, Any], resume: bool,
                   copt: torch.optim.Optimizer | None = None,
                   warm: dict[str, bool] | None = None) -> FitCheckpoint:
        """The run's :class:`FitCheckpoint` for one stage (its extra state: the stage, the
        finished stages, the critic and its optimiser, the metric's random state)."""
        def get_state() -> dict[str, Any]:
            gen_state, log_ema = self._metric_state()
            return {"stage": stage_index, "finished": finished,
                    "critic": self.metric.critic.state_dict() if copt is not None else None,
                    "critic_optimizer": copt.state_dict() if copt is not None else None,
                    "critic_warm": bool(warm and warm["done"]),
                    "metric_generator": gen_state, "log_ema": log_ema}

        def set_state(extra: dict[str, Any]) -> None:
            if copt is not None and extra.get("critic") is not None:
                self.metric.critic.load_state_dict(extra["critic"])
                copt.load_state_dict(extra["critic_optimizer"])
            self._restore_metric_state((extra.get("metric_generator"), extra.get("log_ema")))
            if warm is not None:
                warm["done"] = bool(extra.get("critic_warm", False))

        return FitCheckpoint(self.ckpt_path, self.settings(), get_state, set_state,
                             resume=resume)

    def run_stage(self, stage_index: int, resume: bool, finished: dict[str, Any]) -> TrainResult:
        """Train one stage through :func:`~itreg.train.fit` (continuing its checkpoint when
        `resume`); the network ends with the stage's best (EMA) weights."""
        stage = self.stages[stage_index]
        cfg = self.config
        module = self._module(stage)
        params = [p for p in module.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        copt = self._critic_optimizer()
        warm = {"done": False}
        last: dict[str, Any] = {}

        def batches(epoch: int) -> Iterator[tuple[Batch, Grid]]:
            for step, indices in enumerate(self._batches(stage_index, epoch)):
                yield self._train_batch(stage_index, epoch, step, indices)

        def loss_fn(item: tuple[Batch, Grid]) -> tuple[Tensor, dict[str, float]]:
            batch, grid = item
            if copt is not None:
                copt.zero_grad(set_to_none=True)
            out = self._forward(stage, batch.fixed, batch.moving, grid)
            loss, parts = self._loss(out, batch, grid)
            last["batch"], last["out"] = batch, out
            return loss, {"train_similarity": parts["similarity"]}

        def critic_steps() -> None:
            if finite_grads(self.metric.critic_parameters()):
                copt.step()
            batch, out = last["batch"], last["out"]
            for _ in range(cfg.critic_steps - 1):
                self._critic_step(copt, batch.inner(batch.fixed), batch.inner(out.warped))

        def warm_up() -> None:
            if copt is not None and not warm["done"]:
                self._critic_warmup(stage, stage_index, copt)
                warm["done"] = True

        def epoch_end(record: dict[str, float]) -> None:
            if self.callback is not None:
                self.callback({"stage": stage, **record})

        hooks = FitHooks(on_start=warm_up, train_mode=lambda: self._set_train(stage),
                         after_step=critic_steps if copt is not None else None,
                         on_epoch_end=epoch_end)
        ckpt = self.checkpoint(stage_index, finished, resume, copt, warm)
        try:
            result = fit(self.net, opt, batches, loss_fn, lambda: self.validate(stage),
                         epochs=cfg.epochs, monitor=self.monitor, mode=self.mode,
                         patience=cfg.patience, grad_clip=cfg.grad_clip, progress=self.progress,
                         description=f"{stage} net, {cfg.loss}",
                         steps_per_epoch=len(self._batches(stage_index, 0)), resume=ckpt,
                         hooks=hooks, ema=EMA(cfg.ema_decay), params=params)
        except TrainingError as exc:
            raise TrainingError(f"stage {stage!r}: {exc} For a neural metric, also lower "
                                "critic_lr or set grad_clip.", exc.result) from None
        result.message = f"stage {stage}: {result.message}"
        finished[stage] = result.to_dict()
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
            ``epochs``, ``patience``, ``device`` and ``threads``); a stage that ran out of
            epochs continues when more are allowed now.
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
        saved = trainer.checkpoint(0, {}, resume).load(trainer.device)
        first = int(saved["extra"]["stage"]) if saved is not None else 0
        finished: dict[str, Any] = dict(saved["extra"]["finished"]) if saved is not None else {}
        results: dict[str, TrainResult] = {}
        for i, stage in enumerate(trainer.stages):
            if i < first:  # finished before the checkpoint's stage began
                results[stage] = result_from_dict(finished[stage])
                continue
            finished.pop(stage, None)
            results[stage] = trainer.run_stage(i, resume and i == first, finished)
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

"""The one training loop of itreg: :func:`fit`, its checkpoint format and its helpers.

:func:`fit` runs epochs of a user-supplied ``loss_fn`` over user-supplied batches with one
optimiser, validates after every epoch, keeps the best weights, stops early when the monitored
validation value stops improving, writes checkpoints through a callback, shows a ``rich``
progress bar on stderr, and **stops on the first non-finite loss, gradient or validation value**:
it restores the last good weights, writes them with the checkpoint callback and raises
:class:`TrainingError` with a message that says where it happened and what was kept.

Hooks (:class:`FitHooks`) add what some trainers need without a second loop: a step before the
first epoch (a critic's warm-up), the training mode of the model (a frozen part kept in eval
mode), a second optimiser's step after each network step (the MINE / KL critics of
:mod:`itreg.train.regnet` and :mod:`itreg.train.critic`) and a callback after every epoch. An
:class:`EMA` of the weights (``ema=``) is what is validated, kept as best and returned.

With a :class:`FitCheckpoint`, :func:`fit` also writes a **resumable checkpoint** after every
epoch (weights, optimiser state, best weights, EMA, early-stopping state, history, and any extra
state the caller adds, such as random generators or a critic), and a later call with the same
settings continues from the epoch after the last one written. It is the one checkpoint format of
the training code.

Helpers: :func:`make_generator` (seeded ``torch.Generator`` on a device), :func:`seeded`
(:func:`itreg.runtime.seeded`, re-exported: module initialisation seeded without touching the
global RNG state outside the block), :class:`Patience` (early stopping on a validation value), :class:`TrainResult`,
:func:`progress_bar`, :func:`checkpoint_path`, :func:`state_copy`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from itreg.errors import ConfigError, ItregError, ModelFileError
from itreg.runtime import ProgressLines, seeded

logger = logging.getLogger(__name__)

__all__ = ["EMA", "FitCheckpoint", "FitHooks", "TrainResult", "TrainingError", "ValidationPatience",
           "checkpoint_path", "fit", "make_generator", "progress_bar", "result_from_dict",
           "seeded", "state_copy"]

#: ``format`` / ``version`` of the files :class:`FitCheckpoint` writes.
FIT_CHECKPOINT_FORMAT = "itreg-fit-checkpoint"
FIT_CHECKPOINT_VERSION = 1


class TrainingError(ItregError):
    """Training could not go on (a non-finite loss, gradient or validation value).

    Attributes:
        result: the :class:`TrainResult` up to the failure (``stop_reason == "non-finite"``);
            the model holds the last good weights.
    """

    def __init__(self, message: str, result: TrainResult | None = None) -> None:
        super().__init__(message)
        self.result = result


def make_generator(seed: int, device: torch.device | str | None = None) -> torch.Generator:
    """A ``torch.Generator`` on `device` (CPU by default) seeded with `seed`."""
    if isinstance(seed, bool) or int(seed) != seed:
        raise ConfigError(f"seed must be an integer, got {seed!r}")
    return torch.Generator(device=device or "cpu").manual_seed(int(seed))


def checkpoint_path(out_path: str | os.PathLike) -> Path:
    """The checkpoint file that goes with a model file: ``out_path`` + ``".ckpt"``."""
    p = Path(out_path)
    return p.with_name(p.name + ".ckpt")


def state_copy(module: nn.Module) -> dict[str, Tensor]:
    """A detached copy of a module's ``state_dict`` (for best / last-good weights)."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@dataclass
class ValidationPatience:
    """Early stopping of :func:`fit`: stop when the monitored value has not improved for
    `patience` epochs (not the registration engine's per-iteration
    :class:`itreg.engine.callbacks.EarlyStopping` callback).

    Args:
        patience: epochs without improvement before stopping (0: never stop early).
        min_delta: an improvement must lower the value by more than this.
        mode: ``"min"`` (losses) or ``"max"`` (accuracies).
    """

    patience: int = 5
    min_delta: float = 0.0
    mode: str = "min"
    best: float = math.nan
    best_epoch: int = -1
    bad_epochs: int = 0

    def __post_init__(self) -> None:
        if self.mode not in ("min", "max"):
            raise ConfigError(f"early-stopping mode must be 'min' or 'max', got {self.mode!r}")
        if int(self.patience) < 0:
            raise ConfigError(f"patience must be >= 0, got {self.patience}")

    def update(self, value: float, epoch: int) -> bool:
        """Record an epoch's value; return True if it is the best so far."""
        sign = 1.0 if self.mode == "min" else -1.0
        if math.isnan(self.best) or sign * (self.best - value) > self.min_delta:
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        """Whether `patience` epochs have passed without improvement."""
        return self.patience > 0 and self.bad_epochs >= self.patience


@dataclass
class TrainResult:
    """What :func:`fit` did.

    Attributes:
        epochs: epochs run.
        steps: optimiser steps taken.
        best_epoch: epoch (0-based) of the kept weights (-1: the initial ones).
        best_value: monitored validation value of the kept weights.
        stop_reason: ``"early-stopping"``, ``"max-epochs"`` or ``"non-finite"``.
        history: one dict per epoch (``epoch``, ``train_loss`` and the validation values).
        message: a human-readable summary (the failure message for ``"non-finite"``).
    """

    epochs: int = 0
    steps: int = 0
    best_epoch: int = -1
    best_value: float = math.nan
    stop_reason: str = "max-epochs"
    history: list[dict[str, float]] = field(default_factory=list)
    message: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable summary (non-finite numbers become None)."""
        def clean(v: Any) -> Any:
            return v if not isinstance(v, float) or math.isfinite(v) else None
        return {"epochs": self.epochs, "steps": self.steps, "best_epoch": self.best_epoch,
                "best_value": clean(self.best_value), "stop_reason": self.stop_reason,
                "message": self.message,
                "history": [{k: clean(v) for k, v in h.items()} for h in self.history]}


def result_from_dict(d: Mapping[str, Any]) -> TrainResult:
    """The :class:`TrainResult` of a :meth:`TrainResult.to_dict` (None becomes NaN)."""
    r = TrainResult(epochs=int(d["epochs"]), steps=int(d["steps"]),
                    best_epoch=int(d["best_epoch"]),
                    best_value=math.nan if d["best_value"] is None else float(d["best_value"]),
                    stop_reason=str(d["stop_reason"]), message=str(d.get("message", "")))
    r.history = [{k: (math.nan if v is None else float(v)) for k, v in h.items()}
                 for h in d["history"]]
    return r


class EMA:
    """An exponential moving average of a module's weights (the validated and kept weights).

    After update ``n`` the average moves with decay ``min(decay, (1 + n) / (10 + n))`` (a short
    memory at the start); integer buffers (batch-norm counters) are copied. ``decay=0`` makes
    the average the live weights.
    """

    def __init__(self, decay: float) -> None:
        if not 0.0 <= float(decay) < 1.0:
            raise ConfigError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.state: dict[str, Tensor] = {}

    def start(self, module: nn.Module) -> None:
        """Start the average at the module's current weights."""
        self.state = state_copy(module)

    def update(self, module: nn.Module, updates: int) -> None:
        """Move the average towards the module's weights after optimiser step `updates`."""
        decay = min(self.decay, (1.0 + updates) / (10.0 + updates))
        with torch.no_grad():
            for k, v in module.state_dict().items():
                if v.is_floating_point() and decay > 0:
                    self.state[k].mul_(decay).add_(v.detach(), alpha=1.0 - decay)
                else:
                    self.state[k].copy_(v)


@dataclass
class FitHooks:
    """Optional steps :func:`fit` calls around its own (all None by default).

    Attributes:
        on_start: ``on_start()`` once before the first epoch run by this call (after a resumed
            state is restored), e.g. a critic's warm-up.
        train_mode: ``train_mode()`` puts the model in training mode at the start of every
            epoch (None: ``model.train()``), e.g. keeping a frozen part in eval mode.
        after_step: ``after_step()`` after every optimiser step of the model (before the EMA
            update), e.g. a second optimiser's step (a critic's) on the same batch.
        on_epoch_end: ``on_epoch_end(record)`` after every epoch (after the resumable
            checkpoint is written), with the epoch's history record.
    """

    on_start: Callable[[], None] | None = None
    train_mode: Callable[[], None] | None = None
    after_step: Callable[[], None] | None = None
    on_epoch_end: Callable[[dict[str, float]], None] | None = None


@dataclass
class FitCheckpoint:
    """A resumable checkpoint for :func:`fit`, written after every epoch.

    The file holds the model's weights, the optimiser's state (through its ``state_dict`` /
    ``load_state_dict``), the best weights so far, the early-stopping state, the per-epoch
    history and whatever ``get_state()`` returns (random generators, counters). It is read with
    ``weights_only=True``, so the extra state may hold tensors, numbers, strings, lists and dicts.

    Attributes:
        path: the checkpoint file (written atomically, kept when training ends so that a later
            call with more ``epochs`` continues).
        settings: what must be the same to resume (plain JSON-like values); a checkpoint written
            with other settings is refused with a :class:`~itreg.errors.ConfigError`.
        get_state: extra state to save (called after each epoch), or None.
        set_state: restores that extra state when resuming, or None.
        resume: continue from an existing checkpoint (False: start afresh and overwrite it).
    """

    path: Path
    settings: dict[str, Any]
    get_state: Callable[[], dict[str, Any]] | None = None
    set_state: Callable[[dict[str, Any]], None] | None = None
    resume: bool = True

    def exists(self) -> bool:
        """Whether a checkpoint file is there to resume from (and `resume` is on)."""
        return self.resume and Path(self.path).is_file()

    def load(self, device: torch.device) -> dict[str, Any] | None:
        """The saved state, or None when there is none to resume from.

        Raises:
            ModelFileError: the file cannot be read or is not a :func:`fit` checkpoint.
            ConfigError: it was written with other settings.
        """
        if not self.exists():
            return None
        path = Path(self.path)
        try:
            payload = torch.load(path, map_location=device, weights_only=True)
        except Exception as exc:
            raise ModelFileError(f"checkpoint {str(path)!r} cannot be read ({exc}); delete it "
                                 "or start without resuming") from exc
        if not isinstance(payload, dict) or payload.get("format") != FIT_CHECKPOINT_FORMAT or \
                payload.get("version") != FIT_CHECKPOINT_VERSION:
            raise ModelFileError(f"{str(path)!r} is not a training checkpoint of version "
                                 f"{FIT_CHECKPOINT_VERSION}; delete it or start without resuming")
        old, new = payload.get("settings", {}), self.settings
        if old != new:
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise ConfigError(f"checkpoint {str(path)!r} was written with other settings "
                              f"({', '.join(diff)}); delete it or start without resuming")
        return payload

    def save(self, state: dict[str, Any]) -> None:
        """Write `state` (plus the format, version, settings and extra state) atomically."""
        from itreg.io.outputs import atomic_output_file

        payload = {"format": FIT_CHECKPOINT_FORMAT, "version": FIT_CHECKPOINT_VERSION,
                   "settings": self.settings, **state,
                   "extra": self.get_state() if self.get_state is not None else {}}
        with atomic_output_file(self.path, force=True) as tmp:
            torch.save(payload, tmp)


class _NoProgress:
    def update(self, **kwargs: Any) -> None:
        """Ignore progress updates."""


class _RichProgress:
    def __init__(self, progress: Any, task: Any) -> None:
        self._progress, self._task = progress, task

    def update(self, advance: float = 0.0, **fields: Any) -> None:
        """Advance the bar and show `fields` (for example the loss)."""
        text = "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in fields.items())
        self._progress.update(self._task, advance=advance, info=text)


@contextlib.contextmanager
def progress_bar(enabled: bool, description: str, total: float | None) -> Iterator[Any]:
    """A ``rich`` progress bar on stderr (a no-op object when disabled or rich is missing).

    Yields an object with ``update(advance=..., **fields)``.
    """
    if not enabled:
        yield _NoProgress()
        return
    try:
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    except ImportError:  # rich is optional: train silently
        yield _NoProgress()
        return
    console = Console(file=sys.stderr)
    if not console.is_terminal:  # a log file or a batch job: plain lines, never cut
        yield ProgressLines(description, total)
        return
    columns = (TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed:.0f}/"
               "{task.total:.0f}"), TimeElapsedColumn(), TextColumn("{task.fields[info]}"))
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task(description, total=total, info="")
        yield _RichProgress(progress, task)


def _module_device(module: nn.Module) -> torch.device:
    for tensor in (*module.parameters(), *module.buffers()):
        return tensor.device
    return torch.device("cpu")


def finite_grads(params: Iterable[Tensor]) -> bool:
    """Whether every gradient of `params` is finite (None counts as finite)."""
    return all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in params)


def fit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Callable[[int], Iterable[Any]],
    loss_fn: Callable[[Any], Tensor | tuple[Tensor, Mapping[str, float]]],
    validate: Callable[[], Mapping[str, float]] | None = None,
    *,
    epochs: int = 10,
    monitor: str = "val_loss",
    mode: str = "min",
    patience: int = 5,
    min_delta: float = 0.0,
    checkpoint: Callable[[nn.Module, dict[str, Any]], None] | None = None,
    grad_clip: float | None = None,
    progress: bool = True,
    description: str = "training",
    steps_per_epoch: int | None = None,
    resume: FitCheckpoint | None = None,
    hooks: FitHooks | None = None,
    ema: EMA | None = None,
    params: Iterable[Tensor] | None = None,
) -> TrainResult:
    """Train `model` with early stopping, checkpoints and NaN protection.

    Args:
        model: the module to train (switched to train mode for batches, eval for validation).
        optimizer: an optimiser over (some of) its parameters.
        batches: ``batches(epoch)`` yields the epoch's batches (any objects `loss_fn` takes).
        loss_fn: ``loss_fn(batch)`` -> 0-d loss tensor to minimise, or ``(loss, parts)`` where
            `parts` maps names to floats that are averaged over the epoch into its record.
        validate: ``validate()`` -> dict of validation values (run under ``torch.no_grad`` in
            eval mode, with the EMA weights when `ema` is given); must contain `monitor`. None
            monitors the mean training loss.
        epochs: maximum number of epochs.
        monitor: the validation value that selects the best weights and drives early stopping.
        mode: ``"min"`` or ``"max"`` for `monitor`.
        patience: epochs without improvement before stopping (0: run all epochs).
        min_delta: smallest change that counts as an improvement.
        checkpoint: ``checkpoint(model, info)`` is called with the model holding the best
            weights whenever they improve, and with the last good weights on a non-finite value.
        grad_clip: clip the gradient norm of `params` to this value (None: no clipping).
        progress: show a progress bar on stderr.
        description: the progress bar's label.
        steps_per_epoch: batches per epoch, for the progress bar's total (optional).
        resume: write a resumable checkpoint after every epoch there, and continue from it when
            it exists (the epochs already run count towards `epochs`); None: no resuming.
            `optimizer` must have ``state_dict`` / ``load_state_dict``.
        hooks: the optional steps of :class:`FitHooks`.
        ema: an :class:`EMA` of the weights, updated after every step; the average is what is
            validated, kept as best and returned (None: the live weights).
        params: the parameters whose gradients are checked and clipped (None: the model's).

    Returns:
        The :class:`TrainResult`; the model holds the best weights.

    Raises:
        TrainingError: a loss, gradient or validation value was NaN or infinite. The model holds
            the last good weights (the best so far, or the initial ones), and `checkpoint` has
            been called with them.
        ConfigError: invalid settings, or a checkpoint written with other settings.
        ModelFileError: an unreadable checkpoint.
    """
    if int(epochs) < 0:
        raise ConfigError(f"epochs must be >= 0, got {epochs}")
    hooks = hooks or FitHooks()
    checked = list(model.parameters() if params is None else params)
    stopper = ValidationPatience(patience=int(patience), min_delta=float(min_delta), mode=mode)
    result = TrainResult()
    if ema is not None:
        ema.start(model)
    best_state = state_copy(model)
    first = 0
    saved = resume.load(_module_device(model)) if resume is not None else None
    if saved is not None:
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        best_state = {k: v.detach().clone() for k, v in saved["best_state"].items()}
        if ema is not None:
            ema.state = {k: v.detach().clone() for k, v in saved["ema"].items()}
        stopper.best, stopper.best_epoch, stopper.bad_epochs = saved["stopper"]
        for name, value in saved["result"].items():
            setattr(result, name, value)
        result.stop_reason = "max-epochs"
        if resume.set_state is not None:
            resume.set_state(saved["extra"])
        first = result.epochs
        logger.info("resuming at epoch %d from %s", first + 1, resume.path)
    total = None if steps_per_epoch is None else \
        float(steps_per_epoch) * max(int(epochs) - first, 0)

    def save_resumable() -> None:
        if resume is None:
            return
        resume.save({"model": state_copy(model), "optimizer": optimizer.state_dict(),
                     "best_state": best_state,
                     "ema": ema.state if ema is not None else None,
                     "stopper": [stopper.best, stopper.best_epoch, stopper.bad_epochs],
                     "result": {"epochs": result.epochs, "steps": result.steps,
                                "best_epoch": result.best_epoch,
                                "best_value": result.best_value,
                                "history": result.history}})

    def fail(where: str, epoch: int, info: dict[str, Any]) -> TrainingError:
        model.load_state_dict(best_state)
        kept = (f"epoch {result.best_epoch + 1}" if result.best_epoch >= 0
                else "the initial weights")
        held = (f" and the checkpoint {str(resume.path)!r} holds the last good epoch"
                if resume is not None else "")
        result.stop_reason = "non-finite"
        result.message = (f"training stopped at epoch {epoch + 1}, step {result.steps}: {where} "
                          f"became NaN or infinite; the last good weights ({kept}) were "
                          f"kept{held}. Lower the learning rate or check the inputs for NaN/Inf.")
        if checkpoint is not None:
            checkpoint(model, {**info, "stop_reason": "non-finite", "message": result.message})
        logger.warning(result.message)
        return TrainingError(result.message, result)

    with progress_bar(progress, description, total) as bar:
        if hooks.on_start is not None and first < int(epochs):
            hooks.on_start()
        for epoch in range(first, int(epochs)):
            if stopper.should_stop:  # a resumed run that had already stopped early
                result.stop_reason = "early-stopping"
                break
            if hooks.train_mode is not None:
                hooks.train_mode()
            else:
                model.train()
            losses: list[float] = []
            parts: dict[str, list[float]] = {}
            for batch in batches(epoch):
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(batch)
                if isinstance(loss, tuple):
                    loss, named = loss
                    for k, v in named.items():
                        parts.setdefault(k, []).append(float(v))
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise fail("the training loss", epoch, {"epoch": epoch})
                loss.backward()
                if not finite_grads(checked):
                    raise fail("a gradient", epoch, {"epoch": epoch})
                if grad_clip is not None:
                    nn.utils.clip_grad_norm_(checked, float(grad_clip))
                optimizer.step()
                if hooks.after_step is not None:
                    hooks.after_step()
                result.steps += 1
                if ema is not None:
                    ema.update(model, result.steps)
                losses.append(value)
                bar.update(advance=1.0, epoch=epoch + 1, loss=value)
            train_loss = sum(losses) / max(len(losses), 1)
            record: dict[str, float] = {"epoch": float(epoch), "train_loss": train_loss}
            record.update({k: sum(v) / max(len(v), 1) for k, v in parts.items()})
            live = None
            if ema is not None:
                live = state_copy(model)
                model.load_state_dict(ema.state)
            if validate is not None:
                model.eval()
                with torch.no_grad():
                    record.update({k: float(v) for k, v in validate().items()})
            else:
                record["train_loss_monitor"] = train_loss
            key = monitor if validate is not None else "train_loss_monitor"
            if key not in record:
                raise ConfigError(f"validation returned {sorted(record)}; no {monitor!r} to "
                                  "monitor")
            if not all(math.isfinite(v) for v in record.values()):
                raise fail("a validation value", epoch, {"epoch": epoch, **record})
            result.history.append(record)
            result.epochs = epoch + 1
            if stopper.update(record[key], epoch):
                best_state = state_copy(model)
                result.best_epoch, result.best_value = epoch, record[key]
                if checkpoint is not None:
                    checkpoint(model, {"epoch": epoch, **record})
            if live is not None:
                model.load_state_dict(live)
            save_resumable()
            bar.update(advance=0.0, epoch=epoch + 1, **{key: record[key]})
            if hooks.on_epoch_end is not None:
                hooks.on_epoch_end(record)
            if stopper.should_stop:
                result.stop_reason = "early-stopping"
                break
    model.load_state_dict(best_state)
    result.message = (f"{result.epochs} epochs, {result.steps} steps, stopped by "
                      f"{result.stop_reason}; best {monitor} {result.best_value:.6g} at epoch "
                      f"{result.best_epoch + 1}")
    logger.info(result.message)
    return result

"""Pre-training a MINE / KLDivNet critic on aligned pairs, through :func:`itreg.train.fit`.

:func:`train_critic` pools the voxels of aligned (fixed, moving) pairs, holds a random fraction
out for validation and ascends the metric's bound on random voxel batches with Adam. An
"epoch" of :func:`~itreg.train.fit` is ``val_every`` steps: after each the bound on the
validation voxels (one fixed shuffle seed) selects the best weights (written to ``checkpoint``),
and training stops early after ``patience`` validations without improvement. A NaN/Inf estimate
or gradient stops training with a clear message, keeping the last good weights; unlike the
other trainers it is reported in the result (``stop_reason == "non-finite"``), not raised.

The metric, its bounds and its model file are :mod:`itreg.metrics.neural`'s; the critic trained
here is written with :func:`~itreg.metrics.neural.save_critic` and read back with
``get_metric("mine:critic.pt")``.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from itreg.errors import ConfigError
from itreg.metrics.neural import NeuralMI, pooled_samples, save_critic
from itreg.train.loop import TrainingError, TrainResult, fit

logger = logging.getLogger(__name__)

__all__ = ["CriticTrainResult", "train_critic"]


@dataclass
class CriticTrainResult:
    """The outcome of :func:`train_critic`.

    Attributes:
        metric: the metric with the best-validation critic weights (eval mode).
        best_val: the best validation estimate (nats; -inf when none was finite).
        steps: training steps done (the failing one included on ``"non-finite"``).
        stop_reason: ``"max-steps"``, ``"early-stopping"`` or ``"non-finite"``.
        message: a human-readable summary (the NaN explanation when ``"non-finite"``).
        history: ``(step, train_estimate, val_estimate)`` at every validation.
        train: the :class:`~itreg.train.TrainResult` of :func:`~itreg.train.fit` (its epochs
            are validations).
    """

    metric: NeuralMI
    best_val: float
    steps: int
    stop_reason: str
    message: str
    history: list[tuple[int, float, float]] = field(default_factory=list)
    train: TrainResult | None = None


def train_critic(
    fixed: Sequence[Any],
    moving: Sequence[Any],
    metric: NeuralMI | str = "mine",
    masks: Sequence[Any] | None = None,
    steps: int = 2000,
    batch: int = 4096,
    lr: float = 1e-3,
    val_fraction: float = 0.2,
    val_every: int = 50,
    patience: int = 10,
    seed: int = 0,
    checkpoint: str | os.PathLike | None = None,
    progress: Callable[[int, float, float], None] | None = None,
    **metric_kwargs: Any,
) -> CriticTrainResult:
    """Pre-train a critic on aligned pairs (maximise the bound on joint vs shuffled voxels).

    Small setting (two CPU cores, seconds): the defaults on a 2D slice or a 3D brain at 3-4 mm;
    full scale on a GPU: ``batch=65536``, ``steps=20000``, ``patience=20`` (device follows the
    inputs).

    Args:
        fixed: aligned fixed images (Images or tensors ``(C, *S)``).
        moving: the moving images, aligned with ``fixed`` (same shapes, pair by pair).
        metric: a :class:`~itreg.metrics.neural.NeuralMI` to train or an architecture name
            (``"mine"``/``"kldiv"``).
        masks: optional masks (one per pair, shape ``S``) selecting the voxels used.
        steps: maximal training steps.
        batch: voxels per step.
        lr: Adam learning rate.
        val_fraction: fraction of the voxels held out for validation.
        val_every: steps between validations.
        patience: validations without improvement before stopping.
        seed: seed of the split, the batches and the shuffles.
        checkpoint: optional model-file path, rewritten with the best weights.
        progress: optional ``callback(step, train_estimate, val_estimate)`` at each validation.
        **metric_kwargs: settings of a new metric when ``metric`` is a name.

    Returns:
        :class:`CriticTrainResult` (its ``metric`` holds the best weights, in eval mode).

    Raises:
        ConfigError: invalid settings or no pairs.
    """
    if not fixed or len(fixed) != len(moving):
        raise ConfigError("train_critic needs one or more (fixed, moving) pairs of equal count")
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if min(steps, batch, val_every, patience) < 1:
        raise ConfigError("steps, batch, val_every and patience must be >= 1")
    if isinstance(metric, str):
        metric = NeuralMI(arch=metric, seed=seed, **metric_kwargs)
    metric.critic.requires_grad_(True)
    f_all, m_all = pooled_samples(fixed, moving, masks, metric)
    dtype = next(metric.critic.parameters()).dtype
    f_all, m_all = f_all.to(dtype), m_all.to(dtype)
    metric.critic.to(f_all.device)
    g = torch.Generator().manual_seed(int(seed))
    p = f_all.shape[1]
    order = torch.randperm(p, generator=g).to(f_all.device)
    n_val = max(2, round(val_fraction * p))
    val_idx, tr_idx = order[:n_val], order[n_val:]
    if tr_idx.numel() < 2:
        raise ConfigError(f"too few voxels ({p}) to train a critic")
    unit = (-1.0, 1.0)  # values are already scaled
    opt = torch.optim.Adam(metric.critic_parameters(), lr=lr)
    history: list[tuple[int, float, float]] = []
    last = {"step": 0, "estimate": math.nan}
    t0 = time.perf_counter()
    metric.reset_generator(seed)

    def batches(epoch: int) -> Iterator[Tensor]:
        for _ in range(min(int(val_every), int(steps) - epoch * int(val_every))):
            yield tr_idx[torch.randint(tr_idx.numel(), (min(batch, tr_idx.numel()),),
                                       generator=g).to(tr_idx.device)]

    def loss_fn(pick: Tensor) -> Tensor:
        last["step"] += 1
        est = metric.estimate(f_all[:, pick], m_all[:, pick], None, unit, unit)
        last["estimate"] = float(est.detach())
        return -est

    def validate() -> dict[str, float]:
        state = metric.generator.get_state()
        metric.generator.manual_seed(int(seed) + 1)
        v = float(metric.estimate(f_all[:, val_idx], m_all[:, val_idx], None, unit, unit))
        metric.generator.set_state(state)
        history.append((last["step"], last["estimate"], v))
        if progress is not None:
            progress(last["step"], last["estimate"], v)
        logger.info("critic step %d: train %.4f nats, validation %.4f nats", last["step"],
                    last["estimate"], v)
        return {"val_estimate": v}

    def save_best(model: torch.nn.Module, info: dict[str, Any]) -> None:
        if checkpoint is not None and info.get("stop_reason") != "non-finite":
            save_critic(metric, checkpoint, {"step": last["step"],
                                             "val_estimate": info["val_estimate"],
                                             "seed": int(seed)}, force=True)

    message = ""
    try:
        result = fit(metric.critic, opt, batches, loss_fn, validate,
                     epochs=math.ceil(int(steps) / int(val_every)), monitor="val_estimate",
                     mode="max", patience=int(patience), checkpoint=save_best, progress=False,
                     description="critic")
        reason = "max-steps" if result.stop_reason == "max-epochs" else result.stop_reason
    except TrainingError as exc:
        result, reason = exc.result, "non-finite"
        message = (f"{exc} (try a lower lr than {lr}, or the 'smile'/'nwj' estimator)")
    best_val = result.best_value if math.isfinite(result.best_value) else -math.inf
    metric.critic.eval()
    metric.reset_generator()
    if not message:
        message = (f"critic trained for {last['step']} steps ({reason}) in "
                   f"{time.perf_counter() - t0:.1f} s; best validation estimate {best_val:.4f} "
                   "nats")
    return CriticTrainResult(metric, best_val, last["step"], reason, message, history, result)

"""Engine support for metrics with trainable parameters (neural MI critics).

A metric is *trainable* when it has ``trainable = True`` and a ``critic_parameters()`` method
(:class:`itreg.metrics.neural.NeuralMI`). Its bound is a supremum over the critic, so the critic
must be fitted while the transform moves. For such a metric the engine wraps each level's
objective in :class:`CriticTraining`:

- an Adam optimiser on the critic's parameters with the metric's ``critic_lr`` (metric setting,
  for instance ``overrides={"metric.critic_lr": 1e-3}``), fresh at every level;
- before the level's first iteration, ``warmup_steps`` critic-only steps at the starting
  alignment (a random critic gives no useful gradient to the transform);
- at every gradient evaluation, the loss ``-estimate`` is back-propagated once into both the
  transform parameters (which the level's optimiser then steps, *descending* the loss) and the
  critic, which takes an Adam step (*ascending* the estimate), followed by
  ``critic_steps - 1`` further critic steps on fresh shuffles at the same transform. Both
  maximise the same estimate: the training is cooperative, not adversarial (papers 001, 003).

Evaluations without gradients (final checks, reports) never train the critic. Optimisers that
need a fixed objective (``lbfgs``, ``powell``: line searches and direction sets compare values
of one function) cannot be used while the critic changes under them; the engine rejects them
with :class:`~itreg.errors.ConfigError` (:func:`check_optimizer`). A critic loaded from a model
file without ``finetune=True`` is frozen (not trainable) and works with every optimiser.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor

import itreg.metrics.neural  # noqa: F401  (registers the "mine" and "kldiv" metrics)
from itreg.errors import ConfigError

logger = logging.getLogger(__name__)

__all__ = ["CriticTraining", "check_optimizer", "is_trainable"]


def is_trainable(metric: Any) -> bool:
    """Whether ``metric`` has parameters that the engine must train while registering."""
    return bool(getattr(metric, "trainable", False)) and hasattr(metric, "critic_parameters")


def check_optimizer(metric: Any, optimizer: Any) -> None:
    """Refuse an optimiser that needs a fixed objective for a trainable metric.

    Raises:
        ConfigError: ``optimizer.fixed_samples`` (L-BFGS, Powell) with a trainable metric.
    """
    if is_trainable(metric) and getattr(optimizer, "fixed_samples", False):
        raise ConfigError(
            f"optimizer {optimizer.name!r} needs a fixed objective, but metric "
            f"{getattr(metric, 'name', '?')!r} trains its critic during registration (its value "
            "changes every iteration); use optimizer 'adam' or 'gd', or load a pre-trained "
            "critic ('mine:critic.pt') without finetune")


class CriticTraining:
    """A level objective whose gradient evaluations also train the metric's critic.

    Every attribute not defined here is the wrapped objective's, so optimisers use it like a
    :class:`~itreg.engine.objective.LevelObjective`.

    Args:
        objective: the level's objective (its metric is trainable).
        metric: the trainable metric.
    """

    def __init__(self, objective: Any, metric: Any) -> None:
        self.objective = objective
        self.metric = metric
        self.params = list(metric.critic_parameters())
        self.optimizer = torch.optim.Adam(self.params, lr=float(getattr(metric, "critic_lr", 1e-3)))
        self.steps = max(int(getattr(metric, "critic_steps", 1)), 1)
        self.warmup = max(int(getattr(metric, "warmup_steps", 0)), 0)
        self._warm = self.warmup == 0
        self.critic_updates = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.objective, name)

    def _step(self) -> bool:
        finite = all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in self.params)
        if finite:
            self.optimizer.step()
            self.critic_updates += 1
        return finite

    def _critic_only(self, q: Tensor, count: int, resample: bool) -> None:
        for _ in range(count):
            if resample:
                self.objective.resample()
            self.optimizer.zero_grad(set_to_none=True)
            ev = self.objective.evaluate(q, grad=True)
            if not ev.ok or not self._step():
                break

    def evaluate(self, q: Tensor, grad: bool = True):
        """Evaluate the objective; with ``grad``, also train the critic (see the module doc)."""
        if not grad:
            return self.objective.evaluate(q, grad=False)
        if not self._warm:
            self._warm = True
            samples = self.objective.samples
            self._critic_only(q, self.warmup, resample=True)
            self.objective.samples = samples
            logger.debug("critic warm-up: %d steps", self.warmup)
        self.optimizer.zero_grad(set_to_none=True)
        ev = self.objective.evaluate(q, grad=True)
        if ev.ok:
            self._step()
            self._critic_only(q, self.steps - 1, resample=False)
        return ev

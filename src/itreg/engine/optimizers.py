"""Optimisers of a level's objective, with convergence tests and recorded stop reasons.

Every optimiser works on the scaled parameter vector ``q`` (one unit = about 1 mm of motion),
starts at ``q = 0`` (the transform as the previous level left it) and returns the final ``q``
with a stop reason:

- ``"converged"``: the loss stopped changing (see :class:`ConvergenceMonitor`), the step
  became negligible, or Powell's own tolerances were met;
- ``"max-iterations"``: the level's iteration budget is spent;
- ``"no-overlap"``: too few sample points mapped inside the moving image; the last good
  parameters are restored;
- ``"non-finite"``: the loss or gradient became NaN/Inf; the last good parameters are restored;
- ``"callback"``: a callback returned :class:`~itreg.engine.callbacks.Stop`.

Optimisers (registry :data:`OPTIMIZERS`):

- ``adam``: Adam with fresh random samples each iteration; options ``beta1``, ``beta2``,
  ``eps``, ``final_lr_fraction`` (decay of the learning rate to this fraction of it over the
  level's iterations; 1 = constant), ``schedule`` (the shape of that decay, ``"exponential"``
  or ``"cosine"``, :func:`step_factor`; the groupwise stages use the cosine) and
  ``average_fraction`` (return the mean of the iterates of this last fraction of the
  iterations, Polyak averaging; 0 = the last one). It is also the groupwise registration's
  optimiser (:mod:`itreg.groupwise.level`).
- ``gd``: regular-step gradient descent (ITK's ``RegularStepGradientDescent``): steps of
  ``learning_rate`` mm along the gradient normalised by its largest component, multiplied by
  ``relaxation`` whenever the gradient direction reverses; converged below ``min_step`` mm.
- ``lbfgs``: ``torch.optim.LBFGS`` with a strong-Wolfe line search on one fixed sample set;
  options ``history_size``, ``tolerance_grad``, ``tolerance_change``.
- ``powell``: ``scipy.optimize.minimize(method="Powell")`` without gradients on one fixed
  sample set; options ``xtol``, ``ftol`` (relative), ``maxfev``.
"""

from __future__ import annotations

import abc
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import Tensor

from itreg.engine.callbacks import CallbackList, StepState, Stop
from itreg.engine.config import ConvergenceConfig
from itreg.engine.objective import Evaluation, LevelObjective
from itreg.errors import ConfigError

logger = logging.getLogger(__name__)

STOP_REASONS = ("converged", "max-iterations", "no-overlap", "non-finite", "callback")


class ConvergenceMonitor:
    """Window test on the loss: fit a line to the last `window` losses; converged when its
    change over the window is below ``tolerance * max(|mean|, 1e-12) + abs_tolerance``.

    Args:
        config: tolerance and window.
    """

    def __init__(self, config: ConvergenceConfig) -> None:
        self.config = config
        self.values: deque[float] = deque(maxlen=config.window)
        n = config.window
        x = np.arange(n, dtype=np.float64)
        self._x = x - x.mean()
        self._sxx = float((self._x ** 2).sum())

    def update(self, loss: float) -> bool:
        """Add a loss; return True when converged."""
        self.values.append(float(loss))
        n = self.config.window
        if len(self.values) < n:
            return False
        y = np.asarray(self.values, dtype=np.float64)
        slope = float((self._x * (y - y.mean())).sum() / self._sxx)
        change = abs(slope) * (n - 1)
        scale = max(abs(float(y.mean())), 1e-12)
        return change <= self.config.tolerance * scale + self.config.abs_tolerance


@dataclass
class LevelContext:
    """What an optimiser needs besides the objective: budget, callbacks, bookkeeping.

    Attributes:
        objective: the level's objective.
        stage: stage index.
        transform: stage transform name.
        level: level index.
        levels: number of levels of the stage.
        max_iterations: iteration budget.
        learning_rate: the level's step size in mm.
        options: optimiser options (validated).
        convergence: convergence settings.
        callbacks: the callbacks.
        quantity: maps a metric loss to the paper's quantity.
        quantity_name: name of that quantity.
        start_time: ``time.perf_counter()`` at the start of the registration.
        losses: loss of every recorded iteration.
        metrics: metric quantity of every recorded iteration.
        last: the last recorded good evaluation.
        stop_all: set when a callback asked to end the whole registration.
        stationary: False when the objective itself changes while optimising (a metric that
            trains a critic); iterate averaging is then skipped, since the early iterates
            of the tail optimise an older objective.
    """

    objective: LevelObjective
    stage: int
    transform: str
    level: int
    levels: int
    max_iterations: int
    learning_rate: float
    options: Mapping[str, Any]
    convergence: ConvergenceConfig
    callbacks: CallbackList
    quantity: Callable[[float], float]
    quantity_name: str
    start_time: float
    losses: list[float] = field(default_factory=list)
    metrics: list[float] = field(default_factory=list)
    last: Evaluation | None = None
    stop_all: bool = False
    stationary: bool = True

    def __post_init__(self) -> None:
        self._monitor = ConvergenceMonitor(self.convergence)

    def state(self, iteration: int, ev: Evaluation | None, lr: float | None,
              stop_reason: str | None = None) -> StepState:
        """A :class:`StepState` for `ev` (or the last good evaluation)."""
        ev = ev if ev is not None and ev.ok else self.last
        loss = ev.loss if ev is not None else math.nan
        metric = float(self.quantity(ev.metric_loss)) if ev is not None else math.nan
        return StepState(
            stage=self.stage, transform=self.transform, level=self.level, levels=self.levels,
            iteration=iteration, max_iterations=self.max_iterations, loss=loss, metric=metric,
            quantity_name=self.quantity_name, learning_rate=lr,
            overlap=ev.overlap if ev is not None else 0.0,
            elapsed_s=time.perf_counter() - self.start_time, stop_reason=stop_reason)

    def record(self, iteration: int, ev: Evaluation, lr: float | None,
               check_convergence: bool = True) -> str | None:
        """Record a good evaluation; return a stop reason (converged / callback) or None."""
        self.last = ev
        self.losses.append(ev.loss)
        self.metrics.append(float(self.quantity(ev.metric_loss)))
        stop = self.callbacks.on_step(self.state(iteration, ev, lr))
        if stop is not None:
            self.stop_all = stop.all_levels
            return "callback"
        if check_convergence and self._monitor.update(ev.loss):
            return "converged"
        return None

    def penalty(self) -> float:
        """A finite loss worse than any seen, for evaluations without overlap."""
        ref = self.last.loss if self.last is not None else 0.0
        worst = max(self.losses) if self.losses else ref
        return worst + max(1.0, abs(worst))


class Optimizer(abc.ABC):
    """Base class of the level optimisers.

    Attributes:
        name: registry name.
        fixed_samples: whether one sample set is used for the whole level.
        defaults: the options and their default values.
    """

    name = "optimizer"
    fixed_samples = False
    defaults: ClassVar[dict[str, Any]] = {}

    @classmethod
    def check_options(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        """Merge `options` into the defaults.

        Raises:
            ConfigError: an unknown option name or a non-numeric value.
        """
        unknown = [k for k in options if k not in cls.defaults]
        if unknown:
            valid = ", ".join(cls.defaults) or "(none)"
            raise ConfigError(f"unknown option(s) {', '.join(map(repr, unknown))} of optimizer "
                              f"{cls.name!r}; valid options are: {valid}")
        out = dict(cls.defaults)
        for k, v in options.items():
            default = cls.defaults[k]
            numeric = default is None or isinstance(default, (int, float))
            if numeric and (isinstance(v, bool) or not isinstance(v, (int, float))
                            or not math.isfinite(v)):
                raise ConfigError(f"option {k!r} of optimizer {cls.name!r} must be a finite "
                                  f"number, got {v!r}")
            out[k] = v
        return out

    @abc.abstractmethod
    def run(self, ctx: LevelContext, q0: Tensor) -> tuple[Tensor, str]:
        """Optimise from `q0`; return the final ``q`` and the stop reason."""

    @staticmethod
    def _finish(ctx: LevelContext, q: Tensor, last_good: Tensor, reason: str) -> tuple[Tensor, str]:
        """Check parameters the loop stepped to without evaluating them; restore if bad."""
        if reason != "max-iterations":
            return q, reason
        ev = ctx.objective.evaluate(q, grad=False)
        if not ev.ok:
            logger.info("final step of level %d failed (%s); restoring the last good parameters",
                        ctx.level, ev.reason)
            return last_good, ev.reason
        ctx.last = ev
        return q, reason


class _TailAverage:
    """Mean of the iterates of the last `fraction` of a level's `n` iterations (Polyak-Ruppert
    averaging): it cancels much of the noise that random sampling puts into the last steps."""

    def __init__(self, n: int, fraction: float) -> None:
        if not 0.0 <= fraction < 1.0:
            raise ConfigError(f"option 'average_fraction' must be in [0, 1), got {fraction}")
        self.start = n - round(fraction * n) if fraction > 0 else n + 1
        self.total: Tensor | None = None
        self.count = 0

    def add(self, iteration: int, q: Tensor) -> None:
        if iteration >= self.start:
            self.total = q.clone() if self.total is None else self.total + q
            self.count += 1

    def mean(self) -> Tensor:
        return self.total / self.count


#: Step-size schedules of :func:`step_factor`.
SCHEDULES = ("exponential", "cosine")


def step_factor(schedule: str, final: float, iteration: float, iterations: int) -> float:
    """The step-size multiplier at `iteration` of a level of `iterations` steps: 1 at the
    first step, `final` at the last, in between ``final ** (i / (n - 1))`` (``"exponential"``,
    the pairwise Adam's ``final_lr_fraction``) or ``final + (1 - final) (1 + cos(pi i /
    (n - 1))) / 2`` (``"cosine"``, the groupwise stages' ``final_lr_factor``).

    Raises:
        ConfigError: unknown schedule.
    """
    if schedule not in SCHEDULES:
        from itreg.errors import unknown_name

        raise unknown_name("step-size schedule", schedule, SCHEDULES)
    if final == 1.0 or iterations <= 1:
        return 1.0
    x = iteration / (iterations - 1)
    if schedule == "cosine":
        return final + (1.0 - final) * 0.5 * (1.0 + math.cos(math.pi * x))
    return final ** x


class AdamMoments:
    """Adam's (Kingma & Ba) moment estimates of one tensor and its bias-corrected step: the
    update rule of :class:`Adam`, the one Adam of the pairwise and the groupwise registrations
    (on the flat scaled vector ``q``). The same update as
    ``torch.optim.Adam`` without weight decay, written out: it avoids the second-long first
    construction of a ``torch.optim`` optimiser and is deterministic.

    Args:
        like: a tensor of the parameters' shape, dtype and device.
        beta1: first-moment decay rate.
        beta2: second-moment decay rate.
        eps: denominator floor.
    """

    def __init__(self, like: Tensor, beta1: float = 0.9, beta2: float = 0.999,
                 eps: float = 1e-8) -> None:
        self.m = torch.zeros_like(like)
        self.v = torch.zeros_like(like)
        self.beta1, self.beta2, self.eps = float(beta1), float(beta2), float(eps)
        self.t = 0

    def update(self, grad: Tensor, lr: float) -> Tensor:
        """Fold `grad` into the moments and return the step to subtract (step size `lr`)."""
        self.t += 1
        b1, b2 = self.beta1, self.beta2
        self.m.mul_(b1).add_(grad, alpha=1 - b1)
        self.v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        denom = (self.v / (1 - b2 ** self.t)).sqrt_().add_(self.eps)
        return (lr / (1 - b1 ** self.t)) * self.m / denom


class Adam(Optimizer):
    """Adam (Kingma & Ba) on fresh random samples each iteration (see the module docstring),
    with :class:`AdamMoments` on the flat vector ``q`` and the ``"exponential"``
    :func:`step_factor` schedule.
    """

    name = "adam"
    fixed_samples = False
    defaults: ClassVar[dict[str, Any]] = {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8,
                                          "final_lr_fraction": 1.0, "average_fraction": 0.0,
                                          "schedule": "exponential"}

    def run(self, ctx: LevelContext, q0: Tensor) -> tuple[Tensor, str]:
        o = ctx.options
        beta1, beta2, eps = float(o["beta1"]), float(o["beta2"]), float(o["eps"])
        if not (0 <= beta1 < 1 and 0 <= beta2 < 1):
            raise ConfigError(f"Adam's beta1 and beta2 must be in [0, 1), got {beta1}, {beta2}")
        q = q0.clone()
        last_good = q.clone()
        moments = AdamMoments(q, beta1, beta2, eps)
        n = max(ctx.max_iterations, 1)
        final = float(o["final_lr_fraction"])
        schedule = str(o["schedule"])
        step_factor(schedule, final, 0, n)  # an unknown schedule fails before any work
        # An objective with a constraint (the groupwise zero-sum projection) maps every step
        # back onto it.
        constrain = getattr(ctx.objective, "constrain", None)
        average = _TailAverage(n, float(o["average_fraction"]) if ctx.stationary else 0.0)
        reason = "max-iterations"
        for it in range(ctx.max_iterations):
            lr = ctx.learning_rate * step_factor(schedule, final, it, n)
            ctx.objective.resample()
            ev = ctx.objective.evaluate(q)
            if not ev.ok:
                q, reason = last_good.clone(), ev.reason
                break
            last_good = q.clone()
            average.add(it, q)
            stop = ctx.record(it, ev, lr)
            if stop is not None:
                reason = stop
                break
            q = q - moments.update(ev.grad, lr)
            if constrain is not None:
                q = constrain(q)
        if reason in ("max-iterations", "converged") and average.count > 1:
            # The averaged parameters were never evaluated: check them like a last step.
            q, why = self._finish(ctx, average.mean(), last_good, "max-iterations")
            return q, (reason if why == "max-iterations" else why)
        return self._finish(ctx, q, last_good, reason)


class GradientDescent(Optimizer):
    """Regular-step gradient descent with a step length in mm (see the module docstring)."""

    name = "gd"
    fixed_samples = False
    defaults: ClassVar[dict[str, Any]] = {"relaxation": 0.5, "min_step": 1e-3}

    def run(self, ctx: LevelContext, q0: Tensor) -> tuple[Tensor, str]:
        relax = float(ctx.options["relaxation"])
        if not 0 < relax < 1:
            raise ConfigError(f"option 'relaxation' of optimizer 'gd' must be in (0, 1), "
                              f"got {relax}")
        q = q0.clone()
        last_good = q.clone()
        step = ctx.learning_rate
        g_prev = None
        reason = "max-iterations"
        for it in range(ctx.max_iterations):
            ctx.objective.resample()
            ev = ctx.objective.evaluate(q)
            if not ev.ok:
                q, reason = last_good.clone(), ev.reason
                break
            last_good = q.clone()
            stop = ctx.record(it, ev, step)
            if stop is not None:
                reason = stop
                break
            g = ev.grad
            if g_prev is not None and float(torch.dot(g, g_prev)) < 0:
                step *= relax
            if step < float(ctx.options["min_step"]):
                reason = "converged"
                break
            gmax = float(g.abs().max()) if g.numel() else 0.0
            if gmax == 0.0:
                reason = "converged"
                break
            q = q - (step / gmax) * g
            g_prev = g
        return self._finish(ctx, q, last_good, reason)


class _Cache:
    """Remembers the last evaluation so repeated calls at the same ``q`` cost nothing."""

    def __init__(self, objective: LevelObjective) -> None:
        self.objective = objective
        self.q: Tensor | None = None
        self.ev: Evaluation | None = None
        self.grad_ev = False

    def __call__(self, q: Tensor, grad: bool) -> Evaluation:
        if (self.q is not None and (self.grad_ev or not grad) and self.q.shape == q.shape
                and torch.equal(self.q, q)):
            return self.ev
        self.ev = self.objective.evaluate(q, grad=grad)
        self.q = q.detach().clone()
        self.grad_ev = grad
        return self.ev


class LBFGS(Optimizer):
    """L-BFGS with strong-Wolfe line search on one fixed sample set."""

    name = "lbfgs"
    fixed_samples = True
    defaults: ClassVar[dict[str, Any]] = {"history_size": 10, "tolerance_grad": 1e-7,
                                          "tolerance_change": 1e-9}

    def run(self, ctx: LevelContext, q0: Tensor) -> tuple[Tensor, str]:
        o = ctx.options
        q = q0.clone().requires_grad_(True)
        opt = torch.optim.LBFGS([q], lr=ctx.learning_rate, max_iter=1,
                                history_size=int(o["history_size"]),
                                tolerance_grad=float(o["tolerance_grad"]),
                                tolerance_change=float(o["tolerance_change"]),
                                max_eval=25, line_search_fn="strong_wolfe")
        cache = _Cache(ctx.objective)
        last_good = q.detach().clone()

        def closure():
            ev = cache(q.detach(), grad=True)
            if not ev.ok:  # a finite, worse value makes the line search step back
                q.grad = torch.zeros_like(q)
                return torch.tensor(ctx.penalty(), dtype=q.dtype)
            q.grad = ev.grad.detach().clone()
            return torch.tensor(ev.loss, dtype=q.dtype)

        ev = cache(q.detach(), grad=True)
        if not ev.ok:
            return last_good, ev.reason
        ctx.last = ev
        reason = "max-iterations"
        for it in range(ctx.max_iterations):
            before = q.detach().clone()
            opt.step(closure)
            ev = cache(q.detach(), grad=True)
            if not ev.ok:
                q = None
                reason = ev.reason
                break
            last_good = q.detach().clone()
            stop = ctx.record(it, ev, ctx.learning_rate)
            if stop is not None:
                reason = stop
                break
            if torch.equal(before, q.detach()):
                reason = "converged"
                break
        if q is None:
            return last_good, reason
        return q.detach().clone(), reason


class Powell(Optimizer):
    """Powell's derivative-free method (SciPy) on one fixed sample set."""

    name = "powell"
    fixed_samples = True
    defaults: ClassVar[dict[str, Any]] = {"xtol": 1e-3, "ftol": 1e-6, "maxfev": None}

    #: SciPy's status codes: 0 success, 1 too many evaluations, 2 too many iterations,
    #: 3 NaN met.
    _STATUS: ClassVar[dict[int, str]] = {0: "converged", 1: "max-iterations",
                                         2: "max-iterations", 3: "non-finite"}

    def run(self, ctx: LevelContext, q0: Tensor) -> tuple[Tensor, str]:
        from scipy.optimize import minimize

        o = ctx.options
        dtype, device = q0.dtype, q0.device
        best = {"q": q0.detach().clone(), "ev": None, "bad": None}
        counter = {"it": 0, "stop": None}

        def to_q(x: np.ndarray) -> Tensor:
            return torch.as_tensor(x, dtype=torch.float64).to(dtype=dtype, device=device)

        def fun(x: np.ndarray) -> float:
            q = to_q(x)
            ev = ctx.objective.evaluate(q, grad=False)
            if not ev.ok:
                best["bad"] = ev.reason
                return ctx.penalty()
            if best["ev"] is None or ev.loss < best["ev"].loss:
                best["q"], best["ev"] = q.clone(), ev
            if ctx.last is None:
                ctx.last = ev
            return ev.loss

        def callback(intermediate_result):
            it = counter["it"]
            counter["it"] += 1
            ev = best["ev"]
            if ev is None:
                return
            stop = ctx.record(it, ev, None, check_convergence=False)
            if stop is not None:
                counter["stop"] = stop
                raise StopIteration

        x0 = q0.detach().to(torch.float64).cpu().numpy()
        first = fun(x0)
        if best["ev"] is None:
            return q0.detach().clone(), best["bad"] or "no-overlap"
        options = {"maxiter": max(ctx.max_iterations, 1), "xtol": float(o["xtol"]),
                   "ftol": float(o["ftol"]), "disp": False}
        if o["maxfev"] is not None:
            options["maxfev"] = int(o["maxfev"])
        if ctx.max_iterations == 0:
            return q0.detach().clone(), "max-iterations"
        res = minimize(fun, x0, method="Powell", callback=callback, options=options)
        logger.debug("powell: %s (status %s, %d evaluations, start %.6g)", res.message,
                     res.status, res.nfev, first)
        if counter["stop"] is not None:
            reason = counter["stop"]
        else:
            reason = self._STATUS.get(int(res.status), "converged")
        ctx.last = best["ev"]
        return best["q"], reason


#: Optimisers by name.
OPTIMIZERS: dict[str, type[Optimizer]] = {
    cls.name: cls for cls in (Adam, GradientDescent, LBFGS, Powell)
}


def get_optimizer(name: str) -> Optimizer:
    """The optimiser registered as `name`.

    Raises:
        ConfigError: unknown name (the message lists the valid ones).
    """
    from itreg.errors import unknown_name

    if name not in OPTIMIZERS:
        raise unknown_name("optimizer", name, OPTIMIZERS)
    return OPTIMIZERS[name]()


__all__ = [
    "LBFGS",
    "OPTIMIZERS",
    "SCHEDULES",
    "STOP_REASONS",
    "Adam",
    "AdamMoments",
    "ConvergenceMonitor",
    "GradientDescent",
    "LevelContext",
    "Optimizer",
    "Powell",
    "Stop",
    "get_optimizer",
    "step_factor",
]

"""Divergence detection: a level that ends worse than it started keeps its best parameters.

The engine installs a :class:`DivergenceGuard` in every registration. At the end of each level
it compares the level's start (the parameters the previous level left) with its end, on one
fixed set of check points so that sampling noise does not decide (the whole level grid for
spatial metrics and full sampling; otherwise a regular subset of the random sampler's pool, as
many points as one iteration uses, between :data:`CHECK_POINTS` and :data:`MAX_CHECK_POINTS`
(start and end are compared on the same points, so their difference is far less noisy than
either), so that the check costs at most about two iterations):

- ``"objective-worse"``: the objective (metric loss plus weighted regularisers; lower is
  better in every metric's own direction) at the end exceeds its start by more than
  :data:`WORSE_TOLERANCE` (relative);
- ``"folding"``: the fraction of the level grid where the optimised transform has
  ``det J <= 0`` grew by at least :data:`FOLD_GROWTH` (for a linear transform: its matrix
  determinant became <= 0);
- ``"overlap-lost"``: the optimiser stopped with ``"no-overlap"``, or the fraction of check
  points that map inside the moving image fell below :data:`OVERLAP_KEEP` times the start's.

A diverged level keeps the best parameters seen among its start and the iterate with the
lowest recorded loss (each re-evaluated on the check points; candidates that fold or lost the
overlap are excluded; the start always qualifies). Each event is recorded in
:attr:`DivergenceGuard.events` (``report.json``'s ``divergence`` list) and, at the end of the
registration, one warning line goes to the log (the command line shows it on stderr).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
from torch import Tensor

from itreg.engine.callbacks import Callback, StepState
from itreg.engine.objective import FullSampler, RandomSampler, Samples, level_threads
from itreg.transforms import Transform

logger = logging.getLogger(__name__)

#: Relative increase of the objective (of ``max(|start|, |end|)``) that counts as worse.
WORSE_TOLERANCE = 1e-3
#: Growth of the folded fraction (``det J <= 0``) of the level grid that counts as folding.
FOLD_GROWTH = 0.005
#: An end overlap below this fraction of the start's counts as leaving the overlap.
OVERLAP_KEEP = 0.5
#: At least this many check points (random sampling; the pool allowing) ...
CHECK_POINTS = 1 << 12
#: ... at most this many ...
MAX_CHECK_POINTS = 1 << 13
#: ... and at most this many voxels for the Jacobian determinant (a shrunk copy of the level
#: grid: folding of 0.5 % of it is far coarser than that sampling).
JACOBIAN_VOXELS = 1 << 17


def _values(params) -> list[Tensor]:
    """Copies of the optimised parameters' current values."""
    return [p.detach().clone() for p in params.params]


def _as_q(params, values: list[Tensor]) -> Tensor:
    """The scaled vector ``q`` whose parameters are `values` (``p = p0 + s * q``)."""
    parts = [((v - p0) / s.view_as(v)).reshape(-1)
             for v, p0, s in zip(values, params.p0, params.scales)]
    return torch.cat(parts) if parts else params.zeros()


@torch.no_grad()
def _restore(params, values: list[Tensor]) -> None:
    """Write `values` back exactly (not through ``q``, which would round)."""
    for p, v in zip(params.params, values):
        p.copy_(v)


def _check_samples(objective) -> Samples | None:
    """A fixed set of check points for the level, or None to keep the objective's own."""
    if objective.spatial:
        return None
    sampler = objective.sampler
    if isinstance(sampler, FullSampler):
        return sampler.draw()
    if isinstance(sampler, RandomSampler):
        n = sampler.points.shape[0]
        step = max(1, n // min(max(sampler.n, CHECK_POINTS), MAX_CHECK_POINTS))
        return Samples(sampler.points[::step], sampler.values[:, ::step])
    return None


@torch.no_grad()
def folded_fraction(transform: Transform, grid) -> float:
    """Fraction of `grid` (shrunk to at most :data:`JACOBIAN_VOXELS`) where ``det J <= 0``;
    for a linear transform 1 or 0 by the sign of its matrix determinant."""
    if transform.is_linear:
        return float(torch.linalg.det(transform.matrix().detach().double()) <= 0)
    from itreg.transforms import jacobian_determinant

    factor = max(1, math.ceil((grid.numel / JACOBIAN_VOXELS) ** (1.0 / grid.ndim)))
    det = jacobian_determinant(transform, grid.shrink(factor) if factor > 1 else grid)
    return float((det <= 0).double().mean())


class DivergenceGuard(Callback):
    """Checks every level for divergence and restores the best parameters (module docstring).

    The engine calls :meth:`watch` with the level's transform before the level runs and
    :meth:`check` after it; as a callback it snapshots the iterate with the lowest recorded
    loss (``on_step``) and warns once at the end (``on_end``).

    Attributes:
        events: one dict per diverged level: stage, transform, level, reasons, the start's,
            end's and kept parameters' objective, metric quantity, folded fraction and
            overlap, and which parameters were kept (``"start"`` or ``"best-step"``).
    """

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self._current: Transform | None = None
        self._best_loss = math.inf
        self._best: list[Tensor] | None = None

    # ---------------------------------------------------------------- hooks
    def watch(self, current: Transform) -> None:
        """Follow `current`, the transform the next level optimises."""
        self._current = current
        self._best_loss = math.inf
        self._best = None

    def on_step(self, state: StepState) -> None:
        if self._current is None or not state.loss < self._best_loss:
            return
        self._best_loss = state.loss
        self._best = [p.detach().clone() for p in self._current.parameters() if p.requires_grad]

    def on_end(self, state: StepState) -> None:
        if not self.events:
            return
        parts = [f"stage {e['stage'] + 1} ({e['transform']}) level {e['level'] + 1}: "
                 f"{'+'.join(e['reasons'])}" for e in self.events]
        logger.warning("divergence detected (%s); kept the best parameters seen; see the "
                       "report's 'divergence' entries", "; ".join(parts))

    # ---------------------------------------------------------------- the check
    @staticmethod
    def _measure(objective, current: Transform, q: Tensor, quantity, grid) -> dict[str, Any]:
        ev = objective.evaluate(q, grad=False)
        return {"ok": ev.ok, "loss": ev.loss if ev.ok else math.inf,
                "metric": float(quantity(ev.metric_loss)) if ev.ok else None,
                "overlap": ev.overlap,
                "folded": folded_fraction(current, grid)}

    def check(self, record, ctx, level) -> dict[str, Any] | None:
        """Compare the level's start and end; on divergence load the best parameters seen.

        Args:
            record: the level's :class:`~itreg.engine.registration.LevelRecord`.
            ctx: the level's :class:`~itreg.engine.optimizers.LevelContext`.
            level: the pyramid level.

        Returns:
            The event recorded (also appended to :attr:`events`), or None.
        """
        current, best = self._current, self._best
        self._current, self._best = None, None
        if current is None or record.iterations == 0:
            return None
        objective = ctx.objective
        inner = getattr(objective, "objective", objective)  # a critic-training wrapper's
        params = inner.params
        if params.numel == 0:
            return None
        saved = inner.samples
        check = _check_samples(inner)
        if check is not None:
            inner.samples = check
        try:
            with level_threads(check.count if check is not None else level.grid.numel):
                event = self._compare(record, ctx, level, current, best, params, objective)
        finally:
            inner.samples = saved
        if event is not None:
            self.events.append(event)
            logger.info("stage %d (%s) level %d diverged (%s): kept the %s parameters",
                        record.stage, record.transform, record.level,
                        ", ".join(event["reasons"]), event["kept"])
        return event

    def _compare(self, record, ctx, level, current, best, params, objective
                 ) -> dict[str, Any] | None:
        """Measure start and end on the check points; restore the best if diverged."""
        end_values = _values(params)

        def measure(values):
            return self._measure(objective, current, _as_q(params, values), ctx.quantity,
                                 level.grid)

        start = measure(list(params.p0))
        end = measure(end_values)
        reasons = self._reasons(record, start, end)
        if not reasons:
            _restore(params, end_values)
            return None
        kept, kept_name, kept_values = start, "start", list(params.p0)
        if best is not None:
            cand = measure(best)
            if (not self._reasons(record, start, cand, stop_reason=False)
                    and cand["loss"] < start["loss"]):
                kept, kept_name, kept_values = cand, "best-step", best
        _restore(params, kept_values)
        return {"stage": record.stage, "transform": record.transform, "level": record.level,
                "reasons": reasons, "kept": kept_name,
                "start": _public(start), "end": _public(end), "kept_values": _public(kept)}

    @staticmethod
    def _reasons(record, start: dict, end: dict, stop_reason: bool = True) -> list[str]:
        reasons = []
        scale = max(abs(start["loss"]), abs(end["loss"]) if end["ok"] else 0.0, 1e-12)
        if end["ok"] and start["ok"] and end["loss"] > start["loss"] + WORSE_TOLERANCE * scale:
            reasons.append("objective-worse")
        if end["folded"] - start["folded"] >= FOLD_GROWTH:
            reasons.append("folding")
        if ((stop_reason and record.stop_reason == "no-overlap") or not end["ok"]
                or end["overlap"] < OVERLAP_KEEP * start["overlap"]):
            reasons.append("overlap-lost")
        return reasons


def _public(m: dict[str, Any]) -> dict[str, Any]:
    return {"loss": m["loss"] if math.isfinite(m["loss"]) else None, "metric": m["metric"],
            "folded_fraction": round(m["folded"], 6), "overlap": round(m["overlap"], 6)}


__all__ = ["CHECK_POINTS", "FOLD_GROWTH", "MAX_CHECK_POINTS", "OVERLAP_KEEP", "WORSE_TOLERANCE",
           "DivergenceGuard", "folded_fraction"]

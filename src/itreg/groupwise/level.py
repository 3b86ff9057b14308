"""One level of a groupwise stage, optimised by the engine's optimiser.

:class:`GroupLevelObjective` presents a level of Algorithm 1 (X-CoReg, paper 002) to the
engine's :class:`~itreg.engine.optimizers.Adam` as the pairwise levels do
(:class:`~itreg.engine.objective.LevelObjective`): a function of the flat, scaled parameter
vector ``q`` of every moving image's transform (one unit about 1 mm,
:class:`~itreg.engine.objective.ScaledParameters`) that returns an
:class:`~itreg.engine.objective.Evaluation`. One evaluation is steps 3-5 of the algorithm: the
E-step over the level's voxels (or at the sample), a seeded sample of the overlap, the
objective's loss plus the FFDs' bending energy, and its gradient. After each Adam step the
zero-sum constraint (Eq. 37) is enforced by :meth:`GroupLevelObjective.constrain`.

:func:`run_group_level` builds the :class:`~itreg.engine.optimizers.LevelContext` (budget,
callbacks, convergence) and runs the engine's optimiser, so the pairwise and the groupwise
registrations share one Adam, one step-size schedule code path, one convergence test and
the same stop reasons (a level that loses its overlap or meets a non-finite loss keeps its
last good parameters).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from itreg.engine.callbacks import CallbackList
from itreg.engine.config import ConvergenceConfig
from itreg.engine.objective import Evaluation, ScaledParameters
from itreg.engine.optimizers import Adam, LevelContext
from itreg.errors import GeometryError
from itreg.grid import Grid
from itreg.groupwise.base import GroupObjective, sample_mask
from itreg.image import Image
from itreg.transforms import Transform
from itreg.warp import sample

#: An iteration with fewer overlap points than this stops the level ("no-overlap").
MIN_OVERLAP = 16


def overlap_mask(images: Sequence[Image], transforms: Sequence[Transform | None],
                 points: Tensor) -> tuple[Tensor, Tensor]:
    """Values and joint inside-mask of every image at mapped points.

    Args:
        images: the ``N`` (level) images, one channel each.
        transforms: ``phi_j`` per image (None: identity).
        points: ``(P, D)`` common-space world points.

    Returns:
        ``values (N, P)`` (differentiable) and ``overlap (P,)`` bool (``Omega^phi``).
    """
    values, inside = [], None
    for img, t in zip(images, transforms):
        mapped = points if t is None else t(points)
        v, ins = sample(img, mapped)
        values.append(v[0])
        inside = ins if inside is None else inside & ins
    return torch.stack(values), inside


class GroupParameters:
    """The flat scaled vector ``q`` of several transforms: :class:`ScaledParameters` of each,
    concatenated in order."""

    def __init__(self, transforms: Sequence[Transform], radius: float) -> None:
        self.parts = [ScaledParameters(t, radius) for t in transforms]

    def zeros(self) -> Tensor:
        return torch.cat([p.zeros() for p in self.parts])

    def _split(self, q: Tensor) -> list[Tensor]:
        return list(torch.split(q, [p.numel for p in self.parts]))

    def load(self, q: Tensor) -> None:
        for part, qi in zip(self.parts, self._split(q)):
            part.load(qi)

    def zero_grad(self) -> None:
        for part in self.parts:
            part.zero_grad()

    def flat_grad(self) -> Tensor:
        return torch.cat([part.flat_grad() for part in self.parts])

    @torch.no_grad()
    def read(self) -> Tensor:
        """``q = (p - p0) / s`` of the parameters as they are now."""
        return torch.cat([((p.detach().reshape(-1) - p0.reshape(-1)) / s)
                          for part in self.parts
                          for p, p0, s in zip(part.params, part.p0, part.scales)])


@dataclass
class GroupLevel:
    """What one groupwise level works on.

    Attributes:
        objective: the groupwise objective (its latent state carries over between levels).
        images: the level's smoothed, decimated images.
        grid: the level's common grid.
        points: ``(P, D)`` world points of `grid`.
        roi: ``(P,)`` bool region of interest on `grid`.
        transforms: ``phi_j`` of every image (built on the optimised transforms below).
        active: the transforms optimised at this level (every image but a reference).
        regulariser: returns the weighted regulariser of `active`, or None.
        project: enforces the zero-sum constraint on `active` (None in group-to-reference
            mode).
        generator: the run's CPU generator (samples).
        first: whether this is the run's first level (no overlap there is a GeometryError).
    """

    objective: GroupObjective
    images: Sequence[Image]
    grid: Grid
    points: Tensor
    roi: Tensor
    transforms: Sequence[Transform]
    active: Sequence[Transform]
    regulariser: Any
    project: Any
    generator: torch.Generator
    first: bool


class GroupLevelObjective:
    """A groupwise level as a function of ``q`` (see the module docstring).

    An evaluation with ``grad=False`` (the optimiser's check of its last step) tests the
    overlap of the mapped level points and the finiteness of the parameters without touching
    the objective's latent state or the random stream; its loss is that of the last step.
    """

    samples = None

    def __init__(self, level: GroupLevel, radius: float) -> None:
        self.level = level
        self.params = GroupParameters(level.active, radius)
        self.calls = 0
        self.last: Evaluation | None = None

    def resample(self) -> None:
        """Nothing to do: the sample is drawn in :meth:`evaluate`, after the E-step."""

    def constrain(self, q: Tensor) -> Tensor:
        """The zero-sum constraint (Eq. 37) applied to ``q`` (unchanged with a reference)."""
        if self.level.project is None:
            return q
        self.params.load(q)
        self.level.project(self.level.active)
        return self.params.read()

    def evaluate(self, q: Tensor, grad: bool = True) -> Evaluation:
        self.params.load(q)
        if not grad:
            return self._check()
        lv, obj = self.level, self.level.objective
        it = self.calls
        self.calls += 1
        eligible = lv.roi
        full = obj.needs_all_voxels and it % obj.full_update_every == 0
        if full:  # E-step over the whole level grid, no gradient
            with torch.no_grad():
                values_all, inside_all = overlap_mask(lv.images, lv.transforms, lv.points)
                eligible = inside_all & lv.roi
                if int(eligible.sum()) >= MIN_OVERLAP:
                    obj.update(values_all, eligible)
        index = torch.nonzero(sample_mask(eligible, obj.sample_rate, lv.generator)).reshape(-1)
        values, inside = overlap_mask(lv.images, lv.transforms, lv.points[index])
        overlap = inside & lv.roi[index]
        count = int(overlap.sum())
        fraction = count / max(int(index.numel()), 1)
        if count < MIN_OVERLAP:
            if it == 0 and lv.first:
                raise GeometryError(
                    f"the images do not overlap in the common space ({count} common points); "
                    "check their origins and directions")
            return Evaluation(math.nan, math.nan, fraction, False, "no-overlap")
        if obj.needs_all_voxels and not full:  # E-step at the sample only
            with torch.no_grad():
                obj.update_at(values.detach(), overlap, index)
        self.params.zero_grad()
        loss, quantity = obj.evaluate(values, overlap, index)
        reg = lv.regulariser()
        total = loss if reg is None else loss + reg
        if not bool(torch.isfinite(total)):
            return Evaluation(math.nan, math.nan, fraction, False, "non-finite")
        total.backward()
        ev = Evaluation(float(total.detach()), float(quantity), fraction, True,
                        grad=self.params.flat_grad())
        self.last = ev
        return ev

    @torch.no_grad()
    def _check(self) -> Evaluation:
        lv = self.level
        if not all(bool(torch.isfinite(p).all()) for t in lv.active for p in t.parameters()):
            return Evaluation(math.nan, math.nan, 0.0, False, "non-finite")
        _, inside = overlap_mask(lv.images, lv.transforms, lv.points)
        overlap = inside & lv.roi
        count = int(overlap.sum())
        fraction = count / max(int(lv.roi.sum()), 1)
        if count < MIN_OVERLAP:
            return Evaluation(math.nan, math.nan, fraction, False, "no-overlap")
        last = self.last
        return Evaluation(last.loss if last else math.nan,
                          last.metric_loss if last else math.nan, fraction, True)


#: The groupwise stages' Adam: the engine's, with the cosine step-size schedule.
ADAM = Adam()


def run_group_level(level: GroupLevel, *, stage_index: int, transform: str, level_index: int,
                    levels: int, iterations: int, learning_rate: float, final_lr_factor: float,
                    radius: float, convergence: ConvergenceConfig, callbacks: CallbackList,
                    start_time: float) -> tuple[LevelContext, str, Any]:
    """Optimise one groupwise level with the engine's Adam.

    Returns:
        The level's context (losses, metric values, last evaluation, ``stop_all``), the stop
        reason and the start-of-level callback's answer (a ``Stop`` or None).
    """
    objective = GroupLevelObjective(level, radius)
    options = Adam.check_options({"final_lr_fraction": final_lr_factor, "schedule": "cosine"})
    ctx = LevelContext(
        objective=objective, stage=stage_index, transform=transform, level=level_index,
        levels=levels, max_iterations=iterations, learning_rate=learning_rate,
        options=options, convergence=convergence, callbacks=callbacks,
        quantity=float, quantity_name=level.objective.quantity_name, start_time=start_time)
    stop = callbacks.on_level_start(ctx.state(0, None, learning_rate))
    q0 = objective.params.zeros()
    if stop is not None:
        ctx.stop_all = stop.all_levels
        return ctx, "callback", stop
    q, reason = ADAM.run(ctx, q0)
    objective.params.load(q)
    return ctx, reason, None


__all__ = ["MIN_OVERLAP", "GroupLevel", "GroupLevelObjective", "GroupParameters",
           "overlap_mask", "run_group_level"]

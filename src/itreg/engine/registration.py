"""The pairwise registration engine: stages of multi-resolution levels, each optimised.

:func:`run` takes prepared (checked, floating-point) images and a resolved
:class:`~itreg.engine.config.RegistrationConfig`; :func:`itreg.api.register` is the front door
that reads files, checks inputs and resolves presets before calling it.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from itreg.engine.callbacks import CallbackList, StepState
from itreg.engine.config import RegistrationConfig, StageConfig
from itreg.engine.divergence import DivergenceGuard
from itreg.engine.initialise import initial_transforms
from itreg.engine.objective import (
    SAMPLERS,
    LevelObjective,
    ScaledParameters,
    WeightedRegulariser,
    level_threads,
    overlap_fraction,
)
from itreg.engine.optimizers import LevelContext, get_optimizer
from itreg.engine.pyramid import Level, Pyramid
from itreg.engine.ranges import level_ranges
from itreg.engine.stages import LinearStage, StageSetup, get_stage_transform
from itreg.engine.trainable import CriticTraining, check_optimizer, is_trainable
from itreg.errors import ConfigError, GeometryError
from itreg.image import Image
from itreg.runtime import provenance
from itreg.transforms import Affine, LinearTransform, Transform

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class LevelRecord:
    """What happened at one level of one stage.

    Attributes:
        stage: stage index.
        transform: the stage's transform name.
        level: level index (0 = coarsest).
        shrink: shrink factor of the fixed grid.
        smoothing_mm: smoothing sigma in mm.
        grid_size: size of the level's fixed grid (ITK order).
        optimizer: optimiser name.
        iterations: iterations done.
        samples: points per evaluation.
        losses: the loss at every iteration.
        metric_values: the metric quantity at every iteration.
        final_loss: the loss at the final parameters.
        final_metric: the metric quantity at the final parameters.
        quantity_name: name of the metric quantity.
        overlap: fraction of sample points inside the moving image at the end.
        stop_reason: why the level stopped.
        time_s: wall time of the level in seconds.
    """

    stage: int
    transform: str
    level: int
    shrink: int
    smoothing_mm: float
    grid_size: tuple[int, ...]
    optimizer: str
    iterations: int
    samples: int
    losses: tuple[float, ...]
    metric_values: tuple[float, ...]
    final_loss: float
    final_metric: float
    quantity_name: str
    overlap: float
    stop_reason: str
    time_s: float

    def as_dict(self, history: bool = True) -> dict:
        """A JSON-serialisable dict (non-finite numbers become None)."""
        out = {
            "stage": self.stage, "transform": self.transform, "level": self.level,
            "shrink": self.shrink, "smoothing_mm": self.smoothing_mm,
            "grid_size": list(self.grid_size), "optimizer": self.optimizer,
            "iterations": self.iterations, "samples": self.samples,
            "final_loss": finite_or_none(self.final_loss),
            "final_metric": finite_or_none(self.final_metric),
            "quantity": self.quantity_name, "overlap": finite_or_none(self.overlap),
            "stop_reason": self.stop_reason, "time_s": round(self.time_s, 6),
        }
        if history:
            out["losses"] = [finite_or_none(v) for v in self.losses]
            out["metric_values"] = [finite_or_none(v) for v in self.metric_values]
        return out


def linear_summary(linear: Affine) -> dict[str, list]:
    """A linear transform's matrix, offset and centre as plain lists (for reports)."""
    return {"matrix": linear.matrix().detach().cpu().double().tolist(),
            "offset": linear.offset().detach().cpu().double().tolist(),
            "center": linear.center.detach().cpu().double().tolist()}


def finite_or_none(v: float | None) -> float | None:
    """`v` as a float for JSON reports, or None where it is missing or not finite."""
    return float(v) if v is not None and math.isfinite(v) else None


class RegistrationResult:
    """The outcome of a registration.

    Attributes:
        transform: the whole map, fixed -> moving world points: the linear transform itself
            for linear registrations, else ``Compose(linear, nonlinear...)`` (linear
            outermost).
        linear: the composed linear part as an :class:`~itreg.transforms.Affine` (None if the
            registration had no linear part).
        levels: a :class:`LevelRecord` per stage and level, in order.
        stop_reasons: the stop reason of every level, in order.
        wall_time_s: seconds spent in the registration (pyramid, initialisation,
            optimisation; not the resampling of :attr:`warped`, done on first access).
        config: the resolved configuration.
        fixed: the fixed image.
        moving: the moving image.
        settings: the call's other settings (init, seed, threads, masks) for the report.
        divergence: one dict per level that diverged and kept its best parameters (see
            :mod:`itreg.engine.divergence`).
    """

    def __init__(self, transform: Transform, linear: Affine | None, levels: Sequence[LevelRecord],
                 wall_time_s: float, config: RegistrationConfig, fixed: Image, moving: Image,
                 settings: dict[str, Any], divergence: Sequence[dict] = ()) -> None:
        self.transform = transform
        self.linear = linear
        self.levels = tuple(levels)
        self.wall_time_s = float(wall_time_s)
        self.config = config
        self.fixed = fixed
        self.moving = moving
        self.settings = dict(settings)
        self.divergence = list(divergence)

    @property
    def stop_reasons(self) -> list[str]:
        return [lv.stop_reason for lv in self.levels]

    @functools.cached_property
    def warped(self) -> Image:
        """The moving image resampled onto the fixed grid through :attr:`transform`
        (computed on first access; labels stay labels)."""
        from itreg.warp import resample

        with torch.no_grad():
            return resample(self.moving, self.transform, self.fixed.grid, mode="auto")

    @property
    def final_metric(self) -> float | None:
        """The metric quantity at the end of the last level."""
        return finite_or_none(self.levels[-1].final_metric) if self.levels else None

    def report(self, history: bool = True) -> dict:
        """A JSON-serialisable summary: settings, per-level metric values and stop reasons,
        wall time, and the linear part's matrix and offset."""
        out: dict[str, Any] = {
            "itreg_report": 1,
            "wall_time_s": round(self.wall_time_s, 6),
            "config": self.config.to_dict(),
            "settings": self.settings,
            "fixed": {"size": list(self.fixed.grid.size), "spacing": list(self.fixed.grid.spacing)},
            "moving": {"size": list(self.moving.grid.size),
                       "spacing": list(self.moving.grid.spacing)},
            "stop_reasons": self.stop_reasons,
            "divergence": self.divergence,
            "levels": [lv.as_dict(history) for lv in self.levels],
            "final_metric": self.final_metric,
            "transform": type(self.transform).__name__,
        }
        if self.levels:
            out["quantity"] = self.levels[-1].quantity_name
        if self.linear is not None:
            out["linear"] = linear_summary(self.linear)
        out["provenance"] = provenance()
        return out

    def __repr__(self) -> str:
        reasons = ", ".join(self.stop_reasons)
        return (f"RegistrationResult(transform={type(self.transform).__name__}, "
                f"levels={len(self.levels)}, stop_reasons=[{reasons}], "
                f"wall_time_s={self.wall_time_s:.3f})")


# ---------------------------------------------------------------------------------- helpers
def build_metric(stage: StageConfig):
    """The stage's metric module.

    Raises:
        ConfigError: unknown metric or option (from the metric registry).
    """
    from itreg.metrics import get_metric

    return get_metric(stage.metric.name, **dict(stage.metric.options))


def build_regularisers(stage: StageConfig) -> list[WeightedRegulariser]:
    """The stage's weighted regularisers (zero weights are skipped).

    Raises:
        ConfigError: unknown regulariser name.
    """
    if not stage.regularisers:
        return []
    from itreg.regularisers import get_regulariser

    return [WeightedRegulariser(name, w, get_regulariser(name))
            for name, w in stage.regularisers.items() if w > 0]


@dataclass
class _Components:
    metric: Any
    regularisers: list[WeightedRegulariser]
    optimizer: Any
    options: dict
    builder: Any


def build_components(config: RegistrationConfig) -> list[_Components]:
    """Build every stage's metric, regularisers, optimiser and transform builder, so that bad
    names and options raise :class:`ConfigError` (naming the stage) before any work."""
    out = []
    for i, stage in enumerate(config.stages):
        try:
            optimizer = get_optimizer(stage.optimizer)
            metric = build_metric(stage)
            check_optimizer(metric, optimizer)  # trainable metrics need adam/gd
            out.append(_Components(metric, build_regularisers(stage), optimizer,
                                   optimizer.check_options(stage.optimizer_options),
                                   get_stage_transform(stage.transform)))
        except ConfigError as exc:
            raise ConfigError(f"stage {i} ({stage.transform}): {exc}") from None
    return out


def _generator(seed: int, stage: int, level: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed((int(seed) * 1_000_003 + stage * 1009 + level * 17) % (2**63 - 1))
    return g


def _points_per_evaluation(stage: StageConfig, li: int, level: Level, metric) -> int:
    """How many points one evaluation of the level touches (for the thread heuristic)."""
    if stage.sampling.strategy == "full" or getattr(metric, "requires_spatial", False):
        return level.grid.numel
    count = stage.sampling.count_at(li)
    return level.grid.numel if count is None else min(count, level.grid.numel)


def _freeze(t: Transform) -> Transform:
    t.requires_grad_(False)
    return t


# ---------------------------------------------------------------------------------- engine
def run(
    fixed: Image,
    moving: Image,
    config: RegistrationConfig,
    *,
    fixed_mask: Tensor | None = None,
    moving_mask: Image | None = None,
    init: str | Transform = "centers",
    seed: int = 0,
    callbacks: Iterable[object] = (),
    settings: dict[str, Any] | None = None,
) -> RegistrationResult:
    """Register prepared images with a resolved config.

    Args:
        fixed: floating-point scalar fixed image.
        moving: floating-point scalar moving image (same dtype and device).
        config: the resolved configuration.
        fixed_mask: bool tensor on the fixed grid, or None.
        moving_mask: float 0/1 image on the moving grid, or None.
        init: initialisation name or transform.
        seed: seed of every random choice.
        callbacks: hooks (see :mod:`itreg.engine.callbacks`).
        settings: extra settings recorded in the report.

    Returns:
        The :class:`RegistrationResult`.

    Raises:
        GeometryError: no fixed point maps inside the moving image after initialisation.
        ConfigError: invalid components.
    """
    t0 = time.perf_counter()
    components = build_components(config)
    dtype, device = fixed.dtype, fixed.device
    guard = DivergenceGuard()  # restores a diverged level's best parameters, warns at the end
    cbs = CallbackList([*callbacks, guard])
    pyramid = Pyramid(fixed, moving, fixed_mask, moving_mask)
    # Every level of every stage at once, so that each is smoothed from the next finer one.
    pyramid.levels([f for st in config.stages for f in st.shrink],
                   [s for st in config.stages for s in st.smoothing_mm])

    linear, outer_init = initial_transforms(init, fixed, moving, fixed_mask, moving_mask,
                                            dtype, device)
    probe = linear if outer_init is None else _compose(outer_init, linear)
    reference = overlap_fraction(probe, fixed.grid, fixed_mask, moving, moving_mask)
    if reference <= 0.0:
        name = init if isinstance(init, str) else type(init).__name__
        hint = ("try init='centers' (CLI: --init centers) to start from aligned image centres"
                if name != "centers" else
                "check the images' origins and directions (the headers may disagree)")
        raise GeometryError(
            f"after initialisation ({name}) no point of the fixed image maps inside the moving "
            f"image: their physical extents do not overlap; {hint}")
    min_overlap = config.min_overlap * reference
    logger.info("initial overlap %.3f of the fixed points; init=%s", reference,
                init if isinstance(init, str) else type(init).__name__)
    # An initial FFD on the control grid of a leading B-spline stage continues in it.
    ffd_start = None
    if _starts_first_stage(outer_init, config, fixed):
        ffd_start, outer_init = outer_init, None

    range_cache: dict = {}
    residual: list[Transform] = []  # frozen linear factors a stage could not absorb
    nonlinear: list[Transform] = []
    records: list[LevelRecord] = []
    run_state = RunState(cbs, seed, fixed.grid.radius(), min_overlap, t0, range_cache)
    last_state: StepState | None = None
    stop_all = False
    try:
        for si, stage in enumerate(config.stages):
            if stop_all:
                break
            comp = components[si]
            builder, optimizer, options = comp.builder, comp.optimizer, comp.options
            metric = comp.metric.to(device)
            regs = [WeightedRegulariser(r.name, r.weight, r.module.to(device))
                    for r in comp.regularisers]
            setup = StageSetup(fixed.grid, stage, dtype, device)
            levels = pyramid.levels(stage.shrink, stage.smoothing_mm)
            if isinstance(builder, LinearStage):
                current, extra = builder.start(linear, setup)
                if extra is not None:
                    residual.append(_freeze(extra))
                outer = ([outer_init] if outer_init is not None else []) + residual
            else:
                current = None
                if si == 0 and ffd_start is not None:
                    current = ffd_start.to(dtype=dtype, device=device)
                outer = (([outer_init] if outer_init is not None else []) + residual
                         + [linear] + nonlinear)
            for li, level in enumerate(levels):
                current = builder.for_level(current, level, setup)
                current.requires_grad_(True)
                guard.watch(current)
                with level_threads(_points_per_evaluation(stage, li, level, metric)):
                    record, ctx = _run_level(
                        LevelSpec(si, stage, li, level, current, outer, metric, regs, builder,
                                  setup, optimizer, options), run_state)
                records.append(record)
                guard.check(record, ctx, level)
                last_state = ctx.state(record.iterations, ctx.last, None, record.stop_reason)
                stop = cbs.on_level_end(last_state)
                if ctx.stop_all or (stop is not None and stop.all_levels):
                    stop_all = True
                    break
            _freeze(current)
            if isinstance(builder, LinearStage):
                linear = current
            else:
                nonlinear.append(current)
    finally:
        if last_state is not None:
            cbs.on_end(last_state)
        cbs.close()

    transform, linear_part = _assemble(outer_init, residual, linear, nonlinear)
    transform.requires_grad_(True)
    wall = time.perf_counter() - t0
    logger.info("registration finished in %.3f s; stop reasons: %s", wall,
                ", ".join(r.stop_reason for r in records))
    return RegistrationResult(transform, linear_part, records, wall, config, fixed, moving,
                              settings or {}, guard.events)


def _starts_first_stage(init: Transform | None, config: RegistrationConfig,
                        fixed: Image) -> bool:
    """Whether `init` is a B-spline on the control grid of the first stage, a B-spline stage
    (one after linear stages would have to see the FFD as an outer map, so it stays one)."""
    from itreg.transforms.bspline import BSpline, control_grid_for

    first = config.stages[0]
    return (isinstance(init, BSpline) and first.transform == "bspline"
            and init.control_grid == control_grid_for(fixed.grid, first.control_spacing_mm))


def _compose(*transforms: Transform) -> Transform:
    from itreg.transforms.compose import Compose

    return Compose(*transforms)


def _assemble(outer_init, residual, linear, nonlinear) -> tuple[Transform, Affine | None]:
    linear_factors = list(residual) + [linear]
    if len(linear_factors) == 1:
        lin: LinearTransform = linear
        linear_affine = linear.to_affine()
    else:
        lin = _compose(*linear_factors)
        linear_affine = lin.linear_part()
    factors = ([outer_init] if outer_init is not None else []) + [lin] + list(nonlinear)
    transform = factors[0] if len(factors) == 1 else _compose(*factors)
    return transform, linear_affine


@dataclass(frozen=True)
class LevelSpec:
    """One level to optimise: where it is in the schedule and what it optimises with.

    Attributes:
        stage_index: stage index.
        stage: the stage's config.
        level_index: level index in the stage (0 = coarsest).
        level: the level's images and grid.
        transform: the transform optimised at this level (trainable).
        outer: frozen transforms applied after it (fixed -> moving order).
        metric: the stage's metric module.
        regularisers: the stage's weighted regularisers.
        builder: the stage's transform builder (field, penalty, preconditioner).
        setup: the stage's :class:`StageSetup`.
        optimizer: the stage's optimiser.
        options: its validated options.
    """

    stage_index: int
    stage: StageConfig
    level_index: int
    level: Level
    transform: Transform
    outer: list[Transform]
    metric: Any
    regularisers: list[WeightedRegulariser]
    builder: Any
    setup: StageSetup
    optimizer: Any
    options: dict


@dataclass
class RunState:
    """What every level of one registration shares.

    Attributes:
        callbacks: the callbacks.
        seed: seed of every random choice.
        radius: the fixed grid's radius in mm (parameter scaling).
        min_overlap: fewest overlap fraction a level may reach.
        start_time: ``time.perf_counter()`` at the start of the registration.
        range_cache: intensity ranges computed so far.
    """

    callbacks: CallbackList
    seed: int
    radius: float
    min_overlap: float
    start_time: float
    range_cache: dict


def _run_level(spec: LevelSpec, run: RunState) -> tuple[LevelRecord, LevelContext]:
    si, stage, li, level = spec.stage_index, spec.stage, spec.level_index, spec.level
    current, metric, regs, builder, setup = (spec.transform, spec.metric, spec.regularisers,
                                             spec.builder, spec.setup)
    cbs, seed, t0 = run.callbacks, run.seed, run.start_time
    start = time.perf_counter()
    params = ScaledParameters(current, run.radius)
    sampler = SAMPLERS[stage.sampling.strategy](level, stage.sampling, _generator(seed, si, li))
    fixed_range, moving_range = level_ranges(metric, level, run.range_cache)
    objective = LevelObjective(
        level, current, spec.outer, metric, sampler, params, fixed_range, moving_range,
        regularisers=regs, field_fn=lambda t: builder.field(t, level, setup),
        min_overlap=run.min_overlap, precondition=builder.preconditioner(current, setup),
        penalty_fn=(lambda t: builder.penalty(t, regs, level, setup)) if regs else None)
    if is_trainable(metric):  # the critic ascends the bound while the transform descends
        objective = CriticTraining(objective, metric)
    quantity = getattr(metric, "quantity", lambda v: v)
    ctx = LevelContext(
        objective=objective, stage=si, transform=stage.transform, level=li,
        levels=stage.levels, max_iterations=stage.iterations[li],
        learning_rate=stage.learning_rate[li], options=spec.options,
        convergence=stage.convergence, callbacks=cbs,
        quantity=lambda v: float(quantity(v)),
        quantity_name=getattr(metric, "quantity_name", "loss"), start_time=t0,
        stationary=not is_trainable(metric))
    objective.resample()
    stop = cbs.on_level_start(ctx.state(0, None, stage.learning_rate[li]))
    q0 = params.zeros()
    if stop is not None:
        reason, q = "callback", q0
        ctx.stop_all = stop.all_levels
    elif stage.iterations[li] == 0:
        reason, q = "max-iterations", q0
    else:
        q, reason = spec.optimizer.run(ctx, q0)
    params.load(q)
    if ctx.last is None:  # nothing recorded (zero iterations, or stopped at once)
        ev = objective.evaluate(q, grad=False)
        if ev.ok:
            ctx.last = ev
        elif reason in ("max-iterations", "callback"):
            reason = ev.reason
    last = ctx.last
    record = LevelRecord(
        stage=si, transform=stage.transform, level=li, shrink=level.shrink,
        smoothing_mm=level.sigma_mm, grid_size=tuple(level.grid.size),
        optimizer=stage.optimizer, iterations=len(ctx.losses),
        samples=objective.samples.count if objective.samples is not None else 0,
        losses=tuple(ctx.losses), metric_values=tuple(ctx.metrics),
        final_loss=last.loss if last is not None else math.nan,
        final_metric=ctx.quantity(last.metric_loss) if last is not None else math.nan,
        quantity_name=ctx.quantity_name,
        overlap=last.overlap if last is not None else 0.0,
        stop_reason=reason, time_s=time.perf_counter() - start)
    logger.info("stage %d (%s) level %d: %d iterations, loss %.6g, %s %.6g, stop: %s, %.3f s",
                si, stage.transform, li, record.iterations, record.final_loss,
                record.quantity_name, record.final_metric, reason, record.time_s)
    return record, ctx


__all__ = ["LevelRecord", "LevelSpec", "RegistrationResult", "RunState", "build_components",
           "build_metric", "build_regularisers", "run"]

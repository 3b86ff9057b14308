"""Groupwise co-registration: X-CoReg's loop (Luo & Zhuang 2022, Algorithm 1) for any objective.

Every image ``j`` gets a transform ``phi_j`` mapping common-space world points to image ``j``'s
world points (the pairwise convention, with the common grid as the fixed grid):
``phi_j = linear_j o ffd_j1 o ... o ffd_jm`` (:class:`~itreg.transforms.Compose`, the newest
FFD innermost). The run is a list of :class:`GroupStage`: each stage optimises one kind of
transform (``translation``, ``rigid``, ``affine`` carry the previous linear map over; each
resolution level of an ``ffd`` stage adds a cubic B-spline of its own control spacing, earlier
ones frozen, as the authors' multi-level FFD) over a coarse-to-fine schedule of the common grid
(``Grid.shrink``) with images smoothed and decimated by the engine's
:class:`~itreg.engine.pyramid.ImagePyramid`.

Per iteration (Algorithm 1, steps 3-5): the images are sampled at ``phi_j(x)``
(:func:`itreg.warp.sample`) for the level's points, the overlap ``Omega^phi`` is where every
``phi_j(x)`` lies inside image ``j`` (and inside the region of interest), the objective updates
its latent state and returns its loss, the bending energy of the FFDs is added
(``lambda * sum_j BE(ffd_j)``, Eq. 15, on the control mesh as the authors' code), and one step
of the engine's Adam is taken on all images' parameters (Eq. 16; in the engine's scaled space,
``Transform.parameter_scales``, so one unit is about 1 mm; each level runs through
:func:`itreg.groupwise.level.run_group_level`, with the engine's schedule, convergence test and
stop reasons). In unbiased mode the zero-sum constraint (Eq. 37) is then enforced as a projection: the
group mean of every optimised parameter is moved to its identity value (mean translation and
angles zero, mean affine matrix the identity, mean FFD coefficients zero, so the mean FFD
displacement is exactly zero). In group-to-reference mode the reference image keeps the
identity and the common grid is its grid.
"""

from __future__ import annotations

import abc
import functools
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from itreg.engine.callbacks import CallbackList, StepState
from itreg.engine.config import ConvergenceConfig
from itreg.engine.pyramid import ImagePyramid
from itreg.engine.registration import finite_or_none
from itreg.engine.stages import STAGE_TRANSFORMS, StageSetup
from itreg.errors import ConfigError, unknown_name
from itreg.grid import Grid
from itreg.groupwise.base import GroupObjective
from itreg.groupwise.level import (  # MIN_OVERLAP, overlap_mask: re-exported
    MIN_OVERLAP,
    GroupLevel,
    overlap_mask,
    run_group_level,
)
from itreg.image import Image
from itreg.transforms import BSpline, Compose, LinearTransform, Transform, Translation
from itreg.warp import resample

logger = logging.getLogger(__name__)

__all__ = [
    "GROUP_TRANSFORMS",
    "MIN_OVERLAP",
    "GroupLevelRecord",
    "GroupStage",
    "GroupState",
    "co_register",
    "default_stages",
    "ffd_stages",
    "overlap_mask",
    "project_zero_mean",
]


@dataclass(frozen=True)
class GroupStage:
    """One stage of a groupwise registration.

    Args:
        transform: ``"translation"``, ``"rigid"``, ``"affine"`` or ``"ffd"``
            (:data:`GROUP_TRANSFORMS`).
        shrink: shrink factor of the common grid per level, coarsest first.
        iterations: Adam steps per level (one value for all levels, or one per level).
        learning_rate: Adam step size in mm (rotations and matrix entries are scaled by the
            common grid's radius, see ``Transform.parameter_scales``).
        smoothing_mm: Gaussian sigma in mm per level; None gives ``shrink * spacing / 2``
            (no smoothing at shrink 1).
        control_spacing_mm: FFD control-point spacing per level (``ffd`` only; one value
            for all levels, or one per level).
        bending_weight: ``lambda`` of the bending energy (``ffd`` only), with the authors'
            control-mesh normalisation (:func:`control_mesh_bending`), summed over images.
        final_lr_factor: the step size decays from `learning_rate` at a level's first
            iteration to ``final_lr_factor * learning_rate`` at its last (cosine); 1 keeps it
            constant (the paper's plain Adam).
    """

    transform: str
    shrink: tuple[int, ...] = (4, 2, 1)
    iterations: int | tuple[int, ...] = 100
    learning_rate: float = 1.0
    smoothing_mm: tuple[float, ...] | None = None
    control_spacing_mm: float | tuple[float, ...] = 20.0
    bending_weight: float = 1e-3
    final_lr_factor: float = 1.0

    def __post_init__(self) -> None:
        if self.transform not in GROUP_TRANSFORMS:
            raise unknown_name("groupwise transform", self.transform, GROUP_TRANSFORMS)
        shrink = tuple(int(s) for s in self.shrink)
        if not shrink or any(s < 1 for s in shrink):
            raise ConfigError(f"shrink factors must be integers >= 1, got {self.shrink!r}")
        object.__setattr__(self, "shrink", shrink)
        object.__setattr__(self, "iterations", self._per_level(self.iterations, "iterations",
                                                                int, 0))
        object.__setattr__(self, "control_spacing_mm",
                           self._per_level(self.control_spacing_mm, "control_spacing_mm",
                                           float, 1e-9))
        if self.smoothing_mm is not None:
            object.__setattr__(self, "smoothing_mm",
                               self._per_level(self.smoothing_mm, "smoothing_mm", float, 0.0))
        if not (float(self.learning_rate) > 0 and math.isfinite(float(self.learning_rate))):
            raise ConfigError(f"learning_rate must be positive, got {self.learning_rate!r}")
        if not 0.0 < float(self.final_lr_factor) <= 1.0:
            raise ConfigError(f"final_lr_factor must be in (0, 1], got {self.final_lr_factor!r}")
        if not float(self.bending_weight) >= 0:
            raise ConfigError(f"bending_weight must be >= 0, got {self.bending_weight!r}")

    def _per_level(self, value, name: str, cast, low) -> tuple:
        values = (value,) * len(self.shrink) if isinstance(value, (int, float)) else tuple(value)
        if len(values) != len(self.shrink):
            raise ConfigError(f"{name} needs 1 or {len(self.shrink)} values, got {len(values)}")
        out = tuple(cast(v) for v in values)
        if any(not (v >= low) for v in out):
            raise ConfigError(f"{name} must be >= {low}, got {values!r}")
        return out

    def as_dict(self) -> dict[str, Any]:
        return {"transform": self.transform, "shrink": list(self.shrink),
                "iterations": list(self.iterations), "learning_rate": self.learning_rate,
                "smoothing_mm": None if self.smoothing_mm is None else list(self.smoothing_mm),
                "control_spacing_mm": list(self.control_spacing_mm),
                "bending_weight": self.bending_weight, "final_lr_factor": self.final_lr_factor}


def default_stages(transform: str, iterations: int = 100) -> list[GroupStage]:
    """The stage schedule for a transform name (the paper's translation -> rigid -> FFD).

    ``translation``: translation at shrink 4, 2, 1. ``rigid``: translation (4, 2), then rigid
    (2, 1) (RIRE protocol). ``affine``: rigid's stages, then affine (2, 1). ``ffd``:
    translation (4, 2), then :func:`ffd_stages`.
    """
    it = int(iterations)
    schedules = {
        "translation": [GroupStage("translation", (4, 2, 1), it)],
        "rigid": [GroupStage("translation", (4, 2), it), GroupStage("rigid", (2, 1), it)],
        "affine": [GroupStage("translation", (4, 2), it), GroupStage("rigid", (2, 1), it),
                   GroupStage("affine", (2, 1), it)],
        "ffd": [GroupStage("translation", (4, 2), it)] + ffd_stages(it),
    }
    if transform not in schedules:
        raise unknown_name("groupwise transform", transform, schedules)
    return schedules[transform]


def ffd_stages(iterations: int = 100, bending_weight: float = 1e-2,
               final_lr_factor: float = 0.1) -> list[GroupStage]:
    """The multi-level FFD schedule: a 40 mm FFD at half resolution (step 1 mm), then a 20 mm
    FFD at full resolution (step 0.3 mm), both with the control-mesh bending weight and a
    cosine decay of the step size to `final_lr_factor` of it over each level.

    Tuned on 2D BrainWeb-style groups at 2 mm (benchmarks/groupwise_brainweb.py): the paper's
    lambda = 1e-3 left the metric free to fold the coarse slices under the bias field (gWI
    worse than before), a single step size kept Adam's jitter at the finest level, a 10 mm
    level added noise, and the decay lets the stochastic X-metric steps settle (mean gWI over
    3 groups, X-CoReg K = 5 with the k-means start: 0.77 -> 0.71 mm).
    """
    it = int(iterations)
    return [GroupStage("ffd", (2,), it, learning_rate=1.0, control_spacing_mm=40.0,
                       bending_weight=bending_weight, final_lr_factor=final_lr_factor),
            GroupStage("ffd", (1,), it, learning_rate=0.3, control_spacing_mm=20.0,
                       bending_weight=bending_weight, final_lr_factor=final_lr_factor)]


# ------------------------------------------------------------------------------ transforms
class GroupTransform(abc.ABC):
    """How one kind of stage builds each image's transform to optimise at a level."""

    is_linear: bool = True

    @abc.abstractmethod
    def start(self, state: GroupState, j: int, stage: GroupStage, level: int) -> Transform:
        """Make (and install into `state`) image `j`'s transform optimised at `level`;
        return it."""

    def regulariser(self, state: GroupState, stage: GroupStage, grid: Grid,
                    active: Sequence[Transform]) -> Tensor | None:
        """The weighted regulariser of the optimised transforms, or None."""
        return None


class _LinearGroupTransform(GroupTransform):
    def __init__(self, name: str) -> None:
        self.name = name

    def start(self, state, j, stage, level):
        if level > 0:
            return state.linear[j]
        setup = StageSetup(state.grid, None, state.dtype, state.device)
        new, residual = STAGE_TRANSFORMS[self.name].start(state.linear[j], setup)
        if residual is not None:  # not representable: keep the old map as a frozen outer factor
            state.outer[j] = residual if state.outer[j] is None else Compose(state.outer[j],
                                                                              residual)
        state.linear[j] = new
        return new


class _FFDGroupTransform(GroupTransform):
    is_linear = False

    def start(self, state, j, stage, level):
        ffd = BSpline(state.grid, stage.control_spacing_mm[level], dtype=state.dtype,
                      device=state.device)
        state.ffds[j].append(ffd)
        return ffd

    def regulariser(self, state, stage, grid, active):
        if stage.bending_weight <= 0 or not active:
            return None
        voxel_mm = min(state.grid.spacing)
        energy = torch.stack([control_mesh_bending(t, voxel_mm) for t in active]).sum()
        return stage.bending_weight * energy


def control_mesh_bending(ffd: BSpline, voxel_mm: float) -> Tensor:
    """Bending energy of an FFD's control mesh with the authors' normalisation.

    The released code penalises the mean over control points of the squared second finite
    differences of the coefficients expressed in voxels (``sum_a d_aa^2 + 2 sum_{a<b}
    d_ab^2``), so the paper's ``lambda`` (1e-3 on BrainWeb, 1e-2 on MoCo) applies unchanged;
    the engine's world-mm :func:`~itreg.regularisers.bending_energy` would need ``lambda``
    rescaled by about ``spacing^4 / voxel^2``.

    Args:
        ffd: the B-spline transform.
        voxel_mm: the image voxel size in mm (coefficients are divided by it).

    Returns:
        0-d tensor.
    """
    c = ffd.coefficients / voxel_mm  # (D, *control_shape)
    nd = c.dim() - 1
    terms = []
    for a in range(1, nd + 1):
        d2 = c.narrow(a, 2, c.shape[a] - 2) - 2 * c.narrow(a, 1, c.shape[a] - 2) + c.narrow(
            a, 0, c.shape[a] - 2)
        terms.append(d2.pow(2).mean())
        for b in range(a + 1, nd + 1):
            da = c.narrow(a, 1, c.shape[a] - 1) - c.narrow(a, 0, c.shape[a] - 1)
            dab = da.narrow(b, 1, c.shape[b] - 1) - da.narrow(b, 0, c.shape[b] - 1)
            terms.append(2 * dab.pow(2).mean())
    return torch.stack(terms).sum()


#: Stage kinds by name.
GROUP_TRANSFORMS: dict[str, GroupTransform] = {
    "translation": _LinearGroupTransform("translation"),
    "rigid": _LinearGroupTransform("rigid"),
    "affine": _LinearGroupTransform("affine"),
    "ffd": _FFDGroupTransform(),
}


@dataclass
class GroupState:
    """The transforms of every image during a run.

    Attributes:
        grid: the full-resolution common grid.
        linear: each image's linear transform (centre: the common grid's centre).
        ffds: each image's FFD levels, oldest first.
        outer: a frozen outer linear factor per image where a stage could not represent the
            previous map (None normally).
        dtype: working dtype.
        device: working device.
    """

    grid: Grid
    linear: list[LinearTransform]
    ffds: list[list[BSpline]]
    outer: list[Transform | None]
    dtype: torch.dtype
    device: Any

    def transform(self, j: int) -> Transform:
        """``phi_j``: common-space world points -> image ``j`` world points."""
        parts: list[Transform] = []
        if self.outer[j] is not None:
            parts.append(self.outer[j])
        parts.append(self.linear[j])
        parts.extend(self.ffds[j])
        return parts[0] if len(parts) == 1 else Compose(*parts)


_IDENTITY_VALUES = {"linear": "eye", "scale": "one"}


def _identity_value(name: str, p: Tensor) -> Tensor:
    kind = _IDENTITY_VALUES.get(name.rsplit(".", 1)[-1], "zero")
    if kind == "eye":
        return torch.eye(p.shape[0], dtype=p.dtype, device=p.device)
    if kind == "one":
        return torch.ones_like(p)
    return torch.zeros_like(p)


@torch.no_grad()
def project_zero_mean(transforms: Sequence[Transform]) -> None:
    """Enforce the zero-sum constraint (Eq. 37) on same-kind transforms, in place.

    Every parameter is shifted so that its mean over the group equals its identity value
    (zero for translations, angles and FFD coefficients; the identity matrix for affine
    matrices; 1 for scales): ``p_j <- p_j - mean_i p_i + p_id``. For FFDs on one control
    grid and for translations this makes the mean displacement exactly zero.

    Args:
        transforms: one transform per image, all of one class and shape.
    """
    if len(transforms) < 2:
        return
    named = [dict(t.named_parameters()) for t in transforms]
    for name in named[0]:
        params = [n[name] for n in named]
        mean = torch.stack([p.detach() for p in params]).mean(dim=0)
        shift = mean - _identity_value(name, params[0])
        for p in params:
            p.sub_(shift)


# ------------------------------------------------------------------------------ the loop
@dataclass(frozen=True)
class GroupLevelRecord:
    """What happened at one level of one stage (JSON via :meth:`as_dict`)."""

    stage: int
    transform: str
    level: int
    shrink: int
    grid_size: tuple[int, ...]
    iterations: int
    losses: tuple[float, ...]
    metric_values: tuple[float, ...]
    overlap: float
    stop_reason: str
    time_s: float
    extra: dict = field(default_factory=dict)

    def as_dict(self, history: bool = True) -> dict:
        out = {"stage": self.stage, "transform": self.transform, "level": self.level,
               "shrink": self.shrink, "grid_size": list(self.grid_size),
               "iterations": self.iterations, "overlap": self.overlap,
               "stop_reason": self.stop_reason, "time_s": round(self.time_s, 6),
               "final_loss": finite_or_none(self.losses[-1]) if self.losses else None,
               "final_metric": (finite_or_none(self.metric_values[-1])
                                if self.metric_values else None)}
        if history:
            out["losses"] = [finite_or_none(v) for v in self.losses]
            out["metric_values"] = [finite_or_none(v) for v in self.metric_values]
        return out


def _smoothing(stage: GroupStage, level: int, grid: Grid) -> float:
    if stage.smoothing_mm is not None:
        return stage.smoothing_mm[level]
    f = stage.shrink[level]
    return 0.0 if f == 1 else 0.5 * f * min(grid.spacing)


def co_register(images: Sequence[Image], objective: GroupObjective,
                stages: Sequence[GroupStage], *, grid: Grid, reference: int | None = None,
                roi: Tensor | None = None, seed: int = 0,
                convergence: ConvergenceConfig | None = None,
                callbacks: CallbackList | None = None) -> tuple[GroupState, list[GroupLevelRecord]]:
    """Run the staged, multi-resolution groupwise registration.

    Args:
        images: ``N >= 2`` checked, floating, single-channel images of one dimension
            (normalised as the caller wants; the API z-scores them).
        objective: the groupwise objective (its state is reset here).
        stages: the stage schedule.
        grid: the full-resolution common grid.
        reference: index of the image kept fixed (group-to-reference), or None (unbiased,
            Eq. 37 projection).
        roi: optional bool ``grid.shape`` region of interest in common space.
        seed: seed of every random choice (Eq. 22 start, samples).
        convergence: per-level convergence test on the loss (default: window 20,
            tolerance 1e-5).
        callbacks: hooks receiving :class:`~itreg.engine.callbacks.StepState`.

    Returns:
        The final :class:`GroupState` and a :class:`GroupLevelRecord` per stage and level.

    Raises:
        GeometryError: the images do not overlap in the common space (at the start, or a
            level ends with fewer than ``MIN_OVERLAP`` overlap points at its start).
    """
    n = len(images)
    dtype = images[0].data.dtype
    device = images[0].device
    callbacks = callbacks or CallbackList()
    convergence = convergence or ConvergenceConfig(tolerance=1e-5, window=20)
    generator = torch.Generator().manual_seed(int(seed))
    center = grid.center
    state = GroupState(grid, [Translation(grid.ndim, center=center, dtype=dtype, device=device)
                              for _ in range(n)], [[] for _ in range(n)], [None] * n, dtype,
                       device)
    objective.reset(n, reference, generator, dtype, device)
    pyramids = [ImagePyramid(img) for img in images]
    radius = grid.radius()
    movable = [j for j in range(n) if j != reference]
    records: list[GroupLevelRecord] = []
    t_start = time.perf_counter()
    stop_all = False
    for s_idx, stage in enumerate(stages):
        kind = GROUP_TRANSFORMS[stage.transform]
        for lvl, shrink in enumerate(stage.shrink):
            if stop_all:
                break
            t_level = time.perf_counter()
            lgrid = grid.shrink(shrink)
            sigma = _smoothing(stage, lvl, grid)
            level_images = [p.get(sigma, p.stride_for(min(lgrid.spacing))) for p in pyramids]
            objective.start_level(lgrid)
            points_all = lgrid.points(dtype=dtype, device=device).reshape(-1, grid.ndim)
            roi_l = torch.ones(points_all.shape[0], dtype=torch.bool, device=device)
            if roi is not None:
                r = resample(Image(roi.to(dtype), grid, is_label=False), None, lgrid,
                             mode="nearest")
                roi_l = r.data.reshape(-1) > 0.5
            active = [kind.start(state, j, stage, lvl) for j in movable]
            if reference is not None:  # the reference keeps the identity
                for p in state.transform(reference).parameters():
                    p.requires_grad_(False)
            for t in active:
                for p in t.parameters():
                    p.requires_grad_(True)
            level = GroupLevel(
                objective, level_images, lgrid, points_all, roi_l,
                [state.transform(j) for j in range(n)], active,
                functools.partial(kind.regulariser, state, stage, lgrid, active),
                project_zero_mean if reference is None else None, generator, not records)
            ctx, reason, _ = run_group_level(
                level, stage_index=s_idx, transform=stage.transform, level_index=lvl,
                levels=len(stage.shrink), iterations=stage.iterations[lvl],
                learning_rate=stage.learning_rate, final_lr_factor=stage.final_lr_factor,
                radius=radius, convergence=convergence, callbacks=callbacks,
                start_time=t_start)
            stop_all = stop_all or ctx.stop_all
            losses, metrics = ctx.losses, ctx.metrics
            overlap_frac = ctx.last.overlap if ctx.last is not None else float("nan")
            for t in active:
                for p in t.parameters():
                    p.requires_grad_(False)
            record = GroupLevelRecord(s_idx, stage.transform, lvl, shrink, lgrid.size,
                                      len(losses), tuple(losses), tuple(metrics), overlap_frac,
                                      reason, time.perf_counter() - t_level)
            records.append(record)
            end_state = ctx.state(len(losses), ctx.last, None, reason)
            got = callbacks.on_level_end(end_state)
            if got is not None and got.all_levels:
                stop_all = True
            logger.info("stage %d %s level %d: %d iterations, %s", s_idx, stage.transform, lvl,
                        len(losses), reason)
    if records:
        last = records[-1]
        callbacks.on_end(StepState(stage=last.stage, transform=last.transform, level=last.level,
                                   levels=len(stages[last.stage].shrink),
                                   iteration=last.iterations, max_iterations=last.iterations,
                                   loss=last.losses[-1] if last.losses else float("nan"),
                                   metric=last.metric_values[-1] if last.metric_values
                                   else float("nan"), quantity_name=objective.quantity_name,
                                   learning_rate=None, overlap=last.overlap,
                                   elapsed_s=time.perf_counter() - t_start,
                                   stop_reason=last.stop_reason))
    return state, records

"""The transforms a stage can optimise, as a registry of builders.

A builder makes the stage's transform for each level (:meth:`StageTransform.for_level`) from
the previous level's (or, for linear stages, from the linear transform of the previous stage),
and says which field the regularisers act on. Linear stages carry the previous linear transform
over exactly where the new class can represent it (rigid -> affine copies the map; translation
-> rigid copies the translation); otherwise the previous map stays as a frozen outer factor and
the new transform starts at the identity.

Non-linear transforms act in fixed space, inside the linear part:
``T = linear o nonlinear_1 o ... o nonlinear_k`` (``Compose(linear, n1, ..., nk)``); each new
non-linear stage is the innermost factor.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

import torch
from torch import Tensor

from itreg.engine.config import StageConfig
from itreg.engine.pyramid import Level
from itreg.errors import unknown_name
from itreg.grid import Grid
from itreg.transforms import Affine, LinearTransform, Rigid, Similarity, Transform, Translation

_IDENTITY_TOL = 1e-6


@dataclass(frozen=True)
class StageSetup:
    """What builders need to know about the registration.

    Attributes:
        fixed_grid: the full-resolution fixed grid.
        stage: the stage's settings.
        dtype: working dtype.
        device: working device.
    """

    fixed_grid: Grid
    stage: StageConfig
    dtype: torch.dtype
    device: torch.device


class StageTransform(abc.ABC):
    """Builds and re-grids the transform of one stage kind."""

    name: str = ""
    is_linear: bool = False

    @abc.abstractmethod
    def for_level(self, previous: Transform | None, level: Level, setup: StageSetup) -> Transform:
        """The transform to optimise at `level`, continuing from `previous` (None at the first
        level of a non-linear stage)."""

    def preconditioner(self, transform: Transform, setup: StageSetup):
        """A function applied to the flat gradient ``dL/dq`` before each step, or None."""
        return

    def field(self, transform: Transform, level: Level, setup: StageSetup
              ) -> tuple[Tensor, Grid]:
        """``(field (D, *S), grid)`` the regularisers act on (displacement in world mm)."""
        disp = transform.displacement(level.grid)
        return torch.movedim(disp, -1, 0), level.grid

    def penalty(self, transform: Transform, regularisers, level: Level, setup: StageSetup
                ) -> Tensor | None:
        """The weighted sum of `regularisers` (``.weight``, ``.module``) on `transform`.

        A regulariser with a closed form for the transform (see
        :meth:`itreg.regularisers.Regulariser.closed_form`) is evaluated exactly over the fixed
        grid's extent; the others on :meth:`field` (computed once, only when needed).
        """
        total = None
        field = None
        for reg in regularisers:
            term = None
            closed = getattr(reg.module, "closed_form", None)
            if closed is not None:
                term = closed(transform, setup.fixed_grid)
            if term is None:
                if field is None:
                    field = self.field(transform, level, setup)
                term = reg.module(*field)
            term = reg.weight * term
            total = term if total is None else total + term
        return total


# ---------------------------------------------------------------------------------- linear
def _is_identity(a: Tensor) -> bool:
    eye = torch.eye(a.shape[0], dtype=a.dtype, device=a.device)
    return bool((a - eye).abs().max() <= _IDENTITY_TOL)


class LinearStage(StageTransform):
    """A linear stage transform (translation, rigid, similarity, affine)."""

    is_linear = True

    def __init__(self, name: str, cls: type[LinearTransform]) -> None:
        self.name = name
        self.cls = cls

    def for_level(self, previous: Transform | None, level: Level, setup: StageSetup) -> Transform:
        return previous

    def start(self, previous: LinearTransform, setup: StageSetup
              ) -> tuple[LinearTransform, LinearTransform | None]:
        """The stage's transform continuing `previous`, and a frozen outer residual (or None).

        The result maps exactly like `previous` (composed with the residual when there is one).
        """
        nd = previous.ndim
        kw = {"dtype": setup.dtype, "device": setup.device}
        with torch.no_grad():
            a = previous.matrix().detach()
            c = previous.center.detach().to(**kw)
            t = previous.translation.detach().to(**kw)
            if self.cls is Affine:
                return Affine(nd, center=c, translation=t, matrix=a.to(**kw), **kw), None
            if self.cls is Translation and _is_identity(a):
                return Translation(nd, center=c, translation=t, **kw), None
            if self.cls in (Rigid, Similarity) and isinstance(previous, Rigid):
                angles = previous.angles.detach().to(**kw)
                scale = float(previous.scale) if isinstance(previous, Similarity) else 1.0
                if self.cls is Similarity:
                    return Similarity(nd, center=c, translation=t, angles=angles, scale=scale,
                                      **kw), None
                if abs(scale - 1.0) <= _IDENTITY_TOL:
                    return Rigid(nd, center=c, translation=t, angles=angles, **kw), None
            if self.cls in (Rigid, Similarity) and _is_identity(a):
                return self.cls(nd, center=c, translation=t, **kw), None
        # Not representable: keep `previous` as a frozen outer map, start at the identity.
        new = self.cls(nd, center=c, **kw)
        return new, previous


# ---------------------------------------------------------------------------------- non-linear
class BSplineStage(StageTransform):
    """Cubic B-spline FFD over the whole fixed grid with ``control_spacing_mm``."""

    name = "bspline"

    def for_level(self, previous: Transform | None, level: Level, setup: StageSetup) -> Transform:
        if previous is not None:
            return previous
        from itreg.transforms.bspline import BSpline

        return BSpline(setup.fixed_grid, setup.stage.control_spacing_mm, dtype=setup.dtype,
                       device=setup.device)

    def field(self, transform: Transform, level: Level, setup: StageSetup
              ) -> tuple[Tensor, Grid]:
        """The displacement on the level grid, or on a grid of half the control spacing when
        that is coarser: finite differences there follow a cubic B-spline's smooth curvature
        closely enough for a penalty, and full-resolution Hessians would dominate the cost.
        (The bending energy does not use it: it has a closed form, see :meth:`penalty`.)"""
        grid = level.grid
        target = setup.stage.control_spacing_mm / 2.0
        if max(grid.spacing) < target:
            grid = setup.fixed_grid.with_spacing(target)
        disp = transform.displacement(grid)
        return torch.movedim(disp, -1, 0), grid


def _upsample(field: Tensor, grid: Grid, new_grid: Grid) -> Tensor:
    """A ``(D, *grid.shape)`` vector field linearly interpolated onto `new_grid` (edge values
    extended), ``(D, *new_grid.shape)``."""
    from itreg.transforms.dense import sample_field

    points = new_grid.points(dtype=field.dtype, device=field.device)
    return torch.movedim(sample_field(field.detach(), grid, points, outside="border"), -1, 0)


def _field_smoother(grid: Grid, sigma_mm: float):
    """Gaussian smoothing (sigma in mm) of a flat gradient of a ``(D, *grid.shape)`` field."""
    if sigma_mm <= 0:
        return None
    from itreg.engine.pyramid import smooth

    sigma_vox = [sigma_mm / s for s in reversed(grid.spacing)]  # tensor-axis order
    shape = (grid.ndim, *grid.shape)

    def precondition(grad: Tensor) -> Tensor:
        return smooth(grad.reshape(shape), sigma_vox).reshape(-1)

    return precondition


class DenseStage(StageTransform):
    """A displacement field on each level's grid, carried to the next level by interpolation."""

    name = "dense"

    def for_level(self, previous: Transform | None, level: Level, setup: StageSetup) -> Transform:
        from itreg.transforms.dense import DisplacementField

        if previous is None:
            zeros = torch.zeros((level.grid.ndim, *level.grid.shape), dtype=setup.dtype,
                                device=setup.device)
            return DisplacementField(zeros, level.grid)
        if previous.grid.same_as(level.grid):
            return previous
        return DisplacementField(_upsample(previous.field, previous.grid, level.grid), level.grid)

    def field(self, transform: Transform, level: Level, setup: StageSetup
              ) -> tuple[Tensor, Grid]:
        return transform.field, transform.grid

    def preconditioner(self, transform: Transform, setup: StageSetup):
        return _field_smoother(transform.grid, setup.stage.gradient_smoothing_mm)


class SVFStage(StageTransform):
    """A stationary velocity field on each level's grid (scaling and squaring)."""

    name = "svf"

    def for_level(self, previous: Transform | None, level: Level, setup: StageSetup) -> Transform:
        from itreg.transforms.dense import StationaryVelocityField

        steps = setup.stage.svf_steps
        if previous is None:
            return StationaryVelocityField(level.grid, None, steps=steps, dtype=setup.dtype,
                                           device=setup.device)
        if previous.grid.same_as(level.grid):
            return previous
        v = _upsample(previous.velocity, previous.grid, level.grid)
        return StationaryVelocityField(level.grid, v, steps=steps)

    def field(self, transform: Transform, level: Level, setup: StageSetup
              ) -> tuple[Tensor, Grid]:
        return transform.velocity, transform.grid

    def preconditioner(self, transform: Transform, setup: StageSetup):
        return _field_smoother(transform.grid, setup.stage.gradient_smoothing_mm)


#: Stage transforms by name.
STAGE_TRANSFORMS: dict[str, StageTransform] = {
    "translation": LinearStage("translation", Translation),
    "rigid": LinearStage("rigid", Rigid),
    "similarity": LinearStage("similarity", Similarity),
    "affine": LinearStage("affine", Affine),
    "bspline": BSplineStage(),
    "dense": DenseStage(),
    "svf": SVFStage(),
}


def get_stage_transform(name: str) -> StageTransform:
    """The builder registered as `name`.

    Raises:
        ConfigError: unknown name (the message lists the valid ones).
    """
    if name not in STAGE_TRANSFORMS:
        raise unknown_name("transform", name, STAGE_TRANSFORMS)
    return STAGE_TRANSFORMS[name]


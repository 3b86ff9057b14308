"""The objective a level optimises: sample, map, interpolate, compare, regularise.

Per evaluation the :class:`LevelObjective` maps the level's sample points through the transform
being optimised and then through the frozen transforms of earlier stages, samples the moving
image there (:func:`itreg.warp.sample`), combines the inside-the-image flags with the masks,
evaluates the metric with intensity ranges fixed for the level, and adds the weighted
regularisers. Metrics that need images on a grid (``requires_spatial``) get the whole warped
level image from :func:`itreg.warp.resample_with_mask` instead.

The engine optimises ``q`` with ``p = p0 + s * q`` for every parameter ``p`` of the transform
(``s`` from ``transform.parameter_scales(radius)``), so one unit of ``q`` moves points by about
1 mm whatever the parameter. :class:`ScaledParameters` keeps that map; the transform's own
parameters always hold the current ``p``, so any transform works without functional tricks.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from itreg.engine.config import SamplingConfig
from itreg.engine.pyramid import Level
from itreg.image import Image
from itreg.runtime import limited_threads
from itreg.transforms import Transform

logger = logging.getLogger(__name__)

#: An evaluation with fewer valid points than this counts as no overlap.
MIN_POINTS = 8
#: Random samples are drawn from a pool of this many times the sample count ...
POOL_FACTOR = 16
#: ... capped at this many points (unless the sample count itself is larger).
MAX_POOL = 1 << 20


# ---------------------------------------------------------------------------------- parameters
class ScaledParameters:
    """The flat, scaled parameter vector ``q`` of a transform: ``p = p0 + s * q``.

    Args:
        transform: the transform being optimised (its parameters requiring grad are used).
        radius: half-diagonal of the fixed image in mm, for ``parameter_scales``.
    """

    def __init__(self, transform: Transform, radius: float) -> None:
        named = list(transform.parameters())
        scales = transform.parameter_scales(radius)
        if len(scales) != len(named):
            scales = [torch.ones_like(p) for p in named]
        pairs = [(p, s) for p, s in zip(named, scales) if p.requires_grad]
        self.params = [p for p, _ in pairs]
        self.scales = [s.detach().to(p.dtype).expand_as(p).reshape(-1) for p, s in pairs]
        self.p0 = [p.detach().clone() for p in self.params]
        self.sizes = [p.numel() for p in self.params]
        ref = self.params[0] if self.params else None
        self.dtype = ref.dtype if ref is not None else torch.float32
        self.device = ref.device if ref is not None else None
        self.numel = sum(self.sizes)

    def zeros(self) -> Tensor:
        """The starting point ``q = 0`` (the transform as it is)."""
        return torch.zeros(self.numel, dtype=self.dtype, device=self.device)

    @torch.no_grad()
    def load(self, q: Tensor) -> None:
        """Write ``p = p0 + s * q`` into the transform's parameters."""
        offset = 0
        for p, p0, s, n in zip(self.params, self.p0, self.scales, self.sizes):
            p.copy_(p0 + (s * q[offset:offset + n].to(p.dtype)).view_as(p))
            offset += n

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def flat_grad(self) -> Tensor:
        """``dL/dq = s * dL/dp``, flat; zeros where a parameter got no gradient."""
        parts = []
        for p, s in zip(self.params, self.scales):
            g = p.grad
            parts.append(torch.zeros_like(s) if g is None else g.reshape(-1) * s)
        return torch.cat(parts) if parts else torch.zeros(0)


# ---------------------------------------------------------------------------------- samplers
@dataclass
class Samples:
    """Where the metric is evaluated.

    Attributes:
        points: world points ``(P, D)``; None for whole-grid samples.
        fixed: fixed values ``(C, P)`` (or ``(C, *S)`` for spatial metrics).
        grid_mask: for whole-grid samples, the bool mask ``S`` of the voxels used.
    """

    points: Tensor | None
    fixed: Tensor
    grid_mask: Tensor | None = None

    @property
    def count(self) -> int:
        return int(self.points.shape[0]) if self.points is not None else int(
            self.grid_mask.sum())


class RandomSampler:
    """Seeded random voxels of the level grid inside the fixed mask, optionally jittered.

    At the start of a level a pool of ``POOL_FACTOR`` times the sample count (voxels drawn
    with replacement, each jittered within its voxel, with the fixed image interpolated there
    once) is built; every :meth:`draw` then picks a fresh random subset of the pool, which
    costs a gather instead of an interpolation per iteration.

    Args:
        level: the pyramid level.
        config: the stage's sampling settings.
        generator: a CPU ``torch.Generator`` (samples are drawn on CPU, then moved, so the
            choice of points does not depend on the device).
    """

    def __init__(self, level: Level, config: SamplingConfig, generator: torch.Generator) -> None:
        self.level = level
        self.config = config
        self.generator = generator
        valid = torch.nonzero(level.fixed_mask.reshape(-1).cpu(), as_tuple=False).reshape(-1)
        n_valid = int(valid.numel())
        n = n_valid
        count = config.count_at(level.index)
        if count is not None:
            n = min(n, count)
        if config.fraction is not None:
            n = min(n, max(math.ceil(config.fraction * n_valid), MIN_POINTS))
        self.n = max(min(n, n_valid), 1)
        data = level.fixed.data
        self.dtype, self.device = data.dtype, data.device
        pool = min(POOL_FACTOR * self.n, max(MAX_POOL, self.n))
        # Sorted in memory order, as every draw is: interpolation then walks the images
        # nearly sequentially, which is markedly faster on large volumes.
        flat = valid[torch.randint(n_valid, (pool,), generator=generator)].sort().values
        strides = [math.prod(level.grid.shape[a + 1:]) for a in range(level.grid.ndim)]
        # Tensor-order multi-index (z, y, x) -> ITK index (x, y, z).
        idx = torch.stack([(flat // st) % sz for st, sz in zip(strides, level.grid.shape)], -1)
        index = idx.flip(-1).to(torch.float64)
        if config.jitter:
            index = index + torch.rand(index.shape, generator=generator,
                                       dtype=torch.float64) - 0.5
        self.points = level.grid.index_to_world(index).to(dtype=self.dtype, device=self.device)
        if config.jitter:
            from itreg.warp import sample

            self.values, _ = sample(level.fixed, self.points)
        else:
            self.values = data.reshape(data.shape[0], -1)[:, flat.to(self.device)]

    def draw(self) -> Samples:
        pick = torch.randint(self.points.shape[0], (self.n,), generator=self.generator)
        pick = pick.sort().values.to(self.device)
        return Samples(self.points[pick], self.values[:, pick])


class FullSampler:
    """Every voxel of the level grid inside the fixed mask (the same samples every time).

    Args:
        level: the pyramid level.
        config: the stage's sampling settings (unused but for symmetry).
        generator: unused.
    """

    def __init__(self, level: Level, config: SamplingConfig, generator: torch.Generator) -> None:
        self.level = level
        mask = level.fixed_mask
        self._samples = Samples(None, level.fixed.data[:, mask], mask)

    def draw(self) -> Samples:
        return self._samples


#: Sampling strategies by name.
SAMPLERS: dict[str, Callable[[Level, SamplingConfig, torch.Generator], object]] = {
    "random": RandomSampler,
    "full": FullSampler,
}


# ---------------------------------------------------------------------------------- objective
@dataclass(frozen=True)
class Evaluation:
    """One evaluation of the objective.

    Attributes:
        loss: the total loss (metric + regularisers), a Python float.
        metric_loss: the metric's loss alone.
        overlap: fraction of sample points inside the moving image and masks.
        ok: False when there was too little overlap or the loss was not finite.
        reason: ``"no-overlap"`` or ``"non-finite"`` when not ok.
        grad: ``dL/dq`` (flat) when asked for and ok.
    """

    loss: float
    metric_loss: float
    overlap: float
    ok: bool
    reason: str | None = None
    grad: Tensor | None = None


#: Levels (and checks) that evaluate fewer points than this run on one thread: their tensors
#: are too small for threads to pay, and on a busy machine waiting for a descheduled thread
#: costs far more than the work.
SINGLE_THREAD_POINTS = 1 << 16


@contextlib.contextmanager
def level_threads(points: int) -> Iterator[None]:
    """One thread for work on fewer than :data:`SINGLE_THREAD_POINTS` points."""
    with limited_threads(1 if points < SINGLE_THREAD_POINTS else None):
        yield


@dataclass(frozen=True)
class WeightedRegulariser:
    """A weighted regulariser term and the field of the transform it acts on."""

    name: str
    weight: float
    module: torch.nn.Module


class LevelObjective:
    """The loss of one level as a function of the scaled parameters ``q``.

    Args:
        level: the pyramid level.
        current: the transform being optimised (innermost: applied to fixed points first).
        outer: frozen transforms applied after it, outermost first.
        metric: the metric module.
        sampler: draws the sample points.
        params: the scaled parameters of `current`.
        fixed_range: fixed intensity range of the level (or None).
        moving_range: moving intensity range of the level (or None).
        regularisers: weighted regularisers of `current`'s field.
        field_fn: gives ``(field (D, *S), grid)`` of `current` for the regularisers.
        min_overlap: the smallest acceptable fraction of valid sample points.
        precondition: applied to the flat gradient ``dL/dq`` before it is returned (e.g.
            Gaussian smoothing of a dense field's update), or None.
        penalty_fn: gives the weighted regulariser total of `current` directly (closed forms
            where the stage has them); when given, it replaces `field_fn` and `regularisers`.
    """

    def __init__(
        self,
        level: Level,
        current: Transform,
        outer: Sequence[Transform],
        metric: torch.nn.Module,
        sampler,
        params: ScaledParameters,
        fixed_range,
        moving_range,
        regularisers: Sequence[WeightedRegulariser] = (),
        field_fn: Callable | None = None,
        min_overlap: float = 0.0,
        precondition: Callable[[Tensor], Tensor] | None = None,
        penalty_fn: Callable[[Transform], Tensor | None] | None = None,
    ) -> None:
        self.level = level
        self.current = current
        self.outer = list(outer)
        self.metric = metric
        self.sampler = sampler
        self.params = params
        self.fixed_range = fixed_range
        self.moving_range = moving_range
        self.regularisers = list(regularisers)
        self.field_fn = field_fn
        self.min_overlap = float(min_overlap)
        self.precondition = precondition
        self.penalty_fn = penalty_fn
        self.spatial = bool(getattr(metric, "requires_spatial", False))
        self.samples: Samples | None = None
        self._grid_points: Tensor | None = None
        self._chain = None
        if self.spatial:
            from itreg.transforms.compose import Compose

            self._chain = Compose(*self.outer, current) if self.outer else current

    # ------------------------------------------------------------------ sampling
    def resample(self) -> None:
        """Draw a new sample set (random sampling; a no-op for whole-grid samples)."""
        if self.spatial:
            if self.samples is None:
                self.samples = Samples(None, self.level.fixed.data, self.level.fixed_mask)
            return
        self.samples = self.sampler.draw()

    # ------------------------------------------------------------------ mapping
    def _map_points(self) -> Tensor:
        s = self.samples
        if s.points is not None:
            x = self.current(s.points)
        else:
            if self._grid_points is None:
                self._grid_points = self.level.grid.points(
                    dtype=self.level.fixed.dtype, device=self.level.fixed.device)
            if self.current.is_linear:
                x = self.current(self._grid_points[s.grid_mask])
            else:  # separable / on-grid fast path of dense and B-spline transforms
                disp = self.current.displacement(self.level.grid, dtype=self.level.fixed.dtype,
                                                 device=self.level.fixed.device)
                x = (self._grid_points + disp)[s.grid_mask]
        for t in reversed(self.outer):
            x = t(x)
        return x

    def _moving_valid(self, mapped: Tensor, inside: Tensor) -> Tensor:
        from itreg.warp import sample

        valid = inside
        mm = self.level.moving_mask
        if mm is not None:
            mvals, _ = sample(mm, mapped.detach(), mode="nearest")
            valid = valid & (mvals[0] > 0.5)
        return valid

    def _metric_terms(self) -> tuple[Tensor | None, Tensor, float]:
        """``(metric loss, valid mask, overlap)``; the loss is None when too few points
        overlap (the metric is then not evaluated at all)."""
        from itreg.warp import resample, resample_with_mask, sample

        s = self.samples
        if self.spatial:
            warped, inside = resample_with_mask(self.level.moving, self._chain, self.level.grid)
            valid = inside & s.grid_mask
            mm = self.level.moving_mask
            if mm is not None:
                with torch.no_grad():
                    mres = resample(mm, self._chain, self.level.grid, mode="nearest")
                valid = valid & (mres.data[0] > 0.5)
            moving = warped.data
            total = int(s.grid_mask.sum())
        else:
            mapped = self._map_points()
            moving, inside = sample(self.level.moving, mapped)
            valid = self._moving_valid(mapped, inside)
            total = int(valid.numel())
        n_valid = int(valid.sum())
        overlap = n_valid / max(total, 1)
        if n_valid < MIN_POINTS or overlap < self.min_overlap:
            return None, valid, overlap
        loss = self.metric(s.fixed, moving, mask=valid, fixed_range=self.fixed_range,
                           moving_range=self.moving_range)
        return loss, valid, overlap

    def regulariser_loss(self) -> Tensor | None:
        """The weighted sum of the regularisers on the current transform's field."""
        if self.penalty_fn is not None:
            return self.penalty_fn(self.current)
        if not self.regularisers or self.field_fn is None:
            return None
        field, grid = self.field_fn(self.current)
        total = None
        for reg in self.regularisers:
            term = reg.weight * reg.module(field, grid)  # (D, *S) world-mm field and its grid
            total = term if total is None else total + term
        return total

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, q: Tensor, grad: bool = True) -> Evaluation:
        """The objective at ``q`` (and ``dL/dq`` if `grad`), on the current samples."""
        if self.samples is None:
            self.resample()
        self.params.load(q)
        self.params.zero_grad()
        with torch.set_grad_enabled(grad):
            metric_loss, _, overlap = self._metric_terms()
            if metric_loss is None:
                return Evaluation(math.nan, math.nan, overlap, False, "no-overlap")
            total = metric_loss
            reg = self.regulariser_loss()
            if reg is not None:
                total = total + reg
        loss = float(total.detach())
        mloss = float(metric_loss.detach())
        if not math.isfinite(loss):
            return Evaluation(loss, mloss, overlap, False, "non-finite")
        g = None
        if grad:
            if total.requires_grad:
                total.backward()
            g = self.params.flat_grad()
            if self.precondition is not None:
                g = self.precondition(g)
            if not bool(torch.isfinite(g).all()):
                return Evaluation(loss, mloss, overlap, False, "non-finite")
        return Evaluation(loss, mloss, overlap, True, None, g)


def overlap_fraction(transform: Transform, fixed_grid, fixed_mask: Tensor | None,
                     moving: Image, moving_mask: Image | None, max_points: int = 32768) -> float:
    """Fraction of (masked) fixed voxels, on a coarse copy of the grid, that `transform` maps
    inside the moving image and its mask."""
    from itreg.warp import resample, sample

    factor = max(1, math.ceil((fixed_grid.numel / max_points) ** (1.0 / fixed_grid.ndim)))
    grid = fixed_grid.shrink(factor)
    dtype = moving.dtype
    points = grid.points(dtype=dtype, device=moving.device)
    if fixed_mask is not None:
        mimg = Image(fixed_mask.to(dtype), fixed_grid, is_label=False)
        m = resample(mimg, None, grid, mode="nearest").data[0] > 0.5
        if not bool(m.any()):
            m = torch.ones_like(m)
        points = points[m]
    else:
        points = points.reshape(-1, grid.ndim)
    with torch.no_grad():
        mapped = transform(points)
        _, inside = sample(moving, mapped)
        if moving_mask is not None:
            mvals, _ = sample(moving_mask, mapped, mode="nearest")
            inside = inside & (mvals[0] > 0.5)
    return float(inside.float().mean()) if inside.numel() else 0.0

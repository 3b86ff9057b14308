"""Numerical inverses of deformations that have no closed-form inverse.

A displacement-type transform ``T(x) = x + u(x)`` (B-spline FFD, displacement field) is inverted
point by point: for a target ``y`` the solver looks for ``w`` with ``T(w) = y`` by the fixed-point
iteration ``w <- w + (y - T(w))`` (the scheme of ITK's ``InvertDisplacementFieldImageFilter`` and
``IterativeInverseDisplacementFieldImageFilter``), which converges wherever ``u`` is a
contraction (``|grad u| < 1``). A point whose residual grows takes a halved step instead; the
points left over (strong local expansion, where the fixed-point map is no contraction though
the transform is invertible) finish with damped Newton steps on a finite-difference Jacobian.
Points where the transform folds, or beyond the edge of a B-spline's support where its
displacement drops to zero, keep their smallest residual.

:class:`IterativeInverse` wraps this as a :class:`~itreg.transforms.Transform`, so inverses of
every kind compose with :class:`~itreg.transforms.Compose` and sample onto any grid.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from itreg.errors import ConfigError
from itreg.transforms.base import Transform

logger = logging.getLogger(__name__)

#: Points solved at once (bounds the memory of one fixed-point step).
_CHUNK = 2**20

#: Rejected steps after which a point is given up (it has no inverse within reach).
_MAX_REJECTIONS = 10


def invert_points(
    transform: Transform,
    targets: Tensor,
    *,
    max_iterations: int = 200,
    tolerance_mm: float = 1e-4,
    initial: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Solve ``transform(w) = targets`` for ``w`` by damped fixed-point iteration.

    Args:
        transform: a map ``x -> x + u(x)`` with a contractive displacement ``u``.
        targets: ``(..., D)`` world points.
        initial: ``(..., D)`` starting guess (default: the targets themselves).
        max_iterations: most fixed-point steps.
        tolerance_mm: a point stops once ``|transform(w) - target|`` is below this (mm).

    Returns:
        ``w`` ``(..., D)`` (same dtype as `targets`) and the final residual norms ``(...)`` in mm.
        Not differentiable (computed under ``torch.no_grad``).

    Raises:
        ConfigError: `max_iterations` < 1 or `tolerance_mm` not positive.
    """
    if max_iterations < 1:
        raise ConfigError(f"max_iterations must be >= 1, got {max_iterations}")
    if not tolerance_mm > 0:
        raise ConfigError(f"tolerance_mm must be positive, got {tolerance_mm}")
    shape = targets.shape
    flat = targets.detach().reshape(-1, shape[-1])
    if not flat.is_floating_point():
        flat = flat.to(torch.get_default_dtype())
    start_at = flat if initial is None else initial.detach().reshape(flat.shape).to(flat.dtype)
    out = torch.empty_like(flat)
    res = torch.empty(flat.shape[0], dtype=flat.dtype, device=flat.device)
    with torch.no_grad():
        for start in range(0, flat.shape[0], _CHUNK):
            y = flat[start:start + _CHUNK]
            w, r = _solve(transform, y, start_at[start:start + _CHUNK], max_iterations,
                          tolerance_mm)
            out[start:start + _CHUNK] = w
            res[start:start + _CHUNK] = r
    return out.reshape(shape), res.reshape(shape[:-1])


def _solve(transform: Transform, y: Tensor, w0: Tensor, max_iterations: int, tol: float):
    w = w0.clone()
    err = y - transform(w).to(y.dtype)
    norm = err.norm(dim=-1)
    step = torch.ones_like(norm)
    rejections = torch.zeros_like(norm)
    active = (norm > tol).nonzero().squeeze(1)
    for _ in range(max_iterations):
        if active.numel() == 0:
            break
        trial = w[active] + step[active, None] * err[active]
        trial_err = y[active] - transform(trial).to(y.dtype)
        trial_norm = trial_err.norm(dim=-1)
        better = trial_norm < norm[active]
        keep = active[better]
        w[keep] = trial[better]
        err[keep] = trial_err[better]
        norm[keep] = trial_norm[better]
        # Accepted steps grow back towards 1, rejected ones halve; a point rejected
        # _MAX_REJECTIONS times sits where the map has no inverse (a fold, or the edge of a
        # B-spline's support where the displacement drops to zero) and keeps its best residual.
        step[keep] = torch.clamp(step[keep] * 2.0, max=1.0)
        rejected = active[~better]
        step[rejected] = step[rejected] * 0.5
        rejections[rejected] += 1
        active = active[(norm[active] > tol) & (rejections[active] < _MAX_REJECTIONS)]
    # Where the fixed-point map is not a contraction (strong local expansion) but the transform
    # is still invertible, Newton steps with a finite-difference Jacobian converge.
    stuck = (norm > tol).nonzero().squeeze(1)
    if stuck.numel():
        _newton(transform, y, w, err, norm, stuck, max_iterations, tol)
    return w, norm


def _newton(transform: Transform, y: Tensor, w: Tensor, err: Tensor, norm: Tensor,
            active: Tensor, max_iterations: int, tol: float, h: float = 1e-4) -> None:
    """Damped Newton steps ``w += a J(w)^-1 (y - T(w))`` for the points `active`, in place."""
    d = y.shape[-1]
    eye = torch.eye(d, dtype=y.dtype, device=y.device)
    for _ in range(max_iterations):
        if active.numel() == 0:
            return
        wi = w[active]
        base = y[active] - err[active]  # T(wi)
        jac = torch.stack([(transform(wi + h * eye[k]).to(y.dtype) - base) / h
                           for k in range(d)], dim=-1)  # (n, D, D), column k = dT/dx_k
        delta, info = torch.linalg.solve_ex(jac, err[active])
        ok = info == 0
        delta = torch.where(ok[:, None], delta, err[active])
        alpha = torch.ones(active.numel(), dtype=y.dtype, device=y.device)
        improved = torch.zeros(active.numel(), dtype=torch.bool, device=y.device)
        pending = torch.arange(active.numel(), device=y.device)
        for _ in range(6):  # backtracking: 1, 1/2, ..., 1/32
            trial = wi[pending] + alpha[pending, None] * delta[pending]
            trial_err = y[active[pending]] - transform(trial).to(y.dtype)
            trial_norm = trial_err.norm(dim=-1)
            better = trial_norm < norm[active[pending]]
            take = active[pending[better]]
            w[take] = trial[better]
            err[take] = trial_err[better]
            norm[take] = trial_norm[better]
            improved[pending[better]] = True
            pending = pending[~better]
            if pending.numel() == 0:
                break
            alpha[pending] = alpha[pending] * 0.5
        active = active[improved & (norm[active] > tol)]


class IterativeInverse(Transform):
    """The inverse of a displacement-type transform, solved point by point.

    ``IterativeInverse(t)(y)`` is the ``w`` with ``t(w) = y`` (see :func:`invert_points`), to
    within `tolerance_mm` where ``t`` does not fold. The map is evaluated under
    ``torch.no_grad`` (not differentiable); sample it onto a grid with
    ``DisplacementField.from_transform`` to store or export it.

    Args:
        transform: the transform to invert (fixed -> moving); its inverse maps moving -> fixed.
        max_iterations: most fixed-point steps per point.
        tolerance_mm: target residual ``|t(w) - y|`` in mm.
        initial: an approximate inverse that gives each point's starting guess (for example
            ``exp(-v)`` for a velocity field, or the inverse of a sampled proxy field), or None
            to start from the point itself.

    Attributes:
        last_residual_mm: largest residual of the latest evaluation (mm), or None.
    """

    def __init__(self, transform: Transform, max_iterations: int = 200,
                 tolerance_mm: float = 1e-4, initial: Transform | None = None) -> None:
        if not isinstance(transform, Transform):
            raise ConfigError(f"IterativeInverse takes an itreg transform, got "
                              f"{type(transform).__name__}")
        super().__init__(transform.ndim)
        self.transform = transform
        self.initial = initial
        self.max_iterations = int(max_iterations)
        self.tolerance_mm = float(tolerance_mm)
        self.last_residual_mm: float | None = None

    def forward(self, points: Tensor) -> Tensor:
        """Map moving-space world points ``(..., D)`` to fixed-space world points."""
        self._check_points(points)
        start = None
        if self.initial is not None:
            with torch.no_grad():
                start = self.initial(points)
        w, res = invert_points(self.transform, points, max_iterations=self.max_iterations,
                               tolerance_mm=self.tolerance_mm, initial=start)
        self.last_residual_mm = float(res.max()) if res.numel() else 0.0
        missed = int((res > self.tolerance_mm).sum())
        if missed:
            logger.info("iterative inverse of %s: %d of %d points not within %.3g mm (largest "
                        "residual %.3g mm): folds, or points beyond the deformation's support",
                        type(self.transform).__name__, missed, res.numel(), self.tolerance_mm,
                        self.last_residual_mm)
        return w

    def inverse(self) -> Transform:
        """The wrapped transform (exact)."""
        return self.transform

    def extra_repr(self) -> str:
        return f"ndim={self.ndim}, tolerance_mm={self.tolerance_mm}"

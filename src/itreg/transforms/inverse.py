"""Numerical inverses of deformations that have no closed-form inverse.

A displacement-type transform ``T(x) = x + u(x)`` (B-spline FFD, displacement field) is inverted
point by point: for a target ``y`` the solver looks for ``w`` with ``T(w) = y`` by the fixed-point
iteration ``w <- w + (y - T(w))`` (the scheme of ITK's ``InvertDisplacementFieldImageFilter`` and
``IterativeInverseDisplacementFieldImageFilter``), which converges wherever ``u`` is a
contraction (no folding, ``|grad u| < 1``). A point whose residual grows takes a halved step
instead, so a locally stiff field slows the solver down rather than making it diverge.

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


def invert_points(
    transform: Transform,
    targets: Tensor,
    *,
    max_iterations: int = 200,
    tolerance_mm: float = 1e-4,
) -> tuple[Tensor, Tensor]:
    """Solve ``transform(w) = targets`` for ``w`` by damped fixed-point iteration.

    Args:
        transform: a map ``x -> x + u(x)`` with a contractive displacement ``u``.
        targets: ``(..., D)`` world points.
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
    out = torch.empty_like(flat)
    res = torch.empty(flat.shape[0], dtype=flat.dtype, device=flat.device)
    with torch.no_grad():
        for start in range(0, flat.shape[0], _CHUNK):
            y = flat[start:start + _CHUNK]
            w, r = _solve(transform, y, max_iterations, tolerance_mm)
            out[start:start + _CHUNK] = w
            res[start:start + _CHUNK] = r
    return out.reshape(shape), res.reshape(shape[:-1])


def _solve(transform: Transform, y: Tensor, max_iterations: int, tol: float):
    w = y.clone()
    err = y - transform(w).to(y.dtype)
    norm = err.norm(dim=-1)
    step = torch.ones_like(norm)
    for _ in range(max_iterations):
        active = norm > tol
        if not bool(active.any()):
            break
        idx = active.nonzero().squeeze(1)
        trial = w[idx] + step[idx, None] * err[idx]
        trial_err = y[idx] - transform(trial).to(y.dtype)
        trial_norm = trial_err.norm(dim=-1)
        better = trial_norm < norm[idx]
        keep = idx[better]
        w[keep] = trial[better]
        err[keep] = trial_err[better]
        norm[keep] = trial_norm[better]
        # Accepted steps grow back towards 1, rejected ones halve.
        step[keep] = torch.clamp(step[keep] * 2.0, max=1.0)
        rejected = idx[~better]
        step[rejected] = step[rejected] * 0.5
        stalled = step[idx] < 1e-6
        if bool(stalled.all()):
            break
    return w, norm


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

    Attributes:
        last_residual_mm: largest residual of the latest evaluation (mm), or None.
    """

    def __init__(self, transform: Transform, max_iterations: int = 200,
                 tolerance_mm: float = 1e-4) -> None:
        super().__init__(transform.ndim)
        if not isinstance(transform, Transform):
            raise ConfigError(f"IterativeInverse takes an itreg transform, got "
                              f"{type(transform).__name__}")
        self.transform = transform
        self.max_iterations = int(max_iterations)
        self.tolerance_mm = float(tolerance_mm)
        self.last_residual_mm: float | None = None

    def forward(self, points: Tensor) -> Tensor:
        """Map moving-space world points ``(..., D)`` to fixed-space world points."""
        self._check_points(points)
        w, res = invert_points(self.transform, points, max_iterations=self.max_iterations,
                               tolerance_mm=self.tolerance_mm)
        self.last_residual_mm = float(res.max()) if res.numel() else 0.0
        if self.last_residual_mm > 10 * self.tolerance_mm:
            logger.warning("iterative inverse of %s: largest residual %.3g mm (tolerance %.3g "
                           "mm); the transform may fold", type(self.transform).__name__,
                           self.last_residual_mm, self.tolerance_mm)
        return w

    def inverse(self) -> Transform:
        """The wrapped transform (exact)."""
        return self.transform

    def extra_repr(self) -> str:
        return f"ndim={self.ndim}, tolerance_mm={self.tolerance_mm}"

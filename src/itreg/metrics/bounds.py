"""Variational estimators (bounds) of mutual information and KL divergence from critic scores.

A critic ``f(x, y)`` scores pairs. Its values on samples of the joint distribution ``P = p(x, y)``
(aligned voxel pairs) are ``t_joint (N,)``; on samples of the product of marginals
``Q = p(x) p(y)`` (the fixed image's voxels shuffled) they are ``t_marginal (M,)``. Every function
returns a 0-d tensor in **nats**, where **higher means more information** (a lower bound to be
maximised; a metric's loss is its negative). All partition terms use ``torch.logsumexp``:
``log mean exp(t) = logsumexp(t) - log n``. See ``notes/methods.md`` section 6.

- :func:`dv`: Donsker-Varadhan / MINE, ``E_P[f] - log E_Q[e^f]``. Biased upward per batch
  (Jensen); optimum ``f* = log p/q + c`` for any ``c``.
- :func:`dv_ema`: the same value, with MINE's moving-average bias-corrected gradient.
- :func:`nwj`: NWJ / MINE-f, ``E_P[f] - e^{-1} E_Q[e^f]``; unbiased per batch; ``f* = 1 + log p/q``.
- :func:`infonce`: ``log K + mean_i (S_ii - logsumexp_j S_ij)`` on a ``K x K`` score matrix;
  never exceeds ``log K``.
- :func:`js`: the Jensen-Shannon (f-GAN / logistic classifier) objective; not an MI bound.
- :func:`smile`: SMILE, ``E_P[f] - log E_Q[e^{clip(f, -tau, tau)}]``; by default (as the
  authors' code) its gradient is the JS objective's.

Example:
    >>> import torch
    >>> from itreg.metrics.bounds import dv, nwj
    >>> t = torch.zeros(10)
    >>> float(dv(t, t)), float(nwj(t + 1, t + 1))
    (0.0, 0.0)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from itreg.errors import ConfigError

__all__ = [
    "ESTIMATORS",
    "dv",
    "dv_ema",
    "infonce",
    "js",
    "log_mean_exp",
    "nwj",
    "smile",
]

ESTIMATORS = ("dv", "dv-ema", "nwj", "infonce", "smile")
"""The estimator modes of the neural MI metrics (:mod:`itreg.metrics.neural`)."""


def _flat(t: Tensor, name: str) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a tensor of critic scores")
    t = t.reshape(-1)
    if t.numel() == 0:
        raise ValueError(f"{name} is empty: an estimate needs at least one score")
    return t


def log_mean_exp(t: Tensor) -> Tensor:
    """``log(mean(exp(t)))`` over all elements, computed stably with logsumexp (0-d)."""
    t = t.reshape(-1)
    return torch.logsumexp(t, dim=0) - math.log(t.numel())


def dv(t_joint: Tensor, t_marginal: Tensor) -> Tensor:
    """Donsker-Varadhan (MINE) estimate ``mean(t_joint) - log mean exp(t_marginal)`` (nats).

    Args:
        t_joint: critic scores on joint samples ``(N,)`` (any shape, flattened).
        t_marginal: critic scores on product-of-marginal samples ``(M,)``.

    Returns:
        0-d tensor; its gradient is the plain (biased) minibatch DV gradient.
    """
    tj, tm = _flat(t_joint, "t_joint"), _flat(t_marginal, "t_marginal")
    return tj.mean() - log_mean_exp(tm)


def dv_ema(
    t_joint: Tensor,
    t_marginal: Tensor,
    log_running: Tensor | None,
    alpha: float = 0.01,
) -> tuple[Tensor, Tensor]:
    """DV value with MINE's bias-corrected gradient (moving average of the partition term).

    The gradient of DV is ``E_P[grad f] - E_Q[e^f grad f] / E_Q[e^f]``; MINE replaces the
    minibatch denominator by a moving average ``m_t = (1 - alpha) m_{t-1} + alpha mean_Q e^f``
    (detached; ``m_0`` is the first batch's value). The returned tensor has the **value** of
    :func:`dv` and the **gradient** of the surrogate ``mean_P f - mean_Q(e^f) / m_t``. The average
    is kept as ``log m`` for stability.

    Args:
        t_joint: joint scores ``(N,)``.
        t_marginal: product-of-marginal scores ``(M,)``.
        log_running: ``log m_{t-1}`` (0-d) or None for the first call.
        alpha: weight of the new batch in the average, in ``(0, 1]``.

    Returns:
        ``(estimate, log m_t)`` with ``log m_t`` detached.
    """
    if not 0.0 < float(alpha) <= 1.0:
        raise ConfigError(f"the moving-average rate alpha must be in (0, 1], got {alpha}")
    tj, tm = _flat(t_joint, "t_joint"), _flat(t_marginal, "t_marginal")
    lme = log_mean_exp(tm)
    batch = lme.detach()
    if log_running is None:
        log_m = batch
    else:
        prev = log_running.detach().to(batch)
        log_m = torch.logaddexp(prev + math.log1p(-alpha) if alpha < 1 else prev - math.inf,
                                batch + math.log(alpha))
    value = tj.mean() - lme
    surrogate = tj.mean() - torch.exp(lme - log_m)
    return value.detach() + (surrogate - surrogate.detach()), log_m.detach()


def nwj(t_joint: Tensor, t_marginal: Tensor) -> Tensor:
    """NWJ (MINE-f) estimate ``mean(t_joint) - exp(log mean exp(t_marginal) - 1)`` (nats)."""
    tj, tm = _flat(t_joint, "t_joint"), _flat(t_marginal, "t_marginal")
    return tj.mean() - torch.exp(log_mean_exp(tm) - 1.0)


def infonce(scores: Tensor) -> Tensor:
    """InfoNCE estimate on a score matrix ``S (K, K)`` with ``S_ij = f(x_i, y_j)`` (nats).

    ``log K + mean_i (S_ii - logsumexp_j S_ij)``: the diagonal holds the joint pairs and the
    denominator includes ``j = i``. The value is at most ``log K``.
    """
    if not isinstance(scores, Tensor) or scores.dim() != 2 or scores.shape[0] != scores.shape[1]:
        raise ValueError("infonce needs a square score matrix S (K, K)")
    k = scores.shape[0]
    if k < 1:
        raise ValueError("infonce needs at least one pair")
    return math.log(k) + (scores.diagonal() - torch.logsumexp(scores, dim=1)).mean()


def js(t_joint: Tensor, t_marginal: Tensor) -> Tensor:
    """Jensen-Shannon (f-GAN) objective ``E_P[-softplus(-f)] - E_Q[softplus(f)]``.

    Maximised by ``f* = log p/q`` (a logistic classifier of joint vs marginal samples); the
    value itself is not an MI bound.
    """
    tj, tm = _flat(t_joint, "t_joint"), _flat(t_marginal, "t_marginal")
    return (-F.softplus(-tj)).mean() - F.softplus(tm).mean()


def smile(
    t_joint: Tensor, t_marginal: Tensor, tau: float = 5.0, js_gradient: bool = True
) -> Tensor:
    """SMILE estimate ``mean(t_joint) - log mean exp(clip(t_marginal, -tau, tau))`` (nats).

    Args:
        t_joint: joint scores ``(N,)``.
        t_marginal: product-of-marginal scores ``(M,)``.
        tau: clipping threshold (Song & Ermon's usual choice 5; ``inf`` gives DV).
        js_gradient: if True (default, as the authors' code), the returned tensor has the SMILE
            value but the gradient of :func:`js`, a stable objective for the critic; if False
            the gradient is that of the clipped value itself.

    Returns:
        0-d tensor.
    """
    if not float(tau) > 0:
        raise ConfigError(f"the SMILE clipping threshold tau must be positive, got {tau}")
    tj, tm = _flat(t_joint, "t_joint"), _flat(t_marginal, "t_marginal")
    value = tj.mean() - log_mean_exp(torch.clamp(tm, -float(tau), float(tau)))
    if not js_gradient:
        return value
    j = js(tj, tm)
    return j + (value - j).detach()

"""EM updates of the common anatomy of X-CoReg (Luo & Zhuang 2022, Eqs. 12, 14 and 22).

The common anatomy ``Z`` is a categorical field over the common grid ``Omega``: at every voxel
``x`` a probability vector ``gamma_x`` over ``K`` classes (the spatial distribution ``Gamma``),
with class proportions ``pi``. Given the per-image log-likelihoods
``log f_jk(u_{x,j})`` of the warped intensities, the E-step (Eq. 12) is

    gamma_{x,k}  ∝  pi_k prod_j f_jk(u_{x,j}),

computed in log space as ``softmax_k(sum_j w_j log f_jk + log pi_k)`` and then clamped to
``[eps, 1 - (K - 1) eps]`` without renormalising, as the authors' released code does (methods
notes, section 3, "E-step"). The proportions are the mean posterior over the overlap region
``Omega^phi`` (Eq. 14). The initial state is ``pi = 1/K`` and ``gamma_x = softmax(g_x)`` with
``g ~ N(0, 1)`` (Eq. 22), drawn from a ``torch.Generator`` so runs are reproducible.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from itreg.errors import ConfigError

#: Lower clamp of the posterior (the released code's 1e-3).
POSTERIOR_EPS = 1e-3
#: Floor of a likelihood before its logarithm (the released code's 1e-8).
LIKELIHOOD_FLOOR = 1e-8

__all__ = [
    "LIKELIHOOD_FLOOR",
    "POSTERIOR_EPS",
    "check_classes",
    "e_step",
    "entropy_of_rows",
    "init_common_space",
    "kmeans",
    "log_mixture_likelihood",
    "update_proportions",
]


def check_classes(k: int) -> int:
    """Validate the number of classes ``K``: an integer of at least 2.

    Raises:
        ConfigError: `k` is not an integer or is below 2.
    """
    if isinstance(k, bool) or not isinstance(k, (int, float)) or float(k) != int(k):
        raise ConfigError(f"the number of classes must be an integer >= 2, got {k!r}")
    if int(k) < 2:
        raise ConfigError(f"the number of classes must be at least 2, got {int(k)}")
    return int(k)


def init_common_space(points: int, k: int, generator: torch.Generator | None = None,
                      dtype: torch.dtype = torch.float32, device=None) -> tuple[Tensor, Tensor]:
    """Initial spatial distribution and proportions (Eq. 22).

    Args:
        points: number of voxels ``|Omega|``.
        k: number of classes ``K``.
        generator: CPU generator of the Gaussian draws ``g`` (drawn on CPU, then moved, so
            the start does not depend on the device).
        dtype: floating dtype of the results.
        device: device of the results.

    Returns:
        ``gamma (P, K)`` with rows ``softmax(g_x)``, and ``pi (K,)`` equal to ``1/K``.
    """
    k = check_classes(k)
    g = torch.randn((int(points), k), generator=generator, dtype=torch.float64)
    gamma = torch.softmax(g, dim=1).to(dtype=dtype, device=device)
    pi = torch.full((k,), 1.0 / k, dtype=dtype, device=device)
    return gamma, pi


def e_step(log_likelihood: Tensor, pi: Tensor, eps: float = POSTERIOR_EPS) -> Tensor:
    """Posterior of the common anatomy (Eq. 12) in log space, clamped.

    Args:
        log_likelihood: ``(P, K)`` summed log-likelihoods ``sum_j w_j log f_jk(u_{x,j})``.
        pi: ``(K,)`` class proportions (positive).
        eps: clamp of the posterior to ``[eps, 1 - (K - 1) eps]`` (0 disables it); the rows
            are not renormalised afterwards, as in the authors' code.

    Returns:
        ``gamma (P, K)``, rows summing to 1 before the clamp.
    """
    k = log_likelihood.shape[-1]
    log_pi = torch.log(pi.clamp_min(torch.finfo(pi.dtype).tiny)).to(log_likelihood.dtype)
    gamma = torch.softmax(log_likelihood + log_pi, dim=-1)
    if eps > 0:
        gamma = gamma.clamp(eps, 1.0 - (k - 1) * eps)
    return gamma


def update_proportions(gamma: Tensor, mask: Tensor | None = None) -> Tensor:
    """Class proportions from the posterior over the overlap (Eq. 14).

    Args:
        gamma: ``(P, K)`` posterior.
        mask: ``(P,)`` bool, the overlap region ``Omega^phi`` (None: all voxels).

    Returns:
        ``pi (K,)``: ``sum_{x in mask} gamma_x / sum_{x in mask} sum_k gamma_{x,k}``.
    """
    sel = gamma if mask is None else gamma[mask]
    total = sel.sum(dim=0)
    s = total.sum()
    if not bool(s > 0):
        k = gamma.shape[-1]
        return torch.full((k,), 1.0 / k, dtype=gamma.dtype, device=gamma.device)
    return total / s


def log_mixture_likelihood(log_likelihood: Tensor, pi: Tensor) -> Tensor:
    """Per-voxel log-likelihood ``ln sum_k pi_k prod_j f_jk`` (the summand of Eq. 23), ``(P,)``."""
    log_pi = torch.log(pi.clamp_min(torch.finfo(pi.dtype).tiny)).to(log_likelihood.dtype)
    return torch.logsumexp(log_likelihood + log_pi, dim=-1)


def entropy_of_rows(gamma: Tensor) -> float:
    """Mean entropy of the posterior rows in nats (``0 ln 0 = 0``), a sharpness diagnostic."""
    g = gamma.clamp_min(0)
    g = g / g.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(g.dtype).tiny)
    h = -(g * torch.log(g.clamp_min(math.ulp(1.0)))).sum(dim=-1)
    return float(h.mean()) if h.numel() else 0.0


def kmeans(x: Tensor, k: int, generator: torch.Generator | None = None,
           iterations: int = 20) -> Tensor:
    """Lloyd's k-means with seeded k-means++ seeding.

    Args:
        x: ``(P, D)`` points.
        k: number of clusters.
        generator: CPU generator of the seeding.
        iterations: Lloyd iterations.

    Returns:
        ``(P,)`` int64 cluster labels in ``[0, k)``.
    """
    p = x.shape[0]
    first = int(torch.randint(p, (1,), generator=generator))
    centers = [x[first]]
    for _ in range(1, k):
        d2 = torch.cdist(x, torch.stack(centers)).pow(2).min(dim=1).values
        prob = (d2 / d2.sum().clamp_min(1e-12)).cpu().to(torch.float64)
        if not bool(prob.sum() > 0):
            prob = torch.full((p,), 1.0 / p, dtype=torch.float64)
        centers.append(x[int(torch.multinomial(prob, 1, generator=generator))])
    c = torch.stack(centers)
    labels = torch.cdist(x, c).argmin(dim=1)
    for _ in range(iterations):
        for j in range(k):
            sel = labels == j
            if bool(sel.any()):
                c[j] = x[sel].mean(dim=0)
        new = torch.cdist(x, c).argmin(dim=1)
        if bool((new == labels).all()):
            break
        labels = new
    return labels

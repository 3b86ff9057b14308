"""MvMM: the multivariate mixture model of Zhuang (2019), the X-metric paper's baseline.

Paper 002 (Luo & Zhuang 2022) compares X-CoReg with MvMM (Zhuang, "Multivariate mixture model
for myocardial segmentation combining multi-source images", TPAMI 2019), "optimised by
generalised EM plus ICM". The model shares X-CoReg's latent common anatomy ``Z`` with ``K``
classes, but describes each image's appearance in class ``k`` parametrically, by a mixture of
``C`` Gaussians, and puts a Potts Markov random field on the labels:

    p(u_x | Z_x = k) = prod_j sum_c tau_jkc N(u_{x,j}; m_jkc, s_jkc^2)   (independent given k)
    p(Z_x = k | Z_N(x)) ∝ pi_k exp(beta * #{y in N(x): Z_y = k})              (Potts prior)

One step of the generalised EM (run by the loop's :meth:`MvMM.update` under ``no_grad``):

1. ICM labels: each voxel's current label is the arg-max of its posterior ``Gamma``; the
   spatial prior of a voxel counts its 2D-4 / 3D-6 neighbours' labels (iterated conditional
   modes with the neighbours held at their modes);
2. E-step: ``Gamma ∝ prior * prod_j p_j(u_{x,j} | k)`` on every overlap voxel;
3. M-step: the Gaussians of every image and class from ``Gamma`` and the component
   responsibilities (closed form, variances floored at ``(1e-3 range)^2``), ``pi`` as the mean
   posterior;

and the transform step (:meth:`MvMM.evaluate`) descends the negative expected complete-data
log-likelihood ``-mean_x sum_k gamma_{x,k} sum_j w_j log p_j(u_{x,j} | k)`` at the loop's
sample (the generalised EM's M-step for the transforms: ``Gamma`` is held). The reported
quantity is the mean log-likelihood ``mean_x log sum_k prior_{x,k} prod_j p_j(u_{x,j} | k)``.

Where this differs from Zhuang (2019): there is no probabilistic atlas (MvMM's segmentation
prior; our phantoms have none, and X-CoReg uses none), so the prior is ``pi`` times the Potts
term; the classes start from seeded k-means++ on the intensity vectors (as :class:`~itreg.
groupwise.baselines.GMM` and X-CoReg's ``init="kmeans"``), and the Gaussians of a class start
at its k-means members' mean, spread by ``+-0.5`` standard deviations over ``C`` components.
The authors' MvMM code is not in the X-metric release, so nothing here is checked against it.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from itreg.errors import ConfigError
from itreg.grid import Grid
from itreg.groupwise.base import GroupObjective, register_group_metric
from itreg.groupwise.em import POSTERIOR_EPS, check_classes, kmeans

__all__ = ["MvMM", "gaussian_mixture_log_density", "potts_neighbour_counts"]

#: Variance floor, as a fraction of each image's intensity range (squared).
VARIANCE_FLOOR = 1e-3


def gaussian_mixture_log_density(u: Tensor, tau: Tensor, mean: Tensor, var: Tensor) -> Tensor:
    """``log sum_c tau_kc N(u; m_kc, v_kc)`` for every class ``k``.

    Args:
        u: ``(P,)`` intensities of one image.
        tau: ``(K, C)`` component weights (rows sum to 1).
        mean: ``(K, C)`` means.
        var: ``(K, C)`` variances (positive).

    Returns:
        ``(P, K)`` log densities.
    """
    return torch.logsumexp(_component_log_terms(u, tau, mean, var), dim=-1)


def _component_log_terms(u: Tensor, tau: Tensor, mean: Tensor, var: Tensor) -> Tensor:
    """``(P, K, C)``: ``log tau_kc + log N(u; m_kc, v_kc)``, the summands of
    :func:`gaussian_mixture_log_density` (their softmax over ``C`` is the responsibilities)."""
    d = u[:, None, None] - mean[None]
    log_n = -0.5 * (d * d / var + torch.log(2 * math.pi * var))
    return log_n + torch.log(tau.clamp_min(1e-30))


def potts_neighbour_counts(labels: Tensor, k: int, valid: Tensor | None = None) -> Tensor:
    """For every voxel and class, how many of its face neighbours carry that label.

    Args:
        labels: ``grid.shape`` int64 labels (2D or 3D).
        k: number of classes.
        valid: optional ``grid.shape`` bool: only neighbours where it is True count.

    Returns:
        ``(P, K)`` float64 counts, flattened in the grid's order.
    """
    one_hot = torch.nn.functional.one_hot(labels, k).to(torch.float64)  # (*shape, K)
    if valid is not None:
        one_hot = one_hot * valid[..., None].to(one_hot.dtype)
    counts = torch.zeros_like(one_hot)
    for axis in range(labels.ndim):
        n = labels.shape[axis]
        if n < 2:
            continue
        lead = one_hot.narrow(axis, 1, n - 1)  # neighbour at +1
        lag = one_hot.narrow(axis, 0, n - 1)  # neighbour at -1
        counts.narrow(axis, 0, n - 1).add_(lead)
        counts.narrow(axis, 1, n - 1).add_(lag)
    return counts.reshape(-1, k)


class MvMM(GroupObjective):
    """Zhuang's multivariate mixture model: per-image class-conditional Gaussian mixtures, a
    Potts prior by ICM, generalised EM (see the module docstring).

    Args:
        k: number of classes ``K`` (>= 2).
        components: Gaussians per class and image ``C`` (>= 1).
        beta: Potts weight per agreeing neighbour (0: no spatial prior, then MvMM is a
            mixture with independent voxels).
        sample_rate: fraction of the overlap used for each transform step (the loop's sample).
        eps: posterior clamp, as X-CoReg's E-step (then renormalised).
    """

    name = "mvmm"
    quantity_name = "mean log-likelihood"
    needs_all_voxels = True

    def __init__(self, k: int = 4, components: int = 2, beta: float = 0.5,
                 sample_rate: float = 0.1, eps: float = POSTERIOR_EPS) -> None:
        super().__init__(sample_rate)
        self.k = check_classes(k)
        if isinstance(components, bool) or int(components) != components or components < 1:
            raise ConfigError(f"components must be an integer >= 1, got {components!r}")
        self.components = int(components)
        beta = float(beta)
        if not math.isfinite(beta) or beta < 0:
            raise ConfigError(f"beta must be a finite number >= 0, got {beta!r}")
        self.beta = beta
        self.eps = float(eps)
        self._reset_state()

    def _reset_state(self) -> None:
        self.gamma: Tensor | None = None  # (P, K) over the level grid
        self.pi: Tensor | None = None
        self.params: tuple[Tensor, Tensor, Tensor] | None = None  # (N, K, C) each
        self.prior: Tensor | None = None  # (P, K) log prior of the last update
        self.last_log_likelihood = float("nan")

    def reset(self, n_images, reference, generator, dtype, device) -> None:
        super().reset(n_images, reference, generator, dtype, device)
        self._reset_state()
        self.grid = None

    def start_level(self, grid: Grid) -> None:
        """A new common grid: the labels restart from the mixture (``Gamma`` is recomputed by
        the next :meth:`update` from the Gaussians, which carry over between levels)."""
        if self.grid is not None and not grid.same_as(self.grid):
            self.gamma = None
            self.prior = None
        self.grid = grid

    def _terms(self, values: Tensor) -> list[Tensor]:
        """Per image, the ``(P, K, C)`` component log terms under the current Gaussians."""
        return [_component_log_terms(values[j], *(p[j].to(values.dtype) for p in self.params))
                for j in range(values.shape[0])]

    def _class_log_likelihood(self, values: Tensor, terms: list[Tensor]) -> Tensor:
        w = self.image_weights(values.shape[0], values.dtype, values.device)
        return sum(w[j] * torch.logsumexp(t, dim=-1) for j, t in enumerate(terms))

    def class_log_likelihood(self, values: Tensor) -> Tensor:
        """``(P, K)``: ``sum_j w_j log p_j(u_{x,j} | k)`` under the current Gaussians."""
        return self._class_log_likelihood(values, self._terms(values))

    # ----------------------------------------------------------------------- EM (no grad)
    def _floor(self, values: Tensor) -> Tensor:
        span = (values.amax(dim=1) - values.amin(dim=1)).clamp_min(1e-12)
        return (VARIANCE_FLOOR * span) ** 2  # (N,)

    def _init_params(self, x: Tensor) -> None:
        """Gaussians from seeded k-means++ classes of the intensity vectors ``x`` ``(N, P)``."""
        labels = kmeans(x.T.contiguous(), self.k, self.generator)
        gamma = torch.nn.functional.one_hot(labels, self.k).to(x.dtype)
        self._m_step(x, gamma)

    def _m_step(self, x: Tensor, gamma: Tensor, terms: list[Tensor] | None = None) -> None:
        """Closed-form update of every image's class mixtures from the posterior ``gamma``;
        `terms` (:meth:`_terms` under the current Gaussians) give the component
        responsibilities, None starts the mixtures from `gamma` alone."""
        n, c = x.shape[0], self.components
        floor = self._floor(x)
        nk = gamma.sum(dim=0).clamp_min(1e-12)  # (K,)
        taus, means, variances = [], [], []
        for j in range(n):
            u = x[j]
            if terms is None:
                m = (gamma * u[:, None]).sum(dim=0) / nk
                v = (gamma * (u[:, None] - m) ** 2).sum(dim=0) / nk
                sd = v.clamp_min(floor[j]).sqrt()
                offsets = torch.linspace(-0.5, 0.5, c, dtype=x.dtype, device=x.device) \
                    if c > 1 else torch.zeros(1, dtype=x.dtype, device=x.device)
                mean = m[:, None] + sd[:, None] * offsets[None]
                var = (v.clamp_min(floor[j]) / c)[:, None].expand(-1, c).clone()
                tau = torch.full((self.k, c), 1.0 / c, dtype=x.dtype, device=x.device)
            else:
                r = torch.softmax(terms[j], dim=-1) * gamma[:, :, None]  # (P, K, C)
                nkc = r.sum(dim=0).clamp_min(1e-12)  # (K, C)
                mean = (r * u[:, None, None]).sum(dim=0) / nkc
                var = (r * (u[:, None, None] - mean[None]) ** 2).sum(dim=0) / nkc
                tau = nkc / nkc.sum(dim=1, keepdim=True)
            taus.append(tau)
            means.append(mean)
            variances.append(var.clamp_min(floor[j]))
        self.params = (torch.stack(taus), torch.stack(means), torch.stack(variances))

    def _log_prior(self, overlap: Tensor) -> Tensor:
        """``(P, K)`` log of ``pi_k exp(beta * neighbours with label k)`` (ICM's prior)."""
        log_pi = torch.log(self.pi.clamp_min(1e-30))
        if self.beta == 0 or self.gamma is None:
            return log_pi.expand(overlap.shape[0], -1)
        labels = self.gamma.argmax(dim=1).reshape(self.grid.shape)
        counts = potts_neighbour_counts(labels, self.k, overlap.reshape(self.grid.shape))
        return log_pi + self.beta * counts.to(log_pi.dtype)

    @torch.no_grad()
    def update(self, values: Tensor, overlap: Tensor) -> None:
        """One generalised-EM step on every overlap voxel: ICM prior, E-step, M-step."""
        x = values[:, overlap]
        if x.shape[1] == 0:
            return
        if self.params is None:
            self._init_params(x)
        if self.pi is None:
            self.pi = torch.full((self.k,), 1.0 / self.k, dtype=values.dtype,
                                 device=values.device)
        terms = self._terms(x)  # one Gaussian evaluation serves the E- and the M-step
        ll = self._class_log_likelihood(x, terms)
        prior = self._log_prior(overlap)
        log_post = ll + prior[overlap].to(ll.dtype)
        post = torch.softmax(log_post, dim=1)
        if self.eps > 0:
            post = post.clamp(self.eps, 1.0 - (self.k - 1) * self.eps)
            post = post / post.sum(dim=1, keepdim=True)
        gamma = torch.zeros(values.shape[1], self.k, dtype=values.dtype, device=values.device)
        gamma[overlap] = post
        # Outside the overlap, the class with the largest proportion (for the label map).
        gamma[~overlap] = torch.nn.functional.one_hot(self.pi.argmax(), self.k).to(gamma.dtype)
        self.gamma = gamma
        self.prior = prior
        self.last_log_likelihood = float(torch.logsumexp(log_post, dim=1).mean())
        self._m_step(x, post, terms)
        self.pi = post.mean(dim=0)

    def evaluate(self, values: Tensor, overlap: Tensor,
                 index: Tensor | None = None) -> tuple[Tensor, float]:
        """Negative expected complete-data log-likelihood at the sample, ``Gamma`` held."""
        gamma = self.gamma if index is None else self.gamma[index]
        x = values[:, overlap]
        g = gamma[overlap].to(x.dtype)
        if x.shape[1] == 0:
            zero = values.sum() * 0.0
            return zero, float("nan")
        ll = self.class_log_likelihood(x)  # (S, K), differentiable in x
        q = (g * ll).sum(dim=1).mean()
        prior = self.prior if index is None else self.prior[index]
        total = torch.logsumexp(ll.detach() + prior[overlap].to(ll.dtype), dim=1).mean()
        return -q, float(total)

    def probabilities(self) -> Tensor | None:
        if self.gamma is None:
            return None
        return self.gamma.T.reshape(self.k, *self.grid.shape)

    def posterior(self, values: Tensor, overlap: Tensor) -> Tensor | None:
        if self.params is None or self.pi is None:
            return None
        with torch.no_grad():
            out = torch.zeros(values.shape[1], self.k, dtype=values.dtype, device=values.device)
            ll = self.class_log_likelihood(values[:, overlap])
            out[overlap] = torch.softmax(ll + torch.log(self.pi.clamp_min(1e-30)), dim=1)
        return out

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "k": self.k, "components": self.components,
                "beta": self.beta, "sample_rate": self.sample_rate, "posterior_clamp": self.eps,
                "init": "kmeans++", "prior": "proportions x Potts (ICM), no atlas"}


register_group_metric("mvmm", MvMM)

"""Groupwise baselines of the X-metric paper (Luo & Zhuang 2022, Sec. 4), same loop as X-CoReg.

Every baseline is a :class:`~itreg.groupwise.base.GroupObjective` registered by name, so
:func:`itreg.groupwise.coreg.co_register` optimises it exactly as it optimises the X-metric
(same transforms, pyramid, Adam steps, zero-sum projection). Intensity densities reuse the
shared Parzen code of :mod:`itreg.metrics.histogram` with the X-metric's bin coordinates
(``L`` levels over each image's per-call range, padding 2, cubic B-spline kernel).

- ``vi``: variance of intensities, ``mean_x (1/N) sum_j (u_{x,j} - mean_i u_{x,i})^2`` (the
  authors' code: MSE of each image to the group mean).
- ``ape``: accumulated pairwise estimates, ``-sum_{i<j} MI(U_i, U_j) / ((N - 1) / 2)``;
  ``N (N - 1) / 2`` joint histograms, so ``O(N^2)``.
- ``cte``: conditional template entropy: the template ``T = sum_j v_j z_j`` with ``v`` the top
  eigenvector of the correlation matrix of the z-scored warped images (PCA), and the loss
  ``sum_j H(T | U_j)`` (``direction="code"``, the authors' released code; the default) or
  ``sum_j H(U_j | T)`` (``"paper"``, template held fixed within a step).
- ``congealing``: the sum over voxels of the entropy of the intensity stack, estimated with a
  Gaussian Parzen window over the ``N`` values at each voxel (self term included):
  ``-mean_{x,j} log (1/N) sum_i G_sigma(u_{x,j} - u_{x,i})`` on intensities rescaled to
  ``[0, 1]`` by each image's range; ``O(N^2)`` per voxel, unreliable for small ``N``.
- ``gmm``: maximum likelihood of a ``K``-component multivariate Gaussian mixture over the
  ``N``-vector of intensities; one EM update (no gradient) per step, then the loss
  ``-mean_x log sum_k w_k N(u_x; m_k, S_k)``. Deviation from the released code, which starts
  every component identical (so EM stays symmetric): components start from seeded k-means.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from itreg.errors import ConfigError
from itreg.groupwise.base import GroupObjective, register_group_metric
from itreg.groupwise.em import check_classes, kmeans
from itreg.groupwise.xmetric import PADDING, _check_levels, bin_coordinates
from itreg.metrics.histogram import entropy, joint_histogram, mutual_information_from_joint
from itreg.metrics.intensity import rescale, robust_range

__all__ = ["APE", "CTE", "GMM", "Congealing", "VarianceOfIntensities", "kmeans"]


class VarianceOfIntensities(GroupObjective):
    """Variance of the intensities across the group, averaged over the overlap."""

    name = "vi"
    quantity_name = "variance"

    def evaluate(self, values: Tensor, overlap: Tensor,
                 index: Tensor | None = None) -> tuple[Tensor, float]:
        v = values[:, overlap]
        loss = (v - v.mean(dim=0, keepdim=True)).pow(2).mean()
        return loss, float(loss.detach())


class APE(GroupObjective):
    """Accumulated pairwise mutual information (cubic B-spline Parzen joint histograms).

    Args:
        levels: intensity levels ``L`` per image.
        sample_rate: fraction of the common grid sampled per step.
    """

    name = "ape"
    quantity_name = "sum MI (nats)"

    def __init__(self, levels: int = 64, sample_rate: float = 0.1) -> None:
        super().__init__(sample_rate)
        self.levels = _check_levels(levels)
        self.bins = self.levels + 2 * PADDING

    def evaluate(self, values: Tensor, overlap: Tensor,
                 index: Tensor | None = None) -> tuple[Tensor, float]:
        n = values.shape[0]
        coords = bin_coordinates(values[:, overlap], None, self.levels)
        total = values.new_zeros(())
        for i in range(n):
            for j in range(i + 1, n):
                p = joint_histogram(coords[i], coords[j], self.bins, self.bins,
                                    kernel_x="bspline3", kernel_y="bspline3")
                total = total + mutual_information_from_joint(p)[0]
        return -total / ((n - 1) / 2.0), float(total.detach())

    def quantity(self, loss: float) -> float:
        return -float(loss) * (self.n_images - 1) / 2.0

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "levels": self.levels, "sample_rate": self.sample_rate}


class CTE(GroupObjective):
    """Conditional template entropy with a PCA template.

    Args:
        levels: intensity levels ``L``.
        sample_rate: fraction of the common grid sampled per step.
        direction: ``"code"`` (default) for ``sum_j H(T | U_j)`` as the authors' released code,
            ``"paper"`` for ``sum_j H(U_j | T)`` with the template held fixed within a step.
            Deviation from methods notes 3, resolution 10 (paper by default): on the 2D
            BrainWeb-style groups the paper direction drove gWI from 3.2 mm to 8.5 mm while
            the code direction reached 1.0 mm (benchmarks/groupwise_brainweb.py).
    """

    name = "cte"
    quantity_name = "sum H (nats)"
    DIRECTIONS = ("paper", "code")

    def __init__(self, levels: int = 64, sample_rate: float = 0.1,
                 direction: str = "code") -> None:
        super().__init__(sample_rate)
        self.levels = _check_levels(levels)
        self.bins = self.levels + 2 * PADDING
        if direction not in self.DIRECTIONS:
            raise ConfigError(f"unknown CTE direction {direction!r}; valid directions are: "
                              f"{', '.join(self.DIRECTIONS)}")
        self.direction = direction

    @staticmethod
    def pca_template(values: Tensor) -> Tensor:
        """The PCA template ``T = sum_j v_j z_j`` of intensities ``(N, P)``, ``(P,)``.

        ``v`` is the top eigenvector of the (detached) correlation matrix of the z-scored
        rows, signed so that its entries sum to a non-negative number.
        """
        z = (values - values.mean(dim=1, keepdim=True)) / values.std(dim=1, keepdim=True
                                                                   ).clamp_min(1e-8)
        with torch.no_grad():
            zd = z.detach().to(torch.float64)
            corr = zd @ zd.T / max(zd.shape[1] - 1, 1)
            _, vecs = torch.linalg.eigh(corr)
            v = vecs[:, -1]
            v = v if float(v.sum()) >= 0 else -v
        return (v.to(z.dtype)[:, None] * z).sum(dim=0)

    def evaluate(self, values: Tensor, overlap: Tensor,
                 index: Tensor | None = None) -> tuple[Tensor, float]:
        v = values[:, overlap]
        t = self.pca_template(v)
        if self.direction == "paper":
            t = t.detach()
        coords = bin_coordinates(torch.cat([v, t[None]]), None, self.levels)
        ct = coords[-1]
        total = values.new_zeros(())
        for j in range(v.shape[0]):
            p = joint_histogram(coords[j], ct, self.bins, self.bins,
                                kernel_x="bspline3", kernel_y="bspline3")
            h_joint = entropy(p)
            # paper: H(U_j | T) = H(U_j, T) - H(T); code: H(T | U_j) = H(U_j, T) - H(U_j)
            marginal = p.sum(dim=0) if self.direction == "paper" else p.sum(dim=1)
            total = total + h_joint - entropy(marginal)
        return total, float(total.detach())

    def template(self, values: Tensor, overlap: Tensor) -> Tensor:
        out = torch.zeros(values.shape[1], dtype=values.dtype, device=values.device)
        out[overlap] = self.pca_template(values[:, overlap])
        return out

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "levels": self.levels, "sample_rate": self.sample_rate,
                "direction": self.direction}


class Congealing(GroupObjective):
    """Sum of voxel-stack entropies with a Gaussian Parzen window (congealing).

    Args:
        sigma: Parzen standard deviation on intensities rescaled to ``[0, 1]``.
        sample_rate: fraction of the common grid sampled per step.
    """

    name = "congealing"
    quantity_name = "stack entropy (nats)"

    def __init__(self, sigma: float = 0.05, sample_rate: float = 0.1) -> None:
        super().__init__(sample_rate)
        if not (float(sigma) > 0 and math.isfinite(float(sigma))):
            raise ConfigError(f"congealing sigma must be positive, got {sigma!r}")
        self.sigma = float(sigma)

    def evaluate(self, values: Tensor, overlap: Tensor,
                 index: Tensor | None = None) -> tuple[Tensor, float]:
        v = values[:, overlap]
        rows = []
        for j in range(v.shape[0]):
            lo, hi = robust_range(v[j])
            rows.append(rescale(v[j], lo, hi))
        u = torch.stack(rows)  # (N, P) in [0, 1]
        diff = (u[:, None, :] - u[None, :, :]) / self.sigma  # (N, N, P)
        log_kernel = -0.5 * diff.pow(2) - math.log(self.sigma * math.sqrt(2.0 * math.pi))
        log_p = torch.logsumexp(log_kernel, dim=1) - math.log(u.shape[0])  # (N, P)
        loss = -log_p.mean()
        return loss, float(loss.detach())

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "sigma": self.sigma, "sample_rate": self.sample_rate}


class GMM(GroupObjective):
    """Maximum likelihood of a multivariate Gaussian mixture over the intensity vectors.

    Args:
        k: number of components ``K``.
        sample_rate: fraction of the common grid sampled per step.
        reg: ridge added to every covariance (in squared intensity units).
    """

    name = "gmm"
    quantity_name = "mean log-likelihood"

    def __init__(self, k: int = 4, sample_rate: float = 0.1, reg: float = 1e-3) -> None:
        super().__init__(sample_rate)
        self.k = check_classes(k)
        self.reg = float(reg)
        self.params: tuple[Tensor, Tensor, Tensor] | None = None

    def reset(self, n_images, reference, generator, dtype, device) -> None:
        super().reset(n_images, reference, generator, dtype, device)
        self.params = None

    def _log_components(self, x: Tensor) -> Tensor:
        """``log w_k N(x; m_k, S_k)``, ``(P, K)``, for points ``(P, N)``."""
        w, m, s = self.params
        n = x.shape[1]
        chol = torch.linalg.cholesky(s)  # (K, N, N)
        diff = (x[None, :, :] - m[:, None, :]).transpose(1, 2)  # (K, N, P)
        sol = torch.linalg.solve_triangular(chol, diff, upper=False)  # (K, N, P)
        maha = sol.pow(2).sum(dim=1)  # (K, P)
        logdet = 2.0 * torch.log(torch.diagonal(chol, dim1=1, dim2=2)).sum(dim=1)  # (K,)
        out = torch.log(w)[:, None] - 0.5 * (maha + logdet[:, None] + n * math.log(2 * math.pi))
        return out.T

    def _m_step(self, x: Tensor, resp: Tensor) -> None:
        nk = resp.sum(dim=0).clamp_min(1e-8)  # (K,)
        m = (resp.T @ x) / nk[:, None]
        diff = x[None] - m[:, None]  # (K, P, N)
        s = torch.einsum("kp,kpi,kpj->kij", resp.T, diff, diff) / nk[:, None, None]
        s = s + self.reg * torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
        self.params = (nk / nk.sum(), m, s)

    def evaluate(self, values: Tensor, overlap: Tensor,
                 index: Tensor | None = None) -> tuple[Tensor, float]:
        x = values[:, overlap].T  # (P, N)
        with torch.no_grad():
            xd = x.detach()
            if self.params is None:
                labels = kmeans(xd, self.k, self.generator)
                resp = torch.nn.functional.one_hot(labels, self.k).to(xd.dtype)
            else:
                resp = torch.softmax(self._log_components(xd), dim=1)
            self._m_step(xd, resp)
        ll = torch.logsumexp(self._log_components(x), dim=1).mean()
        return -ll, float(ll.detach())

    def quantity(self, loss: float) -> float:
        return -float(loss)

    def posterior(self, values: Tensor, overlap: Tensor) -> Tensor | None:
        if self.params is None:
            return None
        with torch.no_grad():
            out = torch.zeros(values.shape[1], self.k, dtype=values.dtype, device=values.device)
            out[overlap] = torch.softmax(self._log_components(values[:, overlap].T), dim=1)
        return out

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "k": self.k, "sample_rate": self.sample_rate,
                "covariance_ridge": self.reg, "init": "kmeans++"}


register_group_metric("vi", VarianceOfIntensities)
register_group_metric("ape", APE)
register_group_metric("cte", CTE)
register_group_metric("congealing", Congealing)
register_group_metric("gmm", GMM)

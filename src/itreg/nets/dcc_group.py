"""The group pieces of deep combined computing (paper 002, sec. 3.5), shared by training
(:mod:`itreg.train.dcc`) and application (:mod:`itreg.nets.dcc_apply`) of
:class:`~itreg.nets.dcc.DCCNet`: :func:`world_displacements` (the network's index-axis fields
as world-mm displacements), :func:`warp_group` (intensities and probability maps through
``phi_j``), :func:`distance_probabilities` (``rho_jk ∝ exp(tau D_jk)`` from signed distance
maps, Eq. 38), :func:`clip_probabilities` (the paper's ``[zeta, 1 - (K-1) zeta]`` clip) and
:func:`common_anatomy` (``Z^[2]``: the posterior of Eq. 40 from the appearance model of Eq. 39,
then one EM update with Eq. 20).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from itreg.errors import ConfigError, GeometryError
from itreg.grid import Grid
from itreg.groupwise.base import sample_mask
from itreg.groupwise.em import POSTERIOR_EPS, e_step, update_proportions
from itreg.groupwise.xmetric import (
    PADDING,
    appearance_model,
    bin_coordinates,
    class_log_likelihood,
)
from itreg.image import Image
from itreg.transforms.dense import integrate_velocity

#: Field types the registration decoder predicts.
FLOWS = ("displacement", "svf")

__all__ = [
    "FLOWS",
    "clip_probabilities",
    "common_anatomy",
    "distance_probabilities",
    "image_ranges",
    "warp_group",
    "world_displacements",
]


def world_displacements(field: Tensor, grid: Grid, flow: str = "displacement",
                        steps: int = 7) -> Tensor:
    """The network's fields as world-mm displacements ``d_j`` on `grid`.

    Args:
        field: ``(..., D, *grid.shape)`` displacement or velocity in mm along the grid's index
            axes (component x first), as :class:`DCCNet` predicts it.
        grid: the common grid the fields live on.
        flow: ``"displacement"`` or ``"svf"``.
        steps: squarings of an SVF (``exp(v)`` by
            :func:`itreg.transforms.dense.integrate_velocity`).

    Returns:
        ``(..., D, *grid.shape)`` world-mm (LPS) displacements: ``phi_j(x) = x + d_j(x)``.
    """
    d = grid.ndim
    if field.dim() < d + 1 or tuple(field.shape[-d - 1:]) != (d, *grid.shape):
        raise GeometryError(f"field {tuple(field.shape)} does not match (..., D, *grid.shape) = "
                            f"(..., {d}, {grid.shape})")
    if flow not in FLOWS:
        raise ConfigError(f"unknown DCC flow {flow!r}; valid: {', '.join(FLOWS)}")
    rot = torch.as_tensor(grid.direction_matrix(), dtype=field.dtype, device=field.device)
    lead = field.shape[:-d - 1]
    flat = field.reshape(-1, d, *grid.shape)
    world = torch.einsum("ij,bj...->bi...", rot, flat)
    if flow == "svf":
        world = torch.stack([integrate_velocity(v, grid, int(steps)) for v in world])
    return world.reshape(*lead, d, *grid.shape)


def warp_group(values: Tensor, displacements: Tensor, grid: Grid,
               image_grids: Sequence[Grid] | None = None) -> tuple[Tensor, Tensor]:
    """Sample each image's channels through ``phi_j(x) = x + d_j(x)`` on the common grid.

    Args:
        values: ``(N, C, *S)`` channels of each image (intensity, probability maps) on its
            grid (`image_grids`, default: `grid`).
        displacements: ``(N, D, *grid.shape)`` world-mm displacements.
        grid: the common grid.
        image_grids: each image's grid when they differ from `grid`.

    Returns:
        ``warped (N, C, *grid.shape)`` (zero outside an image) and ``inside (N, *grid.shape)``
        bool (``phi_j(x)`` inside image ``j``). Differentiable with respect to `values` and
        `displacements` (linear interpolation, :func:`itreg.warp.sample`).
    """
    from itreg.warp import sample

    n = values.shape[0]
    if displacements.shape[0] != n:
        raise GeometryError(f"{displacements.shape[0]} displacements for {n} images")
    grids = list(image_grids) if image_grids is not None else [grid] * n
    base = grid.points(dtype=displacements.dtype, device=displacements.device)
    out, inside = [], []
    for j in range(n):
        pts = base + torch.movedim(displacements[j], 0, -1)
        v, ins = sample(Image(values[j], grids[j], is_label=False), pts, mode="linear")
        out.append(v)
        inside.append(ins)
    return torch.stack(out), torch.stack(inside)


def clip_probabilities(p: Tensor, zeta: float, dim: int = 0) -> Tensor:
    """Clip class probabilities to ``[zeta, 1 - (K - 1) zeta]`` and renormalise (paper 002,
    sec. 4.4: ``zeta = 0.05`` in training, 0.01 at test; 0 only renormalises)."""
    k = p.shape[dim]
    if not 0.0 <= float(zeta) < 1.0 / k:
        raise ConfigError(f"zeta must be in [0, 1/K) = [0, {1.0 / k:.3g}), got {zeta}")
    q = p.clamp(float(zeta), 1.0 - (k - 1) * float(zeta)) if zeta > 0 else p
    return q / q.sum(dim=dim, keepdim=True).clamp_min(torch.finfo(q.dtype).tiny)


def distance_probabilities(labels: Tensor, grid: Grid, classes: int, tau: float = 1.0,
                           limit: float = 50.0) -> Tensor:
    """Label model of Eq. 38: ``rho_k ∝ exp(tau D_k)`` from signed distance maps.

    ``D_k`` is the signed Euclidean distance (world mm, through the grid's spacing) to the
    boundary of label ``k``: positive inside, negative outside (a label that is absent
    everywhere gets ``-limit / tau``). ``tau * D`` is clipped to ``[-limit, limit]`` (authors'
    code: 50) before the softmax over the classes.

    Args:
        labels: ``grid.shape`` (or ``(1, *grid.shape)``) integer labels ``0..classes-1``.
        grid: the labels' grid.
        classes: ``K``.
        tau: slope, per mm.
        limit: clip of ``tau * D``.

    Returns:
        ``(K, *grid.shape)`` probabilities (float32 on the labels' device).
    """
    from scipy import ndimage

    lab = labels.reshape(grid.shape)
    if lab.is_floating_point():
        lab = torch.round(lab)
    arr = lab.detach().cpu().long().numpy()
    if arr.min() < 0 or arr.max() >= classes:
        raise ConfigError(f"labels must lie in 0..{classes - 1}, found {arr.min()}..{arr.max()}")
    sampling = tuple(reversed(grid.spacing))
    maps = []
    for k in range(int(classes)):
        m = arr == k
        if not m.any():
            maps.append(np.full(arr.shape, -limit / tau))
        elif m.all():
            maps.append(np.full(arr.shape, limit / tau))
        else:
            inside = ndimage.distance_transform_edt(m, sampling=sampling)
            outside = ndimage.distance_transform_edt(~m, sampling=sampling)
            maps.append(inside - outside)
    dist = torch.as_tensor(np.stack(maps), dtype=torch.float32, device=labels.device)
    return torch.softmax((tau * dist).clamp(-limit, limit), dim=0)


def image_ranges(values: Sequence[Tensor]) -> list[tuple[float, float]]:
    """Each image's intensity range (min, max of its own voxels, detached): the range of its
    appearance model's bins, shared by its own-grid and warped intensities."""
    out = []
    for v in values:
        v = v.detach()
        lo, hi = float(v.min()), float(v.max())
        if not hi > lo:
            from itreg.errors import InvalidImageError

            raise InvalidImageError("an image of the group is constant; nothing to register")
        out.append((lo, hi))
    return out


@torch.no_grad()
def common_anatomy(own_values: Sequence[Tensor], own_probabilities: Sequence[Tensor],
                   warped_values: Tensor, overlap: Tensor, priors: Tensor | None = None,
                   levels: int = 32, sample_rate: float = 0.1,
                   generator: torch.Generator | None = None, eps: float = POSTERIOR_EPS,
                   em_updates: int = 1) -> tuple[Tensor, Tensor]:
    """The common anatomy ``Z^[2]`` of the extended framework (Eqs. 39, 40, 12, 14, 20).

    1. ``t = 0`` (Eq. 39): ``f^[0]_jk(mu) ∝ sum_{w in Omega_j} B3((U_j(w) - mu)/h) rho_jk(w)``
       over image ``j``'s own voxels, with ``rho_j`` the label model for ``j`` in ``J`` and the
       network's ``rho_hat_j`` otherwise (`own_probabilities`).
    2. Posterior (Eq. 40): ``q_xk ∝ pi_k prod_{j in J} rho_jk(phi_j(x)) prod_j f_jk(u_xj)``
       (`priors` holds the warped ``rho_j(phi_j(x))`` of the images in ``J``), with
       ``pi = 1/K``, clamped as the E-step of :func:`itreg.groupwise.em.e_step`; ``pi`` by
       Eq. 14. This is ``Z^[1]``.
    3. `em_updates` EM updates (default 1, giving ``Z^[2]``): ``f_jk`` from the warped
       intensities and the previous posterior on a Bernoulli sample of the overlap (Eq. 20),
       the posterior of Eq. 40 again, ``pi`` by Eq. 14.

    Everything is detached (``Z^[2]`` is treated as given by the losses, as in X-CoReg).

    Args:
        own_values: N tensors of each image's intensities on its own grid (any shape).
        own_probabilities: N tensors ``(K, *shape_j)``: ``rho_j`` or ``rho_hat_j`` there.
        warped_values: ``(N, P)`` intensities ``u_xj`` at the common points.
        overlap: ``(P,)`` bool, the overlap ``Omega^phi`` (must not be empty).
        priors: ``(M, K, P)`` warped label-model probabilities of the images in ``J`` (already
            clipped), or None (``J`` empty).
        levels: ``L`` intensity levels of the appearance model.
        sample_rate: Bernoulli rate of Eq. 20's sample.
        generator: CPU generator of the sample.
        eps: posterior clamp.
        em_updates: EM updates after ``t = 0``.

    Returns:
        ``(gamma (P_overlap, K), pi (K,))`` at the overlap points.
    """
    n = warped_values.shape[0]
    if len(own_values) != n or len(own_probabilities) != n:
        raise ConfigError("common_anatomy needs one own-grid image and probability map per "
                          "warped image")
    if int(overlap.sum()) == 0:
        raise GeometryError("the warped images do not overlap anywhere on the common grid")
    bins = int(levels) + 2 * PADDING
    ranges = image_ranges(own_values)
    f0 = []
    for j in range(n):
        k = own_probabilities[j].shape[0]
        coords = bin_coordinates(own_values[j].reshape(1, -1), None, levels, ranges=ranges[j:j + 1])
        f0.append(appearance_model(coords, own_probabilities[j].reshape(k, -1).T, bins)[0])
    f = torch.stack(f0)
    coords = bin_coordinates(warped_values[:, overlap], None, levels, ranges=ranges)
    log_prior = 0.0
    if priors is not None and priors.shape[0] > 0:
        log_prior = torch.log(priors[:, :, overlap].clamp_min(1e-12)).sum(dim=0).T  # (P, K)
    k = f.shape[1]
    pi = torch.full((k,), 1.0 / k, dtype=coords.dtype, device=coords.device)
    gamma = e_step(class_log_likelihood(coords, f) + log_prior, pi, eps)
    pi = update_proportions(gamma)
    for _ in range(int(em_updates)):
        sample = sample_mask(torch.ones(coords.shape[1], dtype=torch.bool, device=coords.device),
                             sample_rate, generator)
        f = appearance_model(coords[:, sample], gamma[sample], bins)
        gamma = e_step(class_log_likelihood(coords, f) + log_prior, pi, eps)
        pi = update_proportions(gamma)
    return gamma, pi

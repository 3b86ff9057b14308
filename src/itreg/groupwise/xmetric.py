"""The X-metric (Luo & Zhuang 2022, Eq. 8) with its kernel-density appearance model.

For ``N`` warped images ``U_j o phi_j`` and the latent common anatomy ``Z`` with spatial
distribution ``Gamma`` (``(P, K)`` class probabilities over the common-space points),

    X(U[phi], Z) = sum_j I(U_j o phi_j, Z)                                        (Eq. 8)

where each ``I`` is the mutual information (Eq. 17) of the joint table

    p_j(mu, k) ∝ sum_{x in Omega_S} B3((u_{x,j} - mu) / h) gamma_{x,k}            (Eq. 21)

and the appearance model that drives the E-step is the same table normalised per class,

    f_jk(mu) ∝ sum_{x in Omega_S} B3((u_{x,j} - mu) / h) gamma_{x,k}               (Eq. 20).

``B3`` is the cubic B-spline, the bandwidth ``h`` is one bin, there are ``L`` intensity levels
over the per-call ``[min, max]`` of each image's intensities in the overlap (detached), padded
by 2 bins per side, and ``Omega_S`` is a fresh seeded Bernoulli sample of the overlap. Every
table is one :func:`itreg.metrics.histogram.parzen_histogram` call per image (scatter-add over
the 4 kernel taps with the ``(P, K)`` class weights), so the cost is ``O(N P K)``: linear in
the number of images. Intensities enter only through their bin coordinates, so gradients reach
the transforms through the fractional bin positions (the derivative of the kernel).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from itreg.errors import ConfigError, GeometryError
from itreg.grid import Grid
from itreg.groupwise.base import GroupObjective, register_group_metric, sample_mask
from itreg.groupwise.em import (
    LIKELIHOOD_FLOOR,
    POSTERIOR_EPS,
    check_classes,
    e_step,
    init_common_space,
    kmeans,
    update_proportions,
)
from itreg.image import Image
from itreg.metrics.histogram import (
    mutual_information_from_joint,
    parzen_histogram,
    to_bin_coordinates,
)
from itreg.metrics.intensity import robust_range

logger = logging.getLogger(__name__)

#: Starts of ``Gamma`` (see :class:`XMetric`).
INITS = ("random", "kmeans")

#: Ways to read the appearance model at an intensity (see :func:`class_log_likelihood`).
LOOKUPS = ("linear", "nearest", "truncate")

#: Bins of padding on each side of the ``L`` intensity levels (cubic B-spline support).
PADDING = 2

__all__ = [
    "INITS",
    "LOOKUPS",
    "PADDING",
    "XMetric",
    "appearance_model",
    "bin_coordinates",
    "class_log_likelihood",
    "intensity_ranges",
    "x_metric",
]


def _check_levels(levels: int) -> int:
    if isinstance(levels, bool) or int(levels) != levels or int(levels) < 4:
        raise ConfigError(f"the number of intensity levels must be an integer >= 4, got {levels!r}")
    return int(levels)


def intensity_ranges(values: Tensor, mask: Tensor | None,
                     percentiles: tuple[float, float] = (0.0, 100.0)) -> list[tuple[float, float]]:
    """Each image's :func:`~itreg.metrics.intensity.robust_range` inside `mask` (detached)."""
    return [robust_range(values[j], mask, percentiles) for j in range(values.shape[0])]


def bin_coordinates(values: Tensor, mask: Tensor | None, levels: int,
                    percentiles: tuple[float, float] = (0.0, 100.0),
                    ranges: list[tuple[float, float]] | None = None) -> Tensor:
    """Continuous bin coordinates of each image's intensities.

    Image ``j``'s range ``(lo_j, hi_j)`` is :func:`~itreg.metrics.intensity.robust_range` of its
    values inside `mask` (detached; min and max by default, as the authors' code), mapped to
    ``[PADDING, PADDING + levels]`` in a table of ``levels + 2 * PADDING`` bins.

    Args:
        values: ``(N, P)`` intensities.
        mask: ``(P,)`` bool points that define the ranges (None: all).
        levels: ``L``, the number of intensity levels.
        percentiles: the range's percentiles.
        ranges: explicit ``(lo, hi)`` per image (then `mask` and `percentiles` are unused);
            values outside are clamped to the range's ends.

    Returns:
        ``(N, P)`` coordinates, differentiable with respect to `values`.
    """
    bins = levels + 2 * PADDING
    if ranges is None:
        ranges = intensity_ranges(values, mask, percentiles)
    rows = []
    for j, (lo, hi) in enumerate(ranges):
        rows.append(to_bin_coordinates(values[j], lo, hi, bins, PADDING))
    return torch.stack(rows)


def appearance_model(coords: Tensor, gamma: Tensor, bins: int) -> Tensor:
    """Class-conditional intensity densities ``f_jk`` (Eq. 20), one histogram per image.

    Args:
        coords: ``(N, P)`` bin coordinates of the sample.
        gamma: ``(P, K)`` class weights of the sample.
        bins: table size (levels plus padding).

    Returns:
        ``(N, K, bins)``, each ``f[j, k]`` summing to 1 over the bins (uniform where a class
        has no mass).
    """
    tables = torch.stack([parzen_histogram(coords[j], bins, weights=gamma)
                          for j in range(coords.shape[0])])
    mass = tables.sum(dim=-1, keepdim=True)
    uniform = torch.full_like(tables, 1.0 / bins)
    return torch.where(mass > 0, tables / mass.clamp_min(torch.finfo(tables.dtype).tiny), uniform)


def class_log_likelihood(coords: Tensor, f: Tensor, weights: Tensor | None = None,
                         floor: float = LIKELIHOOD_FLOOR, lookup: str = "truncate") -> Tensor:
    """``sum_j w_j log max(f_jk(u_{x,j}), floor)`` for every point and class.

    The table ``f[j, k, b]`` holds the kernel density of Eq. 20 at bin *centre* ``b``: a sample
    at coordinate ``t_i`` adds ``B3(b - t_i)`` to bin ``b``
    (:func:`~itreg.metrics.histogram.parzen_histogram`), so the density at a coordinate ``t``
    lies between the centres ``floor(t)`` and ``floor(t) + 1``. Three ways to read it:

    - ``"truncate"`` (default): bin ``floor(t)``, as the authors' code does (``SVCD.forward``,
      ``torch.div(..., rounding_mode='trunc')``). That is half a bin off on average: a value
      0.9 bin above a centre reads that centre, not the next one 0.1 bin away (one sample at
      6: ``t = 5.9`` reads 1/6, ``t = 6.9`` reads 2/3, where the density is 0.66 and 0.22).
    - ``"linear"``: linear interpolation between the two centres: Eq. 20 itself at the
      centres and within ``max|f''| / 8`` (in bins^-2) of it in between.
    - ``"nearest"``: the nearest centre ``round(t)``.

    The release's truncation stays the default because it registered better: on 20 2D
    BrainWeb-style groups without a bias field X-CoReg's gWI was 0.560 mm with it against
    0.616 mm with ``"linear"`` (worse on 17 of 20 groups, Wilcoxon p = 0.007) and 0.645 mm
    with ``"nearest"``; with a bias field the three did not differ (0.833 / 0.823 / 0.798 mm,
    p > 0.9). Why the offset helps is not known
    (``benchmarks/results/2026-12-08-xmetric-density-lookup.md``).

    Args:
        coords: ``(N, P)`` bin coordinates.
        f: ``(N, K, bins)`` appearance model.
        weights: ``(N,)`` per-image weights (None: all 1).
        floor: smallest density before the logarithm.
        lookup: ``"truncate"``, ``"linear"`` or ``"nearest"`` (see above).

    Returns:
        ``(P, K)``.
    """
    if lookup not in LOOKUPS:
        raise ConfigError(f"unknown density lookup {lookup!r}; valid: {', '.join(LOOKUPS)}")
    n, k, bins = f.shape
    t = coords.detach().to(f.dtype).clamp(0.0, float(bins - 1))
    lo = t.round() if lookup == "nearest" else t.floor()
    idx0 = lo.long().clamp(0, bins - 1)  # (N, P)
    f0 = torch.gather(f, 2, idx0.unsqueeze(1).expand(n, k, idx0.shape[1]))  # (N, K, P)
    if lookup == "linear":
        idx1 = (idx0 + 1).clamp(max=bins - 1)
        f1 = torch.gather(f, 2, idx1.unsqueeze(1).expand(n, k, idx1.shape[1]))
        frac = (t - lo).unsqueeze(1)
        f0 = f0 * (1.0 - frac) + f1 * frac
    per_image = torch.log(f0.clamp_min(floor))
    if weights is not None:
        per_image = per_image * weights.to(per_image.dtype).view(n, 1, 1)
    return per_image.sum(dim=0).T


def x_metric(coords: Tensor, gamma: Tensor, bins: int) -> tuple[Tensor, Tensor]:
    """The X-metric ``sum_j I(U_j, Z)`` (Eqs. 8, 17, 21) in nats.

    Args:
        coords: ``(N, P)`` bin coordinates of the sample (gradients flow through them).
        gamma: ``(P, K)`` class weights of the sample (treated as given).
        bins: table size.

    Returns:
        ``(total, per_image)``: the sum and the ``(N,)`` mutual informations.
    """
    mis = []
    for j in range(coords.shape[0]):
        p = parzen_histogram(coords[j], bins, weights=gamma, normalize=True)  # (K, bins)
        mis.append(mutual_information_from_joint(p)[0])
    per_image = torch.stack(mis)
    return per_image.sum(), per_image


class XMetric(GroupObjective):
    """X-CoReg's objective: one EM update of the common anatomy, then ``-X`` (Alg. 1).

    Each step, :meth:`update` performs steps 3-4 of Algorithm 1 under ``no_grad`` on every
    overlap voxel (appearance model from the previous ``Gamma`` on a fresh Bernoulli sample,
    E-step Eq. 12, ``pi`` by Eq. 14) and :meth:`evaluate` returns ``-X(U[phi], Z^{t+1})`` on
    the loop's sample of voxels (Eq. 15 without the regulariser, which the loop adds), so
    gradients are computed only at the sample. In group-to-reference mode the reference's
    log-likelihood is weighted by ``N`` and the reference is left out of the metric, as in the
    authors' code.

    With `segmentations` (one label image per input, on the input's grid, labels ``0..K-1``)
    this is X-Reg-GT (Eq. 48): the appearance model ``f_jk`` is built once from each image's
    own intensities and labels (all voxels, sample rate 1) and kept for every step; only
    ``Gamma`` and ``pi`` are updated.

    Args:
        k: number of classes ``K`` (>= 2).
        levels: number of intensity levels ``L``.
        sample_rate: Bernoulli rate of the density sample ``Omega_S``.
        eps: posterior clamp (see :func:`itreg.groupwise.em.e_step`).
        segmentations: optional label images for X-Reg-GT.
        warmup: extra EM updates (Eqs. 12, 14) at the very first step, before any transform
            moves. Not in the paper or the authors' code (0 reproduces them): from the random
            start of Eq. 22 the first Adam steps otherwise move every image by a full step
            in directions set by a meaningless ``Gamma``.
        init: start of ``Gamma`` at the first step: ``"random"`` (default: Eq. 22, softmax of
            Gaussian draws, as the paper and the authors' code) or ``"kmeans"`` (one-hot k-means++
            clusters of the ``N``-vectors of intensities over the overlap, clamped like the
            posterior, and their proportions as ``pi``). From the random start, EM on
            brain slices at K = 4 settles in a state that spends a class on the partial-volume
            rim and merges grey and white matter, so nothing aligns the tissue boundaries;
            the k-means start separates the tissues (mean gWI over 3 BrainWeb-style groups
            0.91 -> 0.80 mm with the default FFD schedule). It is not the default because on
            small translation-only groups in group-to-reference mode it did worse than Eq. 22.
        full_update_every: ``m``: steps 3-4 run on every overlap voxel at every ``m``-th
            iteration of a level (from the first) and, in between, only at the step's sample
            (appearance model, E-step and ``pi`` from the sample's intensities, the other
            voxels keep their ``Gamma``). 1 (default) is Algorithm 1; larger values save the
            ``N`` full-grid warps per step that dominate small groups' time.
        lookup: how the E-step reads ``f_jk`` at a voxel's intensity: ``"truncate"``
            (default: the bin below, as the authors' code; half a bin off, but it registered
            better), ``"linear"`` (linear interpolation between the bin centres: the kernel
            density of Eq. 20) or ``"nearest"`` (the nearest centre). See
            :func:`class_log_likelihood`.
    """

    name = "xmetric"
    quantity_name = "X (nats)"
    needs_all_voxels = True

    def __init__(self, k: int = 4, levels: int = 64, sample_rate: float = 0.1,
                 eps: float = POSTERIOR_EPS, segmentations: Sequence[Image] | None = None,
                 warmup: int = 0, init: str = "random", full_update_every: int = 1,
                 lookup: str = "truncate") -> None:
        super().__init__(sample_rate)
        if lookup not in LOOKUPS:
            raise ConfigError(f"unknown density lookup {lookup!r}; valid: {', '.join(LOOKUPS)}")
        self.lookup = lookup
        if isinstance(full_update_every, bool) or int(full_update_every) != full_update_every \
                or int(full_update_every) < 1:
            raise ConfigError(f"full_update_every must be an integer >= 1, got "
                              f"{full_update_every!r}")
        self.full_update_every = int(full_update_every)
        if init not in INITS:
            raise ConfigError(f"unknown X-metric init {init!r}; valid: {', '.join(INITS)}")
        self.init = init
        if isinstance(warmup, bool) or int(warmup) != warmup or int(warmup) < 0:
            raise ConfigError(f"warmup must be an integer >= 0, got {warmup!r}")
        self.warmup = int(warmup)
        self._updates = 0
        self.segmentations = None if segmentations is None else list(segmentations)
        self.fixed_appearance: Tensor | None = None
        self.fixed_ranges: list[tuple[float, float]] | None = None
        self.k = check_classes(k)
        self.levels = _check_levels(levels)
        self.bins = self.levels + 2 * PADDING
        self.eps = float(eps)
        self.gamma: Tensor | None = None
        self.pi: Tensor | None = None
        self.per_image: Tensor | None = None

    def reset(self, n_images, reference, generator, dtype, device) -> None:
        super().reset(n_images, reference, generator, dtype, device)
        self.gamma = None
        self.pi = None
        self.grid = None
        self.ranges = None
        self._updates = 0

    def start_level(self, grid: Grid) -> None:
        """Initialise ``Gamma`` (Eq. 22) or carry it to the new grid by linear interpolation."""
        if self.gamma is None:
            self.gamma, self.pi = init_common_space(grid.numel, self.k, self.generator,
                                                    self.dtype, self.device)
        elif not grid.same_as(self.grid):
            from itreg.warp import resample

            old = Image(self.gamma.T.reshape(self.k, *self.grid.shape), self.grid, is_label=False)
            # Points outside the old grid take the nearest edge values.
            new = resample(old, None, grid, mode="linear", padding=float("nan")).data
            flat = new.reshape(self.k, -1).T
            bad = torch.isnan(flat).any(dim=1)
            flat = torch.where(bad[:, None], self.pi.expand_as(flat), flat)
            self.gamma = flat / flat.sum(dim=1, keepdim=True).clamp_min(1e-12)
        self.grid = grid

    def prepare(self, images: Sequence[Image]) -> None:
        """X-Reg-GT: the appearance model of Eq. 48 from each image's own segmentation."""
        if self.segmentations is None:
            return
        if len(self.segmentations) != len(images):
            raise ConfigError(f"X-Reg-GT needs one segmentation per image: got "
                              f"{len(self.segmentations)} for {len(images)} images")
        tables, ranges = [], []
        for j, (img, seg) in enumerate(zip(images, self.segmentations)):
            if not seg.grid.same_as(img.grid):
                raise GeometryError(f"segmentation {j} is not on image {j}'s grid")
            labels = seg.data.reshape(-1).long().to(img.device)
            if int(labels.min()) < 0 or int(labels.max()) >= self.k:
                raise ConfigError(f"segmentation {j} has labels outside 0..{self.k - 1}")
            values = img.data.reshape(1, -1).detach()
            ranges.append(intensity_ranges(values, None)[0])
            coords = bin_coordinates(values, None, self.levels, ranges=ranges[-1:])
            y = torch.nn.functional.one_hot(labels, self.k).to(values.dtype)
            tables.append(appearance_model(coords, y, self.bins)[0])
        self.fixed_appearance = torch.stack(tables)
        self.fixed_ranges = ranges

    @torch.no_grad()
    def update(self, values: Tensor, overlap: Tensor) -> None:
        """Steps 3-4 of Algorithm 1 on every overlap voxel: ``f^t`` (Eq. 20) from the previous
        ``Gamma`` on a fresh Bernoulli sample, the E-step (Eq. 12), ``pi`` (Eq. 14)."""
        n = values.shape[0]
        if self._updates == 0 and self.init == "kmeans" and self.fixed_appearance is None:
            self._kmeans_start(values, overlap)
        self.ranges = self.fixed_ranges or intensity_ranges(values, overlap)
        coords = bin_coordinates(values, overlap, self.levels, ranges=self.ranges)
        if self.fixed_appearance is not None:  # X-Reg-GT (Eq. 48)
            f = self.fixed_appearance.to(coords.dtype)
        else:  # Eq. 20
            sample = sample_mask(overlap, self.sample_rate, self.generator)
            f = appearance_model(coords[:, sample], self.gamma[sample], self.bins)
        ll = class_log_likelihood(coords[:, overlap], f,
                                  self.image_weights(n, coords.dtype, coords.device),
                                  lookup=self.lookup)
        gamma = self.gamma.clone()
        gamma[overlap] = e_step(ll, self.pi, self.eps).to(gamma.dtype)
        self.gamma = gamma
        self.pi = update_proportions(gamma, overlap)
        self._updates += 1
        if self._updates == 1:
            for _ in range(self.warmup):
                self.update(values, overlap)

    @torch.no_grad()
    def update_at(self, values: Tensor, overlap: Tensor, index: Tensor) -> None:
        """Steps 3-4 of Algorithm 1 at the sample only: ``f^t`` from the sample's previous
        ``Gamma``, the E-step there, ``pi`` as the sample's mean posterior."""
        if int(overlap.sum()) == 0:
            return
        idx = index[overlap]
        v = values[:, overlap]
        self.ranges = self.fixed_ranges or intensity_ranges(v, None)
        coords = bin_coordinates(v, None, self.levels, ranges=self.ranges)
        if self.fixed_appearance is not None:
            f = self.fixed_appearance.to(coords.dtype)
        else:
            f = appearance_model(coords, self.gamma[idx], self.bins)
        ll = class_log_likelihood(coords, f, self.image_weights(v.shape[0], coords.dtype,
                                                           coords.device), lookup=self.lookup)
        gamma = self.gamma.clone()
        gamma[idx] = e_step(ll, self.pi, self.eps).to(gamma.dtype)
        self.gamma = gamma
        self.pi = update_proportions(gamma[idx])
        self._updates += 1

    def _kmeans_start(self, values: Tensor, overlap: Tensor) -> None:
        """``Gamma`` from k-means++ clusters of the overlap's intensity vectors (``init``)."""
        labels = kmeans(values[:, overlap].T.contiguous(), self.k, self.generator)
        one_hot = torch.nn.functional.one_hot(labels, self.k).to(self.gamma.dtype)
        gamma = self.gamma.clone()
        gamma[overlap] = one_hot.clamp(self.eps, 1.0 - (self.k - 1) * self.eps)
        self.gamma = gamma
        self.pi = update_proportions(gamma, overlap)

    def evaluate(self, values: Tensor, overlap: Tensor,
                 index: Tensor | None = None) -> tuple[Tensor, float]:
        """``-X(U[phi], Z^{t+1})`` on the sample (Eqs. 15, 17, 21), ``Gamma`` as given."""
        n = values.shape[0]
        gamma = self.gamma if index is None else self.gamma[index]
        # The intensity ranges of the last update (whole overlap), else of the sample.
        coords = bin_coordinates(values[:, overlap], None, self.levels,
                                 ranges=self.ranges if index is not None else None)
        keep = [j for j in range(n) if j != self.reference]
        total, per_image = x_metric(coords[keep], gamma[overlap], self.bins)
        self.per_image = per_image.detach()
        return -total, float(total.detach())

    def quantity(self, loss: float) -> float:
        return -float(loss)

    def probabilities(self) -> Tensor | None:
        if self.gamma is None:
            return None
        return self.gamma.T.reshape(self.k, *self.grid.shape)

    def config(self) -> dict[str, Any]:
        return {"name": self.name, "k": self.k, "levels": self.levels,
                "sample_rate": self.sample_rate, "posterior_clamp": self.eps,
                "warmup": self.warmup, "init": self.init,
                "full_update_every": self.full_update_every, "lookup": self.lookup,
                "appearance": "ground-truth (Eq. 48)" if self.segmentations is not None
                else "estimated (Eq. 20)"}


register_group_metric("xmetric", XMetric)

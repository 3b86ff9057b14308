"""Classic similarity metrics: MSE, NCC, local NCC, Mattes MI, Gaussian-Parzen MI, NMI, joint entropy.

Every metric is an :class:`~itreg.metrics.base.Metric` (a loss: lower = better aligned) with a
functional twin. **The functions return the quantity itself** (MI in nats, NCC in [-1, 1], ...);
the modules return the loss ``quantity / quantity_sign``, and ``module.quantity(loss)``
converts back:

=====================  ==================================  =================  ====================
registry name          module / function                   quantity           loss
=====================  ==================================  =================  ====================
``"mse"``              MeanSquaredError / mse              mean (f - m)^2     +MSE
``"ncc"``              NormalizedCrossCorrelation / ncc    NCC in [-1, 1]     -NCC
``"lncc"``             LocalNormalizedCrossCorrelation     mean local CC^2    -mean CC^2 (ANTs CC)
                       / lncc                              in [0, 1]
``"mi"``               MutualInformation /                 MI (nats)          -MI (as ITK's Mattes)
                       mutual_information
``"mi-gaussian"``      GaussianMutualInformation /         MI (nats)          -MI
                       gaussian_mutual_information
``"nmi"``              NormalizedMutualInformation /       NMI in [1, 2]      -NMI
                       normalized_mutual_information
``"joint-entropy"``    JointEntropy / joint_entropy        H(X, Y) (nats)     +H(X, Y)
=====================  ==================================  =================  ====================

Inputs are ``(C, *S)`` tensors of equal shape (``S`` spatial or a flat sample ``(P,)``); with
``C > 1`` the per-channel quantities are averaged. Masks are ``(*S)`` bool (select) or float
(per-voxel weights).

Histogram metrics (``mi``, ``mi-gaussian``, ``nmi``, ``joint-entropy``) share
:mod:`itreg.metrics.histogram`. Intensities are mapped to bins through a range per image:
the ``fixed_range`` / ``moving_range`` of the call, or else the metric's ``intensity``
setting (:mod:`itreg.metrics.intensity`; default robust 0.5-99.5 percentiles inside the mask).
``bins`` counts all bins, padding included, as ITK does: the padding at each end is the
largest :func:`~itreg.metrics.histogram.kernel_padding` of the two kernels (2 for the cubic
B-spline, ``ceil(3 sigma_bins) + 1`` for the Gaussian, 0 for the box), so ``bins - 2 * padding`` bins span the intensity range. The
defaults follow ITK's ``MattesMutualInformationImageToImageMetricv4``: a zero-order (box)
Parzen window for the fixed values, a cubic B-spline one for the moving values, padding 2;
the default ``bins`` is 32 here (ITK's default is 50). With ``intensity="minmax"`` and all
voxels, :class:`MutualInformation` reproduces ITK's Mattes value (see the tests).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from itreg.errors import ConfigError
from itreg.metrics.base import (
    Metric,
    Range,
    check_mask,
    check_pair,
    flatten_samples,
    resolve_range,
)
from itreg.metrics.histogram import (
    check_kernel,
    entropy,
    joint_histogram,
    kernel_padding,
    mutual_information_from_joint,
    to_bin_coordinates,
)
from itreg.metrics.intensity import DEFAULT_PERCENTILES, check_intensity

__all__ = [
    "GaussianMutualInformation",
    "JointEntropy",
    "LocalNormalizedCrossCorrelation",
    "MeanSquaredError",
    "MutualInformation",
    "NormalizedCrossCorrelation",
    "NormalizedMutualInformation",
    "gaussian_mutual_information",
    "joint_entropy",
    "joint_probability",
    "lncc",
    "mse",
    "mutual_information",
    "ncc",
    "normalized_mutual_information",
]


# --------------------------------------------------------------------------------------------
# Intensity-difference and correlation metrics
# --------------------------------------------------------------------------------------------


def _weighted_mean(x: Tensor, w: Tensor | None) -> Tensor:
    """Mean over the last dimension of ``x (C, P)``, weighted by ``w (P,)``."""
    if w is None:
        return x.mean(dim=-1)
    return (x * w).sum(dim=-1) / w.sum()


def _mse(fixed: Tensor, moving: Tensor, mask: Tensor | None) -> Tensor:
    f, m, w = flatten_samples(fixed, moving, mask)
    return _weighted_mean((f - m) ** 2, w).mean()


def mse(fixed: Tensor, moving: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean squared intensity difference (raw intensities, squared intensity units).

    Args:
        fixed: ``(C, *S)`` fixed values.
        moving: ``(C, *S)`` moving values.
        mask: optional ``(*S)`` bool mask or float weights.

    Returns:
        0-d tensor, the (weighted) mean over voxels and channels; lower is better.
    """
    fixed, moving = check_pair(fixed, moving)
    return _mse(fixed, moving, check_mask(mask, fixed.shape[1:], fixed.device))


def _ncc(fixed: Tensor, moving: Tensor, mask: Tensor | None) -> Tensor:
    f, m, w = flatten_samples(fixed, moving, mask)
    fc = f - _weighted_mean(f, w).unsqueeze(-1)
    mc = m - _weighted_mean(m, w).unsqueeze(-1)
    cov = _weighted_mean(fc * mc, w)
    var_f = _weighted_mean(fc * fc, w)
    var_m = _weighted_mean(mc * mc, w)
    tiny = torch.finfo(f.dtype).tiny
    return (cov / torch.sqrt(var_f * var_m + tiny)).mean()


def ncc(fixed: Tensor, moving: Tensor, mask: Tensor | None = None) -> Tensor:
    """Global normalised cross-correlation (Pearson correlation of the voxel values).

    Invariant to affine intensity changes of either image. Two constant images give 0.

    Args:
        fixed: ``(C, *S)`` fixed values.
        moving: ``(C, *S)`` moving values.
        mask: optional ``(*S)`` bool mask or float weights (weighted moments).

    Returns:
        0-d tensor, NCC in ``[-1, 1]`` (mean over channels); higher is better.
    """
    fixed, moving = check_pair(fixed, moving)
    return _ncc(fixed, moving, check_mask(mask, fixed.shape[1:], fixed.device))


def _window_sizes(window: int | Sequence[int]) -> tuple[int, ...]:
    """Validate a window spec: one odd positive int, or a sequence of them."""
    sizes = (window,) if isinstance(window, (int, float)) else tuple(window)
    try:
        ok = len(sizes) > 0 and all(int(w) == w and int(w) >= 1 and int(w) % 2 == 1 for w in sizes)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ConfigError(
            f"window must be an odd positive voxel count (or one per axis), got {window!r}"
        )
    return tuple(int(w) for w in sizes)


def _window(window: int | Sequence[int], ndim: int) -> tuple[int, ...]:
    sizes = _window_sizes(window)
    if len(sizes) == 1:
        return sizes * ndim
    if len(sizes) != ndim:
        raise ConfigError(f"window {window!r} has {len(sizes)} sizes for {ndim}D images")
    return sizes


_AVG_POOL = {2: F.avg_pool2d, 3: F.avg_pool3d}


def _box_mean(x: Tensor, sizes: tuple[int, ...]) -> Tensor:
    """Mean over a box window centred on each voxel (only voxels inside the image count).

    ``x`` is ``(N, *S)``; separable: one 1-D pass per axis, so the cost does not grow with the
    window volume. The valid part of a box is a product of intervals, so the per-axis means
    with ``count_include_pad=False`` compose to the exact mean over the valid voxels.
    """
    ndim = len(sizes)
    pool = _AVG_POOL[ndim]
    out = x.unsqueeze(0)
    for axis, k in enumerate(sizes):
        if k == 1:
            continue
        kernel = [1] * ndim
        pad = [0] * ndim
        kernel[axis] = k
        pad[axis] = k // 2
        out = pool(out, tuple(kernel), stride=1, padding=tuple(pad), count_include_pad=False)
    return out.squeeze(0)


def _lncc(
    fixed: Tensor, moving: Tensor, mask: Tensor | None, sizes: tuple[int, ...], eps_rel: float
) -> Tensor:
    c = fixed.shape[0]
    dims = tuple(range(1, fixed.dim()))
    # Centre each channel globally: no change to the value, better float32 precision.
    f = fixed - fixed.mean(dim=dims, keepdim=True)
    m = moving - moving.mean(dim=dims, keepdim=True)
    stats = _box_mean(torch.cat((f, m, f * f, m * m, f * m), dim=0), sizes)
    mf, mm, mff, mmm, mfm = stats.split(c, dim=0)
    cross = mfm - mf * mm
    var_f = (mff - mf * mf).clamp_min(0.0)
    var_m = (mmm - mm * mm).clamp_min(0.0)
    # Damping relative to the global variances: windows whose local variance product is below
    # eps_rel times the global one (flat regions) tend to CC = 0 instead of 0 / 0.
    global_f = (f * f).mean(dim=dims, keepdim=True)
    global_m = (m * m).mean(dim=dims, keepdim=True)
    eps = eps_rel * global_f * global_m + torch.finfo(f.dtype).tiny
    cc = cross * cross / (var_f * var_m + eps)
    cc = cc.reshape(c, -1)
    if mask is None:
        return cc.mean()
    w = mask.reshape(-1).to(cc.dtype)
    return ((cc * w).sum(dim=-1) / w.sum()).mean()


def lncc(
    fixed: Tensor,
    moving: Tensor,
    mask: Tensor | None = None,
    window: int | Sequence[int] = 9,
    eps_rel: float = 1e-6,
) -> Tensor:
    """Local normalised cross-correlation, ANTs style: the mean over voxels of the squared local CC.

    For each voxel, the correlation of the two images inside a box window of ``window`` voxels
    per axis centred on it (only voxels inside the image count at the borders) is squared, as
    in ANTs' ``CC`` metric and VoxelMorph's NCC; the mean over the (masked) voxels is returned.

    Args:
        fixed: ``(C, Y, X)`` or ``(C, Z, Y, X)`` fixed image.
        moving: moving image of the same shape.
        mask: optional ``(*S)`` bool mask or float weights of the voxels whose local CC is
            averaged (the windows themselves use all voxels).
        window: odd window side in voxels, one int or one per axis ``(Z, Y, X)`` order. ANTs'
            radius ``r`` is ``window = 2 r + 1``.
        eps_rel: damping of the denominator, relative to the product of the global variances.

    Returns:
        0-d tensor in ``[0, 1]``; higher is better.
    """
    fixed, moving = check_pair(fixed, moving, spatial=True)
    mask = check_mask(mask, fixed.shape[1:], fixed.device)
    return _lncc(fixed, moving, mask, _window(window, fixed.dim() - 1), float(eps_rel))


class MeanSquaredError(Metric):
    """Mean squared difference of the raw intensities; loss = +MSE.

    Not invariant to intensity scaling: use it for images of one modality and one scale. The
    ranges of the call are ignored.
    """

    name = "mse"
    quantity_name = "MSE (squared intensity units)"
    quantity_sign = 1.0

    def __init__(self) -> None:
        super().__init__()

    def loss(self, fixed, moving, mask, fixed_range, moving_range) -> Tensor:
        return _mse(fixed, moving, mask)


class NormalizedCrossCorrelation(Metric):
    """Global normalised cross-correlation; loss = -NCC (in ``[-1, 0]`` when correlated).

    The ranges of the call are ignored (NCC is invariant to affine intensity changes).
    """

    name = "ncc"
    quantity_name = "NCC (dimensionless, [-1, 1])"
    quantity_sign = -1.0

    def __init__(self) -> None:
        super().__init__()

    def loss(self, fixed, moving, mask, fixed_range, moving_range) -> Tensor:
        return -_ncc(fixed, moving, mask)


class LocalNormalizedCrossCorrelation(Metric):
    """ANTs-style local CC: loss = -(mean over voxels of the squared local correlation).

    Args:
        window: odd box side in voxels (int, or one per axis in ``(Z, Y, X)`` order); default 9
            (ANTs radius 4, VoxelMorph's default).
        eps_rel: denominator damping relative to the product of the global variances.
    """

    name = "lncc"
    requires_spatial = True
    quantity_name = "mean squared local CC (dimensionless, [0, 1])"
    quantity_sign = -1.0

    def __init__(self, window: int | Sequence[int] = 9, eps_rel: float = 1e-6) -> None:
        super().__init__()
        sizes = _window_sizes(window)
        if not (float(eps_rel) >= 0):
            raise ConfigError(f"eps_rel must be >= 0, got {eps_rel!r}")
        self.window = window
        self.eps_rel = float(eps_rel)
        self.settings = {
            "window": sizes[0] if len(sizes) == 1 else list(sizes),
            "eps_rel": self.eps_rel,
        }

    def loss(self, fixed, moving, mask, fixed_range, moving_range) -> Tensor:
        sizes = _window(self.window, fixed.dim() - 1)
        return -_lncc(fixed, moving, mask, sizes, self.eps_rel)


# --------------------------------------------------------------------------------------------
# Histogram metrics
# --------------------------------------------------------------------------------------------


def _check_histogram_settings(
    bins: int, kernel_fixed: str, kernel_moving: str, sigma_bins: float
) -> int:
    check_kernel(kernel_fixed, sigma_bins)
    check_kernel(kernel_moving, sigma_bins)
    try:
        is_int = not isinstance(bins, bool) and int(bins) == bins
    except (TypeError, ValueError):
        is_int = False
    if not is_int:
        raise ConfigError(f"bins must be an integer, got {bins!r}")
    bins = int(bins)
    padding = max(
        kernel_padding(kernel_fixed, sigma_bins), kernel_padding(kernel_moving, sigma_bins)
    )
    if bins - 2 * padding < 2:
        raise ConfigError(
            f"bins={bins} is too few: the kernels need {padding} padding bins at each end and at "
            f"least 2 bins must span the intensity range (bins >= {2 * padding + 2})"
        )
    return padding


def _joint_tables(
    fixed: Tensor,
    moving: Tensor,
    mask: Tensor | None,
    bins: int,
    fixed_range: Range,
    moving_range: Range,
    intensity: str,
    percentiles: Sequence[float],
    kernel_fixed: str,
    kernel_moving: str,
    sigma_bins: float,
) -> list[Tensor]:
    padding = _check_histogram_settings(bins, kernel_fixed, kernel_moving, sigma_bins)
    f, m, w = flatten_samples(fixed, moving, mask)
    f_lo, f_hi = resolve_range(fixed_range, f, w, intensity, percentiles)
    m_lo, m_hi = resolve_range(moving_range, m, w, intensity, percentiles)
    tf = to_bin_coordinates(f, f_lo, f_hi, bins, padding, closed_top=kernel_fixed == "bspline0")
    tm = to_bin_coordinates(m, m_lo, m_hi, bins, padding, closed_top=kernel_moving == "bspline0")
    return [
        joint_histogram(
            tf[c], tm[c], bins, bins, kernel_fixed, kernel_moving, w, sigma_bins, sigma_bins
        )
        for c in range(f.shape[0])
    ]


def joint_probability(
    fixed: Tensor,
    moving: Tensor,
    mask: Tensor | None = None,
    bins: int = 32,
    fixed_range: Range = None,
    moving_range: Range = None,
    intensity: str = "percentile",
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
    kernel_fixed: str = "bspline0",
    kernel_moving: str = "bspline3",
    sigma_bins: float = 1.0,
) -> Tensor:
    """The normalised Parzen joint histogram that the histogram metrics use.

    Args: as :func:`mutual_information`.

    Returns:
        ``(C, bins, bins)`` tensor; ``[c, a, b]`` is the probability of fixed bin ``a`` and
        moving bin ``b`` in channel ``c``; each ``[c]`` sums to 1.
    """
    fixed, moving = check_pair(fixed, moving)
    check_intensity(intensity, percentiles)
    mask = check_mask(mask, fixed.shape[1:], fixed.device)
    tables = _joint_tables(
        fixed,
        moving,
        mask,
        bins,
        fixed_range,
        moving_range,
        intensity,
        percentiles,
        kernel_fixed,
        kernel_moving,
        sigma_bins,
    )
    return torch.stack(tables)


def _mi_of(p: Tensor) -> Tensor:
    return mutual_information_from_joint(p)[0]


def _nmi_of(p: Tensor) -> Tensor:
    _, h_x, h_y, h_xy = mutual_information_from_joint(p)
    return (h_x + h_y) / h_xy.clamp_min(torch.finfo(p.dtype).tiny)


def _je_of(p: Tensor) -> Tensor:
    return entropy(p)


def _histogram_quantity(
    statistic,
    fixed: Tensor,
    moving: Tensor,
    mask: Tensor | None,
    bins: int,
    fixed_range: Range,
    moving_range: Range,
    intensity: str,
    percentiles: Sequence[float],
    kernel_fixed: str,
    kernel_moving: str,
    sigma_bins: float,
) -> Tensor:
    tables = _joint_tables(
        fixed,
        moving,
        mask,
        bins,
        fixed_range,
        moving_range,
        intensity,
        percentiles,
        kernel_fixed,
        kernel_moving,
        sigma_bins,
    )
    return torch.stack([statistic(p) for p in tables]).mean()


def _functional(
    statistic,
    fixed,
    moving,
    mask,
    bins,
    fixed_range,
    moving_range,
    intensity,
    percentiles,
    kernel_fixed,
    kernel_moving,
    sigma_bins,
) -> Tensor:
    fixed, moving = check_pair(fixed, moving)
    check_intensity(intensity, percentiles)
    mask = check_mask(mask, fixed.shape[1:], fixed.device)
    return _histogram_quantity(
        statistic,
        fixed,
        moving,
        mask,
        bins,
        fixed_range,
        moving_range,
        intensity,
        percentiles,
        kernel_fixed,
        kernel_moving,
        sigma_bins,
    )


def mutual_information(
    fixed: Tensor,
    moving: Tensor,
    mask: Tensor | None = None,
    bins: int = 32,
    fixed_range: Range = None,
    moving_range: Range = None,
    intensity: str = "percentile",
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
    kernel_fixed: str = "bspline0",
    kernel_moving: str = "bspline3",
    sigma_bins: float = 1.0,
) -> Tensor:
    """Mutual information in nats from a Parzen joint histogram (Mattes et al. 2003 by default).

    ``MI = sum_ab p(a, b) ln(p(a, b) / (p(a) p(b)))`` of the normalised joint histogram, with
    a box window on the fixed values and a cubic B-spline window on the moving values by
    default, as ITK's ``MattesMutualInformationImageToImageMetricv4`` (whose value is -MI).

    Args:
        fixed: ``(C, *S)`` fixed values.
        moving: ``(C, *S)`` moving values; the result is differentiable w.r.t. them.
        mask: optional ``(*S)`` bool mask or float per-voxel weights.
        bins: total bins per axis, 2 * padding included (ITK convention; ITK's default is 50).
        fixed_range: ``(lo, hi)`` of the fixed intensities; None: from ``intensity``.
        moving_range: ``(lo, hi)`` of the moving intensities; None: from ``intensity``.
        intensity: ``"percentile"``, ``"minmax"`` or ``"none"`` (see
            :mod:`itreg.metrics.intensity`); used only for a range that is None.
        percentiles: robust range in percent for ``"percentile"``.
        kernel_fixed: Parzen kernel of the fixed values (``"bspline0"``, ``"bspline3"``,
            ``"gaussian"``).
        kernel_moving: Parzen kernel of the moving values.
        sigma_bins: Gaussian kernel standard deviation in bins.

    Returns:
        0-d tensor, MI >= 0 in nats (mean over channels); higher is better.
    """
    return _functional(
        _mi_of,
        fixed,
        moving,
        mask,
        bins,
        fixed_range,
        moving_range,
        intensity,
        percentiles,
        kernel_fixed,
        kernel_moving,
        sigma_bins,
    )


def gaussian_mutual_information(
    fixed: Tensor,
    moving: Tensor,
    mask: Tensor | None = None,
    bins: int = 32,
    sigma_bins: float = 1.0,
    fixed_range: Range = None,
    moving_range: Range = None,
    intensity: str = "percentile",
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
) -> Tensor:
    """Mutual information in nats with a Gaussian Parzen window on both images.

    The Gaussian has standard deviation ``sigma_bins`` bin widths (default 1.0), is truncated
    at ``ceil(3 sigma_bins)`` bins (the padding is one more), and is applied to both axes, like the
    smoothed joint histogram of ITK's ``JointHistogramMutualInformationImageToImageMetricv4``
    (variance 1.5 bins^2 there). Other arguments as :func:`mutual_information`.

    Returns:
        0-d tensor, MI >= 0 in nats; higher is better.
    """
    return _functional(
        _mi_of,
        fixed,
        moving,
        mask,
        bins,
        fixed_range,
        moving_range,
        intensity,
        percentiles,
        "gaussian",
        "gaussian",
        sigma_bins,
    )


def normalized_mutual_information(
    fixed: Tensor,
    moving: Tensor,
    mask: Tensor | None = None,
    bins: int = 32,
    fixed_range: Range = None,
    moving_range: Range = None,
    intensity: str = "percentile",
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
    kernel_fixed: str = "bspline0",
    kernel_moving: str = "bspline3",
    sigma_bins: float = 1.0,
) -> Tensor:
    """Studholme's normalised MI ``(H(X) + H(Y)) / H(X, Y)`` of the Parzen joint histogram.

    Lies in ``[1, 2]``: 1 for independent images, 2 for identical ones with a box kernel on
    both axes (the smooth moving kernel spreads the joint histogram, so identical images give
    less than 2 with the default kernels). Arguments as :func:`mutual_information`.

    Returns:
        0-d tensor, NMI (dimensionless); higher is better.
    """
    return _functional(
        _nmi_of,
        fixed,
        moving,
        mask,
        bins,
        fixed_range,
        moving_range,
        intensity,
        percentiles,
        kernel_fixed,
        kernel_moving,
        sigma_bins,
    )


def joint_entropy(
    fixed: Tensor,
    moving: Tensor,
    mask: Tensor | None = None,
    bins: int = 32,
    fixed_range: Range = None,
    moving_range: Range = None,
    intensity: str = "percentile",
    percentiles: Sequence[float] = DEFAULT_PERCENTILES,
    kernel_fixed: str = "bspline0",
    kernel_moving: str = "bspline3",
    sigma_bins: float = 1.0,
) -> Tensor:
    """Joint entropy ``H(X, Y) = -sum p ln p`` of the Parzen joint histogram, in nats.

    With a box kernel on both axes this is the entropy of the categorical distribution of the
    joint histogram, whose minimisation equals maximum profile likelihood (DITR paper,
    Sec. 2.1, Eq. 3). Arguments as :func:`mutual_information`.

    Returns:
        0-d tensor, H(X, Y) >= 0 in nats; lower is better.
    """
    return _functional(
        _je_of,
        fixed,
        moving,
        mask,
        bins,
        fixed_range,
        moving_range,
        intensity,
        percentiles,
        kernel_fixed,
        kernel_moving,
        sigma_bins,
    )


class _HistogramMetric(Metric):
    uses_intensity_range = True
    _statistic = staticmethod(_mi_of)

    def __init__(
        self,
        bins: int = 32,
        kernel_fixed: str = "bspline0",
        kernel_moving: str = "bspline3",
        sigma_bins: float = 1.0,
        intensity: str = "percentile",
        percentiles: Sequence[float] = DEFAULT_PERCENTILES,
    ) -> None:
        super().__init__(intensity, percentiles)
        self.padding = _check_histogram_settings(bins, kernel_fixed, kernel_moving, sigma_bins)
        self.bins = int(bins)
        self.kernel_fixed = kernel_fixed
        self.kernel_moving = kernel_moving
        self.sigma_bins = float(sigma_bins)
        self.settings = {
            "bins": self.bins,
            "padding": self.padding,
            "kernel_fixed": kernel_fixed,
            "kernel_moving": kernel_moving,
        }
        if "gaussian" in (kernel_fixed, kernel_moving):
            self.settings["sigma_bins"] = self.sigma_bins

    def joint_probability(
        self,
        fixed: Tensor,
        moving: Tensor,
        mask: Tensor | None = None,
        fixed_range: Range = None,
        moving_range: Range = None,
    ) -> Tensor:
        """The ``(C, bins, bins)`` joint probability table this metric computes its value from."""
        return joint_probability(
            fixed,
            moving,
            mask,
            self.bins,
            fixed_range,
            moving_range,
            self.intensity,
            self.percentiles,
            self.kernel_fixed,
            self.kernel_moving,
            self.sigma_bins,
        )

    def loss(self, fixed, moving, mask, fixed_range, moving_range) -> Tensor:
        value = _histogram_quantity(
            type(self)._statistic,
            fixed,
            moving,
            mask,
            self.bins,
            fixed_range,
            moving_range,
            self.intensity,
            self.percentiles,
            self.kernel_fixed,
            self.kernel_moving,
            self.sigma_bins,
        )
        return value * self.quantity_sign


class MutualInformation(_HistogramMetric):
    """Mattes mutual information; loss = -MI in nats (ITK's Mattes v4 value).

    Args:
        bins: total bins per axis including 2 padding bins at each end (default 32; ITK's
            default is 50).
        kernel_fixed: Parzen kernel of the fixed values (default box, as ITK).
        kernel_moving: Parzen kernel of the moving values (default cubic B-spline, as ITK).
        sigma_bins: Gaussian standard deviation in bins, if a Gaussian kernel is chosen.
        intensity: how ranges not given to a call are computed: ``"percentile"`` (default,
            0.5-99.5 % inside the mask), ``"minmax"`` (ITK) or ``"none"`` (``[0, 1]``).
        percentiles: the robust range in percent.
    """

    name = "mi"
    quantity_name = "MI (nats)"
    quantity_sign = -1.0
    _statistic = staticmethod(_mi_of)


class GaussianMutualInformation(_HistogramMetric):
    """Mutual information with a Gaussian Parzen window on both images; loss = -MI (nats).

    Args:
        bins: total bins per axis including ``ceil(3 sigma_bins) + 1`` padding bins at each end.
        sigma_bins: Gaussian standard deviation in bin widths (default 1.0; ITK's joint
            histogram MI smooths with variance 1.5 bins^2, i.e. ``sigma_bins ~ 1.22``).
        intensity: as :class:`MutualInformation`.
        percentiles: as :class:`MutualInformation`.
    """

    name = "mi-gaussian"
    quantity_name = "MI (nats)"
    quantity_sign = -1.0
    _statistic = staticmethod(_mi_of)

    def __init__(
        self,
        bins: int = 32,
        sigma_bins: float = 1.0,
        intensity: str = "percentile",
        percentiles: Sequence[float] = DEFAULT_PERCENTILES,
    ) -> None:
        super().__init__(bins, "gaussian", "gaussian", sigma_bins, intensity, percentiles)


class NormalizedMutualInformation(_HistogramMetric):
    """Studholme's NMI ``(H(X) + H(Y)) / H(X, Y)``; loss = -NMI (in ``[-2, -1]``).

    Arguments as :class:`MutualInformation` (same kernels and defaults).
    """

    name = "nmi"
    quantity_name = "NMI (dimensionless, [1, 2])"
    quantity_sign = -1.0
    _statistic = staticmethod(_nmi_of)


class JointEntropy(_HistogramMetric):
    """Joint entropy of the Parzen joint histogram; loss = +H(X, Y) in nats (lower is better).

    Arguments as :class:`MutualInformation`. With ``kernel_fixed = kernel_moving =
    "bspline0"`` this is the categorical joint-histogram entropy of the DITR paper, Eq. 3.
    """

    name = "joint-entropy"
    quantity_name = "joint entropy H(X,Y) (nats)"
    quantity_sign = 1.0
    _statistic = staticmethod(_je_of)

"""The mutual-information family of the classic metrics: Mattes MI, Gaussian-Parzen MI, NMI and
joint entropy, all from one Parzen joint histogram built as :class:`HistogramSettings` says
(the registry names, quantities and signs are tabled in :mod:`itreg.metrics.classic`).

Intensities are mapped to bins through a range per image: the ``fixed_range`` /
``moving_range`` of the call, or else the ``intensity`` setting
(:mod:`itreg.metrics.intensity`; default robust 0.5-99.5 percentiles inside the mask).
``bins`` counts all bins, padding included, as ITK does: the padding at each end is the
largest :func:`~itreg.metrics.histogram.kernel_padding` of the two kernels (2 for the cubic
B-spline, ``ceil(3 sigma_bins) + 1`` for the Gaussian, 0 for the box), so
``bins - 2 * padding`` bins span the intensity range. The defaults follow ITK's
``MattesMutualInformationImageToImageMetricv4``: a zero-order (box) Parzen window for the fixed
values, a cubic B-spline one for the moving values, padding 2; the default ``bins`` is 32 here
(ITK's default is 50). With ``intensity="minmax"`` and all voxels, :class:`MutualInformation`
reproduces ITK's Mattes value (see the tests).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
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
    "HistogramSettings",
    "JointEntropy",
    "MutualInformation",
    "NormalizedMutualInformation",
    "gaussian_mutual_information",
    "joint_entropy",
    "joint_probability",
    "mutual_information",
    "normalized_mutual_information",
]


@dataclass(frozen=True)
class HistogramSettings:
    """How a histogram metric builds its Parzen joint histogram (one object instead of the
    same arguments passed through every function).

    Args:
        bins: total bins per axis, 2 * padding included (ITK convention; ITK's default is 50).
        kernel_fixed: Parzen kernel of the fixed values (``"bspline0"``, ``"bspline3"``,
            ``"gaussian"``).
        kernel_moving: Parzen kernel of the moving values.
        sigma_bins: Gaussian kernel standard deviation in bins.
        intensity: ``"percentile"``, ``"minmax"`` or ``"none"`` (see
            :mod:`itreg.metrics.intensity`); used only for a range that a call does not give.
        percentiles: robust range in percent for ``"percentile"``.

    Attributes:
        padding: bins of padding at each end (the larger of the two kernels' needs).

    Raises:
        ConfigError: unknown kernel or intensity setting, non-integer or too few bins.
    """

    bins: int = 32
    kernel_fixed: str = "bspline0"
    kernel_moving: str = "bspline3"
    sigma_bins: float = 1.0
    intensity: str = "percentile"
    percentiles: Sequence[float] = DEFAULT_PERCENTILES
    padding: int = field(init=False)

    def __post_init__(self) -> None:
        check_kernel(self.kernel_fixed, self.sigma_bins)
        check_kernel(self.kernel_moving, self.sigma_bins)
        try:
            is_int = not isinstance(self.bins, bool) and int(self.bins) == self.bins
        except (TypeError, ValueError):
            is_int = False
        if not is_int:
            raise ConfigError(f"bins must be an integer, got {self.bins!r}")
        padding = max(kernel_padding(self.kernel_fixed, self.sigma_bins),
                      kernel_padding(self.kernel_moving, self.sigma_bins))
        if int(self.bins) - 2 * padding < 2:
            raise ConfigError(
                f"bins={self.bins} is too few: the kernels need {padding} padding bins at each "
                f"end and at least 2 bins must span the intensity range (bins >= "
                f"{2 * padding + 2})")
        object.__setattr__(self, "bins", int(self.bins))
        object.__setattr__(self, "sigma_bins", float(self.sigma_bins))
        object.__setattr__(self, "percentiles", check_intensity(self.intensity,
                                                                self.percentiles))
        object.__setattr__(self, "padding", padding)

    def tables(self, fixed: Tensor, moving: Tensor, mask: Tensor | None, fixed_range: Range,
               moving_range: Range) -> list[Tensor]:
        """One ``(bins, bins)`` joint probability table per channel of checked inputs."""
        f, m, w = flatten_samples(fixed, moving, mask)
        f_lo, f_hi = resolve_range(fixed_range, f, w, self.intensity, self.percentiles)
        m_lo, m_hi = resolve_range(moving_range, m, w, self.intensity, self.percentiles)
        tf = to_bin_coordinates(f, f_lo, f_hi, self.bins, self.padding,
                                closed_top=self.kernel_fixed == "bspline0")
        tm = to_bin_coordinates(m, m_lo, m_hi, self.bins, self.padding,
                                closed_top=self.kernel_moving == "bspline0")
        return [joint_histogram(tf[c], tm[c], self.bins, self.bins, self.kernel_fixed,
                                self.kernel_moving, w, self.sigma_bins, self.sigma_bins)
                for c in range(f.shape[0])]

    def quantity(self, statistic: Callable[[Tensor], Tensor], fixed: Tensor, moving: Tensor,
                 mask: Tensor | None, fixed_range: Range, moving_range: Range) -> Tensor:
        """`statistic` of each channel's joint table, averaged over channels (checked inputs)."""
        tables = self.tables(fixed, moving, mask, fixed_range, moving_range)
        return torch.stack([statistic(p) for p in tables]).mean()

    def checked(self, statistic: Callable[[Tensor], Tensor], fixed: Tensor, moving: Tensor,
                mask: Tensor | None, fixed_range: Range, moving_range: Range) -> Tensor:
        """:meth:`quantity` of unchecked inputs (the functional twins' path)."""
        fixed, moving = check_pair(fixed, moving)
        mask = check_mask(mask, fixed.shape[1:], fixed.device)
        return self.quantity(statistic, fixed, moving, mask, fixed_range, moving_range)


def joint_probability(fixed: Tensor, moving: Tensor, mask: Tensor | None = None, bins: int = 32,
                      fixed_range: Range = None, moving_range: Range = None,
                      intensity: str = "percentile",
                      percentiles: Sequence[float] = DEFAULT_PERCENTILES,
                      kernel_fixed: str = "bspline0", kernel_moving: str = "bspline3",
                      sigma_bins: float = 1.0) -> Tensor:
    """The normalised Parzen joint histogram that the histogram metrics use.

    Args: as :func:`mutual_information`.

    Returns:
        ``(C, bins, bins)`` tensor; ``[c, a, b]`` is the probability of fixed bin ``a`` and
        moving bin ``b`` in channel ``c``; each ``[c]`` sums to 1.
    """
    settings = HistogramSettings(bins, kernel_fixed, kernel_moving, sigma_bins, intensity,
                                 percentiles)
    fixed, moving = check_pair(fixed, moving)
    mask = check_mask(mask, fixed.shape[1:], fixed.device)
    return torch.stack(settings.tables(fixed, moving, mask, fixed_range, moving_range))


def _mi_of(p: Tensor) -> Tensor:
    return mutual_information_from_joint(p)[0]


def _nmi_of(p: Tensor) -> Tensor:
    _, h_x, h_y, h_xy = mutual_information_from_joint(p)
    return (h_x + h_y) / h_xy.clamp_min(torch.finfo(p.dtype).tiny)


def _je_of(p: Tensor) -> Tensor:
    return entropy(p)


def mutual_information(fixed: Tensor, moving: Tensor, mask: Tensor | None = None, bins: int = 32,
                       fixed_range: Range = None, moving_range: Range = None,
                       intensity: str = "percentile",
                       percentiles: Sequence[float] = DEFAULT_PERCENTILES,
                       kernel_fixed: str = "bspline0", kernel_moving: str = "bspline3",
                       sigma_bins: float = 1.0) -> Tensor:
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
    settings = HistogramSettings(bins, kernel_fixed, kernel_moving, sigma_bins, intensity,
                                 percentiles)
    return settings.checked(_mi_of, fixed, moving, mask, fixed_range, moving_range)


def gaussian_mutual_information(fixed: Tensor, moving: Tensor, mask: Tensor | None = None,
                                bins: int = 32, sigma_bins: float = 1.0,
                                fixed_range: Range = None, moving_range: Range = None,
                                intensity: str = "percentile",
                                percentiles: Sequence[float] = DEFAULT_PERCENTILES) -> Tensor:
    """Mutual information in nats with a Gaussian Parzen window on both images.

    The Gaussian has standard deviation ``sigma_bins`` bin widths (default 1.0), is truncated
    at ``ceil(3 sigma_bins)`` bins (the padding is one more), and is applied to both axes, like the
    smoothed joint histogram of ITK's ``JointHistogramMutualInformationImageToImageMetricv4``
    (variance 1.5 bins^2 there). Other arguments as :func:`mutual_information`.

    Returns:
        0-d tensor, MI >= 0 in nats; higher is better.
    """
    settings = HistogramSettings(bins, "gaussian", "gaussian", sigma_bins, intensity,
                                 percentiles)
    return settings.checked(_mi_of, fixed, moving, mask, fixed_range, moving_range)


def normalized_mutual_information(fixed: Tensor, moving: Tensor, mask: Tensor | None = None,
                                  bins: int = 32, fixed_range: Range = None,
                                  moving_range: Range = None, intensity: str = "percentile",
                                  percentiles: Sequence[float] = DEFAULT_PERCENTILES,
                                  kernel_fixed: str = "bspline0",
                                  kernel_moving: str = "bspline3",
                                  sigma_bins: float = 1.0) -> Tensor:
    """Studholme's normalised MI ``(H(X) + H(Y)) / H(X, Y)`` of the Parzen joint histogram.

    Lies in ``[1, 2]``: 1 for independent images, 2 for identical ones with a box kernel on
    both axes (the smooth moving kernel spreads the joint histogram, so identical images give
    less than 2 with the default kernels). Arguments as :func:`mutual_information`.

    Returns:
        0-d tensor, NMI (dimensionless); higher is better.
    """
    settings = HistogramSettings(bins, kernel_fixed, kernel_moving, sigma_bins, intensity,
                                 percentiles)
    return settings.checked(_nmi_of, fixed, moving, mask, fixed_range, moving_range)


def joint_entropy(fixed: Tensor, moving: Tensor, mask: Tensor | None = None, bins: int = 32,
                  fixed_range: Range = None, moving_range: Range = None,
                  intensity: str = "percentile", percentiles: Sequence[float] = DEFAULT_PERCENTILES,
                  kernel_fixed: str = "bspline0", kernel_moving: str = "bspline3",
                  sigma_bins: float = 1.0) -> Tensor:
    """Joint entropy ``H(X, Y) = -sum p ln p`` of the Parzen joint histogram, in nats.

    With a box kernel on both axes this is the entropy of the categorical distribution of the
    joint histogram, whose minimisation equals maximum profile likelihood (DITR paper,
    Sec. 2.1, Eq. 3). Arguments as :func:`mutual_information`.

    Returns:
        0-d tensor, H(X, Y) >= 0 in nats; lower is better.
    """
    settings = HistogramSettings(bins, kernel_fixed, kernel_moving, sigma_bins, intensity,
                                 percentiles)
    return settings.checked(_je_of, fixed, moving, mask, fixed_range, moving_range)


class _HistogramMetric(Metric):
    uses_intensity_range = True
    _statistic = staticmethod(_mi_of)

    def __init__(self, bins: int = 32, kernel_fixed: str = "bspline0",
                 kernel_moving: str = "bspline3", sigma_bins: float = 1.0,
                 intensity: str = "percentile",
                 percentiles: Sequence[float] = DEFAULT_PERCENTILES) -> None:
        super().__init__(intensity, percentiles)
        self.histogram = HistogramSettings(bins, kernel_fixed, kernel_moving, sigma_bins,
                                           intensity, self.percentiles)
        self.padding = self.histogram.padding
        self.bins = self.histogram.bins
        self.kernel_fixed = kernel_fixed
        self.kernel_moving = kernel_moving
        self.sigma_bins = self.histogram.sigma_bins
        self.settings = {"bins": self.bins, "padding": self.padding,
                         "kernel_fixed": kernel_fixed, "kernel_moving": kernel_moving}
        if "gaussian" in (kernel_fixed, kernel_moving):
            self.settings["sigma_bins"] = self.sigma_bins

    def joint_probability(self, fixed: Tensor, moving: Tensor, mask: Tensor | None = None,
                          fixed_range: Range = None, moving_range: Range = None) -> Tensor:
        """The ``(C, bins, bins)`` joint probability table this metric computes its value from."""
        fixed, moving = check_pair(fixed, moving)
        mask = check_mask(mask, fixed.shape[1:], fixed.device)
        return torch.stack(self.histogram.tables(fixed, moving, mask, fixed_range,
                                                 moving_range))

    def loss(self, fixed, moving, mask, fixed_range, moving_range) -> Tensor:
        value = self.histogram.quantity(type(self)._statistic, fixed, moving, mask, fixed_range,
                                        moving_range)
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

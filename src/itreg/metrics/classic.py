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

The intensity-difference and correlation metrics (``mse``, ``ncc``, ``lncc``) live here; the
histogram metrics (``mi``, ``mi-gaussian``, ``nmi``, ``joint-entropy``) live in
:mod:`itreg.metrics.information` (one :class:`~itreg.metrics.information.HistogramSettings`
for bins, kernels and intensity ranges, over :mod:`itreg.metrics.histogram`) and are
re-exported here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from itreg.errors import ConfigError
from itreg.metrics.base import (
    Metric,
    check_mask,
    check_pair,
    flatten_samples,
)
from itreg.metrics.information import (  # the MI family, re-exported where it was
    GaussianMutualInformation,
    HistogramSettings,
    JointEntropy,
    MutualInformation,
    NormalizedMutualInformation,
    gaussian_mutual_information,
    joint_entropy,
    joint_probability,
    mutual_information,
    normalized_mutual_information,
)

__all__ = [
    "GaussianMutualInformation",
    "HistogramSettings",
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

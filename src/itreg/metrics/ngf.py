"""Normalised gradient fields (NGF; Haber and Modersitzki 2006), a modality-independent metric.

Two images are aligned when their intensity edges are parallel or antiparallel, whatever
their contrasts. With the edge-regularised normalised gradient

    n_eps(I)(x) = grad I(x) / sqrt(|grad I(x)|^2 + eps^2),

NGF's distance is ``mean over x of 1 - (n_eps(F)(x) . n_eps(M)(x))^2``. Here the quantity is
the mean squared cosine ``mean (n_F . n_M)^2`` in ``[0, 1]`` (1: every gradient of the fixed
image parallel or antiparallel to the moving one's, and both much larger than their eps), and
the loss is its negative (the distance up to the constant 1). Gradients are central
differences in voxel units (one-sided at the borders, :func:`torch.gradient`); the images'
spacing is not used, so on anisotropic grids directions are those of index space.

**Edge parameter.** ``eps`` separates edges from noise: gradients much smaller than eps do
not count. By default each image gets its own eps from its noise level,
``eps = eta * sigma * sqrt(D / 2)``, where ``sigma * sqrt(D / 2)`` is the RMS magnitude of
the central-difference gradient of white noise of standard deviation ``sigma`` in ``D``
dimensions (eta = 1 puts the edge threshold at the gradient noise level). The default
``eta = 0.5`` (:data:`DEFAULT_ETA`) is measured: on the 2 mm 3D FFD phantoms with the
``bspline`` preset (2 cases, with and without a +-25 % bias field) eta 0.5 gave a lower
error than 1 on all four runs and 2 was worse on all four; 0.25 was within 0.01 mm of 0.5
(``benchmarks/results/2026-12-08-bias-metrics.md``). ``sigma`` is estimated by :func:`noise_sigma`,
Donoho and Johnstone's (1994) median-absolute-deviation estimator on the finest wavelet
detail band: the mixed first difference along every axis (a non-decimated Haar detail with
unit noise gain, which cancels constant and linear intensity), ``sigma = 1.4826 *
median |detail|`` over the voxels in the mask. A noise-free image (such as the MNI template)
gets the floor ``eps >= 1e-2 * (p99.5 - p0.5)`` of its intensities inside the mask, so that
eps is never zero. The engine computes each image's eps once per pyramid level through
:meth:`NormalizedGradientFields.intensity_range` (on the unwarped moving image, so that eps
does not change while optimising); for NGF that per-image setting is the band ``(0, eps)`` of
gradient magnitudes treated as noise. A fixed ``eps=`` setting replaces the estimate for both
images (FAIR's convention).

Example:
    >>> import torch
    >>> from itreg.metrics import get_metric
    >>> f = torch.rand(1, 16, 16)
    >>> m = 1.0 - 2.0 * f                       # inverted contrast: same edges
    >>> metric = get_metric("ngf", eps=1e-3)
    >>> bool(metric.quantity(metric(f, m)) > 0.99)
    True
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from itreg.errors import ConfigError, InvalidImageError
from itreg.metrics.base import Metric, Range, check_mask, check_pair
from itreg.metrics.intensity import robust_range

__all__ = ["DEFAULT_ETA", "EPS_FLOOR_REL", "NormalizedGradientFields", "ngf", "ngf_epsilon",
           "noise_sigma"]

#: The default multiple of the gradient noise level used as eps (see the module docstring).
DEFAULT_ETA = 0.5

#: MAD to standard deviation for Gaussian noise: 1 / Phi^-1(3/4).
_MAD_TO_SIGMA = 1.482602218505602

#: The smallest eps, relative to the robust (0.5-99.5 percentile) intensity span in the mask.
EPS_FLOOR_REL = 1e-2


def _selection(mask: Tensor | None, shape: Sequence[int], device) -> Tensor | None:
    """A bool mask of ``shape`` (positive weights select) or None."""
    if mask is None:
        return None
    mask = torch.as_tensor(mask, device=device)
    if tuple(mask.shape) != tuple(shape):
        mask = mask.reshape(shape)
    return mask if mask.dtype == torch.bool else mask > 0


def _detail(values: Tensor) -> Tensor:
    """The finest non-decimated Haar detail ``(C, *(S - 1))``: mixed first differences along
    every spatial axis, each divided by sqrt(2) (white noise keeps its variance)."""
    d = values
    for axis in range(1, values.dim()):
        n = d.shape[axis]
        d = (d.narrow(axis, 1, n - 1) - d.narrow(axis, 0, n - 1)) / math.sqrt(2.0)
    return d


def noise_sigma(values: Tensor, mask: Tensor | None = None) -> float:
    """Robust noise standard deviation of an image (Donoho and Johnstone's MAD estimator).

    Args:
        values: image ``(C, *S)`` (2D or 3D ``S``); all channels pooled.
        mask: optional ``S`` bool mask or float weights (positive = used): the detail
            coefficients whose voxel block lies inside it count. An empty selection falls back
            to the whole image.

    Returns:
        ``1.4826 * median |d|`` with ``d`` the finest Haar detail (see the module docstring);
        0 for a noise-free piecewise-linear image.
    """
    values = values.detach()
    d = _detail(values)
    sel = _selection(mask, values.shape[1:], values.device)
    if sel is not None:
        block = sel
        for axis in range(sel.dim()):
            n = block.shape[axis]
            block = block.narrow(axis, 1, n - 1) & block.narrow(axis, 0, n - 1)
        if bool(block.any()):
            d = d[:, block]
    d = d.reshape(-1)
    d = d[torch.isfinite(d)]
    if d.numel() == 0:
        return 0.0
    return _MAD_TO_SIGMA * float(d.abs().to(torch.float64).median())


def ngf_epsilon(values: Tensor, mask: Tensor | None = None, eta: float = DEFAULT_ETA) -> float:
    """The noise-based NGF edge parameter of an image (see the module docstring).

    ``max(eta * noise_sigma * sqrt(D / 2), EPS_FLOOR_REL * (p99.5 - p0.5))``, the percentiles
    over the mask (whole image if None or empty).

    Args:
        values: image ``(C, *S)``.
        mask: optional ``S`` bool mask or float weights.
        eta: multiple of the gradient noise level.
    """
    ndim = values.dim() - 1
    sigma = noise_sigma(values, mask)
    sel = _selection(mask, values.shape[1:], values.device)
    if sel is not None and not bool(sel.any()):
        sel = None
    try:
        lo, hi = robust_range(values.detach(), sel)
    except InvalidImageError:  # constant or non-finite selection: no floor from the range
        lo = hi = 0.0
    floor = EPS_FLOOR_REL * max(hi - lo, 0.0)
    eps = max(float(eta) * sigma * math.sqrt(ndim / 2.0), floor)
    if not eps > 0.0:  # a constant image: any positive eps gives n = 0
        eps = 1.0
    return eps


def _normalised_gradient(values: Tensor, eps: float) -> Tensor:
    """``(C, D, *S)``: the gradient (voxel units, axes in tensor order) over its eps-norm."""
    dims = tuple(range(1, values.dim()))
    grads = torch.stack(torch.gradient(values, dim=dims), dim=1)
    norm = torch.sqrt((grads * grads).sum(dim=1, keepdim=True) + eps * eps)
    return grads / norm


def _edge(given: Range | float | None, values: Tensor, mask: Tensor | None, eta: float,
          fixed_eps: float | None) -> float:
    if fixed_eps is not None:
        return fixed_eps
    if given is None:
        return ngf_epsilon(values, mask, eta)
    if isinstance(given, (int, float)):
        return float(given)
    return float(list(given)[-1])  # the (0, eps) band of intensity_range


def _ngf(fixed: Tensor, moving: Tensor, mask: Tensor | None, eps_fixed: float,
         eps_moving: float) -> Tensor:
    nf = _normalised_gradient(fixed, eps_fixed)
    nm = _normalised_gradient(moving, eps_moving)
    cos2 = (nf * nm).sum(dim=1) ** 2  # (C, *S)
    c = cos2.shape[0]
    cos2 = cos2.reshape(c, -1)
    if mask is None:
        return cos2.mean()
    if mask.dtype == torch.bool:
        return cos2[:, mask.reshape(-1)].mean()
    w = mask.reshape(-1).to(cos2.dtype)
    return ((cos2 * w).sum(dim=-1) / w.sum()).mean()


def ngf(fixed: Tensor, moving: Tensor, mask: Tensor | None = None,
        eps_fixed: float | None = None, eps_moving: float | None = None,
        eta: float = DEFAULT_ETA) -> Tensor:
    """NGF alignment: the mean squared cosine of the eps-normalised gradients, in ``[0, 1]``.

    Args:
        fixed: ``(C, Y, X)`` or ``(C, Z, Y, X)`` fixed image.
        moving: the moving image, same shape.
        mask: optional ``S`` bool mask or non-negative float weights (the mean is taken over
            it; gradients still use the neighbours outside it).
        eps_fixed: the fixed image's edge parameter (intensity per voxel); None:
            :func:`ngf_epsilon` of `fixed` inside `mask`.
        eps_moving: the same for the moving image.
        eta: multiple of the noise level for the estimated eps.

    Returns:
        A 0-d tensor; with C > 1 the channels' values are averaged.
    """
    fixed, moving = check_pair(fixed, moving, spatial=True)
    mask = check_mask(mask, fixed.shape[1:], fixed.device)
    ef = _edge(eps_fixed, fixed, mask, eta, None)
    em = _edge(eps_moving, moving, mask, eta, None)
    return _ngf(fixed, moving, mask, ef, em)


class NormalizedGradientFields(Metric):
    """NGF (Haber and Modersitzki 2006): loss = -mean (n_F . n_M)^2 (see the module docstring).

    Args:
        eps: a fixed edge parameter for both images (intensity units per voxel); None (default)
            estimates each image's from its noise level (:func:`ngf_epsilon`).
        eta: the multiple of the gradient noise level used as the estimated eps (default
            :data:`DEFAULT_ETA`, 0.5).
    """

    name = "ngf"
    requires_spatial = True
    quantity_name = "NGF mean squared gradient cosine (dimensionless, [0, 1])"
    quantity_sign = -1.0
    uses_intensity_range = True  # the per-level edge parameter travels as the "range"

    def __init__(self, eps: float | None = None, eta: float = DEFAULT_ETA) -> None:
        super().__init__()
        if eps is not None:
            try:
                eps = float(eps)
            except (TypeError, ValueError):
                raise ConfigError(f"NGF eps must be a positive number or None, got {eps!r}") from None
            if not (math.isfinite(eps) and eps > 0):
                raise ConfigError(f"NGF eps must be a positive number or None, got {eps!r}")
        try:
            eta = float(eta)
        except (TypeError, ValueError):
            raise ConfigError(f"NGF eta must be a positive number, got {eta!r}") from None
        if not (math.isfinite(eta) and eta > 0):
            raise ConfigError(f"NGF eta must be a positive number, got {eta!r}")
        self.eps = eps
        self.eta = eta
        self.settings = {"eps": "noise" if eps is None else eps, "eta": eta}

    def intensity_range(self, values: Tensor, mask: Tensor | None = None
                        ) -> tuple[float, float]:
        """The per-level setting of one image: the band ``(0, eps)`` of gradient magnitudes
        that count as noise (eps as in :func:`ngf_epsilon`, or the fixed ``eps``)."""
        if self.eps is not None:
            return 0.0, self.eps
        return 0.0, ngf_epsilon(values, mask, self.eta)

    def loss(self, fixed, moving, mask, fixed_range, moving_range) -> Tensor:
        ef = _edge(fixed_range, fixed, mask, self.eta, self.eps)
        em = _edge(moving_range, moving, mask, self.eta, self.eps)
        return -_ngf(fixed, moving, mask, ef, em)

    def config(self) -> dict:
        return {"name": self.name, **self.settings, "quantity": self.quantity_name}

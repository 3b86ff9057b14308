"""Kernel-density (Parzen window) histograms shared by every histogram-based metric.

Everything here works in *bin coordinates*: a continuous bin index ``t`` in which bin ``j`` is
centred on the integer ``j`` for the smooth kernels. :func:`to_bin_coordinates` maps
intensities to these coordinates with ITK's Mattes convention (``lo -> padding``,
``hi -> bins - padding``), and :func:`parzen_weights` turns coordinates into the few non-zero
kernel taps of each sample. Histograms are then built by ``scatter_add`` over the taps, so the
memory is ``O(P * taps)`` for ``P`` samples and no ``(P, bins)`` matrix is ever formed. The
tap weights are differentiable functions of ``t``, so gradients of any histogram statistic
flow back to the sample values (the derivative of the kernel).

Kernels (``kernel=``):

- ``"bspline3"``: the cubic B-spline ``B3`` (Mattes et al. 2003; Thevenaz & Unser 2000), 4 taps
  ``floor(t) - 1 .. floor(t) + 2`` with weights ``B3(j - t)``; partition of unity, C2.
- ``"bspline0"``: the zero-order B-spline (box) as ITK's Mattes metric applies it to the fixed
  image: the sample falls in bin ``floor(t)`` (bin ``j`` holds ``[j, j + 1)``), 1 tap, weight 1,
  no derivative. Use ``to_bin_coordinates(..., closed_top=True)`` to put the top of the range
  into the last interior bin, as ITK and ``numpy.histogram`` do.
- ``"gaussian"``: a Gaussian of standard deviation ``sigma_bins`` (in bins) on the ``2 R + 1``
  taps ``round(t) - R .. round(t) + R``, ``R = ceil(3 sigma_bins)``. It is lowered by its value
  at ``R + 1/2`` bins (where taps enter or leave the window; about 0.2 % of the peak for
  ``sigma_bins = 1``) so that the histogram is a continuous function of ``t``, and renormalised
  per sample so that every sample carries unit mass.

Every sample carries unit mass and all its taps lie in ``[0, bins)``: coordinates are first
clamped to the interval where that holds (``[0, bins)`` for the box, ``[1, bins - 2]`` for
the cubic B-spline, ``[R, bins - 1 - R]`` for the Gaussian; clamped samples get no
derivative). The coordinates of :func:`to_bin_coordinates` with the padding of
:func:`kernel_padding` never need that clamp.

The same primitives serve the pairwise metrics (joint histograms of fixed and moving values)
and class-weighted appearance models such as the X-metric's (Luo & Zhuang 2022, Eqs. 20-21):
:func:`parzen_histogram` accepts per-sample weights with any number of rows ``(P, R)`` and
returns ``(R, bins)``, e.g. ``p(mu, k) ~ sum_x B3(u_x - mu) gamma_{x,k}``.

Entropies are in nats (natural logarithm) throughout.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from itreg.errors import ConfigError, InvalidImageError

KERNELS = ("bspline3", "bspline0", "gaussian")
"""Names of the Parzen kernels accepted by :func:`parzen_weights`."""

__all__ = [
    "KERNELS",
    "check_kernel",
    "entropy",
    "joint_histogram",
    "kernel_padding",
    "mutual_information_from_joint",
    "parzen_histogram",
    "parzen_weights",
    "to_bin_coordinates",
]


def check_kernel(kernel: str, sigma_bins: float = 1.0) -> None:
    """Raise :class:`ConfigError` unless ``kernel`` is known and ``sigma_bins`` is positive."""
    if kernel not in KERNELS:
        raise ConfigError(
            f"unknown Parzen kernel {kernel!r}; valid kernels are: {', '.join(KERNELS)}"
        )
    if kernel == "gaussian" and not (float(sigma_bins) > 0 and math.isfinite(float(sigma_bins))):
        raise ConfigError(f"sigma_bins must be a positive number of bins, got {sigma_bins!r}")


def kernel_padding(kernel: str, sigma_bins: float = 1.0) -> int:
    """Half-support of a kernel in bins: the padding that keeps all its mass in the histogram.

    Returns 2 for ``"bspline3"`` (ITK's Mattes padding), 0 for ``"bspline0"`` and
    ``ceil(3 sigma_bins) + 1`` for ``"gaussian"`` (its taps reach ``ceil(3 sigma_bins)`` bins
    beyond the rounded coordinate, and the top of the range rounds up).
    """
    check_kernel(kernel, sigma_bins)
    if kernel == "bspline3":
        return 2
    if kernel == "bspline0":
        return 0
    return math.ceil(3.0 * float(sigma_bins)) + 1


def to_bin_coordinates(
    values: Tensor,
    lo: float | Tensor,
    hi: float | Tensor,
    bins: int,
    padding: int = 2,
    closed_top: bool = False,
) -> Tensor:
    """Map intensities to continuous bin coordinates, ITK Mattes convention.

    The bin width is ``(hi - lo) / (bins - 2 * padding)``; ``lo`` maps to ``padding`` and
    ``hi`` to ``bins - padding`` (``MattesMutualInformationImageToImageMetricv4``: padding 2
    keeps the 4-tap cubic B-spline inside the histogram). Values are clamped into that stated
    range ``[padding, bins - padding]``; clamped values have zero derivative.

    Args:
        values: intensities, any shape, floating point.
        lo: intensity mapped to coordinate ``padding`` (a float or a 0-d tensor).
        hi: intensity mapped to coordinate ``bins - padding``; must exceed ``lo``.
        bins: total number of bins, padding included.
        padding: bins left at each end.
        closed_top: for the box kernel: clamp the top to just below ``bins - padding`` so that
            ``hi`` falls in the last interior bin ``bins - padding - 1`` (ITK's fixed-image
            convention, ``numpy.histogram``'s closed last bin). Only values equal to ``hi``
            (after clamping) change.

    Returns:
        Coordinates, same shape, dtype and device as ``values``.

    Raises:
        ConfigError: ``bins <= 2 * padding``.
        InvalidImageError: ``hi <= lo`` (a constant image has no intensity range).
    """
    bins = int(bins)
    padding = int(padding)
    if padding < 0 or bins - 2 * padding < 1:
        raise ConfigError(f"bins={bins} leaves no interior bin with padding={padding}")
    lo_f, hi_f = float(lo), float(hi)
    if not (hi_f > lo_f) or not (math.isfinite(lo_f) and math.isfinite(hi_f)):
        raise InvalidImageError(
            f"intensity range ({lo_f}, {hi_f}) is empty or not finite (constant image?)"
        )
    scale = (bins - 2 * padding) / (hi_f - lo_f)
    t = (values - lo_f) * scale + padding
    top = float(bins - padding)
    if closed_top:
        top = float(
            torch.nextafter(torch.tensor(top, dtype=t.dtype), torch.tensor(0.0, dtype=t.dtype))
        )
    return t.clamp(float(padding), top)


def _bspline3_taps(t: Tensor, bins: int) -> tuple[Tensor, tuple[int, ...], Tensor]:
    """Cubic B-spline taps: base ``(P,)``, offsets, weights ``(4, P)``."""
    t = t.clamp(1.0, float(bins - 2))
    base = torch.floor(t.detach()).clamp_(max=float(bins - 3))
    f = t - base  # in [0, 1], derivative 1 w.r.t. t
    g = 1.0 - f
    f2 = f * f
    g2 = g * g
    # B3 at the offsets -1, 0, 1, 2 from base: B3(1 + f), B3(f), B3(1 - f), B3(2 - f).
    w = torch.stack(
        (
            g2 * g / 6.0,
            2.0 / 3.0 - f2 * (1.0 - 0.5 * f),
            2.0 / 3.0 - g2 * (1.0 - 0.5 * g),
            f2 * f / 6.0,
        )
    )
    return base.long(), (-1, 0, 1, 2), w


def _gaussian_taps(
    t: Tensor, bins: int, sigma_bins: float
) -> tuple[Tensor, tuple[int, ...], Tensor]:
    """Truncated, shifted, normalised Gaussian: base, offsets ``-R .. R``, weights."""
    radius = math.ceil(3.0 * sigma_bins)
    t = t.clamp(float(radius), float(bins - 1 - radius))
    centre = torch.round(t.detach())
    offsets = torch.arange(-radius, radius + 1, device=t.device, dtype=t.dtype).unsqueeze(1)
    u = (centre + offsets - t) * (1.0 / sigma_bins)
    # Lowered by the kernel's value at R + 1/2 bins, the distance at which a tap enters or
    # leaves the window, so that the histogram is continuous in t.
    cut = (radius + 0.5) / sigma_bins
    w = (torch.exp(-0.5 * u * u) - math.exp(-0.5 * cut * cut)).clamp_min(0.0)
    w = w / w.sum(dim=0, keepdim=True)
    return centre.long(), tuple(range(-radius, radius + 1)), w


def _taps(
    values: Tensor, bins: int, kernel: str, sigma_bins: float
) -> tuple[Tensor, tuple[int, ...], Tensor | None]:
    """Taps of samples ``(P,)``: the bin of tap ``k`` of sample ``i`` is ``base[i] + offsets[k]``.

    Returns ``(base (P,) int64, offsets (T ints), weights (T, P))``, the weights contiguous
    per tap; the weights are None for the box kernel (all 1).
    """
    check_kernel(kernel, sigma_bins)
    bins = int(bins)
    needed = {"bspline0": 1, "bspline3": 4, "gaussian": 2 * math.ceil(3.0 * sigma_bins) + 1}[kernel]
    if bins < needed:
        raise ConfigError(f"a {kernel!r} histogram needs at least {needed} bins, got {bins}")
    t = values.reshape(-1)
    if not t.is_floating_point():
        t = t.to(torch.get_default_dtype())
    if kernel == "bspline0":
        base = torch.floor(t.detach()).clamp_(0.0, float(bins - 1)).long()
        return base, (0,), None
    if kernel == "bspline3":
        return _bspline3_taps(t, bins)
    return _gaussian_taps(t, bins, float(sigma_bins))


def parzen_weights(
    values: Tensor, bins: int, kernel: str = "bspline3", sigma_bins: float = 1.0
) -> tuple[Tensor, Tensor]:
    """Kernel taps of every sample: the few bins it contributes to, and how much.

    Args:
        values: continuous bin coordinates ``(P,)`` (any shape is flattened); see
            :func:`to_bin_coordinates`.
        bins: number of bins.
        kernel: ``"bspline3"`` (4 taps), ``"bspline0"`` (1 tap) or ``"gaussian"``
            (``2 ceil(3 sigma_bins) + 1`` taps); see the module docstring.
        sigma_bins: Gaussian standard deviation in bins (``"gaussian"`` only).

    Returns:
        ``(indices, weights)``, both ``(P, taps)`` (views of tap-major storage): int64 bin
        indices in ``[0, bins)`` and weights of the values' floating dtype, summing to 1 per
        sample, differentiable w.r.t. ``values`` for the smooth kernels.
    """
    base, offsets, w = _taps(values, bins, kernel, sigma_bins)
    idx = base.unsqueeze(0) + torch.tensor(offsets, device=base.device).unsqueeze(1)
    if w is None:
        dtype = values.dtype if values.is_floating_point() else torch.get_default_dtype()
        w = torch.ones(idx.shape, dtype=dtype, device=idx.device)
    return idx.T, w.T


def parzen_histogram(
    values: Tensor,
    bins: int,
    kernel: str = "bspline3",
    sigma_bins: float = 1.0,
    weights: Tensor | None = None,
    normalize: bool = False,
) -> Tensor:
    """Kernel-density histogram ``h[r, j] = sum_i w[i, r] K(j - t_i)``.

    Args:
        values: bin coordinates ``(P,)`` (flattened if not 1-D).
        bins: number of bins.
        kernel: Parzen kernel name (see :func:`parzen_weights`).
        sigma_bins: Gaussian standard deviation in bins.
        weights: ``None`` (every sample weighs 1), ``(P,)`` per-sample weights, or ``(P, R)``
            weights of each sample in each of ``R`` rows (for instance class posteriors).
        normalize: divide by the total mass so that the result sums to 1 (over all rows).

    Returns:
        ``(bins,)`` for ``weights`` ``None`` or ``(P,)``; ``(R, bins)`` for ``(P, R)`` weights.
        Differentiable w.r.t. ``values`` (through the kernel) and ``weights``.
    """
    base, offsets, w = _taps(values, bins, kernel, sigma_bins)
    n = base.shape[0]
    dtype = values.dtype if values.is_floating_point() else torch.get_default_dtype()
    if w is None:
        w = torch.ones((1, n), dtype=dtype, device=base.device)
    idx = base.unsqueeze(0) + torch.tensor(offsets, device=base.device).unsqueeze(1)  # (T, P)
    if weights is None or weights.dim() <= 1:
        if weights is not None:
            _check_weights(weights, n)
            w = w * weights.reshape(1, -1).to(w.dtype)
        hist = torch.zeros(bins, dtype=w.dtype, device=w.device).scatter_add(
            0, idx.reshape(-1), w.reshape(-1)
        )
    else:
        if weights.dim() != 2 or weights.shape[0] != n:
            raise ValueError(
                f"weights must be (P,) or (P, R) with P={n}, got {tuple(weights.shape)}"
            )
        rows = weights.shape[1]
        # Flat index r * bins + j, one entry per (tap, row, sample).
        row_offset = torch.arange(rows, device=idx.device).reshape(1, rows, 1) * bins
        flat = (idx.unsqueeze(1) + row_offset).reshape(-1)
        src = (w.unsqueeze(1) * weights.T.to(w.dtype).unsqueeze(0)).reshape(-1)
        hist = torch.zeros(rows * bins, dtype=w.dtype, device=w.device).scatter_add(0, flat, src)
        hist = hist.reshape(rows, bins)
    if normalize:
        hist = hist / hist.sum().clamp_min(torch.finfo(hist.dtype).tiny)
    return hist


def _check_weights(weights: Tensor, n: int) -> None:
    if weights.numel() != n:
        raise ValueError(
            f"weights must have one value per sample ({n}), got {tuple(weights.shape)}"
        )


def joint_histogram(
    x_bins: Tensor,
    y_bins: Tensor,
    bins_x: int,
    bins_y: int,
    kernel_x: str = "bspline0",
    kernel_y: str = "bspline3",
    weights: Tensor | None = None,
    sigma_x: float = 1.0,
    sigma_y: float = 1.0,
    normalize: bool = True,
) -> Tensor:
    """Parzen joint histogram ``p[a, b] ~ sum_i w_i Kx(a - x_i) Ky(b - y_i)``.

    The defaults are ITK's Mattes MI kernels (box for the fixed values ``x``, cubic B-spline
    for the moving values ``y``). Memory is ``O(P * taps_y)``: the loop runs over the few
    taps of ``x`` only, never over samples or bins.

    Args:
        x_bins: bin coordinates of the first variable ``(P,)`` (rows of the result).
        y_bins: bin coordinates of the second variable ``(P,)`` (columns).
        bins_x: number of rows.
        bins_y: number of columns.
        kernel_x: Parzen kernel along ``x`` (see :func:`parzen_weights`).
        kernel_y: Parzen kernel along ``y``.
        weights: optional non-negative per-sample weights ``(P,)`` (e.g. a soft mask).
        sigma_x: Gaussian standard deviation in bins along ``x`` (``"gaussian"`` only).
        sigma_y: Gaussian standard deviation in bins along ``y``.
        normalize: divide by the total mass, giving a joint probability table.

    Returns:
        ``(bins_x, bins_y)`` tensor, summing to 1 when ``normalize`` (and the total mass is
        positive); differentiable w.r.t. ``x_bins``, ``y_bins`` and ``weights``.
    """
    x = x_bins.reshape(-1)
    y = y_bins.reshape(-1)
    if x.shape != y.shape:
        raise ValueError(
            f"x and y must have the same number of samples, got {x.numel()} and {y.numel()}"
        )
    if weights is not None:
        _check_weights(weights, x.numel())
        weights = weights.reshape(-1)
    # Many taps (Gaussian kernels): process the samples in blocks that stay in cache.
    taps = _tap_count(kernel_x, sigma_x) * _tap_count(kernel_y, sigma_y)
    block = max(1 << 12, _BLOCK_ENTRIES // taps)
    if x.numel() > block and taps > 4:
        hist = None
        for s in range(0, x.numel(), block):
            part = _joint_counts(
                x[s : s + block],
                y[s : s + block],
                bins_x,
                bins_y,
                kernel_x,
                kernel_y,
                None if weights is None else weights[s : s + block],
                sigma_x,
                sigma_y,
            )
            hist = part if hist is None else hist + part
    else:
        hist = _joint_counts(x, y, bins_x, bins_y, kernel_x, kernel_y, weights, sigma_x, sigma_y)
    hist = hist.reshape(bins_x, bins_y)
    if normalize:
        hist = hist / hist.sum().clamp_min(torch.finfo(hist.dtype).tiny)
    return hist


_BLOCK_ENTRIES = 1 << 22
"""Scatter entries (samples x taps x taps) per block in :func:`joint_histogram`."""


def _tap_count(kernel: str, sigma_bins: float) -> int:
    if kernel == "gaussian":
        return 2 * math.ceil(3.0 * float(sigma_bins)) + 1
    return 4 if kernel == "bspline3" else 1


def _joint_counts(
    x: Tensor,
    y: Tensor,
    bins_x: int,
    bins_y: int,
    kernel_x: str,
    kernel_y: str,
    weights: Tensor | None,
    sigma_x: float,
    sigma_y: float,
) -> Tensor:
    """Unnormalised flat joint histogram ``(bins_x * bins_y,)`` of 1-D coordinates."""
    bx, ox, wx = _taps(x, bins_x, kernel_x, sigma_x)  # (P,), Tx ints, (Tx, P)
    by, oy, wy = _taps(y, bins_y, kernel_y, sigma_y)  # (P,), Ty ints, (Ty, P)
    dtypes = [v.dtype for v in (x, y) if v.is_floating_point()] or [torch.get_default_dtype()]
    dtype = dtypes[0] if len(dtypes) == 1 else torch.promote_types(*dtypes)
    if wy is None:
        wy = torch.ones((len(oy), by.shape[0]), dtype=dtype, device=by.device)
    wy = wy.to(dtype)
    if weights is not None:
        wy = wy * weights.reshape(1, -1).to(dtype)
    # Row-major flat bin (a, b) -> a * bins_y + b, split into a per-sample base and per-tap
    # offsets, so that one (Ty, P) integer add per x tap forms the indices.
    flat_base = bx * bins_y + by
    offsets_y = torch.tensor(oy, device=by.device).unsqueeze(1)
    hist = torch.zeros(bins_x * bins_y, dtype=dtype, device=by.device)
    for a, off_x in enumerate(ox):
        flat = flat_base + (offsets_y + off_x * bins_y)  # (Ty, P)
        src = wy if wx is None else wx[a].to(dtype) * wy
        hist = hist.scatter_add(0, flat.reshape(-1), src.reshape(-1))
    return hist


def entropy(p: Tensor, dim: int | Sequence[int] | None = None) -> Tensor:
    """Shannon entropy ``-sum p ln p`` in nats, with ``0 ln 0 = 0`` and a finite gradient there.

    Args:
        p: probabilities (already normalised over the summed dimensions).
        dim: dimensions to sum over; ``None`` sums over all.
    """
    safe = torch.where(p > 0, p, torch.ones((), dtype=p.dtype, device=p.device))
    terms = p * torch.log(safe)
    if dim is None:
        return -terms.sum()
    return -terms.sum(dim=dim)


def mutual_information_from_joint(p: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Entropies and MI of a normalised joint table ``p (bins_x, bins_y)``.

    Returns:
        ``(mi, h_x, h_y, h_xy)`` in nats, with ``mi = h_x + h_y - h_xy`` (the double sum
        ``sum p ln(p / (p_x p_y))`` of ITK's Mattes metric, written through entropies).
    """
    h_x = entropy(p.sum(dim=1))
    h_y = entropy(p.sum(dim=0))
    h_xy = entropy(p)
    return h_x + h_y - h_xy, h_x, h_y, h_xy

"""MIND-SSC (Heinrich et al. 2013): the self-similarity-context descriptor, compared by SSD or L1.

MIND describes each voxel by how similar small patches around it are to each other, which is
a property of the local anatomy and not of its contrast. The *self-similarity context* (SSC)
variant compares pairs of patches centred on the voxel's neighbours rather than each
neighbour against the voxel itself (which makes it robust to noise at the centre):

1. The neighbourhood is the star ``N = {+-dilation * e_a}`` along the grid axes (the
   six-neighbourhood in 3D, four in 2D). The descriptor's channels are the unordered pairs
   ``(a, b)`` of ``N`` that are not opposite (12 in 3D, 4 in 2D), i.e. neighbours
   ``sqrt(2) * dilation`` apart.
2. Patch distance of a pair: ``D_ab(x) = sum_p G(p) (I(x + a + p) - I(x + b + p))^2`` with a
   normalised Gaussian patch weight ``G`` of standard deviation `sigma` (voxels), truncated
   at `radius` voxels per axis (``radius=0``: single-voxel patches). Images are extended by
   replicating their border voxels.
3. Each voxel's distances are shifted by their minimum over the pairs and divided by their
   mean after the shift, ``V(x)``, the local "noise" estimate, which is kept within
   ``[1e-3, 1e3]`` times its mean over the image: ``MIND_ab(x) = exp(-(D_ab - min D) / V)``.

Because the squared patch differences scale by ``k^2`` under ``I -> k I + c`` and the
normalisation by ``V`` removes any common factor, the descriptor is unchanged by affine
intensity maps, including contrast inversion, and by any remap of an image with two
intensity levels; in general it is robust, not invariant, to nonlinear remaps and smooth
bias fields (which only scale the local distances).

How it is computed (as in Heinrich's reference code, ``deedsBCV``/``MIND-SSC.h``): a pair's
distance map is the squared difference between the image and a copy shifted by ``a - b``,
patch-filtered once and then shifted to the pair's centre, so the 12 channels cost 6 filtered
maps. The reference filters with a box; here the patch weight is the Gaussian of the paper.

The metric compares the descriptors of the fixed and the warped moving image voxel by voxel:
the loss is the mean over the (masked) voxels and channels of ``(F - M)^2`` (``"ssd"``,
default) or ``|F - M|`` (``"l1"``). The fixed image's descriptor is computed once per fixed
tensor and reused while that tensor is unchanged (the engine passes the same level image at
every evaluation of a level), so only the moving descriptor is computed per evaluation.
Offsets are in voxels: the grid spacing is not used.

Example:
    >>> import torch
    >>> from itreg.metrics import get_metric
    >>> f = (torch.rand(1, 12, 12, 12) > 0.5).float()
    >>> m = 3.0 - 2.0 * f                      # inverted, rescaled contrast
    >>> float(get_metric("mind-ssc")(f, m)) < 1e-10
    True
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from itreg.errors import ConfigError, unknown_name
from itreg.metrics.base import Metric

__all__ = ["MINDSSC", "MIND_DISTANCES", "mind_ssc", "mind_ssc_pairs"]

#: Descriptor comparisons of :class:`MINDSSC`.
MIND_DISTANCES = ("ssd", "l1")

#: The local variance estimate is kept within these multiples of its image mean.
_VAR_CLAMP = (1e-3, 1e3)


def mind_ssc_pairs(ndim: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """The SSC neighbour pairs ``(a, b)`` of unit offsets (tensor axis order), 12 in 3D, 4 in 2D.

    The neighbours are ``+-e_axis``; a pair is two distinct, non-opposite neighbours.
    """
    neighbours = []
    for axis in range(ndim):
        for sign in (1, -1):
            v = [0] * ndim
            v[axis] = sign
            neighbours.append(tuple(v))
    pairs = []
    for i, a in enumerate(neighbours):
        for b in neighbours[i + 1:]:
            if any(x + y for x, y in zip(a, b)):  # not opposite
                pairs.append((a, b))
    return pairs


def _gaussian(sigma: float, radius: int, dtype, device) -> Tensor:
    k = torch.arange(-radius, radius + 1, dtype=torch.float64)
    w = torch.exp(-0.5 * (k / sigma) ** 2)
    return (w / w.sum()).to(dtype=dtype, device=device)


def _smooth(values: Tensor, kernel: Tensor) -> Tensor:
    """Separable filtering of ``(N, *S)`` along every spatial axis, borders replicated.

    A weighted sum of shifted views per axis: on CPU several times faster than ``conv1d`` over
    reshaped rows for these short kernels, forward and backward.
    """
    radius = (kernel.numel() - 1) // 2
    if radius == 0:
        return values
    weights = kernel.tolist()
    out = values
    for axis in range(1, values.dim()):
        spec: list[int] = []
        for a in range(values.dim() - 1, 0, -1):  # F.pad lists the last axis first
            spec += [radius, radius] if a == axis else [0, 0]
        padded = F.pad(out.unsqueeze(0), spec, mode="replicate")[0]
        n = out.shape[axis]
        acc = padded.narrow(axis, 0, n) * weights[0]
        for j in range(1, 2 * radius + 1):
            acc = acc + padded.narrow(axis, j, n) * weights[j]
        out = acc
    return out


def _crop(values: Tensor, start: Sequence[int], size: Sequence[int]) -> Tensor:
    """``values[:, start[0]:start[0]+size[0], ...]`` over the spatial axes."""
    out = values
    for axis, (s, n) in enumerate(zip(start, size), start=1):
        out = out.narrow(axis, s, n)
    return out


def mind_ssc(image: Tensor, dilation: int = 2, radius: int = 2, sigma: float = 0.8,
             eps: float | None = None) -> Tensor:
    """The MIND-SSC descriptor of an image (see the module docstring).

    Args:
        image: ``(C, Y, X)`` or ``(C, Z, Y, X)``.
        dilation: distance of the neighbours from the centre, in voxels.
        radius: half-width of the patch in voxels (the Gaussian is truncated there).
        sigma: standard deviation of the Gaussian patch weight in voxels.
        eps: smallest local variance (avoids 0 / 0 on constant images); None: the dtype's
            smallest normal number.

    Returns:
        ``(C * K, *S)`` with ``K`` = 12 (3D) or 4 (2D) channels per input channel, values in
        ``(0, 1]``, channel ``c * K + k`` for input channel ``c`` and pair
        ``mind_ssc_pairs(D)[k]``.
    """
    if image.dim() not in (3, 4):
        raise ConfigError(f"MIND-SSC needs a 2D or 3D image (C, *S), got {tuple(image.shape)}")
    ndim = image.dim() - 1
    size = tuple(image.shape[1:])
    d = int(dilation)
    pairs = mind_ssc_pairs(ndim)
    # The distinct pair differences up to sign (6 in 3D, 2 in 2D), each filtered once.
    bases: list[tuple[int, ...]] = []
    use: list[tuple[int, tuple[int, ...]]] = []  # (base index, where the pair's centre is)
    for a, b in pairs:
        v = tuple(x - y for x, y in zip(a, b))
        first = next(x for x in v if x)
        if first < 0:  # (I(x+a) - I(x+b))^2 = S_{b-a}(x + a)
            v, anchor = tuple(-x for x in v), a
        else:  # = S_{a-b}(x + b)
            anchor = b
        if v not in bases:
            bases.append(v)
        use.append((bases.index(v), anchor))
    # Pad by 2d: S_v(y) is needed for y within d of the grid, and reads I at y + v.
    padded = F.pad(image.unsqueeze(0), (2 * d,) * (2 * ndim), mode="replicate")[0]
    ext = tuple(n + 2 * d for n in size)  # the region y in [-d, n + d)
    kernel = _gaussian(float(sigma), int(radius), image.dtype, image.device)
    maps = []
    for v in bases:
        here = _crop(padded, [d] * ndim, ext)
        there = _crop(padded, [d + d * x for x in v], ext)
        maps.append((there - here) ** 2)
    stacked = torch.stack(maps, dim=1)  # (C, B, *ext)
    c, nb = stacked.shape[:2]
    filtered = _smooth(stacked.reshape(c * nb, *ext), kernel).reshape(c, nb, *ext)
    dist = torch.stack([_crop(filtered[:, k], [d + d * x for x in anchor], size)
                        for k, anchor in use], dim=1)  # (C, K, *S)
    dist = dist - dist.min(dim=1, keepdim=True).values
    var = dist.mean(dim=1, keepdim=True)
    tiny = torch.finfo(dist.dtype).tiny if eps is None else float(eps)
    dims = tuple(range(2, var.dim()))
    mean = var.mean(dim=dims, keepdim=True)
    var = torch.minimum(torch.maximum(var, _VAR_CLAMP[0] * mean), _VAR_CLAMP[1] * mean)
    var = var.clamp_min(tiny)
    return torch.exp(-dist / var).reshape(c * len(pairs), *size)


class MINDSSC(Metric):
    """MIND-SSC descriptors compared by SSD (default) or L1 (see the module docstring).

    Args:
        dilation: neighbour distance in voxels (default 2, as in Heinrich's code).
        radius: patch half-width in voxels (default 2).
        sigma: Gaussian patch standard deviation in voxels (default 0.8).
        distance: ``"ssd"`` (mean squared descriptor difference) or ``"l1"``.
    """

    name = "mind-ssc"
    requires_spatial = True
    quantity_name = "MIND-SSC mean descriptor distance (dimensionless, [0, 1])"
    quantity_sign = 1.0

    def __init__(self, dilation: int = 2, radius: int = 2, sigma: float = 0.8,
                 distance: str = "ssd") -> None:
        super().__init__()
        for label, value, low in (("dilation", dilation, 1), ("radius", radius, 0)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or \
                    int(value) != value or int(value) < low:
                raise ConfigError(f"MIND-SSC {label} must be an integer >= {low}, got {value!r}")
        try:
            sigma = float(sigma)
        except (TypeError, ValueError):
            raise ConfigError(f"MIND-SSC sigma must be a positive number, got {sigma!r}") from None
        if not (math.isfinite(sigma) and sigma > 0):
            raise ConfigError(f"MIND-SSC sigma must be a positive number, got {sigma!r}")
        if distance not in MIND_DISTANCES:
            raise unknown_name("MIND-SSC distance", str(distance), MIND_DISTANCES)
        self.dilation, self.radius, self.sigma = int(dilation), int(radius), sigma
        self.distance = distance
        self.settings = {"dilation": self.dilation, "radius": self.radius, "sigma": sigma,
                         "distance": distance}
        self._cached: tuple[weakref.ref, tuple, Tensor] | None = None

    def descriptor(self, image: Tensor) -> Tensor:
        """:func:`mind_ssc` of ``image`` with this metric's settings."""
        return mind_ssc(image, self.dilation, self.radius, self.sigma)

    def _fixed_descriptor(self, fixed: Tensor) -> Tensor:
        """The fixed descriptor, reused while the same, unmodified fixed tensor comes back."""
        if fixed.requires_grad:
            return self.descriptor(fixed)
        key = (fixed.data_ptr(), fixed._version, tuple(fixed.shape), tuple(fixed.stride()),
               fixed.dtype, fixed.device)
        if self._cached is not None:
            ref, old_key, desc = self._cached
            if ref() is fixed and old_key == key:
                return desc
        desc = self.descriptor(fixed).detach()
        self._cached = (weakref.ref(fixed), key, desc)
        return desc

    def loss(self, fixed, moving, mask, fixed_range, moving_range) -> Tensor:
        df = self._fixed_descriptor(fixed)
        dm = self.descriptor(moving)
        diff = df - dm
        per_voxel = (diff * diff if self.distance == "ssd" else diff.abs()).mean(dim=0)
        flat = per_voxel.reshape(-1)
        if mask is None:
            return flat.mean()
        if mask.dtype == torch.bool:
            return flat[mask.reshape(-1)].mean()
        w = mask.reshape(-1).to(flat.dtype)
        return (flat * w).sum() / w.sum()

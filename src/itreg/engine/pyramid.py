"""Multi-resolution pyramids: Gaussian smoothing in mm and shrunk grids.

For each level the fixed image is smoothed with a Gaussian of the level's sigma (given in mm,
converted per axis with the image's spacing) and resampled onto ``fixed.grid.shrink(factor)``,
the level grid that sample points and dense fields live on. The moving image is smoothed alike
and decimated on its own grid to a spacing close to the level's (it is only ever interpolated
at mapped points, so it needs no resampling onto the fixed grid). Masks follow by nearest
neighbour.

Smoothing is separable (one pass per axis, shift-and-add with replicated edges; several times
faster than ``conv3d`` on CPU) and decimates during the pass, so a coarse level costs a
fraction of a full-resolution filter. Levels are built fine to coarse, each from the finer one
with the missing part of the blur (``sqrt(sigma**2 - sigma_done**2)``), and cached, so stages
that share a schedule share their levels.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from itreg.grid import Grid
from itreg.image import Image

logger = logging.getLogger(__name__)

#: Kernel radius in standard deviations.
TRUNCATE = 3.0


def gaussian_kernel(sigma_vox: float, dtype: torch.dtype = torch.float32, device=None) -> Tensor:
    """A normalised sampled Gaussian of standard deviation `sigma_vox` voxels.

    Args:
        sigma_vox: standard deviation in voxels (> 0).
        dtype: dtype of the kernel.
        device: device of the kernel.

    Returns:
        Tensor ``(2 r + 1,)`` summing to 1, with ``r = max(ceil(3 sigma), 1)``.
    """
    radius = max(math.ceil(TRUNCATE * sigma_vox), 1)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma_vox) ** 2)
    return (k / k.sum()).to(dtype=dtype, device=device)


def smooth_axis(data: Tensor, dim: int, sigma_vox: float, stride: int = 1) -> Tensor:
    """Gaussian-smooth `data` along tensor axis `dim` and keep every `stride`-th sample.

    Edges are replicated (zero-flux, as ITK's default boundary condition). Output sample ``j``
    sits at input index ``j * stride``.

    Args:
        data: floating tensor of any shape.
        dim: the axis to filter.
        sigma_vox: standard deviation in voxels of that axis; ``0`` only decimates.
        stride: decimation factor (>= 1).

    Returns:
        Tensor with ``ceil(n / stride)`` samples along `dim`.
    """
    n = data.shape[dim]
    m = (n - 1) // stride + 1
    index = (slice(None),) * (dim % data.dim())
    if sigma_vox <= 0:
        return data if stride == 1 else data[index + (slice(0, None, stride),)].contiguous()
    kernel = gaussian_kernel(sigma_vox, dtype=torch.float64).tolist()
    r = len(kernel) // 2
    pad_shape = list(data.shape)
    pad_shape[dim] = r
    first = data.narrow(dim, 0, 1).expand(*pad_shape)
    last = data.narrow(dim, n - 1, 1).expand(*pad_shape)
    padded = torch.cat([first, data, last], dim=dim)

    def tap(i: int) -> Tensor:
        return padded[index + (slice(i, i + (m - 1) * stride + 1, stride),)]

    out = tap(0) * kernel[0]
    for i in range(1, len(kernel)):
        out.add_(tap(i), alpha=kernel[i])
    return out


def smooth(data: Tensor, sigma_vox: Sequence[float], stride: Sequence[int] | None = None) -> Tensor:
    """Separable Gaussian smoothing of ``(C, *S)`` data, with optional decimation.

    Args:
        data: floating tensor ``(C, *S)``.
        sigma_vox: sigma in voxels per spatial tensor axis (``S`` order, i.e. ``(z, y, x)``).
        stride: decimation per spatial tensor axis; default 1.

    Returns:
        The filtered tensor ``(C, *S')``.
    """
    nd = data.dim() - 1
    stride = tuple(stride) if stride is not None else (1,) * nd
    # Decimating axes first makes the later passes cheaper.
    order = sorted(range(nd), key=lambda a: -stride[a])
    for a in order:
        data = smooth_axis(data, a + 1, float(sigma_vox[a]), int(stride[a]))
    return data


def smooth_image(image: Image, sigma_mm: float | Sequence[float],
                 stride: int | Sequence[int] = 1) -> Image:
    """Smooth an image with a Gaussian given in mm and decimate it by `stride` per axis.

    Args:
        image: floating-point image.
        sigma_mm: sigma in mm, one value or one per axis in ITK order ``(x, y[, z])``.
        stride: decimation per axis in ITK order (or one value).

    Returns:
        The smoothed image on the decimated grid (same origin and direction, spacing times
        stride, ``ceil(n / stride)`` voxels per axis).
    """
    d = image.ndim
    sig = (float(sigma_mm),) * d if isinstance(sigma_mm, (int, float)) else tuple(sigma_mm)
    st = (int(stride),) * d if isinstance(stride, int) else tuple(int(s) for s in stride)
    sigma_vox = [s / sp for s, sp in zip(sig, image.grid.spacing)]
    data = smooth(image.data, sigma_vox[::-1], st[::-1])
    grid = image.grid
    if any(s > 1 for s in st):
        size = tuple((n - 1) // s + 1 for n, s in zip(grid.size, st))
        spacing = tuple(sp * s for sp, s in zip(grid.spacing, st))
        grid = Grid(size, spacing, grid.origin, grid.direction)
    return Image(data, grid, is_label=False)


@dataclass(frozen=True)
class _Smoothed:
    """A smoothed, decimated copy of an image: sigma applied so far per axis (mm)."""

    image: Image
    sigma_mm: float


class ImagePyramid:
    """Smoothed, decimated versions of one image, built from the finest available one.

    Args:
        image: the full-resolution floating-point image.
    """

    def __init__(self, image: Image) -> None:
        self.image = image
        self._cache: dict[tuple, _Smoothed] = {(0.0, (1,) * image.ndim): _Smoothed(image, 0.0)}

    def stride_for(self, spacing_mm: float) -> tuple[int, ...]:
        """Decimation per axis that keeps the spacing at or below `spacing_mm`."""
        return tuple(max(1, math.floor(spacing_mm / s + 1e-6)) for s in self.image.grid.spacing)

    def get(self, sigma_mm: float, stride: tuple[int, ...]) -> Image:
        """The image smoothed with `sigma_mm` and decimated by `stride` (cached)."""
        key = (float(sigma_mm), tuple(stride))
        if key in self._cache:
            return self._cache[key].image
        # Start from the coarsest cached version that is still finer in both respects.
        candidates = [
            (k, v) for k, v in self._cache.items()
            if k[0] <= sigma_mm and all(s % c == 0 for s, c in zip(stride, k[1]))
        ]
        (src_sigma, src_stride), src = max(candidates, key=lambda kv: (math.prod(kv[0][1]),
                                                                       kv[0][0]))
        extra = math.sqrt(max(sigma_mm ** 2 - src_sigma ** 2, 0.0))
        rel = tuple(s // c for s, c in zip(stride, src_stride))
        out = smooth_image(src.image, extra, rel)
        self._cache[key] = _Smoothed(out, float(sigma_mm))
        return out


@dataclass(frozen=True)
class Level:
    """The images of one resolution level.

    Attributes:
        index: position in the schedule (0 = coarsest).
        shrink: shrink factor of the fixed grid.
        sigma_mm: smoothing sigma in mm.
        grid: the level's fixed grid, ``fixed.grid.shrink(shrink)``.
        fixed: the smoothed fixed image on `grid`.
        fixed_mask: bool tensor ``grid.shape`` (True where samples may be drawn).
        moving: the smoothed, decimated moving image (on a grid of its own).
        moving_mask: the moving mask as a float 0/1 image on the moving grid, or None.
    """

    index: int
    shrink: int
    sigma_mm: float
    grid: Grid
    fixed: Image
    fixed_mask: Tensor
    moving: Image
    moving_mask: Image | None


class Pyramid:
    """Levels of a fixed/moving pair, built on demand and cached across stages.

    Args:
        fixed: floating-point fixed image.
        moving: floating-point moving image.
        fixed_mask: bool tensor on the fixed grid, or None.
        moving_mask: float 0/1 image on the moving grid, or None.
    """

    def __init__(self, fixed: Image, moving: Image, fixed_mask: Tensor | None = None,
                 moving_mask: Image | None = None) -> None:
        self.fixed = fixed
        self.moving = moving
        self.fixed_mask = fixed_mask
        self.moving_mask = moving_mask
        self._fixed = ImagePyramid(fixed)
        self._moving = ImagePyramid(moving)
        self._levels: dict[tuple[int, float], Level] = {}

    def levels(self, shrink: Sequence[int], smoothing_mm: Sequence[float]) -> list[Level]:
        """The levels of a schedule, coarsest first (built fine to coarse for reuse)."""
        pairs = list(zip(shrink, smoothing_mm))
        for f, s in sorted(set(pairs), key=lambda p: (p[0], p[1])):
            self._level(int(f), float(s))
        return [self._with_index(self._levels[(int(f), float(s))], i)
                for i, (f, s) in enumerate(pairs)]

    @staticmethod
    def _with_index(level: Level, index: int) -> Level:
        return Level(index, level.shrink, level.sigma_mm, level.grid, level.fixed,
                     level.fixed_mask, level.moving, level.moving_mask)

    def _level(self, shrink: int, sigma_mm: float) -> Level:
        key = (shrink, sigma_mm)
        if key in self._levels:
            return self._levels[key]
        from itreg.warp import resample  # layer 2; imported lazily to keep import cheap

        grid = self.fixed.grid.shrink(shrink)
        smoothed = self._fixed.get(sigma_mm, (shrink,) * grid.ndim)
        fixed = smoothed if smoothed.grid.same_as(grid) else resample(smoothed, None, grid,
                                                                      mode="linear")
        if self.fixed_mask is None:
            mask = torch.ones(grid.shape, dtype=torch.bool, device=fixed.device)
        elif grid.same_as(self.fixed.grid):
            mask = self.fixed_mask
        else:
            mimg = Image(self.fixed_mask.to(fixed.dtype), self.fixed.grid, is_label=False)
            mask = resample(mimg, None, grid, mode="nearest").data[0] > 0.5
        moving = self._moving.get(sigma_mm, self._moving.stride_for(min(grid.spacing)))
        level = Level(0, shrink, sigma_mm, grid, fixed, mask, moving, self.moving_mask)
        logger.debug("level shrink=%d sigma=%.3g mm: fixed %s, moving %s", shrink, sigma_mm,
                     grid.size, moving.grid.size)
        self._levels[key] = level
        return level

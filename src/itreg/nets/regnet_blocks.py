"""Building blocks of the pairwise registration networks (:mod:`itreg.nets.regnets`): the
convolution and squeeze-and-excitation blocks, input padding, batch warping through
:func:`itreg.warp.sample`, the batch output :class:`RegOutput`, and the normalised <-> world
affine algebra of AffineNet. 2D and 3D share one code path (``ndim`` picks the layer types).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from itreg.errors import ConfigError, GeometryError
from itreg.grid import Grid
from itreg.image import Image
from itreg.transforms import Affine, DisplacementField
from itreg.warp import sample

NORMS = ("instance", "batch", "none")
"""Normalisation layers of the convolution blocks."""

FIELDS = ("displacement", "svf")
"""What a DeformNet's flow head predicts."""


def _check_ndim(ndim: int) -> int:
    if isinstance(ndim, bool) or int(ndim) != ndim or int(ndim) not in (2, 3):
        raise GeometryError(f"registration networks are 2D or 3D, got ndim={ndim!r}")
    return int(ndim)


def _layer(name: str, ndim: int) -> type[nn.Module]:
    return getattr(nn, f"{name}{ndim}d")


def _norm(kind: str, channels: int, ndim: int) -> nn.Module:
    if kind == "instance":
        return _layer("InstanceNorm", ndim)(channels, affine=True)
    if kind == "batch":
        return _layer("BatchNorm", ndim)(channels)
    return nn.Identity()


def _check_choice(name: str, value: str, valid: Sequence[str]) -> str:
    if value not in valid:
        raise ConfigError(f"unknown {name} {value!r}; valid values are: {', '.join(valid)}")
    return value


def _check_features(features: Sequence[int], n: int | None, what: str) -> tuple[int, ...]:
    try:
        out = tuple(int(f) for f in features)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{what} must be a sequence of positive integers, got {features!r}") \
            from exc
    if not out or any(f < 1 for f in out) or (n is not None and len(out) != n):
        need = f"{n} " if n is not None else ""
        raise ConfigError(f"{what} must be {need}positive integers, got {features!r}")
    return out


class ConvBlock(nn.Module):
    """``conv k3 (stride s) -> norm -> LeakyReLU(0.2)``, 2D or 3D."""

    def __init__(self, ndim: int, c_in: int, c_out: int, stride: int = 1, norm: str = "instance"):
        super().__init__()
        self.conv = _layer("Conv", ndim)(c_in, c_out, 3, stride=stride, padding=1)
        self.norm = _norm(norm, c_out, ndim)
        self.act = nn.LeakyReLU(0.2)

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.norm(self.conv(x)))


class SqueezeExcitation(nn.Module):
    """Channel attention (Hu et al.): ``x * sigmoid(W2 relu(W1 mean_S(x)))``."""

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        hidden = max(channels // reduction, 1)
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, x: Tensor) -> Tensor:
        w = x.mean(dim=tuple(range(2, x.dim())))
        w = torch.sigmoid(self.fc2(F.relu(self.fc1(w))))
        return x * w.view(*w.shape, *([1] * (x.dim() - 2)))


def _pad(x: Tensor, levels: int) -> tuple[Tensor, tuple[slice, ...]]:
    """Zero-pad the spatial axes to a multiple of ``2**levels`` (>= ``2**(levels+1)``)."""
    m = 2**levels
    pads: list[int] = []
    crop: list[slice] = []
    for n in reversed(x.shape[2:]):  # F.pad takes the last axis first
        target = max(-(-n // m) * m, 2 * m)
        before = (target - n) // 2
        pads += [before, target - n - before]
    for n, i in zip(x.shape[2:], range(len(x.shape) - 2)):
        before = pads[2 * (len(x.shape) - 3 - i)]
        crop.append(slice(before, before + n))
    if any(pads):
        x = F.pad(x, pads)
    return x, tuple(crop)


def warp_batch(images: Tensor, grid: Grid, points: Tensor, mode: str = "linear") -> Tensor:
    """Sample a batch of images on `grid` at world points with :func:`itreg.warp.sample`.

    Args:
        images: ``(B, C, *grid.shape)`` values on `grid`.
        grid: the images' grid.
        points: ``(B, *S, D)`` world points (mm, ITK order).
        mode: interpolation mode of :func:`itreg.warp.sample`.

    Returns:
        ``(B, C, *S)``; zero where a point falls outside the image's voxel extent.
        Differentiable with respect to `images` and `points` for ``"linear"``.
    """
    out = [sample(Image(images[b], grid, is_label=False), points[b], mode=mode)[0]
           for b in range(images.shape[0])]
    return torch.stack(out)


@dataclass
class RegOutput:
    """What a registration network's batch forward returns.

    Attributes:
        warped: ``(B, C, *S)`` moving images warped onto the fixed grid, ``moving(T(x))``.
        displacement: ``(B, D, *S)`` ``T(x) - x`` of the whole map, world mm, on the fixed grid.
        points: ``(B, *S, D)`` ``T(x)`` in world mm (warp other images, e.g. labels, with them).
        affine: ``(B, D+1, D+1)`` world homogeneous matrices of the affine part, or None.
        field: ``(B, D, *S)`` world-mm displacement of the deformable part alone (what the
            regularisers act on), or None for an affine network.
        velocity: ``(B, D, *S)`` world-mm stationary velocity of an SVF network, else None.
        affine_warped: ``(B, C, *S)`` the moving images after the affine part of a cascade.
    """

    warped: Tensor
    displacement: Tensor
    points: Tensor
    affine: Tensor | None = None
    field: Tensor | None = None
    velocity: Tensor | None = None
    affine_warped: Tensor | None = None


def _affine_transform(matrix: Tensor, grid: Grid) -> Affine:
    """An itreg Affine (centre: the grid centre) from a world homogeneous matrix."""
    h = matrix.detach().to("cpu", torch.float64)
    d = grid.ndim
    return Affine.from_matrix(h[:d, :d].numpy(), h[:d, d].numpy(), center=grid.center,
                              dtype=torch.float32, device=matrix.device)


def _field_transform(field: Tensor, grid: Grid) -> DisplacementField:
    return DisplacementField(field.detach().to(torch.float32), grid, learnable=False)


def world_affine(theta: Tensor, grid: Grid) -> Tensor:
    """World homogeneous matrices ``(B, D+1, D+1)`` of normalised-space maps ``(B, D, D+1)``.

    ``H_w = M^-1 [theta; 0 1] M`` with ``M = grid.world_to_normalized_matrix()`` (computed in
    float64, applied in `theta`'s dtype; differentiable in `theta`).
    """
    d = grid.ndim
    m = torch.as_tensor(grid.world_to_normalized_matrix(), dtype=torch.float64)
    m_inv = torch.linalg.inv(m)
    m, m_inv = (t.to(dtype=theta.dtype, device=theta.device) for t in (m, m_inv))
    bottom = torch.zeros(theta.shape[0], 1, d + 1, dtype=theta.dtype, device=theta.device)
    bottom[..., d] = 1.0
    h = torch.cat([theta, bottom], dim=1)
    return m_inv @ h @ m


def apply_affine(matrix: Tensor, points: Tensor, batched: bool = False) -> Tensor:
    """``A x + b`` for homogeneous matrices ``(B, D+1, D+1)``.

    Args:
        matrix: ``(B, D+1, D+1)`` homogeneous matrices.
        points: ``(*S, D)`` points shared by the batch, or ``(B, *S, D)`` with ``batched``.
        batched: whether `points` has a leading batch axis.

    Returns:
        ``(B, *S, D)`` mapped points.
    """
    b, d = matrix.shape[0], matrix.shape[-1] - 1
    if batched:
        flat, shape = points.reshape(b, -1, d), points.shape[1:-1]
    else:
        flat, shape = points.reshape(1, -1, d).expand(b, -1, d), points.shape[:-1]
    out = flat @ matrix[:, :d, :d].transpose(1, 2) + matrix[:, None, :d, d]
    return out.reshape(b, *shape, d)



__all__ = ["FIELDS", "NORMS", "ConvBlock", "RegOutput", "SqueezeExcitation", "apply_affine",
           "warp_batch", "world_affine"]

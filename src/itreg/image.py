"""`Image`: a tensor of voxels on a world-space `Grid`.

The tensor is ``(C, *grid.shape)``, i.e. ``(C, Z, Y, X)`` in 3D and ``(C, Y, X)`` in 2D. Integer
tensors are label maps: they keep their dtype and are resampled label-preservingly (see
:mod:`itreg.warp`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from itreg.errors import GeometryError, InvalidImageError
from itreg.grid import Grid


@dataclass(frozen=True, eq=False)
class Image:
    """Voxel data ``(C, *grid.shape)`` on a grid.

    Args:
        data: tensor ``(C, *grid.shape)``; a tensor of exactly ``grid.shape`` gets C = 1.
        grid: the sampling grid in world coordinates.
        is_label: whether the voxels are labels. Defaults to ``True`` for integer and bool
            tensors, ``False`` for floating-point ones.
    """

    data: Tensor
    grid: Grid
    is_label: bool | None = None

    def __post_init__(self) -> None:
        data = torch.as_tensor(self.data)
        if tuple(data.shape) == self.grid.shape:
            data = data.unsqueeze(0)
        if data.dim() != self.grid.ndim + 1 or tuple(data.shape[1:]) != self.grid.shape:
            raise GeometryError(
                f"image tensor of shape {tuple(data.shape)} does not match grid shape "
                f"{self.grid.shape} (expected (C, *shape))"
            )
        object.__setattr__(self, "data", data)
        if self.is_label is None:
            object.__setattr__(self, "is_label", not data.is_floating_point())

    @classmethod
    def from_tensor(
        cls,
        data: Tensor,
        spacing: Sequence[float] | None = None,
        origin: Sequence[float] | None = None,
        direction: Sequence[float] | None = None,
        channels: bool = False,
        is_label: bool | None = None,
    ) -> Image:
        """Wrap a tensor ``(*shape)`` (or ``(C, *shape)`` with ``channels=True``)."""
        data = torch.as_tensor(data)
        shape = tuple(data.shape[1:] if channels else data.shape)
        grid = Grid(tuple(reversed(shape)), spacing or (), origin or (), direction or ())
        return cls(data, grid, is_label)

    # ------------------------------------------------------------------ properties
    @property
    def ndim(self) -> int:
        return self.grid.ndim

    @property
    def channels(self) -> int:
        return int(self.data.shape[0])

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def dtype(self) -> torch.dtype:
        return self.data.dtype

    # ------------------------------------------------------------------ copies
    def with_data(self, data: Tensor, is_label: bool | None = None) -> Image:
        """Same grid, new voxels (label flag re-derived from the dtype unless given)."""
        return Image(data, self.grid, is_label)

    def to(self, *args, **kwargs) -> Image:
        return replace(self, data=self.data.to(*args, **kwargs))

    def float(self, dtype: torch.dtype = torch.float32) -> Image:
        """Floating-point copy (keeps the label flag: values are still labels)."""
        return Image(self.data.to(dtype), self.grid, self.is_label)

    # ------------------------------------------------------------------ checks
    def check_finite(self, name: str = "image") -> None:
        """Raise InvalidImageError if any voxel is NaN or Inf."""
        if self.data.is_floating_point():
            bad = int((~torch.isfinite(self.data)).sum())
            if bad:
                raise InvalidImageError(
                    f"{name} has {bad} NaN/Inf voxels; fix or mask them before registering"
                )

    def check_not_constant(self, name: str = "image", mask: Tensor | None = None) -> None:
        """Raise InvalidImageError if the image (inside `mask`) has no contrast."""
        values = self.data if mask is None else self.data[:, mask.bool().reshape(self.grid.shape)]
        if values.numel() == 0:
            raise InvalidImageError(f"{name} is empty")
        if float(values.max() - values.min()) == 0.0:
            raise InvalidImageError(
                f"{name} is constant (all voxels {float(values.flatten()[0]):g}); "
                "registration needs image contrast"
            )

    def __repr__(self) -> str:
        kind = "label" if self.is_label else "intensity"
        return (
            f"Image({kind}, channels={self.channels}, dtype={self.dtype}, device={self.device}, "
            f"{self.grid!r})"
        )

"""The `Metric` base class and the input checks shared by all metrics.

A metric is a loss: lower means better aligned (``docs/architecture.md``, Metrics). Its
``forward(fixed, moving, mask=None, fixed_range=None, moving_range=None)`` takes two tensors of
equal shape ``(C, *S)``, where ``S`` is a spatial shape (2D ``(Y, X)`` or 3D ``(Z, Y, X)``) or a
flat sample ``(P,)``, and returns a 0-d tensor. ``quantity(loss)`` gives the quantity of the
paper (for example MI in nats) for reports; ``quantity_name`` names it.

Masks have the shape ``S``: a bool mask selects voxels, a float mask weighs them (non-negative
weights; the voxels with weight 0 are ignored). A mask that selects nothing raises
:class:`~itreg.errors.MaskError`.
"""

from __future__ import annotations

import abc
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from itreg.errors import GeometryError, MaskError
from itreg.metrics.intensity import (
    DEFAULT_PERCENTILES,
    check_intensity,
    intensity_range,
)

__all__ = ["Metric", "check_mask", "check_pair", "flatten_samples", "resolve_range"]

Range = Sequence[float] | Sequence[Tensor] | None


def check_pair(fixed: Tensor, moving: Tensor, spatial: bool = False) -> tuple[Tensor, Tensor]:
    """Validate two metric inputs ``(C, *S)``; return them in a common floating dtype.

    Integer or bool inputs become the default float dtype; otherwise the dtypes are promoted
    (float32 with float64 gives float64).

    Raises:
        GeometryError: shapes differ, fewer than 2 dimensions, or ``spatial`` and ``S`` is not
            2D or 3D.
    """
    if not isinstance(fixed, Tensor) or not isinstance(moving, Tensor):
        raise TypeError("fixed and moving must be torch tensors (C, *S)")
    if fixed.shape != moving.shape:
        raise GeometryError(
            f"fixed {tuple(fixed.shape)} and moving {tuple(moving.shape)} must have the same shape"
        )
    if fixed.dim() < 2:
        raise GeometryError(f"metric inputs must be (C, *S), got shape {tuple(fixed.shape)}")
    if spatial and fixed.dim() not in (3, 4):
        raise GeometryError(
            f"this metric needs 2D or 3D images (C, Y, X) or (C, Z, Y, X), got {tuple(fixed.shape)}"
        )
    dtype = torch.promote_types(fixed.dtype, moving.dtype)
    if not dtype.is_floating_point:
        dtype = torch.get_default_dtype()
    return fixed.to(dtype), moving.to(dtype)


def check_mask(mask: Tensor | None, spatial_shape: Sequence[int], device=None) -> Tensor | None:
    """Validate a mask of shape ``spatial_shape``; return it (bool, or float weights) or None.

    Raises:
        MaskError: wrong shape, negative or non-finite weights, or nothing selected.
    """
    if mask is None:
        return None
    mask = torch.as_tensor(mask, device=device)
    if tuple(mask.shape) != tuple(spatial_shape):
        raise MaskError(
            f"mask of shape {tuple(mask.shape)} does not match the image shape {tuple(spatial_shape)}"
        )
    if mask.dtype == torch.bool:
        if not bool(mask.any()):
            raise MaskError("the mask selects no voxels")
        return mask
    if not mask.is_floating_point():
        mask = mask.to(torch.get_default_dtype())
    if not bool(torch.isfinite(mask).all()) or bool((mask < 0).any()):
        raise MaskError("mask weights must be finite and non-negative")
    if not bool((mask > 0).any()):
        raise MaskError("the mask selects no voxels (all weights are 0)")
    return mask


def flatten_samples(
    fixed: Tensor, moving: Tensor, mask: Tensor | None
) -> tuple[Tensor, Tensor, Tensor | None]:
    """Flatten ``(C, *S)`` inputs to ``(C, P)`` samples.

    A bool mask selects the voxels (so ``P`` is their number and the weights are None); a float
    mask is returned flattened as per-sample weights ``(P,)`` (cast to the inputs' dtype).
    """
    c = fixed.shape[0]
    if mask is None:
        return fixed.reshape(c, -1), moving.reshape(c, -1), None
    if mask.dtype == torch.bool:
        return fixed[:, mask], moving[:, mask], None
    return fixed.reshape(c, -1), moving.reshape(c, -1), mask.reshape(-1).to(fixed.dtype)


def resolve_range(
    given: Range,
    values: Tensor,
    weights: Tensor | None,
    intensity: str,
    percentiles: Sequence[float],
) -> tuple[float, float]:
    """The intensity range to use: ``given`` if not None, else the one of the setting.

    ``values`` are the selected samples; with float ``weights`` the positive ones select.
    """
    if given is not None:
        try:
            lo, hi = (float(x) for x in given)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"an intensity range must be a pair (lo, hi), got {given!r}") from exc
        return lo, hi
    mask = None if weights is None else (weights > 0).expand_as(values)
    return intensity_range(values, mask, intensity, percentiles)


class Metric(nn.Module, abc.ABC):
    """Base class of all image similarity metrics (a loss: lower is better aligned).

    Subclasses set the class attributes and implement :meth:`loss`.

    Attributes:
        name: registry name.
        requires_spatial: True when the metric needs images on a grid (``S`` 2D or 3D), for
            instance local NCC; False for metrics of the voxel values alone, which also accept a
            flat sample ``(C, P)``.
        quantity_name: the paper's quantity that the loss encodes, with units.
        quantity_sign: ``quantity = quantity_sign * loss`` (-1 for MI, +1 for MSE).
        uses_intensity_range: whether the metric scales intensities through a range (histogram
            metrics); the others ignore ``fixed_range`` and ``moving_range``.
    """

    name: str = "metric"
    requires_spatial: bool = False
    quantity_name: str = "loss"
    quantity_sign: float = 1.0
    uses_intensity_range: bool = False

    def __init__(
        self, intensity: str = "percentile", percentiles: Sequence[float] = DEFAULT_PERCENTILES
    ) -> None:
        super().__init__()
        self.percentiles = check_intensity(intensity, percentiles)
        self.intensity = intensity
        self.settings: dict[str, Any] = {}

    def forward(
        self,
        fixed: Tensor,
        moving: Tensor,
        mask: Tensor | None = None,
        fixed_range: Range = None,
        moving_range: Range = None,
    ) -> Tensor:
        """The loss (0-d tensor; lower = better aligned) of ``moving`` against ``fixed``.

        Args:
            fixed: fixed-image values ``(C, *S)``.
            moving: moving-image values ``(C, *S)`` (the warped moving image), same shape.
            mask: optional ``(*S)`` bool mask or non-negative float weights.
            fixed_range: ``(lo, hi)`` intensity range of the fixed image for the internal
                scaling; None computes it from ``fixed`` with the metric's ``intensity``
                setting. Ignored by metrics without intensity scaling.
            moving_range: the same for the moving image.
        """
        fixed, moving = check_pair(fixed, moving, self.requires_spatial)
        mask = check_mask(mask, fixed.shape[1:], device=fixed.device)
        return self.loss(fixed, moving, mask, fixed_range, moving_range)

    @abc.abstractmethod
    def loss(
        self,
        fixed: Tensor,
        moving: Tensor,
        mask: Tensor | None,
        fixed_range: Range,
        moving_range: Range,
    ) -> Tensor:
        """The loss on validated inputs (see :meth:`forward`)."""

    def quantity(self, loss: Tensor | float) -> Tensor | float:
        """The paper's quantity (see ``quantity_name``) from a loss value of this metric."""
        return self.quantity_sign * loss

    def intensity_range(
        self, values: Tensor, mask: Tensor | None = None
    ) -> tuple[float, float] | None:
        """The intensity range this metric's setting gives for an image, or None if unused.

        The engine calls this once per level for each image and passes the results as
        ``fixed_range`` / ``moving_range`` so the objective does not drift while optimising.
        """
        if not self.uses_intensity_range:
            return None
        return intensity_range(values, mask, self.intensity, self.percentiles)

    def config(self) -> dict[str, Any]:
        """The resolved settings of this metric (JSON-serialisable), for reports."""
        out: dict[str, Any] = {"name": self.name}
        out.update(self.settings)
        if self.uses_intensity_range:
            out["intensity"] = self.intensity
            out["percentiles"] = list(self.percentiles)
        out["quantity"] = self.quantity_name
        return out

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "name")

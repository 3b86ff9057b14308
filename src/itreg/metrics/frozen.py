"""Base of metrics computed by a frozen, trained network loaded from an itreg model file, and
the ``[0, 1]`` intensity scaling these networks are trained and evaluated with."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from itreg.blocks.modelfile import build_model
from itreg.errors import ConfigError, InvalidImageError, MaskError
from itreg.metrics.base import Metric, Range, resolve_range
from itreg.metrics.intensity import intensity_range, rescale

__all__ = ["FrozenNetworkMetric", "safe_range", "scale_intensity"]


def safe_range(values: Tensor, mask: Tensor | None, intensity: str,
               percentiles: Sequence[float]) -> tuple[float, float]:
    """An intensity range that never fails: the setting's, or ``(lo, lo + 1)`` for constant data.

    Args:
        values: intensities ``(C, *S)``.
        mask: optional ``(*S)`` selection.
        intensity: ``"minmax"``, ``"percentile"`` or ``"none"``.
        percentiles: the percentile pair of ``"percentile"``.
    """
    try:
        return intensity_range(values, mask, intensity, percentiles)
    except (InvalidImageError, MaskError):
        v = values.detach()
        finite = v[torch.isfinite(v)]
        lo = float(finite.min()) if finite.numel() else 0.0
        return lo, lo + 1.0


def scale_intensity(values: Tensor, value_range: tuple[float, float]) -> Tensor:
    """Map ``value_range`` to ``[0, 1]`` (clamped), the scaling DITR trains and registers with."""
    lo, hi = value_range
    if not hi > lo:
        hi = lo + 1.0
    return rescale(values, lo, hi, clamp=True)



class FrozenNetworkMetric(Metric):
    """A metric whose network is frozen (no gradients to its weights) and always in eval mode.

    Subclasses set :attr:`network_type` (the module class they accept) and :attr:`model_kind`
    (the model-file kind :meth:`from_file` expects).

    Args:
        network: the trained network; its parameters stop requiring gradients.
        intensity: the metric's intensity scaling (see :class:`~itreg.metrics.base.Metric`).
    """

    network_type: ClassVar[type[nn.Module]] = nn.Module
    model_kind: ClassVar[str] = ""

    def __init__(self, network: nn.Module, intensity: str = "minmax") -> None:
        super().__init__(intensity=intensity)
        if not isinstance(network, self.network_type):
            raise ConfigError(f"{type(self).__name__} needs a {self.network_type.__name__}, "
                              f"got {type(network).__name__}")
        self.network = network.eval()
        for p in self.network.parameters():
            p.requires_grad_(False)

    @classmethod
    def from_file(cls, path: str | os.PathLike, **kwargs: Any) -> FrozenNetworkMetric:
        """Load the network from a model file of kind :attr:`model_kind` and build the metric.

        Raises:
            ModelFileError: not a model file of that kind (see :func:`itreg.nets.load_model`).
        """
        net, _ = build_model(path, expected_kind=cls.model_kind)
        return cls(net, source=str(path), **kwargs)

    def scaled_pair(self, fixed: Tensor, moving: Tensor, fixed_range: Range,
                    moving_range: Range) -> tuple[Tensor, Tensor]:
        """Both images mapped to ``[0, 1]`` as in training (:func:`scale_intensity`), from the
        ranges the engine passes or, where None, from the images (:func:`safe_range`)."""
        out = []
        for values, given in ((fixed, fixed_range), (moving, moving_range)):
            rng = (resolve_range(given, values, None, self.intensity, self.percentiles)
                   if given is not None
                   else safe_range(values, None, self.intensity, self.percentiles))
            out.append(scale_intensity(torch.nan_to_num(values), rng))
        return out[0], out[1]

    def network_on(self, device: torch.device) -> Tensor:
        """Move the network to `device` if it is elsewhere; return its first parameter (whose
        dtype the inputs take)."""
        param = next(self.network.parameters())
        if param.device != device:
            self.network.to(device)
            param = next(self.network.parameters())
        return param

    def train(self, mode: bool = True) -> FrozenNetworkMetric:
        """Keep the network in eval mode whatever the caller asks (it is frozen)."""
        super().train(mode)
        self.network.eval()
        return self

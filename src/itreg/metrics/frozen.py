"""Base of metrics computed by a frozen, trained network loaded from an itreg model file."""

from __future__ import annotations

import os
from typing import Any, ClassVar

from torch import nn

from itreg.errors import ConfigError
from itreg.metrics.base import Metric
from itreg.nets.modelfile import build_model


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

    def train(self, mode: bool = True) -> FrozenNetworkMetric:
        """Keep the network in eval mode whatever the caller asks (it is frozen)."""
        super().train(mode)
        self.network.eval()
        return self

"""The contract between the groupwise optimisation loop and a groupwise similarity.

A :class:`GroupObjective` turns the intensities of the ``N`` warped images at common-space
points into a loss (lower = better aligned) and keeps whatever state it estimates alongside the
transforms (the common anatomy of X-CoReg, the mixture of GMM). The loop in
:mod:`itreg.groupwise.coreg` calls :meth:`GroupObjective.start_level` when the common grid
changes and :meth:`GroupObjective.evaluate` once per optimiser step.

Objectives are built by name from :data:`GROUP_METRICS` (:func:`get_group_metric`), so the
loop, the API and the CLI never branch on the metric.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

from itreg.errors import ConfigError, unknown_name
from itreg.grid import Grid
from itreg.image import Image

__all__ = [
    "GROUP_METRICS",
    "GroupObjective",
    "available_group_metrics",
    "get_group_metric",
    "register_group_metric",
    "sample_mask",
]

#: Fewest overlap points a sample may hold; smaller samples fall back to the whole overlap.
MIN_SAMPLES = 16


def sample_mask(mask: Tensor, rate: float, generator: torch.Generator | None) -> Tensor:
    """A seeded Bernoulli(`rate`) subset of the True entries of `mask`.

    The draw is made on CPU (then moved) so the choice does not depend on the device.

    Args:
        mask: ``(P,)`` bool, the eligible points (the overlap region).
        rate: sample rate in ``(0, 1]``; 1 keeps every eligible point.
        generator: CPU generator.

    Returns:
        ``(P,)`` bool, a subset of `mask`; the whole `mask` if fewer than ``MIN_SAMPLES`` points
        would be drawn.
    """
    if rate >= 1.0:
        return mask
    draw = torch.rand(mask.shape, generator=generator) < rate
    out = mask & draw.to(mask.device)
    if int(out.sum()) < MIN_SAMPLES:
        return mask
    return out


def check_rate(rate: float) -> float:
    """Validate a sample rate in ``(0, 1]``."""
    r = float(rate)
    if not 0.0 < r <= 1.0:
        raise ConfigError(f"sample_rate must be in (0, 1], got {rate!r}")
    return r


class GroupObjective(abc.ABC):
    """A groupwise similarity with optional latent state (lower loss = better aligned).

    Attributes:
        name: registry name.
        quantity_name: name of the paper's quantity reported beside the loss.
        needs_all_voxels: True when the objective keeps a field over the level grid (EM of a
            common anatomy): the loop then passes the intensities at every voxel to
            :meth:`update` (without gradient) before each :meth:`evaluate`.
        sample_rate: fraction of the overlap used for density estimates.
        full_update_every: with :attr:`needs_all_voxels`, the loop calls :meth:`update` on
            every voxel at iterations ``0, m, 2m, ...`` and :meth:`update_at` on the step's
            sample in between (1: every iteration).
    """

    name: ClassVar[str] = ""
    quantity_name: ClassVar[str] = "loss"
    needs_all_voxels: ClassVar[bool] = False

    def __init__(self, sample_rate: float = 0.1) -> None:
        self.sample_rate = check_rate(sample_rate)
        self.full_update_every = 1
        self.n_images = 0
        self.reference: int | None = None

    def reset(self, n_images: int, reference: int | None, generator: torch.Generator,
              dtype: torch.dtype, device) -> None:
        """Forget any state; called once before the first level.

        Args:
            n_images: ``N``.
            reference: index of the fixed reference image, or None (unbiased mode).
            generator: the run's CPU generator.
            dtype: working dtype.
            device: working device.
        """
        self.n_images = int(n_images)
        self.reference = reference
        self.generator = generator
        self.dtype = dtype
        self.device = device

    def image_weights(self, n: int, dtype, device) -> Tensor:
        """``(n,)`` weights of the images' log-likelihoods in an E-step: 1 each, and ``N`` for
        the reference in group-to-reference mode (as the authors' code weights it)."""
        w = torch.ones(n, dtype=dtype, device=device)
        if self.reference is not None:
            w[self.reference] = float(n)
        return w

    def prepare(self, images: Sequence[Image]) -> None:
        """Called once with the normalised input images before :meth:`reset` (for models
        estimated from the inputs themselves, such as X-Reg-GT's appearance model)."""

    def start_level(self, grid: Grid) -> None:
        """Called when the common grid changes (new level); resize state to `grid`."""
        self.grid = grid

    def update(self, values: Tensor, overlap: Tensor) -> None:
        """Update the latent state from the intensities at every voxel of the level grid.

        Called under ``no_grad`` once per step before :meth:`evaluate`, only when
        :attr:`needs_all_voxels` is set.

        Args:
            values: ``(N, P)`` intensities of the warped images at every level voxel.
            overlap: ``(P,)`` bool, the overlap region ``Omega^phi`` (and region of interest).
        """

    def update_at(self, values: Tensor, overlap: Tensor, index: Tensor) -> None:
        """Update the latent state at the step's sample only (iterations between full
        :meth:`update` calls, see :attr:`full_update_every`); called under ``no_grad``.

        Args:
            values: ``(N, S)`` intensities at the sample.
            overlap: ``(S,)`` bool, sample points inside every image (and the ROI).
            index: ``(S,)`` flat voxel indices of the sample in the level grid.
        """

    @abc.abstractmethod
    def evaluate(self, values: Tensor, overlap: Tensor,
                 index: Tensor | None = None) -> tuple[Tensor, float]:
        """Loss of the warped intensities at a sample of points.

        Args:
            values: ``(N, S)`` intensities of the warped images at the sample (differentiable
                with respect to the transforms).
            overlap: ``(S,)`` bool, sample points inside every image (and the region of
                interest).
            index: ``(S,)`` int64 flat voxel indices of the sample points in the level grid
                (None: the sample is the whole grid).

        Returns:
            ``(loss, quantity)``: a 0-d tensor to minimise and the paper's quantity as a float.
        """

    def quantity(self, loss: float) -> float:
        """The paper's quantity for a loss value (default: the loss itself)."""
        return float(loss)

    def probabilities(self) -> Tensor | None:
        """``(K, *grid.shape)`` class probabilities kept on the current grid, or None."""
        return None

    def posterior(self, values: Tensor, overlap: Tensor) -> Tensor | None:
        """``(P, K)`` class probabilities of given intensities ``(N, P)`` under the objective's
        model (zero rows outside `overlap`), or None for objectives without classes."""
        return None

    def template(self, values: Tensor, overlap: Tensor) -> Tensor:
        """``(P,)`` grey-valued template of intensities ``(N, P)``: their mean over the group
        inside `overlap`, 0 outside (CTE overrides it with its PCA template)."""
        out = torch.zeros(values.shape[1], dtype=values.dtype, device=values.device)
        out[overlap] = values[:, overlap].mean(dim=0)
        return out

    def config(self) -> dict[str, Any]:
        """The objective's settings, for reports."""
        return {"name": self.name, "sample_rate": self.sample_rate}


GROUP_METRICS: dict[str, Callable[..., GroupObjective]] = {}
"""Groupwise objectives by name."""


def register_group_metric(name: str, factory: Callable[..., GroupObjective]) -> None:
    """Register a groupwise objective factory under `name` (replaces an existing one)."""
    GROUP_METRICS[name] = factory


def available_group_metrics() -> list[str]:
    """Names of the registered groupwise objectives."""
    return sorted(GROUP_METRICS)


def get_group_metric(name: str, **kwargs: Any) -> GroupObjective:
    """Build the groupwise objective registered as `name`.

    Raises:
        ConfigError: unknown name (the message lists the valid ones) or invalid options.
    """
    if name not in GROUP_METRICS:
        raise unknown_name("groupwise metric", name, GROUP_METRICS)
    try:
        return GROUP_METRICS[name](**kwargs)
    except TypeError as exc:
        raise ConfigError(f"invalid options for groupwise metric {name!r}: {exc}") from exc

"""Neural MI / KL metrics: MINE (paper 001) and KLDivNet (paper 003) critics as pairwise metrics.

:class:`NeuralMI` owns a voxel-wise :class:`~itreg.blocks.critics.Critic` and estimates the mutual
information of the fixed and the (warped) moving intensities with one of the variational bounds
of :mod:`itreg.metrics.bounds`:

- ``"dv"``: Donsker-Varadhan (MINE; KLDivNet's Eq. 9), the default;
- ``"dv-ema"``: DV value with MINE's moving-average bias-corrected gradient;
- ``"nwj"``: NWJ / MINE-f;
- ``"infonce"``: InfoNCE on a ``K x K`` score matrix of a random subset (at most ``log K``);
- ``"smile"``: SMILE with clipping ``tau`` (default 5), trained through the JS objective.

Joint samples are the aligned voxel pairs ``(F_i, M_i)``; product-of-marginal samples pair
``M_i`` with the fixed features at ``pi(i)``, where ``pi`` is a **fresh random derangement**
(a random single cycle, so no voxel keeps its partner) drawn from the metric's own seeded
``torch.Generator`` at every call. The shuffle is applied to the fixed branch's voxel-wise
feature vectors, which for a ``1x1`` critic is the same as shuffling the fixed voxels (see
:mod:`itreg.blocks.critics` for why the critic is voxel-wise).

Sign convention: the loss is ``-estimate`` (nats), so lower is better aligned, like ``"mi"``;
``quantity(loss)`` gives the estimate. Intensities are mapped to about ``[-1, 1]`` through the
fixed/moving intensity ranges (robust percentiles by default; the engine fixes them per level).

**Trainable.** A fresh critic (``"mine"``, ``"kldiv"``) is trained *during* registration: the
metric has ``trainable = True`` and :meth:`NeuralMI.critic_parameters`; the engine
(:mod:`itreg.engine.trainable`) gives them an Adam optimiser (``critic_lr``), first fits the
critic for ``warmup_steps`` steps at the starting alignment of every level, and then, at every
iteration, takes ``critic_steps`` ascent steps on the bound while the transform descends the
loss: both maximise the same estimate (cooperative, as both papers train). A critic loaded
from a model file (``"mine:critic.pt"``) is frozen unless ``finetune=True``.

Example:
    >>> import torch
    >>> from itreg.metrics import get_metric
    >>> metric = get_metric("mine", estimator="nwj")
    >>> f = torch.rand(1, 500); loss = metric(f, f ** 2)
    >>> loss.shape
    torch.Size([])
"""

from __future__ import annotations

import functools
import logging
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from itreg.blocks.critics import MODEL_KIND, Critic
from itreg.blocks.modelfile import build_model, save_model
from itreg.errors import ConfigError, InvalidImageError, MaskError, ModelFileError
from itreg.metrics import bounds
from itreg.metrics.base import Metric, Range, check_mask, check_pair
from itreg.metrics.intensity import DEFAULT_PERCENTILES, intensity_range
from itreg.runtime import seeded

logger = logging.getLogger(__name__)

__all__ = [
    "NeuralMI",
    "critic_steps",
    "derangement",
    "kldiv_metric",
    "mine_metric",
    "pooled_samples",
    "save_critic",
]


def derangement(n: int, generator: torch.Generator | None = None, device=None) -> Tensor:
    """A random permutation of ``range(n)`` without fixed points (a random ``n``-cycle).

    Drawn on the CPU from ``generator`` (so the draw does not depend on the device), then moved.
    For ``n == 1`` the identity is returned (no derangement exists).
    """
    sigma = torch.randperm(n, generator=generator)
    out = torch.empty_like(sigma)
    out[sigma] = sigma.roll(-1)
    return out.to(device) if device is not None else out


def _range_of(values: Tensor, given: Range, mode: str, percentiles) -> tuple[float, float]:
    if given is not None:
        lo, hi = (float(x) for x in given)
    else:
        try:
            lo, hi = intensity_range(values, None, mode, percentiles)
        except InvalidImageError:  # constant values: any unit range keeps the metric finite
            v = float(values.detach().reshape(-1)[0])
            lo, hi = v - 0.5, v + 0.5
    if not hi > lo:
        lo, hi = lo - 0.5, lo + 0.5
    return lo, hi


def _scale(values: Tensor, rng: tuple[float, float]) -> Tensor:
    lo, hi = rng
    return (values - lo) * (2.0 / (hi - lo)) - 1.0


class NeuralMI(Metric):
    """Neural MI estimate of fixed and moving intensities (a loss: ``-estimate`` in nats).

    Args:
        arch: critic architecture, ``"mine"`` or ``"kldiv"`` (ignored when ``path`` is given).
        estimator: one of :data:`itreg.metrics.bounds.ESTIMATORS`.
        path: a saved critic (model file of kind ``"neural-critic"``); None = a fresh critic.
        width: critic feature width (fresh critics; None = the architecture's default).
        tau: SMILE clipping threshold.
        ema_alpha: moving-average rate of ``"dv-ema"``.
        infonce_batch: ``K`` of InfoNCE (a random subset of ``K`` samples, ``K^2`` scores).
        max_samples: at most this many voxels (a random subset) per evaluation.
        critic_lr: learning rate of the critic's Adam in the engine.
        critic_steps: critic ascent steps per transform step in the engine (k >= 1).
        warmup_steps: critic-only steps at the start of every level in the engine.
        finetune: train a loaded critic during registration too.
        seed: seed of the critic's initialisation and of the shuffles.
        intensity: intensity-range setting (see :mod:`itreg.metrics.intensity`).
        percentiles: robust-range percentiles.

    Raises:
        ConfigError: unknown estimator or architecture, invalid numbers.
        ModelFileError: ``path`` is not a valid critic file.
    """

    name = "mine"
    requires_spatial = False
    quantity_name = "MI estimate (nats)"
    quantity_sign = -1.0
    uses_intensity_range = True

    def __init__(
        self,
        arch: str = "mine",
        estimator: str = "dv",
        path: str | os.PathLike | None = None,
        width: int | None = None,
        tau: float = 5.0,
        ema_alpha: float = 0.01,
        infonce_batch: int = 256,
        max_samples: int = 65536,
        critic_lr: float = 3e-3,
        critic_steps: int = 1,
        warmup_steps: int = 100,
        finetune: bool = False,
        seed: int = 0,
        intensity: str = "percentile",
        percentiles: Sequence[float] = DEFAULT_PERCENTILES,
    ) -> None:
        super().__init__(intensity, percentiles)
        if estimator not in bounds.ESTIMATORS:
            raise ConfigError(f"unknown MI estimator {estimator!r}; valid estimators are: "
                              f"{', '.join(bounds.ESTIMATORS)}")
        for key, value, lo in (("infonce_batch", infonce_batch, 2), ("max_samples", max_samples, 2),
                               ("critic_steps", critic_steps, 1), ("warmup_steps", warmup_steps, 0)):
            if isinstance(value, bool) or int(value) != value or int(value) < lo:
                raise ConfigError(f"{key} must be an integer >= {lo}, got {value!r}")
        if not (critic_lr > 0 and math.isfinite(critic_lr)):
            raise ConfigError(f"critic_lr must be positive, got {critic_lr!r}")
        self.estimator = estimator
        self.tau = float(tau)
        self.ema_alpha = float(ema_alpha)
        bounds.smile(torch.zeros(1), torch.zeros(1), self.tau)  # validates tau
        if not 0.0 < self.ema_alpha <= 1.0:
            raise ConfigError(f"ema_alpha must be in (0, 1], got {ema_alpha}")
        self.infonce_batch = int(infonce_batch)
        self.max_samples = int(max_samples)
        self.critic_lr = float(critic_lr)
        self.critic_steps = int(critic_steps)
        self.warmup_steps = int(warmup_steps)
        self.seed = int(seed)
        self.path = None if path is None else str(path)
        self.generator = torch.Generator()
        self.generator.manual_seed(self.seed)
        self._log_ema: Tensor | None = None
        if path is not None:
            critic, extra = build_model(path, expected_kind=MODEL_KIND)
            if not isinstance(critic, Critic):
                raise ModelFileError(f"model file {str(path)!r} does not hold a neural critic")
            self.critic = critic
            self.name = critic.arch
            self.trained_with = dict(extra)
            self.trainable = bool(finetune)
        else:
            with seeded(self.seed):
                self.critic = Critic(arch=arch, width=width)
            self.name = arch
            self.trained_with = {}
            self.trainable = True
        self.critic.requires_grad_(self.trainable)
        self.settings = {"arch": self.critic.arch, "estimator": estimator, "path": self.path,
                         "critic": self.critic.config(), "trainable": self.trainable,
                         "critic_lr": self.critic_lr, "critic_steps": self.critic_steps,
                         "warmup_steps": self.warmup_steps, "seed": self.seed}
        if estimator == "smile":
            self.settings["tau"] = self.tau
        if estimator == "dv-ema":
            self.settings["ema_alpha"] = self.ema_alpha

    # ------------------------------------------------------------------ training hooks
    def critic_parameters(self) -> list[torch.nn.Parameter]:
        """The critic's parameters (the engine's critic optimiser steps them)."""
        return list(self.critic.parameters())

    def reset_generator(self, seed: int | None = None) -> None:
        """Restart the shuffle generator (``seed`` or the metric's seed) and the EMA state."""
        self.generator.manual_seed(self.seed if seed is None else int(seed))
        self._log_ema = None

    # ------------------------------------------------------------------ evaluation
    def loss(
        self,
        fixed: Tensor,
        moving: Tensor,
        mask: Tensor | None,
        fixed_range: Range,
        moving_range: Range,
    ) -> Tensor:
        """``-estimate`` (0-d, nats) on validated inputs; see :meth:`Metric.forward`."""
        return -self.estimate(fixed, moving, mask, fixed_range, moving_range)

    def estimate(
        self,
        fixed: Tensor,
        moving: Tensor,
        mask: Tensor | None = None,
        fixed_range: Range = None,
        moving_range: Range = None,
    ) -> Tensor:
        """The MI estimate (0-d tensor, nats; higher = more information) with a fresh shuffle.

        Args:
            fixed: ``(C, *S)`` image or ``(C, P)`` samples.
            moving: the same shape as ``fixed``.
            mask: bool mask or float weights ``S``; positive weights select (weights are not
                used as weights).
            fixed_range: ``(lo, hi)`` scaling range of the fixed values, or None.
            moving_range: the same for the moving values.
        """
        fixed, moving = check_pair(fixed, moving)
        mask = check_mask(mask, fixed.shape[1:], device=fixed.device)
        param = next(self.critic.parameters())
        if param.device != fixed.device:
            self.critic.to(fixed.device)
        dtype = param.dtype
        sel = None if mask is None else (mask if mask.dtype == torch.bool else mask > 0)
        fvals = fixed if sel is None else fixed[:, sel]
        mvals = moving if sel is None else moving[:, sel]
        f_rng = _range_of(fvals, fixed_range, self.intensity, self.percentiles)
        m_rng = _range_of(mvals, moving_range, self.intensity, self.percentiles)
        if fixed.dim() == 2:  # flat samples: select, no pooling
            hf, _ = self.critic.features(_scale(fvals, f_rng).to(dtype), "fixed")
            hm, _ = self.critic.features(_scale(mvals, m_rng).to(dtype), "moving")
        else:
            hf, keep = self.critic.features(_scale(fixed, f_rng).to(dtype), "fixed", sel)
            hm, _ = self.critic.features(_scale(moving, m_rng).to(dtype), "moving")
            if keep is not None:
                hf, hm = hf[keep], hm[keep]
        n = hf.shape[0]
        if n < 2:
            raise MaskError(f"a neural MI estimate needs at least 2 samples, got {n}")
        if n > self.max_samples:
            pick = torch.randperm(n, generator=self.generator)[: self.max_samples]
            pick = pick.to(hf.device)
            hf, hm, n = hf[pick], hm[pick], self.max_samples
        return self._bound(hf, hm, n).to(fixed.dtype)

    def _bound(self, hf: Tensor, hm: Tensor, n: int) -> Tensor:
        if self.estimator == "infonce":
            k = min(n, self.infonce_batch)
            pick = torch.randperm(n, generator=self.generator)[:k].to(hf.device)
            return bounds.infonce(self.critic.score_matrix(hf[pick], hm[pick]))
        perm = derangement(n, self.generator, hf.device)
        t_joint = self.critic.pair_scores(hf, hm)
        t_marg = self.critic.pair_scores(hf, hm, perm)
        if self.estimator == "dv":
            return bounds.dv(t_joint, t_marg)
        if self.estimator == "nwj":
            return bounds.nwj(t_joint, t_marg)
        if self.estimator == "smile":
            return bounds.smile(t_joint, t_marg, self.tau)
        value, log_m = bounds.dv_ema(t_joint, t_marg, self._log_ema, self.ema_alpha)
        if torch.is_grad_enabled():
            self._log_ema = log_m
        return value


mine_metric = functools.partial(NeuralMI, arch="mine")
"""Factory of ``"mine"`` / ``"mine:critic.pt"``: :class:`NeuralMI` with the MINE critic."""

kldiv_metric = functools.partial(NeuralMI, arch="kldiv")
"""Factory of ``"kldiv"`` / ``"kldiv:critic.pt"``: :class:`NeuralMI` with the KLDivNet critic."""


def save_critic(metric: NeuralMI, path: str | os.PathLike, extra: dict | None = None,
                force: bool = False) -> Path:
    """Write ``metric``'s critic as a model file (kind ``"neural-critic"``).

    The file stores the critic's config and weights plus ``extra`` and the estimator name; it
    reloads with ``get_metric("mine:" + path)`` (or ``"kldiv:"``).
    """
    info = {"estimator": metric.estimator, **(extra or {})}
    return save_model(path, MODEL_KIND, metric.critic.config(), metric.critic.state_dict(),
                      info, force=force)


# ---------------------------------------------------------------------------------- training
def critic_steps(metric: NeuralMI, optimizer: torch.optim.Optimizer,
                 loss_fn: Callable[[], Tensor], steps: int = 1) -> int:
    """Up to `steps` optimiser steps of a trainable metric's critic, each descending
    ``loss_fn()`` (the metric's loss: ascending its bound).

    Stops at the first non-finite loss or critic gradient, without stepping on it. The one
    critic step of the landscapes (:mod:`itreg.evaluate.landscape`) and the registration
    networks' trainer (:mod:`itreg.train.regnet`); pre-training on pairs is
    :func:`itreg.train.critic.train_critic`.

    Returns:
        The number of steps taken.
    """
    params = metric.critic_parameters()
    for taken in range(int(steps)):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn()
        if not bool(torch.isfinite(loss)):
            return taken
        loss.backward()
        if not all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in params):
            return taken
        optimizer.step()
    return int(steps)


def _values(x: Any) -> Tensor:
    data = getattr(x, "data", x)
    if not isinstance(data, Tensor):
        raise TypeError("training images must be itreg Images or tensors (C, *S)")
    return data


def pooled_samples(fixed: Sequence[Any], moving: Sequence[Any], masks: Sequence[Any] | None,
                  metric: NeuralMI) -> tuple[Tensor, Tensor]:
    """Scaled voxel values ``(C, P)`` of all aligned pairs, each pair scaled by its own ranges
    (the training data of :func:`itreg.train.critic.train_critic`)."""
    fs, ms = [], []
    for i, (f, m) in enumerate(zip(fixed, moving)):
        fv, mv = check_pair(_values(f), _values(m))
        mask = None if masks is None or masks[i] is None else _values(masks[i]).to(fv.device)
        if mask is not None:
            mask = check_mask(mask.reshape(fv.shape[1:]) > 0, fv.shape[1:], device=fv.device)
        fsel = fv.reshape(fv.shape[0], -1) if mask is None else fv[:, mask]
        msel = mv.reshape(mv.shape[0], -1) if mask is None else mv[:, mask]
        fs.append(_scale(fsel, _range_of(fsel, None, metric.intensity, metric.percentiles)))
        ms.append(_scale(msel, _range_of(msel, None, metric.intensity, metric.percentiles)))
    return torch.cat(fs, 1), torch.cat(ms, 1)


def _register() -> None:
    from itreg.metrics.registry import register_metric

    register_metric("mine", mine_metric, overwrite=True)
    register_metric("kldiv", kldiv_metric, overwrite=True)


_register()

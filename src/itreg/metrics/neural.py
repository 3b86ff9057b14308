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

import copy
import functools
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
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

logger = logging.getLogger(__name__)

__all__ = [
    "NeuralMI",
    "TrainResult",
    "derangement",
    "kldiv_metric",
    "mine_metric",
    "save_critic",
    "train_critic",
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
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
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
@dataclass
class TrainResult:
    """The outcome of :func:`train_critic`.

    Attributes:
        metric: the metric with the best-validation critic weights.
        best_val: the best validation estimate (nats).
        steps: training steps done.
        stop_reason: ``"max-steps"``, ``"early-stopping"`` or ``"non-finite"``.
        message: a human-readable summary (the NaN explanation when ``"non-finite"``).
        history: ``(step, train_estimate, val_estimate)`` at every validation.
    """

    metric: NeuralMI
    best_val: float
    steps: int
    stop_reason: str
    message: str
    history: list[tuple[int, float, float]] = field(default_factory=list)


def _values(x: Any) -> Tensor:
    data = getattr(x, "data", x)
    if not isinstance(data, Tensor):
        raise TypeError("training images must be itreg Images or tensors (C, *S)")
    return data


def _pool_samples(fixed: Sequence[Any], moving: Sequence[Any], masks: Sequence[Any] | None,
                  metric: NeuralMI) -> tuple[Tensor, Tensor]:
    """Scaled voxel values ``(C, P)`` of all aligned pairs, each pair scaled by its own ranges."""
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


def train_critic(
    fixed: Sequence[Any],
    moving: Sequence[Any],
    metric: NeuralMI | str = "mine",
    masks: Sequence[Any] | None = None,
    steps: int = 2000,
    batch: int = 4096,
    lr: float = 1e-3,
    val_fraction: float = 0.2,
    val_every: int = 50,
    patience: int = 10,
    seed: int = 0,
    checkpoint: str | os.PathLike | None = None,
    progress: Callable[[int, float, float], None] | None = None,
    **metric_kwargs: Any,
) -> TrainResult:
    """Pre-train a critic on aligned pairs (maximise the bound on joint vs shuffled voxels).

    The voxels of all pairs (inside the masks) are pooled and split at random into training and
    validation voxels; each step draws ``batch`` training voxels and ascends the metric's bound
    with Adam; every ``val_every`` steps the bound on the validation voxels (one fixed shuffle
    seed) is computed, the best weights are kept (and written to ``checkpoint``), and training
    stops early after ``patience`` validations without improvement. A NaN/Inf estimate or
    gradient stops training with a clear message, keeping the last good weights. Small
    setting (two CPU cores, seconds): the defaults on a 2D slice or a 3D brain at 3-4 mm; full
    scale on a GPU: ``batch=65536``, ``steps=20000``, ``patience=20`` (device follows inputs).

    Args:
        fixed: aligned fixed images (Images or tensors ``(C, *S)``).
        moving: the moving images, aligned with ``fixed`` (same shapes, pair by pair).
        metric: a :class:`NeuralMI` to train or an architecture name (``"mine"``/``"kldiv"``).
        masks: optional masks (one per pair, shape ``S``) selecting the voxels used.
        steps: maximal training steps.
        batch: voxels per step.
        lr: Adam learning rate.
        val_fraction: fraction of the voxels held out for validation.
        val_every: steps between validations.
        patience: validations without improvement before stopping.
        seed: seed of the split, the batches and the shuffles.
        checkpoint: optional model-file path, rewritten with the best weights.
        progress: optional ``callback(step, train_estimate, val_estimate)`` at each validation.
        **metric_kwargs: settings of a new :class:`NeuralMI` when ``metric`` is a name.

    Returns:
        :class:`TrainResult` (its ``metric`` holds the best weights, in eval mode).

    Raises:
        ConfigError: invalid settings or no pairs.
    """
    if not fixed or len(fixed) != len(moving):
        raise ConfigError("train_critic needs one or more (fixed, moving) pairs of equal count")
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if min(steps, batch, val_every, patience) < 1:
        raise ConfigError("steps, batch, val_every and patience must be >= 1")
    if isinstance(metric, str):
        metric = NeuralMI(arch=metric, seed=seed, **metric_kwargs)
    metric.critic.requires_grad_(True)
    f_all, m_all = _pool_samples(fixed, moving, masks, metric)
    dtype = next(metric.critic.parameters()).dtype
    f_all, m_all = f_all.to(dtype), m_all.to(dtype)
    metric.critic.to(f_all.device)
    g = torch.Generator().manual_seed(int(seed))
    p = f_all.shape[1]
    order = torch.randperm(p, generator=g).to(f_all.device)
    n_val = max(2, round(val_fraction * p))
    val_idx, tr_idx = order[:n_val], order[n_val:]
    if tr_idx.numel() < 2:
        raise ConfigError(f"too few voxels ({p}) to train a critic")
    unit = (-1.0, 1.0)  # values are already scaled
    opt = torch.optim.Adam(metric.critic_parameters(), lr=lr)
    best_state = copy.deepcopy(metric.critic.state_dict())
    best_val, bad, history = -math.inf, 0, []
    reason, message, step = "max-steps", "", 0
    t0 = time.perf_counter()
    metric.reset_generator(seed)

    def validate() -> float:
        state = metric.generator.get_state()
        metric.generator.manual_seed(int(seed) + 1)
        with torch.no_grad():
            v = float(metric.estimate(f_all[:, val_idx], m_all[:, val_idx], None, unit, unit))
        metric.generator.set_state(state)
        return v

    for step in range(1, int(steps) + 1):
        pick = tr_idx[torch.randint(tr_idx.numel(), (min(batch, tr_idx.numel()),), generator=g)
                      .to(tr_idx.device)]
        opt.zero_grad(set_to_none=True)
        est = metric.estimate(f_all[:, pick], m_all[:, pick], None, unit, unit)
        (-est).backward()
        grads_ok = all(q.grad is None or bool(torch.isfinite(q.grad).all())
                       for q in metric.critic.parameters())
        if not (bool(torch.isfinite(est)) and grads_ok):
            reason = "non-finite"
            message = (f"training stopped at step {step}: the estimate or its gradient became "
                       f"NaN/Inf (try a lower lr than {lr}, or the 'smile'/'nwj' estimator); "
                       f"the last good weights (best validation {best_val:.4g} nats) are kept")
            logger.warning(message)
            break
        opt.step()
        if step % val_every == 0 or step == steps:
            val = validate()
            history.append((step, float(est.detach()), val))
            if progress is not None:
                progress(step, float(est.detach()), val)
            logger.info("critic step %d: train %.4f nats, validation %.4f nats", step,
                        float(est.detach()), val)
            if not math.isfinite(val):
                reason = "non-finite"
                message = (f"training stopped at step {step}: the validation estimate is "
                           f"{val}; the last good weights are kept")
                logger.warning(message)
                break
            if val > best_val:
                best_val, bad = val, 0
                best_state = copy.deepcopy(metric.critic.state_dict())
                if checkpoint is not None:
                    save_critic(metric, checkpoint, {"step": step, "val_estimate": val,
                                                     "seed": int(seed)}, force=True)
            else:
                bad += 1
                if bad >= patience:
                    reason = "early-stopping"
                    break
    metric.critic.load_state_dict(best_state)
    metric.critic.eval()
    metric.reset_generator()
    if not message:
        message = (f"critic trained for {step} steps ({reason}) in "
                   f"{time.perf_counter() - t0:.1f} s; best validation estimate {best_val:.4f} nats")
    return TrainResult(metric, best_val, step, reason, message, history)


def _register() -> None:
    from itreg.metrics.registry import register_metric

    register_metric("mine", mine_metric, overwrite=True)
    register_metric("kldiv", kldiv_metric, overwrite=True)


_register()

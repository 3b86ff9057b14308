"""Training deep combined computing (DCC, Luo & Zhuang 2022, sec. 3.5) on groups of images.

The network is :class:`itreg.nets.dcc.DCCNet`. For a group ``U_1..U_N`` with labels ``Y_j`` on
the images of an index set ``J`` (the labelled images), one step computes, on the common grid
(the images' grid):

- ``rho_hat_j = softmax(D_s(E(U_j)))`` on image ``j``'s grid and the fields ``d_j`` (zero group
  mean, Eq. 37), ``phi_j(x) = x + d_j(x)``;
- the label model ``rho_j ∝ exp(tau D_jk)`` for ``j in J`` (signed distance maps, Eq. 38);
  ``rho`` and ``rho_hat`` are clipped to ``[zeta, 1 - (K-1) zeta]`` wherever they act as the
  label model of Eq. 38 (posterior, L2), as the paper does;
- the common anatomy ``Z^[2]`` (:func:`itreg.nets.dcc.common_anatomy`: Eq. 39 at ``t = 0``, the
  posterior of Eq. 40, then one EM update with Eq. 20), detached;
- **L1** (Eq. 41) ``= -X(U[phi], Z^[2]) + lambda * N * BE(d)``: the X-metric of
  :func:`itreg.groupwise.xmetric.x_metric` on a Bernoulli sample of the overlap, with each
  image's bins over its own intensity range, and the bending energy of
  :func:`itreg.regularisers.bending_energy` (world mm, mean over voxels and images) times
  ``N``, as the authors' code scales it;
- **L2** (Eqs. 42-44) ``= sum_j mean_{x in overlap} -sum_k gamma_xk log rho_jk(phi_j(x))`` with
  ``rho_j`` for ``j in J`` (gradient through ``phi_j`` only) and ``rho_hat_j`` otherwise
  (gradient through ``phi_j`` and ``rho_hat_j``);
- **L3** (Eqs. 45-46) ``= -sum_j I(U_j, Y_hat_j) + sum_{j not in J} H(Y_hat_j) +
  sum_{j in J} [CE(Y_j, rho_hat_j) + 1 - Dice(Y_j, rho_hat_j)]``.

The total is ``L = w1 L1 + w2 L2 + w3 L3`` (Eq. 47 with unit weights).

**Alternating training** (paper sec. 3.5.3, 4.4): two Adam optimisers, one over the encoder
and the segmentation decoder (``E``, ``D_s``; paper lr 1e-3), one over the fusion and the
registration decoder (``D_r``; paper lr 1e-4), alternate every ``alternate_every`` steps (paper
5), starting with the segmentation branch. A segmentation step computes ``L2 + L3`` with the
fields held fixed; a registration step ``L1 + L2`` with the segmentation held fixed. Only the
segmentation optimiser updates the encoder (``D_r`` sees detached encoder features). Training
runs through :func:`itreg.train.fit` (validation each epoch, best weights kept by validation
registration Dice as in the paper, early stopping, checkpoints, NaN protection, progress bar).

**Strategies** (paper sec. 4.4): ``"unsupervised"`` (DGR, ``J`` empty), ``"weak"`` (labels on
``labelled_images`` of every group, e.g. ``(0,)`` as DCC+BS with ``J = {2}``, or on a seeded
random ``label_fraction`` of each group's images) and ``"all"`` (DCC+All). The test-time
posterior (Eq. 53) multiplies ``rho_hat`` of the images that were labelled in training.

**Ambiguities, and what we chose** (in addition to methods.md section 3, "Ambiguities"):

1. ``H(Y_hat_j)`` in Eq. 45 "encourages the probability vector to be concentrated": we use the
   mean over voxels of the per-voxel entropy ``-sum_k rho_hat log rho_hat`` (the entropy of the
   label marginal would push towards one class).
2. ``I(U_j, Y_hat_j)`` uses the joint table of Eq. 21 with ``rho_hat_j`` as class weights on
   image ``j``'s own voxels (all of them, no sampling), gradient through ``rho_hat_j``.
3. ``L_seg`` (Eq. 46) uses the one-hot labels (the paper; the authors' code uses the distance
   probabilities) and a soft Dice averaged over the K classes.
4. Terms are means over voxels and sums over images, as written; weights ``w1, w2, w3`` default
   to 1. ``lambda`` refers to our bending energy in world mm (1/mm^2), not the code's pixels:
   paper 002's ``lambda = 100`` (pixel units, mean over the flow components) is
   ``100 s^2 / D`` here on a grid of ``s`` mm (:func:`bending_weight_from_pixels`: 800 on the
   4 mm 2D groups of the benchmark, 450 at 3 mm, 50 at 1 mm).
5. The overlap of L1/L2 and of ``Z^[2]`` is the set of common points inside every warped image.

Groups and phantom sources are in :mod:`itreg.train.dcc_data`, the loss and the evaluation in
:mod:`itreg.train.dcc_loss` (re-exported here).

Settings: :meth:`DCCTrainConfig.small` trains 2D groups at 3-4 mm in minutes on two CPU cores
(C = 8, 3 levels, batch 4); :meth:`DCCTrainConfig.full` is the paper's scale (C = 16, L_R = 4,
L = 32, batch 20, lr 1e-3 / 1e-4 alternating every 5 steps, 100 epochs; a GPU: put the groups
on it, the network follows).

Data: :class:`PhantomGroupSource` makes groups on the fly from the phantom builder
(:func:`itreg.phantoms.group_from_tissues`: T1, T2-like, PD-like axial slices, each with its own
random FFD), deterministic per index.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from itreg.blocks.modelfile import save_model
from itreg.errors import ConfigError, GeometryError, OutputExistsError
from itreg.grid import Grid
from itreg.nets.dcc import (
    FLOWS,
    MODEL_KIND,
    NORMS,
    DCCNet,
)
from itreg.runtime import limited_threads
from itreg.train import FitCheckpoint, TrainResult, checkpoint_path, fit, make_generator, seeded
from itreg.train.config import TrainingConfig
from itreg.train.dcc_data import STRATEGIES, DCCGroup, PhantomGroupSource, labelled_mask
from itreg.train.dcc_loss import (
    PAPER_BENDING_WEIGHT,
    DCCLoss,
    bending_weight_from_pixels,
    evaluate_groups,
)

logger = logging.getLogger(__name__)

#: Settings that may change when an interrupted training is resumed.
_RESUMABLE = ("epochs", "patience", "threads", "progress")

__all__ = [
    "PAPER_BENDING_WEIGHT",
    "STRATEGIES",
    "DCCGroup",
    "DCCLoss",
    "DCCTrainConfig",
    "DCCTrainingResult",
    "PhantomGroupSource",
    "bending_weight_from_pixels",
    "evaluate_groups",
    "initial_network",
    "labelled_mask",
    "train_dcc",
]


# ------------------------------------------------------------------------------ training
@dataclass(frozen=True)
class DCCTrainConfig(TrainingConfig):
    """Settings of :func:`train_dcc`.

    Args:
        strategy: ``"unsupervised"``, ``"weak"`` or ``"all"`` (see :data:`STRATEGIES`).
        labelled_images: labelled image indices of every group (``"weak"``).
        label_fraction: instead, a seeded random fraction of each group's images (``"weak"``).
        classes: ``K`` (labels ``0..K-1``; the phantoms have 4: background, CSF, GM, WM).
        channels: ``C`` of the network.
        net_levels: ``L_R`` of the network.
        flow: ``"displacement"`` or ``"svf"``.
        reg_norm: normalisation of ``D_r`` (``"batch"``, ``"instance"``, ``"none"``).
        field_scale: mm per unit of the flow heads' output (see :class:`DCCNet`); None: the
            grid's mean spacing (one voxel).
        momentum: batch-norm momentum (authors' code 0.01; short trainings need more, or the
            running statistics used in eval mode lag far behind the batch statistics).
        dropout: channel dropout (authors' code: 0.2).
        levels: ``L`` intensity levels (paper: 32).
        sample_rate: sample rate of the X-metric and Eq. 20.
        bending_weight: ``lambda`` of itreg's world-mm bending energy (times ``N``). None
            (default): paper 002's ``lambda = 100``, which weighs the authors' pixel-unit
            energy, converted to the training grid: ``bending_weight_from_pixels(100, s, D)
            = 100 s^2 / D`` on a grid of ``s`` mm (800 on 4 mm 2D grids). Until 2026-12-08 the
            default was 10 (a pixel-unit ``lambda`` of ``10 D / s^2``: 1.25 at 4 mm); on the
            benchmark's 4 mm groups the converted value registered better (unsupervised,
            Reg Dice 0.773 -> 0.784, gWI 2.65 -> 2.35 mm;
            ``benchmarks/results/2026-12-08-dcc-bending-weight.md``).
        tau: label-model slope per mm.
        zeta: probability clip in training (paper 0.05).
        zeta_test: probability clip at test (paper 0.01; stored in the model file).
        loss_weights: ``(w1, w2, w3)``.
        seg_lr: Adam step size of ``E`` and ``D_s`` (paper 1e-3).
        reg_lr: Adam step size of ``D_r`` (paper 1e-4).
        alternate_every: steps before switching branch (paper 5).
        batch_size: groups per step (paper 20).
        steps_per_epoch: optimiser steps per epoch.
        train_groups: size of the pool of training groups (indices ``0..train_groups-1`` of
            the training source), reshuffled every epoch.
        val_groups: held-out groups for validation (indices ``0..val_groups-1`` of the
            validation source).
        epochs: maximum epochs.
        patience: early-stopping patience on the validation registration Dice (0: none).
        grad_clip: gradient-norm clip (None: none).
        seed: seed of the weights, the sampling and the batches.
        threads: torch CPU threads while training (None: unchanged).
        progress: progress bar on stderr.
    """

    strategy: str = "weak"
    labelled_images: tuple[int, ...] = (0,)
    label_fraction: float | None = None
    classes: int = 4
    channels: int = 16
    net_levels: int = 4
    flow: str = "displacement"
    reg_norm: str = "batch"
    field_scale: float | None = None
    momentum: float = 0.01
    dropout: float = 0.2
    levels: int = 32
    sample_rate: float = 0.1
    bending_weight: float | None = None
    tau: float = 1.0
    zeta: float = 0.05
    zeta_test: float = 0.01
    loss_weights: tuple[float, float, float] = (1.0, 1.0, 1.0)
    seg_lr: float = 1e-3
    reg_lr: float = 1e-4
    alternate_every: int = 5
    batch_size: int = 20
    steps_per_epoch: int = 100
    train_groups: int = 1000
    val_groups: int = 20
    epochs: int = 100
    patience: int = 10
    grad_clip: float | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"unknown DCC strategy {self.strategy!r}; valid: "
                              f"{', '.join(STRATEGIES)}")
        object.__setattr__(self, "labelled_images", tuple(int(j) for j in self.labelled_images))
        object.__setattr__(self, "loss_weights", tuple(float(w) for w in self.loss_weights))
        if self.flow not in FLOWS:
            raise ConfigError(f"unknown flow {self.flow!r}; valid: {', '.join(FLOWS)}")
        if self.reg_norm not in NORMS:
            raise ConfigError(f"unknown reg_norm {self.reg_norm!r}; valid: {', '.join(NORMS)}")
        for name in ("batch_size", "steps_per_epoch", "train_groups", "val_groups",
                     "alternate_every"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("seg_lr", "reg_lr"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be > 0, got {getattr(self, name)}")

    @classmethod
    def small(cls, **overrides: Any) -> DCCTrainConfig:
        """A 2D setting that trains in minutes on two CPU cores (3-4 mm groups, C = 8, 3 levels,
        no dropout; BN momentum 0.1 and no normalisation in ``D_r``, because with a few hundred
        steps the running statistics of momentum 0.01 lag far behind and eval-mode fields
        collapse)."""
        base: dict[str, Any] = {
            "channels": 8, "net_levels": 3, "dropout": 0.0, "batch_size": 4,
            "steps_per_epoch": 20, "train_groups": 48, "val_groups": 6, "epochs": 8,
            "patience": 4, "seg_lr": 3e-3, "reg_lr": 1e-3, "alternate_every": 5,
            "sample_rate": 0.25, "momentum": 0.1, "reg_norm": "none"}
        base.update(overrides)
        return cls(**base)

    @classmethod
    def full(cls, **overrides: Any) -> DCCTrainConfig:
        """The paper's scale (sec. 4.4): C = 16, L_R = 4, batch 20, 100 epochs (a GPU)."""
        base: dict[str, Any] = {"channels": 16, "net_levels": 4, "batch_size": 20,
                                "steps_per_epoch": 1000, "train_groups": 19500,
                                "val_groups": 300, "epochs": 100, "patience": 10}
        base.update(overrides)
        return cls(**base)

    def loss(self) -> DCCLoss:
        """The :class:`DCCLoss` of these settings."""
        return DCCLoss(self.levels, self.sample_rate, self.bending_weight, self.tau, self.zeta,
                       self.loss_weights)

    def labelled(self, n: int, group_index: int) -> Tensor:
        """``J`` of group `group_index` with `n` images."""
        return labelled_mask(self.strategy, n, self.labelled_images, self.label_fraction,
                             group_index, self.seed)


class _Alternating:
    """Two optimisers used in turn, `every` steps each, starting with the segmentation one
    (duck-types the optimiser :func:`itreg.train.fit` drives)."""

    def __init__(self, seg: torch.optim.Optimizer, reg: torch.optim.Optimizer,
                 every: int) -> None:
        self.seg, self.reg, self.every, self.steps = seg, reg, int(every), 0

    @property
    def phase(self) -> str:
        return "seg" if (self.steps // self.every) % 2 == 0 else "reg"

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.seg.zero_grad(set_to_none=set_to_none)
        self.reg.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        (self.seg if self.phase == "seg" else self.reg).step()
        self.steps += 1

    def state_dict(self) -> dict[str, Any]:
        """Both optimisers' states and the step count (for resumable checkpoints)."""
        return {"seg": self.seg.state_dict(), "reg": self.reg.state_dict(), "steps": self.steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.seg.load_state_dict(state["seg"])
        self.reg.load_state_dict(state["reg"])
        self.steps = int(state["steps"])


@dataclass
class DCCTrainingResult:
    """What :func:`train_dcc` produced.

    Attributes:
        model: the trained network (best validation registration Dice), in eval mode.
        train: the :class:`~itreg.train.TrainResult` (history per epoch, stop reason).
        config: the settings.
        before: validation measures of the initial network.
        after: validation measures of the kept network.
        path: the written model file, or None.
    """

    model: DCCNet
    train: TrainResult
    config: DCCTrainConfig
    before: dict[str, float]
    after: dict[str, float]
    path: Path | None = None


def _prior_images(config: DCCTrainConfig, n: int) -> list[int]:
    """Images whose ``rho_hat`` multiplies into the test-time posterior (Eq. 53)."""
    if config.strategy == "all":
        return list(range(n))
    if config.strategy == "weak" and config.label_fraction is None:
        return [j for j in config.labelled_images if j < n]
    return []


def initial_network(config: DCCTrainConfig, grid: Grid, domains: int,
                    domain_names: Sequence[str] | None = None) -> DCCNet:
    """The untrained network :func:`train_dcc` starts from (seeded by ``config.seed``)."""
    cfg = config
    with seeded(cfg.seed):
        return DCCNet(grid.ndim, domains, cfg.classes, cfg.channels, cfg.net_levels, cfg.flow,
                      zero_mean=True, reg_norm=cfg.reg_norm, dropout=cfg.dropout,
                      domain_names=domain_names, spacing_mm=list(grid.spacing),
                      momentum=cfg.momentum,
                      field_scale=cfg.field_scale or sum(grid.spacing) / grid.ndim)


def train_dcc(
    train_source: PhantomGroupSource | Sequence[DCCGroup],
    val_source: PhantomGroupSource | Sequence[DCCGroup],
    config: DCCTrainConfig | None = None,
    output: str | os.PathLike | None = None,
    force: bool = False,
    domain_names: Sequence[str] | None = None,
    resume: bool = True,
) -> DCCTrainingResult:
    """Train a DCC network with the alternating scheme of paper 002 (sec. 3.5, 4.4).

    Args:
        train_source: a :class:`PhantomGroupSource` (groups ``0..train_groups-1``) or a list
            of groups (all on one grid, one group size, with labels where ``J`` needs them).
        val_source: the held-out groups (source: ``0..val_groups-1``), with labels.
        config: settings (default :class:`DCCTrainConfig`).
        output: model file to write (the best weights as a checkpoint whenever they improve,
            and at the end); None writes nothing.
        force: replace an existing `output`.
        domain_names: names of the domains (default: the source's contrasts).
        resume: with an `output`, training keeps a resumable checkpoint ``output + ".ckpt"``
            after every epoch (:class:`~itreg.train.FitCheckpoint`); when it exists, training
            continues from it (its settings must match, except ``epochs``, ``patience``,
            ``threads`` and ``progress``), and the `output` the interrupted run wrote is
            replaced without `force`. False starts afresh.

    Returns:
        :class:`DCCTrainingResult`.

    Raises:
        OutputExistsError: `output` exists, `force` is False and there is no checkpoint of an
            interrupted run to resume (checked before training).
        TrainingError: a non-finite loss or gradient (the last good weights are written).
        ConfigError, GeometryError: bad settings or groups, or a checkpoint written with other
            settings.
        ModelFileError: an unreadable checkpoint.
    """
    cfg = config or DCCTrainConfig()
    ckpt = None if output is None else checkpoint_path(output)
    resuming = resume and ckpt is not None and ckpt.is_file()
    if output is not None and Path(output).exists() and not force and not resuming:
        raise OutputExistsError(f"model file {str(output)!r} exists; pass force=True to replace")
    if isinstance(train_source, PhantomGroupSource):
        train = train_source.groups(range(cfg.train_groups))
        domain_names = domain_names or list(train_source.contrasts)
    else:
        train = list(train_source)
    val = (val_source.groups(range(cfg.val_groups))
           if isinstance(val_source, PhantomGroupSource) else list(val_source))
    if not train or not val:
        raise ConfigError("training needs at least one training and one validation group")
    grid, n = train[0].grid, train[0].n
    for g in [*train, *val]:
        if not g.grid.same_as(grid) or g.n != n:
            raise GeometryError("all groups must share one grid and group size")
    domains = int(max(int(g.domains.max()) for g in train)) + 1
    if domain_names is not None and len(domain_names) < domains:
        raise ConfigError(f"{len(domain_names)} domain names for {domains} domains")
    if domain_names is not None:
        domains = len(domain_names)
    net = initial_network(cfg, grid, domains, domain_names).to(train[0].images.device)
    seg_opt = torch.optim.Adam(net.segmentation_parameters(), lr=cfg.seg_lr)
    reg_opt = torch.optim.Adam(net.registration_parameters(), lr=cfg.reg_lr)
    opt = _Alternating(seg_opt, reg_opt, cfg.alternate_every)
    loss = cfg.loss()
    gen = make_generator(cfg.seed)
    priors = _prior_images(cfg, n)
    eval_kw = {"zeta": cfg.zeta_test, "priors": priors, "levels": cfg.levels,
               "sample_rate": cfg.sample_rate, "seed": cfg.seed}
    labelled = [cfg.labelled(n, g.index) for g in train]

    def batches(epoch: int):
        order = torch.randperm(len(train), generator=gen).tolist()
        for s in range(cfg.steps_per_epoch):
            idx = [order[(s * cfg.batch_size + i) % len(order)] for i in range(cfg.batch_size)]
            yield idx

    def loss_fn(idx: list[int]) -> Tensor:
        value, _ = loss(net, [train[i] for i in idx], [labelled[i] for i in idx],
                        phase=opt.phase, generator=gen)
        return value

    def validate() -> dict[str, float]:
        return evaluate_groups(net, val, **eval_kw)

    def extra(info: dict[str, Any]) -> dict[str, Any]:
        return {"training": dataclasses.asdict(cfg),
                "inference": {"zeta": cfg.zeta_test, "priors": priors, "levels": cfg.levels,
                              "sample_rate": cfg.sample_rate},
                "info": {k: (v if not isinstance(v, float) or math.isfinite(v) else None)
                         for k, v in info.items()}}

    def checkpoint(model, info: dict[str, Any]) -> None:
        if output is not None:
            save_model(output, MODEL_KIND, net.config(), model.state_dict(), extra(info),
                       force=True)

    before: dict[str, float] = {}

    def get_state() -> dict[str, Any]:
        return {"generator": gen.get_state(), "before": before}

    def set_state(state: dict[str, Any]) -> None:
        gen.set_state(state["generator"])
        before.update(state["before"])

    resumable = None
    if ckpt is not None:
        settings = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _RESUMABLE}
        settings["domain_names"] = list(domain_names) if domain_names is not None else None
        resumable = FitCheckpoint(ckpt, json.loads(json.dumps(settings)), get_state, set_state,
                                  resume=resume)

    with limited_threads(cfg.threads):
        if resumable is None or not resumable.exists():
            before.update(evaluate_groups(net, val, **eval_kw))
            logger.info("DCC before training: %s", before)
        # A non-finite value raises TrainingError after `checkpoint` kept the last good weights.
        result = fit(net, opt, batches, loss_fn, validate, epochs=cfg.epochs,
                     monitor="reg_dice", mode="max", patience=cfg.patience,
                     checkpoint=checkpoint, grad_clip=cfg.grad_clip, progress=cfg.progress,
                     description=f"DCC ({cfg.strategy})", steps_per_epoch=cfg.steps_per_epoch,
                     resume=resumable)
        after = evaluate_groups(net, val, **eval_kw)
    net.eval()
    path = None
    if output is not None:
        path = save_model(output, MODEL_KIND, net.config(), net.state_dict(),
                          extra({"before": before, "after": after,
                                 "train": result.to_dict()}), force=True)
    return DCCTrainingResult(net, result, cfg, before, after, path)

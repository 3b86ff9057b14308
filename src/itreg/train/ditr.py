"""Training the DITR patch classifier by iterated maximum likelihood (paper 000, Eqs. 9-13).

The classifier ``f(u, v)`` (:class:`~itreg.blocks.ditr.DITRNet`) learns to tell registered patch
pairs (``z = 1``: fixed and moving patches cropped at corresponding locations) from unregistered
ones (``z = 0``: the moving patch cropped at an independent, uniformly drawn location of the
foreground), with binary cross-entropy on the logits (Eq. 9, ``BCEWithLogits``), classes 1:1.

**Iterated maximum likelihood** (IML, Eqs. 12-13) needs no perfectly aligned data: start from
roughly aligned training pairs (``beta^0``: identity or a given transform), train the classifier
on patches cropped with the current transforms (Eq. 13), re-register every training pair with
the classifier as metric (Eq. 12, Powell through :func:`itreg.register`), and repeat. Each
stage ``IML(l, sigma^2)`` works on images downsampled by the factor ``l`` (Gaussian blur of
sigma ``l * spacing / 2`` mm and decimation; ``l`` of 0 or 1 means none, so a patch stays
17 voxels but covers ``l`` times more anatomy) and **dithers** the positives: the moving crop
centre of every positive pair is displaced by ``d ~ N(0, sigma^2 I)`` (sigma^2 in mm^2) before
cropping (one ``d`` per pair, trilinear sampling). Each stage starts from the previous
stage's weights (warm start). Default schedules are the paper's (:data:`SCHEDULES`):
rigid/affine ``(4, 100) -> (2, 15) -> (0, 0)``, edges ``(2, 20) -> (2, 10) -> (0, 0)``.
Optionally the same random 90-degree rotation / flip is applied to both channels of a training
pair (augmentation, paper 000 Exp. 2).

**Robustness to intensity nonuniformity** (additions to the paper): a smooth multiplicative bias
field of the moving image moved the response peaks of the plain classifier by about ±0.5 mm per
pair and caused most of its precision gap to MI. Per-patch normalisation in the classifier
(:attr:`DITRTrainConfig.normalize_patches`, off by default) removes it; in the 2D benchmark
(``benchmarks/results/2026-12-06-ditr-bias-robust.md``, T1 -> T2-like with bias field) the
median errors fell from 0.89 / 0.72 / 0.62 / 1.09 mm to 0.48 / 0.21 / 0.46 / 0.38 mm at 3 / 8 /
15 / 25 mm initial error with the dithered schedule (still 100% success), and the mean
|response peak| from 0.46 to 0.08 mm. But the response narrows (FWHM 34 -> 17 mm) and the
capture range shrinks: without dithering 3 of 5 cases at 25 mm were missed, and the Canny-edge
model fell from 80% / 80% to 60% / 0% success at 15 / 25 mm. Bias-field augmentation of the
training patches (:attr:`DITRTrainConfig.bias_augment`, amplitude 0.1 or 0.3) changed nothing
measurable. Both are off by default.

**Zero-mean updates** (:attr:`DITRTrainConfig.zero_mean_updates`, an addition to the paper): the
common mode of the training set's alignment is not identifiable by IML, because a classifier
can only learn what the data call "aligned": moving every pair by the same small transform
gives data that are just as consistent. With the option, each re-registration's updates are
projected to zero mean over the pairs, as in the zero-sum constraint of groupwise registration
(:func:`remove_mean_update`): for pair ``i`` with start ``t_i`` and re-registered ``T_i``
(linear fixed -> moving), the update is the fixed-space map ``V_i = t_i^-1 o T_i``, written
about the centroid ``c_i`` of the pair's fixed mask as ``V_i(x) = c_i + d_i + A_i (x - c_i)``.
The mean translation ``mean(d_i)`` and the log-Euclidean mean of the linear parts
``mean(log A_i)`` are removed:
``V_i'(x) = c_i + d_i - mean(d) + expm(log A_i - mean(log A)) (x - c_i)`` and
``T_i' = t_i o V_i'``. Differences between pairs are kept exactly; a rotation stays a rotation
(the log of a rotation is skew-symmetric); the alignment's common mode stays that of the
initial transforms ``beta^0``. It is **off by default** because it changed nothing measurable
in the small 2D T1 -> T2-like benchmark (``benchmarks/results/2026-12-06-ditr-zero-mean.md``):
the re-registrations do drift in common (the option removed mean updates of 0.8-1.1 mm, then
0.4-0.6 mm, along x; without it the final labels were biased by +0.46 mm in x, with it by the
initial -0.22 mm), but the classifiers trained with and without it had the same success
rates, response widths and response peaks (within 0.02 mm), and a classifier trained on the
exact transforms (no IML) peaked at the same place: at 3 mm voxels the classifier does not
pick up a common label shift of this size.

Training per stage: Adam (lr ``5e-5`` and L2 weight decay ``0.005`` as in the paper), batch 256,
fresh random patches every epoch, a fixed validation set (from held-out pairs when there are at
least 5 pairs, otherwise from the training pairs with another seed), early stopping on the
validation loss, the best weights kept; a non-finite loss stops training with
:class:`~itreg.train.TrainingError` after writing the last good weights to the output file.

The settings (:class:`DITRTrainConfig`, the IML schedules) are in :mod:`itreg.train.ditr_config`;
pairs, stage images and patch sampling in :mod:`itreg.train.ditr_data` (all re-exported here).

Settings:

- **Small CPU setting** (:meth:`DITRTrainConfig.small`, minutes on two cores): 2D axial slices
  (or 3D at 3-4 mm), schedule in factors of the input spacing ``(2, 100) -> (1, 15) -> (1, 0)``
  (at 4 mm: 8 mm then 4 mm voxels), 16,384 patch pairs per epoch, up to 8 epochs per stage,
  Adam lr 1e-3 and weight decay 1e-4 (the paper's 5e-5 needs far more steps than a CPU run
  affords), 10 Powell iterations per re-registration. ``benchmarks/ditr_capture_range.py``
  trains three such models (17 slices at 3 mm, channels 16-32-64-128, 8,192 pairs x 5 epochs
  per stage). With flip-symmetric classifiers and at least 256 patches per re-registration,
  that took 20-38 minutes each on two cores that other jobs were also loading (load 11-16),
  against about 3 minutes each before those two changes
  (``benchmarks/results/2026-11-22-ditr-capture-range.md``).
- **Full-scale GPU setting** (:meth:`DITRTrainConfig.full`, paper 000 scale): 3D volumes at
  1 mm, the paper's schedule ``(4, 100) -> (2, 15) -> (0, 0)``, 17^3 patches, 1,000,000 patch
  pairs per stage (200,000 per epoch, 5+ epochs), batch 256, lr 5e-5, weight decay 0.005,
  60 training pairs (IXI-like), 3 IML stages, re-registration with Powell. Move the images to
  the GPU (``device="cuda"``); the network and all sampling follow the images' device.

Example:
    >>> cfg = DITRTrainConfig.small(seed=1)                                   # doctest: +SKIP
    >>> out = train_ditr([TrainingPair(f, m, mask) for f, m, mask in data], cfg,
    ...                  output="ditr.pt")                                    # doctest: +SKIP
    >>> itreg.register(f2, m2, "rigid", metric="ditr:ditr.pt",
    ...                overrides=ditr_overrides("ditr.pt"))                   # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from itreg.blocks.ditr import MODEL_KIND, DITRNet
from itreg.blocks.modelfile import save_model
from itreg.errors import ConfigError, GeometryError
from itreg.image import Image
from itreg.metrics.ditr import ditr_overrides
from itreg.runtime import limited_threads
from itreg.train import TrainingError, TrainResult, fit, make_generator, seeded
from itreg.train.ditr_config import SCHEDULES, DITRTrainConfig, IMLStage
from itreg.train.ditr_data import (
    PatchSampler,
    StageImages,
    TrainingPair,
    augment_pairs,
    classifier_accuracy,
    pair_mask,
    prepare_stage,
    random_bias_fields,
)
from itreg.transforms import Transform

logger = logging.getLogger(__name__)

__all__ = ["SCHEDULES", "DITRTrainConfig", "DITRTrainingResult", "IMLStage", "PatchSampler",
           "StageImages", "TrainingPair", "augment_pairs", "classifier_accuracy", "prepare_stage",
           "random_bias_fields", "remove_mean_update", "reregister", "train_ditr"]


def reregister(images: Sequence[StageImages], transforms: Sequence[Transform | None],
               model_path: str | os.PathLike, transform: str = "rigid",
               iterations: int = 20, stride: int = 8, seed: int = 0,
               min_patches: int = 256) -> list[Transform]:
    """Eq. 12: re-register every pair with the DITR metric of `model_path` (Powell).

    Args:
        images: stage images (registration runs at the stage's resolution, one level).
        transforms: current transforms (the starting points; None: identity).
        model_path: the current classifier's model file.
        transform: the transform model optimised.
        iterations: Powell iterations.
        stride: patch-centre stride of the metric.
        seed: engine seed.
        min_patches: the metric's least number of patches (it reduces the stride for these).

    Returns:
        The new fixed -> moving transforms (linear).
    """
    import itreg

    out = []
    overrides = ditr_overrides(model_path, iterations=iterations)
    overrides["metric.stride"] = stride
    overrides["metric.min_patches"] = min_patches
    for st, t in zip(images, transforms):
        mask = Image(st.mask.to(torch.uint8)[None], st.fixed.grid, is_label=True)
        res = itreg.register(st.fixed, st.moving, transform, metric=f"ditr:{model_path}",
                             fixed_mask=mask, init=t if t is not None else "none", seed=seed,
                             progress=False, overrides=overrides)
        out.append(res.linear if res.linear is not None else res.transform)
    return out


def _linear_parts(t: Transform | None, ndim: int) -> tuple[Tensor, Tensor]:
    """``(A, b)`` in float64 on the CPU with ``t(x) = A x + b`` (None: the identity)."""
    if t is None:
        return torch.eye(ndim, dtype=torch.float64), torch.zeros(ndim, dtype=torch.float64)
    lin = t
    if not hasattr(lin, "matrix") and getattr(t, "is_linear", False) and hasattr(t,
                                                                                "linear_part"):
        lin = t.linear_part()
    if lin is None or not hasattr(lin, "matrix") or not hasattr(lin, "offset"):
        raise ConfigError(f"zero-mean IML updates need linear transforms, got "
                          f"{type(t).__name__}")
    with torch.no_grad():
        return (lin.matrix().detach().to("cpu", torch.float64),
                lin.offset().detach().to("cpu", torch.float64))


def _logm(a: Tensor) -> Tensor:
    import numpy as np
    import scipy.linalg

    out = scipy.linalg.logm(a.numpy())
    if np.iscomplexobj(out):
        if float(np.abs(out.imag).max()) > 1e-8:
            raise ConfigError("zero-mean IML updates: an update's linear part has no real "
                              "logarithm (a reflection or a rotation by pi)")
        out = out.real
    return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float64))


def remove_mean_update(starts: Sequence[Transform | None], updated: Sequence[Transform],
                       centres: Sequence[Tensor | Sequence[float]]
                       ) -> tuple[list[Transform], dict[str, Any]]:
    """Project re-registration updates to zero mean over the pairs (zero-mean IML updates).

    For pair ``i`` with start ``t_i`` and re-registered ``T_i`` (linear fixed -> moving world
    maps), the update is the fixed-space map ``V_i = t_i^-1 o T_i``, written about the centre
    ``c_i`` (world, mm; the centroid of the pair's fixed mask) as
    ``V_i(x) = c_i + d_i + A_i (x - c_i)`` with ``d_i = V_i(c_i) - c_i``. The result is
    ``T_i' = t_i o V_i'`` with

        ``V_i'(x) = c_i + (d_i - mean_j d_j) + expm(log A_i - mean_j log A_j) (x - c_i)``,

    so the mean translation at the centres is zero and the log-Euclidean mean of the linear
    parts is the identity, while every difference ``d_i - d_j`` and ``log A_i - log A_j`` is
    kept. A common translation ``o`` added to every ``d_i`` (or a common ``L`` added to every
    ``log A_i``) is removed exactly. Rotations stay rotations (skew-symmetric logs), scaled
    rotations stay scaled rotations. Computed in float64.

    Args:
        starts: the start transforms ``t_i`` (None: identity).
        updated: the re-registered transforms ``T_i``.
        centres: the centre ``c_i`` of each pair (world coordinates of its fixed image).

    Returns:
        ``(transforms, removed)``: the projected ``T_i'`` as :class:`~itreg.transforms.Affine`
        with centre ``c_i`` (dtype and device of ``T_i``), and the removed mean update
        ``{"translation_mm": mean d, "log_linear": mean log A}`` as lists.

    Raises:
        ConfigError: a non-linear transform, or lists of different lengths.
    """
    from itreg.transforms import Affine

    if not (len(starts) == len(updated) == len(centres)) or not updated:
        raise ConfigError(f"remove_mean_update needs as many starts, updates and centres "
                          f"(at least one), got {len(starts)}, {len(updated)}, {len(centres)}")
    nd = updated[0].ndim
    cs, ds, logs, starts_ab = [], [], [], []
    for t0, t1, c in zip(starts, updated, centres):
        a0, b0 = _linear_parts(t0, nd)
        a1, b1 = _linear_parts(t1, nd)
        c = torch.as_tensor(c, dtype=torch.float64).reshape(-1).cpu()
        if c.numel() != nd:
            raise ConfigError(f"a centre needs {nd} coordinates, got {c.numel()}")
        a0_inv = torch.linalg.inv(a0)
        av = a0_inv @ a1                      # V = t0^-1 o T: x -> a0^-1 (a1 x + b1 - b0)
        bv = a0_inv @ (b1 - b0)
        cs.append(c)
        ds.append(av @ c + bv - c)
        logs.append(_logm(av))
        starts_ab.append((a0, b0))
    mean_d = torch.stack(ds).mean(0)
    mean_log = torch.stack(logs).mean(0)
    out: list[Transform] = []
    for (a0, b0), c, d, lg, t1 in zip(starts_ab, cs, ds, logs, updated):
        av = torch.linalg.matrix_exp(lg - mean_log)
        bv = c + (d - mean_d) - av @ c        # V'(x) = av x + bv
        a = a0 @ av                           # T' = t0 o V'
        b = a0 @ bv + b0
        ref = next(iter(t1.buffers()), None) if hasattr(t1, "buffers") else None
        out.append(Affine.from_matrix(a, b, center=c,
                                      dtype=ref.dtype if ref is not None else torch.float32,
                                      device=ref.device if ref is not None else None))
    return out, {"translation_mm": mean_d.tolist(), "log_linear": mean_log.tolist()}


@dataclass
class DITRTrainingResult:
    """What :func:`train_ditr` produced.

    Attributes:
        network: the final classifier (eval mode).
        transforms: the final fixed -> moving transform of every training pair (after the
            last re-registration; the initial ones if there was none).
        stages: per stage: factor, dither, spacing, validation loss/accuracy and the
            :class:`~itreg.train.TrainResult` summary.
        path: the written model file, or None.
    """

    network: DITRNet
    transforms: list[Transform | None]
    stages: list[dict[str, Any]] = field(default_factory=list)
    path: Path | None = None


def _split(n: int, fraction: float, generator: torch.Generator) -> tuple[list[int], list[int]]:
    if n < 5 or fraction <= 0:
        return list(range(n)), []
    perm = torch.randperm(n, generator=generator).tolist()
    n_val = max(1, round(fraction * n))
    return sorted(perm[n_val:]), sorted(perm[:n_val])


def train_ditr(pairs: Sequence[TrainingPair], config: DITRTrainConfig | None = None,
               output: str | os.PathLike | None = None, force: bool = False,
               network: DITRNet | None = None) -> DITRTrainingResult:
    """Train a DITR classifier by iterated maximum likelihood and optionally save it.

    Args:
        pairs: roughly aligned training pairs (2D or 3D, all the same dimension).
        config: settings (default :class:`DITRTrainConfig`).
        output: model file to write (checkpointed after every improvement, so a crash or a
            non-finite loss leaves the last good weights there); None writes nothing.
        force: overwrite an existing `output`.
        network: a classifier to start from (warm start); None builds one from `config`.

    Returns:
        The :class:`DITRTrainingResult` (final network, transforms, per-stage log).

    Raises:
        TrainingError: a non-finite loss or gradient; the last good weights are in `output`.
        ConfigError, GeometryError, InvalidImageError: bad settings or inputs.
        OutputExistsError: `output` exists and `force` is False.
    """
    cfg = config or DITRTrainConfig()
    pairs = list(pairs)
    if not pairs:
        raise ConfigError("train_ditr needs at least one training pair")
    ndim = pairs[0].fixed.ndim
    if any(p.fixed.ndim != ndim or p.moving.ndim != ndim for p in pairs):
        raise GeometryError("all training pairs must have the same dimension (2D or 3D)")
    if output is not None and Path(output).exists() and not force:
        from itreg.errors import OutputExistsError

        raise OutputExistsError(f"model file {str(output)!r} exists; pass force to replace it")
    device = pairs[0].fixed.device
    base = min(pairs[0].fixed.grid.spacing)
    gen = make_generator(cfg.seed)
    if network is None:
        with seeded(cfg.seed):
            network = DITRNet(ndim, cfg.channels, cfg.patch_size, spacing_mm=base,
                              symmetric=cfg.symmetric, normalize=cfg.normalize_patches)
    net = network.to(device)
    train_idx, val_idx = _split(len(pairs), cfg.val_fraction, gen)
    transforms: list[Transform | None] = [p.init for p in pairs]
    result = DITRTrainingResult(net, transforms)
    state: dict[str, Any] = {"stage": 0}
    centres: list[Tensor] = []  # of the fixed masks (world, full resolution): zero-mean updates
    if cfg.zero_mean_updates:
        from itreg.phantoms._geometry import centroid

        centres = [centroid(p.fixed.grid, pair_mask(p).cpu()) for p in pairs]
    cleanup = contextlib.ExitStack()
    tmpdir = cleanup.enter_context(tempfile.TemporaryDirectory(prefix="itreg-ditr-"))
    cleanup.enter_context(limited_threads(cfg.threads))

    def write(path: str | os.PathLike, extra: dict[str, Any]) -> None:
        save_model(path, MODEL_KIND, net.config(), net.state_dict(),
                   {"training": cfg.to_dict(), "stages": result.stages, **extra}, force=True)

    try:
        for si, stage in enumerate(cfg.schedule):
            state["stage"] = si
            images = [prepare_stage(p, stage) for p in pairs]
            net.spacing_mm = float(min(images[0].fixed.grid.spacing))
            sampler = PatchSampler([images[i] for i in train_idx],
                                   [transforms[i] for i in train_idx], cfg.patch_size,
                                   stage.sigma2_mm2, gen, cfg.bias_augment)
            val_gen = make_generator(cfg.seed + 7919 * (si + 1))
            val_src = val_idx or train_idx
            val_sampler = PatchSampler([images[i] for i in val_src],
                                       [transforms[i] for i in val_src], cfg.patch_size,
                                       stage.sigma2_mm2, val_gen)
            val_pairs, val_labels = val_sampler.draw(cfg.val_patches)
            steps = max(1, cfg.patches_per_epoch // cfg.batch_size)

            def batches(epoch: int, steps: int = steps, sampler: PatchSampler = sampler):
                for _ in range(steps):
                    yield sampler.draw(cfg.batch_size, augment=cfg.augment)

            def loss_fn(batch):
                x, y = batch
                return nn.functional.binary_cross_entropy_with_logits(net(x), y)

            def validate(val_pairs: Tensor = val_pairs, val_labels: Tensor = val_labels):
                loss, acc = classifier_accuracy(net, val_pairs, val_labels)
                return {"val_loss": loss, "val_accuracy": acc}

            def checkpoint(model, info, si: int = si):
                if output is not None:
                    write(output, {"checkpoint": {"stage": si, **{
                        k: v for k, v in info.items() if isinstance(v, (int, float, str))}}})

            opt = torch.optim.Adam(net.parameters(), lr=cfg.learning_rate,
                                   weight_decay=cfg.weight_decay)
            before = classifier_accuracy(net, val_pairs, val_labels)
            try:
                tr: TrainResult = fit(
                    net, opt, batches, loss_fn, validate, epochs=cfg.epochs,
                    patience=cfg.patience, checkpoint=checkpoint, progress=cfg.progress,
                    description=f"DITR IML{si + 1}({stage.factor}, {stage.sigma2_mm2:g})",
                    steps_per_epoch=steps)
            except TrainingError as exc:
                where = f" in {str(output)!r}" if output is not None else ""
                raise TrainingError(f"DITR stage IML{si + 1}: {exc}{where}", exc.result) \
                    from None
            after = classifier_accuracy(net, val_pairs, val_labels)
            info = {"stage": si + 1, "factor": stage.factor, "sigma2_mm2": stage.sigma2_mm2,
                    "spacing_mm": net.spacing_mm, "val_loss_before": before[0],
                    "val_accuracy_before": before[1], "val_loss": after[0],
                    "val_accuracy": after[1], "train": tr.to_dict()}
            last = si == len(cfg.schedule) - 1
            if cfg.reregister and not last:
                path = Path(tmpdir) / f"stage{si + 1}.pt"
                write(path, {})
                new = reregister(images, transforms, path, cfg.transform,
                                 cfg.register_iterations, cfg.stride, cfg.seed, cfg.min_patches)
                if cfg.zero_mean_updates:
                    new, removed = remove_mean_update(transforms, new, centres)
                    info["removed_mean_update"] = removed
                    logger.info("DITR IML%d: removed mean update, translation %s mm", si + 1,
                                [round(v, 3) for v in removed["translation_mm"]])
                transforms = new
                result.transforms = transforms
            result.stages.append(info)
            logger.info("DITR IML%d(%d, %g): val accuracy %.3f -> %.3f", si + 1, stage.factor,
                        stage.sigma2_mm2, before[1], after[1])
        net.eval()
        if output is not None:
            write(output, {})
            result.path = Path(output)
        return result
    finally:
        cleanup.close()

"""Pairwise registration with a trained network, optionally refined by the iterative engine.

:func:`register_with_net` loads a registration network (``regnet-affine``, ``regnet-deform`` or
``regnet-cascade`` model file, see :mod:`itreg.nets.regnets`), predicts the fixed -> moving
transform in one forward pass and returns a :class:`NetRegistrationResult`, which
:func:`itreg.results.save_registration` writes exactly like an iterative result
(``warped.nii.gz``, ``transform.tfm``, ``displacement.nii.gz`` for deformable networks,
``report.json`` with ``"wall_time_s"``).

With ``refine=True`` the prediction is the starting point of the iterative engine
(:func:`itreg.register` with ``init=`` the predicted transform), with the same metric the
network was trained with unless `metric` says otherwise:

- an affine network is refined by the ``affine`` preset's affine stage (its rigid stage is
  dropped: the network already did the coarse alignment), starting from the predicted affine;
- a deformable or cascade network is refined by the non-linear stages of the ``bspline`` preset
  (its linear stages are dropped), and the first of them skips its coarsest level (the network
  did the coarse work). When that stage is a B-spline FFD, it starts from the least-squares
  FFD of the prediction (:meth:`~itreg.transforms.BSpline.fit`; ``refine_init="fit"``): the
  network's detail finer than the control spacing is left out, and the engine optimises that
  FFD's coefficients, the same smooth model it would from scratch, from a close start (the
  result holds one FFD). With ``refine_init="compose"`` (or a dense or velocity refinement)
  the prediction stays a frozen outer transform and the engine optimises a transform composed
  after it: ``Compose(prediction, identity-affine, ffd)``. Either way the result is written
  as one displacement field.

  Why (``benchmarks/results/2026-12-06-regnet-phantoms-3d.md``, 50 3D 2 mm phantom pairs, a
  DeformNet MI-64 at Dice 0.803): composing reached 0.814, below iterative registration
  alone (0.845) on every pair, because the 20 mm FFD composed after the network's field
  cannot undo its finer errors. The fit start reaches 0.846 with 11 % less CPU than
  iterative. On pairs 0-6, the fit start with the coarsest level as well gave 0.821-0.847,
  and from the second level on 0.830-0.849 (iterative 0.825-0.851).

``preset`` / ``transform`` / ``overrides`` change this refinement as for :func:`itreg.register`
(for example ``overrides={"stages.0.iterations": [40, 30]}``).

Example:
    >>> from itreg.nets.inference import register_with_net                 # doctest: +SKIP
    >>> res = register_with_net("fixed.nii.gz", "moving.nii.gz", "net.pt", refine=True)
    >>> res.wall_time_s, res.inference_time_s                               # doctest: +SKIP
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from itreg.errors import ConfigError
from itreg.image import Image
from itreg.transforms import Affine, BSpline, Compose, LinearTransform, Transform

logger = logging.getLogger(__name__)

__all__ = ["NetRegistrationResult", "refine_config", "register_with_net", "training_metric"]

PathLike = str | os.PathLike

#: How a non-linear prediction starts a B-spline refinement (see the module notes).
REFINE_INITS = ("fit", "compose")

#: Model kinds this module applies, and the preset their refinement starts from.
REFINE_PRESETS = {"regnet-affine": "affine", "regnet-deform": "bspline",
                  "regnet-cascade": "bspline"}


def training_metric(extra: Mapping[str, Any]) -> str | None:
    """The metric name a network was trained with, from its model file's ``extra`` data
    (None if the file does not say, or the loss is not a registry metric)."""
    train = extra.get("train") if isinstance(extra, Mapping) else None
    config = train if isinstance(train, Mapping) else extra
    loss = config.get("loss") if isinstance(config, Mapping) else None
    return loss if isinstance(loss, str) and loss else None


def refine_config(kind: str, metric: str | None = None, preset=None, transform=None,
                  overrides: Mapping[str, Any] | None = None):
    """The engine configuration that refines a `kind` network's prediction.

    The stages come from the preset named by `transform` (default: ``affine`` for affine
    networks, ``bspline`` for deformable and cascade ones), without the coarse stages the
    network replaces: an affine network's prediction is refined from the first affine or
    non-linear stage on (translation, rigid and similarity stages are dropped); a deformable
    network's by the non-linear stages only (or the last stage if the preset has none), the
    first of them without its coarsest level when it has several.

    Args:
        kind: the model kind (``regnet-affine``, ``regnet-deform``, ``regnet-cascade``).
        metric: the metric of every stage (default: the preset's).
        preset: a preset name, TOML file or :class:`~itreg.engine.config.RegistrationConfig`
            used as given (no stage dropped; `transform` then replaces its last stage's
            transform as in :func:`itreg.api.resolve_config`).
        transform: a preset or transform name choosing the refinement (see above).
        overrides: dotted-key settings applied last.

    Raises:
        ConfigError: unknown kind, names or settings.
    """
    from itreg.api import available_presets, resolve_config
    from itreg.engine.config import RegistrationConfig

    if kind not in REFINE_PRESETS:
        raise ConfigError(f"cannot refine a {kind!r} model; refinement applies to "
                          f"{', '.join(REFINE_PRESETS)}")
    if preset is not None:
        return resolve_config(transform=transform, metric=metric, preset=preset,
                              overrides=overrides)
    name = transform or REFINE_PRESETS[kind]
    base = (resolve_config(preset=name, metric=metric) if name in available_presets()
            else resolve_config(transform=name, metric=metric))
    if kind == "regnet-affine":
        first = next((i for i, s in enumerate(base.stages)
                      if not s.is_linear or s.transform == "affine"), len(base.stages) - 1)
        stages = base.stages[first:]
    else:
        stages = tuple(s for s in base.stages if not s.is_linear) or base.stages[-1:]
        first = stages[0]
        stages = (first.finest_levels(max(first.levels - 1, 1)), *stages[1:])
    config = RegistrationConfig(stages=tuple(stages), name=f"{base.name}-refine",
                                min_overlap=base.min_overlap)
    return config.with_overrides(overrides)


class NetRegistrationResult:
    """The outcome of a network registration (and its optional refinement).

    It has the attributes :func:`itreg.results.write_registration` needs, like the engine's
    :class:`~itreg.engine.registration.RegistrationResult`.

    Attributes:
        transform: the whole map, fixed -> moving world points.
        linear: its linear part as an :class:`~itreg.transforms.Affine` (None for a purely
            deformable network without refinement of a linear part).
        prediction: the network's own transform (before refinement).
        inference_time_s: seconds of the network prediction (model loading excluded).
        refinement: the engine's result when refined, else None.
        wall_time_s: inference plus refinement seconds.
        fixed, moving: the input images.
        model: the model file's path, kind and training settings.
    """

    def __init__(self, prediction: Transform, fixed: Image, moving: Image,
                 inference_time_s: float, model: dict[str, Any], refinement=None) -> None:
        self.prediction = prediction
        self.fixed = fixed
        self.moving = moving
        self.inference_time_s = float(inference_time_s)
        self.model = dict(model)
        self.refinement = refinement
        if refinement is None:
            self.transform = prediction
        else:
            self.transform = refinement.transform
        self.linear = self._linear_part()

    def _linear_part(self) -> Affine | None:
        t = self.transform
        if isinstance(t, LinearTransform):
            return t.to_affine()
        if self.refinement is not None and isinstance(self.prediction, LinearTransform):
            return self.refinement.linear
        pred = self.prediction
        if isinstance(pred, Compose):
            first = pred.transforms[0]
            if isinstance(first, LinearTransform):
                return first.to_affine()
        return None

    @property
    def wall_time_s(self) -> float:
        refine = self.refinement.wall_time_s if self.refinement is not None else 0.0
        return self.inference_time_s + refine

    @property
    def stop_reasons(self) -> list[str]:
        if self.refinement is None:
            return ["network"]
        return ["network"] + list(self.refinement.stop_reasons)

    @functools.cached_property
    def warped(self) -> Image:
        """The moving image resampled onto the fixed grid through :attr:`transform`."""
        from itreg.warp import resample

        with torch.no_grad():
            return resample(self.moving, self.transform, self.fixed.grid, mode="auto")

    def report(self, history: bool = True) -> dict:
        """A JSON-serialisable summary (``wall_time_s``, network, refinement)."""
        out: dict[str, Any] = {
            "itreg_report": 1,
            "method": "network" + ("+refine" if self.refinement is not None else ""),
            "wall_time_s": round(self.wall_time_s, 6),
            "inference_time_s": round(self.inference_time_s, 6),
            "model": self.model,
            "fixed": {"size": list(self.fixed.grid.size),
                      "spacing": list(self.fixed.grid.spacing)},
            "moving": {"size": list(self.moving.grid.size),
                       "spacing": list(self.moving.grid.spacing)},
            "stop_reasons": self.stop_reasons,
            "transform": type(self.transform).__name__,
        }
        if self.refinement is not None:
            out["refinement"] = self.refinement.report(history)
        if self.linear is not None:
            from itreg.engine.registration import linear_summary

            out["linear"] = linear_summary(self.linear)
        return out

    def __repr__(self) -> str:
        return (f"NetRegistrationResult(transform={type(self.transform).__name__}, "
                f"refined={self.refinement is not None}, wall_time_s={self.wall_time_s:.3f})")


def _load(model: PathLike | nn.Module) -> tuple[nn.Module, dict[str, Any]]:
    from itreg.blocks.modelfile import load_model
    from itreg.nets.regnets import load_regnet

    if isinstance(model, nn.Module):
        kind = getattr(model, "model_kind", None) or getattr(model, "kind", None)
        return model, {"path": None, "kind": kind, "train": {}}
    path = Path(model)
    kind, config, _, extra = load_model(path)
    if kind not in REFINE_PRESETS:
        raise ConfigError(f"model file {str(path)!r} holds a {kind!r} model, not a pairwise "
                          f"registration network ({', '.join(REFINE_PRESETS)})")
    net = load_regnet(path)
    return net, {"path": str(path), "kind": kind, "config": config,
                 "train": extra.get("train", {}) if isinstance(extra, dict) else {}}


def register_with_net(
    fixed: Image | PathLike,
    moving: Image | PathLike,
    model: PathLike | nn.Module,
    *,
    refine: bool = False,
    refine_init: str = "fit",
    metric: str | None = None,
    preset=None,
    transform: str | None = None,
    fixed_mask=None,
    moving_mask=None,
    seed: int = 0,
    threads: int | None = None,
    progress: bool = True,
    overrides: Mapping[str, Any] | None = None,
) -> NetRegistrationResult:
    """Register `moving` to `fixed` with a trained network, optionally refined iteratively.

    Args:
        fixed: the fixed image or its path.
        moving: the moving image or its path (any grid: the network sees it resampled onto
            the fixed grid; the returned transform maps to its own world points).
        model: a registration-network model file (or a loaded network module).
        refine: continue from the prediction with the iterative engine.
        refine_init: how a non-linear prediction starts a B-spline refinement: ``"fit"``
            (its least-squares FFD on the stage's control grid) or ``"compose"`` (kept as a
            frozen outer transform); see the module notes.
        metric: the refinement's metric; default the network's training loss when it is a
            registry metric (``mi``, ``lncc``, ``mine``, ``deepsim:...``), else the preset's.
        preset, transform, overrides: change the refinement (see :func:`refine_config`).
        fixed_mask, moving_mask: masks for the refinement (as :func:`itreg.register`).
        seed, threads, progress: as :func:`itreg.register`.

    Raises:
        ModelFileError: the model file is missing, malformed or of another version.
        ConfigError: the model is not a pairwise registration network, or bad settings.
        GeometryError: the images do not fit the network (dimension, channels).
        ImageReadError, InvalidImageError: an unreadable image, NaN/Inf voxels, a constant image.
    """
    from itreg.api import prepare_inputs, register
    from itreg.runtime import limited_threads

    # The same reading and checks as iterative registration (NaN, constant, dimension).
    if refine_init not in REFINE_INITS:
        raise ConfigError(f"refine_init must be one of {', '.join(REFINE_INITS)}, got "
                          f"{refine_init!r}")
    fixed_img, moving_img, _, _, _ = prepare_inputs(fixed, moving)
    net, info = _load(model)
    with limited_threads(threads):
        start = time.perf_counter()
        with torch.no_grad():
            prediction = net.predict(fixed_img, moving_img)
        inference = time.perf_counter() - start
    logger.info("network prediction in %.3f s", inference)
    refinement = None
    if refine:
        kind = info.get("kind") or ""
        train = info.get("train", {})
        name = metric or _refine_metric(train)
        if metric is None and name is not None and isinstance(train.get("loss_kwargs"), dict):
            # The training metric's options (MI bins, LNCC window) carry over.
            options = {f"metric.{k}": v for k, v in train["loss_kwargs"].items()}
            overrides = {**options, **dict(overrides or {})}
        config = refine_config(kind, name, preset=preset, transform=transform,
                               overrides=overrides)
        start = prediction
        first = config.stages[0]
        if (refine_init == "fit" and first.transform == "bspline"
                and not isinstance(prediction, LinearTransform)):
            start = BSpline.fit(prediction, fixed_img.grid, first.control_spacing_mm,
                                device=fixed_img.data.device)
        refinement = register(fixed_img, moving_img, preset=config, init=start,
                              fixed_mask=fixed_mask, moving_mask=moving_mask, seed=seed,
                              threads=threads, progress=progress)
    return NetRegistrationResult(prediction, fixed_img, moving_img, inference, info, refinement)


def _refine_metric(train: Mapping[str, Any]) -> str | None:
    """The registry metric of a training loss, or None (the preset's metric is used)."""
    from itreg.metrics import available_metrics

    name = training_metric(train)
    if name is None:
        return None
    base = name.split(":", 1)[0]
    if ":" in name or base in available_metrics():
        return name
    return None

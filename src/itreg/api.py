"""The Python front door: ``register(fixed, moving, ...)``.

Example:
    >>> from itreg.api import register
    >>> result = register("t1.nii.gz", "t2.nii.gz", "affine", "mi")    # doctest: +SKIP
    >>> result.transform, result.stop_reasons, result.report()         # doctest: +SKIP

Inputs are checked before any optimisation (reliability promise): NaN/Inf voxels
(:class:`~itreg.errors.InvalidImageError` with their count), constant images, images of
different dimension or with several channels (:class:`~itreg.errors.GeometryError`), empty or
misplaced masks (:class:`~itreg.errors.MaskError`), unknown names and invalid settings
(:class:`~itreg.errors.ConfigError`), and images whose extents do not overlap after
initialisation (:class:`~itreg.errors.GeometryError`).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from itreg.engine.callbacks import Progress
from itreg.engine.config import (
    TRANSFORM_ALIASES,
    TRANSFORM_NAMES,
    RegistrationConfig,
    available_presets,
    config_from_toml,
    load_preset,
)
from itreg.engine.registration import LevelRecord, RegistrationResult, run
from itreg.errors import ConfigError, GeometryError, InvalidImageError, MaskError, unknown_name
from itreg.image import Image
from itreg.runtime import limited_threads, seeded
from itreg.transforms import Transform

logger = logging.getLogger(__name__)

#: The preset used when neither a preset nor a transform is given.
DEFAULT_PRESET = "affine"
#: The preset a bare linear transform name (translation, similarity) starts from.
LINEAR_BASE_PRESET = "rigid"

PathLike = str | os.PathLike


def resolve_config(transform: str | None = None, metric: str | None = None,
                   preset: str | RegistrationConfig | PathLike | None = None,
                   overrides: Mapping[str, Any] | None = None) -> RegistrationConfig:
    """The configuration :func:`register` runs for these arguments.

    Args:
        transform: a preset name (``rigid``, ``affine``, ``bspline``, ``dense``, ``svf``) or a
            stage transform name (``translation``, ``similarity``, ...). With `preset` given, a
            transform name replaces the transform of the preset's last stage.
        metric: a metric name for every stage (its options are reset unless it is the
            preset's metric).
        preset: a preset name, a TOML file or a :class:`RegistrationConfig`; default from
            `transform`, else ``"affine"``.
        overrides: dotted-key settings, e.g. ``{"metric.bins": 64, "stages.0.iterations": 50}``.

    Raises:
        ConfigError: unknown names, keys or invalid values (the message lists valid ones).
    """
    presets = available_presets()
    if isinstance(transform, str):
        transform = TRANSFORM_ALIASES.get(transform.lower(), transform)
    if preset is None:
        if transform is None:
            config = load_preset(DEFAULT_PRESET)
        elif transform in presets:
            config = load_preset(transform)
        elif transform in TRANSFORM_NAMES:
            config = load_preset(LINEAR_BASE_PRESET).with_transform(transform)
        else:
            raise unknown_name("transform or preset", str(transform),
                               sorted(set(presets) | set(TRANSFORM_NAMES)))
    else:
        if isinstance(preset, RegistrationConfig):
            config = preset
        elif isinstance(preset, (str, os.PathLike)) and str(preset).endswith(".toml"):
            path = Path(preset)
            if not path.is_file():
                raise ConfigError(f"config file '{path}' does not exist")
            config = config_from_toml(path.read_text(encoding="utf-8"))
        else:
            config = load_preset(str(preset))
        if transform is not None:
            if transform not in TRANSFORM_NAMES:
                raise unknown_name("transform", str(transform), TRANSFORM_NAMES)
            config = config.with_transform(transform)
    if metric is not None:
        if not isinstance(metric, str):
            raise ConfigError(f"metric must be a metric name, got {type(metric).__name__}")
        config = config.with_metric(metric)
    return config.with_overrides(overrides)


# ---------------------------------------------------------------------------------- inputs
def _load_image(value: Image | PathLike, role: str) -> tuple[Image, str]:
    if isinstance(value, Image):
        return value, f"{role} image"
    if isinstance(value, (str, os.PathLike)):
        from itreg import io

        return io.read_image(value), f"{role} image '{value}'"
    raise InvalidImageError(f"the {role} image must be an itreg Image or a file path, got "
                            f"{type(value).__name__}")


def _load_mask(value: Image | Tensor | PathLike | None, image: Image, name: str, role: str
               ) -> Tensor | None:
    """A bool mask ``image.grid.shape`` (nonzero = inside), or None."""
    if value is None:
        return None
    where = f"{role} mask"
    if isinstance(value, (str, os.PathLike)):
        from itreg import io

        mask = io.read_mask(value, reference=image.grid)
        return mask.data[0].to(device=image.device) != 0
    if isinstance(value, Image):
        if not value.grid.same_as(image.grid):
            raise MaskError(f"the {where} lies on another grid than the {name}: mask "
                            f"{value.grid!r} vs image {image.grid!r}; resample it onto the "
                            "image's grid (nearest neighbour)")
        data = value.data
    elif isinstance(value, Tensor):
        data = value
    else:
        raise MaskError(f"the {where} must be an Image, a tensor or a file path, got "
                        f"{type(value).__name__}")
    shape = tuple(image.grid.shape)
    if tuple(data.shape) == (1, *shape):
        data = data[0]
    if tuple(data.shape) != shape:
        raise MaskError(f"the {where} has shape {tuple(data.shape)} but the {name} has shape "
                        f"{shape}; a mask must lie on its image's grid")
    if data.is_floating_point() and not bool(torch.isfinite(data).all()):
        raise MaskError(f"the {where} has {int((~torch.isfinite(data)).sum())} NaN/Inf voxels")
    mask = (data != 0).to(image.device)
    if not bool(mask.any()):
        raise MaskError(f"the {where} is empty (all zero); a mask needs nonzero voxels inside")
    return mask


def _check_finite(image: Image, name: str) -> None:
    """InvalidImageError (with the count) for NaN/Inf voxels. One float64 sum decides in the
    common case: NaN and Inf propagate into it, float32 sums cannot overflow it."""
    data = image.data
    if data.is_floating_point() and not math.isfinite(float(data.sum(dtype=torch.float64))):
        image.check_finite(name)


def _check_contrast(image: Image, name: str, mask: Tensor | None) -> None:
    """InvalidImageError for an empty image or one without contrast (inside the mask)."""
    values = image.data if mask is None else image.data[:, mask]
    if values.numel() == 0:
        raise InvalidImageError(f"{name} is empty")
    lo, hi = torch.aminmax(values)
    if float(hi) == float(lo):
        raise InvalidImageError(f"{name} is constant (all voxels {float(lo):g}"
                                f"{' inside its mask' if mask is not None else ''}); "
                                "registration needs image contrast")


#: Fewer voxels than this along an axis cannot carry a registration in that axis (the
#: pyramid, the B-spline grid and the gradient all need a few voxels).
MIN_AXIS_VOXELS = 4
#: A ratio of voxel sizes above this (between the images, or between the axes of one image)
#: is warned about: it is almost always a header error, and registration then fits noise.
SPACING_RATIO_WARNING = 20.0


def _check_extent(image: Image, name: str) -> None:
    """GeometryError for an image too thin to register in its own dimension."""
    shape = tuple(image.grid.shape)  # (Z, Y, X) or (Y, X)
    axes = "xyz"[: image.ndim][::-1]
    thin = [f"{a} ({n} voxel{'s' if n != 1 else ''})" for a, n in zip(axes, shape)
            if n < MIN_AXIS_VOXELS]
    if thin:
        raise GeometryError(
            f"{name} is too thin to register in {image.ndim}D along {', '.join(thin)}; at "
            f"least {MIN_AXIS_VOXELS} voxels per axis are needed (register a single slice as "
            "a 2D image)")


def _check_spacings(fixed: Image, moving: Image, fname: str, mname: str) -> None:
    """Warn about voxel sizes that differ wildly (between the images or within one)."""
    f_sp, m_sp = fixed.grid.spacing, moving.grid.spacing
    ratio = max(max(f_sp), max(m_sp)) / max(min(min(f_sp), min(m_sp)), 1e-12)
    between = max(max(f_sp) / max(min(m_sp), 1e-12), max(m_sp) / max(min(f_sp), 1e-12))
    if ratio > SPACING_RATIO_WARNING:
        logger.warning(
            "voxel sizes differ by a factor of %.3g (%s: %s mm, %s: %s mm)%s; check the image "
            "headers", ratio, fname, "x".join(f"{v:g}" for v in f_sp), mname,
            "x".join(f"{v:g}" for v in m_sp),
            " between the images" if between > SPACING_RATIO_WARNING else " within an image")


def _working_dtype(image: Image) -> torch.dtype:
    return image.dtype if image.dtype in (torch.float32, torch.float64) else torch.float32


def prepare_inputs(fixed: Image | PathLike, moving: Image | PathLike,
                   fixed_mask=None, moving_mask=None
                   ) -> tuple[Image, Image, Tensor | None, Image | None, dict[str, str]]:
    """Read and check the images and masks (before any optimisation).

    Returns:
        ``(fixed, moving, fixed_mask, moving_mask, names)``: floating-point images on the
        fixed image's device and dtype (labels become intensities), a bool fixed mask tensor,
        a float 0/1 moving mask image, and a dict with how each image is named in messages
        (``"fixed"``, ``"moving"``) and, under ``"moving_labels"``, the moving image itself if
        it is a label map (None otherwise).

    Raises:
        ImageReadError: a path that cannot be read.
        InvalidImageError: NaN/Inf voxels, an empty or constant image (inside its mask).
        GeometryError: images of different dimension, or vector images.
        MaskError: an empty mask, or a mask on another grid.
    """
    fixed_img, fname = _load_image(fixed, "fixed")
    moving_img, mname = _load_image(moving, "moving")
    if fixed_img.ndim != moving_img.ndim:
        raise GeometryError(
            f"{mname} is {moving_img.ndim}D but {fname} is {fixed_img.ndim}D; register images "
            "of the same dimension")
    fixed_img = fixed_img.with_data(fixed_img.data.detach(), is_label=fixed_img.is_label)
    moving_img = moving_img.with_data(moving_img.data.detach(), is_label=moving_img.is_label)
    for img, name in ((fixed_img, fname), (moving_img, mname)):
        if img.channels != 1:
            raise GeometryError(f"{name} has {img.channels} components; registration needs "
                                "scalar images (pick one channel or convert to grey levels)")
        _check_finite(img, name)
        _check_extent(img, name)
    _check_spacings(fixed_img, moving_img, fname, mname)
    fmask = _load_mask(fixed_mask, fixed_img, fname, "fixed")
    mmask = _load_mask(moving_mask, moving_img, mname, "moving")
    _check_contrast(fixed_img, fname, fmask)
    _check_contrast(moving_img, mname, mmask)
    dtype = _working_dtype(fixed_img)
    device = fixed_img.device
    fixed_f = Image(fixed_img.data.detach().to(dtype), fixed_img.grid, is_label=False)
    moving_f = Image(moving_img.data.detach().to(device=device, dtype=dtype), moving_img.grid,
                     is_label=False)
    mmask_img = None
    if mmask is not None:
        mmask_img = Image(mmask.to(device=device, dtype=dtype), moving_img.grid, is_label=False)
    names = {"fixed": fname, "moving": mname,
             "moving_labels": moving_img if moving_img.is_label else None}
    return fixed_f, moving_f, fmask, mmask_img, names


def _check_bias_correction(value: object) -> None:
    """ConfigError unless `value` names a bias correction (``"none"``, ``"n4"``)."""
    if value == "none":
        return
    from itreg.io.n4 import BIAS_CORRECTIONS  # SimpleITK only when a correction is asked for

    if not isinstance(value, str) or value not in BIAS_CORRECTIONS:
        raise unknown_name("bias correction", str(value), BIAS_CORRECTIONS)


def _n4_pair(fixed: Image, moving: Image, fixed_mask: Tensor | None,
             moving_mask: Image | None) -> tuple[Image, Image]:
    """Both images N4-corrected, each inside its own mask (Otsu foreground without one)."""
    from itreg.io.n4 import n4_correct

    fmask = None
    if fixed_mask is not None:
        fmask = Image(fixed_mask.unsqueeze(0).to(torch.uint8), fixed.grid, is_label=True)
    mmask = None
    if moving_mask is not None:
        mmask = Image((moving_mask.data != 0).to(torch.uint8), moving.grid, is_label=True)
    return n4_correct(fixed, mask=fmask)[0], n4_correct(moving, mask=mmask)[0]


def register(
    fixed: Image | PathLike,
    moving: Image | PathLike,
    transform: str | None = None,
    metric: str | None = None,
    *,
    preset: str | RegistrationConfig | PathLike | None = None,
    fixed_mask: Image | Tensor | PathLike | None = None,
    moving_mask: Image | Tensor | PathLike | None = None,
    init: str | Transform = "centers",
    seed: int = 0,
    threads: int | None = None,
    callbacks: Iterable[object] | None = None,
    progress: bool = True,
    overrides: Mapping[str, Any] | None = None,
    bias_correction: str = "none",
) -> RegistrationResult:
    """Register `moving` to `fixed`: find ``T`` with ``moving(T(x)) ~ fixed(x)``.

    Args:
        fixed: the fixed (reference) image, or its path.
        moving: the moving image, or its path.
        transform: a preset (``rigid``, ``affine``, ``bspline``, ``dense``, ``svf``) or a stage
            transform (``translation``, ``similarity``); see :func:`resolve_config`.
        metric: metric name for every stage (``mi``, ``nmi``, ``ncc``, ``lncc``, ``mse``, ...,
            or ``"kind:model.pt"``); default: the preset's.
        preset: a preset name, a TOML config file or a :class:`RegistrationConfig`.
        fixed_mask: mask on the fixed grid (Image, tensor or path); samples are drawn inside.
        moving_mask: mask on the moving grid; points mapping outside it are ignored.
        init: ``"centers"``, ``"moments"``, ``"none"`` or a starting transform.
        seed: seed of every random choice; equal seeds give bitwise equal results on CPU.
        threads: torch CPU threads for this call (restored afterwards); default unchanged.
        callbacks: hooks with ``on_level_start``/``on_step``/``on_level_end``/``on_end``.
        progress: show a progress bar on stderr.
        overrides: dotted-key settings, e.g. ``{"metric.bins": 64}``.
        bias_correction: ``"none"`` (default) or ``"n4"``: remove each image's smooth
            multiplicative intensity nonuniformity (MR bias field) before registering, with
            SimpleITK's N4 (:func:`itreg.io.n4.n4_correct`: 3 fitting levels of 50
            iterations) inside the image's mask (Otsu foreground without one). The corrected
            images only steer the metric; the result's moving image (and so the warped
            output) keeps the original intensities. Recorded in the report's settings.

    Returns:
        The :class:`~itreg.engine.registration.RegistrationResult`.

    Raises:
        ItregError: for any problem with the inputs or settings (subclasses as in the module
            docstring); nothing is optimised then.
    """
    config = resolve_config(transform, metric, preset, overrides)
    _check_bias_correction(bias_correction)
    fixed_f, moving_f, fmask, mmask, names = prepare_inputs(fixed, moving, fixed_mask,
                                                            moving_mask)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"seed must be an integer, got {seed!r}")
    original_moving = moving_f
    if bias_correction == "n4":
        fixed_f, moving_f = _n4_pair(fixed_f, moving_f, fmask, mmask)
    cbs = list(callbacks or [])
    if progress:
        cbs.append(Progress())
    settings = {
        "fixed": names["fixed"], "moving": names["moving"],
        "init": init if isinstance(init, str) else type(init).__name__,
        "seed": seed, "threads": threads, "fixed_mask": fmask is not None,
        "moving_mask": mmask is not None, "device": str(fixed_f.device),
        "dtype": str(fixed_f.dtype).replace("torch.", ""),
        "bias_correction": bias_correction,
    }
    with limited_threads(threads), seeded(seed, fixed_f.device):
        result = run(fixed_f, moving_f, config, fixed_mask=fmask, moving_mask=mmask, init=init,
                     seed=seed, callbacks=cbs, settings=settings)
    result.moving = original_moving  # the correction steers the metric; outputs keep intensities
    if names["moving_labels"] is not None:
        result.moving = names["moving_labels"]  # registered as intensities, warped as labels
    return result


__all__ = ["LevelRecord", "RegistrationConfig", "RegistrationResult", "available_presets",
           "load_preset", "register", "resolve_config"]

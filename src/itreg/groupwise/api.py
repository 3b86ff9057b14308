"""Front door of groupwise registration: :func:`register_group` and :func:`save_group`.

Example:
    >>> from itreg.groupwise import register_group, save_group
    >>> result = register_group(["t1.nii.gz", "t2.nii.gz", "pd.nii.gz"], k=4)  # doctest: +SKIP
    >>> save_group(result, "out/")                                              # doctest: +SKIP

Inputs are checked before anything runs: fewer than two images, several channels, NaN/Inf or
constant images (:class:`~itreg.errors.InvalidImageError`), mixed dimensions and images whose
extents do not overlap in the common space (:class:`~itreg.errors.GeometryError`), ``K < 2``,
a reference index out of range and unknown names (:class:`~itreg.errors.ConfigError`).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from itreg.engine.callbacks import CallbackList, Progress
from itreg.errors import ConfigError, GeometryError, InvalidImageError, unknown_name
from itreg.grid import Grid
from itreg.groupwise.base import GroupObjective, get_group_metric
from itreg.groupwise.bias import BIAS_CORRECTIONS, correct_bias_fields
from itreg.groupwise.coreg import (
    GROUP_TRANSFORMS,
    GroupLevelRecord,
    GroupStage,
    GroupState,
    co_register,
    default_stages,
    overlap_mask,
)
from itreg.groupwise.em import check_classes
from itreg.image import Image
from itreg.runtime import limited_threads
from itreg.transforms import Compose, LinearTransform, Transform

logger = logging.getLogger(__name__)

PathLike = str | os.PathLike

__all__ = ["GroupResult", "register_group", "save_group", "write_group"]


def _as_image(item: Image | PathLike, index: int) -> Image:
    if isinstance(item, Image):
        img = item
    else:
        from itreg import io

        img = io.read_image(item, is_label=False)
    if img.channels != 1:
        raise GeometryError(f"image {index} has {img.channels} channels; groupwise registration "
                            "takes single-channel images")
    img = img.float() if not img.data.is_floating_point() else img
    return img.with_data(img.data.detach())


def _zscore(img: Image, index: int) -> Image:
    data = img.data
    if not bool(torch.isfinite(data).all()):
        bad = int((~torch.isfinite(data)).sum())
        raise InvalidImageError(f"image {index} has {bad} NaN/Inf voxels")
    std = data.std()
    if not float(std) > 0:
        raise InvalidImageError(f"image {index} is constant; nothing to register")
    return img.with_data((data - data.mean()) / std)


#: Intensity normalisations applied to every image before registration.
NORMALISATIONS = {"zscore": _zscore, "none": lambda img, index: img}


def _linear_part(t: Transform) -> LinearTransform:
    if isinstance(t, LinearTransform):
        return t
    linear = [p for p in t.transforms if p.is_linear]
    return linear[0] if len(linear) == 1 else Compose(*linear).linear_part()


class GroupResult:
    """The outcome of a groupwise registration.

    Attributes:
        transforms: ``phi_j`` per image, mapping common-space world points to image ``j``'s
            world points (as a pairwise result's fixed -> moving transform).
        grid: the common grid (image 0's, or the reference's).
        images: the normalised input images.
        records: a :class:`~itreg.groupwise.coreg.GroupLevelRecord` per stage and level.
        wall_time_s: seconds spent registering (not the resampling of the outputs).
        settings: the call's settings (metric config, stages, seed, reference).
        objective: the objective, holding its final state.
    """

    def __init__(self, state: GroupState, images: Sequence[Image], objective: GroupObjective,
                 records: Sequence[GroupLevelRecord], wall_time_s: float,
                 settings: dict[str, Any]) -> None:
        self.transforms = [state.transform(j) for j in range(len(images))]
        self.grid = state.grid
        self.images = list(images)
        self.objective = objective
        self.records = tuple(records)
        self.wall_time_s = float(wall_time_s)
        self.settings = dict(settings)

    @property
    def is_linear(self) -> bool:
        return all(isinstance(t, LinearTransform) for t in self.transforms)

    @functools.cached_property
    def _warped_values(self) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            pts = self.grid.points(dtype=self.images[0].dtype, device=self.images[0].device)
            values, overlap = overlap_mask(self.images, self.transforms,
                                           pts.reshape(-1, self.grid.ndim))
        return values, overlap

    @functools.cached_property
    def warped(self) -> list[Image]:
        """Each normalised image resampled onto the common grid through ``phi_j``."""
        values, _ = self._warped_values
        return [Image(v.reshape(self.grid.shape), self.grid, is_label=False) for v in values]

    @property
    def overlap(self) -> Tensor:
        """``grid.shape`` bool: the common points inside every image (``Omega^phi``)."""
        return self._warped_values[1].reshape(self.grid.shape)

    @functools.cached_property
    def probabilities(self) -> Image | None:
        """``K``-channel class probabilities on the common grid (``Gamma`` for the X-metric,
        the mixture posterior for GMM), or None for objectives without classes."""
        probs = self.objective.probabilities()
        if probs is not None:
            img = Image(probs.detach(), self.objective.grid, is_label=False)
            if not img.grid.same_as(self.grid):
                from itreg.warp import resample

                img = resample(img, None, self.grid, mode="linear")
            return img
        values, overlap = self._warped_values
        post = self.objective.posterior(values, overlap)
        if post is None:
            return None
        return Image(post.T.reshape(-1, *self.grid.shape), self.grid, is_label=False)

    @property
    def segmentation(self) -> Image | None:
        """uint8 argmax of :attr:`probabilities` (classes 1..K; 0 outside the overlap)."""
        probs = self.probabilities
        if probs is None:
            return None
        seg = (probs.data.argmax(dim=0) + 1).to(torch.uint8)
        seg[~self.overlap] = 0
        return Image(seg, self.grid, is_label=True)

    @functools.cached_property
    def template(self) -> Image:
        """The grey-valued template of the warped images (the group mean; CTE's PCA template)."""
        values, overlap = self._warped_values
        with torch.no_grad():
            t = self.objective.template(values, overlap)
        return Image(t.reshape(self.grid.shape), self.grid, is_label=False)

    def history(self) -> list[float]:
        """The metric quantity at every iteration of every level, in order."""
        return [v for r in self.records for v in r.metric_values]

    def report(self, history: bool = True) -> dict:
        """A JSON-serialisable summary: settings, per-level histories, stop reasons, wall time
        and each image's linear part."""
        linear = []
        for t in self.transforms:
            lin = _linear_part(t)
            linear.append({"matrix": lin.matrix().detach().cpu().double().tolist(),
                           "offset": lin.offset().detach().cpu().double().tolist()})
        from itreg.runtime import provenance

        return {
            "itreg_report": 1,
            "kind": "groupwise",
            "provenance": provenance(),
            "wall_time_s": round(self.wall_time_s, 6),
            "settings": self.settings,
            "images": len(self.images),
            "grid": {"size": list(self.grid.size), "spacing": list(self.grid.spacing)},
            "quantity": self.objective.quantity_name,
            "final_metric": self.records[-1].metric_values[-1]
            if self.records and self.records[-1].metric_values else None,
            "stop_reasons": [r.stop_reason for r in self.records],
            "levels": [r.as_dict(history) for r in self.records],
            "linear": linear,
        }

    def __repr__(self) -> str:
        return (f"GroupResult(images={len(self.images)}, metric={self.objective.name!r}, "
                f"levels={len(self.records)}, wall_time_s={self.wall_time_s:.3f})")


def register_group(
    images: Sequence[Image | PathLike],
    metric: str = "xmetric",
    transform: str = "rigid",
    k: int | None = None,
    reference: int | None = None,
    seed: int = 0,
    *,
    stages: Sequence[GroupStage] | None = None,
    iterations: int = 100,
    grid: Grid | None = None,
    roi: Tensor | None = None,
    normalize: str = "zscore",
    bias_correction: str = "none",
    callbacks: Iterable[object] | None = None,
    progress: bool = False,
    threads: int | None = None,
    **metric_options: Any,
) -> GroupResult:
    """Register ``N >= 2`` images jointly (X-CoReg by default).

    Args:
        images: images or image files, one channel each, all 2D or all 3D.
        metric: groupwise objective: ``xmetric``, ``cte``, ``ape``, ``vi``, ``congealing``,
            ``gmm``, ``mvmm`` (see :func:`itreg.groupwise.base.available_group_metrics`).
        transform: ``translation``, ``rigid``, ``affine`` or ``ffd``; selects the stage
            schedule of :func:`~itreg.groupwise.coreg.default_stages` unless `stages` is given.
        k: number of classes of the common anatomy (``xmetric``, ``gmm``; default 4).
        reference: index of an image kept fixed (group-to-reference mode); None for the
            unbiased mode (zero-sum constraint, Eq. 37).
        seed: seed of every random choice.
        stages: explicit stage schedule.
        iterations: Adam steps per level of the default schedule.
        grid: the common grid (default: the reference's grid, else image 0's).
        roi: optional bool region of interest on the common grid ``grid.shape``.
        normalize: ``"zscore"`` (per image, as the paper) or ``"none"``.
        bias_correction: ``"none"`` or ``"n4"`` (N4 on each image before the normalisation;
            :mod:`itreg.groupwise.bias`). Off by default as in the paper; on MR groups with
            intensity nonuniformity it lowered X-CoReg's gWI (see that module).
        callbacks: engine callbacks (:class:`~itreg.engine.callbacks.History`, ...).
        progress: show the engine's progress bar on stderr.
        threads: torch CPU threads for this call (restored afterwards); default unchanged.
        **metric_options: options of the objective (``levels``, ``sample_rate``, ...; for
            ``xmetric``, ``segmentations=[label images]`` gives X-Reg-GT, Eq. 48).

    Returns:
        A :class:`GroupResult`.

    Raises:
        ConfigError: fewer than two images, ``K < 2``, bad reference, unknown names.
        GeometryError: mixed dimensions, several channels, or images that do not overlap.
        InvalidImageError: NaN/Inf or constant images.
    """
    if transform not in GROUP_TRANSFORMS and stages is None:
        raise ConfigError(f"unknown groupwise transform {transform!r}; valid transforms are: "
                          f"{', '.join(sorted(GROUP_TRANSFORMS))}")
    options = dict(metric_options)
    if k is not None:
        options["k"] = check_classes(k)
    imgs = load_group(images, normalize, "groupwise registration")
    ndim = imgs[0].ndim
    if reference is not None:
        if isinstance(reference, bool) or int(reference) != reference or not (
                0 <= int(reference) < len(imgs)):
            raise ConfigError(f"reference must be an image index in 0..{len(imgs) - 1}, "
                              f"got {reference!r}")
        reference = int(reference)
    if bias_correction not in BIAS_CORRECTIONS:
        raise unknown_name("bias correction", bias_correction, BIAS_CORRECTIONS)
    objective = get_group_metric(metric, **options)
    for i, img in enumerate(imgs):  # N4 needs finite, non-constant images: check first
        NORMALISATIONS["zscore"](img, i)
    t_bias = time.perf_counter()
    with limited_threads(threads):
        imgs = correct_bias_fields(imgs, bias_correction)
    bias_time = time.perf_counter() - t_bias
    imgs = [NORMALISATIONS[normalize](img, i) for i, img in enumerate(imgs)]
    objective.prepare(imgs)
    stages = list(stages) if stages is not None else default_stages(transform, iterations)
    common = grid or imgs[reference if reference is not None else 0].grid
    if common.ndim != ndim:
        raise GeometryError(f"the common grid is {common.ndim}D, the images {ndim}D")
    roi_t = None
    if roi is not None:
        roi_t = torch.as_tensor(roi).to(torch.bool)
        if tuple(roi_t.shape) != common.shape:
            raise GeometryError(f"roi has shape {tuple(roi_t.shape)}, the common grid "
                                f"{common.shape}")
    check_overlap(imgs, common)
    cbs = list(callbacks or [])
    if progress:
        cbs.append(Progress())
    callback_list = CallbackList(cbs)
    settings = {"metric": objective.config(), "transform": transform,
                "stages": [s.as_dict() for s in stages], "reference": reference,
                "seed": int(seed), "threads": threads, "normalize": normalize,
                "bias_correction": bias_correction,
                "bias_correction_time_s": round(bias_time, 6), "mode":
                "unbiased" if reference is None else "group-to-reference"}
    t0 = time.perf_counter()
    try:
        with limited_threads(threads):
            state, records = co_register(imgs, objective, stages, grid=common,
                                         reference=reference, roi=roi_t, seed=seed,
                                         callbacks=callback_list)
    finally:
        callback_list.close()
    wall = time.perf_counter() - t0
    return GroupResult(state, imgs, objective, records, wall, settings)


def load_group(images: Sequence[Image | PathLike], normalize: str, what: str) -> list[Image]:
    """The group's images (files read), single-channel float, all 2D or all 3D; the checks
    every groupwise method makes before any work.

    Args:
        images: at least two images or image files.
        normalize: a name of :data:`NORMALISATIONS` (checked here, applied by the caller).
        what: the method, for messages ("groupwise registration", "a DCC group").

    Raises:
        ConfigError: fewer than two images, or an unknown normalisation.
        GeometryError: mixed dimensions or several channels.
    """
    if isinstance(images, (str, os.PathLike, Image)) or len(images) < 2:
        got = 1 if isinstance(images, (str, os.PathLike, Image)) else len(images)
        raise ConfigError(f"{what} needs at least two images, got {got}")
    if normalize not in NORMALISATIONS:
        raise ConfigError(f"unknown normalisation {normalize!r}; valid: "
                          f"{', '.join(NORMALISATIONS)}")
    imgs = [_as_image(item, i) for i, item in enumerate(images)]
    dims = sorted({img.ndim for img in imgs})
    if len(dims) > 1:
        raise GeometryError(f"images have mixed dimensions {dims}; give all 2D or all 3D images")
    return imgs


def check_overlap(images: Sequence[Image], grid: Grid) -> None:
    """Raise GeometryError when the images' extents share no point of the common grid."""
    pts = grid.points(dtype=images[0].dtype, device=images[0].device).reshape(-1, grid.ndim)
    _, overlap = overlap_mask(images, [None] * len(images), pts)
    if int(overlap.sum()) == 0:
        raise GeometryError("the images do not overlap: no point of the common grid lies inside "
                            "all of them (check origins, spacings and directions)")


def write_group(result: GroupResult, folder: PathLike, inputs: Sequence[Any] | None = None,
                outputs=None) -> list[str]:
    """Write a groupwise result into an existing `folder` (not atomic; see :func:`save_group`).

    Layout, for each image ``j`` (0-based, in input order) by output name (`outputs`, as
    ``register --outputs``: :func:`itreg.results.select_outputs`; by default warped and
    transform, plus the field of a deformable ``phi_j`` that is not a B-spline, no inverse):
    ``j/warped.nii.gz`` (warped), ``j/transform.tfm`` (the linear part, common -> image ``j``,
    ITK convention; transform), ``j/displacement.nii.gz`` (deformable runs: the whole ``phi_j``
    as a world-mm displacement field on the common grid; displacement); always
    ``segmentation.nii.gz``, ``probabilities.nii.gz`` (for objectives with classes),
    ``template.nii.gz`` and ``report.json``. ``j/transform.h5`` and the inverses:
    :func:`save_group`. Returns the relative paths written.
    """
    from itreg import io
    from itreg.results import select_outputs

    folder = Path(folder)
    files: list[str] = []
    for j, t in enumerate(result.transforms):
        selected = select_outputs(outputs, t)
        sub = folder / str(j)
        sub.mkdir(parents=True, exist_ok=True)
        if "warped" in selected:
            io.write_image(result.warped[j], sub / "warped.nii.gz")
            files.append(f"{j}/warped.nii.gz")
        if "transform" in selected:
            io.write_transform(_linear_part(t), sub / "transform.tfm")
            files.append(f"{j}/transform.tfm")
        if "displacement" in selected and not isinstance(t, LinearTransform):
            io.write_displacement_field(t, result.grid, sub / "displacement.nii.gz")
            files.append(f"{j}/displacement.nii.gz")
    probs = result.probabilities
    if probs is not None:
        io.write_image(result.segmentation, folder / "segmentation.nii.gz")
        io.write_image(probs.float(), folder / "probabilities.nii.gz")
        files += ["segmentation.nii.gz", "probabilities.nii.gz"]
    io.write_image(result.template, folder / "template.nii.gz")
    files.append("template.nii.gz")
    report = result.report()
    report["outputs"] = files + ["report.json"]
    report["output_settings"] = {"outputs": "default" if outputs is None else outputs}
    if inputs:
        report["inputs"] = [str(p) for p in inputs]
    (folder / "report.json").write_text(json.dumps(report, indent=2, default=str))
    return report["outputs"]


def save_group(result: GroupResult, outdir: PathLike, force: bool = False,
               inputs: Sequence[Any] | None = None, protect=None,
               write_extra: Callable[[Path], list[str]] | None = None,
               outputs=None) -> Path:
    """Write a groupwise result to `outdir` atomically (see :func:`write_group` for `outputs`),
    with ``j/transform.h5`` (transform) and the inverses (``j/inverse.tfm`` of a linear
    ``phi_j`` with transform; ``j/inverse_displacement.nii.gz`` of a deformable one with
    inverse: :func:`_write_group_pipeline_files`).

    `write_extra(folder)` writes further files into the temporary folder and returns their
    relative paths, which join the report's ``outputs`` (the DCC network's segmentations).

    Raises:
        OutputExistsError: `outdir` exists, is not empty and `force` is False, is a file, or
            would overwrite an input (nothing is touched). With `force` only itreg's own
            earlier outputs there are replaced; `protect` lists paths never written (default:
            the `inputs` that are paths).
    """
    from itreg import io

    if protect is None:
        protect = [p for p in (inputs or ()) if isinstance(p, (str, Path))]
    with io.atomic_output_dir(outdir, force=force, protect=protect) as tmp:
        files = write_group(result, tmp, inputs, outputs=outputs)
        _write_group_pipeline_files(result, Path(tmp), outputs)
        if write_extra is not None:
            extra = write_extra(Path(tmp))
            report_path = Path(tmp) / "report.json"
            report = json.loads(report_path.read_text())
            report["outputs"] = [f for f in report.get("outputs", files) if f != "report.json"] \
                + extra + ["report.json"]
            report_path.write_text(json.dumps(report, indent=2, default=str))
    return Path(outdir)


def _write_group_pipeline_files(result: GroupResult, folder: Path, outputs=None) -> None:
    """Per image ``j``, as `outputs` select: ``j/transform.h5`` (transform: the whole
    ``phi_j``, common -> image ``j``, one exact ITK file) and its inverse (``j/inverse.tfm``
    of a linear ``phi_j``, free, with transform; ``j/inverse_displacement.nii.gz`` on image
    ``j``'s grid with the inverse-consistency residual in ``report.json``, with inverse)."""
    from itreg.pipeline import write_transform_outputs
    from itreg.results import select_outputs

    report_path = folder / "report.json"
    report = json.loads(report_path.read_text())
    files = [f for f in report.get("outputs", []) if f != "report.json"]
    consistency = {}
    for j, (t, image) in enumerate(zip(result.transforms, result.images)):
        selected = select_outputs(outputs, t)
        h5 = "transform" in selected
        inverse = "inverse" in selected or (h5 and t.is_linear)
        if not (h5 or inverse):
            continue
        written, record = write_transform_outputs(t, result.grid, image.grid, folder / str(j),
                                                  inverse=inverse, h5=h5)
        files += [f"{j}/{name}" for name in written]
        if record is not None:
            consistency[str(j)] = record
    report["outputs"] = files + ["report.json"]
    if consistency:
        report["inverse_consistency"] = consistency
    report_path.write_text(json.dumps(report, indent=2, default=str))

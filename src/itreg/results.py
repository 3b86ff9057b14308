"""Writing registration results (``register --outputs``) and applying transform files.

Imports nothing heavy at module level (``register`` checks ``--outputs`` before torch loads).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from itreg import io
from itreg.errors import ItregError

logger = logging.getLogger(__name__)

#: Extensions read as displacement-field images rather than ITK transform files.
IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha", ".mhd")


def is_image_path(path: str | Path) -> bool:
    return str(path).lower().endswith(IMAGE_SUFFIXES)


#: Output names of ``register --outputs`` and :func:`write_registration` (``field`` is read as
#: ``displacement``).
OUTPUTS = ("warped", "transform", "displacement", "inverse")
#: What ``register`` writes by default: the warped image and the transform files (what
#: SimpleITK's, elastix's and ANTs' users get; linear runs also get their exact inverse, which
#: is free), plus ``displacement.nii.gz`` where a dense field is the transform itself (as ANTs
#: writes its warp): not for a B-spline run, whose ``transform.h5`` holds the exact ITK
#: ``BSplineTransform`` (elastix writes no field by default either; at 0.75 mm writing it took most
#: of the 4.4 s of writing, against 6.75 s of registration:
#: benchmarks/results/2026-12-08-end-to-end.md). The
#: inverse field of a deformable run is asked for with ``inverse`` or ``all``: its fixed-point
#: inversion at full resolution takes many times the registration itself (about 12x for a 1 mm
#: B-spline run).
DEFAULT_OUTPUTS = ("warped", "transform", "displacement")


def _bspline_run(transform) -> bool:
    """Whether every non-linear part of `transform` is a B-spline (its ITK file is exact)."""
    from itreg.transforms import Compose
    from itreg.transforms.bspline import BSpline

    parts = list(transform.transforms) if isinstance(transform, Compose) else [transform]
    deformable = [t for t in parts if not t.is_linear]
    return bool(deformable) and all(isinstance(t, BSpline) for t in deformable)


def select_outputs(outputs=None, transform=None) -> tuple[str, ...]:
    """Normalise an output selection: None (the default set, :data:`DEFAULT_OUTPUTS`, without
    ``displacement`` when `transform` is a B-spline run), ``"all"``, a comma-separated string
    or names from :data:`OUTPUTS` (``field`` for ``displacement``), in :data:`OUTPUTS` order.

    Raises:
        ConfigError: an unknown name, or an empty selection.
    """
    from itreg.errors import ConfigError

    if outputs is None:
        if transform is not None and _bspline_run(transform):
            return tuple(n for n in DEFAULT_OUTPUTS if n != "displacement")
        return DEFAULT_OUTPUTS
    names = outputs.split(",") if isinstance(outputs, str) else list(outputs)
    names = [str(n).strip().lower() for n in names if str(n).strip()]
    names = ["displacement" if n == "field" else n for n in names]
    if "all" in names:
        return OUTPUTS
    bad = [n for n in names if n not in OUTPUTS]
    if bad or not names:
        raise ConfigError(f"outputs {outputs!r}: choose from {', '.join(OUTPUTS)} (or field) "
                          "or all (comma-separated); report.json is always written")
    return tuple(n for n in OUTPUTS if n in names)


class _Writes:
    """File writes run in a small thread pool (SimpleITK and zlib release the GIL), so they
    overlap the resampling and inversion still to do; :meth:`wait` raises the first error."""

    def __init__(self, workers: int) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="itreg-write")
        self.futures: list = []

    def submit(self, fn, *args, **kwargs) -> None:
        self.futures.append(self.pool.submit(fn, *args, **kwargs))

    def wait(self) -> None:
        try:
            for f in self.futures:
                f.result()
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)


def write_registration(result, folder: str | Path, inputs: dict | None = None, *,
                       outputs=None, compress: bool | str = True,
                       timings: dict | None = None, threads: int = 2) -> list[str]:
    """Write a registration result's files into an existing `folder` (not atomic).

    Files, by output name (`outputs`; default :data:`DEFAULT_OUTPUTS`: all but ``inverse``, and
    but ``displacement`` for B-spline runs):

    * ``warped``: ``warped.nii.gz``, the moving image resampled onto the fixed grid;
    * ``transform``: ``transform.tfm``, the linear part, fixed -> moving, ITK convention (the
      identity if there is none), and ``transform.h5``, the whole fixed -> moving map as one
      exact ITK file (an affine, or a ``CompositeTransform`` of the affine and the B-spline or
      displacement field, the latter applied first) that ``SimpleITK.ReadTransform`` and
      ``antsApplyTransforms`` read; for linear runs also ``inverse.tfm``, the exact inverse
      (moving -> fixed);
    * ``displacement`` (deformable runs): ``displacement.nii.gz``, the whole transform as a
      world-mm displacement field on the fixed grid;
    * ``inverse``: linear runs ``inverse.tfm`` (as with ``transform``); deformable runs
      ``inverse_displacement.nii.gz`` (the moving -> fixed map as a
      displacement field on the moving grid: exact linear part, fixed-point inversion of the
      deformation, started from the negated velocity for SVF runs), with the
      inverse-consistency residual ``|inverse(T(x)) - x|`` over the fixed mask (else over the
      fixed points that map inside the moving image) in ``report.json`` under
      ``inverse_consistency``;
    * ``report.json``, always, with the outputs written and ``timings_s`` (seconds per stage:
      those in `timings`, plus ``resample``, ``transforms`` and ``write`` done here).

    Only the work the selected outputs need is done (no full-resolution resampling without
    ``warped``, no field without ``displacement``, no inversion without ``inverse``). Images
    are written in `threads` background threads while the rest is computed.

    Args:
        outputs: the selection (see :func:`select_outputs`).
        compress: ``.nii.gz`` compression (``"fast"``/True, ``"best"``, ``"none"``/False: see
            :func:`itreg.io.write_image`); ``"none"`` writes ``.nii`` files
            (``warped.nii``, ...).
        timings: stage times measured before (``read``, ``prepare``, ``register``), copied
            into the report's ``timings_s``.
        threads: background writer threads (0: write in this thread).

    Returns:
        The file names.
    """
    import time

    from itreg.io.images import compression_mode
    from itreg.pipeline import write_transform_outputs
    from itreg.transforms import Affine

    selected = select_outputs(outputs, result.transform)
    mode = compression_mode(compress)
    suffix = ".nii" if mode == "none" else ".nii.gz"
    folder = Path(folder)
    grid = result.fixed.grid
    transform = result.transform
    stages = {k: float(v) for k, v in (timings or {}).items()}
    writes = _Writes(threads) if threads > 0 else None
    submit = writes.submit if writes else (lambda fn, *a, **k: fn(*a, **k))
    files: list[str] = []
    report = dict(result.report())
    consistency = None
    try:
        t0 = time.perf_counter()
        field = None
        if "warped" in selected:  # and the field from the same evaluation of T
            field = _warp_fast(result, "displacement" in selected and not transform.is_linear)
        if "warped" in selected:
            warped = result.warped
            submit(io.write_image, warped, folder / f"warped{suffix}", compress=mode)
            files.append(f"warped{suffix}")
        t1 = time.perf_counter()
        if "transform" in selected:
            linear = result.linear
            if linear is None:
                linear = Affine(grid.ndim, center=grid.center)
            io.write_transform(linear, folder / "transform.tfm")
            files.append("transform.tfm")
        if "displacement" in selected and not transform.is_linear:
            submit(io.write_displacement_field, field or transform, grid,
                   folder / f"displacement{suffix}", compress=mode)
            files.append(f"displacement{suffix}")
        inverse = "inverse" in selected or (transform.is_linear and "transform" in selected)
        if "transform" in selected or inverse:
            region = _fixed_mask(inputs, grid) if inverse and not transform.is_linear else None
            written, consistency = write_transform_outputs(
                transform, grid, result.moving.grid, folder, region, inverse=inverse,
                h5="transform" in selected, compress=mode, submit=submit,
                image_suffix=suffix)
            files += written
        t2 = time.perf_counter()
    finally:
        if writes:
            writes.wait()
    t3 = time.perf_counter()
    stages.update(resample=t1 - t0, transforms=t2 - t1, write=t3 - t2)
    if consistency is not None:
        report["inverse_consistency"] = consistency
    report["outputs"] = files + ["report.json"]
    report["timings_s"] = {k: round(v, 4) for k, v in stages.items()}
    report["output_settings"] = {"outputs": list(selected), "compress": mode}
    if inputs:
        report["inputs"] = {k: str(v) for k, v in inputs.items() if v is not None}
    (folder / "report.json").write_text(json.dumps(report, indent=2, default=str))
    return report["outputs"]


def _warp_fast(result, field: bool):
    """Fill ``result.warped`` through :func:`itreg.warp.warp_on_grid` (linear runs, and
    B-spline runs on a control grid of the fixed grid's direction: one ``affine_grid`` and
    three per-axis matrix products instead of full-resolution point arrays) and, with `field`,
    return ``T(x) - x`` on the fixed grid as a
    :class:`~itreg.transforms.dense.DisplacementField` (None otherwise). Nothing is done
    (None) where that path does not apply or ``warped`` is already computed; the callers then
    take the general path (:func:`itreg.warp.resample`, :func:`itreg.io.write_displacement_field`).
    """
    import torch

    from itreg.transforms.dense import DisplacementField
    from itreg.warp import warp_on_grid

    moving, transform, grid = result.moving, result.transform, result.fixed.grid
    if "warped" in getattr(result, "__dict__", {}) or moving.data.dtype != torch.float32:
        return None
    out = warp_on_grid(moving, transform, grid, field=field)
    if out is None:
        return None
    result.__dict__["warped"], disp = out
    if disp is None:
        return None
    return DisplacementField(torch.movedim(disp, -1, 0), grid, learnable=False)


def _fixed_mask(inputs, grid):
    """The fixed mask named in `inputs` as a bool tensor on `grid`, or None."""
    mask_path = (inputs or {}).get("fixed_mask")
    if not mask_path:
        return None
    try:
        return io.read_mask(mask_path, grid).data[0].bool()
    except ItregError as exc:  # the report falls back to the overlap
        logger.warning("inverse consistency over the overlap: %s", exc)
        return None


def save_registration(result, outdir: str | Path, *, force: bool = False,
                      inputs: dict | None = None, protect=None, outputs=None,
                      compress: bool | str = True, timings: dict | None = None) -> Path:
    """Write a registration result to `outdir` atomically (see :func:`write_registration`
    for `outputs`, `compress` and `timings`).

    With `force` an existing folder keeps every file that itreg did not write there
    (:func:`itreg.io.atomic_output_dir`). `protect` lists paths that may not be overwritten
    (the inputs); by default the path values of `inputs`.

    Raises:
        OutputExistsError: `outdir` exists and is not empty and `force` is False, is a file, or
            would overwrite an input (nothing is touched).
    """
    if protect is None:
        protect = [v for v in (inputs or {}).values() if isinstance(v, (str, Path)) and v]
    with io.atomic_output_dir(outdir, force=force, protect=protect) as tmp:
        write_registration(result, tmp, inputs, outputs=outputs, compress=compress,
                           timings=timings)
    return Path(outdir)


def apply_transform_file(image_path: str | Path, reference_path: str | Path,
                         transform_path: str | Path, out_path: str | Path, *,
                         labels: bool = False, force: bool = False) -> Path:
    """Resample `image_path` onto the grid of `reference_path` through one transform file.

    The transform maps reference-space points to image-space points (ITK convention). It is an
    ITK transform file (``.tfm``, ``.txt``, ``.h5``, ``.mat``) or a displacement-field image.
    With `labels` the image is a label map, resampled label-preservingly with its integer type
    kept; otherwise it is an intensity image resampled linearly. Chains, inverses and other
    interpolations: :func:`itreg.pipeline.apply_to_image`.
    """
    from itreg.pipeline import apply_to_image

    return apply_to_image(image_path, reference_path, [transform_path], out_path,
                          interpolation="label" if labels else "linear", force=force)

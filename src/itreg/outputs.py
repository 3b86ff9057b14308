"""Writing registration results and applying transform files (the API behind the CLI).

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


#: Output names of ``register --outputs`` and :func:`write_registration`.
OUTPUTS = ("warped", "transform", "displacement", "inverse")
#: What ``register`` writes by default: the warped image and the transform files (what
#: SimpleITK's and ANTs' users get; linear runs also get their exact inverse, which is free).
#: The inverse field of a deformable run is asked for with ``inverse`` or ``all``: its
#: fixed-point inversion at full resolution takes many times the registration itself (about
#: 12x for a 1 mm B-spline run, benchmarks/results/2026-12-08-end-to-end.md).
DEFAULT_OUTPUTS = ("warped", "transform", "displacement")


def select_outputs(outputs=None) -> tuple[str, ...]:
    """Normalise an output selection: None (the default set), ``"all"``, a comma-separated
    string or names from :data:`OUTPUTS`, in :data:`OUTPUTS` order.

    Raises:
        ConfigError: an unknown name, or an empty selection.
    """
    from itreg.errors import ConfigError

    if outputs is None:
        return DEFAULT_OUTPUTS
    names = outputs.split(",") if isinstance(outputs, str) else list(outputs)
    names = [str(n).strip().lower() for n in names if str(n).strip()]
    if "all" in names:
        return OUTPUTS
    bad = [n for n in names if n not in OUTPUTS]
    if bad or not names:
        raise ConfigError(f"outputs {outputs!r}: choose from {', '.join(OUTPUTS)} or all "
                          "(comma-separated); report.json is always written")
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

    Files, by output name (`outputs`; default :data:`DEFAULT_OUTPUTS`: all but ``inverse``):

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

    selected = select_outputs(outputs)
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
        if "warped" in selected and "displacement" in selected and not transform.is_linear:
            field = _warp_and_field(result)  # one full-resolution evaluation of T for both
        elif "warped" in selected and transform.is_linear:
            _warp_linear(result)
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


def _warp_linear(result) -> None:
    """Fill ``result.warped`` of a linear run the fast way: one matrix from the fixed grid's
    ``grid_sample`` coordinates to the moving grid's (both from :class:`~itreg.grid.Grid`'s
    matrices, composed in float64), ``affine_grid`` and one ``grid_sample``; the same linear
    interpolation, border handling and inside test (voxel extent, ``-0.5 <= index < n - 0.5``)
    as :func:`itreg.warp.resample`, without the three full-resolution point arrays it makes.
    Nothing is done for label or non-float32 images, or axes of one voxel."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from itreg.image import Image
    from itreg.transforms import Compose

    moving, transform, grid = result.moving, result.transform, result.fixed.grid
    if ("warped" in getattr(result, "__dict__", {}) or moving.is_label
            or moving.data.dtype != torch.float32 or min(grid.size) < 2
            or min(moving.grid.size) < 2):
        return
    lin = transform.linear_part() if isinstance(transform, Compose) else transform
    a = lin.homogeneous().detach().to("cpu", torch.float64).numpy()
    theta = (moving.grid.world_to_normalized_matrix() @ a
             @ np.linalg.inv(grid.world_to_normalized_matrix()))
    d = grid.ndim
    data = moving.data
    with torch.no_grad():
        coords = F.affine_grid(
            torch.as_tensor(theta[:d], dtype=torch.float32, device=data.device)[None],
            [1, data.shape[0], *grid.shape], align_corners=True)
        values = F.grid_sample(data[None], coords, mode="bilinear", padding_mode="border",
                               align_corners=True)[0]
        # index = (u + 1) (n - 1) / 2 lies in [-0.5, n - 0.5)  <=>  |u| within 1 + 1 / (n - 1).
        half = torch.tensor([1.0 / (n - 1) for n in moving.grid.size], dtype=coords.dtype,
                            device=coords.device)
        inside = ((coords >= -1 - half) & (coords < 1 + half)).all(dim=-1)[0]
        values = torch.where(inside[None], values, values.new_zeros(()))
    result.__dict__["warped"] = Image(values, grid, is_label=False)


def _warp_and_field(result):
    """Fill ``result.warped`` and return ``T(x) - x`` on the fixed grid as a
    :class:`~itreg.transforms.dense.DisplacementField`, from one evaluation of ``T`` on the grid
    (what ``result.warped`` and :func:`itreg.io.write_displacement_field` would each compute
    on their own, the same float32 points). None (nothing done) where the two would not use
    the same points: a non-float32 moving image or transform, or ``warped`` already computed.
    """
    import torch

    from itreg.image import Image
    from itreg.transforms.dense import DisplacementField
    from itreg.warp import sample

    moving, transform, grid = result.moving, result.transform, result.fixed.grid
    params = [p for p in transform.parameters()] + [b for b in transform.buffers()]
    if ("warped" in getattr(result, "__dict__", {}) or moving.data.dtype != torch.float32
            or any(t.is_floating_point() and t.dtype != torch.float32 for t in params)
            or moving.is_label):
        return None
    with torch.no_grad():
        points = transform.on_grid(grid, dtype=torch.float32, device=moving.device)
        values, _ = sample(moving, points, mode="auto")
        result.__dict__["warped"] = Image(values, grid, is_label=False)
        points -= grid.points(dtype=torch.float32, device=points.device)
    return DisplacementField(torch.movedim(points, -1, 0), grid, learnable=False)


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

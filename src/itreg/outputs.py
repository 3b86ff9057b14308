"""Writing registration results and applying transform files (the API behind the CLI)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from itreg import io
from itreg.errors import ItregError
from itreg.transforms import Affine

logger = logging.getLogger(__name__)

#: Extensions read as displacement-field images rather than ITK transform files.
IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha", ".mhd")


def is_image_path(path: str | Path) -> bool:
    return str(path).lower().endswith(IMAGE_SUFFIXES)


def write_registration(result, folder: str | Path, inputs: dict | None = None) -> list[str]:
    """Write a registration result's files into an existing `folder` (not atomic).

    Files:

    * ``warped.nii.gz``: the moving image resampled onto the fixed grid;
    * ``transform.tfm``: the linear part, fixed -> moving, ITK convention (the identity if
      there is none);
    * ``transform.h5``: the whole fixed -> moving map as one exact ITK file (an affine, or a
      ``CompositeTransform`` of the affine and the B-spline or displacement field, the latter
      applied first) that ``SimpleITK.ReadTransform`` and ``antsApplyTransforms`` read;
    * linear runs: ``inverse.tfm``, the exact inverse (moving -> fixed);
    * deformable runs: ``displacement.nii.gz`` (the whole transform as a world-mm displacement
      field on the fixed grid) and ``inverse_displacement.nii.gz`` (the moving -> fixed map as
      a displacement field on the moving grid: exact linear part, fixed-point inversion of the
      deformation, started from the negated velocity for SVF runs), with the inverse-consistency
      residual ``|inverse(T(x)) - x|`` over the fixed mask (else over the fixed points that map
      inside the moving image) in ``report.json`` under ``inverse_consistency``;
    * ``report.json``.

    Returns the file names.
    """
    from itreg.pipeline import write_transform_outputs

    folder = Path(folder)
    grid = result.warped.grid
    io.write_image(result.warped, folder / "warped.nii.gz")
    linear = result.linear
    if linear is None:
        linear = Affine(grid.ndim, center=grid.center)
    io.write_transform(linear, folder / "transform.tfm")
    transform = result.transform
    files = ["warped.nii.gz", "transform.tfm"]
    report = dict(result.report())
    if not transform.is_linear:
        io.write_displacement_field(transform, grid, folder / "displacement.nii.gz")
        files.append("displacement.nii.gz")
    region = _fixed_mask(inputs, grid)
    written, consistency = write_transform_outputs(transform, grid, result.moving.grid, folder,
                                                   region)
    files += written
    if consistency is not None:
        report["inverse_consistency"] = consistency
    report["outputs"] = files + ["report.json"]
    if inputs:
        report["inputs"] = {k: str(v) for k, v in inputs.items() if v is not None}
    (folder / "report.json").write_text(json.dumps(report, indent=2, default=str))
    return report["outputs"]


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
                      inputs: dict | None = None, protect=None) -> Path:
    """Write a registration result to `outdir` atomically (see :func:`write_registration`).

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
        write_registration(result, tmp, inputs)
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

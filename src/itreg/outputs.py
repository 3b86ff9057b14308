"""Writing registration results and applying transform files (the API behind the CLI)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from itreg import io
from itreg.transforms import Affine, LinearTransform
from itreg.warp import resample

#: Extensions read as displacement-field images rather than ITK transform files.
IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha", ".mhd")


def is_image_path(path: str | Path) -> bool:
    return str(path).lower().endswith(IMAGE_SUFFIXES)


def write_registration(result, folder: str | Path, inputs: dict | None = None) -> list[str]:
    """Write a registration result's files into an existing `folder` (not atomic).

    Files: ``warped.nii.gz`` (moving resampled onto the fixed grid), ``transform.tfm`` (the
    linear part, fixed -> moving, ITK convention; the identity if there is none),
    ``displacement.nii.gz`` for deformable runs (the whole transform, linear part included, as a
    world-mm displacement field on the fixed grid), and ``report.json``. Returns the file names.
    """
    folder = Path(folder)
    grid = result.warped.grid
    io.write_image(result.warped, folder / "warped.nii.gz")
    linear = result.linear
    if linear is None:
        linear = Affine(grid.ndim, center=grid.center)
    io.write_transform(linear, folder / "transform.tfm")
    files = ["warped.nii.gz", "transform.tfm"]
    if not isinstance(result.transform, LinearTransform):
        io.write_displacement_field(result.transform, grid, folder / "displacement.nii.gz")
        files.append("displacement.nii.gz")
    report = dict(result.report())
    report["outputs"] = files + ["report.json"]
    if inputs:
        report["inputs"] = {k: str(v) for k, v in inputs.items() if v is not None}
    (folder / "report.json").write_text(json.dumps(report, indent=2, default=str))
    return report["outputs"]


def save_registration(result, outdir: str | Path, *, force: bool = False,
                      inputs: dict | None = None) -> Path:
    """Write a registration result to `outdir` atomically (see :func:`write_registration`).

    Raises:
        OutputExistsError: `outdir` exists and `force` is False (nothing is touched).
    """
    with io.atomic_output_dir(outdir, force=force) as tmp:
        write_registration(result, tmp, inputs)
    return Path(outdir)


def apply_transform_file(image_path: str | Path, reference_path: str | Path,
                         transform_path: str | Path, out_path: str | Path, *,
                         labels: bool = False, force: bool = False) -> Path:
    """Resample `image_path` onto the grid of `reference_path` through a transform file.

    The transform maps reference-space points to image-space points (ITK convention). It is an
    ITK transform file (``.tfm``, ``.txt``, ``.h5``) or a displacement-field image.
    With `labels` the image is a label map, resampled label-preservingly with its integer type
    kept; otherwise it is an intensity image (integer files included) resampled linearly.
    """
    # Integer images are intensities (CT, MR) unless --labels says they are label maps.
    image = io.read_image(image_path, is_label=labels)
    reference_grid = io.read_header(reference_path).grid
    if is_image_path(transform_path):
        transform = io.read_displacement_field(transform_path)
    else:
        transform = io.read_transform(transform_path)
    mode = "label" if labels else "linear"
    if labels and image.data.is_floating_point():
        image = image.with_data(image.data.round().to(torch.int64), is_label=True)
    out = resample(image, transform, reference_grid, mode=mode)
    with io.atomic_output_file(out_path, force=force) as tmp:
        io.write_image(out, tmp)
    return Path(out_path)

"""Transform commands in ANTs' habits: ``apply`` (images) and ``apply-points`` (point lists)."""

from __future__ import annotations

import click

from itreg.cli.app import PATH as _PATH
from itreg.cli.app import app, standard_options

_T_HELP = ("Transform (repeatable, in antsApplyTransforms' order: -t out1Warp.nii.gz -t "
           "out0GenericAffine.mat sends each reference point through the warp, then the "
           "affine): an ITK .tfm/.txt/.h5/.mat file or a displacement-field image; [FILE,1] uses "
           "its inverse.")


@app.command()
@click.argument("image", type=_PATH)
@click.option("-r", "--reference", type=_PATH, required=True,
              help="Image whose grid the output takes (the fixed image).")
@click.option("-t", "--transform", "transforms", multiple=True, required=True, metavar="FILE",
              help=_T_HELP)
@click.option("-n", "--interpolation",
              type=click.Choice(["linear", "nearest", "bspline", "label", "label-linear"]),
              default=None,
              help="linear (default), nearest, bspline (cubic), label (label maps: each label "
                   "interpolated by cubic B-splines, the largest wins; thin structures survive) "
                   "or label-linear (the same with linear weights: ANTs' GenericLabel).")
@click.option("--labels", is_flag=True, help="Same as --interpolation label.")
@click.option("--default-value", type=float, default=0.0, show_default=True,
              help="Value where the transformed point falls outside the image.")
@standard_options(output="file", seed=False, sets=False, output_help="Output image file.")
def apply(image, reference, transforms, interpolation, labels, default_value, output, force,
          quiet, threads, device) -> None:
    """Resample IMAGE onto the grid of REFERENCE through a chain of transforms.

    Each reference point x takes IMAGE's value at Tn(...T2(T1(x))) for -t T1 ... -t Tn, as
    antsApplyTransforms does; with register's outputs, -t OUT/transform.h5 warps the moving
    image (or its labels) onto the fixed grid. A 4D IMAGE is resampled volume by volume.
    """
    from itreg.errors import ConfigError
    from itreg.pipeline import apply_to_image
    from itreg.runtime import limited_threads, resolve_device

    if labels and interpolation not in (None, "label"):
        raise ConfigError(f"--labels means --interpolation label; it contradicts "
                          f"--interpolation {interpolation}")
    mode = "label" if labels else (interpolation or "linear")
    dev = resolve_device(device)
    with limited_threads(threads):
        apply_to_image(image, reference, transforms, output, interpolation=mode,
                       default_value=default_value, force=force, device=dev)
    if not quiet:
        click.echo(f"wrote {output}")


@app.command("apply-points")
@click.argument("points", type=_PATH)
@click.option("-t", "--transform", "transforms", multiple=True, required=True, metavar="FILE",
              help=_T_HELP)
@click.option("--coordinates", type=click.Choice(["lps", "ras"]), default="lps",
              show_default=True,
              help="System of a CSV's coordinates (ITK/ANTs: lps; Slicer tables: ras). .fcsv "
                   "and .mrk.json files name their own.")
@standard_options(output="file", seed=False, sets=False, compute=False,
                  output_help="Output point file (same format as POINTS).")
def apply_points(points, transforms, coordinates, output, force, quiet) -> None:
    """Map the points of POINTS (.csv, .fcsv, .mrk.json) through a chain of transforms.

    Each point p becomes Tn(...T2(T1(p))) for -t T1 ... -t Tn (antsApplyTransformsToPoints).
    Points move the opposite way to images: register's transform.h5 (fixed -> moving) carries
    fixed-space points into moving space; moving-space points reach fixed space through
    -t [OUT/transform.tfm,1] (linear runs) or -t OUT/inverse_displacement.nii.gz.
    """
    from itreg.pipeline import apply_to_points

    apply_to_points(points, transforms, output, coordinates=coordinates, force=force)
    if not quiet:
        click.echo(f"wrote {output}")

"""Pairwise commands: ``register``, ``apply`` and ``demo``."""

from __future__ import annotations

from pathlib import Path

import click

from itreg.cli.app import PATH as _PATH
from itreg.cli.app import app, parse_sets, refuse_existing
from itreg.errors import ConfigError


@app.command()
@click.argument("fixed", type=_PATH)
@click.argument("moving", type=_PATH)
@click.option("-o", "--output", type=_PATH, required=True, help="Output folder.")
@click.option("-t", "--transform", default=None,
              help="Preset or transform: rigid, affine, bspline, dense, svf, translation, "
                   "similarity.")
@click.option("-m", "--metric", default=None,
              help="Similarity metric: mi, nmi, mi-gaussian, joint-entropy, ncc, lncc, mse.")
@click.option("--fixed-mask", type=_PATH, default=None, help="Mask on the fixed grid.")
@click.option("--moving-mask", type=_PATH, default=None, help="Mask on the moving grid.")
@click.option("--init", default="centers", show_default=True,
              help="Initialisation: centers, moments, none, or a transform file.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of random choices.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads (default: torch's default).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Override a setting, e.g. --set metric.bins=64 (repeatable).")
@click.option("--net", "net", type=_PATH, default=None,
              help="Register with a trained registration network (model file from "
                   "'itreg train-net') instead of iterating.")
@click.option("--refine", is_flag=True,
              help="With --net: continue from the network's prediction with the iterative "
                   "engine and the network's training metric (or --metric).")
@click.option("--refine-init", type=click.Choice(["fit", "compose"]), default=None,
              help="With --refine: start a B-spline refinement from the least-squares FFD of "
                   "a deformable prediction (fit, the default) or keep the prediction as a "
                   "fixed outer transform (compose).")
@click.option("--force", is_flag=True, help="Overwrite an existing output folder.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def register(fixed, moving, output, transform, metric, fixed_mask, moving_mask, init, seed,
             threads, sets, net, refine, refine_init, force, quiet) -> None:
    """Register MOVING to FIXED.

    Writes OUTPUT/warped.nii.gz, OUTPUT/transform.tfm (linear part, fixed -> moving),
    OUTPUT/report.json and, for deformable runs, OUTPUT/displacement.nii.gz.

    With --net MODEL.pt a trained network predicts the transform in one pass (the same
    outputs); --refine then continues iteratively from its prediction (--transform, --metric
    and --set change that refinement).
    """
    from itreg import io
    from itreg.api import register as run_registration
    from itreg.outputs import is_image_path, save_registration

    refuse_existing(output, "output folder", force)
    # Registration inputs are intensities even when stored as integers (CT, MR int16).
    fixed_img = io.read_image(fixed, is_label=False)
    moving_img = io.read_image(moving, is_label=False)
    fmask = io.read_mask(fixed_mask, fixed_img.grid) if fixed_mask else None
    mmask = io.read_mask(moving_mask, moving_img.grid) if moving_mask else None
    if refine_init is not None and not refine:
        raise ConfigError("--refine-init applies with --net MODEL.pt --refine")
    if refine and net is None:
        raise ConfigError("--refine continues from a network's prediction; give --net MODEL.pt")
    if net is not None:
        if init != "centers":
            raise ConfigError("--init does not apply with --net (the network predicts the "
                              "starting transform)")
        _register_with_net(fixed, moving, output, fixed_img, moving_img, fmask, mmask, net,
                           refine, refine_init or "fit", transform, metric, seed, threads,
                           sets, force, quiet)
        return
    init_arg: object = init
    if init not in ("centers", "moments", "none"):
        path = Path(init)
        init_arg = (io.read_displacement_field(path) if is_image_path(path)
                    else io.read_transform(path))
    result = run_registration(
        fixed_img, moving_img, transform=transform, metric=metric, fixed_mask=fmask,
        moving_mask=mmask, init=init_arg, seed=seed, threads=threads,
        progress=not quiet, overrides=parse_sets(sets) or None,
    )
    save_registration(result, output, force=force, inputs={
        "fixed": fixed, "moving": moving, "fixed_mask": fixed_mask, "moving_mask": moving_mask,
        "init": init})
    reasons = ", ".join(sorted(set(result.stop_reasons)))
    click.echo(f"registered in {result.wall_time_s:.2f} s (stop: {reasons}); outputs in {output}")


def _register_with_net(fixed, moving, output, fixed_img, moving_img, fmask, mmask, net, refine,
                       refine_init, transform, metric, seed, threads, sets, force,
                       quiet) -> None:
    from itreg.nets.inference import register_with_net
    from itreg.outputs import save_registration

    overrides = parse_sets(sets) or None
    if not refine and (transform or metric or overrides):
        raise ConfigError("--transform, --metric and --set configure the refinement; add "
                          "--refine or leave them out")
    result = register_with_net(
        fixed_img, moving_img, net, refine=refine, refine_init=refine_init, metric=metric,
        transform=transform,
        fixed_mask=fmask, moving_mask=mmask, seed=seed, threads=threads,
        progress=not quiet, overrides=overrides)
    save_registration(result, output, force=force, inputs={
        "fixed": fixed, "moving": moving, "net": net, "fixed_mask": None, "moving_mask": None})
    how = "network + refinement" if refine else "network"
    click.echo(f"registered by {how} in {result.wall_time_s:.2f} s "
               f"(inference {result.inference_time_s:.3f} s); outputs in {output}")


@app.command()
@click.argument("image", type=_PATH)
@click.option("-r", "--reference", type=_PATH, required=True, help="Image whose grid to use.")
@click.option("-t", "--transform", type=_PATH, required=True,
              help="ITK transform file or displacement-field image (reference -> image points).")
@click.option("-o", "--output", type=_PATH, required=True, help="Output image file.")
@click.option("--labels", is_flag=True, help="Resample as a label map (keeps integer labels).")
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
def apply(image, reference, transform, output, labels, force) -> None:
    """Resample IMAGE onto the grid of REFERENCE through a transform."""
    from itreg.outputs import apply_transform_file

    apply_transform_file(image, reference, transform, output, labels=labels, force=force)
    click.echo(f"wrote {output}")


@app.command()
@click.option("-o", "--output", type=_PATH, default=Path("demo-out"), show_default=True,
              help="Output folder.")
@click.option("--spacing", type=click.FloatRange(min=0.5), default=1.0, show_default=True,
              help="Voxel spacing of the phantom in mm (1 = full template resolution).")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the misalignment and noise.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads.")
@click.option("--force", is_flag=True, help="Overwrite an existing output folder.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def demo(output, spacing, seed, threads, force, quiet) -> None:
    """Register a bundled multimodal brain pair (MNI T1 vs synthetic T2-like image under a random
    affine) end to end, print the error reached and write a before/after PNG."""
    from itreg.demo import run_demo

    click.echo(run_demo(output, spacing_mm=spacing, seed=seed, threads=threads, force=force,
                        progress=not quiet))

"""Pairwise commands: ``register``, ``apply`` and ``demo``."""

from __future__ import annotations

from pathlib import Path

import click

from itreg.cli.app import PATH as _PATH
from itreg.cli.app import app, parse_sets, standard_options
from itreg.errors import ConfigError


@app.command()
@click.argument("fixed", type=_PATH)
@click.argument("moving", type=_PATH)
@click.option("-t", "--transform", default=None,
              help="Preset or transform: rigid, affine, bspline (alias ffd), bspline-ml "
                   "(40 -> 20 -> 10 mm control grids), dense, svf, translation, similarity "
                   "('itreg presets list').")
@click.option("-m", "--metric", default=None,
              help="Similarity metric: mi, nmi, mi-gaussian, joint-entropy, ncc, lncc, mse, "
                   "ngf, mind-ssc (modality-independent, robust to MR bias fields), or a "
                   "learned one (ditr:MODEL.pt, mine, kldiv, deepsim:MODEL.pt).")
@click.option("--config", "config", type=_PATH, default=None,
              help="A registration config as TOML (the presets' format, see 'itreg presets "
                   "show NAME'); --transform, --metric and --set then change it.")
@click.option("--fixed-mask", type=_PATH, default=None, help="Mask on the fixed grid.")
@click.option("--moving-mask", type=_PATH, default=None, help="Mask on the moving grid.")
@click.option("--init", default="centers", show_default=True,
              help="Initialisation: centers, moments, none, or a transform file.")
@click.option("--bias-correction", type=click.Choice(["none", "n4"]), default="none",
              show_default=True,
              help="Remove the images' intensity nonuniformity first (n4: SimpleITK's N4, "
                   "inside the masks); for MR, not CT.")
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
@click.option("--outputs", "outputs", default=None, metavar="LIST",
              help="What to write, comma-separated: warped (warped.nii.gz), transform "
                   "(transform.tfm, transform.h5; linear runs also inverse.tfm), "
                   "displacement or field (deformable runs: displacement.nii.gz), inverse "
                   "(deformable runs: inverse_displacement.nii.gz and its consistency in the "
                   "report; many times the registration's time), or all. Default: warped, "
                   "transform, and displacement where a dense field is the transform (--net "
                   "field networks); a B-spline run's transform.h5 holds its exact ITK "
                   "BSplineTransform, so its field is written only on request. report.json "
                   "is always written; work an output needs is skipped when it is not asked "
                   "for (e.g. --outputs transform: no resampling).")
@click.option("--compress", type=click.Choice(["fast", "best", "none"]), default="fast",
              show_default=True,
              help="Compression of the image outputs: fast (gzip, run-length strategy), best "
                   "(gzip level 9; slow, a few per cent smaller on float images) or none "
                   "(.nii files instead of .nii.gz).")
@standard_options(output_help="Output folder (created; with --force an existing one keeps "
                              "every file that itreg did not write).")
def register(fixed, moving, transform, metric, config, fixed_mask, moving_mask, init,
             bias_correction, net, refine, refine_init, outputs, compress, output, force,
             quiet, seed, sets, threads, device) -> None:
    """Register MOVING to FIXED.

    Writes OUTPUT/warped.nii.gz, OUTPUT/transform.tfm (linear part, fixed -> moving),
    OUTPUT/transform.h5 (the whole map), OUTPUT/report.json (with the seconds of each stage
    under timings_s: import, read, prepare, register, resample, transforms, write), for
    linear runs OUTPUT/inverse.tfm and for dense-field (network) runs
    OUTPUT/displacement.nii.gz; --outputs field adds a B-spline run's displacement field,
    --outputs all also a deformable run's inverse_displacement.nii.gz, --outputs picks fewer.

    With --net MODEL.pt a trained network predicts the transform in one pass (the same
    outputs); --refine then continues iteratively from its prediction (--transform, --metric
    and --set change that refinement).
    """
    import time

    from itreg.io.outputs import check_output_dir
    from itreg.results import select_outputs

    t_start = time.perf_counter()
    select_outputs(outputs)  # refuse unknown names before torch loads
    inputs = {"fixed": fixed, "moving": moving, "fixed_mask": fixed_mask,
              "moving_mask": moving_mask, "config": config, "net": net}
    init_path = None if init in ("centers", "moments", "none") else Path(init)
    protect = [p for p in (*inputs.values(), init_path) if p is not None]
    check_output_dir(output, force=force, protect=protect)
    _check_exist({"image": [fixed, moving], "mask": [fixed_mask, moving_mask]})
    from itreg import io
    from itreg.runtime import resolve_device

    dev = resolve_device(device)
    t_import = time.perf_counter()
    if refine_init is not None and not refine:
        raise ConfigError("--refine-init applies with --net MODEL.pt --refine")
    if refine and net is None:
        raise ConfigError("--refine continues from a network's prediction; give --net MODEL.pt")
    overrides = parse_sets(sets) or None
    # Registration inputs are intensities even when stored as integers (CT, MR int16).
    fixed_img, moving_img = _read_pair(fixed, moving)
    fixed_img, moving_img = fixed_img.to(dev), moving_img.to(dev)
    fmask = io.read_mask(fixed_mask, fixed_img.grid) if fixed_mask else None
    mmask = io.read_mask(moving_mask, moving_img.grid) if moving_mask else None
    t_read = time.perf_counter()
    save = {"outputs": outputs, "compress": compress,
            "timings": {"import": t_import - t_start, "read": t_read - t_import}}
    if net is not None:
        if init != "centers":
            raise ConfigError("--init does not apply with --net (the network predicts the "
                              "starting transform)")
        if config is not None or bias_correction != "none":
            raise ConfigError("--config and --bias-correction apply to iterative registration, "
                              "not --net")
        _register_with_net(inputs, output, fixed_img, moving_img, fmask, mmask, net, refine,
                           refine_init or "fit", transform, metric, seed, threads, overrides,
                           force, quiet, protect, save)
        return
    init_arg: object = init
    if init_path is not None:
        from itreg.results import is_image_path

        init_arg = (io.read_displacement_field(init_path) if is_image_path(init_path)
                    else io.read_transform(init_path))
    result = run_registration(
        fixed_img, moving_img, transform=transform, metric=metric, preset=config,
        fixed_mask=fmask, moving_mask=mmask, init=init_arg, seed=seed, threads=threads,
        progress=not quiet, overrides=overrides, bias_correction=bias_correction,
    )
    t_reg = time.perf_counter()
    save["timings"] = {**save["timings"],
                       "prepare": max(t_reg - t_read - result.wall_time_s, 0.0),
                       "register": result.wall_time_s}
    save_registration(result, output, force=force, protect=protect,
                      inputs={**inputs, "init": init}, **save)
    reasons = ", ".join(sorted(set(result.stop_reasons)))
    click.echo(f"registered in {result.wall_time_s:.2f} s (stop: {reasons}); outputs in "
               f"{output}")


def run_registration(*args, **kwargs):
    """:func:`itreg.api.register` (imported on first use: the CLI starts without torch)."""
    from itreg.api import register as api_register

    return api_register(*args, **kwargs)


def save_registration(result, output, *, force, protect, inputs, **kwargs):
    """:func:`itreg.results.save_registration`, refusing to write over any input."""
    from itreg.results import save_registration as save

    return save(result, output, force=force, inputs=inputs, protect=protect, **kwargs)


def _check_exist(paths: dict) -> None:
    """Refuse a missing input before torch loads (the readers check everything else)."""
    from itreg.errors import ImageReadError, MaskError

    for what, items in paths.items():
        for p in items:
            if p is not None and not Path(p).exists():
                error = MaskError if what == "mask" else ImageReadError
                raise error(f"{what} {str(p)!r} does not exist; check the path")


def _read_pair(fixed, moving):
    """Read the fixed and moving images side by side (SimpleITK's reader releases the GIL;
    registration inputs are intensities even when stored as integers: CT, MR int16)."""
    from concurrent.futures import ThreadPoolExecutor

    from itreg import io

    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = [pool.submit(io.read_image, p, is_label=False) for p in (fixed, moving)]
        return futures[0].result(), futures[1].result()


def _register_with_net(inputs, output, fixed_img, moving_img, fmask, mmask, net, refine,
                       refine_init, transform, metric, seed, threads, overrides, force,
                       quiet, protect, save) -> None:
    import time

    from itreg.nets.inference import register_with_net

    t0 = time.perf_counter()

    if not refine and (transform or metric or overrides):
        raise ConfigError("--transform, --metric and --set configure the refinement; add "
                          "--refine or leave them out")
    result = register_with_net(
        fixed_img, moving_img, net, refine=refine, refine_init=refine_init, metric=metric,
        transform=transform,
        fixed_mask=fmask, moving_mask=mmask, seed=seed, threads=threads,
        progress=not quiet, overrides=overrides)
    save["timings"] = {**save["timings"],
                       "prepare": max(time.perf_counter() - t0 - result.wall_time_s, 0.0),
                       "register": result.wall_time_s}
    save_registration(result, output, force=force, protect=protect, inputs=inputs, **save)
    how = "network + refinement" if refine else "network"
    click.echo(f"registered by {how} in {result.wall_time_s:.2f} s "
               f"(inference {result.inference_time_s:.3f} s); outputs in {output}")


@app.command()
@click.option("--spacing", type=click.FloatRange(min=0.5), default=1.0, show_default=True,
              help="Voxel spacing of the phantom in mm (1 = full template resolution).")
@standard_options(output_required=False, sets=False,
                  output_help="Output folder [default: demo-out].")
def demo(spacing, output, force, quiet, seed, threads, device) -> None:
    """Register a bundled multimodal brain pair (MNI T1 vs synthetic T2-like image under a random
    affine) end to end, print the error reached and write a before/after PNG."""
    from itreg.demo import run_demo

    click.echo(run_demo(output or Path("demo-out"), spacing_mm=spacing, seed=seed,
                        threads=threads, device=device, force=force, progress=not quiet))

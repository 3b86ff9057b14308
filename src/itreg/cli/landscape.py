"""The ``landscape`` command: a metric over a grid of rigid offsets of an aligned pair."""

from __future__ import annotations

import click

from itreg.cli.app import PATH as _PATH
from itreg.cli.app import app, parse_sets, progress_callback, standard_options


@app.command()
@click.argument("fixed", type=_PATH)
@click.argument("moving", type=_PATH)
@click.option("-m", "--metric", default="mi", show_default=True,
              help="Metric name (mi, nmi, lncc, mine, kldiv, ditr:model.pt, ...).")
@click.option("--axes", default="tx,ty", show_default=True,
              help="Comma-separated offset axes among tx,ty,tz (mm) and rx,ry,rz (degrees); "
                   "2D images: tx, ty, rz.")
@click.option("--range", "ranges", default="-20:20:1", show_default=True,
              help="start:stop:step for every axis, or one per axis separated by commas.")
@click.option("--fixed-mask", type=_PATH, default=None, help="Mask on the fixed grid.")
@click.option("--plateau-tol", type=click.FloatRange(min=0.0, max=1.0), default=1e-3,
              show_default=True,
              help="Plateau tolerance of the local-optimum count, relative to the loss range.")
@click.option("--fit-steps", type=click.IntRange(min=0), default=30, show_default=True,
              help="Critic steps at every offset (trainable neural metrics).")
@click.option("--warmup-steps", type=click.IntRange(min=0), default=300, show_default=True,
              help="Critic steps at the zero offset (trainable neural metrics).")
@standard_options(sets_help="A metric setting, e.g. --set bins=64 (repeatable).")
def landscape(fixed, moving, metric, axes, ranges, fixed_mask, plateau_tol, fit_steps,
              warmup_steps, output, force, quiet, seed, sets, threads, device) -> None:
    """Evaluate a metric over translations/rotations of the aligned pair FIXED, MOVING.

    Writes OUTPUT/landscape.png (a curve for one axis, a surface with contours for two),
    OUTPUT/landscape.csv (every offset with the loss and the metric quantity) and
    OUTPUT/summary.json (number of local optima, FWHM per axis), and prints the summary.
    """
    from itreg import io
    from itreg.evaluate.landscape import metric_landscape, parse_range, save_landscape
    from itreg.runtime import limited_threads, resolve_device

    protect = [fixed, moving, *([fixed_mask] if fixed_mask else [])]
    if ":" in metric:
        protect.append(metric.split(":", 1)[1])
    io.check_output_dir(output, force=force, protect=protect)
    dev = resolve_device(device)
    axis_list = [a.strip() for a in axes.split(",") if a.strip()]
    range_list = [parse_range(r) for r in ranges.split(",") if r.strip()]
    fixed_img = io.read_image(fixed, is_label=False).to(dev)
    moving_img = io.read_image(moving, is_label=False).to(dev)
    fmask = io.read_mask(fixed_mask, fixed_img.grid) if fixed_mask else None
    with limited_threads(threads), progress_callback("landscape", not quiet) as bar:
        land = metric_landscape(fixed_img, moving_img, metric, axes=axis_list, ranges=range_list,
                                fixed_mask=fmask, plateau_tol=plateau_tol,
                                warmup_steps=warmup_steps, fit_steps=fit_steps, seed=seed,
                                progress=bar, **parse_sets(sets))
    with io.atomic_output_dir(output, force=force, protect=protect) as tmp:
        save_landscape(land, tmp)
    widths = ", ".join(f"{a} {'>' if c else ''}{w:.3g} {'deg' if a.startswith('r') else 'mm'}"
                       for a, w, c in zip(land.axes, land.fwhm, land.fwhm_censored))
    best = ", ".join(f"{a}={v:g}" for a, v in zip(land.axes, land.best_offset)) \
        if land.optima else "none"
    click.echo(f"{land.metric}: {land.n_optima} local optima (best at {best}); FWHM {widths}; "
               f"outputs in {output}")

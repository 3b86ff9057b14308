"""Groupwise command: ``itreg groupwise IMG [IMG ...] -o OUTDIR``."""

from __future__ import annotations

import click

from itreg.cli.app import PATH as _PATH
from itreg.cli.app import app


@app.command()
@click.argument("images", type=_PATH, nargs=-1, required=True)
@click.option("-o", "--output", type=_PATH, required=True, help="Output folder.")
@click.option("-m", "--metric", default="xmetric", show_default=True,
              help="Groupwise metric: xmetric, cte, ape, vi, congealing, gmm.")
@click.option("-t", "--transform", default="rigid", show_default=True,
              help="Transform schedule: translation, rigid, affine, ffd.")
@click.option("-k", "--classes", type=int, default=None,
              help="Classes of the common anatomy (xmetric, gmm; default 4).")
@click.option("--reference", type=int, default=None,
              help="Index (0-based) of an image kept fixed; default: unbiased (zero-sum).")
@click.option("--iterations", type=click.IntRange(min=0), default=100, show_default=True,
              help="Adam steps per resolution level.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of random choices.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads.")
@click.option("--force", is_flag=True, help="Overwrite an existing output folder.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
def groupwise(images, output, metric, transform, classes, reference, iterations, seed, threads,
              force, quiet) -> None:
    """Register IMAGES jointly into a common space (X-CoReg by default).

    Writes OUTPUT/j/warped.nii.gz, OUTPUT/j/transform.tfm (linear part, common -> image j) and,
    for ffd, OUTPUT/j/displacement.nii.gz per image j (0-based, in the order given);
    OUTPUT/segmentation.nii.gz and OUTPUT/probabilities.nii.gz (xmetric, gmm),
    OUTPUT/template.nii.gz and OUTPUT/report.json.
    """
    from itreg import io
    from itreg.errors import ConfigError, OutputExistsError
    from itreg.groupwise import register_group, save_group

    if output.exists() and not force:
        raise OutputExistsError(f"output folder '{output}' exists; use --force to overwrite it")
    if len(images) < 2:
        raise ConfigError(f"groupwise registration needs at least two images, got {len(images)}")
    loaded = [io.read_image(p, is_label=False) for p in images]
    result = register_group(loaded, metric=metric, transform=transform, k=classes,
                            reference=reference, seed=seed, iterations=iterations,
                            threads=threads, progress=not quiet)
    save_group(result, output, force=force, inputs=images)
    reasons = ", ".join(sorted({r.stop_reason for r in result.records}))
    click.echo(f"registered {len(images)} images in {result.wall_time_s:.2f} s (stop: {reasons}); "
               f"outputs in {output}")

"""Groupwise command: ``itreg groupwise IMG [IMG ...] -o OUTDIR``."""

from __future__ import annotations

import click

from itreg.cli.app import PATH as _PATH
from itreg.cli.app import app, expand_paths, parse_sets, standard_options

#: Names other commands (and other tools) use for groupwise transforms.
_TRANSFORM_ALIASES = {"bspline": "ffd", "b-spline": "ffd"}


@app.command()
@click.argument("images", type=_PATH, nargs=-1, required=True)
@click.option("-m", "--metric", default="xmetric", show_default=True,
              help="Groupwise metric: xmetric, cte, ape, vi, congealing, gmm, mvmm.")
@click.option("-t", "--transform", default="rigid", show_default=True,
              help="Transform schedule: translation, rigid, affine, ffd (alias bspline).")
@click.option("-k", "--classes", type=int, default=None,
              help="Classes of the common anatomy (xmetric, gmm, mvmm; default 4).")
@click.option("--reference", type=int, default=None,
              help="Index (0-based) of an image kept fixed; default: unbiased (zero-sum).")
@click.option("--levels", type=click.IntRange(min=4), default=None,
              help="Intensity levels L of the histograms (xmetric, ape, cte; default 64).")
@click.option("--segmentations", default=None,
              help="X-Reg-GT (Eq. 48): one label image per input, comma-separated, labels "
                   "0..K-1 on each image's own grid; the appearance model is built from them.")
@click.option("--roi", type=_PATH, default=None,
              help="Region-of-interest mask (nonzero inside), resampled (nearest) onto the "
                   "common grid: only its points drive the registration.")
@click.option("--bias-correction", type=click.Choice(["none", "n4"]), default="none",
              show_default=True,
              help="Remove each image's intensity nonuniformity first (n4: SimpleITK's N4).")
@click.option("--iterations", type=click.IntRange(min=0, max=100_000), default=100,
              show_default=True, help="Adam steps per resolution level.")
@click.option("--net", "net", type=_PATH, default=None,
              help="Apply a trained deep-combined-computing model ('itreg train-net --kind "
                   "dcc'): registration and segmentation in one pass.")
@click.option("--domains", default=None,
              help="With --net: the modality of each image, comma-separated names or indices "
                   "(e.g. t1,t2,pd); default: the model's domains in order.")
@click.option("--outputs", "outputs", default=None, metavar="LIST",
              help="What to write per image, as register --outputs: warped, transform "
                   "(transform.tfm, transform.h5; linear runs also inverse.tfm), displacement "
                   "or field, inverse (deformable runs: inverse_displacement.nii.gz, slow), "
                   "or all. Default: warped and transform (and the field of a dense-field "
                   "transform); ffd's transform.h5 holds its exact B-splines. The template, "
                   "segmentation and report.json are always written.")
@standard_options(sets_help="A metric option, e.g. --set sample_rate=0.1 --set init=kmeans "
                            "(repeatable; passed to register_group).")
def groupwise(images, metric, transform, classes, reference, levels, segmentations, roi,
              bias_correction, iterations, net, domains, outputs, output, force, quiet, seed,
              sets, threads, device) -> None:
    """Register IMAGES jointly into a common space (X-CoReg by default).

    Writes OUTPUT/j/warped.nii.gz, OUTPUT/j/transform.tfm (linear part, common -> image j),
    OUTPUT/j/transform.h5 (the whole map; linear runs also OUTPUT/j/inverse.tfm) per image j
    (0-based, in the order given; --outputs field adds ffd's OUTPUT/j/displacement.nii.gz,
    --outputs all also the inverse fields); OUTPUT/segmentation.nii.gz and
    OUTPUT/probabilities.nii.gz (xmetric, gmm), OUTPUT/template.nii.gz and OUTPUT/report.json.

    With --net DCC.pt a trained combined-computing network registers and segments the group in
    one pass: the same outputs, plus OUTPUT/j/segmentation.nii.gz and
    OUTPUT/j/probabilities.nii.gz on each image's own grid.
    """
    from itreg.results import select_outputs

    select_outputs(outputs)  # refuse unknown names before any work
    from itreg import io
    from itreg.errors import ConfigError
    from itreg.groupwise import register_group, save_group
    from itreg.runtime import resolve_device

    images = expand_paths(images, "IMAGES")
    seg_paths = expand_paths([segmentations], "--segmentations") if segmentations else []
    protect = [*images, *seg_paths, *([roi] if roi else []), *([net] if net else [])]
    io.check_output_dir(output, force=force, protect=protect)
    dev = resolve_device(device)
    transform = _TRANSFORM_ALIASES.get(transform.lower(), transform)
    if len(images) < 2:
        raise ConfigError(f"groupwise registration needs at least two images, got {len(images)}")
    loaded = [io.read_image(p, is_label=False).to(dev) for p in images]
    if net is not None:
        if outputs is not None:
            raise ConfigError("--outputs applies to iterative groupwise registration, not --net")
        if sets:
            raise ConfigError("--set applies to iterative groupwise registration, not --net")
        _apply_net(net, loaded, images, domains, output, seed, threads, force, protect)
        return
    if domains is not None:
        raise ConfigError("--domains applies to --net only")
    options = parse_sets(sets)
    if levels is not None:
        options["levels"] = levels
    if segmentations is not None:
        if metric != "xmetric":
            raise ConfigError("--segmentations (X-Reg-GT) applies to --metric xmetric only")
        paths = seg_paths
        if len(paths) != len(images):
            raise ConfigError(f"--segmentations needs one label image per input image: got "
                              f"{len(paths)} for {len(images)}")
        options["segmentations"] = [io.read_image(p, is_label=True) for p in paths]
    roi_mask = None
    if roi is not None:
        roi_mask = _roi_on_common_grid(io.read_image(roi, is_label=True), loaded, reference)
    result = register_group(loaded, metric=metric, transform=transform, k=classes,
                            reference=reference, seed=seed, iterations=iterations, roi=roi_mask,
                            bias_correction=bias_correction, threads=threads,
                            progress=not quiet, **options)
    save_group(result, output, force=force, inputs=images, protect=protect, outputs=outputs)
    reasons = ", ".join(sorted({r.stop_reason for r in result.records}))
    click.echo(f"registered {len(images)} images in {result.wall_time_s:.2f} s (stop: {reasons}); "
               f"outputs in {output}")


def _roi_on_common_grid(mask, loaded, reference):
    """The ROI as a bool tensor on the common grid (the reference's, else image 0's)."""
    from itreg.errors import ConfigError, MaskError
    from itreg.warp import resample

    index = 0 if reference is None else reference
    if not 0 <= index < len(loaded):
        raise ConfigError(f"reference must be an image index in 0..{len(loaded) - 1}, "
                          f"got {reference}")
    grid = loaded[index].grid
    if mask.ndim != grid.ndim:
        raise MaskError(f"the ROI is {mask.ndim}D, the images {grid.ndim}D")
    on_grid = resample(mask.float(), None, grid, mode="nearest").data[0] != 0
    if not bool(on_grid.any()):
        raise MaskError("the ROI does not cover any point of the common grid")
    return on_grid


def _apply_net(net, loaded, paths, domains, output, seed, threads, force, protect) -> None:
    from itreg.nets.dcc_apply import apply_dcc, save_dcc

    names = None
    if domains is not None:
        names = [int(d) if d.strip().isdigit() else d.strip() for d in domains.split(",")]
    result = apply_dcc(net, loaded, names, seed=seed, threads=threads)
    save_dcc(result, output, force=force, inputs=[str(p) for p in paths], protect=protect)
    click.echo(f"registered and segmented {len(loaded)} images with {net} in "
               f"{result.wall_time_s:.2f} s; outputs in {output}")

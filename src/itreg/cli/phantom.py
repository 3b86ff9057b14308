"""The ``phantom`` command: write an MNI brain phantom with its ground truth."""

from __future__ import annotations

import click

from itreg.cli.app import PATH as _PATH
from itreg.cli.app import app, standard_options


@app.command()
@click.argument("outdir", type=_PATH, required=False)
@click.option("--kind", type=click.Choice(["pair", "group", "dynamic"]), default="pair",
              show_default=True, help="A misaligned pair, a group of N images, or a "
                                      "dynamic-contrast sequence.")
@click.option("--contrast", default=None,
              help="Moving contrast of a pair (t1, t2, pd; default t2), or comma-separated "
                   "contrasts cycled over a group (default t1,t2,pd).")
@click.option("--misalign", type=click.Choice(["rigid", "affine", "anchor", "ffd", "svf"]),
              default="affine", show_default=True,
              help="Misalignment of a pair or group: paper 000's rigid/affine ranges, the "
                   "anchor benchmark's affine, paper 003's random B-spline FFD, or (pairs) "
                   "svf: a diffeomorphism exp(v) of a random smooth velocity field.")
@click.option("--spacing", type=float, default=1.0, show_default=True,
              help="Isotropic spacing in mm (1 = the template's; 2-4 for quick tests).")
@click.option("--ndim", type=click.Choice(["2", "3"]), default="3", show_default=True,
              help="3D volumes, or 2D middle axial slices.")
@click.option("-n", "--n", "n", type=click.IntRange(min=2), default=3, show_default=True,
              help="Number of images of a group.")
@click.option("--frames", type=click.IntRange(min=2), default=20, show_default=True,
              help="Number of frames of a dynamic sequence.")
@click.option("--control-spacing", type=float, default=20.0, show_default=True,
              help="FFD control point spacing in mm.")
@click.option("--sigma", type=float, default=None,
              help="FFD control point displacement standard deviation in mm (default 6), or "
                   "the svf velocity's RMS per component in mm (default 4).")
@click.option("--smoothness", default="20", show_default=True,
              help="svf: Gaussian smoothness of the velocity field in mm; comma-separated "
                   "values give a mixture of scales, e.g. 10,20,40.")
@click.option("--noise", type=float, default=0.02, show_default=True,
              help="Rician noise sigma of the synthetic images (intensities in [0, 1]).")
@click.option("--bias", type=click.FloatRange(0.0, 1.0, max_open=True), default=None,
              help="Amplitude of a smooth random multiplicative bias field on the moving image "
                   "(every image of a group), e.g. 0.25 for about +-25 %; default: the "
                   "standard 0.80-1.17 quadratic field.")
@standard_options(output_required=False, sets=False, compute=False,
                  output_help="Output folder (the older positional OUTDIR is still accepted).")
def phantom(outdir, kind, contrast, misalign, spacing, ndim, n, frames, control_spacing, sigma,
            smoothness, noise, bias, output, force, quiet, seed) -> None:
    """Write a brain phantom with known misalignment into the folder -o OUTDIR.

    Images, labels and masks are .nii.gz; true transforms are ITK .tfm files (linear maps as
    AffineTransform with their inverse; FFDs as BSplineTransform plus displacement-field images
    of the map and of its numerical inverse; svf as the two displacement-field images);
    phantom.json lists every file.
    """
    from itreg.errors import ConfigError
    from itreg.phantoms.write import write_phantom

    if outdir is not None and output is not None:
        raise ConfigError("give the output folder once: -o OUTDIR (or the positional OUTDIR)")
    if outdir is None and output is None:
        raise ConfigError("give the output folder with -o OUTDIR")
    outdir = output if output is not None else outdir
    from itreg.io.outputs import check_output_dir

    try:
        scales = [float(v) for v in str(smoothness).split(",") if v.strip()]
    except ValueError:
        raise ConfigError(f"--smoothness takes numbers in mm separated by commas, got "
                          f"{smoothness!r}") from None
    check_output_dir(outdir, force=force)

    contrasts = None
    if contrast is not None:
        parts = [c.strip() for c in contrast.split(",") if c.strip()]
        contrasts = parts[0] if kind == "pair" and len(parts) == 1 else parts
    manifest = write_phantom(outdir, kind=kind, contrast=contrasts, misalign=misalign,
                             spacing_mm=spacing, ndim=int(ndim), n=n, frames=frames, seed=seed,
                             control_spacing_mm=control_spacing, sigma_mm=sigma,
                             noise_sigma=noise, force=force, bias=bias,
                             smoothness_mm=scales[0] if len(scales) == 1 else scales)
    click.echo(f"wrote {kind} phantom ({len(manifest['files'])} files) to {outdir}")

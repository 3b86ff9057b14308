"""The ``evaluate`` command: Dice, surface distances, TRE, warping error, Jacobian statistics."""

from __future__ import annotations

import json

import click

from itreg.cli.app import PATH as _PATH
from itreg.cli.app import app, standard_options


@app.command()
@click.option("--fixed-labels", type=_PATH, default=None, help="Fixed label map.")
@click.option("--warped-labels", type=_PATH, default=None,
              help="Moving label map warped onto the fixed grid (itreg apply --labels).")
@click.option("--score-labels", "--labels", "label_list", default=None,
              help="Comma-separated label values to score (default: every nonzero label); "
                   "a value in neither label map is an error.")
@click.option("--no-surface", is_flag=True, help="Skip HD95/ASD (faster).")
@click.option("--landmarks-fixed", type=_PATH, default=None,
              help="Fixed landmarks (CSV/.fcsv/.pts, world mm).")
@click.option("--landmarks-moving", type=_PATH, default=None,
              help="Corresponding moving landmarks.")
@click.option("--transform", type=_PATH, default=None,
              help="Estimated fixed -> moving transform (.tfm/.h5/.txt or displacement field).")
@click.option("--true-transform", type=_PATH, default=None,
              help="Ground-truth fixed -> moving transform, for the warping error.")
@click.option("--reference", type=_PATH, default=None,
              help="Fixed image whose grid carries the warping error and Jacobian statistics.")
@click.option("--mask", type=_PATH, default=None, help="Mask on the reference grid.")
@click.option("--displacement", type=_PATH, default=None,
              help="Displacement field image for Jacobian statistics (on its own grid).")
@click.option("--estimated", "estimated", type=_PATH, multiple=True,
              help="Groupwise: estimated transform common -> image j (repeat, in image order).")
@click.option("--misalignment", "misalignments", type=_PATH, multiple=True,
              help="Groupwise: true misalignment image j -> common (repeat; a phantom's "
                   "misalignment_XX files). With --estimated and --reference: gWI, gRE.")
@standard_options(output="file", output_required=False, seed=False, sets=False, device=False,
                  output_help="Report file: .json or .md (default: JSON on stdout).")
def evaluate(fixed_labels, warped_labels, label_list, no_surface, landmarks_fixed,
             landmarks_moving, transform, true_transform, reference, mask, displacement,
             estimated, misalignments, output, force, quiet, threads) -> None:
    """Evaluate a registration and write a JSON or Markdown report.

    Each group of options adds measures: label maps give Dice per label and mean, HD95 and
    ASD (mm); landmarks give TRE (through --transform) and the initial error; --transform with
    --true-transform and --reference gives the warping error (mean, p90, max mm over --mask);
    --transform with --reference, or --displacement, gives Jacobian statistics (fraction of
    det J <= 0, std det J, SDlogJ). Repeated --estimated and --misalignment with --reference
    (the common grid) and --mask (the foreground) give paper 002's gWI and gRE.
    """
    from itreg import io
    from itreg.errors import ConfigError
    from itreg.evaluate import evaluate_registration, jacobian_statistics, write_report
    from itreg.runtime import limited_threads

    inputs = [p for p in (fixed_labels, warped_labels, landmarks_fixed, landmarks_moving,
                          transform, true_transform, reference, mask, displacement,
                          *estimated, *misalignments) if p is not None]
    if output is not None:
        io.check_output_file(output, force=force, protect=inputs)
    with limited_threads(threads):
        report = _evaluate(io, ConfigError, evaluate_registration, jacobian_statistics,
                           fixed_labels, warped_labels, label_list, no_surface, landmarks_fixed,
                           landmarks_moving, transform, true_transform, reference, mask,
                           displacement, estimated, misalignments)
    if output is None:
        from itreg.evaluate.report import jsonable

        click.echo(json.dumps(jsonable(report), indent=2))
    else:
        write_report(report, output, force=force)
        click.echo(f"wrote {output}")


def _evaluate(io, ConfigError, evaluate_registration, jacobian_statistics,
              fixed_labels, warped_labels, label_list, no_surface, landmarks_fixed,
              landmarks_moving, transform, true_transform, reference, mask, displacement,
              estimated, misalignments) -> dict:

    labels = None
    if label_list:
        try:
            labels = [int(v) for v in label_list.split(",") if v.strip()]
        except ValueError:
            raise ConfigError(f"--labels expects comma-separated integers, got {label_list!r}")

    def _transform(path):
        if path is None:
            return None
        return io.read_transform(path) if io.is_transform_path(path) \
            else io.read_displacement_field(path)

    fixed_lab = io.read_image(fixed_labels, is_label=True) if fixed_labels else None
    warped_lab = io.read_image(warped_labels, is_label=True) if warped_labels else None
    ref_grid = io.read_header(reference).grid if reference else None
    mask_img = io.read_mask(mask, reference=ref_grid) if mask else None
    report = evaluate_registration(
        fixed_labels=fixed_lab,
        warped_labels=warped_lab,
        labels=labels,
        surfaces=not no_surface,
        fixed_landmarks=io.read_landmarks(landmarks_fixed) if landmarks_fixed else None,
        moving_landmarks=io.read_landmarks(landmarks_moving) if landmarks_moving else None,
        transform=_transform(transform),
        true_transform=_transform(true_transform),
        reference=ref_grid,
        mask=mask_img,
    ) if any(v is not None for v in (fixed_labels, warped_labels, landmarks_fixed,
                                     landmarks_moving, transform, true_transform)) else {}
    # evaluate_registration adds Jacobian statistics of --transform on --reference.
    if displacement is not None:
        field = io.read_displacement_field(displacement)
        report["jacobian_displacement"] = jacobian_statistics(
            field, field.grid, mask_img if mask_img is not None and mask_img.grid.same_as(
                field.grid) else None).as_dict()
    if estimated or misalignments:
        from itreg.evaluate import groupwise_registration_error, groupwise_warping_index

        if ref_grid is None:
            raise ConfigError("gWI/gRE need --reference (an image on the common grid)")
        est = [_transform(p) for p in estimated]
        mis = [_transform(p) for p in misalignments]
        report["gwi"] = groupwise_warping_index(est, mis, ref_grid, mask_img).as_dict()
        report["gre"] = groupwise_registration_error(est, mis, ref_grid).as_dict()
    if not report:
        raise ConfigError("nothing to evaluate: give --fixed-labels/--warped-labels, "
                          "landmarks, --transform with --reference, or --displacement")
    return report

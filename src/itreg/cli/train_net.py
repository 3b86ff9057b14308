"""``itreg train-net``: train a registration network and write its model file.

Kinds: ``affine`` (AffineNet), ``deform`` (DeformNet, a U-Net predicting a displacement or, with
``--field svf``, a stationary velocity field), ``cascade`` (AffineNet then DeformNet) and ``dcc``
(deep combined computing of a group: registration and segmentation, paper 002).

Training pairs come from ``--pairs`` (a CSV with ``fixed,moving[,fixed_labels,moving_labels]``
columns, or a folder with ``fixed/`` and ``moving/`` subfolders) or, with no ``--pairs``, from
the phantom builder on the fly (``--phantom N`` pairs, paper 003's protocol: fixed T1, moving
T2-like deformed by an FFD of 20 mm control spacing and 6 mm standard deviation). Validation pairs
come from ``--val-pairs`` or further phantom pairs of other seeds.

``--loss`` is any registry metric (``mse``, ``ncc``, ``lncc``, ``mi``, ``nmi``, ``mine``,
``kldiv``, ``deepsim:extractor.pt``, ...); ``--loss-set bins=64`` sets its options. ``--labels``
adds MIDiceRegNet's soft-Dice term on the label maps (used in training only). ``--small`` uses
the small CPU setting (minutes on two cores); ``--set KEY=VALUE`` changes any training setting
(``epochs``, ``lr``, ``ema_decay``, ``features``, ...). A checkpoint beside the output
(``OUTPUT.ckpt``) lets an interrupted run resume with the same command.

Apply a trained network with ``itreg register FIXED MOVING --net model.pt -o OUT [--refine]``
(``dcc`` models: ``itreg groupwise IMG... --net dcc.pt -o OUT``).
"""

from __future__ import annotations

import dataclasses

import click

from itreg.cli.app import PATH as _PATH
from itreg.cli.app import app, parse_sets, standard_options
from itreg.errors import ConfigError

#: Network kinds ``train-net`` accepts.
NET_KINDS = ("affine", "deform", "cascade", "dcc")


def _phantom_sources(n: int, n_val: int, ndim: int, spacing: float, contrast: str, seed: int):
    from itreg.phantoms import load_mni
    from itreg.train.sources import PhantomPairs

    template = load_mni(spacing)
    train = PhantomPairs(n, ndim=ndim, spacing_mm=spacing, seed=seed, contrast=contrast,
                         template=template)
    # Validation pairs use seeds far from the training ones: no pair is shared.
    val = PhantomPairs(n_val, ndim=ndim, spacing_mm=spacing, seed=seed + 100_000,
                       contrast=contrast, template=template)
    return train, val


def _net_config(kind, loss, loss_sets, labels, small, seed, device, threads, extra):
    from itreg.train.regnet import TrainNetConfig

    valid = {f.name for f in dataclasses.fields(TrainNetConfig)}
    unknown = sorted(set(extra) - valid)
    if unknown:
        raise ConfigError(f"unknown training setting(s) {', '.join(unknown)}; valid: "
                          f"{', '.join(sorted(valid))}")
    kwargs = {"kind": kind, "loss": loss, "loss_kwargs": parse_sets(loss_sets), "seed": seed,
              "device": device, "threads": threads}
    if labels:
        kwargs["dice_weight"] = 1.0
    kwargs.update(extra)
    try:
        return TrainNetConfig.small(**kwargs) if small else TrainNetConfig(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid training setting: {exc}") from None


@app.command("train-net")
@click.option("--kind", type=click.Choice(NET_KINDS), required=True,
              help="Network: affine, deform, cascade or dcc (group registration + segmentation).")
@click.option("--loss", default="lncc", show_default=True,
              help="Similarity metric used as loss (any registry metric, e.g. mi, lncc, mine, "
                   "kldiv, deepsim:extractor.pt).")
@click.option("--loss-set", "loss_sets", multiple=True, metavar="KEY=VALUE",
              help="Option of the loss metric, e.g. --loss-set bins=64 (repeatable).")
@click.option("--weak-labels", "--labels", "labels", is_flag=True,
              help="Weak supervision: add a soft-Dice term on the label maps (training only).")
@click.option("--pairs", type=_PATH, default=None,
              help="Training pairs: a CSV (fixed,moving[,fixed_labels,moving_labels]) or a "
                   "folder with fixed/ and moving/ (default: phantom pairs on the fly).")
@click.option("--val-pairs", type=_PATH, default=None, help="Validation pairs (same forms).")
@click.option("--phantom", "n_phantom", type=click.IntRange(min=1), default=32,
              show_default=True, help="Number of on-the-fly phantom training pairs or groups.")
@click.option("--val-phantom", "n_val", type=click.IntRange(min=1), default=8,
              show_default=True, help="Number of phantom validation pairs or groups.")
@click.option("--ndim", type=click.Choice(["2", "3"]), default="2", show_default=True,
              help="Phantom dimension (2: axial slices).")
@click.option("--spacing", type=click.FloatRange(min=0.5), default=None,
              help="Voxel spacing in mm (phantoms: default 2 in 2D, 4 in 3D; --pairs: "
                   "resample to it).")
@click.option("--contrast", default="t2", show_default=True,
              help="Moving contrast of phantom pairs (t2, pd, t1).")
@click.option("--small", is_flag=True, help="Small CPU settings (minutes on two cores).")
@click.option("--no-resume", is_flag=True,
              help="Start afresh even if OUTPUT.training/ holds an interrupted run's checkpoint.")
@standard_options(output="file", output_help="Model file to write (.pt). While training, the "
                  "best model so far and the resumable checkpoint live in OUTPUT.training/; "
                  "an interrupted run resumes from there, and the folder goes when the run "
                  "succeeds.",
                  sets_help="Override a training setting, e.g. --set epochs=5 (repeatable; "
                            "JSON values).")
def train_net(kind, loss, loss_sets, labels, pairs, val_pairs, n_phantom, n_val, ndim, spacing,
              contrast, small, no_resume, output, force, quiet, seed, sets, threads,
              device) -> None:
    """Train a registration network with any itreg metric and write it to OUTPUT."""
    from itreg.io.outputs import staged_model_output
    from itreg.runtime import resolve_device

    device = str(resolve_device(device))
    extra = parse_sets(sets)
    ndim = int(ndim)
    protect = [p for p in (pairs, val_pairs) if p is not None]
    if ":" in loss:
        protect.append(loss.split(":", 1)[1])
    with staged_model_output(output, force=force, protect=protect) as work:
        _train(kind, loss, loss_sets, labels, pairs, val_pairs, n_phantom, n_val, ndim, spacing,
               contrast, small, no_resume, work, quiet, seed, threads, device, extra)
    click.echo(f"wrote {output}")


def _train(kind, loss, loss_sets, labels, pairs, val_pairs, n_phantom, n_val, ndim, spacing,
           contrast, small, no_resume, output, quiet, seed, threads, device, extra) -> None:
    force = True  # `output` is the run's own work file (see staged_model_output)
    if kind == "dcc":
        _train_dcc(output, n_phantom, n_val, ndim, spacing, labels, small, seed, device,
                   threads, extra, no_resume, force, quiet)
        return
    config = _net_config(kind, loss, loss_sets, labels, small, seed, device, threads, extra)
    if pairs is not None:
        from itreg.train.sources import FolderPairs

        train_source = FolderPairs(pairs, spacing_mm=spacing)
        val_source = (FolderPairs(val_pairs, grid=train_source.grid)
                      if val_pairs is not None else None)
    else:
        if val_pairs is not None:
            raise ConfigError("--val-pairs needs --pairs (phantom training validates on "
                              "phantom pairs of other seeds)")
        train_source, val_source = _phantom_sources(
            n_phantom, n_val, ndim, spacing or (2.0 if ndim == 2 else 4.0), contrast, seed)
    if labels and not getattr(train_source, "has_labels", True):
        raise ConfigError("--labels needs label maps: give fixed_labels and moving_labels "
                          "columns (or folders) in --pairs")
    from itreg.train.regnet import train_regnet

    result = train_regnet(config, train_source, val_source, output, progress=not quiet,
                          resume=not no_resume, force=force)
    for name, stage in result.stages.items():
        click.echo(f"{name}: {stage.epochs} epochs, stop: {stage.stop_reason}, best "
                   f"{result.monitor} {stage.best_value:.4f} at epoch {stage.best_epoch}")
    click.echo(f"trained in {result.wall_time_s:.1f} s")


def _train_dcc(output, n_groups, n_val, ndim, spacing, labels, small, seed, device, threads,
               extra, no_resume, force, quiet) -> None:
    import torch

    from itreg.train.dcc import DCCTrainConfig, PhantomGroupSource, train_dcc

    valid = {f.name for f in dataclasses.fields(DCCTrainConfig)}
    unknown = sorted(set(extra) - valid)
    if unknown:
        raise ConfigError(f"unknown dcc training setting(s) {', '.join(unknown)}; valid: "
                          f"{', '.join(sorted(valid))}")
    kwargs = {"seed": seed, "threads": threads, "progress": not quiet,
              "train_groups": n_groups, "val_groups": n_val,
              "strategy": "weak" if labels else "unsupervised"}
    kwargs.update(extra)
    try:
        config = DCCTrainConfig.small(**kwargs) if small else DCCTrainConfig.full(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid training setting: {exc}") from None
    spacing = spacing or 3.0
    dev = torch.device(device)
    # Training groups use even slice offsets, validation groups odd ones and other seeds.
    train = PhantomGroupSource(ndim=ndim, spacing_mm=spacing, slice_offsets=(-4, -2, 0, 2, 4),
                               seed=seed, device=dev)
    val = PhantomGroupSource(ndim=ndim, spacing_mm=spacing, slice_offsets=(-3, -1, 1, 3),
                             seed=seed + 100_000, device=dev)
    result = train_dcc(train, val, config, output, force=force, resume=not no_resume)
    before = ", ".join(f"{k} {v:.3f}" for k, v in result.before.items())
    after = ", ".join(f"{k} {v:.3f}" for k, v in result.after.items())
    click.echo(f"validation before: {before}")
    click.echo(f"validation after:  {after}")
    click.echo(f"stop: {result.train.stop_reason} after {result.train.epochs} epochs")

"""``itreg train-metric``: train a learned similarity metric and write its model file.

Kinds:

- ``ditr``: DITR patch classifier by iterated maximum likelihood (paper 000); ``--images``
  gives roughly aligned ``FIXED,MOVING`` pairs (any grids, world-space aligned up to a small
  misalignment), ``--masks`` optional fixed-grid foreground masks (one per pair).
- ``mine`` / ``kldiv``: neural MI critics (papers 001 / 003) pre-trained on aligned
  ``FIXED,MOVING`` pairs (the moving image is resampled onto the fixed grid).
- ``deepsim-ae`` / ``deepsim-seg``: DeepSim feature extractors (paper 004); ``--images`` gives
  single images, ``--labels`` one label map per image (``deepsim-seg`` only).

``--spacing MM`` resamples every input to isotropic MM voxels first (Gaussian anti-aliasing of
half the new spacing); ``--small`` uses the small CPU settings (minutes on two cores), otherwise
the full-scale settings meant for a GPU. The model file stores the configuration with the
weights and loads from the file alone: ``itreg register F M --metric ditr:model.pt``.
"""

from __future__ import annotations

from pathlib import Path

import click

from itreg.cli.app import PATH as _PATH
from itreg.cli.app import app, expand_paths, parse_sets, standard_options
from itreg.errors import ConfigError

#: Kinds ``train-metric`` accepts.
KINDS = ("ditr", "mine", "kldiv", "deepsim-ae", "deepsim-seg")


def _resample(image, spacing: float | None, label: bool = False):
    """`image` resampled to isotropic `spacing` mm (same extent), or unchanged if None."""
    if spacing is None:
        return image
    if not spacing > 0:
        raise ConfigError(f"--spacing must be > 0, got {spacing}")
    from itreg.engine.pyramid import smooth_image
    from itreg.image import Image
    from itreg.warp import resample

    grid = image.grid.with_spacing(spacing)
    if label:
        return resample(image, None, grid, mode="nearest")
    data = image.data if image.data.is_floating_point() else image.data.float()
    src = Image(data, image.grid, is_label=False)
    if spacing > min(image.grid.spacing):
        src = smooth_image(src, 0.5 * spacing)
    return resample(src, None, grid, mode="linear")


def _split_pair(value: str) -> tuple[Path, Path]:
    parts = value.split(",")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"--images expects FIXED,MOVING pairs for this kind, got {value!r}")
    return Path(parts[0]), Path(parts[1])


def _read_pairs(images, masks, spacing, device=None):
    from itreg import io

    if masks and len(masks) != len(images):
        raise ConfigError(f"--masks gives {len(masks)} masks for {len(images)} image pairs; "
                          "give one per pair or none")
    out = []
    for i, value in enumerate(images):
        f_path, m_path = _split_pair(value)
        fixed = io.read_image(f_path, is_label=False).to(device or "cpu")
        moving = io.read_image(m_path, is_label=False).to(device or "cpu")
        mask = io.read_mask(masks[i], fixed.grid) if masks else None
        fixed_r = _resample(fixed, spacing)
        mask_r = None if mask is None else _resample(mask, spacing, label=True)
        out.append((fixed_r, _resample(moving, spacing), mask_r))
    return out


@app.command("train-metric")
@click.option("--kind", type=click.Choice(KINDS), required=True, help="Which metric to train.")
@click.option("--images", multiple=True, required=True,
              help="FIXED,MOVING pair (ditr, mine, kldiv) or one image (deepsim-*); repeatable.")
@click.option("--labels", multiple=True, type=_PATH,
              help="Label map per image (deepsim-seg); repeatable, same order as --images.")
@click.option("--masks", multiple=True, type=_PATH,
              help="Fixed-grid foreground mask per pair (ditr, mine, kldiv); repeatable.")
@click.option("--spacing", type=float, default=None,
              help="Resample inputs to isotropic voxels of this size (mm) first.")
@click.option("--small", is_flag=True, help="Small CPU settings (minutes on two cores).")
@click.option("--schedule", default=None,
              help="ditr: IML schedule name (rigid, affine, edges).")
@standard_options(output="file", output_help="Model file to write (.pt). While training, the "
                  "best model so far and the checkpoint live in OUTPUT.training/, which goes "
                  "when the run succeeds.",
                  sets_help="Override a training setting, e.g. --set epochs=5 (repeatable; "
                            "JSON values).")
def train_metric(kind, images, labels, masks, spacing, small, schedule, output, force, quiet,
                 seed, sets, threads, device) -> None:
    """Train a learned similarity metric and write it to OUTPUT.

    Settings of the training configuration (DITRTrainConfig, DeepSimTrainConfig, or the
    keyword arguments of train_critic) can be overridden with --set KEY=VALUE.
    """
    from itreg.io.outputs import staged_model_output
    from itreg.runtime import limited_threads, resolve_device

    extra = parse_sets(sets)
    # --images takes repeats, comma lists (pairs for ditr/mine/kldiv) and globs (single images)
    if kind.startswith("deepsim"):
        images = [str(p) for p in expand_paths(images, "--images")]
    labels = expand_paths(labels, "--labels")
    masks = expand_paths(masks, "--masks")
    inputs = [p for v in images for p in str(v).split(",")] + [*labels, *masks]
    dev = resolve_device(device)
    with staged_model_output(output, force=force, protect=inputs) as work, \
            limited_threads(threads):
        if kind == "ditr":
            _train_ditr(images, masks, work, spacing, small, schedule, seed, quiet, extra, dev)
        elif kind in ("mine", "kldiv"):
            _train_neural(kind, images, masks, work, spacing, small, seed, extra, dev)
        else:
            _train_deepsim(kind, images, labels, work, spacing, small, seed, quiet, extra, dev)
    click.echo(f"wrote {output}")


def _config(cls, small: bool, kwargs: dict, extra: dict):
    """``cls.small`` / ``cls.full`` with `kwargs` and the --set overrides (checked)."""
    import dataclasses

    valid = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(extra) - valid)
    if unknown:
        raise ConfigError(f"unknown training setting(s) {', '.join(unknown)}; valid: "
                          f"{', '.join(sorted(valid))}")
    kwargs = {**kwargs, **extra}
    try:
        return cls.small(**kwargs) if small else cls.full(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid training setting: {exc}") from None


def _train_ditr(images, masks, output, spacing, small, schedule, seed, quiet, extra,
                device=None) -> None:
    from itreg.train.ditr import DITRTrainConfig, TrainingPair, train_ditr

    pairs = [TrainingPair(f, m, mask)
             for f, m, mask in _read_pairs(images, masks, spacing, device)]
    kwargs = {"seed": seed, "progress": not quiet}
    if schedule is not None:
        kwargs["schedule"] = schedule
    cfg = _config(DITRTrainConfig, small, kwargs, extra)
    res = train_ditr(pairs, cfg, output=output, force=True)
    for s in res.stages:
        click.echo(f"IML{s['stage']}({s['factor']}, {s['sigma2_mm2']:g}) at "
                   f"{s['spacing_mm']:g} mm: validation accuracy {s['val_accuracy_before']:.3f}"
                   f" -> {s['val_accuracy']:.3f}")


def _train_neural(kind, images, masks, output, spacing, small, seed, extra,
                  device=None) -> None:
    from itreg.metrics.neural import save_critic
    from itreg.train.critic import train_critic
    from itreg.warp import resample

    fixed, moving, mlist = [], [], []
    for f, m, mask in _read_pairs(images, masks, spacing, device):
        fixed.append(f)
        moving.append(resample(m, None, f.grid, mode="linear"))
        mlist.append(None if mask is None else mask.data[0])
    steps = {"steps": 2000, "batch": 4096} if small else {"steps": 20000, "batch": 65536,
                                                          "patience": 20}
    steps.update(extra)
    res = train_critic(fixed, moving, metric=kind, masks=mlist if masks else None, seed=seed,
                       **steps)
    save_critic(res.metric, output, extra={"train_steps": res.steps,
                                           "stop_reason": res.stop_reason}, force=True)
    click.echo(f"{kind} critic: {res.message}")


def _train_deepsim(kind, images, labels, output, spacing, small, seed, quiet, extra,
                   device=None) -> None:
    from itreg import io
    from itreg.train.deepsim import DeepSimTrainConfig, train_deepsim

    mode = "seg" if kind == "deepsim-seg" else "ae"
    if any("," in v for v in images):
        raise ConfigError(f"--kind {kind} takes single images in --images, not pairs")
    if mode == "seg" and len(labels) != len(images):
        raise ConfigError(f"--kind deepsim-seg needs one --labels map per image; got "
                          f"{len(labels)} for {len(images)} images")
    if mode == "ae" and labels:
        raise ConfigError("--labels is only used by --kind deepsim-seg")
    dev = device or "cpu"
    imgs = [_resample(io.read_image(Path(v), is_label=False), spacing).to(dev) for v in images]
    labs = None
    if mode == "seg":
        labs = [_resample(io.read_image(p, is_label=True), spacing, label=True).to(dev)
                for p in labels]
    kwargs = {"mode": mode, "seed": seed, "progress": not quiet}
    cfg = _config(DeepSimTrainConfig, small, kwargs, extra)
    res = train_deepsim(imgs, labs, cfg, output=output, force=True)
    click.echo(f"DeepSim-{mode}: best validation loss {res.train['best_value']:.4g} after "
               f"{res.train['epochs']} epochs ({res.train['stop_reason']})")

"""``itreg presets list`` and ``itreg presets show NAME``: the shipped registration presets.

``show`` prints a preset's TOML (the format ``register --config FILE.toml`` and
``groupwise --config`` take), or writes it with ``-o`` as the start of a custom config.
"""

from __future__ import annotations

import click

from itreg.cli.app import app, standard_options


@app.group()
def presets() -> None:
    """List the shipped registration presets or show one as TOML."""


@presets.command("list")
@standard_options(output="file", output_required=False, seed=False, sets=False, compute=False,
                  output_help="Write the list to this file instead of printing it.")
def list_presets(output, force, quiet) -> None:
    """The names of the shipped presets, one per line."""
    from itreg.engine.config import available_presets

    _emit("\n".join(available_presets()) + "\n", output, force)


@presets.command("show")
@click.argument("name")
@standard_options(output="file", output_required=False, seed=False, compute=False,
                  output_help="Write the TOML to this file instead of printing it (edit it "
                              "and pass it to register --config).",
                  sets_help="Show the preset with a setting changed, e.g. --set metric.bins=64 "
                            "(repeatable).")
def show(name, output, force, quiet, sets) -> None:
    """Print preset NAME as TOML (with --set: the resolved settings)."""
    from itreg.cli.app import parse_sets
    from itreg.engine.config import load_preset, preset_text, to_toml

    overrides = parse_sets(sets)
    if overrides:
        text = to_toml(load_preset(name).with_overrides(overrides))
    else:
        text = preset_text(name)
    _emit(text, output, force)


def _emit(text: str, output, force: bool) -> None:
    if output is None:
        click.echo(text, nl=False)
        return
    from itreg import io

    with io.atomic_output_file(output, force=force) as tmp:
        tmp.write_text(text, encoding="utf-8")
    click.echo(f"wrote {output}", err=True)

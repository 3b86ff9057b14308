"""The root ``itreg`` command group and the error policy shared by all commands."""

from __future__ import annotations

import json
import logging
import sys
import traceback
from pathlib import Path

import click

from itreg.errors import ConfigError, ItregError, OutputExistsError

#: Path parameter type shared by every command.
PATH = click.Path(path_type=Path)


def refuse_existing(output: Path, what: str, force: bool) -> None:
    """Fail before any work when `output` exists and --force was not given (the atomic writers
    check again when they write).

    Raises:
        OutputExistsError: naming `what` (for example "output folder", "model file").
    """
    if output.exists() and not force:
        raise OutputExistsError(f"{what} '{output}' exists; use --force to overwrite it")


def parse_sets(values) -> dict:
    """``--set KEY=VALUE`` pairs; values are parsed as JSON where possible (numbers, lists)."""
    out = {}
    for item in values:
        if "=" not in item:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks of itreg errors.")
@click.option("--verbose", "-v", is_flag=True, help="Log progress details.")
@click.version_option(package_name="itreg")
def app(debug: bool, verbose: bool) -> None:
    """Information-theoretic and learned registration of medical images."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")


def main(argv=None) -> None:
    """Console entry point with itreg's error policy.

    Errors caused by input (:class:`itreg.errors.ItregError`) exit with code 2 and one line
    ``itreg: error: <message>`` on stderr (``--debug`` shows the traceback); usage errors exit 2
    with click's message; anything else is a bug and exits 1 with its traceback.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    try:
        app.main(args=args, prog_name="itreg", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except (click.exceptions.Abort, KeyboardInterrupt):
        sys.stderr.write("itreg: interrupted\n")
        sys.exit(130)
    except ItregError as exc:
        if debug:
            traceback.print_exc()
        sys.stderr.write(f"itreg: error: {exc}\n")
        sys.exit(2)

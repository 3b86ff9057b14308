"""The root ``itreg`` command group, the options every command shares, and the error policy.

Every command takes the same core options (:func:`standard_options`): ``-o/--output``,
``--force``, ``-q/--quiet``, ``-v/--verbose`` (anywhere on the line), ``--log FILE``,
``--seed``, ``--set KEY=VALUE`` and, where it computes, ``--threads`` and ``--device``.
Every error -- usage errors included -- is one line ``itreg: error: ...`` with exit code 2;
Ctrl-C exits 130 and SIGTERM 143, each with one line and no partial output.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import time
import traceback
from pathlib import Path

import click

from itreg.errors import ConfigError, ItregError

#: Path parameter type shared by every command.
PATH = click.Path(path_type=Path)

#: Seeds are stored by torch and numpy as unsigned 32- to 64-bit integers; 0 .. 2**32 - 1 fits
#: every generator itreg seeds.
MAX_SEED = 2 ** 32 - 1

#: ``--device`` values (``cuda:N`` for a given GPU).
DEVICE_HELP = "Device: cpu, cuda, cuda:N or auto (a GPU when one is available, else cpu)."


class Terminated(KeyboardInterrupt):
    """Raised in the main thread when the process receives SIGTERM.

    A KeyboardInterrupt, so every cleanup that handles Ctrl-C (atomic outputs, training
    checkpoints) handles SIGTERM too; the command line then exits 143 instead of 130.
    """


def parse_sets(values) -> dict:
    """``--set KEY=VALUE`` pairs; values are parsed as JSON where possible (numbers, lists)."""
    out = {}
    for item in values:
        if "=" not in item:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        key, raw = item.split("=", 1)
        if not key.strip():
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            out[key.strip()] = json.loads(raw)
        except json.JSONDecodeError:
            out[key.strip()] = raw
    return out


def expand_paths(values, what: str) -> list[Path]:
    """Repeated or comma-separated path options, with shell-style globs expanded (sorted).

    A glob that matches nothing is an error. A value that is not an existing path is split at
    commas (``a.nii.gz,b.nii.gz`` is two files).

    Raises:
        ConfigError: a pattern that matches no file.
    """
    import glob

    out: list[Path] = []
    for value in values:
        text = str(value)
        pieces = [text] if Path(text).exists() else [p for p in text.split(",") if p.strip()]
        for piece in pieces:
            piece = piece.strip()
            if glob.has_magic(piece):
                matches = sorted(glob.glob(piece))
                if not matches:
                    raise ConfigError(f"{what}: {piece!r} matches no file")
                out.extend(Path(m) for m in matches)
            else:
                out.append(Path(piece))
    return out


# --------------------------------------------------------------------------- logging

class _CliFormatter(logging.Formatter):
    """``itreg: warning: ...`` lines by default; timestamped lines with -v."""

    def __init__(self, verbose: bool) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s" if verbose
                         else "itreg: %(levelname)s: %(message)s", "%Y-%m-%d %H:%M:%S")
        self.verbose = verbose

    def format(self, record: logging.LogRecord) -> str:
        if not self.verbose:
            record = logging.makeLogRecord(record.__dict__)
            record.levelname = record.levelname.lower()
        return super().format(record)


def configure_logging(verbosity: int = 0, log_file: Path | None = None) -> None:
    """Logging for one command: warnings (``-v``: info, ``-vv``: debug) on stderr, and with
    `log_file` every info line with a timestamp in that file (appended)."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, "_itreg", False):
            root.removeHandler(handler)
            handler.close()
    level = logging.WARNING if verbosity <= 0 else logging.INFO if verbosity == 1 else \
        logging.DEBUG
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(_CliFormatter(verbosity > 0))
    console.setLevel(level)
    console._itreg = True  # type: ignore[attr-defined]
    root.addHandler(console)
    root.setLevel(min(level, logging.INFO if log_file is not None else level))
    if log_file is not None:
        try:
            fh = logging.FileHandler(log_file, mode="a", encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"--log {str(log_file)!r} cannot be written ({exc.strerror})") \
                from exc
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s",
                                          "%Y-%m-%d %H:%M:%S"))
        fh.setLevel(logging.INFO if verbosity <= 1 else logging.DEBUG)
        fh._itreg = True  # type: ignore[attr-defined]
        root.addHandler(fh)


def _logging_state(ctx: click.Context) -> dict:
    root = ctx.find_root()
    if root.obj is None:
        root.obj = {}
    return root.obj.setdefault("logging", {"verbosity": 0, "log": None})


def _on_verbose(ctx: click.Context, param: click.Parameter, value: int) -> None:
    state = _logging_state(ctx)
    state["verbosity"] += value or 0
    configure_logging(state["verbosity"], state["log"])


def _on_log(ctx: click.Context, param: click.Parameter, value: Path | None) -> None:
    if value is None:
        return
    state = _logging_state(ctx)
    state["log"] = value
    configure_logging(state["verbosity"], value)


def _verbose_option():
    return click.option("-v", "--verbose", count=True, expose_value=False, callback=_on_verbose,
                        help="Log details (-vv: debug); allowed anywhere on the line.")


# --------------------------------------------------------------------------- progress

class progress_callback:
    """``with progress_callback("landscape", enabled) as cb: work(progress=cb)``.

    `cb(done, total)` draws a live bar on a terminal and plain timestamped lines otherwise;
    None when disabled (``--quiet``).
    """

    def __init__(self, description: str, enabled: bool = True) -> None:
        self.description, self.enabled = description, enabled
        self._rich = None

    def __enter__(self):
        if not self.enabled:
            return None
        from rich.console import Console

        console = Console(stderr=True)
        if not console.is_terminal:
            from itreg.runtime import ProgressLines

            return ProgressLines(self.description, every_s=5.0)
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._rich = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                              MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                              console=console)
        self._rich.start()
        task = self._rich.add_task(self.description, total=None)

        def update(done: int, total: int) -> None:
            self._rich.update(task, completed=done, total=total)

        return update

    def __exit__(self, *exc) -> None:
        if self._rich is not None:
            self._rich.stop()


# --------------------------------------------------------------------------- shared options

def _seed_type():
    return click.IntRange(min=0, max=MAX_SEED)


def standard_options(*, output: str = "folder", output_required: bool = True,
                     output_help: str | None = None, seed: bool = True, sets: bool = True,
                     sets_help: str | None = None, compute: bool = True,
                     device: bool | None = None):
    """Decorate a command with the options every itreg command shares.

    Adds ``-o/--output`` (`output`: "folder" or "file"; `output_help` overrides its help),
    ``--force``, ``-q/--quiet``, ``-v/--verbose``, ``--log``; with `seed` ``--seed``; with
    `sets` ``--set KEY=VALUE`` (as the ``sets`` parameter); with `compute` ``--threads`` and
    ``--device`` (`device`=False: ``--threads`` only, for CPU-only computations). The command
    function receives ``output``, ``force``, ``quiet`` and the others that apply as keyword
    arguments.
    """
    what = "folder" if output == "folder" else "file"
    opts = [
        click.option("-o", "--output", type=PATH, required=output_required,
                     help=output_help or f"Output {what}."),
        click.option("--force", is_flag=True,
                     help="Replace itreg's earlier outputs there (other files are never "
                          "touched)." if output == "folder" else
                          "Replace an existing output file."),
        click.option("-q", "--quiet", is_flag=True, help="No progress bar or progress lines."),
        _verbose_option(),
        click.option("--log", type=PATH, default=None, expose_value=False, callback=_on_log,
                     help="Also write timestamped log lines to this file (appended)."),
    ]
    if seed:
        opts.append(click.option("--seed", type=_seed_type(), default=0, show_default=True,
                                 help=f"Seed of every random choice (0..{MAX_SEED})."))
    if sets:
        opts.append(click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
                                 help=sets_help or "Override a setting, e.g. --set "
                                                   "metric.bins=64 (repeatable)."))
    if compute:
        opts.append(click.option("--threads", type=click.IntRange(min=1), default=None,
                                 help="CPU threads (default: torch's default)."))
        if device is not False:
            opts.append(click.option("--device", default="auto", show_default=True,
                                     help=DEVICE_HELP))

    def decorate(f):
        for opt in reversed(opts):
            f = opt(f)
        return f

    return decorate


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show tracebacks of itreg errors.")
@_verbose_option()
@click.version_option(package_name="itreg")
def app(debug: bool) -> None:
    """Information-theoretic and learned registration of medical images.

    Every command takes -o/--output, --force, -q/--quiet, -v, --log, --seed and --set, and the
    commands that compute also --threads and --device. Errors are one line 'itreg: error: ...'
    with exit code 2.
    """


# --------------------------------------------------------------------------- entry point

def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in str(text).splitlines() if part.strip())


def _usage_line(exc: click.ClickException) -> str:
    message = _one_line(exc.format_message())
    ctx = getattr(exc, "ctx", None)
    if ctx is not None and ctx.command_path:
        name = ctx.command_path.replace("itreg", "", 1).strip()
        if name:
            return f"{name}: {message} (see 'itreg {name} --help')"
    return f"{message} (see 'itreg --help')"


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def run(argv=None) -> None:
    """Run the command line with itreg's error policy (see the module docstring)."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _raise_terminated)
    started = time.perf_counter()
    try:
        app.main(args=args, prog_name="itreg", standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.exceptions.Abort as exc:
        terminated = isinstance(exc.__cause__ or exc.__context__, Terminated)
        sys.stderr.write("itreg: terminated\n" if terminated else "itreg: interrupted\n")
        sys.exit(143 if terminated else 130)
    except click.ClickException as exc:
        sys.stderr.write(f"itreg: error: {_usage_line(exc)}\n")
        sys.exit(2)
    except Terminated:
        sys.stderr.write("itreg: terminated\n")
        sys.exit(143)
    except KeyboardInterrupt:
        sys.stderr.write("itreg: interrupted\n")
        sys.exit(130)
    except ItregError as exc:
        if debug:
            traceback.print_exc()
        sys.stderr.write(f"itreg: error: {_one_line(str(exc))}\n")
        sys.exit(2)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        logging.getLogger("itreg.cli").debug("command took %.2f s",
                                             time.perf_counter() - started)

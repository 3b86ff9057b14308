"""Run-time settings shared by the API, the training loops and the CLI.

:func:`limited_threads` sets torch's number of CPU threads for a block and restores it after,
so that a ``threads=`` option never changes the caller's setting (no hidden global state);
:func:`seeded` does the same for torch's global random generators (the one seeded-RNG context
of the package: registration, weight initialisation of networks and critics).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch

from itreg.errors import ConfigError

__all__ = ["DEVICE_NAMES", "ProgressLines", "limited_threads", "provenance", "resolve_device",
           "seeded"]


@contextlib.contextmanager
def seeded(seed: int, device: torch.device | str | None = None) -> Iterator[None]:
    """Seed torch's global CPU generator (and a CUDA `device`'s) inside the block and restore
    their states afterwards.

    Module constructors and metrics that draw from the global generators are then reproducible
    without changing the caller's random state.
    """
    device = torch.device("cpu" if device is None else device)
    devices = [device.index if device.index is not None else torch.cuda.current_device()] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(seed))
        yield


@contextlib.contextmanager
def limited_threads(threads: int | None) -> Iterator[None]:
    """Use `threads` CPU threads inside the block (None: leave the setting alone).

    Raises:
        ConfigError: `threads` is not a positive integer.
    """
    if threads is None:
        yield
        return
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ConfigError(f"threads must be a positive integer, got {threads!r}")
    before = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(before)


#: The ``device`` names :func:`resolve_device` accepts (``cuda:N`` picks a GPU).
DEVICE_NAMES = ("auto", "cpu", "cuda", "cuda:N", "mps")


def resolve_device(name: str | torch.device | None) -> torch.device:
    """The torch device a ``--device`` / ``device=`` value names.

    ``auto`` (or None) is the first CUDA GPU when torch sees one, else the CPU; ``cuda`` and
    ``cuda:N`` must exist.

    Raises:
        ConfigError: an unknown name, or a device that this machine or this torch build lacks
            (the message says which and suggests ``cpu``).
    """
    if isinstance(name, torch.device):
        name = str(name)
    text = "auto" if name is None else str(name).strip().lower()
    if text == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ConfigError("device 'mps' is not available on this machine; use --device cpu")
        return torch.device("mps")
    if text == "cuda" or text.startswith("cuda:"):
        index = 0
        if text != "cuda":
            suffix = text[len("cuda:"):]
            if not suffix.isdigit():
                raise ConfigError(f"device {name!r}: expected cuda:N with a GPU number N")
            index = int(suffix)
        if not torch.cuda.is_available():
            why = "this torch is built without CUDA" if torch.version.cuda is None else \
                "no CUDA GPU is visible"
            raise ConfigError(f"device {name!r} is not available ({why}); use --device cpu or "
                              "auto")
        count = torch.cuda.device_count()
        if index >= count:
            raise ConfigError(f"device {name!r} does not exist: {count} CUDA GPU"
                              f"{'s are' if count != 1 else ' is'} visible (cuda:0.."
                              f"cuda:{count - 1})")
        return torch.device("cuda", index)
    raise ConfigError(f"unknown device {name!r}; valid devices are: {', '.join(DEVICE_NAMES)}")


def provenance() -> dict:
    """What produced an output: itreg, torch, SimpleITK, numpy and Python versions, the
    command line and the time (UTC), for ``report.json`` and model files."""
    import datetime
    import platform
    import shlex
    import sys
    from importlib import metadata

    from itreg._version import __version__

    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    argv = list(sys.argv)
    if argv and argv[0].endswith(("/itreg", "\\itreg", "itreg.exe")):
        argv[0] = "itreg"
    return {
        "itreg": __version__,
        "torch": str(torch.__version__),
        "SimpleITK": version("SimpleITK"),
        "numpy": version("numpy"),
        "python": platform.python_version(),
        "command": shlex.join(argv),
        "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


class ProgressLines:
    """Progress as plain timestamped lines on stderr, for logs and batch jobs (off a terminal a
    live bar would be cut and redrawn): at most one line every `every_s` seconds, and the last.

    Use ``update(advance=1, loss=...)`` (training loops) or call it as ``lines(done, total)``
    (progress callbacks such as the landscape's).
    """

    def __init__(self, description: str, total: float | None = None,
                 every_s: float = 10.0) -> None:
        import time

        self.description, self.total, self.every_s = description, total, every_s
        self.done = 0.0
        self.start = time.monotonic()
        self.last = -math.inf

    def update(self, advance: float = 0.0, **fields) -> None:
        """Count `advance` and print a line with `fields` when one is due (or at the end)."""
        self.done += advance
        self._emit(fields)

    def __call__(self, done: float, total: float | None) -> None:
        self.done, self.total = done, total
        self._emit({})

    def _emit(self, fields: dict) -> None:
        import sys
        import time

        now = time.monotonic()
        finished = self.total is not None and self.done >= self.total
        if not finished and now - self.last < self.every_s:
            return
        self.last = now
        count = f"{self.done:.0f}" + (f"/{self.total:.0f}" if self.total is not None else "")
        parts = [count, *(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                          for k, v in fields.items()), f"({now - self.start:.1f} s)"]
        sys.stderr.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {self.description}: "
                         f"{' '.join(parts)}\n")
        sys.stderr.flush()

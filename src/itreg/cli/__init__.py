"""The ``itreg`` command line: thin commands over the Python API.

Each command family lives in its own module and registers itself on :data:`app` when imported
below; add a new family by adding its module to this list.
"""

from itreg.cli import landscape  # noqa: F401  (registers landscape)
from itreg.cli import pairwise  # noqa: F401  (registers register, apply, demo)
from itreg.cli import groupwise  # noqa: F401  (registers groupwise)
from itreg.cli import phantom, evaluate  # noqa: F401  (registers phantom, evaluate)
from itreg.cli import train  # noqa: F401  (registers train-metric)
from itreg.cli.app import app, main

__all__ = ["app", "main"]

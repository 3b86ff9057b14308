"""The ``itreg`` command line: thin commands over the Python API.

Each command family lives in its own module and registers itself on :data:`app` when imported
below; add a new family by adding its module to this list.
"""

from itreg.cli import (  # noqa: F401  (each module registers its commands on app)
    evaluate,
    groupwise,
    landscape,
    pairwise,
    phantom,
    train,
    trainnet,
)
from itreg.cli.app import app, main

__all__ = ["app", "main"]

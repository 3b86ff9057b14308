"""The ``itreg`` command line: thin commands over the Python API.

Each command family lives in its own module and registers itself on :data:`app` when imported
below; add a new family by adding its module to this list. These modules import only click at
load time (the heavy libraries are imported inside the commands), so ``itreg --help`` and usage
errors answer without loading torch.
"""

from itreg.cli import (  # noqa: F401  (each module registers its commands on app)
    batch,
    evaluate,
    groupwise,
    landscape,
    pairwise,
    phantom,
    presets,
    train_metric,
    train_net,
    transforms,
)
from itreg.cli.app import app, run

__all__ = ["app", "main"]


def main(argv=None) -> None:
    """Console entry point (see :func:`itreg.cli.app.run` for the error policy)."""
    run(argv)

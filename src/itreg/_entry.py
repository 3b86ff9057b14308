"""The ``itreg`` console script: imports the command line inside Ctrl-C handling, so an
interrupt during start-up exits 130 with one line instead of a traceback."""

from __future__ import annotations

import sys


def main(argv=None) -> None:
    try:
        from itreg.cli import main as cli_main
    except KeyboardInterrupt:
        sys.stderr.write("itreg: interrupted\n")
        sys.exit(130)
    cli_main(argv)


if __name__ == "__main__":  # pragma: no cover
    main()

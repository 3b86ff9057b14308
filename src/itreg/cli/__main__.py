"""``python -m itreg.cli``."""

from itreg.cli import main

main()

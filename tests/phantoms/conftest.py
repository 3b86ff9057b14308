"""Shared fixtures: the template, loaded once per session at a coarse spacing for speed."""

import pytest

from itreg.phantoms import load_mni


@pytest.fixture(scope="session")
def mni4():
    """The MNI tissue maps at 4 mm (read-only: tests must not modify them)."""
    return load_mni(4.0)

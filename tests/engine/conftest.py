"""Fixtures of the engine tests."""

from __future__ import annotations

import pytest

from itreg.grid import Grid


@pytest.fixture(scope="session")
def grid2d() -> Grid:
    return Grid((64, 64), (1.0, 1.0), (-10.0, 5.0))


@pytest.fixture(scope="session")
def grid3d() -> Grid:
    return Grid((32, 32, 32), (1.5, 1.5, 1.5), (3.0, -4.0, 10.0))


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test of this folder runs on one thread (tests/conftest.py)."""


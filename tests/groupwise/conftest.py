"""Fixtures of the groupwise tests (the group builders live in gw_data.py)."""

from __future__ import annotations

import pytest
from gw_data import make_group


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    """Every test of this folder runs on one thread (tests/conftest.py)."""


@pytest.fixture(scope="session")
def shifted_group():
    shifts = [(4.0, -3.0), (-3.0, 4.0), (1.0, 5.0)]
    images, truths = make_group(shifts=shifts)
    return images, truths

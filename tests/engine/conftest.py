"""Fixtures of the engine tests."""

from __future__ import annotations

import pytest
import torch

from itreg.grid import Grid


@pytest.fixture(scope="session")
def grid2d() -> Grid:
    return Grid((64, 64), (1.0, 1.0), (-10.0, 5.0))


@pytest.fixture(scope="session")
def grid3d() -> Grid:
    return Grid((32, 32, 32), (1.5, 1.5, 1.5), (3.0, -4.0, 10.0))


@pytest.fixture(autouse=True)
def _one_thread():
    """Tests run on one thread: 2 shared cores, many small tensors."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


"""Fixtures of the groupwise tests (the group builders live in gw_data.py)."""

from __future__ import annotations

import pytest
import torch
from gw_data import make_group


@pytest.fixture(autouse=True)
def _one_thread():
    """Tests run on one thread: 2 shared cores, many small tensors."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def shifted_group():
    shifts = [(4.0, -3.0), (-3.0, 4.0), (1.0, 5.0)]
    images, truths = make_group(shifts=shifts)
    return images, truths

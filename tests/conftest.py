"""Fixtures shared by every test folder (pytest finds them here; never import this module)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def one_thread():
    """Run a test on one torch thread (2 shared cores, many small tensors), restoring the
    caller's setting afterwards. Folders and modules opt in with ``usefixtures``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

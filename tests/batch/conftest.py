"""Fixtures of the batch tests: one real 2-process Dask LocalCluster shared by the module that
asks for it (starting one costs seconds), and a folder of tiny pairs."""

from __future__ import annotations

import pytest
from batch_data import write_pairs


@pytest.fixture(scope="module")
def dask_client():
    distributed = pytest.importorskip("distributed")
    import logging

    with (distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                   dashboard_address=None, silence_logs=logging.ERROR) as cluster,
          distributed.Client(cluster) as client):
        yield client


@pytest.fixture
def pairs(tmp_path):
    """Four tiny pairs in tmp_path/data with manifest rows (relative paths)."""
    return tmp_path / "data", write_pairs(tmp_path / "data", 4)

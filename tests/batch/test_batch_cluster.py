"""The worker processes of the embedded LocalCluster: glibc's malloc keeps its dynamic mmap
threshold (Dask's default ``MALLOC_TRIM_THRESHOLD_=65536`` turns it off, and a worker then
page-faults every large buffer it reallocates), each job runs at the job's torch threads, and
the caller's environment is the same after the run."""

from __future__ import annotations

import os
import platform
import resource
import subprocess
import sys

import pytest
from batch_data import FAST_SETS

from itreg.batch import ClusterSpec, run
from itreg.batch.cluster import WORKER_ENVIRON_EXPORT, open_client

ENV_KEYS = ("MALLOC_TRIM_THRESHOLD_", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
            "OPENBLAS_NUM_THREADS", "PYTHONHASHSEED")
#: Allocations of a 1 MiB buffer (over glibc's initial 128 KiB mmap threshold, under a 2 MiB
#: transparent huge page), each written in full, and the pages one of them spans.
ROUNDS, PAGES = 200, 2**20 // resource.getpagesize()


def reallocation_faults() -> int:
    """Minor page faults of this process over ROUNDS allocate-write-free cycles of 1 MiB."""
    import numpy as np

    np.ones(PAGES * resource.getpagesize() // 8)  # the first one may map fresh pages anyway
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(ROUNDS):
        np.ones(PAGES * resource.getpagesize() // 8)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.fixture
def clean_environ(monkeypatch):
    for key in ENV_KEYS:
        monkeypatch.delenv(key, raising=False)
    return {key: os.environ.get(key) for key in ENV_KEYS}


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc malloc behaviour")
def test_workers_reuse_freed_buffers_without_page_faults(clean_environ):
    # Control: with Dask's default setting a process faults every page of every buffer again.
    code = ("import sys; sys.path.insert(0, sys.argv[1]); "
            "from test_batch_cluster import reallocation_faults; print(reallocation_faults())")
    env = dict(os.environ, MALLOC_TRIM_THRESHOLD_="65536")
    out = subprocess.run([sys.executable, "-c", code, os.path.dirname(__file__)], env=env,
                         capture_output=True, text=True, check=True)
    assert int(out.stdout) >= ROUNDS * PAGES * 0.9

    # As after an earlier Dask cluster in this process: its nanny left the variable here.
    os.environ["MALLOC_TRIM_THRESHOLD_"] = "65536"
    with open_client(ClusterSpec(workers=1), job_threads=1) as client:
        (faults,) = client.run(reallocation_faults).values()
        (environ,) = client.run(lambda: {k: os.environ.get(k) for k in ENV_KEYS}).values()
    assert faults < ROUNDS * PAGES * 0.1
    assert environ["MALLOC_TRIM_THRESHOLD_"] is None
    assert environ["OMP_NUM_THREADS"] == environ["MKL_NUM_THREADS"] == "1"
    assert {k: os.environ.get(k) for k in ENV_KEYS} == dict(clean_environ,
                                                            MALLOC_TRIM_THRESHOLD_="65536")


def test_jobs_run_at_their_threads_on_the_embedded_cluster(pairs, tmp_path, clean_environ):
    data, rows = pairs
    jobs = [dict(r, fixed=str(data / r["fixed"]), moving=str(data / r["moving"]),
                 transform="translation", **FAST_SETS) for r in rows[:2]]
    for threads in (2, 1):
        result = run(jobs, output=tmp_path / f"out{threads}", threads=threads, device="cpu",
                     cluster=ClusterSpec(workers=1), progress=False, thumbnails=False)
        assert result.exit_code == 0
        for record in result.records:
            assert record["torch_threads"] == threads
            assert record["malloc_trim_threshold"] is None
    assert {k: os.environ.get(k) for k in ENV_KEYS} == clean_environ


def test_the_shell_line_for_other_workers_unsets_the_threshold_in_dask(clean_environ):
    # What a nanny started after the line (a dask-jobqueue batch job) sets before its worker.
    code = ("from distributed.nanny import _get_env_variables; "
            "print(sorted(_get_env_variables('distributed.nanny.pre-spawn-environ')))")
    out = subprocess.run(["bash", "-c", f"{WORKER_ENVIRON_EXPORT}; {sys.executable} -c \"{code}\""],
                         capture_output=True, text=True, check=True).stdout
    assert "MALLOC_TRIM_THRESHOLD_" not in out and "OMP_NUM_THREADS" in out
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert "MALLOC_TRIM_THRESHOLD_" in out  # Dask's default, without the line

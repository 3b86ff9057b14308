"""Where batch jobs run: a Dask ``distributed`` client on an embedded ``LocalCluster`` (the
default), an existing scheduler (``--scheduler tcp://host:8786``), or a SLURM/PBS/SGE cluster
started through ``dask-jobqueue`` (``--cluster slurm``). Dask does all scheduling, rescheduling
after a lost worker, and memory limits; itreg only submits one task per job.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from itreg.errors import ConfigError

logger = logging.getLogger(__name__)

#: ``--cluster`` names and their dask-jobqueue classes.
JOBQUEUE = {"slurm": "SLURMCluster", "pbs": "PBSCluster", "sge": "SGECluster"}
#: Memory assumed per worker when sizing a LocalCluster to the machine.
MEMORY_PER_WORKER = 2 * 1024**3


@dataclass(frozen=True)
class ClusterSpec:
    """How to get a Dask client (see the module docstring).

    Attributes:
        workers: LocalCluster worker processes (default: sized to the CPUs and memory, or one
            per GPU with ``device="cuda"``).
        threads_per_worker: jobs a worker process runs at once.
        memory_limit: per worker process (``"4GB"``, bytes, or ``"auto"`` = RAM / workers);
            Dask restarts a worker above it and reschedules its job.
        scheduler: address of an existing scheduler.
        cluster: ``slurm``, ``pbs`` or ``sge``; `cluster_sets` are the dask-jobqueue class's
            keyword arguments (``queue``, ``account``, ``cores``, ``memory``, ``walltime``,
            ``job_extra_directives``, ...) and `cluster_jobs` the number of batch-system jobs.
        dashboard: serve the Dask dashboard (LocalCluster; needs bokeh).
    """

    workers: int | None = None
    threads_per_worker: int = 1
    memory_limit: str | int = "auto"
    scheduler: str | None = None
    cluster: str | None = None
    cluster_sets: Mapping[str, Any] = field(default_factory=dict)
    cluster_jobs: int = 4
    device: str = "cpu"
    dashboard: bool = False


def machine_cpus() -> int:
    from dask.system import CPU_COUNT

    return max(1, int(CPU_COUNT))


def default_workers(spec: ClusterSpec) -> int:
    """Worker processes for a LocalCluster: one per GPU with ``cuda``; else as many as CPUs
    allow (``cpus // threads_per_worker``), at most one per 2 GiB of memory."""
    if spec.workers is not None:
        return spec.workers
    if spec.device in ("cuda", "auto"):
        import torch

        if torch.cuda.is_available():
            return torch.cuda.device_count()
    from distributed.system import MEMORY_LIMIT

    by_cpu = max(1, machine_cpus() // max(1, spec.threads_per_worker))
    by_memory = max(1, int(MEMORY_LIMIT) // MEMORY_PER_WORKER)
    return max(1, min(by_cpu, by_memory))


def check_spec(spec: ClusterSpec) -> None:
    """ConfigError for options that cannot work, before any output is created."""
    if spec.scheduler and spec.cluster:
        raise ConfigError("--scheduler and --cluster exclude each other: give one")
    if spec.threads_per_worker < 1 or (spec.workers is not None and spec.workers < 1):
        raise ConfigError("--workers and --threads-per-worker must be at least 1")
    if spec.cluster:
        _jobqueue(spec.cluster)


def _jobqueue(name: str):
    if name not in JOBQUEUE:
        raise ConfigError(f"unknown --cluster {name!r}; valid clusters are "
                          f"{', '.join(JOBQUEUE)}")
    try:
        import dask_jobqueue
    except ImportError:
        raise ConfigError(f"--cluster {name} needs dask-jobqueue: pip install 'itreg[cluster]' "
                          "(or pip install dask-jobqueue)") from None
    return getattr(dask_jobqueue, JOBQUEUE[name])


def jobqueue_cluster(name: str, sets: Mapping[str, Any]):
    """A dask-jobqueue cluster object (no batch jobs submitted until it is scaled).

    Raises:
        ConfigError: unknown cluster name, dask-jobqueue missing (with how to install it), or
            keyword arguments the class refuses.
    """
    cls = _jobqueue(name)
    kwargs = {"cores": 1, "memory": "4GB", "processes": 1, **dict(sets)}
    # The batch jobs' workers read this Dask setting from their environment (see
    # worker_environ); a user's own prologue lines come after it.
    kwargs["job_script_prologue"] = [WORKER_ENVIRON_EXPORT,
                                     *(kwargs.get("job_script_prologue") or [])]
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"--cluster {name}: {exc} (check the --cluster-set values)") from None


@contextlib.contextmanager
def open_client(spec: ClusterSpec, client=None, job_threads: int | None = None) -> Iterator[Any]:
    """Yield a ``distributed.Client``: `client` itself if given (left open), else one made from
    `spec` and closed (with its cluster) on exit. A LocalCluster's workers start with
    :func:`worker_environ` (`job_threads`: the torch threads of each job)."""
    if client is not None:
        yield client
        return
    from distributed import Client

    check_spec(spec)
    if spec.scheduler:
        try:
            client = Client(spec.scheduler, timeout="20s")
        except (OSError, TimeoutError) as exc:
            raise ConfigError(f"cannot reach the Dask scheduler at '{spec.scheduler}': {exc}; "
                              "start one with 'dask scheduler' and 'dask worker ADDRESS', or "
                              "leave --scheduler out to run on this machine") from None
        with client:
            yield client
        return
    if spec.cluster:
        cluster = jobqueue_cluster(spec.cluster, spec.cluster_sets)
        with cluster:
            cluster.scale(jobs=spec.cluster_jobs)
            with Client(cluster) as client:
                logger.info("submitted %d %s jobs:\n%s", spec.cluster_jobs, spec.cluster,
                            cluster.job_script())
                yield client
        return
    import dask
    from distributed import LocalCluster

    environ = worker_environ(job_threads)
    try:
        with dask.config.set({"distributed.nanny.pre-spawn-environ": environ}), \
                _restored_environ(environ):
            cluster = LocalCluster(
                n_workers=default_workers(spec), threads_per_worker=spec.threads_per_worker,
                processes=True, memory_limit=spec.memory_limit,
                # The scheduler serves HTTP (health, metrics) even without the dashboard: a
                # free port, so a second Dask on this machine does not warn about 8787.
                dashboard_address=":0", scheduler_kwargs={"dashboard": spec.dashboard},
                silence_logs=logging.ERROR)
    except ValueError as exc:
        raise ConfigError(f"cannot start the local Dask cluster: {exc} (check --memory-limit, "
                          "e.g. 4GB)") from None
    # A worker the nanny restarts (memory limit, crash) gets the same environment again.
    with cluster, Client(cluster) as client, _restored_environ(environ):
        yield client


#: A shell line that gives ``dask worker`` processes started after it (a dask-jobqueue batch
#: job, or a worker started by hand for ``--scheduler``) the malloc setting of
#: :func:`worker_environ`; Dask merges it into its default ``pre-spawn-environ``.
WORKER_ENVIRON_EXPORT = ("export DASK_DISTRIBUTED__NANNY__PRE_SPAWN_ENVIRON="
                         "\"{'MALLOC_TRIM_THRESHOLD_': None}\"")


def worker_environ(job_threads: int | None) -> dict[str, str | None]:
    """The environment a LocalCluster's nanny sets before it starts each worker process
    (Dask's ``distributed.nanny.pre-spawn-environ``), replacing Dask's default.

    Dask sets ``MALLOC_TRIM_THRESHOLD_=65536`` there, so that workers hand freed memory back to
    the OS. Setting any glibc malloc threshold also turns off glibc's dynamic mmap threshold:
    every buffer over 128 KiB is then mapped and unmapped on each allocation, and a
    registration, which frees and reallocates the same large tensors every iteration,
    page-faults them in again each time (a 2 mm bspline job: 1.3 M minor faults and about 30 %
    more CPU than in an ``itreg register`` process). Here the variable is unset in the workers
    (also when this process has it, e.g. from an earlier Dask cluster) and the BLAS/OpenMP
    thread variables
    are the job's torch threads (Dask's default is 1), for the work a job does outside torch's
    own setting.
    """
    threads = None if job_threads is None else str(int(job_threads))
    return {"MALLOC_TRIM_THRESHOLD_": None, "OMP_NUM_THREADS": threads,
            "MKL_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads}


@contextlib.contextmanager
def _restored_environ(environ: Mapping[str, str | None]) -> Iterator[None]:
    """Restore this process's values of `environ`'s keys (and ``PYTHONHASHSEED``, which the
    nanny adds) on exit: Dask's nanny writes the pre-spawn environment into the process that
    starts the workers, and a caller of :func:`itreg.batch.run` must not find its own
    environment changed afterwards. Keys whose value is None are removed meanwhile: a worker
    inherits this process's environment, which an earlier Dask cluster in this process may
    have given ``MALLOC_TRIM_THRESHOLD_``."""
    before = {key: os.environ.get(key) for key in [*environ, "PYTHONHASHSEED"]}
    for key, value in environ.items():
        if value is None:
            os.environ.pop(key, None)
    try:
        yield
    finally:
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value

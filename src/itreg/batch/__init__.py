"""Many registrations at once: ``itreg batch JOBS.csv -o OUTROOT`` and :func:`run`.

Jobs come from a CSV manifest (:mod:`itreg.batch.manifest`), run as one Dask ``distributed``
task each (:mod:`itreg.batch.cluster`: an embedded ``LocalCluster`` by default, an existing
scheduler, or SLURM/PBS/SGE through dask-jobqueue), write ``OUTROOT/<id>/`` exactly as
``itreg register`` / ``itreg groupwise`` do (:mod:`itreg.batch.jobs`), and are recorded in a
ledger (:mod:`itreg.batch.ledger`) so a rerun skips finished jobs. ``summary.csv`` and a
self-contained ``summary.html`` with checkerboard thumbnails close each run
(:mod:`itreg.batch.summary`).

Example:
    >>> from itreg.batch import run
    >>> result = run("jobs.csv", output="out")                         # doctest: +SKIP
    >>> result.exit_code, [r["error"] for r in result.failed]          # doctest: +SKIP
"""

from itreg.batch.cluster import ClusterSpec
from itreg.batch.manifest import Defaults, Job, read_manifest
from itreg.batch.run import BatchResult, load_jobs, run

__all__ = ["BatchResult", "ClusterSpec", "Defaults", "Job", "load_jobs", "read_manifest", "run"]

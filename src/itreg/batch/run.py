"""Run a batch of registration jobs through Dask distributed: :func:`run`.

Plan (before anything runs): a job whose ``OUTROOT/<id>/report.json`` matches it is finished
and skipped; a job that failed in an earlier run with the same settings is skipped unless
`retry_failed`; every other job becomes one Dask task. Dask schedules the tasks, restarts a
worker that dies or exceeds its memory limit and reschedules its job; each job's output is
written atomically, so a rescheduled job starts clean. Results reach the client as they end and
are appended to the ledger at once; ``summary.csv`` and ``summary.html`` are written at the end
(also after Ctrl-C).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from itreg.batch.cluster import ClusterSpec, check_spec, default_workers, machine_cpus, open_client
from itreg.batch.jobs import JobOptions, finished_state, run_job
from itreg.batch.ledger import Ledger, read_ledger
from itreg.batch.manifest import Defaults, Job, jobs_from_rows, read_manifest
from itreg.batch.summary import write_csv, write_html
from itreg.errors import ConfigError, OutputExistsError

logger = logging.getLogger(__name__)

#: Folder in OUTROOT where the batch caches its thumbnails.
CACHE = ".itreg-batch"


@dataclass
class BatchResult:
    """The outcome of :func:`run`: one record per job in manifest order.

    Each record has ``status`` (``done``, ``failed``, ``interrupted``), ``ran`` (``this run``
    or ``earlier``), the times, metric and error fields of :func:`itreg.batch.jobs.run_job`.
    """

    output: Path
    records: list[dict[str, Any]]
    wall_s: float
    interrupted: bool = False
    counts: dict[str, int] = field(default_factory=dict)

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [r for r in self.records if r["status"] == "failed"]

    @property
    def exit_code(self) -> int:
        """0 when every job is done, 3 when some failed, 130 after an interruption."""
        if self.interrupted:
            return 130
        return 3 if any(r["status"] != "done" for r in self.records) else 0

    def describe(self) -> str:
        done = [r for r in self.records if r["status"] == "done"]
        now = sum(r["ran"] == "this run" for r in done)
        text = (f"{len(done)} of {len(self.records)} jobs done ({now} this run, "
                f"{len(done) - now} earlier)")
        if self.failed:
            earlier = sum(r["ran"] == "earlier" for r in self.failed)
            text += f", {len(self.failed)} failed"
            if earlier:
                text += f" ({earlier} in an earlier run; --retry-failed reruns them)"
        rest = len(self.records) - len(done) - len(self.failed)
        if rest:
            text += f", {rest} not finished"
        return text + f" in {self.wall_s:.1f} s"


def load_jobs(jobs: str | os.PathLike | Iterable[Mapping[str, Any] | Job],
              defaults: Defaults | None = None) -> list[Job]:
    """Jobs from a manifest path, or from dicts / :class:`Job` objects (checked alike)."""
    if isinstance(jobs, (str, os.PathLike)):
        return read_manifest(jobs, defaults)
    return jobs_from_rows(jobs, defaults=defaults)


def run(jobs: str | os.PathLike | Iterable[Mapping[str, Any] | Job], client=None, *,
        output: str | os.PathLike, force: bool = False, retry_failed: bool = False,
        threads: int | None = None, device: str = "auto", cluster: ClusterSpec | None = None,
        defaults: Defaults | None = None, progress: bool | None = None, thumbnails: bool = True,
        echo: Callable[[str], None] | None = None) -> BatchResult:
    """Run every job of a manifest through Dask and write ``output/<id>/`` for each.

    Args:
        jobs: a manifest CSV path (see :mod:`itreg.batch.manifest`), or dicts with its columns,
            or :class:`~itreg.batch.manifest.Job` objects.
        client: a ``distributed.Client`` to submit to (left open); default: one made from
            `cluster` (an embedded ``LocalCluster`` sized to the machine unless it says other).
        output: OUTROOT; created if missing; a rerun into it skips finished jobs.
        force: rerun every job, overwriting its output folder.
        retry_failed: rerun jobs that failed in an earlier run (otherwise they are reported
            as failed again without running).
        threads: torch threads per job (default: the CPUs divided among the concurrent jobs of
            a LocalCluster; 1 on an existing scheduler or batch cluster).
        device: ``cpu``, ``cuda`` (each worker uses one GPU), ``cuda:N`` or ``auto`` (a GPU
            where the worker sees one).
        cluster: how to get a client when `client` is None.
        defaults: values for manifest cells left empty (the CLI's ``--transform`` etc.).
        progress: show a live bar (terminal) or one line per job (otherwise); default: on.
        thumbnails: render checkerboard thumbnails for summary.html.
        echo: where progress lines go (default: stderr).

    Returns:
        The :class:`BatchResult` (``exit_code`` 0 or 3).

    Raises:
        ConfigError: a bad manifest or bad options, before any job runs.
        OutputExistsError: `output` is a file, or another batch is writing into it.
        KeyboardInterrupt: after Ctrl-C, once finished jobs are in the ledger and the
            summaries are written.
    """
    t0 = time.perf_counter()
    job_list = load_jobs(jobs, defaults)
    device = str(device).strip().lower()
    if device not in ("cpu", "cuda", "auto", "mps") and not re.fullmatch(r"cuda:\d+", device):
        raise ConfigError(f"unknown device {device!r}; valid devices are cpu, cuda, cuda:N, "
                          "auto (workers resolve it: each uses one GPU)")
    spec = cluster or ClusterSpec(device=device)
    if client is None:
        check_spec(spec)
    outroot = Path(output).absolute()
    if outroot.exists() and not outroot.is_dir():
        raise OutputExistsError(f"output '{outroot}' is a file; itreg batch needs a folder")
    outroot.mkdir(parents=True, exist_ok=True)
    echo = echo or (lambda line: print(line, file=sys.stderr, flush=True))
    records: dict[str, dict[str, Any]] = {}
    thumbs = ThumbnailCache(outroot)
    with Ledger(outroot) as ledger:
        earlier = read_ledger(outroot)
        to_run = []
        for job in job_list:
            planned = plan_job(job, outroot, earlier.get(job.id), force, retry_failed)
            if planned is None:
                to_run.append(job)
            else:
                records[job.id] = planned
        interrupted = False
        if to_run:
            if threads is None:
                threads = _default_threads(spec, client)
            options = JobOptions(force=force, threads=threads, device=device,
                                 thumbnails=thumbnails)
            ledger.write({"event": "run", "jobs": len(job_list), "to_run": len(to_run),
                          "skipped": len(job_list) - len(to_run), "output": str(outroot),
                          "argv": sys.argv, "threads": threads, "device": device})
            view = ProgressView(len(to_run), len(job_list) - len(to_run), echo,
                                enabled=True if progress is None else progress)
            try:
                with open_client(spec, client, job_threads=threads) as dask_client:
                    if spec.dashboard and getattr(dask_client, "dashboard_link", None):
                        echo(f"Dask dashboard: {dask_client.dashboard_link}")
                    _submit_and_collect(dask_client, to_run, outroot, options, ledger, thumbs,
                                        records, view)
            except KeyboardInterrupt:
                interrupted = True
            finally:
                view.close()
            for job in to_run:
                if job.id not in records:
                    records[job.id] = {"id": job.id, "kind": job.kind, "status": "interrupted",
                                       "ran": "this run", "fingerprint": job.fingerprint()}
                    if interrupted:
                        ledger.job(records[job.id])
    _warn_malloc(records[job.id] for job in to_run if job.id in records)
    ordered = [dict(records[job.id], output=f"{job.id}/") for job in job_list]
    if thumbnails:
        for job in job_list:
            if records[job.id]["status"] == "done":
                thumbs.ensure(job)
    write_csv(ordered, outroot / "summary.csv")
    write_html(ordered, outroot / "summary.html", thumbnails=thumbs.load_all(job_list),
               title=f"itreg batch: {outroot.name}")
    result = BatchResult(outroot, ordered, time.perf_counter() - t0, interrupted)
    for r in ordered:
        result.counts[r["status"]] = result.counts.get(r["status"], 0) + 1
    if interrupted:
        raise KeyboardInterrupt
    return result


def _default_threads(spec: ClusterSpec, client) -> int:
    if client is not None or spec.scheduler or spec.cluster:
        return 1
    workers = default_workers(spec)
    return max(1, machine_cpus() // (workers * spec.threads_per_worker))


def _warn_malloc(records: Iterable[dict[str, Any]]) -> None:
    """Say once when jobs ran in workers with Dask's default ``MALLOC_TRIM_THRESHOLD_``
    (an existing scheduler's workers): it costs a registration about a third more CPU."""
    values = {r.get("malloc_trim_threshold") for r in records} - {None}
    if values:
        from itreg.batch.cluster import WORKER_ENVIRON_EXPORT

        logger.warning(
            "the Dask workers ran with MALLOC_TRIM_THRESHOLD_=%s (Dask's default), which makes "
            "registration jobs page-fault their buffers again each iteration (about 30 %% more "
            "CPU); start the workers after: %s", ", ".join(sorted(values)),
            WORKER_ENVIRON_EXPORT)


def plan_job(job: Job, outroot: Path, earlier: dict | None, force: bool,
          retry_failed: bool) -> dict[str, Any] | None:
    """The record of a job that need not run, or None to run it."""
    if force:
        return None
    same = earlier is not None and earlier.get("fingerprint") == job.fingerprint()
    if finished_state(job, outroot) == "done":
        if same and earlier.get("status") == "done":
            record = dict(earlier)
        else:
            from itreg.batch.jobs import report_fields

            record = {"id": job.id, "kind": job.kind, "fingerprint": job.fingerprint(),
                      **report_fields(outroot / job.id / "report.json")}
            record["error"] = None
        record.update(status="done", ran="earlier")
        record.pop("event", None)
        record.pop("time", None)
        return record
    if same and earlier.get("status") == "failed" and not retry_failed:
        record = dict(earlier, status="failed", ran="earlier")
        record.pop("event", None)
        record.pop("time", None)
        return record
    return None


def _submit_and_collect(client, to_run: list[Job], outroot: Path, options: JobOptions,
                        ledger: Ledger, thumbs: ThumbnailCache,
                        records: dict[str, dict[str, Any]], view: ProgressView) -> None:
    token = uuid.uuid4().hex[:8]
    futures = {}
    for job in to_run:
        future = client.submit(run_job, job, str(outroot), options, pure=False,
                               key=f"itreg-batch-{job.id}-{token}")
        futures[future] = job
    pending = set(futures)
    keys = {f.key for f in futures}
    last_running = 0.0
    try:
        while pending:
            finished = [f for f in pending if f.done()]
            for future in finished:
                pending.discard(future)
                job = futures[future]
                record = _collect(future, job)
                record["ran"] = "this run"
                png = record.pop("thumbnail", None)
                if png:
                    thumbs.store(job.id, png)
                ledger.job(record)
                records[job.id] = record
                view.job_done(record)
                future.release()
            now = time.monotonic()
            if pending and now - last_running > 1.0:
                last_running = now
                view.running(_running(client, keys))
            if not finished:
                time.sleep(0.1)
    finally:
        if pending:
            client.cancel(list(pending))


def _running(client, keys: set) -> int:
    try:
        processing = client.processing()
    except Exception:  # noqa: BLE001  (the count is cosmetic; never fail the batch over it)
        return 0
    return sum(1 for tasks in processing.values() for k in tasks if k in keys)


def _collect(future, job: Job) -> dict[str, Any]:
    """The record of a finished future; a task that could not finish becomes a failed job."""
    base = {"id": job.id, "kind": job.kind, "fingerprint": job.fingerprint(),
            "status": "failed", "error": None}
    if future.status == "finished":
        return future.result()
    if future.status == "cancelled":
        return dict(base, error="the Dask cluster cancelled this job (was the scheduler "
                                "restarted?); run the batch again to redo it")
    exc = future.exception()
    from distributed import KilledWorker

    if isinstance(exc, KilledWorker):
        return dict(base, error="the worker running this job died each time it was tried "
                                "(out of memory? raise --memory-limit or lower "
                                "--threads-per-worker); other jobs went on")
    return dict(base, error=f"{type(exc).__name__}: {exc}".splitlines()[0])


class ThumbnailCache:
    """Checkerboard PNGs in ``OUTROOT/.itreg-batch/thumbnails/<id>.png`` so a rerun's
    summary shows jobs finished earlier."""

    def __init__(self, outroot: Path) -> None:
        self.folder = outroot / CACHE / "thumbnails"

    def path(self, job_id: str) -> Path:
        return self.folder / f"{job_id}.png"

    def store(self, job_id: str, png: bytes) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        target = self.path(job_id)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        tmp.write_bytes(png)
        os.replace(tmp, target)

    def ensure(self, job: Job) -> None:
        """Render a finished job's thumbnail from its files if none is cached."""
        path = self.path(job.id)
        report = path.parent.parent.parent / job.id / "report.json"
        if path.exists() and path.stat().st_mtime >= report.stat().st_mtime:
            return
        from itreg import io
        from itreg.batch.thumbnails import checkerboard_png

        folder = report.parent
        try:
            if job.kind == "pair":
                a = io.read_image(job.fixed, is_label=False)
                b = io.read_image(folder / "warped.nii.gz", is_label=False)
            else:
                a = io.read_image(folder / "0" / "warped.nii.gz", is_label=False)
                b = io.read_image(folder / "1" / "warped.nii.gz", is_label=False)
        except Exception as exc:  # noqa: BLE001  (a summary without this picture is fine)
            logger.warning("no thumbnail for job %s: %s", job.id, exc)
            return
        png = checkerboard_png(a, b)
        if png:
            self.store(job.id, png)

    def load_all(self, jobs: Iterable[Job]) -> dict[str, bytes]:
        out = {}
        for job in jobs:
            path = self.path(job.id)
            if path.exists():
                out[job.id] = path.read_bytes()
        return out


class ProgressView:
    """A live bar over jobs on a terminal (done / failed / running, ETA), else one plain line
    per finished job; nothing when disabled."""

    def __init__(self, total: int, skipped: int, echo: Callable[[str], None],
                 enabled: bool = True) -> None:
        self.total, self.skipped, self.echo, self.enabled = total, skipped, echo, enabled
        self.done = self.failed = self.running_now = 0
        self._bar = None
        if skipped and enabled:
            echo(f"{skipped} job(s) finished or failed earlier are skipped; running {total}")
        if enabled and sys.stderr.isatty():
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            self._bar = Progress(TextColumn("jobs"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[detail]}"), TimeElapsedColumn(),
                                 TextColumn("ETA"), TimeRemainingColumn(),
                                 console=Console(stderr=True), transient=False)
            self._task = self._bar.add_task("jobs", total=total, detail=self._detail())
            self._bar.start()

    def _detail(self) -> str:
        return f"done {self.done}  failed {self.failed}  running {self.running_now}"

    def running(self, count: int) -> None:
        self.running_now = count
        if self._bar is not None:
            self._bar.update(self._task, detail=self._detail())

    def job_done(self, record: dict[str, Any]) -> None:
        if record["status"] == "done":
            self.done += 1
        else:
            self.failed += 1
        self.running_now = max(0, self.running_now - 1)
        if self._bar is not None:
            self._bar.update(self._task, advance=1, detail=self._detail())
        elif self.enabled:
            n = self.done + self.failed
            if record["status"] == "done":
                self.echo(f"[{n}/{self.total}] done {record['id']} "
                          f"({record.get('job_s') or 0:.1f} s)")
            else:
                self.echo(f"[{n}/{self.total}] FAILED {record['id']}: {record.get('error')}")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None

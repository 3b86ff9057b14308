"""One batch job: the task a Dask worker runs, and the check that a job is already finished.

A pair job calls exactly what ``itreg register`` calls (:func:`itreg.api.register` then
:func:`itreg.results.save_registration`), a group job what ``itreg groupwise`` calls
(:func:`itreg.groupwise.register_group` then :func:`~itreg.groupwise.save_group`), so
``OUTROOT/<id>/`` holds the same files, written atomically, with the same ``report.json``.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import socket
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from itreg.batch.manifest import Job, group_settings, pair_config
from itreg.errors import ItregError, OutputExistsError

#: File a pair job with ``moving_labels`` writes beside the registration's outputs.
LABELS_FILE = "warped_labels.nii.gz"


@dataclass(frozen=True)
class JobOptions:
    """Settings shared by every job of a run (not part of a job's identity)."""

    force: bool = False
    threads: int | None = None
    device: str = "cpu"
    thumbnails: bool = True


def report_path(job: Job, outroot: str | os.PathLike) -> Path:
    return Path(outroot) / job.id / "report.json"


def pair_inputs(job: Job) -> dict[str, Any]:
    """The ``inputs`` a pair job records in its report (those of ``itreg register``)."""
    return {"fixed": job.fixed, "moving": job.moving, "fixed_mask": job.fixed_mask,
            "moving_mask": job.moving_mask, "config": job.config, "net": None,
            "init": job.init}


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def finished_state(job: Job, outroot: str | os.PathLike) -> str:
    """Whether `job`'s outputs are complete and match it.

    Returns:
        ``"done"`` (report.json exists, records the job's inputs and settings, and is newer
        than every input file), ``"labels"`` (done except ``warped_labels.nii.gz``),
        ``"absent"`` (no output folder) or ``"stale"`` (an output folder that does not match).
    """
    folder = Path(outroot) / job.id
    if not folder.exists():
        return "absent"
    path = folder / "report.json"
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
        written = path.stat().st_mtime
    except (OSError, ValueError):
        return "stale"
    try:
        if not _report_matches(job, report):
            return "stale"
        for f in job.inputs:
            if os.stat(f).st_mtime > written:
                return "stale"
    except (OSError, ItregError, KeyError, TypeError, ValueError):
        return "stale"
    if job.kind == "pair" and job.moving_labels:
        labels = folder / LABELS_FILE
        if not labels.exists() or labels.stat().st_mtime < written:
            return "labels"
    return "done"


def _report_matches(job: Job, report: dict) -> bool:
    if job.kind == "pair":
        expected = {k: str(v) for k, v in pair_inputs(job).items() if v is not None}
        return (report.get("inputs") == expected
                and report.get("config") == _jsonable(pair_config(job).to_dict())
                and report.get("settings", {}).get("seed") == job.seed)
    from itreg.groupwise.coreg import default_stages

    kwargs = group_settings(job)
    settings = report.get("settings", {})
    stages = [s.as_dict() for s in default_stages(kwargs["transform"],
                                                  int(kwargs.get("iterations", 100)))]
    metric = settings.get("metric", {})
    return (report.get("inputs") == list(job.images)
            and settings.get("transform") == kwargs["transform"]
            and metric.get("name") == kwargs["metric"]
            and settings.get("seed") == job.seed
            and settings.get("reference") == kwargs.get("reference")
            and settings.get("normalize") == kwargs.get("normalize", "zscore")
            and settings.get("bias_correction") == kwargs.get("bias_correction", "none")
            and settings.get("stages") == _jsonable(stages)
            and all(metric.get(k) == v for k, v in kwargs.items() if k in metric))


def _device(name: str):
    """The torch device of this worker's job. With ``cuda`` (or ``auto`` on a GPU machine)
    each worker uses one GPU: a LocalCluster worker named ``i`` uses GPU ``i`` modulo the
    visible GPUs."""
    import torch

    from itreg.runtime import resolve_device

    device = resolve_device(name)
    if device.type != "cuda" or device.index is not None or torch.cuda.device_count() < 2:
        return device
    try:
        from distributed import get_worker

        worker_name = str(get_worker().name)
    except (ImportError, ValueError):
        return device
    index = int(worker_name) if worker_name.isdigit() else sum(map(ord, worker_name))
    return torch.device("cuda", index % torch.cuda.device_count())


def _protect(job: Job) -> list[str]:
    """Paths the job's output may never overwrite (its inputs)."""
    return list(job.inputs)


def run_job(job: Job, outroot: str, options: JobOptions) -> dict[str, Any]:
    """Run one job and write ``OUTROOT/<id>/``; never raises for a failed job.

    Returns:
        A record: ``id``, ``status`` (``done`` or ``failed``), ``error`` (one line), times
        (``started``, ``finished`` as Unix times, ``job_s``, ``registration_s``),
        ``final_metric`` and ``quantity``, ``stop_reasons``, ``host`` and ``pid`` of the worker
        process, ``torch_threads`` and ``malloc_trim_threshold`` as the job saw them, and
        ``thumbnail`` (PNG bytes of a checkerboard, or None).
    """
    started = time.time()
    record: dict[str, Any] = {"id": job.id, "kind": job.kind, "fingerprint": job.fingerprint(),
                              "started": started, "host": socket.gethostname(),
                              "pid": os.getpid(), "thumbnail": None, "error": None}
    try:
        # The whole job (reading, registration, writing, thumbnail) at the job's threads,
        # whatever the worker process's default is.
        with _job_threads(options.threads, record):
            _run(job, outroot, options, record)
        record["status"] = "done"
    except ItregError as exc:
        record.update(status="failed", error=_one_line(str(exc)))
    except Exception as exc:  # noqa: BLE001  (a bug in one job must not stop the others)
        record.update(status="failed", error=_one_line(f"{type(exc).__name__}: {exc}"),
                      traceback=traceback.format_exc())
    record["finished"] = time.time()
    record["job_s"] = record["finished"] - started
    return record


@contextlib.contextmanager
def _job_threads(threads: int | None, record: dict[str, Any]) -> Iterator[None]:
    """Run the block at `threads` torch threads; record the threads and the worker's
    ``MALLOC_TRIM_THRESHOLD_`` (see :func:`itreg.batch.cluster.worker_environ`) as the job
    sees them (``torch_threads``, ``malloc_trim_threshold``)."""
    import torch

    from itreg.runtime import limited_threads

    with limited_threads(threads):
        record["torch_threads"] = torch.get_num_threads()
        record["malloc_trim_threshold"] = os.environ.get("MALLOC_TRIM_THRESHOLD_")
        yield


def _run(job: Job, outroot: str, options: JobOptions, record: dict[str, Any]) -> None:
    outdir = Path(outroot) / job.id
    state = finished_state(job, outroot)
    if state == "labels" and not options.force:
        _warp_labels(job, outdir)
        record.update(report_fields(outdir / "report.json"))
        return
    if state != "absent" and not options.force:
        raise OutputExistsError(
            f"output folder '{outdir}' exists but does not match this job (other inputs or "
            "settings, or older than an input); use --force to overwrite it")
    if job.kind == "pair":
        record.update(_run_pair(job, outdir, options))
    else:
        record.update(_run_group(job, outdir, options))


def _one_line(text: str) -> str:
    return " ".join(text.split())


def report_fields(path: Path) -> dict[str, Any]:
    report = json.loads(path.read_text(encoding="utf-8"))
    return {"final_metric": report.get("final_metric"), "quantity": report.get("quantity"),
            "stop_reasons": sorted(set(report.get("stop_reasons") or [])),
            "registration_s": report.get("wall_time_s")}


def _run_pair(job: Job, outdir: Path, options: JobOptions) -> dict[str, Any]:
    from itreg import io
    from itreg.api import register
    from itreg.results import is_image_path, save_registration

    device = _device(options.device)
    # As `itreg register`: inputs are intensities even when stored as integers.
    fixed = io.read_image(job.fixed, is_label=False).to(device)
    moving = io.read_image(job.moving, is_label=False).to(device)
    fmask = io.read_mask(job.fixed_mask, fixed.grid) if job.fixed_mask else None
    mmask = io.read_mask(job.moving_mask, moving.grid) if job.moving_mask else None
    init: Any = job.init
    if init not in ("centers", "moments", "none"):
        init = (io.read_displacement_field(init) if is_image_path(init)
                else io.read_transform(init))
    result = register(fixed, moving, transform=job.transform, metric=job.metric,
                      preset=job.config, fixed_mask=fmask, moving_mask=mmask, init=init,
                      seed=job.seed, threads=options.threads, progress=False,
                      overrides=job.overrides or None)
    save_registration(result, outdir, force=options.force, inputs=pair_inputs(job),
                      protect=_protect(job))
    if job.moving_labels:
        _warp_labels(job, outdir)
    out = report_fields(outdir / "report.json")
    if options.thumbnails:
        from itreg.batch.thumbnails import checkerboard_png

        out["thumbnail"] = checkerboard_png(fixed, result.warped)
    return out


def _warp_labels(job: Job, outdir: Path) -> None:
    """Warp the moving label map onto the fixed grid through the written transform (as
    ``itreg apply --labels`` does); the file is the job's own, so it is replaced."""
    from itreg.results import apply_transform_file

    # transform.h5 is the whole map (exact B-spline; displacement.nii.gz is not written for
    # B-spline runs by default); older output folders may hold only the field or the .tfm.
    names = ("transform.h5", "displacement.nii.gz", "transform.tfm")
    transform = next((outdir / n for n in names if (outdir / n).exists()), outdir / names[-1])
    apply_transform_file(job.moving_labels, job.fixed, transform, outdir / LABELS_FILE,
                         labels=True, force=True)


def _run_group(job: Job, outdir: Path, options: JobOptions) -> dict[str, Any]:
    from itreg import io
    from itreg.groupwise import register_group, save_group

    device = _device(options.device)
    images = [io.read_image(p, is_label=False).to(device) for p in job.images]
    kwargs = group_settings(job)
    result = register_group(images, threads=options.threads, progress=False, **kwargs)
    extra = {}
    if "protect" in inspect.signature(save_group).parameters:
        extra["protect"] = _protect(job)
    save_group(result, outdir, force=options.force, inputs=list(job.images), **extra)
    out = report_fields(outdir / "report.json")
    if options.thumbnails and len(result.warped) >= 2:
        from itreg.batch.thumbnails import checkerboard_png

        out["thumbnail"] = checkerboard_png(result.warped[0], result.warped[1])
    return out

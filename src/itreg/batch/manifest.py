"""The job manifest of ``itreg batch``: one CSV row per job, checked before anything runs.

Columns (header names are case-sensitive; cells are stripped; blank rows and rows whose id
starts with ``#`` are skipped):

- ``id`` (required): the job's name and its output folder ``OUTROOT/<id>/``; letters, digits,
  ``.``, ``_``, ``-``; it cannot start with ``.`` or ``-``.
- ``fixed``, ``moving``: the pair's images (a pair job).
- ``kind``: ``pair`` (default) or ``group``; a group job lists ``images`` as ``a;b;c`` and runs
  :func:`itreg.groupwise.register_group`.
- optional, pair jobs: ``fixed_mask``, ``moving_mask``, ``moving_labels`` (a label map on the
  moving grid, warped onto the fixed grid as ``warped_labels.nii.gz``), ``init``
  (``centers``, ``moments``, ``none`` or a transform file).
- optional, every job: ``transform``, ``metric``, ``config`` (a TOML config file; pairs only),
  ``seed``, and ``set.KEY`` columns (``set.metric.bins`` = ``--set metric.bins=...``).

Relative paths are taken relative to the manifest's folder and stored absolute, so workers on
other machines of a shared file system find the same files. Missing image files are *not* a
manifest error: such a job fails alone with the reader's message. Everything else (unknown
columns, duplicate or unsafe ids, unknown transform or metric names, invalid settings) is a
:class:`~itreg.errors.ConfigError` naming the manifest line, raised before any job runs.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from itreg.errors import ConfigError, ItregError

#: Columns a manifest may have besides ``set.KEY`` columns.
COLUMNS = ("id", "kind", "fixed", "moving", "images", "fixed_mask", "moving_mask",
           "moving_labels", "init", "transform", "metric", "config", "seed")
#: Job kinds.
KINDS = ("pair", "group")
#: ``set.KEY`` keys that configure a group job (arguments of ``register_group``).
GROUP_SET_KEYS = ("iterations", "k", "reference", "levels", "sample_rate", "normalize",
                  "bias_correction")
#: Defaults of a group job's transform and metric (those of ``itreg groupwise``).
GROUP_DEFAULTS = {"transform": "rigid", "metric": "xmetric"}
#: Names in OUTROOT that belong to the batch itself (never job ids).
RESERVED = ("summary.csv", "summary.html", "ledger.jsonl")

_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class Job:
    """One job of a batch: a pair (``fixed``, ``moving``) or a group (``images``).

    Paths are absolute strings; ``sets`` holds ``(key, value)`` overrides sorted by key.
    """

    id: str
    kind: str = "pair"
    fixed: str | None = None
    moving: str | None = None
    images: tuple[str, ...] = ()
    fixed_mask: str | None = None
    moving_mask: str | None = None
    moving_labels: str | None = None
    init: str = "centers"
    transform: str | None = None
    metric: str | None = None
    config: str | None = None
    seed: int = 0
    sets: tuple[tuple[str, Any], ...] = ()
    line: int | None = field(default=None, compare=False)

    @property
    def overrides(self) -> dict[str, Any]:
        return dict(self.sets)

    @property
    def inputs(self) -> list[str]:
        """Every input file of the job (images, masks, labels, config, init transform)."""
        files = [self.fixed, self.moving, *self.images, self.fixed_mask, self.moving_mask,
                 self.moving_labels, self.config]
        if self.init not in ("centers", "moments", "none"):
            files.append(self.init)
        return [f for f in files if f]

    def fingerprint(self) -> str:
        """A hash of everything that defines the job's result (not its line number)."""
        spec = asdict(self)
        spec.pop("line")
        text = json.dumps(spec, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def where(self) -> str:
        return f"job '{self.id}'" + (f" (manifest line {self.line})" if self.line else "")


@dataclass(frozen=True)
class Defaults:
    """Command-line values used for manifest cells left empty."""

    transform: str | None = None
    metric: str | None = None
    config: str | None = None
    seed: int = 0
    sets: Mapping[str, Any] = field(default_factory=dict)


def parse_value(raw: str) -> Any:
    """A ``set.KEY`` cell or ``--set`` value: JSON where it parses (numbers, lists), else text."""
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def read_manifest(path: str | os.PathLike, defaults: Defaults | None = None) -> list[Job]:
    """Read and check a job manifest (CSV).

    Raises:
        ConfigError: unreadable file, missing or unknown columns, duplicate or unsafe ids,
            invalid settings; the message names the manifest and its line.
    """
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"manifest '{path}' is a folder; give a CSV file with one job a row")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise ConfigError(f"manifest '{path}' does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"manifest '{path}' cannot be read: {exc}") from None
    try:
        reader = csv.reader(text.splitlines())
        rows = list(reader)
    except csv.Error as exc:
        raise ConfigError(f"manifest '{path}' is not a valid CSV file: {exc}") from None
    if not rows or not any(cell.strip() for cell in rows[0]):
        raise ConfigError(f"manifest '{path}' is empty; its first line names the columns "
                          "(id,fixed,moving,...)")
    header = [h.strip() for h in rows[0]]
    records = []
    for number, row in enumerate(rows[1:], start=2):
        if not any(cell.strip() for cell in row):
            continue
        if len(row) > len(header):
            raise ConfigError(f"manifest '{path}' line {number} has {len(row)} cells but the "
                              f"header has {len(header)} columns")
        record = {h: (row[i].strip() if i < len(row) else "") for i, h in enumerate(header)}
        if record.get("id", "").startswith("#"):
            continue
        records.append((number, record))
    return jobs_from_records(records, header, base=path.parent, defaults=defaults,
                             source=f"manifest '{path}'")


def jobs_from_rows(rows: Iterable[Mapping[str, Any] | Job], base: str | os.PathLike = ".",
                   defaults: Defaults | None = None) -> list[Job]:
    """Jobs from dicts (the manifest's columns as keys) or :class:`Job` objects, checked as a
    manifest is; relative paths are taken relative to `base`."""
    rows = list(rows)
    if all(isinstance(r, Job) for r in rows):
        jobs = list(rows)
        _check_unique(jobs, "the job list")
        for job in jobs:
            _check_settings(job, "the job list")
        return jobs
    records, header = [], []
    for i, row in enumerate(rows, start=1):
        if isinstance(row, Job):
            raise ConfigError("give jobs either as Job objects or as dicts, not both")
        record = {str(k): "" if v is None else str(v).strip() for k, v in row.items()}
        header += [k for k in record if k not in header]
        records.append((i, record))
    return jobs_from_records(records, header, base=Path(base), defaults=defaults,
                             source="the job list", row_word="row")


def jobs_from_records(records, header, *, base: Path, defaults: Defaults | None, source: str,
                      row_word: str = "line") -> list[Job]:
    defaults = defaults or Defaults()
    unknown = [h for h in header if h not in COLUMNS and not h.startswith("set.")]
    if unknown:
        raise ConfigError(f"{source} has unknown column(s) {', '.join(map(repr, unknown))}; "
                          f"valid columns are {', '.join(COLUMNS)} and set.KEY")
    empty_sets = [h for h in header if h == "set."]
    if empty_sets:
        raise ConfigError(f"{source} has a column 'set.' without a key; name it set.KEY")
    if "id" not in header:
        raise ConfigError(f"{source} has no 'id' column; a manifest needs id,fixed,moving "
                          "(or id,kind,images for group jobs)")
    if len(set(header)) != len(header):
        dup = sorted({h for h in header if header.count(h) > 1})
        raise ConfigError(f"{source} repeats column(s) {', '.join(dup)}")
    if not records:
        raise ConfigError(f"{source} has no jobs")
    jobs = []
    for number, record in records:
        where = f"{source} {row_word} {number}"
        try:
            job = _job(record, number, base, defaults, where)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        jobs.append(job)
    _check_unique(jobs, source, row_word)
    cache: dict = {}
    for job in jobs:
        _check_settings(job, f"{source} {row_word} {job.line}", cache)
    return jobs


def _path(value: str, base: Path) -> str:
    p = Path(os.path.expanduser(value))
    return str(p if p.is_absolute() else (base / p).absolute())


def _job(record: dict, number: int, base: Path, defaults: Defaults, where: str) -> Job:
    job_id = record.get("id", "")
    if not job_id:
        raise ConfigError("the id is empty; every job needs an id (its output folder name)")
    if not _ID.match(job_id) or job_id in RESERVED:
        raise ConfigError(f"id {job_id!r} cannot name a folder: use letters, digits, '.', '_' "
                          f"and '-' (not first), and not {', '.join(RESERVED)}")
    kind = record.get("kind") or "pair"
    if kind not in KINDS:
        raise ConfigError(f"kind {kind!r} is not one of {', '.join(KINDS)}")
    get = record.get

    def opt_path(name: str) -> str | None:
        return _path(get(name), base) if get(name) else None

    sets = dict(defaults.sets)
    for key, raw in record.items():
        if key.startswith("set.") and raw != "":
            sets[key[4:]] = parse_value(raw)
    seed_raw = get("seed") or ""
    try:
        seed = int(seed_raw) if seed_raw else int(defaults.seed)
    except ValueError:
        raise ConfigError(f"seed {seed_raw!r} is not an integer") from None
    common = {"id": job_id, "kind": kind, "seed": seed, "line": number,
              "sets": tuple(sorted(sets.items()))}
    if kind == "pair":
        if not get("fixed") or not get("moving"):
            missing = [c for c in ("fixed", "moving") if not get(c)]
            raise ConfigError(f"job {job_id!r} has no {' and no '.join(missing)} image; a pair "
                              "job needs both (or set kind=group with images=a;b;c)")
        if get("images"):
            raise ConfigError(f"job {job_id!r} is a pair job but has 'images'; set kind=group "
                              "for a group job")
        init = get("init") or "centers"
        if init not in ("centers", "moments", "none"):
            init = _path(init, base)
        config = get("config") or defaults.config
        return Job(fixed=_path(get("fixed"), base), moving=_path(get("moving"), base),
                   fixed_mask=opt_path("fixed_mask"), moving_mask=opt_path("moving_mask"),
                   moving_labels=opt_path("moving_labels"), init=init,
                   transform=get("transform") or defaults.transform,
                   metric=get("metric") or defaults.metric,
                   config=_path(config, base) if config else None, **common)
    extra = [c for c in ("fixed", "moving", "fixed_mask", "moving_mask", "moving_labels",
                         "init", "config") if get(c)]
    if extra:
        raise ConfigError(f"group job {job_id!r} cannot have {', '.join(extra)}; list its "
                          "images in 'images' (a;b;c)")
    images = tuple(_path(p.strip(), base) for p in (get("images") or "").split(";")
                   if p.strip())
    if len(images) < 2:
        raise ConfigError(f"group job {job_id!r} needs at least two images in 'images' "
                          f"(a;b;c), got {len(images)}")
    return Job(images=images,
               transform=get("transform") or defaults.transform or GROUP_DEFAULTS["transform"],
               metric=get("metric") or defaults.metric or GROUP_DEFAULTS["metric"], **common)


def _check_unique(jobs: list[Job], source: str, row_word: str = "line") -> None:
    seen: dict[str, Job] = {}
    for job in jobs:
        if job.id in seen:
            raise ConfigError(f"{source} has the id {job.id!r} twice ({row_word}s "
                              f"{seen[job.id].line} and {job.line}); ids name output folders "
                              "and must be unique")
        seen[job.id] = job


def _check_settings(job: Job, where: str, cache: dict | None = None) -> None:
    """ConfigError for unknown names or invalid settings of `job` (no images are read)."""
    cache = {} if cache is None else cache
    key = (job.kind, job.transform, job.metric, job.config, job.sets)
    if key not in cache:
        try:
            if job.kind == "pair":
                pair_config(job)
            else:
                group_settings(job)
            cache[key] = None
        except ItregError as exc:
            cache[key] = str(exc)
    if cache[key] is not None:
        raise ConfigError(f"{where} (job {job.id!r}): {cache[key]}")


def pair_config(job: Job):
    """The :class:`~itreg.engine.config.RegistrationConfig` a pair job runs."""
    from itreg.api import resolve_config

    return resolve_config(job.transform, job.metric, job.config, job.overrides or None)


def group_settings(job: Job) -> dict[str, Any]:
    """The ``register_group`` keyword arguments of a group job (checked names and keys)."""
    from itreg.errors import unknown_name
    from itreg.groupwise import available_group_metrics
    from itreg.groupwise.coreg import default_stages

    sets = job.overrides
    bad = [k for k in sets if k not in GROUP_SET_KEYS]
    if bad:
        raise ConfigError(f"set.{bad[0]} does not configure a group job; group jobs take "
                          f"{', '.join('set.' + k for k in GROUP_SET_KEYS)}")
    if job.metric not in available_group_metrics():
        raise unknown_name("groupwise metric", str(job.metric), available_group_metrics())
    default_stages(str(job.transform), int(sets.get("iterations", 100)))
    return {"metric": job.metric, "transform": job.transform, "seed": job.seed, **sets}

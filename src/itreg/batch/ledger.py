"""The batch ledger ``OUTROOT/ledger.jsonl``: an append-only record of every job's state.

One JSON object a line, flushed and fsync'd as each job ends, so a crash, a killed client or
Ctrl-C loses no finished job's entry (a torn last line is ignored on reading). Lines:

- ``{"event": "run", "time": ..., "jobs": N, "to_run": M, ...}`` when a run starts;
- ``{"event": "job", "id": ..., "status": "done"|"failed"|"interrupted", "fingerprint": ...,
  "started": ..., "finished": ..., "job_s": ..., "registration_s": ..., "final_metric": ...,
  "quantity": ..., "stop_reasons": [...], "host": ..., "pid": ..., "error": "one line",
  "traceback": "..." (bugs only)}`` when a job ends.

Only the client process writes it; an advisory lock (``flock``) refuses a second ``itreg batch``
into the same OUTROOT while one runs.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Self

from itreg.errors import OutputExistsError

LEDGER = "ledger.jsonl"


def read_ledger(outroot: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """The last entry of each job id in ``OUTROOT/ledger.jsonl`` (empty if there is none)."""
    path = Path(outroot) / LEDGER
    latest: dict[str, dict[str, Any]] = {}
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return latest
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue  # a line torn by a crash
        if isinstance(entry, dict) and entry.get("event") == "job" and "id" in entry:
            latest[entry["id"]] = entry
    return latest


class Ledger:
    """Appends entries to ``OUTROOT/ledger.jsonl`` while holding its lock.

    Raises:
        OutputExistsError: another ``itreg batch`` holds the lock of this OUTROOT.
    """

    def __init__(self, outroot: str | os.PathLike) -> None:
        self.path = Path(outroot) / LEDGER
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115  (closed in close)
        try:
            import fcntl

            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # not POSIX: no lock
            pass
        except OSError:
            self._file.close()
            raise OutputExistsError(
                f"another 'itreg batch' is writing to '{self.path.parent}'; wait for it to "
                "finish or choose another output folder") from None

    def write(self, entry: dict[str, Any]) -> None:
        entry = {"time": time.time(), **entry}
        self._file.write(json.dumps(entry, default=str) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def job(self, record: dict[str, Any]) -> None:
        self.write({"event": "job", **{k: v for k, v in record.items() if k != "thumbnail"}})

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

"""Small helpers shared by the readers and writers of :mod:`itreg.io` (private).

* :func:`quiet_native_stderr` keeps the diagnostics that ITK's bundled HDF5 library prints
  straight to file descriptor 2 (pages of ``HDF5-DIAG`` lines whenever ITK probes a file that is
  not HDF5) out of the user's terminal: on failure they go to the debug log, on success anything
  captured is written back to stderr unchanged.
* :func:`check_input_file` turns a missing path or a directory into the caller's typed error
  before SimpleITK sees it.
* :func:`atomic_write` writes a single-file output through a temporary file beside the target.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

logger = logging.getLogger("itreg.io")

#: Formats that write a header and a separate data file that the header names: they cannot be
#: written under a temporary name and renamed.
TWO_FILE_SUFFIXES = (".mhd", ".hdr", ".img", ".img.gz", ".nhdr")


def sitk_message(exc: BaseException) -> str:
    """The useful last line(s) of a SimpleITK exception, without the C++ source locations."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    useful = [
        ln for ln in lines
        if not ln.startswith("Exception thrown in SimpleITK") and ".cxx:" not in ln
    ]
    text = " ".join(useful or lines)
    for prefix in ("sitk::ERROR: ", "ITK ERROR: "):
        text = text.replace(prefix, "")
    return text[:400]


class _StderrCapture:
    """Process-wide redirection of descriptor 2, shared by overlapping (threaded) users.

    The first user redirects descriptor 2 to a temporary file, the last one restores it, so
    concurrent reads are not serialised. Text captured while any user failed is logged at debug
    level; otherwise it is written back to stderr.
    """

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.users = 0
        self.failed = False
        self.saved: int | None = None
        self.capture = None

    def enter(self) -> bool:
        with self.lock:
            if self.users == 0:
                try:
                    saved = os.dup(2)
                except OSError:  # no descriptor 2 (embedded interpreters): nothing to hide
                    return False
                capture = tempfile.TemporaryFile()  # noqa: SIM115 - closed in leave()
                with contextlib.suppress(AttributeError, ValueError, OSError):
                    sys.stderr.flush()
                os.dup2(capture.fileno(), 2)
                self.saved, self.capture, self.failed = saved, capture, False
            self.users += 1
            return True

    def leave(self, failed: bool) -> None:
        with self.lock:
            self.failed |= failed
            self.users -= 1
            if self.users > 0:
                return
            saved, capture = self.saved, self.capture
            self.saved = self.capture = None
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            text = capture.read()
            capture.close()
            if not text:
                return
            if self.failed:
                logger.debug("native stderr: %s", text.decode("utf-8", "replace"))
            else:
                with contextlib.suppress(OSError):
                    os.write(2, text)


_capture = _StderrCapture()


@contextlib.contextmanager
def quiet_native_stderr() -> Iterator[None]:
    """Capture what native code writes to file descriptor 2 inside the block.

    Native code writes to descriptor 2 whatever Python's ``sys.stderr`` is. On success the
    captured bytes are written back to stderr; on an exception they are logged at debug level
    only (they are HDF5's probing noise or the same error the exception carries).
    """
    if not _capture.enter():
        yield
        return
    failed = False
    try:
        yield
    except BaseException:
        failed = True
        raise
    finally:
        _capture.leave(failed)


def check_input_file(path: str | os.PathLike, what: str, error: Callable[[str], Exception]) -> Path:
    """Return `path` as a Path, or raise `error` if it does not name a readable file."""
    p = Path(path)
    if not p.exists():
        raise error(f"{what} {str(p)!r} does not exist; check the path")
    if p.is_dir():
        raise error(f"{what} {str(p)!r} is a directory, not a file; give the file inside it")
    if not os.access(p, os.R_OK):
        raise error(f"{what} {str(p)!r} is not readable; check its permissions")
    return p


def full_suffix(path: str | os.PathLike) -> str:
    """The lower-case extension, with ``.gz`` kept together with the one before it."""
    name = Path(path).name.lower()
    if name.endswith(".gz"):
        stem = name[:-3]
        return Path(stem).suffix + ".gz"
    return Path(name).suffix


#: Temporary names: ``.itreg-<tag>-<pid>-<random>-<name>``; the pid lets a later run tell the
#: leftovers of a killed process (cleaned) from those of a running one (kept).
_TEMP_RE = re.compile(r"^\.itreg-(tmp|old)-(\d+)-[0-9a-f]{12}-(.*)$")


def temporary_name(name: str, tag: str = "tmp") -> str:
    """A hidden temporary name for `name` that records this process's id."""
    return f".itreg-{tag}-{os.getpid()}-{uuid.uuid4().hex[:12]}-{name}"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def parse_temporary_name(name: str) -> tuple[str, int, str] | None:
    """``(tag, pid, original name)`` of a name made by :func:`temporary_name`, else None."""
    m = _TEMP_RE.match(name)
    return None if m is None else (m.group(1), int(m.group(2)), m.group(3))


def stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """The temporary files and folders in `folder` left by itreg processes that no longer run."""
    out = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return out
    for entry in entries:
        parsed = parse_temporary_name(entry.name)
        if parsed is not None and not _pid_alive(parsed[1]):
            out.append(entry)
    return sorted(out)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path` (same extension); on success replace `path` with it.

    Two-file formats (``.mhd``/``.raw``, ``.hdr``/``.img``, ``.nhdr``) name their data file in
    the header, so they are written in place. Missing parent folders are created.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if full_suffix(target) in TWO_FILE_SUFFIXES:
        yield target
        return
    tmp = target.with_name(temporary_name(target.name, "tmp"))
    try:
        yield tmp
        os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()

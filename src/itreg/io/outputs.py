"""Atomic outputs: a crash, an error or Ctrl-C leaves the old outputs or none, never half.

:func:`atomic_output_dir` hands out a temporary folder beside the target and renames it into
place when the block succeeds; :func:`atomic_output_file` does the same for one file. Both refuse
an existing target unless ``force`` is set, before anything is written.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from itreg.errors import ConfigError, OutputExistsError
from itreg.io._native import TWO_FILE_SUFFIXES, full_suffix

logger = logging.getLogger("itreg.io")


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _sibling(target: Path, tag: str) -> Path:
    return target.with_name(f".{target.name}.itreg-{tag}-{uuid.uuid4().hex[:12]}")


def _refuse(target: Path, kind: str) -> OutputExistsError:
    return OutputExistsError(
        f"output {kind} {str(target)!r} exists; choose another output path or use --force "
        "(force=True) to replace it"
    )


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Write a folder of outputs atomically.

    Yields an empty temporary folder beside `path` (same parent, so the final rename is atomic).
    When the block succeeds the folder is renamed to `path`; with `force` an existing `path` is
    moved aside first and deleted only after the new folder is in place. When the block raises
    (including ``KeyboardInterrupt``) the temporary folder is deleted and an existing `path` is
    left untouched.

    Args:
        path: the output folder.
        force: replace an existing `path`.

    Yields:
        The temporary folder to write into.

    Raises:
        OutputExistsError: `path` exists and `force` is False (raised before anything is
            written), or it appeared while the outputs were being written.
    """
    target = Path(path)
    if _exists(target) and not force:
        raise _refuse(target, "folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(target, "tmp")
    tmp.mkdir()  # os.mkdir honours the umask, unlike tempfile.mkdtemp's 0700
    try:
        yield tmp
        if _exists(target):
            if not force:
                raise _refuse(target, "folder")
            old = _sibling(target, "old")
            os.rename(target, old)
            try:
                os.rename(tmp, target)
            except BaseException:
                os.rename(old, target)
                raise
            _remove(old)
        else:
            os.rename(tmp, target)
        logger.debug("outputs written to %s", target)
    finally:
        if _exists(tmp):
            _remove(tmp)


@contextlib.contextmanager
def atomic_output_file(path: str | os.PathLike, force: bool = False) -> Iterator[Path]:
    """Write one output file atomically.

    Yields a temporary path beside `path` whose name ends with `path`'s name (so writers that
    pick the format from the extension behave the same). When the block succeeds and has written
    it, the temporary file replaces `path` (``os.replace``); when it raises, the temporary file is
    deleted and `path` is untouched.

    Args:
        path: the output file; single-file formats only (write ``.mhd``/``.hdr`` pairs into an
            :func:`atomic_output_dir`).
        force: replace an existing `path`.

    Yields:
        The temporary path to write.

    Raises:
        OutputExistsError: `path` exists and `force` is False, or `path` is a folder.
        ConfigError: `path` has a two-file format extension (.mhd, .hdr, .img, .nhdr).
    """
    target = Path(path)
    if target.is_dir():
        raise OutputExistsError(
            f"output file {str(target)!r} is an existing folder; give a file name"
        )
    if _exists(target) and not force:
        raise _refuse(target, "file")
    if full_suffix(target) in TWO_FILE_SUFFIXES:
        raise ConfigError(
            f"output {str(target)!r} is a two-file format (header + data file) that cannot be "
            "replaced atomically; use a single-file format (.mha, .nrrd, .nii.gz)"
        )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".itreg-tmp-{uuid.uuid4().hex[:12]}-{target.name}")
    try:
        yield tmp
        if not _exists(tmp):
            raise FileNotFoundError(
                f"nothing was written to the temporary file {str(tmp)!r} for {str(target)!r}"
            )
        if _exists(target) and not force:
            raise _refuse(target, "file")
        os.replace(tmp, target)
        logger.debug("output written to %s", target)
    finally:
        if _exists(tmp):
            _remove(tmp)

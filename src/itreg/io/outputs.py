"""Outputs that never lose a user's data.

Every command writes its outputs into a temporary location beside the target and moves them
into place only when all of them are complete, so a crash, an error, Ctrl-C or SIGTERM leaves
the old outputs or none, never half.

:func:`atomic_output_dir` hands out a temporary folder. A new output folder appears by one
rename. An existing folder is never replaced as a whole: with ``force`` the files that this run
wrote are moved into it one by one (old versions moved aside first and restored if anything
fails), files that an earlier itreg run wrote there and this run does not write are removed
(they are listed in the folder's manifest, :data:`OUTPUT_MANIFEST`), and every other file --
the inputs, a user's notes -- stays byte-identical. :func:`atomic_output_file` does the same for
one file.

Refused before anything is written, with :class:`~itreg.errors.OutputExistsError` (exit 2):
an existing output without ``force``; an output folder that is an existing file or an output
file that is an existing folder (even with ``force``); an output that is one of the inputs
(``protect``) or would overwrite one (even with ``force``). Output paths that cannot be written
raise :class:`~itreg.errors.OutputPathError` before any computation when the caller checks them
first (:func:`check_output_dir`, :func:`check_output_file`).

Temporary names record the process id (``.itreg-tmp-<pid>-...``), so the next run in the same
folder removes what a killed run left behind and leaves a running one's alone.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import shutil
import signal
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

from itreg.errors import ConfigError, ItregError, OutputExistsError, OutputPathError
from itreg.io._native import (
    TWO_FILE_SUFFIXES,
    full_suffix,
    parse_temporary_name,
    stale_temporaries,
    temporary_name,
)

logger = logging.getLogger("itreg.io")

__all__ = [
    "OUTPUT_MANIFEST",
    "atomic_output_dir",
    "atomic_output_file",
    "check_output_dir",
    "check_output_file",
    "clean_stale_temporaries",
    "signals_deferred",
    "staged_model_output",
    "training_folder",
]

#: The hidden file in an output folder that lists the files itreg wrote there (relative paths).
OUTPUT_MANIFEST = ".itreg-outputs.json"

#: Extensions that name a file, not a folder: an output *folder* ending so is a mistake (an
#: ANTs/elastix habit: ``-o moving_warped.nii.gz``).
_FILE_LIKE_SUFFIXES = (".nii", ".nii.gz", ".mha", ".mhd", ".nrrd", ".nhdr", ".hdr", ".img",
                       ".tfm", ".h5", ".hdf5", ".mat", ".txt", ".csv", ".json", ".pt", ".png")

PathLike = str | os.PathLike


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _absolute(path: PathLike) -> Path:
    """`path` made absolute and normalised (``.``/``..`` resolved, symlinks followed)."""
    return Path(os.path.realpath(os.path.abspath(os.fspath(path))))


def _shown(path: PathLike) -> str:
    return repr(str(path))


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT and SIGTERM back for the block (the few renames that put outputs in place).

    A signal that arrives meanwhile is delivered when the block ends, so the outputs are either
    all in place or all old. Only the main thread can hold signals back; elsewhere a no-op.
    """
    if threading.current_thread() is not threading.main_thread() or \
            not hasattr(signal, "pthread_sigmask"):
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _nearest_existing(path: Path) -> Path:
    p = path
    while not _exists(p) and p != p.parent:
        p = p.parent
    return p


def _check_writable(target: Path, kind: str) -> None:
    """Refuse an output whose folder cannot be created or written."""
    base = _nearest_existing(target.parent if not target.is_dir() else target)
    if not base.is_dir():
        raise OutputPathError(f"cannot write output {kind} {_shown(target)}: {_shown(base)} is "
                              "a file, not a folder")
    if not os.access(base, os.W_OK | os.X_OK):
        raise OutputPathError(f"cannot write output {kind} {_shown(target)}: {_shown(base)} is "
                              "not writable; choose another output path")


def _protected(protect: Iterable[PathLike] | None) -> set[Path]:
    return {_absolute(p) for p in (protect or ()) if p is not None}


def check_output_dir(path: PathLike, *, force: bool = False,
                     protect: Iterable[PathLike] | None = None) -> Path:
    """Check an output folder before any work; return its absolute path.

    Raises:
        OutputExistsError: it is an existing file (even with `force`); it is one of the
            `protect` paths (the inputs; even with `force`); it exists, is not empty and `force`
            is False.
        ConfigError: it does not exist and its name ends like a file (``out.nii.gz``).
        OutputPathError: it cannot be created or written.
    """
    target = _absolute(path)
    if _exists(target) and not target.is_dir():
        raise OutputExistsError(f"output folder {_shown(path)} is an existing file; give a "
                                "folder name (nothing was changed, --force does not replace "
                                "a file with a folder)")
    if target in _protected(protect):
        raise OutputExistsError(f"output folder {_shown(path)} is one of the inputs; write the "
                                "outputs to another folder")
    if not _exists(target) and full_suffix(target) in _FILE_LIKE_SUFFIXES:
        raise ConfigError(f"output folder {_shown(path)} is named like a file "
                          f"({full_suffix(target)}); this command's -o names the folder that "
                          "receives its outputs")
    if target.is_dir() and not force:
        others = [e.name for e in target.iterdir() if parse_temporary_name(e.name) is None]
        if others:
            raise OutputExistsError(f"output folder {_shown(path)} exists and is not empty; "
                                    "choose another folder, or use --force to replace itreg's "
                                    "outputs in it (other files are kept)")
    _check_writable(target, "folder")
    return target


def check_output_file(path: PathLike, *, force: bool = False,
                      protect: Iterable[PathLike] | None = None) -> Path:
    """Check an output file before any work; return its absolute path.

    Raises:
        OutputExistsError: it is an existing folder, or one of the `protect` paths (even with
            `force`); it exists and `force` is False.
        ConfigError: a two-file format (``.mhd``, ``.hdr``, ...) that cannot be replaced
            atomically.
        OutputPathError: its folder cannot be created or written.
    """
    target = _absolute(path)
    if target.is_dir():
        raise OutputExistsError(f"output file {_shown(path)} is an existing folder; give a "
                                "file name")
    if target in _protected(protect):
        raise OutputExistsError(f"output file {_shown(path)} is one of the inputs; write the "
                                "output to another file")
    if _exists(target) and not force:
        raise OutputExistsError(f"output file {_shown(path)} exists; choose another output "
                                "path or use --force (force=True) to replace it")
    if full_suffix(target) in TWO_FILE_SUFFIXES:
        raise ConfigError(f"output {_shown(path)} is a two-file format (header + data file) "
                          "that cannot be replaced atomically; use a single-file format (.mha, "
                          ".nrrd, .nii.gz)")
    _check_writable(target, "file")
    return target


def clean_stale_temporaries(folder: PathLike, name: str | None = None) -> list[Path]:
    """Remove what killed itreg runs left in `folder` (only for outputs called `name`, if given).

    A leftover ``old`` folder holds the previous outputs a killed run had moved aside while
    putting its own in place: those whose place is empty are moved back first.
    """
    removed = []
    for entry in stale_temporaries(folder):
        tag, _, original = parse_temporary_name(entry.name)
        if name is not None and original != name:
            continue
        if tag == "old" and entry.is_dir():
            _restore_moved_aside(entry, Path(folder))
        _remove(entry)
        removed.append(entry)
        logger.info("removed %s, left by an interrupted run", entry)
    return removed


def _restore_moved_aside(backup: Path, target: Path) -> None:
    for rel in _files_under(backup):
        dest = target / rel
        if not _exists(dest):
            dest.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(OSError):
                os.rename(backup / rel, dest)


def _files_under(folder: Path) -> list[str]:
    """Relative POSIX paths of the files (and links) under `folder`, sorted."""
    out = []
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for f in files:
            out.append((Path(root) / f).relative_to(folder).as_posix())
    return sorted(out)


def _safe_relative(rel: object) -> bool:
    if not isinstance(rel, str) or not rel or rel.startswith("/") or "\\" in rel:
        return False
    parts = rel.split("/")
    return all(p not in ("", ".", "..") for p in parts) and not parts[0].startswith(".itreg-")


def read_manifest(folder: PathLike) -> list[str]:
    """The files an earlier itreg run wrote in `folder` (relative paths; [] if none recorded)."""
    path = Path(folder) / OUTPUT_MANIFEST
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    files = data.get("files") if isinstance(data, dict) else None
    return [f for f in files if _safe_relative(f)] if isinstance(files, list) else []


def _write_manifest(folder: Path, files: list[str]) -> None:
    from itreg._version import __version__

    payload = {"written_by": f"itreg {__version__}",
               "time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
               "files": files}
    (folder / OUTPUT_MANIFEST).write_text(json.dumps(payload, indent=2) + "\n")


def _reword(exc: BaseException, tmp: Path, target: Path) -> None:
    """Name the target, not the temporary path, in an error message."""
    if exc.args and isinstance(exc.args[0], str):
        exc.args = (exc.args[0].replace(str(tmp), str(target)),) + exc.args[1:]


def _merge_into(tmp: Path, target: Path, force: bool, protected: set[Path]) -> None:
    """Move the files under `tmp` into the existing folder `target` (see the module docstring)."""
    new = [f for f in _files_under(tmp) if f != OUTPUT_MANIFEST]
    old = read_manifest(target)
    stale = [f for f in old if f not in new and (target / f).is_file()
             and not (target / f).is_symlink() and _absolute(target / f) not in protected]
    for rel in new:
        dest = target / rel
        if _absolute(dest) in protected:
            raise OutputExistsError(f"output {_shown(dest)} would overwrite an input; write the "
                                    "outputs to another folder")
        if dest.is_dir() and not dest.is_symlink():
            raise OutputExistsError(f"{_shown(dest)} is a folder where itreg writes a file; "
                                    "move it or choose another output folder")
        for parent in Path(rel).parents:
            if str(parent) != "." and _exists(target / parent) and \
                    not (target / parent).is_dir():
                raise OutputExistsError(f"{_shown(target / parent)} is a file where itreg "
                                        "writes a folder; move it or choose another output "
                                        "folder")
        if _exists(dest) and not force:
            raise OutputExistsError(f"output {_shown(dest)} exists; use --force to replace it")
    backup = target / temporary_name(target.name, "old")
    moved_aside: list[str] = []
    placed: list[str] = []
    with signals_deferred():
        try:
            for rel in [*new, *stale, OUTPUT_MANIFEST]:
                if _exists(target / rel):
                    (backup / rel).parent.mkdir(parents=True, exist_ok=True)
                    os.rename(target / rel, backup / rel)
                    moved_aside.append(rel)
            for rel in [*new, OUTPUT_MANIFEST]:
                (target / rel).parent.mkdir(parents=True, exist_ok=True)
                os.rename(tmp / rel, target / rel)
                placed.append(rel)
        except BaseException:
            for rel in reversed(placed):
                with contextlib.suppress(OSError):
                    os.rename(target / rel, tmp / rel)
            for rel in reversed(moved_aside):
                with contextlib.suppress(OSError):
                    os.rename(backup / rel, target / rel)
            raise
        finally:
            if _exists(backup):
                _remove(backup)
    for rel in stale:  # folders that held only stale outputs go too
        for parent in Path(rel).parents:
            if str(parent) == ".":
                break
            with contextlib.suppress(OSError):
                (target / parent).rmdir()


@contextlib.contextmanager
def atomic_output_dir(path: PathLike, force: bool = False, *,
                      protect: Iterable[PathLike] | None = None) -> Iterator[Path]:
    """Write a folder of outputs atomically, without touching anything else.

    Yields an empty temporary folder (beside `path`, or inside it when it exists, so the final
    renames stay on one file system). When the block succeeds its files are put in place: a new
    `path` appears by one rename; into an existing `path` (only with `force`, or when it is
    empty) the files are moved one by one, replacing only the files of the same names and those
    an earlier itreg run wrote (its manifest); everything else in `path` is left as it was. When
    the block raises (``KeyboardInterrupt`` included) the temporary folder is deleted and `path`
    is untouched.

    Args:
        path: the output folder (``.`` works).
        force: replace itreg's outputs in an existing, non-empty folder.
        protect: the command's input paths: an output that is one of them, or a file written
            over one of them, is refused even with `force`.

    Yields:
        The temporary folder to write into.

    Raises:
        OutputExistsError, ConfigError, OutputPathError: see :func:`check_output_dir`; raised
            before anything is written.
    """
    target = check_output_dir(path, force=force, protect=protect)
    protected = _protected(protect)
    clean_stale_temporaries(target.parent, target.name)
    if target.is_dir():
        clean_stale_temporaries(target)
        tmp = target / temporary_name("outputs")
    else:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / temporary_name(target.name)
    tmp.mkdir()  # os.mkdir honours the umask, unlike tempfile.mkdtemp's 0700
    try:
        try:
            yield tmp
        except ItregError as exc:
            _reword(exc, tmp, target)
            raise
        except OSError as exc:
            raise OutputPathError(f"cannot write outputs to {_shown(path)}: "
                                  f"{str(exc).replace(str(tmp), str(target))}") from exc
        _write_manifest(tmp, [f for f in _files_under(tmp) if f != OUTPUT_MANIFEST])
        if target.is_dir():
            _merge_into(tmp, target, force, protected)
        elif _exists(target):
            raise OutputExistsError(f"output folder {_shown(path)} appeared while the outputs "
                                    "were being written; nothing was changed")
        else:
            with signals_deferred():
                os.rename(tmp, target)
        logger.debug("outputs written to %s", target)
    finally:
        if _exists(tmp):
            _remove(tmp)


@contextlib.contextmanager
def atomic_output_file(path: PathLike, force: bool = False, *,
                       protect: Iterable[PathLike] | None = None) -> Iterator[Path]:
    """Write one output file atomically.

    Yields a temporary path beside `path` whose name ends with `path`'s name (so writers that
    pick the format from the extension behave the same). When the block succeeds and has written
    it, the temporary file replaces `path` (``os.replace``); when it raises, the temporary file is
    deleted and `path` is untouched.

    Args:
        path: the output file; single-file formats only (write ``.mhd``/``.hdr`` pairs into an
            :func:`atomic_output_dir`).
        force: replace an existing `path`.
        protect: the command's input paths; `path` may not be one of them, even with `force`.

    Yields:
        The temporary path to write.

    Raises:
        OutputExistsError, ConfigError, OutputPathError: see :func:`check_output_file`.
    """
    target = check_output_file(path, force=force, protect=protect)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(target.parent, target.name)
    tmp = target.parent / temporary_name(target.name)
    try:
        try:
            yield tmp
        except ItregError as exc:
            _reword(exc, tmp, target)
            raise
        if not _exists(tmp):
            raise FileNotFoundError(
                f"nothing was written to the temporary file {str(tmp)!r} for {str(target)!r}"
            )
        if _exists(target) and not force:
            raise OutputExistsError(f"output file {_shown(path)} appeared while it was being "
                                    "written; nothing was changed")
        with signals_deferred():
            os.replace(tmp, target)
        logger.debug("output written to %s", target)
    finally:
        if _exists(tmp):
            _remove(tmp)


def training_folder(path: PathLike) -> Path:
    """The clearly named sibling folder where a training run keeps its work for model file
    `path`: ``<path>.training/`` (the best model so far and the resumable checkpoint)."""
    p = Path(path)
    return p.with_name(p.name + ".training")


@contextlib.contextmanager
def staged_model_output(path: PathLike, force: bool = False, *,
                        protect: Iterable[PathLike] | None = None) -> Iterator[Path]:
    """Train into a sibling folder and put the model file in place only at the end.

    Yields the path a trainer writes its model (and, beside it, its ``.ckpt``) to while it
    trains: ``<path>.training/<name>``. When the block succeeds the model replaces `path`
    atomically and the folder goes; when it fails or is interrupted, `path` is untouched and
    the folder stays, so the same command resumes from its checkpoint.

    Raises:
        OutputExistsError, ConfigError, OutputPathError: see :func:`check_output_file`
            (checked before training starts and again before the model is put in place).
    """
    target = check_output_file(path, force=force, protect=protect)
    work_dir = training_folder(target)
    if _exists(work_dir) and not work_dir.is_dir():
        raise OutputExistsError(f"{_shown(work_dir)} (where training keeps its work) is a "
                                "file; move it")
    work_dir.mkdir(parents=True, exist_ok=True)
    work = work_dir / target.name
    yield work
    if not work.is_file():
        raise FileNotFoundError(f"training wrote no model to {str(work)!r}")
    check_output_file(target, force=force, protect=protect)
    with signals_deferred():
        os.replace(work, target)
    for leftover in (work_dir / f"{target.name}.ckpt", *work_dir.glob(".itreg-tmp-*")):
        if _exists(leftover):
            _remove(leftover)
    with contextlib.suppress(OSError):
        work_dir.rmdir()
    logger.debug("model written to %s", target)

"""Atomic outputs: old outputs survive failures; existing outputs are refused without force."""

from __future__ import annotations

import os

import pytest

from itreg.errors import ConfigError, OutputExistsError
from itreg.io import atomic_output_dir, atomic_output_file
from itreg.io.outputs import OUTPUT_MANIFEST, read_manifest


def _snapshot(folder):
    """Every file under `folder` but itreg's hidden manifest, as {relative path: bytes}."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*")
            if p.is_file() and p.name != OUTPUT_MANIFEST}


def test_new_folder_appears_complete(tmp_path):
    target = tmp_path / "sub" / "out"
    with atomic_output_dir(target) as tmp:
        assert tmp.parent == target.parent and tmp.is_dir() and not target.exists()
        (tmp / "a.txt").write_text("A")
    assert _snapshot(target) == {"a.txt": b"A"}
    assert sorted(p.name for p in target.parent.iterdir()) == ["out"]


def test_existing_folder_without_force_is_refused_and_untouched(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    entered = False
    with pytest.raises(OutputExistsError, match="out.*--force"), atomic_output_dir(target):
        entered = True
    assert not entered
    assert _snapshot(target) == {"old.txt": b"old"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt()])
def test_failure_inside_keeps_old_outputs(tmp_path, exc):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(type(exc)), atomic_output_dir(target, force=True) as tmp:
        (tmp / "half.txt").write_text("half")
        raise exc
    assert _snapshot(target) == {"old.txt": b"old"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_force_replaces_only_itregs_files_after_success(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    with atomic_output_dir(target, force=True) as tmp:
        (tmp / "a.txt").write_text("A1")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "b.txt").write_text("B1")
    assert _snapshot(target) == {"notes.txt": b"mine", "a.txt": b"A1", "sub/b.txt": b"B1"}
    assert read_manifest(target) == ["a.txt", "sub/b.txt"]
    with atomic_output_dir(target, force=True) as tmp:
        (tmp / "a.txt").write_text("A2")
        assert _snapshot(target)["a.txt"] == b"A1"  # old outputs stay while writing
    # sub/b.txt was itreg's (manifest) and is not written again: it goes, with its folder;
    # the user's file stays byte-identical
    assert _snapshot(target) == {"notes.txt": b"mine", "a.txt": b"A2"}
    assert not (target / "sub").exists()
    assert sorted(p.name for p in target.iterdir()) == [OUTPUT_MANIFEST, "a.txt", "notes.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_force_never_writes_over_an_input_or_replaces_a_file(tmp_path):
    target = tmp_path / "inp"
    target.mkdir()
    (target / "moving.nii.gz").write_bytes(b"input")
    with pytest.raises(OutputExistsError, match="input"), \
            atomic_output_dir(target, force=True, protect=[target / "moving.nii.gz"]) as tmp:
        (tmp / "moving.nii.gz").write_bytes(b"output")
    assert _snapshot(target) == {"moving.nii.gz": b"input"}
    with pytest.raises(OutputExistsError, match="input"), \
            atomic_output_dir(target, force=True, protect=[target]):
        pass
    a_file = tmp_path / "existing.txt"
    a_file.write_text("keep")
    with pytest.raises(OutputExistsError, match="existing file"), \
            atomic_output_dir(a_file, force=True):
        pass
    assert a_file.read_text() == "keep"
    with pytest.raises(ConfigError, match="named like a file"), \
            atomic_output_dir(tmp_path / "typo" / "moving.nii.gz", force=True):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing.txt", "inp"]


def test_dot_and_an_empty_folder_work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "fixed.nii.gz").write_bytes(b"F")
    with atomic_output_dir(".", force=True, protect=["fixed.nii.gz"]) as tmp:
        (tmp / "report.json").write_text("{}")
    assert _snapshot(tmp_path) == {"fixed.nii.gz": b"F", "report.json": b"{}"}
    (tmp_path / "empty").mkdir()
    with atomic_output_dir("empty") as tmp:  # an empty folder needs no --force
        (tmp / "x.txt").write_text("x")
    assert _snapshot(tmp_path / "empty") == {"x.txt": b"x"}


def test_error_messages_name_the_target_not_the_temporary_folder(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(ConfigError) as info, atomic_output_dir(target) as tmp:
        raise ConfigError(f"cannot write {tmp / 'warped.nii.gz'}")
    assert str(target / "warped.nii.gz") in str(info.value) and "itreg-tmp" not in str(info.value)


def test_leftovers_of_a_killed_run_are_cleaned_by_the_next_run(tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    pid = int(dead.stdout)
    stale_dir = tmp_path / f".itreg-tmp-{pid}-0123456789ab-out"
    stale_dir.mkdir()
    (stale_dir / "warped.nii.gz").write_bytes(b"partial")
    stale_file = tmp_path / f".itreg-tmp-{pid}-0123456789ab-img.nii.gz"
    stale_file.write_bytes(b"partial")
    live = tmp_path / f".itreg-tmp-{os.getpid()}-0123456789ab-out"  # a running process's
    live.mkdir()
    with atomic_output_dir(tmp_path / "out") as tmp:
        (tmp / "a.txt").write_text("A")
    assert not stale_dir.exists() and live.exists() and stale_file.exists()
    with atomic_output_file(tmp_path / "img.nii.gz") as tmp:
        tmp.write_bytes(b"img")
    assert not stale_file.exists()
    # a killed merge: old outputs moved aside and not yet replaced come back
    out = tmp_path / "out"
    aside = out / f".itreg-old-{pid}-0123456789ab-out"
    aside.mkdir()
    (aside / "b.txt").write_text("B-old")
    with atomic_output_dir(out, force=True) as tmp:
        (tmp / "a.txt").write_text("A2")
    assert _snapshot(out) == {"a.txt": b"A2", "b.txt": b"B-old"}


def test_atomic_output_file(tmp_path):
    target = tmp_path / "img.nii.gz"
    with atomic_output_file(target) as tmp:
        assert tmp.name.endswith("img.nii.gz") and tmp.parent == tmp_path
        tmp.write_bytes(b"one")
    assert target.read_bytes() == b"one"
    with pytest.raises(OutputExistsError, match="img.nii.gz"), atomic_output_file(target):
        pass
    with pytest.raises(ValueError), atomic_output_file(target, force=True) as tmp:
        tmp.write_bytes(b"half")
        raise ValueError("boom")
    assert target.read_bytes() == b"one"
    with atomic_output_file(target, force=True) as tmp:
        tmp.write_bytes(b"two")
    assert target.read_bytes() == b"two"
    assert [p.name for p in tmp_path.iterdir()] == ["img.nii.gz"]


def test_atomic_output_file_refusals(tmp_path):
    with pytest.raises(OutputExistsError, match="folder"), atomic_output_file(tmp_path, force=True):
        pass
    with pytest.raises(ConfigError, match="two-file"), atomic_output_file(tmp_path / "a.mhd"):
        pass

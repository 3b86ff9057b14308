"""Atomic outputs: old outputs survive failures; existing outputs are refused without force."""

from __future__ import annotations

import pytest

from itreg.errors import ConfigError, OutputExistsError
from itreg.io import atomic_output_dir, atomic_output_file


def _snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*")
            if p.is_file()}


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


def test_force_replaces_only_after_success(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with atomic_output_dir(target, force=True) as tmp:
        (tmp / "new.txt").write_text("new")
        assert _snapshot(target) == {"old.txt": b"old"}  # still there while writing
    assert _snapshot(target) == {"new.txt": b"new"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


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

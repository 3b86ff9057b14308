"""Landmark files: CSV, Slicer .fcsv (RAS/LPS), elastix point files, and their errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from itreg.errors import ConfigError, GeometryError
from itreg.io import read_landmarks, write_landmarks


@pytest.mark.parametrize("name", ["p.csv", "p.fcsv", "p.pts", "p.txt"])
def test_round_trip_is_exact(tmp_path, name):
    pts = torch.tensor([[1.0, -2.5, 3.125], [1e-7, 123.456789012345, -0.1]], dtype=torch.float64)
    path = write_landmarks(pts, tmp_path / name)
    back = read_landmarks(path, dtype=torch.float64)
    assert torch.equal(back, pts)
    assert [p.name for p in tmp_path.iterdir()] == [name]


def test_2d_csv_with_and_without_header(tmp_path):
    (tmp_path / "a.csv").write_text("x,y\n1,2\n3.5,-4\n")
    (tmp_path / "b.csv").write_text("# comment\n1 2\n\n3.5\t-4\n")
    expected = torch.tensor([[1.0, 2.0], [3.5, -4.0]])
    assert torch.equal(read_landmarks(tmp_path / "a.csv"), expected)
    assert torch.equal(read_landmarks(tmp_path / "b.csv"), expected)


def test_header_selects_xyz_columns(tmp_path):
    (tmp_path / "c.csv").write_text("label,Z,X,Y\nA,3,1,2\nB,6,4,5\n")
    got = read_landmarks(tmp_path / "c.csv")
    assert torch.equal(got, torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]))


@pytest.mark.parametrize("system, sign", [("RAS", -1.0), ("0", -1.0), ("LPS", 1.0), ("1", 1.0),
                                          (None, -1.0)])
def test_slicer_fcsv_is_converted_to_lps(tmp_path, system, sign):
    lines = ["# Markups fiducial file version = 4.11"]
    if system is not None:
        lines.append(f"# CoordinateSystem = {system}")
    lines += ["# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID",
              "vtkMRMLMarkupsFiducialNode_0,10.5,-20,30,0,0,0,1,1,1,0,F-1,,",
              "vtkMRMLMarkupsFiducialNode_1,1,2,3,0,0,0,1,1,1,0,F-2,,"]
    (tmp_path / "f.fcsv").write_text("\n".join(lines) + "\n")
    got = read_landmarks(tmp_path / "f.fcsv", dtype=torch.float64)
    expected = np.array([[10.5 * sign, -20 * sign, 30], [1 * sign, 2 * sign, 3]])
    np.testing.assert_array_equal(got.numpy(), expected)


def test_elastix_point_file(tmp_path):
    (tmp_path / "e.txt").write_text("point\n2\n1.5 2.5 3.5\n-1 -2 -3\n")
    got = read_landmarks(tmp_path / "e.txt")
    assert torch.equal(got, torch.tensor([[1.5, 2.5, 3.5], [-1.0, -2.0, -3.0]]))
    (tmp_path / "i.txt").write_text("index\n1\n1 2 3\n")
    with pytest.raises(ConfigError, match="voxel indices"):
        read_landmarks(tmp_path / "i.txt")
    (tmp_path / "n.txt").write_text("point\n3\n1 2 3\n")
    with pytest.raises(ConfigError, match="says it has 3 points but holds 1"):
        read_landmarks(tmp_path / "n.txt")


@pytest.mark.parametrize("text, match", [
    ("x,y,z\n1,2,3\n4,five,6\n", r"line 3.*expected numbers"),
    ("1,2,3\n4,5\n", r"line 2.*same dimension"),
    ("a,b\n1,2\n", r"line 1.*x and y"),
    ("1,2,3,4\n", r"4 coordinates"),
    ("# nothing\n", r"no points"),
    ("1,nan,3\n", r"line 1.*non-finite"),
])
def test_malformed_files_name_the_file_and_line(tmp_path, text, match):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match) as info:
        read_landmarks(path)
    assert "bad.csv" in str(info.value)


def test_missing_file_and_bad_points(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        read_landmarks(tmp_path / "none.csv")
    with pytest.raises(GeometryError, match=r"\(N, 2\) or \(N, 3\)"):
        write_landmarks(torch.zeros(3, 4), tmp_path / "x.csv")
    with pytest.raises(GeometryError, match="NaN"):
        write_landmarks(torch.tensor([[float("nan"), 0.0]]), tmp_path / "x.csv")
    with pytest.raises(GeometryError, match="3D"):
        write_landmarks(torch.zeros(2, 2), tmp_path / "x.fcsv")
    assert not list(tmp_path.iterdir())

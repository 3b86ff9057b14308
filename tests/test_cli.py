"""The command line end to end, and its behaviour on bad input (notes/reliability.md)."""

import json
import subprocess
import sys

import numpy as np
import pytest
import SimpleITK as sitk

SHIFT = (3.0, -2.0)  # true translation in mm: fixed point x maps to moving point x + SHIFT


def blob_image(shape=(64, 64), spacing=(1.0, 1.0), shift=(0.0, 0.0), remap=False):
    """Smooth 2D phantom; `shift` moves the content by +shift mm, `remap` changes contrast."""
    y, x = np.mgrid[: shape[0], : shape[1]].astype(np.float64)
    x = x * spacing[0] - shift[0]
    y = y * spacing[1] - shift[1]
    img = np.zeros(shape)
    for cx, cy, r, v in [(30, 30, 14, 1.0), (22, 36, 5, 0.3), (40, 26, 6, 0.6), (34, 40, 4, 0.1)]:
        img += v * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r**2))
    if remap:
        img = np.exp(-3 * img) + 0.02 * np.sin(x / 3.0)  # nonlinear, non-monotone contrast
    out = sitk.GetImageFromArray(img.astype(np.float32))
    out.SetSpacing(spacing)
    return out


@pytest.fixture
def pair(tmp_path):
    fixed = tmp_path / "fixed.nii.gz"
    moving = tmp_path / "moving.nii.gz"
    sitk.WriteImage(blob_image(), str(fixed))
    sitk.WriteImage(blob_image(shift=SHIFT, remap=True), str(moving))
    return fixed, moving


FAST = ["--set", "iterations=40", "--quiet"]


def test_register_writes_outputs_that_simpleitk_applies(pair, tmp_path, cli):
    fixed, moving = pair
    out = tmp_path / "out"
    code, _, err = cli(["register", str(fixed), str(moving), "-o", str(out),
                             "--transform", "rigid", "--metric", "mi", *FAST])
    assert code == 0, err
    assert {p.name for p in out.iterdir() if not p.name.startswith(".")} >= \
        {"warped.nii.gz", "transform.tfm", "report.json"}
    report = json.loads((out / "report.json").read_text())
    assert report["wall_time_s"] > 0
    tfm = sitk.ReadTransform(str(out / "transform.tfm"))
    moved = np.array(tfm.TransformPoint((31.0, 30.0))) - (31.0, 30.0)
    np.testing.assert_allclose(moved, SHIFT, atol=0.3)

    # `itreg apply` with the written transform reproduces the warped image.
    applied = tmp_path / "applied.nii.gz"
    code, _, err = cli(["apply", str(moving), "--reference", str(fixed), "--transform",
                        str(out / "transform.tfm"), "-o", str(applied)])
    assert code == 0, err
    a = sitk.GetArrayFromImage(sitk.ReadImage(str(applied)))
    w = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "warped.nii.gz")))
    np.testing.assert_allclose(a, w, atol=1e-4)


def test_deformable_run_writes_a_displacement_field(pair, tmp_path, cli):
    fixed, moving = pair
    out = tmp_path / "out"
    code, _, err = cli(["register", str(fixed), str(moving), "-o", str(out), "--transform",
                        "bspline", "--set", "iterations=10", "--quiet", "--outputs",
                        "warped,transform,field"])
    assert code == 0, err
    field = sitk.ReadImage(str(out / "displacement.nii.gz"), sitk.sitkVectorFloat64)
    ref = sitk.ReadImage(str(fixed))
    assert field.GetSize() == ref.GetSize()
    # The field holds the whole transform: near the linear part's map in the image centre.
    dft = sitk.DisplacementFieldTransform(field)
    tfm = sitk.ReadTransform(str(out / "transform.tfm"))
    p = (31.0, 30.0)
    assert np.linalg.norm(np.subtract(dft.TransformPoint(p), tfm.TransformPoint(p))) < 2.0
    labels = tmp_path / "labels.nii.gz"
    lab = sitk.Cast(sitk.ReadImage(str(moving)) < 0.5, sitk.sitkUInt8)
    sitk.WriteImage(lab, str(labels))
    code, _, err = cli(["apply", str(labels), "-r", str(fixed), "-t",
                        str(out / "displacement.nii.gz"), "-o", str(tmp_path / "l.nii.gz"),
                        "--labels"])
    assert code == 0, err
    warped = sitk.ReadImage(str(tmp_path / "l.nii.gz"))
    assert warped.GetPixelID() == sitk.sitkUInt8
    assert set(np.unique(sitk.GetArrayFromImage(warped))) <= {0, 1}


def bad_inputs(tmp_path, kind):
    """Build the file set for one bad-input case; returns the register arguments."""
    fixed = tmp_path / "fixed.nii.gz"
    sitk.WriteImage(blob_image(), str(fixed))
    moving = tmp_path / "moving.nii.gz"
    extra = []
    if kind == "missing":
        moving = tmp_path / "nope.nii.gz"
    elif kind == "directory":
        moving = tmp_path / "adir"
        moving.mkdir()
    elif kind == "truncated":
        sitk.WriteImage(blob_image(remap=True), str(moving))
        data = moving.read_bytes()
        moving.write_bytes(data[: len(data) // 2])
    elif kind == "nan":
        arr = sitk.GetArrayFromImage(blob_image(remap=True))
        arr[3, 4] = np.nan
        sitk.WriteImage(sitk.GetImageFromArray(arr), str(moving))
    elif kind == "constant":
        sitk.WriteImage(sitk.GetImageFromArray(np.ones((64, 64), np.float32)), str(moving))
    elif kind == "dimension":
        sitk.WriteImage(sitk.GetImageFromArray(np.random.rand(8, 64, 64).astype(np.float32)),
                        str(moving))
    elif kind == "empty-mask":
        sitk.WriteImage(blob_image(remap=True), str(moving))
        mask = tmp_path / "mask.nii.gz"
        sitk.WriteImage(sitk.Image(64, 64, sitk.sitkUInt8), str(mask))
        extra = ["--fixed-mask", str(mask)]
    elif kind == "no-overlap":
        far = blob_image(remap=True)
        far.SetOrigin((5000.0, 5000.0))
        sitk.WriteImage(far, str(moving))
        extra = ["--init", "none"]
    elif kind == "unknown-metric":
        sitk.WriteImage(blob_image(remap=True), str(moving))
        extra = ["--metric", "mutual"]
    return [str(fixed), str(moving), *extra]


@pytest.mark.parametrize("kind, words", [
    ("missing", "nope.nii.gz"),
    ("directory", "adir"),
    ("truncated", "moving.nii.gz"),
    ("nan", "NaN"),
    ("constant", "constant"),
    ("dimension", "3D"),
    ("empty-mask", "mask"),
    ("no-overlap", "overlap"),
    ("unknown-metric", "nmi"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, cli, kind, words):
    args = bad_inputs(tmp_path, kind)
    out = tmp_path / "out"
    code, _, err = cli(["register", args[0], args[1], "-o", str(out), *args[2:], *FAST])
    assert code == 2, err
    assert err.startswith("itreg: error: ") and err.count("\n") == 1, err
    assert words in err
    assert "Traceback" not in err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".itreg")]


def test_existing_output_is_not_touched_without_force(pair, tmp_path, cli):
    fixed, moving = pair
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    code, _, err = cli(["register", str(fixed), str(moving), "-o", str(out), *FAST])
    assert code == 2 and "--force" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    applied = tmp_path / "a.nii.gz"
    applied.write_text("old")
    code, _, err = cli(["apply", str(moving), "-r", str(fixed), "-t", str(out / "keep.txt"),
                        "-o", str(applied)])
    assert code == 2 and applied.read_text() == "old"


def test_debug_shows_traceback_and_console_script_exit_code(tmp_path):
    missing = tmp_path / "x.nii.gz"
    proc = subprocess.run(
        [sys.executable, "-m", "itreg.cli", "--debug", "apply", str(missing), "-r", str(missing),
         "-t", str(missing), "-o", str(tmp_path / "o.nii.gz")],
        check=False, capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" in proc.stderr and "itreg: error:" in proc.stderr


def test_demo_runs_end_to_end_on_bundled_data(tmp_path, cli):
    out = tmp_path / "demo"
    code, stdout, err = cli(["demo", "-o", str(out), "--spacing", "6", "--quiet"])
    assert code == 0, err
    assert "mean error over the brain" in stdout
    names = {p.name for p in out.iterdir()}
    assert {"before_after.png", "warped.nii.gz", "transform.tfm", "report.json",
            "true_transform.tfm"} <= names
    report = json.loads((out / "report.json").read_text())
    # A 6 mm phantom is coarse; the error must still fall far below the initial misalignment.
    assert report["error"]["after"]["mean_mm"] < 0.2 * report["error"]["before"]["mean_mm"]

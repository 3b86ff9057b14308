"""itreg phantom / itreg evaluate: files, manifest, ground-truth round trips through SimpleITK."""

import json

import numpy as np
import pytest
import SimpleITK as sitk
from click.testing import CliRunner

from itreg.cli import app
from itreg.errors import ConfigError, GeometryError, OutputExistsError
from itreg.phantoms.write import write_phantom


def _run(args):
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def _brain_points(folder, name):
    mask = sitk.ReadImage(str(folder / name))
    arr = sitk.GetArrayFromImage(mask)
    idx = np.argwhere(arr != 0)[:, ::-1]  # ITK index order
    return np.array([mask.TransformContinuousIndexToPhysicalPoint(i.astype(float).tolist())
                     for i in idx])


@pytest.fixture(scope="module")
def ffd_pair(tmp_path_factory):
    out = tmp_path_factory.mktemp("ph") / "ffd"
    _run(["phantom", str(out), "--ndim", "2", "--spacing", "4", "--misalign", "ffd",
          "--seed", "3"])
    return out


def test_ffd_pair_files_and_round_trip_through_sitk(ffd_pair):
    man = json.loads((ffd_pair / "phantom.json").read_text())
    assert man["kind"] == "pair" and man["misalign"] == "ffd"
    for name in man["files"]:
        assert (ffd_pair / name).exists(), name
    assert man["inverse_residual"]["max_mm"] < 0.05
    fwd = sitk.ReadTransform(str(ffd_pair / "transform.tfm"))
    assert "BSpline" in fwd.GetName()
    inv = sitk.DisplacementFieldTransform(
        sitk.ReadImage(str(ffd_pair / "inverse_field.nii.gz"), sitk.sitkVectorFloat64))
    field = sitk.DisplacementFieldTransform(
        sitk.ReadImage(str(ffd_pair / "transform_field.nii.gz"), sitk.sitkVectorFloat64))
    # Moving brain voxel centres: T(T^-1(y)) = y (inverse field read at its own voxels).
    ys = _brain_points(ffd_pair, "moving_mask.nii.gz")
    err = [np.linalg.norm(np.array(fwd.TransformPoint(inv.TransformPoint(y.tolist()))) - y)
           for y in ys]
    assert max(err) < 0.1  # measured: max ~0.01 mm
    # Fixed brain voxel centres: T^-1(T(x)) = x (inverse field interpolated at 4 mm).
    xs = _brain_points(ffd_pair, "fixed_mask.nii.gz")
    back = [np.linalg.norm(np.array(inv.TransformPoint(fwd.TransformPoint(x.tolist()))) - x)
            for x in xs]
    assert np.mean(back) < 0.1
    # The B-spline file and the displacement-field file are the same map on the fixed grid.
    diff = [np.linalg.norm(np.array(fwd.TransformPoint(x.tolist()))
                           - np.array(field.TransformPoint(x.tolist()))) for x in xs]
    assert max(diff) < 1e-3
    # Landmarks: moving = T(fixed).
    pf = np.loadtxt(ffd_pair / "fixed_landmarks.csv", delimiter=",", skiprows=1)
    pm = np.loadtxt(ffd_pair / "moving_landmarks.csv", delimiter=",", skiprows=1)
    assert max(np.linalg.norm(np.array(fwd.TransformPoint(p.tolist())) - q)
               for p, q in zip(pf, pm)) < 1e-3


def test_ffd_pair_labels_realign_through_sitk(ffd_pair):
    fixed = sitk.ReadImage(str(ffd_pair / "fixed_labels.nii.gz"))
    moving = sitk.ReadImage(str(ffd_pair / "moving_labels.nii.gz"))
    fwd = sitk.ReadTransform(str(ffd_pair / "transform.tfm"))
    warped = sitk.Resample(moving, fixed, fwd, sitk.sitkNearestNeighbor, 0)
    agree = (sitk.GetArrayFromImage(warped) == sitk.GetArrayFromImage(fixed)).mean()
    assert agree > 0.95


def test_evaluate_cli_on_the_phantom(ffd_pair, tmp_path):
    f = ffd_pair
    report = tmp_path / "r.json"
    _run(["evaluate", "--fixed-labels", str(f / "fixed_labels.nii.gz"),
          "--warped-labels", str(f / "fixed_labels.nii.gz"),
          "--landmarks-fixed", str(f / "fixed_landmarks.csv"),
          "--landmarks-moving", str(f / "moving_landmarks.csv"),
          "--transform", str(f / "transform.tfm"),
          "--true-transform", str(f / "transform_field.nii.gz"),
          "--reference", str(f / "fixed.nii.gz"), "--mask", str(f / "fixed_mask.nii.gz"),
          "--displacement", str(f / "transform_field.nii.gz"), "-o", str(report)])
    r = json.loads(report.read_text())
    assert r["dice"]["mean"] == 1.0 and r["surface"]["mean_hd95_mm"] == 0.0
    assert r["tre"]["max_mm"] < 1e-3 and r["landmarks_initial"]["mean_mm"] > 0.5
    assert r["warping_error"]["max_mm"] < 1e-3
    assert r["jacobian"]["folding_fraction"] == 0.0
    assert r["jacobian_displacement"]["det_mean"] == pytest.approx(
        r["jacobian"]["det_mean"], abs=0.05)
    out = _run(["evaluate", "--fixed-labels", str(f / "fixed_labels.nii.gz"),
                "--warped-labels", str(f / "fixed_labels.nii.gz"), "--no-surface"])
    assert json.loads(out)["dice"]["mean"] == 1.0 and "surface" not in json.loads(out)
    with pytest.raises(GeometryError):  # the CLI's main() turns this into exit code 2
        CliRunner().invoke(app, ["evaluate", "--fixed-labels", str(f / "fixed_labels.nii.gz"),
                                 "--warped-labels", str(f / "moving_labels.nii.gz")],
                           catch_exceptions=False)
    with pytest.raises(ConfigError):
        CliRunner().invoke(app, ["evaluate"], catch_exceptions=False)


def test_linear_pair_round_trip_and_refusal(tmp_path):
    out = tmp_path / "rigid"
    man = write_phantom(out, "pair", misalign="rigid", spacing_mm=4.0, ndim=2, seed=1)
    assert {"transform.tfm", "inverse.tfm"} <= set(man["files"])
    fwd = sitk.ReadTransform(str(out / "transform.tfm"))
    inv = sitk.ReadTransform(str(out / "inverse.tfm"))
    xs = _brain_points(out, "fixed_mask.nii.gz")
    err = max(np.linalg.norm(np.array(inv.TransformPoint(fwd.TransformPoint(x.tolist()))) - x)
              for x in xs)
    assert err < 1e-4
    with pytest.raises(OutputExistsError):
        write_phantom(out, "pair", misalign="rigid", spacing_mm=4.0, ndim=2)


def test_group_and_dynamic_cli(tmp_path):
    g = tmp_path / "g"
    _run(["phantom", str(g), "--kind", "group", "--ndim", "2", "--spacing", "4",
          "--misalign", "rigid", "--n", "3", "--contrast", "t1,t2"])
    man = json.loads((g / "phantom.json").read_text())
    assert man["contrasts"] == ["t1", "t2", "t1"]
    assert (g / "misalignment_02.tfm").exists() and (g / "image_02.nii.gz").exists()
    args = ["evaluate", "--reference", str(g / "common_mask.nii.gz"),
            "--mask", str(g / "common_mask.nii.gz")]
    for j in range(3):
        args += ["--estimated", str(g / f"transform_{j:02d}.tfm"),
                 "--misalignment", str(g / f"misalignment_{j:02d}.tfm")]
    r = json.loads(_run(args))
    assert r["gwi"]["value_mm"] < 1e-3 and r["gre"]["value_mm"] < 1e-3
    d = tmp_path / "d"
    _run(["phantom", str(d), "--kind", "dynamic", "--ndim", "2", "--spacing", "4",
          "--frames", "3"])
    man = json.loads((d / "phantom.json").read_text())
    assert len(man["curves"]["intensity"]) == 3 and (d / "frame_002.nii.gz").exists()

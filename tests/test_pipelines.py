"""Pipelines: register's transform.h5 and inverse outputs, read by SimpleITK and chained by
``itreg apply`` / ``apply-points``; point lists in CSV, .fcsv and .mrk.json."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from test_cli import SHIFT, blob_image

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def pair(tmp_path):
    fixed, moving = tmp_path / "fixed.nii.gz", tmp_path / "moving.nii.gz"
    sitk.WriteImage(blob_image(), str(fixed))
    sitk.WriteImage(blob_image(shift=SHIFT, remap=True), str(moving))
    return fixed, moving


def _register(cli, pair, out, kind, iterations=30, extra=()):
    code, _, err = cli(["register", str(pair[0]), str(pair[1]), "-o", str(out), "-t", kind,
                        "--set", f"iterations={iterations}", "-q", "--threads", "1", *extra])
    assert code == 0, err


def _resample(moving, fixed, tx):
    return sitk.GetArrayFromImage(sitk.Resample(sitk.ReadImage(str(moving)),
                                                sitk.ReadImage(str(fixed)), tx,
                                                sitk.sitkLinear, 0.0, sitk.sitkFloat32))


def _arr(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def test_linear_run_writes_exact_h5_and_inverse(cli, pair, tmp_path):
    out = tmp_path / "out"
    _register(cli, pair, out, "affine")
    names = {p.name for p in out.iterdir()}
    assert {"transform.h5", "inverse.tfm", "transform.tfm"} <= names
    assert "inverse_displacement.nii.gz" not in names
    h5 = sitk.ReadTransform(str(out / "transform.h5"))
    warped = _arr(out / "warped.nii.gz")
    assert np.abs(_resample(pair[1], pair[0], h5) - warped).max() < 1e-3 * np.ptp(warped)
    fwd = sitk.ReadTransform(str(out / "transform.tfm"))
    inv = sitk.ReadTransform(str(out / "inverse.tfm"))
    for p in [(31.0, 30.0), (0.0, 0.0), (60.0, 5.0)]:
        np.testing.assert_allclose(inv.TransformPoint(fwd.TransformPoint(p)), p, atol=1e-9)
    np.testing.assert_allclose(np.subtract(fwd.TransformPoint((31.0, 30.0)), (31.0, 30.0)),
                               SHIFT, atol=0.3)
    # apply -t [transform.tfm,1] is the same map as apply -t inverse.tfm.
    outs = []
    for spec in (f"[{out / 'transform.tfm'},1]", str(out / "inverse.tfm")):
        dst = tmp_path / f"back{len(outs)}.nii.gz"
        code, _, err = cli(["apply", str(out / "warped.nii.gz"), "-r", str(pair[1]), "-t", spec,
                            "-o", str(dst), "-q"])
        assert code == 0, err
        outs.append(_arr(dst))
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-5)


@pytest.mark.parametrize("kind", ["bspline", "dense", "svf"])
def test_deformable_run_h5_reproduces_warped_and_inverse_field_undoes_it(cli, pair, tmp_path,
                                                                          kind):
    out = tmp_path / kind
    _register(cli, pair, out, kind, iterations=20, extra=("--outputs", "all"))
    h5 = sitk.ReadTransform(str(out / "transform.h5"))
    assert h5.GetName() == "CompositeTransform"
    warped = _arr(out / "warped.nii.gz")
    assert np.abs(_resample(pair[1], pair[0], h5) - warped).max() < 1e-3 * np.ptp(warped)
    inv_img = sitk.ReadImage(str(out / "inverse_displacement.nii.gz"), sitk.sitkVectorFloat64)
    moving = sitk.ReadImage(str(pair[1]))
    assert inv_img.GetSize() == moving.GetSize()
    assert inv_img.GetOrigin() == moving.GetOrigin()
    inv = sitk.DisplacementFieldTransform(inv_img)
    # inverse(T(x)) == x through SimpleITK, over the points T keeps inside the moving image.
    pts = [(float(x), float(y)) for x in range(12, 52, 5) for y in range(12, 52, 5)]
    err = [np.linalg.norm(np.subtract(inv.TransformPoint(h5.TransformPoint(p)), p)) for p in pts]
    assert np.mean(err) < 0.05 and np.max(err) < 0.3, (np.mean(err), np.max(err))
    report = json.loads((out / "report.json").read_text())
    ic = report["inverse_consistency"]
    assert ic["region"] == "overlap" and ic["points"] > 1000
    assert ic["mean_mm"] < 0.05 and ic["p95_mm"] < 0.1, ic
    assert {"transform.h5", "inverse_displacement.nii.gz"} <= set(report["outputs"])


def _brain_inverse_consistency(kind, ndim, tmp_path, iterations):
    from itreg import io
    from itreg.api import register
    from itreg.phantoms.pairs import brain_pair, brain_slice_pair
    from itreg.results import save_registration

    make = brain_pair if ndim == 3 else brain_slice_pair
    pair = make(spacing_mm=2.0, kind="ffd", seed=0, sigma_mm=3.0)
    io.write_image(pair.fixed_mask, tmp_path / "mask.nii.gz")
    res = register(pair.fixed, pair.moving, transform=kind, fixed_mask=pair.fixed_mask,
                   overrides={"iterations": iterations}, progress=False)
    out = tmp_path / kind
    save_registration(res, out, inputs={"fixed_mask": tmp_path / "mask.nii.gz"}, outputs="all")
    ic = json.loads((out / "report.json").read_text())["inverse_consistency"]
    assert ic["region"] == "fixed mask"
    assert ic["points"] == int(pair.fixed_mask.data.bool().sum())
    # transform.h5 through SimpleITK reproduces warped.nii.gz over the brain.
    h5 = sitk.ReadTransform(str(out / "transform.h5"))
    ref = sitk.Resample(io.to_sitk(pair.moving), io.to_sitk(pair.fixed), h5, sitk.sitkLinear,
                        0.0, sitk.sitkFloat32)
    warped = _arr(out / "warped.nii.gz")
    brain = pair.fixed_mask.data[0].bool().numpy()
    diff = np.abs(sitk.GetArrayFromImage(ref) - warped)[brain].mean()
    assert diff < 1e-3 * np.ptp(warped[brain]), diff
    return ic


@pytest.mark.parametrize("kind", ["bspline", "dense", "svf"])
def test_inverse_is_within_a_tenth_of_a_mm_over_the_brain_2d(kind, tmp_path):
    ic = _brain_inverse_consistency(kind, 2, tmp_path, iterations=30)
    assert ic["mean_mm"] < 0.05 and ic["p95_mm"] < 0.1, ic


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["bspline", "dense", "svf"])
def test_inverse_is_within_a_tenth_of_a_mm_over_the_brain_3d(kind, tmp_path):
    ic = _brain_inverse_consistency(kind, 3, tmp_path, iterations=20)
    assert ic["mean_mm"] < 0.05 and ic["p95_mm"] < 0.1, ic


# ---------------------------------------------------------------------------- points
def _chain(tmp_path):
    """A 3D affine (.mat) and B-spline (.h5), and SimpleITK's composite of ``-t a.mat -t b.h5``
    in ANTs' order (a first, then b)."""
    a = sitk.AffineTransform(3)
    a.SetMatrix((1.05, 0.08, 0.0, -0.05, 0.97, 0.04, 0.02, 0.0, 1.02))
    a.SetTranslation((1.3, -0.7, 2.1))
    a.SetCenter((0.0, 10.0, 5.0))
    ref = sitk.Image(20, 20, 20, sitk.sitkFloat32)
    ref.SetOrigin((-20.0, -20.0, -20.0))
    ref.SetSpacing((2.0, 2.0, 2.0))
    b = sitk.BSplineTransformInitializer(ref, (3, 3, 3), 3)
    b.SetParameters(np.random.default_rng(1).normal(0, 1.5, len(b.GetParameters())).tolist())
    sitk.WriteTransform(a, str(tmp_path / "a.mat"))
    sitk.WriteTransform(b, str(tmp_path / "b.h5"))
    return sitk.CompositeTransform([b, a])


PTS = np.array([[1.5, -2.0, 3.25], [10.0, 4.0, -6.0], [-8.5, 12.0, 0.5]])


def _apply_points(cli, src, dst, tmp_path, *extra):
    code, _, err = cli(["apply-points", str(src), "-t", str(tmp_path / "a.mat"), "-t",
                        str(tmp_path / "b.h5"), "-o", str(dst), "-q", *extra])
    assert code == 0, err


def test_csv_points_follow_the_chain_and_keep_their_columns(cli, tmp_path):
    comp = _chain(tmp_path)
    src = tmp_path / "p.csv"
    rows = "\n".join(f"{x},{y},{z},0,{i},point {i}" for i, (x, y, z) in enumerate(PTS))
    src.write_text(f"# landmarks\nx,y,z,t,label,comment\n{rows}\n")
    dst = tmp_path / "o.csv"
    _apply_points(cli, src, dst, tmp_path)
    lines = dst.read_text().splitlines()
    assert lines[:2] == ["# landmarks", "x,y,z,t,label,comment"]
    got = np.array([[float(v) for v in ln.split(",")[:3]] for ln in lines[2:]])
    expected = np.array([comp.TransformPoint(tuple(p)) for p in PTS])
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert [ln.split(",")[3:] for ln in lines[2:]] == [["0", str(i), f"point {i}"]
                                                      for i in range(3)]
    # The same points in RAS come back in RAS, mapped by the same LPS transform.
    ras = tmp_path / "ras.csv"
    ras.write_text("\n".join(f"{-x},{-y},{z}" for x, y, z in PTS) + "\n")
    _apply_points(cli, ras, tmp_path / "ras_o.csv", tmp_path, "--coordinates", "ras")
    got = np.loadtxt(tmp_path / "ras_o.csv", delimiter=",")
    np.testing.assert_allclose(got * [-1, -1, 1], expected, atol=1e-6)


def test_slicer_fcsv_and_mrk_json_are_mapped_in_their_own_systems(cli, tmp_path):
    comp = _chain(tmp_path)
    expected = np.array([comp.TransformPoint(tuple(p)) for p in PTS])
    header = ("# Markups fiducial file version = 4.11\n# CoordinateSystem = RAS\n"
              "# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID\n")
    body = "".join(f"vtkMRMLMarkupsFiducialNode_{i},{-x},{-y},{z},0,0,0,1,1,1,0,F-{i},,\n"
                   for i, (x, y, z) in enumerate(PTS))
    (tmp_path / "p.fcsv").write_text(header + body)
    _apply_points(cli, tmp_path / "p.fcsv", tmp_path / "o.fcsv", tmp_path)
    text = (tmp_path / "o.fcsv").read_text()
    assert text.startswith(header)
    rows = [ln.split(",") for ln in text.splitlines()[3:]]
    got = np.array([[float(v) for v in r[1:4]] for r in rows]) * [-1, -1, 1]
    np.testing.assert_allclose(got, expected, atol=1e-6)
    assert [r[11] for r in rows] == ["F-0", "F-1", "F-2"]

    doc = {"@schema": "https://raw.githubusercontent.com/slicer/slicer/master/Modules/Loadable/"
                      "Markups/Resources/Schema/markups-schema-v1.0.3.json#",
           "markups": [{"type": "Fiducial", "coordinateSystem": "LPS", "controlPoints": [
               {"id": "1", "label": "a", "position": PTS[0].tolist()}]},
               {"type": "Fiducial", "coordinateSystem": "RAS", "controlPoints": [
                   {"id": str(i), "label": f"b{i}", "position": [-p[0], -p[1], p[2]]}
                   for i, p in enumerate(PTS[1:])]}]}
    (tmp_path / "p.mrk.json").write_text(json.dumps(doc))
    _apply_points(cli, tmp_path / "p.mrk.json", tmp_path / "o.mrk.json", tmp_path)
    out = json.loads((tmp_path / "o.mrk.json").read_text())
    assert out["@schema"] == doc["@schema"]
    np.testing.assert_allclose(out["markups"][0]["controlPoints"][0]["position"], expected[0],
                               atol=1e-6)
    ras_pts = [cp["position"] for cp in out["markups"][1]["controlPoints"]]
    np.testing.assert_allclose(np.array(ras_pts) * [-1, -1, 1], expected[1:], atol=1e-6)
    assert out["markups"][1]["controlPoints"][1]["label"] == "b1"


def test_points_move_opposite_to_images(cli, pair, tmp_path):
    """A feature at fixed point p appears in the moving image at T(p): transform.tfm carries
    fixed points to moving space and [transform.tfm,1] brings them back."""
    out = tmp_path / "out"
    _register(cli, pair, out, "translation")
    fixed_pts = tmp_path / "f.csv"
    fixed_pts.write_text("x,y\n30.0,30.0\n22.0,36.0\n")
    moved = tmp_path / "m.csv"
    code, _, err = cli(["apply-points", str(fixed_pts), "-t", str(out / "transform.h5"), "-o",
                        str(moved), "-q"])
    assert code == 0, err
    got = np.loadtxt(moved, delimiter=",", skiprows=1)
    # The blob centred at fixed (30, 30) is centred at (30, 30) + SHIFT in the moving image.
    np.testing.assert_allclose(got, np.array([[30.0, 30.0], [22.0, 36.0]]) + SHIFT, atol=0.3)
    back = tmp_path / "b.csv"
    code, _, err = cli(["apply-points", str(moved), "-t", f"[{out / 'transform.tfm'},1]",
                        "-o", str(back), "-q"])
    assert code == 0, err
    np.testing.assert_allclose(np.loadtxt(back, delimiter=",", skiprows=1),
                               [[30.0, 30.0], [22.0, 36.0]], atol=1e-6)


def test_bad_point_files_exit_2_with_one_line(cli, tmp_path):
    _chain(tmp_path)
    cases = {
        "h.csv": ("a,b,c\n1,2,3\n", "x and y"),
        "n.csv": ("x,y,z\n1,nan,3\n", "non-finite"),
        "w.csv": ("x,y,z\n1,two,3\n", "numbers"),
        "e.csv": ("x,y,z\n", "no points"),
        "two.csv": ("x,y\n1,2\n", "2D points"),
        "j.mrk.json": ("{\"x\": 1}", "markups"),
    }
    for name, (text, match) in cases.items():
        (tmp_path / name).write_text(text)
        dst = tmp_path / ("out_" + name)
        code, _, err = cli(["apply-points", str(tmp_path / name), "-t", str(tmp_path / "a.mat"),
                            "-o", str(dst)])
        assert code == 2 and match in err and err.count("\n") == 1, (name, err)
        assert not dst.exists()
    (tmp_path / "ok.csv").write_text("x,y,z\n1,2,3\n")
    code, _, err = cli(["apply-points", str(tmp_path / "ok.csv"), "-t", str(tmp_path / "a.mat"),
                        "-o", str(tmp_path / "ok.fcsv")])
    assert code == 2 and "extension" in err


def test_python_api_round_trip_of_points(tmp_path):
    from itreg.io.points import read_point_table, render_point_table
    from itreg.pipeline import load_chain

    comp = _chain(tmp_path)
    chain = load_chain([tmp_path / "a.mat", tmp_path / "b.h5"])
    back = load_chain([tmp_path / "b.h5"]).inverse(tolerance_mm=1e-8)
    full_back = load_chain([f"[{tmp_path / 'a.mat'},1]"])
    p = torch.as_tensor(PTS)
    with torch.no_grad():
        q = chain(p)
        np.testing.assert_allclose(q.numpy(), [comp.TransformPoint(tuple(x)) for x in PTS],
                                   atol=1e-9)
        np.testing.assert_allclose(full_back(back(q)).numpy(), PTS, atol=1e-6)
    (tmp_path / "p.csv").write_text("x;y;z\n1;2;3\n")
    table = read_point_table(tmp_path / "p.csv")
    assert render_point_table(table, table.points + 1) == "x;y;z\n2.0;3.0;4.0\n"


# ---------------------------------------------------------------------------- groupwise
def test_groupwise_folders_hold_exact_h5_and_inverses(tmp_path):
    from itreg import io
    from itreg.groupwise import register_group
    from itreg.groupwise.api import save_group

    sys_path = __import__("sys").path
    sys_path.insert(0, str(__import__("pathlib").Path(__file__).parent / "groupwise"))
    try:
        from gw_data import make_group
    finally:
        sys_path.pop(0)
    images, _ = make_group(shifts=[(4.0, -3.0), (-3.0, 4.0), (1.0, 5.0)], size=32, spacing=4.0)
    paths = []
    for j, img in enumerate(images):
        paths.append(tmp_path / f"img{j}.nii.gz")
        io.write_image(img, paths[-1])
    result = register_group(paths, metric="vi", transform="ffd", iterations=3)
    out = save_group(result, tmp_path / "out", inputs=paths, outputs="all")
    report = json.loads((out / "report.json").read_text())
    for j in range(3):
        sub = out / str(j)
        assert {"transform.h5", "inverse_displacement.nii.gz"} <= {p.name for p in sub.iterdir()}
        assert f"{j}/transform.h5" in report["outputs"]
        h5 = sitk.ReadTransform(str(sub / "transform.h5"))
        field = sitk.DisplacementFieldTransform(
            sitk.ReadImage(str(sub / "displacement.nii.gz"), sitk.sitkVectorFloat64))
        inv = sitk.DisplacementFieldTransform(
            sitk.ReadImage(str(sub / "inverse_displacement.nii.gz"), sitk.sitkVectorFloat64))
        for p in [(0.0, 0.0), (10.0, -12.0), (-20.0, 8.0)]:
            q = h5.TransformPoint(p)
            np.testing.assert_allclose(q, field.TransformPoint(p), atol=0.01)  # interpolated
            np.testing.assert_allclose(inv.TransformPoint(q), p, atol=0.05)
        ic = report["inverse_consistency"][str(j)]
        assert ic["mean_mm"] < 0.05, ic


# ---------------------------------------------------------------------------- README example
@pytest.mark.slow
def test_readme_pipeline_example_runs_as_printed(tmp_path, cli, monkeypatch):
    import re
    import shlex
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    start = text.index("run as\nprinted by `tests/test_pipelines.py`")
    block = re.search(r"```bash\n(.*?)```", text[start:], re.DOTALL).group(1)
    commands = [shlex.split(ln) for ln in block.replace("\\\n", " ").splitlines() if ln.strip()]
    assert len(commands) == 6 and all(c[0] == "itreg" for c in commands)
    monkeypatch.chdir(tmp_path)
    pts = np.array([[-10.0, 5.0, 12.0], [20.0, -30.0, 8.0], [0.0, 0.0, 0.0]])
    for args in commands:
        if args[1] == "apply-points" and not (tmp_path / "points.csv").exists():
            fixed = sitk.ReadImage("ph/fixed.nii.gz")
            centre = np.array(fixed.TransformContinuousIndexToPhysicalPoint(
                [(n - 1) / 2 for n in fixed.GetSize()]))
            np.savetxt("points.csv", pts + centre, delimiter=",", header="x,y,z", comments="")
        code, _, err = cli(args[1:])
        assert code == 0, f"{shlex.join(args)}: {err}"
    back = np.loadtxt("points_back.csv", delimiter=",", skiprows=1)
    orig = np.loadtxt("points.csv", delimiter=",", skiprows=1)
    moved = np.loadtxt("points_in_moving.csv", delimiter=",", skiprows=1)
    assert np.abs(moved - orig).max() > 0.5  # the FFD moved them
    # The inverse field lives on the moving image's 4 mm grid: linear interpolation of it
    # costs a few tenths of a mm at most in a round trip.
    np.testing.assert_allclose(back, orig, atol=0.5)
    for name, ref in (("labels_on_fixed.nii.gz", "ph/fixed.nii.gz"),
                      ("labels_on_moving.nii.gz", "ph/moving.nii.gz")):
        lab = sitk.ReadImage(name)
        assert lab.GetSize() == sitk.ReadImage(ref).GetSize()
        assert set(np.unique(sitk.GetArrayFromImage(lab))) == {0, 1, 2, 3}

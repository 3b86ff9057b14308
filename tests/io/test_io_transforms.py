"""ITK transform files and displacement fields, checked against SimpleITK's own transforms."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from itreg import Grid
from itreg.errors import TransformFileError
from itreg.io import (
    read_displacement_field,
    read_transform,
    write_displacement_field,
    write_image,
    write_transform,
)
from itreg.transforms import (
    Affine,
    BSpline,
    Compose,
    DisplacementField,
    Identity,
    Rigid,
    Similarity,
    StationaryVelocityField,
    Translation,
)

TOL = 1e-4  # mm

OBLIQUE = tuple(np.array([[0.0, -1.0, 0.0], [0.8, 0.0, 0.6], [-0.6, 0.0, 0.8]]).ravel())


def _points(d: int, n: int = 20, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-120, 120, size=(n, d))


def _sitk_map(tx: sitk.Transform, pts: np.ndarray) -> np.ndarray:
    return np.array([tx.TransformPoint(tuple(float(v) for v in p)) for p in pts])


def _ours(t, pts: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return t(torch.as_tensor(pts, dtype=torch.float64)).double().numpy()


# ---------------------------------------------------------------------------- linear export
finite = {"allow_nan": False, "allow_infinity": False}


@st.composite
def linear_transforms(draw):
    d = draw(st.sampled_from([2, 3]))
    kind = draw(st.sampled_from(["rigid", "similarity", "affine", "translation"]))
    vec = st.lists(st.floats(-150, 150, **finite), min_size=d, max_size=d)
    center, translation = draw(vec), draw(vec)
    n_angles = 1 if d == 2 else 3
    angles = draw(st.lists(st.floats(-math.pi, math.pi, **finite), min_size=n_angles,
                           max_size=n_angles))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    if kind == "rigid":
        t = Rigid(d, center, translation, angles, dtype=dtype)
    elif kind == "similarity":
        t = Similarity(d, center, translation, angles, draw(st.floats(0.5, 2.0)), dtype=dtype)
    elif kind == "translation":
        t = Translation(d, center, translation, dtype=dtype)
    else:
        entries = st.floats(-0.4, 0.4, **finite)
        a = np.eye(d) + np.asarray(draw(st.lists(entries, min_size=d * d, max_size=d * d)))\
            .reshape(d, d)
        t = Affine(d, center, translation, a, dtype=dtype)
    return t


@settings(max_examples=25, deadline=None)
@given(t=linear_transforms(), ext=st.sampled_from(["tfm", "h5"]))
def test_linear_export_is_read_unchanged_by_simpleitk_and_back(t, ext):
    d = t.ndim
    pts = _points(d)
    expected = _ours(t, pts)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_transform(t, Path(tmp) / f"t.{ext}")
        tx = sitk.ReadTransform(str(path))
        assert tx.GetName() == "AffineTransform"
        np.testing.assert_allclose(_sitk_map(tx, pts), expected, atol=TOL, rtol=0)
        back = read_transform(path, dtype=torch.float64)
    assert isinstance(back, Affine)
    np.testing.assert_allclose(_ours(back, pts), expected, atol=TOL, rtol=0)
    np.testing.assert_allclose(back.center.numpy(), t.center.double().numpy(), atol=1e-6)


def test_file_holds_itk_affine_parameterisation(tmp_path):
    a = np.array([[1.1, 0.2, 0.0], [0.0, 0.9, -0.1], [0.05, 0.0, 1.0]])
    t = Affine(3, center=(1.5, -2.0, 30.0), translation=(4.0, 5.0, -6.0), matrix=a,
               dtype=torch.float64)
    text = write_transform(t, tmp_path / "a.tfm").read_text()
    assert "Transform: AffineTransform_double_3_3" in text
    params = [float(v) for v in text.split("Parameters:")[1].split("\n")[0].split()]
    fixed = [float(v) for v in text.split("FixedParameters:")[1].split()]
    np.testing.assert_allclose(params, list(a.ravel()) + [4.0, 5.0, -6.0])
    np.testing.assert_allclose(fixed, [1.5, -2.0, 30.0])


@pytest.mark.parametrize("ext", ["txt", "mat"])
def test_other_itk_extensions(tmp_path, ext):
    t = Rigid(3, center=(5.0, 6.0, 7.0), translation=(1.0, 2.0, 3.0), angles=(0.3, -0.2, 0.1),
              dtype=torch.float64)
    path = write_transform(t, tmp_path / f"r.{ext}")
    pts = _points(3)
    np.testing.assert_allclose(_sitk_map(sitk.ReadTransform(str(path)), pts), _ours(t, pts),
                               atol=TOL)
    np.testing.assert_allclose(_ours(read_transform(path), pts), _ours(t, pts), atol=TOL)


def test_linear_compositions_and_identity_are_written_as_one_affine(tmp_path):
    a = Rigid(3, center=(10.0, 0.0, -5.0), angles=(0.1, 0.2, 0.3), dtype=torch.float64)
    b = Affine(3, translation=(1.0, -2.0, 3.0), matrix=np.diag([1.1, 0.9, 1.2]),
               dtype=torch.float64)
    pts = _points(3)
    for t, name in [(Compose(a, b), "c.tfm"), (Identity(3), "i.tfm")]:
        path = write_transform(t, tmp_path / name)
        tx = sitk.ReadTransform(str(path))
        assert tx.GetName() == "AffineTransform"
        np.testing.assert_allclose(_sitk_map(tx, pts), _ours(t, pts), atol=TOL)


def test_nonlinear_without_itk_type_points_to_displacement_fields(tmp_path):
    grid = Grid((6, 5, 4), (2.0, 2.0, 2.0))
    svf = StationaryVelocityField(grid)
    with pytest.raises(TransformFileError, match="write_displacement_field"):
        write_transform(svf, tmp_path / "v.tfm")
    assert not list(tmp_path.iterdir())


def test_nan_parameters_and_bad_extension_are_refused(tmp_path):
    t = Affine(2, translation=(float("nan"), 0.0))
    with pytest.raises(TransformFileError, match="NaN"):
        write_transform(t, tmp_path / "n.tfm")
    with pytest.raises(TransformFileError, match="x.unknownext"):
        write_transform(Affine(2), tmp_path / "x.unknownext")
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------------- reading ITK files
def _sitk_linear_transforms():
    e3 = sitk.Euler3DTransform((10.0, -5.0, 20.0), 0.2, -0.3, 0.4, (1.0, 2.0, 3.0))
    s3 = sitk.Similarity3DTransform(1.3, (0.0, 0.6, 0.8), 0.5, (4.0, -3.0, 2.0), (7.0, 8.0, -9.0))
    v3 = sitk.VersorRigid3DTransform((0.0, 0.0, 1.0), 0.7, (2.0, 0.0, -1.0), (30.0, 0.0, 5.0))
    sc = sitk.ScaleTransform(3, (1.1, 0.8, 1.5))
    sc.SetCenter((3.0, 4.0, 5.0))
    tr = sitk.TranslationTransform(3, (5.0, -6.0, 7.0))
    e2 = sitk.Euler2DTransform((3.0, -4.0), 0.6, (1.5, 2.5))
    s2 = sitk.Similarity2DTransform(0.7, 0.3, (1.0, 1.0), (5.0, 6.0))
    ssv = sitk.ScaleSkewVersor3DTransform((1.1, 0.9, 1.0), (0.1, 0.0, 0.0, 0.0, 0.05, 0.0),
                                          (0.0, 1.0, 0.0), 0.3, (1.0, 2.0, 3.0), (4.0, 5.0, 6.0))
    comp = sitk.CompositeTransform([e3, s3, tr])
    return [("euler3d", e3), ("similarity3d", s3), ("versorrigid3d", v3), ("scale", sc),
            ("translation", tr), ("euler2d", e2), ("similarity2d", s2),
            ("scaleskewversor3d", ssv), ("composite", comp)]


@pytest.mark.parametrize("name, tx", _sitk_linear_transforms(), ids=lambda v: str(v)[:20])
@pytest.mark.parametrize("ext", ["tfm", "h5"])
def test_simpleitk_linear_files_are_read_as_the_same_map(tmp_path, name, tx, ext):
    path = tmp_path / f"{name}.{ext}"
    sitk.WriteTransform(tx, str(path))
    t = read_transform(path, dtype=torch.float64)
    assert isinstance(t, Affine)
    pts = _points(tx.GetDimension())
    np.testing.assert_allclose(_ours(t, pts), _sitk_map(sitk.ReadTransform(str(path)), pts),
                               atol=TOL)
    if hasattr(tx, "GetCenter"):
        np.testing.assert_allclose(t.center.numpy(), tx.GetCenter(), atol=1e-9)


@pytest.mark.parametrize("itk_type", ["MatrixOffsetTransformBase_double_3_3",
                                      "AffineTransform_float_3_3"])
def test_ants_style_text_files(tmp_path, itk_type):
    # antsRegistration writes MatrixOffsetTransformBase; some tools write float affines.
    path = tmp_path / "ants.txt"
    path.write_text(
        "#Insight Transform File V1.0\n#Transform 0\n"
        f"Transform: {itk_type}\n"
        "Parameters: 1.02 0.03 -0.01 -0.02 0.98 0.04 0.01 -0.03 1.05 2.5 -1.5 3.25\n"
        "FixedParameters: 12.5 -7.25 40\n"
    )
    t = read_transform(path, dtype=torch.float64)
    pts = _points(3)
    np.testing.assert_allclose(_ours(t, pts), _sitk_map(sitk.ReadTransform(str(path)), pts),
                               atol=TOL)
    np.testing.assert_allclose(t.center.numpy(), [12.5, -7.25, 40.0])


def test_composite_order_matches_itk(tmp_path):
    a = sitk.AffineTransform(3)
    a.SetMatrix((1.2, 0.1, 0.0, 0.0, 0.9, 0.0, 0.0, 0.0, 1.1))
    a.SetTranslation((5.0, 0.0, -2.0))
    r = sitk.Euler3DTransform((0.0, 0.0, 0.0), 0.0, 0.0, 0.5, (0.0, 10.0, 0.0))
    grid = Grid((6, 6, 6), (4.0, 4.0, 4.0), (-10.0, -10.0, -10.0))
    bs = BSpline(grid, 8.0, dtype=torch.float64)
    with torch.no_grad():
        bs.coefficients.normal_(0.0, 1.5, generator=torch.Generator().manual_seed(0))
    b = sitk.BSplineTransform(3, 3)
    fixed, params = bs.to_itk_parameters()
    b.SetFixedParameters(fixed)
    b.SetParameters(params)
    pts = grid.points(torch.float64).reshape(-1, 3).numpy()[::5]
    sitk.WriteTransform(sitk.CompositeTransform([a, r]), str(tmp_path / "lin.h5"))
    lin = read_transform(tmp_path / "lin.h5", dtype=torch.float64)
    assert isinstance(lin, Affine)
    np.testing.assert_allclose(_ours(lin, pts), _sitk_map(sitk.CompositeTransform([a, r]), pts),
                               atol=TOL)
    mixed = sitk.CompositeTransform([a, r, b])
    sitk.WriteTransform(mixed, str(tmp_path / "mixed.h5"))
    t = read_transform(tmp_path / "mixed.h5", dtype=torch.float64)
    assert isinstance(t, Compose) and len(t) == 2  # the two linear ones merged
    np.testing.assert_allclose(_ours(t, pts), _sitk_map(mixed, pts), atol=TOL)


def test_bspline_and_compose_round_trip_through_simpleitk(tmp_path):
    grid = Grid((7, 6, 5), (3.0, 3.0, 3.0), (-9.0, -8.0, -6.0), OBLIQUE)
    bs = BSpline(grid, 7.0, dtype=torch.float64)
    with torch.no_grad():
        bs.coefficients.normal_(0.0, 2.0, generator=torch.Generator().manual_seed(1))
    rigid = Rigid(3, center=grid.center, translation=(1.0, -2.0, 0.5), angles=(0.05, 0.1, -0.1),
                  dtype=torch.float64)
    pts = grid.points(torch.float64).reshape(-1, 3).numpy()[::3]
    for t, name, itk in [(bs, "b.tfm", "BSplineTransform"), (Compose(rigid, bs), "c.h5",
                                                              "CompositeTransform")]:
        path = write_transform(t, tmp_path / name)
        tx = sitk.ReadTransform(str(path))
        assert tx.GetName() == itk
        np.testing.assert_allclose(_sitk_map(tx, pts), _ours(t, pts), atol=TOL)
        back = read_transform(path, dtype=torch.float64)
        np.testing.assert_allclose(_ours(back, pts), _ours(t, pts), atol=TOL)


# ---------------------------------------------------------------------------- read errors
def test_read_transform_errors_name_the_file(tmp_path, capfd):
    with pytest.raises(TransformFileError, match="nope.tfm.*does not exist"):
        read_transform(tmp_path / "nope.tfm")
    with pytest.raises(TransformFileError, match="directory"):
        read_transform(tmp_path)
    (tmp_path / "garbled.tfm").write_text("#Insight Transform File V1.0\nthis is garbage\n")
    with pytest.raises(TransformFileError, match="garbled.tfm"):
        read_transform(tmp_path / "garbled.tfm")
    write_transform(Affine(3), tmp_path / "ok.h5")
    data = (tmp_path / "ok.h5").read_bytes()
    (tmp_path / "cut.h5").write_bytes(data[: len(data) // 2])
    with pytest.raises(TransformFileError, match="cut.h5"):
        read_transform(tmp_path / "cut.h5")
    assert "HDF5-DIAG" not in capfd.readouterr().err


# ---------------------------------------------------------------------------- displacement fields
def test_displacement_field_of_an_affine_is_applied_by_simpleitk(tmp_path):
    grid = Grid((9, 8, 7), (1.5, 2.0, 2.5), (-20.0, 13.0, 40.0), OBLIQUE)
    a = np.array([[1.05, 0.1, 0.0], [-0.05, 0.95, 0.02], [0.0, 0.03, 1.1]])
    t = Affine(3, center=grid.center, translation=(3.0, -4.0, 2.0), matrix=a)
    path = write_displacement_field(t, grid, tmp_path / "d.nii.gz")
    tx = sitk.DisplacementFieldTransform(sitk.ReadImage(str(path), sitk.sitkVectorFloat64))
    pts = grid.points(torch.float64).reshape(-1, 3).numpy()
    expected = _ours(t, pts)
    np.testing.assert_allclose(_sitk_map(tx, pts), expected, atol=TOL)
    field = read_displacement_field(path)
    assert isinstance(field, DisplacementField) and field.grid.same_as(grid)
    with torch.no_grad():
        ours = field(torch.as_tensor(pts, dtype=torch.float32)).double().numpy()
    np.testing.assert_allclose(ours, expected, atol=TOL)
    # also as an ITK DisplacementFieldTransform file, and read_transform on the image
    h5 = write_displacement_field(t, grid, tmp_path / "d.h5", dtype=torch.float64)
    np.testing.assert_allclose(_sitk_map(sitk.ReadTransform(str(h5)), pts), expected, atol=TOL)
    for p in (h5, path):
        back = read_transform(p)
        assert isinstance(back, DisplacementField)
        with torch.no_grad():
            got = back(torch.as_tensor(pts, dtype=torch.float32)).double().numpy()
        np.testing.assert_allclose(got, expected, atol=TOL)


def test_2d_displacement_field_round_trip(tmp_path):
    grid = Grid((10, 8), (1.0, 1.5), (5.0, -5.0))
    disp = torch.randn(2, *grid.shape, generator=torch.Generator().manual_seed(2))
    field = DisplacementField(disp, grid)
    path = write_displacement_field(field, grid, tmp_path / "d.mha")
    back = read_displacement_field(path)
    torch.testing.assert_close(back.field.detach(), disp)
    write_transform(field, tmp_path / "d.h5")  # exact, on its own grid
    pts = grid.points(torch.float64).reshape(-1, 2).numpy()
    np.testing.assert_allclose(_sitk_map(sitk.ReadTransform(str(tmp_path / "d.h5")), pts),
                               _ours(field, pts), atol=TOL)


def test_read_displacement_field_errors(tmp_path):
    from itreg import Image

    grid = Grid((4, 5, 6))
    write_image(Image(torch.zeros(1, *grid.shape), grid), tmp_path / "scalar.nii.gz")
    with pytest.raises(TransformFileError, match="scalar.nii.gz.*1 component"):
        read_displacement_field(tmp_path / "scalar.nii.gz")
    write_image(Image(torch.zeros(2, *grid.shape), grid), tmp_path / "two.nrrd")
    with pytest.raises(TransformFileError, match="2 component"):
        read_displacement_field(tmp_path / "two.nrrd")
    nan = torch.zeros(3, *grid.shape)
    nan[0, 0, 0, 0] = float("nan")
    write_image(Image(nan, grid), tmp_path / "nan.mha")
    with pytest.raises(TransformFileError, match="NaN"):
        read_displacement_field(tmp_path / "nan.mha")
    with pytest.raises(TransformFileError, match="missing.nii.gz"):
        read_displacement_field(tmp_path / "missing.nii.gz")
    write_transform(Affine(3), tmp_path / "a.tfm")
    with pytest.raises(TransformFileError, match="not a displacement field"):
        read_displacement_field(tmp_path / "a.tfm")


# ---------------------------------------------------------------------------- refused files
_AFFINE_TFM = ("#Insight Transform File V1.0\n#Transform 0\nTransform: AffineTransform_double_3_3\n"
               "{params}{fixed}")


@pytest.mark.parametrize("params, fixed, match", [
    ("Parameters: 1 0 0 0 1 0 0 0 nan 1 2 3\n", "FixedParameters: 0 0 0\n", "line 4.*NaN"),
    ("Parameters: 1 0 0 0 1 0 0 0 1 1 2 inf\n", "FixedParameters: 0 0 0\n", "NaN/Inf"),
    ("Parameters: 1 0 0 0 1 0 0 0 1 1 2 3\n", "FixedParameters: 0 nan 0\n", "FixedParameters"),
    ("Parameters: 1 0 0 0 1 0 0 0 1 1 2 3\n", "", "no FixedParameters"),
    ("Parameters: 1 0 0 0 1 0 0 0 1 1 2 3\n", "FixedParameters:\n", "no FixedParameters"),
    ("Parameters: 0 0 0 0 0 0 0 0 0 1 2 3\n", "FixedParameters: 0 0 0\n", "singular.*point"),
    ("Parameters: 1 2 3 2 4 6 0 0 1 1 2 3\n", "FixedParameters: 0 0 0\n", "singular.*plane"),
])
def test_unusable_tfm_files_are_refused_in_one_line(tmp_path, params, fixed, match):
    path = tmp_path / "bad.tfm"
    path.write_text(_AFFINE_TFM.format(params=params, fixed=fixed))
    # SimpleITK itself reads the file without FixedParameters, silently dropping the
    # translation; itreg must not.
    with pytest.raises(TransformFileError, match=match) as exc:
        read_transform(path)
    assert "bad.tfm" in str(exc.value) and "\n" not in str(exc.value)


def test_singular_and_nan_matrices_are_refused_in_binary_and_composite_files(tmp_path):
    flat = sitk.AffineTransform(3)
    flat.SetMatrix((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0))
    sitk.WriteTransform(flat, str(tmp_path / "flat.mat"))
    with pytest.raises(TransformFileError, match="flat.mat.*singular"):
        read_transform(tmp_path / "flat.mat")
    comp = sitk.CompositeTransform([sitk.TranslationTransform(3, (1.0, 2.0, 3.0)), flat])
    sitk.WriteTransform(comp, str(tmp_path / "comp.h5"))
    with pytest.raises(TransformFileError, match="comp.h5.*singular"):
        read_transform(tmp_path / "comp.h5")
    bs = sitk.BSplineTransform(2, 3)
    bs.SetFixedParameters([4, 4, 0, 0, 1, 1, 1, 0, 0, 1])
    params = [0.0] * len(bs.GetParameters())
    params[3] = float("nan")
    bs.SetParameters(params)
    sitk.WriteTransform(bs, str(tmp_path / "bs.h5"))
    with pytest.raises(TransformFileError, match="bs.h5.*NaN"):
        read_transform(tmp_path / "bs.h5")


def test_valid_text_files_with_empty_translation_fixed_parameters_are_read(tmp_path):
    comp = sitk.CompositeTransform([sitk.AffineTransform(2), sitk.TranslationTransform(2, (1, 2))])
    sitk.WriteTransform(comp, str(tmp_path / "c.tfm"))
    assert "FixedParameters: \n" in (tmp_path / "c.tfm").read_text()
    t = read_transform(tmp_path / "c.tfm", dtype=torch.float64)
    np.testing.assert_allclose(_ours(t, np.array([[3.0, 4.0]])), [[4.0, 6.0]])


def test_velocity_fields_are_written_as_their_exact_displacement_field(tmp_path):
    from itreg.transforms import exportable

    grid = Grid((9, 8, 7), (2.0, 2.5, 3.0), (-5.0, 4.0, 1.0), OBLIQUE)
    v = torch.randn(3, 7, 8, 9, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    chain = Compose(Affine(3, translation=(1.0, -2.0, 3.0), dtype=torch.float64),
                    StationaryVelocityField(grid, v, steps=5))
    write_transform(exportable(chain), tmp_path / "t.h5")
    tx = sitk.ReadTransform(str(tmp_path / "t.h5"))
    pts = np.asarray(grid.points(dtype=torch.float64).reshape(-1, 3)[::7]) + 0.3
    np.testing.assert_allclose(_sitk_map(tx, pts), _ours(chain, pts), atol=1e-6)

"""``itreg apply``: transform chains in antsApplyTransforms order, checked against SimpleITK."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

pytestmark = pytest.mark.usefixtures("one_thread")

DIRECTION = tuple(np.array([[0.0, -1.0, 0.0], [0.8, 0.0, 0.6], [-0.6, 0.0, 0.8]]).ravel())


def _image(shape=(20, 22, 18), seed=0, spacing=(1.5, 1.2, 1.8), origin=(-10.0, 5.0, -3.0),
           direction=DIRECTION, pixel=sitk.sitkFloat32):
    """Smooth random 3D image (numpy shape z, y, x)."""
    rng = np.random.default_rng(seed)
    arr = rng.normal(size=shape)
    for axis in range(3):
        arr = (arr + np.roll(arr, 1, axis) + np.roll(arr, -1, axis)) / 3
    img = sitk.GetImageFromArray((10 * arr).astype(np.float32))
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    img.SetDirection(direction)
    return sitk.Cast(img, pixel)


def _affine_a():
    a = sitk.AffineTransform(3)
    a.SetMatrix((1.05, 0.08, 0.0, -0.05, 0.97, 0.04, 0.02, 0.0, 1.02))
    a.SetTranslation((1.3, -0.7, 2.1))
    a.SetCenter((0.0, 10.0, 5.0))
    return a


def _bspline_b(ref: sitk.Image):
    b = sitk.BSplineTransformInitializer(ref, (4, 4, 4), 3)
    rng = np.random.default_rng(3)
    b.SetParameters(rng.normal(0, 1.2, len(b.GetParameters())).tolist())
    return b


def _field_c(ref: sitk.Image):
    arr = np.random.default_rng(5).normal(0, 1, ref.GetSize()[::-1] + (3,))
    for axis in range(3):
        arr = (arr + np.roll(arr, 2, axis) + np.roll(arr, -2, axis)) / 3
    field = sitk.GetImageFromArray(arr, isVector=True)
    field.CopyInformation(ref)
    return field


def _arr(path):
    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


@pytest.fixture
def files(tmp_path):
    moving = _image(seed=1)
    ref = _image(shape=(16, 18, 15), seed=2, spacing=(1.7, 1.4, 2.0), origin=(-8.0, 7.0, -1.0))
    sitk.WriteImage(moving, str(tmp_path / "moving.nii.gz"))
    sitk.WriteImage(ref, str(tmp_path / "ref.nii.gz"))
    a = _affine_a()
    sitk.WriteTransform(a, str(tmp_path / "a.mat"))
    sitk.WriteTransform(a, str(tmp_path / "a.tfm"))
    b = _bspline_b(ref)
    sitk.WriteTransform(b, str(tmp_path / "b.h5"))
    c = _field_c(ref)
    sitk.WriteImage(sitk.Cast(c, sitk.sitkVectorFloat32), str(tmp_path / "c.nii.gz"))
    c64 = sitk.ReadImage(str(tmp_path / "c.nii.gz"), sitk.sitkVectorFloat64)
    return {"moving": moving, "ref": ref, "a": a, "b": b,
            "c": sitk.DisplacementFieldTransform(c64), "dir": tmp_path}


def _run(cli, files, *args):
    out = files["dir"] / "out.nii.gz"
    code, _, err = cli(["apply", str(files["dir"] / "moving.nii.gz"), "-r",
                        str(files["dir"] / "ref.nii.gz"), "-o", str(out), "--force", "-q",
                        *[str(a) for a in args]])
    assert code == 0, err
    return _arr(out)


def _sitk(files, transform, interp=sitk.sitkLinear, default=0.0, image=None):
    image = files["moving"] if image is None else image
    return sitk.GetArrayFromImage(sitk.Resample(image, files["ref"], transform, interp, default,
                                                sitk.sitkFloat32))


def test_chain_follows_ants_order(cli, files):
    """``-t B -t A`` sends each reference point through B, then A, as antsApplyTransforms does
    (checked against ANTs' own binary: ``-t out1Warp -t out0GenericAffine`` warps first): that
    is SimpleITK's ``CompositeTransform([A, B])``, whose last transform acts first."""
    d = files["dir"]
    ours = _run(cli, files, "-t", d / "b.h5", "-t", d / "a.mat")
    ref = _sitk(files, sitk.CompositeTransform([files["a"], files["b"]]))
    assert np.abs(ref).max() > 1.0
    np.testing.assert_allclose(ours, ref, atol=1e-4)
    # The order matters: the other order is another map.
    swapped = _run(cli, files, "-t", d / "a.mat", "-t", d / "b.h5")
    np.testing.assert_allclose(swapped, _sitk(files, sitk.CompositeTransform(
        [files["b"], files["a"]])), atol=1e-4)
    assert np.abs(swapped - ours).max() > 0.1
    # Three transforms, one a displacement-field image (ANTs' warp files).
    three = _run(cli, files, "-t", d / "a.tfm", "-t", d / "c.nii.gz", "-t", d / "b.h5")
    np.testing.assert_allclose(three, _sitk(files, sitk.CompositeTransform(
        [files["b"], files["c"], files["a"]])), atol=1e-4)


def test_chain_matches_antspy_apply_transforms(files):
    """Against ANTs itself where ANTsPy is installed (the benchmark environment)."""
    ants = pytest.importorskip("ants")
    from itreg.pipeline import apply_to_image

    d = files["dir"]
    out = apply_to_image(d / "moving.nii.gz", d / "ref.nii.gz", [d / "b.h5", d / "a.mat"],
                         d / "ours.nii.gz")
    theirs = ants.apply_transforms(ants.image_read(str(d / "ref.nii.gz")),
                                   ants.image_read(str(d / "moving.nii.gz")),
                                   transformlist=[str(d / "b.h5"), str(d / "a.mat")],
                                   whichtoinvert=[False, False], interpolator="linear")
    np.testing.assert_allclose(_arr(out), theirs.numpy().T, atol=1e-3)


def test_bracket_one_uses_the_inverse(cli, files):
    d = files["dir"]
    ours = _run(cli, files, "-t", f"[{d / 'a.mat'},1]")
    np.testing.assert_allclose(ours, _sitk(files, files["a"].GetInverse()), atol=1e-4)
    same = _run(cli, files, "-t", f"[{d / 'a.tfm'}, 0]")
    np.testing.assert_allclose(same, _sitk(files, files["a"]), atol=1e-4)
    # A field's inverse is solved iteratively: forward then inverse is the identity map.
    both = _run(cli, files, "-t", d / "b.h5", "-t", f"[{d / 'b.h5'},1]")
    plain = _sitk(files, sitk.Transform(3, sitk.sitkIdentity))
    inner = (slice(3, -3),) * 3
    assert np.abs(both[inner] - plain[inner]).max() < 1e-3


@pytest.mark.parametrize("mode, interp", [("nearest", sitk.sitkNearestNeighbor),
                                          ("bspline", sitk.sitkBSpline),
                                          ("linear", sitk.sitkLinear)])
def test_interpolation_modes_and_default_value_match_simpleitk(cli, files, mode, interp):
    d = files["dir"]
    ours = _run(cli, files, "-t", d / "a.mat", "-n", mode, "--default-value", "-7.5")
    ref = _sitk(files, files["a"], interp, default=-7.5)
    assert (ref == -7.5).any() and (ref != -7.5).any()
    if mode == "nearest":  # a voxel centre within rounding of a half index may go either way
        assert (np.abs(ours - ref) > 1e-4).mean() < 1e-3
    else:
        np.testing.assert_allclose(ours, ref, atol=1e-4)


def _labels_image(tmp_path, thin=False):
    """Label map (uint8): nested boxes; with `thin` also 1-voxel sheets and lines."""
    arr = np.zeros((24, 26, 22), np.uint8)
    arr[4:20, 5:21, 4:18] = 1
    arr[8:16, 9:17, 7:15] = 2
    arr[10:13, 11:14, 9:12] = 3
    if thin:
        arr[6, 3:23, 3:19] = 4  # one-voxel sheet
        arr[3:21, 12, 10] = 5  # one-voxel line
        arr[17, 7:19, 14] = 6
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((1.0, 1.0, 1.0))
    img.SetOrigin((-11.0, -13.0, -12.0))
    sitk.WriteImage(img, str(tmp_path / "labels.nii.gz"))
    return img


def test_label_linear_interpolation_matches_simpleitk_label_linear(cli, files):
    d = files["dir"]
    lab = _labels_image(d)
    out = d / "lab.nii.gz"
    code, _, err = cli(["apply", str(d / "labels.nii.gz"), "-r", str(d / "labels.nii.gz"),
                        "-t", str(d / "a.mat"), "-n", "label-linear", "-o", str(out), "-q"])
    assert code == 0, err
    ours = sitk.ReadImage(str(out))
    assert ours.GetPixelID() == sitk.sitkUInt8
    ref = sitk.Resample(lab, lab, files["a"], sitk.sitkLabelLinear, 0)
    a, r = sitk.GetArrayFromImage(ours), sitk.GetArrayFromImage(ref)
    assert (a != r).mean() < 1e-3  # ties at exactly 0.5 may break either way
    assert set(np.unique(a)) == {0, 1, 2, 3}


def _dice(a, b, label):
    x, y = a == label, b == label
    return 2 * (x & y).sum() / max(x.sum() + y.sum(), 1)


@pytest.mark.parametrize("kind", ["rotation", "translation"])
def test_label_mode_keeps_every_thin_label_that_nearest_keeps(cli, tmp_path, kind):
    """One-voxel sheets and lines: `label` (cubic per label) keeps every label that nearest
    keeps; ANTs' GenericLabel[Linear] (`label-linear`) loses lines under a half-voxel shift,
    and round trips worse than `label`."""
    lab = _labels_image(tmp_path, thin=True)
    if kind == "rotation":
        t = sitk.Euler3DTransform((0.0, 0.0, 0.0), 0.12, -0.08, 0.15, (0.4, -0.3, 0.25))
    else:
        t = sitk.TranslationTransform(3, (0.4, 0.6, 0.3))
    sitk.WriteTransform(t, str(tmp_path / "t.tfm"))
    src = tmp_path / "labels.nii.gz"
    results = {}
    for mode in ("nearest", "label", "label-linear"):
        fwd, back = tmp_path / f"{mode}_f.nii.gz", tmp_path / f"{mode}_b.nii.gz"
        for inp, spec, out in ((src, str(tmp_path / "t.tfm"), fwd),
                               (fwd, f"[{tmp_path / 't.tfm'},1]", back)):
            code, _, err = cli(["apply", str(inp), "-r", str(src), "-t", spec, "-n", mode,
                                "-o", str(out), "-q"])
            assert code == 0, err
        results[mode] = (_arr(fwd), _arr(back))
    orig = sitk.GetArrayFromImage(lab)
    assert set(np.unique(results["nearest"][0])) == set(np.unique(orig))
    assert set(np.unique(results["label"][0])) == set(np.unique(orig))
    assert set(np.unique(results["label"][1])) == set(np.unique(orig))
    dice = {m: np.mean([_dice(orig, results[m][1], k) for k in range(1, 7)]) for m in results}
    assert dice["label"] > dice["label-linear"] + 0.05, dice
    if kind == "translation":
        assert not {5, 6} & set(np.unique(results["label-linear"][0]))


def test_4d_series_is_resampled_volume_by_volume(cli, files):
    d = files["dir"]
    vols = [_image(seed=10 + t) for t in range(3)]
    series = sitk.JoinSeries(vols, 5.0, 2.5)
    sitk.WriteImage(series, str(d / "series.nii.gz"))
    out = d / "series_out.nii.gz"
    code, _, err = cli(["apply", str(d / "series.nii.gz"), "-r", str(d / "ref.nii.gz"), "-t",
                        str(d / "a.mat"), "-o", str(out), "-q"])
    assert code == 0, err
    result = sitk.ReadImage(str(out))
    assert result.GetDimension() == 4 and result.GetSize()[3] == 3
    assert result.GetSpacing()[3] == pytest.approx(2.5)
    assert result.GetOrigin()[3] == pytest.approx(5.0)
    np.testing.assert_allclose(result.GetSpacing()[:3], files["ref"].GetSpacing())
    arr = sitk.GetArrayFromImage(result)
    for t, vol in enumerate(vols):
        np.testing.assert_allclose(arr[t], _sitk(files, files["a"], image=vol), atol=1e-4)


def test_2d_images_and_python_api(tmp_path):
    from itreg.pipeline import apply_to_image, load_chain

    img = sitk.GetImageFromArray(np.random.default_rng(0).normal(size=(30, 28)).astype(np.float32))
    img.SetSpacing((1.1, 0.9))
    sitk.WriteImage(img, str(tmp_path / "m.nii.gz"))
    e = sitk.Euler2DTransform((10.0, 12.0), 0.2, (1.5, -2.0))
    sitk.WriteTransform(e, str(tmp_path / "e.txt"))
    apply_to_image(tmp_path / "m.nii.gz", tmp_path / "m.nii.gz", [f"[{tmp_path / 'e.txt'},1]"],
                   tmp_path / "o.nii.gz", interpolation="bspline")
    ref = sitk.Resample(img, img, e.GetInverse(), sitk.sitkBSpline, 0.0, sitk.sitkFloat32)
    np.testing.assert_allclose(_arr(tmp_path / "o.nii.gz"), sitk.GetArrayFromImage(ref),
                               atol=1e-4)
    chain = load_chain([tmp_path / "e.txt", f"[{tmp_path / 'e.txt'},1]"])
    p = torch.tensor([[3.0, 4.0]], dtype=torch.float64)
    np.testing.assert_allclose(chain(p).detach().numpy(), p.numpy(), atol=1e-9)


def test_bad_transform_arguments_exit_2_and_write_nothing(cli, files):
    d = files["dir"]
    out = d / "bad.nii.gz"
    base = ["apply", str(d / "moving.nii.gz"), "-r", str(d / "ref.nii.gz"), "-o", str(out)]
    cases = [
        (["-t", f"[{d / 'a.mat'},2]"], "FILE,1"),
        (["-t", str(d / "missing.tfm")], "missing.tfm"),
        (["-t", str(d / "a.mat"), "-n", "nearest", "--labels"], "contradicts"),
    ]
    e2 = sitk.Euler2DTransform()
    sitk.WriteTransform(e2, str(d / "e2.tfm"))
    cases.append((["-t", str(d / "a.mat"), "-t", str(d / "e2.tfm")], "dimension"))
    for extra, match in cases:
        code, _, err = cli([*base, *extra])
        assert code == 2, err
        assert match in err and err.count("\n") == 1
        assert not out.exists()
    out.write_text("keep")
    code, _, err = cli([*base, "-t", str(d / "a.mat")])
    assert code == 2 and "--force" in err and out.read_text() == "keep"
    # Never over an input, even with --force.
    before = (d / "moving.nii.gz").read_bytes()
    code, _, err = cli(["apply", str(d / "moving.nii.gz"), "-r", str(d / "ref.nii.gz"), "-t",
                        str(d / "a.mat"), "-o", str(d / "moving.nii.gz"), "--force"])
    assert code == 2 and (d / "moving.nii.gz").read_bytes() == before

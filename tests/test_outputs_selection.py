"""``register --outputs`` / ``--compress`` and ``write_registration``: only what is asked is
written (and computed), every compression reads back exactly in SimpleITK and in Python's own
gzip reader, and report.json records the seconds of each stage (issue 20)."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from tests.test_cli import FAST, blob_image

from itreg import io
from itreg.errors import ConfigError
from itreg.grid import Grid
from itreg.image import Image


def _image(shape=(24, 40, 48), seed=0):
    """A float image with a zero background (as MR volumes have) and noise inside."""
    rng = np.random.default_rng(seed)
    data = np.zeros(shape, dtype=np.float32)
    data[4:-4, 8:-8, 10:-10] = rng.random((shape[0] - 8, shape[1] - 16, shape[2] - 20))
    grid = Grid(tuple(reversed(shape)), spacing=(1.0, 1.5, 2.0), origin=(-3.0, 4.0, 10.0))
    return Image(torch.from_numpy(data)[None], grid)


@pytest.mark.parametrize("mode", ["fast", "best", "none", True, False])
def test_every_compression_reads_back_exactly(tmp_path, mode):
    img = _image()
    path = io.write_image(img, tmp_path / "x.nii.gz", compress=mode)
    back = sitk.ReadImage(str(path))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), img.data[0].numpy())
    assert back.GetSpacing() == (1.0, 1.5, 2.0) and back.GetOrigin() == (-3.0, 4.0, 10.0)
    raw = gzip.decompress(path.read_bytes())  # a valid gzip file for any reader (CRC, size)
    assert len(raw) == 352 + img.data.numel() * 4  # NIfTI-1 header + float32 voxels
    assert not list(tmp_path.glob(".itreg-*"))  # no temporary file is left behind


def test_fast_compresses_zero_background_and_none_does_not(tmp_path):
    img = _image()
    size = {m: io.write_image(img, tmp_path / f"{m}.nii.gz", compress=m).stat().st_size
            for m in ("fast", "best", "none")}
    raw = 352 + img.data.numel() * 4
    assert size["none"] >= raw  # stored blocks
    assert size["fast"] < 0.8 * raw  # the zero background is run-length coded
    assert size["best"] <= size["fast"] * 1.02


def test_displacement_field_compression_reads_back(tmp_path):
    from itreg.transforms import Affine

    img = _image()
    t = Affine(3, center=img.grid.center, translation=[1.5, -2.0, 0.25])
    for mode in ("fast", "none"):
        path = io.write_displacement_field(t, img.grid, tmp_path / f"d{mode}.nii.gz",
                                           compress=mode)
        arr = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
        np.testing.assert_allclose(arr.reshape(-1, 3), [[1.5, -2.0, 0.25]] * (arr.size // 3),
                                   atol=1e-6)


def test_unknown_compression_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="compression"):
        io.write_image(_image(), tmp_path / "x.nii.gz", compress="max")


def test_select_outputs():
    from itreg.results import DEFAULT_OUTPUTS, OUTPUTS, select_outputs

    assert select_outputs(None) == DEFAULT_OUTPUTS == ("warped", "transform", "displacement")
    assert select_outputs("all") == OUTPUTS
    assert select_outputs("field,warped") == ("warped", "displacement")
    assert select_outputs("transform, warped") == ("warped", "transform")
    for bad in ("warp", "", "warped,jacobian"):
        with pytest.raises(ConfigError, match="outputs"):
            select_outputs(bad)


@pytest.fixture
def pair(tmp_path):
    fixed, moving = tmp_path / "fixed.nii.gz", tmp_path / "moving.nii.gz"
    sitk.WriteImage(blob_image(), str(fixed))
    sitk.WriteImage(blob_image(shift=(2.0, -1.0), remap=True), str(moving))
    return fixed, moving


@pytest.fixture(scope="module")
def affine_result():
    from itreg.api import register
    from itreg.io.images import from_sitk

    fixed = from_sitk(blob_image())
    moving = from_sitk(blob_image(shift=(2.0, -1.0), remap=True))
    return register(fixed, moving, transform="affine", overrides={"iterations": 20},
                    progress=False)


def test_transform_only_skips_the_resampling(affine_result, tmp_path):
    from itreg.results import save_registration

    result = affine_result
    result.__dict__.pop("warped", None)
    out = save_registration(result, tmp_path / "t", outputs="transform", compress="none")
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "inverse.tfm", "report.json", "transform.h5", "transform.tfm"]
    assert "warped" not in result.__dict__  # the full-resolution warp was never computed
    report = json.loads((out / "report.json").read_text())
    assert report["outputs"] == ["transform.tfm", "transform.h5", "inverse.tfm", "report.json"]
    assert report["output_settings"] == {"outputs": ["transform"], "compress": "none"}
    assert set(report["timings_s"]) == {"resample", "transforms", "write"}
    # The written inverse undoes the written forward map (SimpleITK's own composition).
    fwd = sitk.ReadTransform(str(out / "transform.tfm"))
    inv = sitk.ReadTransform(str(out / "inverse.tfm"))
    for p in [(3.0, 4.0), (40.0, -7.0)]:
        np.testing.assert_allclose(inv.TransformPoint(fwd.TransformPoint(p)), p, atol=1e-9)


def test_cli_outputs_and_compress_none(pair, tmp_path, cli):
    fixed, moving = pair
    out = tmp_path / "out"
    code, _, err = cli(["register", str(fixed), str(moving), "-o", str(out), "-t", "bspline",
                        "--outputs", "warped,displacement", "--compress", "none", *FAST])
    assert code == 0, err
    names = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert names == ["displacement.nii", "report.json", "warped.nii"]
    report = json.loads((out / "report.json").read_text())
    timings = report["timings_s"]
    assert set(timings) == {"import", "read", "prepare", "register", "resample", "transforms",
                            "write"}
    assert timings["register"] == pytest.approx(report["wall_time_s"], abs=1e-4)
    assert all(v >= 0 for v in timings.values())
    # The uncompressed warped image is the one the default (compressed) run writes.
    code, _, err = cli(["register", str(fixed), str(moving), "-o", str(tmp_path / "gz"),
                        "-t", "bspline", *FAST])
    assert code == 0, err
    gz_names = sorted(p.name for p in (tmp_path / "gz").iterdir() if not p.name.startswith("."))
    # The default for a B-spline run: no field (transform.h5 holds the exact B-spline), no
    # inverse field.
    assert gz_names == ["report.json", "transform.h5", "transform.tfm", "warped.nii.gz"]
    np.testing.assert_array_equal(
        sitk.GetArrayFromImage(sitk.ReadImage(str(out / "warped.nii"))),
        sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "gz" / "warped.nii.gz"))))


def test_default_outputs_follow_the_transform():
    """A B-spline run's default leaves out the field (its ITK file is exact); a dense field
    transform keeps it (the field is the transform, as ANTs writes it)."""
    from itreg.grid import Grid
    from itreg.results import select_outputs
    from itreg.transforms import Affine, Compose
    from itreg.transforms.bspline import BSpline
    from itreg.transforms.dense import DisplacementField

    grid = Grid((8, 9), spacing=(1.0, 1.0))
    spline = BSpline(grid, 4.0)
    field = DisplacementField(torch.zeros(2, *grid.shape), grid)
    assert select_outputs(None, Compose(Affine(2), spline)) == ("warped", "transform")
    assert select_outputs(None, spline) == ("warped", "transform")
    assert select_outputs(None, Compose(Affine(2), field)) == ("warped", "transform",
                                                                "displacement")
    assert select_outputs(None, Affine(2)) == ("warped", "transform", "displacement")
    assert select_outputs("all", spline) == ("warped", "transform", "displacement", "inverse")


def test_cli_refuses_unknown_outputs_before_reading(pair, tmp_path, cli):
    fixed, moving = pair
    code, _, err = cli(["register", str(fixed), str(moving), "-o", str(tmp_path / "o"),
                        "--outputs", "warped,jacobian", *FAST])
    assert code == 2 and "outputs" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_shared_grid_evaluation_writes_what_each_output_computes_alone(tmp_path):
    """warped + displacement from one evaluation of T equal the separate computations (to
    float32 rounding: the fast path sums an affine_grid and a separable B-spline term)."""
    from itreg.api import register
    from itreg.io.images import from_sitk
    from itreg.results import save_registration
    from itreg.warp import resample

    fixed = from_sitk(blob_image())
    moving = from_sitk(blob_image(shift=(2.0, -1.0), remap=True))
    result = register(fixed, moving, transform="bspline", overrides={"iterations": 10},
                      progress=False)
    out = save_registration(result, tmp_path / "o", outputs="warped,transform,field")
    with torch.no_grad():
        warped = resample(result.moving, result.transform, fixed.grid, mode="auto")
        disp = result.transform.displacement(fixed.grid)
    np.testing.assert_allclose(
        sitk.GetArrayFromImage(sitk.ReadImage(str(out / "warped.nii.gz"))), warped.data[0].numpy(),
        atol=1e-5, rtol=0)
    np.testing.assert_allclose(
        sitk.GetArrayFromImage(sitk.ReadImage(str(out / "displacement.nii.gz"))), disp.numpy(),
        atol=1e-4, rtol=0)
    assert np.abs(disp.numpy()).max() > 0.1  # a real deformation


@pytest.mark.parametrize("mode", ["fast", "best"])
def test_parts_deflated_in_parallel_make_one_valid_gzip_stream(tmp_path, monkeypatch, mode):
    import zlib

    from itreg.io import writing

    monkeypatch.setattr(writing, "_GZIP_CHUNK", 4096)  # several parts on a small image
    monkeypatch.setattr(writing.os, "cpu_count", lambda: 4)
    img = _image()
    path = io.write_image(img, tmp_path / "x.nii.gz", compress=mode)
    blob = path.read_bytes()
    d = zlib.decompressobj(wbits=31)  # exactly one gzip member, nothing after it
    raw = d.decompress(blob)
    assert d.eof and not d.unused_data and len(raw) == 352 + img.data.numel() * 4
    back = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
    np.testing.assert_array_equal(back, img.data[0].numpy())


def test_linear_fast_warp_matches_the_resampler_and_simpleitk(tmp_path):
    """The one-matrix warp of linear runs equals itreg.warp.resample (and SimpleITK's resample
    of transform.tfm) on an oblique moving grid, edges and outside points included."""
    from itreg.results import _warp_fast
    from itreg.transforms import Affine
    from itreg.warp import resample

    fixed = _image()
    rng = np.random.default_rng(1)
    direction = np.linalg.qr(rng.normal(size=(3, 3)))[0]
    direction *= np.sign(np.linalg.det(direction))
    mgrid = Grid((50, 36, 20), spacing=(1.2, 1.0, 1.7), origin=(-5.0, 2.0, 6.0),
                 direction=tuple(direction.ravel()))
    moving = Image(torch.rand(1, *mgrid.shape), mgrid)
    t = Affine(3, center=fixed.grid.center, translation=[2.0, -3.0, 1.5],
               matrix=[[1.05, 0.1, 0.0], [-0.08, 0.95, 0.05], [0.0, 0.02, 1.1]])

    class Result:
        pass

    result = Result()
    result.moving, result.transform, result.fixed = moving, t, fixed
    assert _warp_fast(result, field=False) is None  # linear: no field
    fast = result.__dict__["warped"].data
    with torch.no_grad():
        ref = resample(moving, t, fixed.grid).data
    assert (fast == 0).float().mean() > 0.05  # some points map outside the moving image
    np.testing.assert_allclose(fast.numpy(), ref.numpy(), atol=1e-4)
    io.write_transform(t, tmp_path / "t.tfm")
    simple = sitk.Resample(io.to_sitk(moving), io.to_sitk(fixed),
                           sitk.ReadTransform(str(tmp_path / "t.tfm")), sitk.sitkLinear, 0.0,
                           sitk.sitkFloat32)
    inner = (ref[0] != 0).numpy()  # SimpleITK pads half a voxel earlier at the edges
    sitk_arr = sitk.GetArrayFromImage(simple)
    both = inner & (sitk_arr != 0)
    np.testing.assert_allclose(fast[0].numpy()[both], sitk_arr[both], atol=1e-4)

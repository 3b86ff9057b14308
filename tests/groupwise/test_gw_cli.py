"""``itreg groupwise``: outputs that SimpleITK applies, and bad inputs (nothing written)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from gw_data import make_group

from itreg import io
from itreg.errors import ConfigError, GeometryError
from itreg.grid import Grid
from itreg.groupwise import register_group
from itreg.image import Image


@pytest.fixture(scope="module")
def group_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("group")
    images, _ = make_group(shifts=[(4.0, -3.0), (-3.0, 4.0), (1.0, 5.0)])
    paths = []
    for j, img in enumerate(images):
        paths.append(folder / f"img{j}.nii.gz")
        io.write_image(img, paths[-1])
    return paths


def test_groupwise_writes_the_issue_layout_and_simpleitk_applies_it(group_files, tmp_path, cli):
    out = tmp_path / "out"
    code, _stdout, err = cli(["groupwise", *map(str, group_files), "-o", str(out),
                             "--transform", "translation", "--iterations", "15", "--quiet"])
    assert code == 0, err
    names = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()
             and not p.name.startswith(".")}
    expected = {f"{j}/{f}" for j in range(3)
                for f in ("warped.nii.gz", "transform.tfm", "transform.h5", "inverse.tfm")}
    expected |= {"segmentation.nii.gz", "probabilities.nii.gz", "template.nii.gz", "report.json"}
    assert names == expected
    report = json.loads((out / "report.json").read_text())
    assert report["wall_time_s"] > 0 and report["settings"]["mode"] == "unbiased"
    assert len(report["levels"]) == 3 and len(report["levels"][0]["metric_values"]) == 15
    seg = sitk.ReadImage(str(out / "segmentation.nii.gz"))
    assert seg.GetPixelID() == sitk.sitkUInt8
    assert sitk.ReadImage(str(out / "probabilities.nii.gz")).GetNumberOfComponentsPerPixel() == 4
    # transform.tfm maps common-space points to image j: resampling image j through it with
    # SimpleITK gives warped.nii.gz (up to the z-scoring of the inputs).
    for j, path in enumerate(group_files):
        moving = sitk.ReadImage(str(path), sitk.sitkFloat64)
        warped = sitk.ReadImage(str(out / str(j) / "warped.nii.gz"), sitk.sitkFloat64)
        tfm = sitk.ReadTransform(str(out / str(j) / "transform.tfm"))
        ref = sitk.GetArrayFromImage(sitk.Resample(moving, warped, tfm, sitk.sitkLinear, 0.0))
        got = sitk.GetArrayFromImage(warped)
        inner = (slice(4, -4), slice(4, -4))
        corr = np.corrcoef(ref[inner].ravel(), got[inner].ravel())[0, 1]
        assert corr > 0.999


def test_groupwise_ffd_writes_displacement_fields(group_files, tmp_path, cli):
    out = tmp_path / "ffd"
    code, _, err = cli(["groupwise", *map(str, group_files), "-o", str(out), "--transform",
                        "ffd", "--iterations", "2", "--metric", "vi", "--quiet", "--outputs",
                        "warped,transform,field"])
    assert code == 0, err
    for j in range(3):
        field = sitk.ReadImage(str(out / str(j) / "displacement.nii.gz"), sitk.sitkVectorFloat64)
        assert field.GetNumberOfComponentsPerPixel() == 2
        assert not (out / str(j) / "inverse_displacement.nii.gz").exists()  # not asked for
    assert not (out / "segmentation.nii.gz").exists()  # VI has no classes
    assert (out / "template.nii.gz").exists()


def test_groupwise_ffd_default_outputs_and_selection(group_files, tmp_path, cli):
    """Default: warped and transform files (transform.h5 holds the exact B-splines), no field,
    no inverse; --outputs transform writes no image per j."""
    base = [*map(str, group_files), "--transform", "ffd", "--iterations", "2", "--metric",
            "vi", "--quiet"]
    code, _, err = cli(["groupwise", *base, "-o", str(tmp_path / "d")])
    assert code == 0, err
    names = {p.name for p in (tmp_path / "d" / "1").iterdir()}
    assert names == {"warped.nii.gz", "transform.tfm", "transform.h5"}
    code, _, err = cli(["groupwise", *base, "-o", str(tmp_path / "t"), "--outputs", "transform"])
    assert code == 0, err
    assert {p.name for p in (tmp_path / "t" / "0").iterdir()} == {"transform.tfm", "transform.h5"}
    report = json.loads((tmp_path / "t" / "report.json").read_text())
    assert report["output_settings"] == {"outputs": "transform"}
    assert (tmp_path / "t" / "template.nii.gz").exists()
    code, _, err = cli(["groupwise", *base, "-o", str(tmp_path / "x"), "--outputs", "warp"])
    assert code == 2 and "outputs" in err and not (tmp_path / "x").exists()


@pytest.mark.parametrize("extra, message", [
    (["--classes", "1"], "at least 2"),
    (["--reference", "7"], "reference"),
    (["--metric", "nmi"], "valid groupwise metrics"),
    (["--transform", "elastic"], "valid transforms"),
])
def test_bad_settings_exit_2_and_write_nothing(group_files, tmp_path, cli, extra, message):
    out = tmp_path / "bad"
    code, _, err = cli(["groupwise", *map(str, group_files), "-o", str(out), "--quiet",
                        *extra])
    assert code == 2 and message in err
    assert not out.exists()


def test_one_image_and_existing_output_are_refused(group_files, tmp_path, cli):
    out = tmp_path / "one"
    code, _, err = cli(["groupwise", str(group_files[0]), "-o", str(out), "--quiet"])
    assert code == 2 and "at least two images" in err and not out.exists()
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, _, err = cli(["groupwise", *map(str, group_files), "-o", str(out), "--quiet"])
    assert code == 2 and "exists" in err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_mixed_dimensions_and_disjoint_images_are_geometry_errors(group_files, tmp_path, cli):
    img3d = tmp_path / "vol.nii.gz"
    io.write_image(Image(np.random.default_rng(0).random((8, 8, 8)).astype(np.float32),
                         Grid((8, 8, 8))), img3d)
    out = tmp_path / "mixed"
    code, _, err = cli(["groupwise", str(group_files[0]), str(img3d), "-o", str(out), "--quiet"])
    assert code == 2 and "mixed dimensions" in err and not out.exists()
    images, _ = make_group()
    far = Image(images[1].data, Grid(images[1].grid.size, images[1].grid.spacing, (900.0, 900.0)))
    with pytest.raises(GeometryError, match="do not overlap"):
        register_group([images[0], far])
    with pytest.raises(ConfigError, match="at least two images"):
        register_group(images[:1])


def test_groupwise_segmentations_roi_and_levels(group_files, tmp_path, cli):
    # X-Reg-GT from one label image per input (labels 0..3 by intensity quartile), an ROI
    # covering the left half of the common grid, and L = 32.
    segs = []
    for j, path in enumerate(group_files):
        img = io.read_image(path, is_label=False)
        q = torch.quantile(img.data.flatten(), torch.tensor([0.25, 0.5, 0.75]))
        lab = torch.bucketize(img.data, q).to(torch.uint8)
        segs.append(tmp_path / f"seg{j}.nii.gz")
        io.write_image(Image(lab, img.grid, is_label=True), segs[-1])
    ref = io.read_image(group_files[0], is_label=False)
    roi = torch.zeros(ref.grid.shape, dtype=torch.uint8)
    roi[:, : ref.grid.shape[1] // 2] = 1
    roi_path = tmp_path / "roi.nii.gz"
    io.write_image(Image(roi, ref.grid, is_label=True), roi_path)
    out = tmp_path / "gt"
    code, _, err = cli(["groupwise", *map(str, group_files), "-o", str(out), "--transform",
                        "translation", "--iterations", "3", "--levels", "32", "--segmentations",
                        ",".join(map(str, segs)), "--roi", str(roi_path), "--quiet"])
    assert code == 0, err
    metric = json.loads((out / "report.json").read_text())["settings"]["metric"]
    assert metric["levels"] == 32 and metric["appearance"] == "ground-truth (Eq. 48)"
    bad = tmp_path / "bad"
    code, _, err = cli(["groupwise", *map(str, group_files), "-o", str(bad), "--segmentations",
                        str(segs[0]), "--quiet"])
    assert code == 2 and "one label image per input" in err and not bad.exists()
    empty = tmp_path / "empty.nii.gz"
    io.write_image(Image(torch.zeros_like(roi), ref.grid, is_label=True), empty)
    code, _, err = cli(["groupwise", *map(str, group_files), "-o", str(bad), "--roi",
                        str(empty), "--quiet"])
    assert code == 2 and "ROI" in err and not bad.exists()

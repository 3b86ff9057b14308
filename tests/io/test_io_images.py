"""Image IO: geometry and dtypes against SimpleITK, and the reliability table's bad inputs."""

from __future__ import annotations

import gzip
import logging

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from itreg import Grid, Image
from itreg.errors import (
    GeometryError,
    ImageFormatError,
    ImageReadError,
    InvalidImageError,
    MaskError,
)
from itreg.io import (
    check_image,
    from_sitk,
    read_header,
    read_image,
    read_mask,
    to_sitk,
    write_image,
)

OBLIQUE = tuple(
    np.array([[0.0, -1.0, 0.0], [0.8, 0.0, 0.6], [-0.6, 0.0, 0.8]]).ravel()
)


def _grid3(size=(5, 4, 3)) -> Grid:
    return Grid(size, (0.7, 1.1, 2.5), (10.0, -20.0, 5.5), OBLIQUE)


def _sitk_image(arr: np.ndarray, *, vector: bool = False) -> sitk.Image:
    img = sitk.GetImageFromArray(arr, isVector=vector)
    d = img.GetDimension()
    img.SetSpacing((0.7, 1.1, 2.5)[:d])
    img.SetOrigin((10.0, -20.0, 5.5)[:d])
    img.SetDirection(OBLIQUE if d == 3 else (0.0, -1.0, 1.0, 0.0))
    return img


# ---------------------------------------------------------------------------- round trips
@pytest.mark.parametrize("ext", ["nii.gz", "nii", "nrrd", "mha"])
def test_float_round_trip_keeps_values_and_geometry(tmp_path, ext):
    grid = _grid3()
    data = torch.randn(1, *grid.shape, generator=torch.Generator().manual_seed(0))
    path = write_image(Image(data, grid), tmp_path / f"a.{ext}")
    back = read_image(path)
    assert back.dtype == torch.float32 and back.is_label is False
    assert torch.equal(back.data, data)
    assert back.grid.same_as(grid, tol=1e-6)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"a.{ext}"]  # no temp files left


def test_geometry_and_voxel_order_match_simpleitk(tmp_path):
    arr = np.arange(3 * 4 * 5, dtype=np.float32).reshape(3, 4, 5)  # (Z, Y, X)
    ref = _sitk_image(arr)
    sitk.WriteImage(ref, str(tmp_path / "a.nii.gz"))
    img = read_image(tmp_path / "a.nii.gz")
    assert img.grid.size == ref.GetSize() and img.data.shape == (1, 3, 4, 5)
    for index in [(0, 0, 0), (4, 1, 2), (2, 3, 1)]:
        world = ref.TransformIndexToPhysicalPoint(index)
        ours = img.grid.index_to_world(torch.tensor(index, dtype=torch.float64))
        np.testing.assert_allclose(ours.numpy(), world, atol=1e-5)
        i, j, k = index
        assert float(img.data[0, k, j, i]) == ref[index]


def test_2d_vector_image_becomes_channels_and_round_trips(tmp_path):
    arr = np.random.default_rng(1).random((4, 6, 3)).astype(np.float32)  # (Y, X, C)
    sitk.WriteImage(_sitk_image(arr, vector=True), str(tmp_path / "v.mha"))
    img = read_image(tmp_path / "v.mha")
    assert img.ndim == 2 and img.channels == 3 and img.grid.size == (6, 4)
    np.testing.assert_array_equal(img.data.numpy(), np.moveaxis(arr, -1, 0))
    write_image(img, tmp_path / "w.nrrd")
    back = sitk.ReadImage(str(tmp_path / "w.nrrd"))
    assert back.GetNumberOfComponentsPerPixel() == 3
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), arr)


@pytest.mark.parametrize(
    "np_dtype, torch_dtype",
    [(np.uint8, torch.uint8), (np.int8, torch.int8), (np.int16, torch.int16),
     (np.uint16, torch.int32), (np.int32, torch.int32), (np.uint32, torch.int64),
     (np.int64, torch.int64)],
)
def test_integer_pixels_are_labels_with_integer_dtype(tmp_path, np_dtype, torch_dtype):
    arr = (np.arange(24).reshape(2, 3, 4) % 7).astype(np_dtype)
    sitk.WriteImage(_sitk_image(arr), str(tmp_path / "l.nrrd"))
    img = read_image(tmp_path / "l.nrrd")
    assert img.dtype == torch_dtype and img.is_label is True
    np.testing.assert_array_equal(img.data[0].numpy(), arr)


def test_label_dtype_is_kept_when_writing(tmp_path):
    img = Image(torch.randint(0, 9, (1, 3, 4, 5), dtype=torch.int16), _grid3())
    write_image(img, tmp_path / "l.nii.gz")
    assert sitk.ReadImage(str(tmp_path / "l.nii.gz")).GetPixelID() == sitk.sitkInt16
    mask = Image(torch.zeros(1, 3, 4, 5, dtype=torch.bool), _grid3())
    assert to_sitk(mask).GetPixelID() == sitk.sitkUInt8
    f32 = Image(torch.zeros(1, 3, 4, 5), _grid3())
    write_image(f32, tmp_path / "f.nii.gz")
    assert sitk.ReadImage(str(tmp_path / "f.nii.gz")).GetPixelID() == sitk.sitkFloat32


def test_float64_is_float32_unless_asked(tmp_path):
    arr = np.random.default_rng(2).random((2, 3, 4))
    sitk.WriteImage(_sitk_image(arr), str(tmp_path / "d.nrrd"))
    assert read_image(tmp_path / "d.nrrd").dtype == torch.float32
    exact = read_image(tmp_path / "d.nrrd", dtype=torch.float64)
    np.testing.assert_array_equal(exact.data[0].numpy(), arr)


def test_is_label_overrides(tmp_path):
    arr = np.array([[[0, 1], [2, 3]]], dtype=np.int16)
    sitk.WriteImage(_sitk_image(arr), str(tmp_path / "i.mha"))
    intens = read_image(tmp_path / "i.mha", is_label=False)
    assert intens.dtype == torch.float32 and intens.is_label is False
    sitk.WriteImage(_sitk_image(arr.astype(np.float32)), str(tmp_path / "f.mha"))
    labels = read_image(tmp_path / "f.mha", is_label=True)
    assert labels.is_label and not labels.data.is_floating_point()
    np.testing.assert_array_equal(labels.data[0].numpy(), arr)
    sitk.WriteImage(_sitk_image(arr.astype(np.float32) + 0.5), str(tmp_path / "h.mha"))
    with pytest.raises(InvalidImageError, match="non-integer"):
        read_image(tmp_path / "h.mha", is_label=True)


def test_from_sitk_to_sitk_are_inverse():
    arr = np.random.default_rng(3).random((3, 4, 5)).astype(np.float32)
    ref = _sitk_image(arr)
    img = from_sitk(ref)
    out = to_sitk(img)
    assert out.GetSize() == ref.GetSize()
    np.testing.assert_allclose(out.GetDirection(), ref.GetDirection())
    np.testing.assert_allclose(out.GetOrigin(), ref.GetOrigin())
    np.testing.assert_array_equal(sitk.GetArrayFromImage(out), arr)


def test_4d_images_are_refused_with_a_hint(tmp_path):
    vol = sitk.GetImageFromArray(np.zeros((2, 3, 4), np.float32))
    sitk.WriteImage(sitk.JoinSeries([vol, vol]), str(tmp_path / "t.nii.gz"))
    with pytest.raises(ImageFormatError, match="4D.*extract one 3D volume"):
        read_image(tmp_path / "t.nii.gz")
    single = from_sitk(sitk.JoinSeries([vol]))  # one volume along t: accepted as 3D
    assert single.ndim == 3 and single.grid.size == (4, 3, 2)


def test_read_header_reads_no_voxels(tmp_path):
    sitk.WriteImage(_sitk_image(np.zeros((3, 4, 5), np.int16)), str(tmp_path / "h.nrrd"))
    header = read_header(tmp_path / "h.nrrd")
    assert header.grid.same_as(_grid3()) and header.components == 1
    assert "16-bit signed" in header.pixel_type


# ---------------------------------------------------------------------------- bad inputs
def test_missing_file_and_directory(tmp_path):
    with pytest.raises(ImageReadError, match="does not exist"):
        read_image(tmp_path / "nope.nii.gz")
    with pytest.raises(ImageReadError, match="is a folder with no DICOM series"):
        read_image(tmp_path)


def test_non_image_file_names_the_path_without_hdf5_noise(tmp_path, capfd):
    path = tmp_path / "notes.h5"
    path.write_text("this is not an image\n")
    with pytest.raises(ImageReadError, match="notes.h5"):
        read_image(path)
    assert "HDF5-DIAG" not in capfd.readouterr().err


def _nifti_bytes(tmp_path, ext) -> bytes:
    arr = np.random.default_rng(4).random((10, 11, 12)).astype(np.float32)
    sitk.WriteImage(_sitk_image(arr), str(tmp_path / f"src.{ext}"))
    return (tmp_path / f"src.{ext}").read_bytes()


@pytest.mark.parametrize("fraction", [0.05, 0.5, 0.999])
def test_truncated_nii_gz_is_an_error(tmp_path, fraction):
    # SimpleITK itself zero-fills the missing voxels of a truncated NIfTI without complaint.
    data = _nifti_bytes(tmp_path, "nii.gz")
    path = tmp_path / "cut.nii.gz"
    path.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(ImageReadError, match="cut.nii.gz"):
        read_image(path)


def test_corrupt_nii_gz_and_truncated_nii_are_errors(tmp_path):
    data = bytearray(_nifti_bytes(tmp_path, "nii.gz"))
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "bad.nii.gz").write_bytes(bytes(data))
    with pytest.raises(ImageReadError, match="bad.nii.gz"):
        read_image(tmp_path / "bad.nii.gz")
    raw = _nifti_bytes(tmp_path, "nii")
    (tmp_path / "cut.nii").write_bytes(raw[: len(raw) - 100])
    with pytest.raises(ImageReadError, match="cut.nii.*header needs"):
        read_image(tmp_path / "cut.nii")
    # a complete gzip of something that is not NIfTI
    (tmp_path / "text.nii.gz").write_bytes(gzip.compress(b"hello" * 100))
    with pytest.raises(ImageReadError, match="text.nii.gz"):
        read_image(tmp_path / "text.nii.gz")


@pytest.mark.parametrize("ext", ["nrrd", "mha"])
def test_truncated_nrrd_and_mha_are_errors(tmp_path, ext):
    arr = np.random.default_rng(5).random((10, 11, 12)).astype(np.float32)
    sitk.WriteImage(_sitk_image(arr), str(tmp_path / f"a.{ext}"), True)
    data = (tmp_path / f"a.{ext}").read_bytes()
    (tmp_path / f"cut.{ext}").write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ImageReadError, match=f"cut.{ext}"):
        read_image(tmp_path / f"cut.{ext}")


def _meta_header(dims: str, etype: str = "MET_FLOAT") -> bytes:
    return (
        "ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
        f"CompressedData = False\nDimSize = {dims}\nElementType = {etype}\n"
        "ElementDataFile = LOCAL\n"
    ).encode() + b"\0" * 64


def test_hostile_header_is_refused_before_allocation(tmp_path):
    path = tmp_path / "huge.mha"
    path.write_bytes(_meta_header("100000 100000 100000"))
    with pytest.raises(ImageReadError, match="huge.mha.*voxels"):
        read_image(path)
    with pytest.raises(ImageReadError, match="voxels"):
        read_header(path)


def test_memory_budget(tmp_path, monkeypatch):
    path = tmp_path / "big.mha"
    path.write_bytes(_meta_header("1000 1000 500"))  # 5e8 voxels: below MAX_VOXELS
    with pytest.raises(ImageReadError, match="GiB.*budget"):
        read_image(path, max_bytes=2**30)
    monkeypatch.setenv("ITREG_MAX_IMAGE_BYTES", "1e6")
    with pytest.raises(ImageReadError, match="budget"):
        read_image(path)


def test_invalid_geometry_names_the_file(tmp_path):
    path = tmp_path / "flat.mha"
    header = _meta_header("2 2 2", "MET_UCHAR").replace(
        b"ElementDataFile", b"TransformMatrix = 1 0 0 1 0 0 0 0 0\nElementDataFile")
    path.write_bytes(header[:-64] + b"\0" * 8)
    with pytest.raises(GeometryError, match="flat.mha"):
        read_image(path)


def test_check_image_counts_nan_and_refuses_constant():
    grid = _grid3()
    data = torch.zeros(1, *grid.shape)
    data[0, 0, 0, :3] = float("nan")
    data[0, 1, 1, 1] = float("inf")
    with pytest.raises(InvalidImageError, match="4 NaN/Inf"):
        check_image(Image(data, grid), "a.nii.gz")
    with pytest.raises(InvalidImageError, match="constant"):
        check_image(Image(torch.full((1, *grid.shape), 3.0), grid), "b.nii.gz")
    ok = Image(torch.arange(grid.numel, dtype=torch.float32).reshape(1, *grid.shape), grid)
    assert check_image(ok) is ok


# ---------------------------------------------------------------------------- masks
def _write_mask(tmp_path, arr, name="m.nii.gz"):
    sitk.WriteImage(_sitk_image(arr), str(tmp_path / name))
    return tmp_path / name


def test_read_mask_nonzero_is_inside(tmp_path, caplog):
    arr = np.zeros((3, 4, 5), np.uint8)
    arr[1, 1:3, 1:4] = 1
    mask = read_mask(_write_mask(tmp_path, arr), _grid3())
    assert mask.dtype == torch.bool and mask.is_label and int(mask.data.sum()) == 6
    arr[0, 0, 0] = 7
    with caplog.at_level(logging.WARNING, logger="itreg.io"):
        mask = read_mask(_write_mask(tmp_path, arr, "n.nii.gz"), None)
    assert int(mask.data.sum()) == 7 and "not binary" in caplog.text


def test_read_mask_errors(tmp_path):
    with pytest.raises(MaskError, match="all zero"):
        read_mask(_write_mask(tmp_path, np.zeros((3, 4, 5), np.uint8)), _grid3())
    arr = np.ones((3, 4, 5), np.uint8)
    other = Grid((5, 4, 3), (0.7, 1.1, 2.5), (11.0, -20.0, 5.5), OBLIQUE)
    with pytest.raises(MaskError, match="another grid"):
        read_mask(_write_mask(tmp_path, arr, "o.nii.gz"), other)
    vec = np.ones((3, 4, 5, 2), np.uint8)
    sitk.WriteImage(_sitk_image(vec, vector=True), str(tmp_path / "v.nrrd"))
    with pytest.raises(MaskError, match="components"):
        read_mask(tmp_path / "v.nrrd", None)
    with pytest.raises(ImageReadError):
        read_mask(tmp_path / "missing.nii.gz", None)


def test_concurrent_reads_share_the_stderr_capture(tmp_path, capfd):
    import threading

    grid = _grid3()
    write_image(Image(torch.rand(1, *grid.shape), grid), tmp_path / "a.nii.gz")
    (tmp_path / "junk.h5").write_text("junk")
    errors: list[BaseException] = []

    def work():
        for _ in range(5):
            try:
                read_image(tmp_path / "a.nii.gz")
            except BaseException as exc:  # noqa: BLE001 - collected for the assertion
                errors.append(exc)
            with pytest.raises(ImageReadError):
                read_image(tmp_path / "junk.h5")

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    import os

    os.write(2, b"still-stderr\n")  # descriptor 2 is restored afterwards
    err = capfd.readouterr().err
    assert "still-stderr" in err and "HDF5-DIAG" not in err


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_nifti_nan_voxels_are_refused_not_zeroed(tmp_path, suffix):
    """ITK's NIfTI reader reads NaN as 0; itreg counts them from the file and refuses."""
    arr = np.random.default_rng(0).random((6, 7, 8)).astype(np.float32)
    arr[1, 2, 3] = np.nan
    arr[4, 5, 6] = np.inf
    path = tmp_path / f"nan{suffix}"
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(path))
    assert not np.isnan(sitk.GetArrayFromImage(sitk.ReadImage(str(path)))).any()
    with pytest.raises(InvalidImageError, match="2 NaN/Inf"):
        read_image(path)

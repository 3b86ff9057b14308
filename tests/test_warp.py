"""Resampling against SimpleITK's ResampleImageFilter."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from itreg.errors import ConfigError, GeometryError
from itreg.grid import Grid
from itreg.image import Image
from itreg.transforms import Affine, BSpline, Compose, Translation
from itreg.warp import resample, resample_with_mask, sample

F64 = torch.float64


def _direction(ndim: int, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    r = np.eye(ndim)
    r[:2, :2] = [[c, -s], [s, c]]
    if ndim == 3:
        c2, s2 = math.cos(0.7 * angle), math.sin(0.7 * angle)
        r = r @ np.array([[c2, 0, s2], [0, 1, 0], [-s2, 0, c2]])
    return r


def _setup(ndim: int, dtype=F64):
    """An oblique anisotropic moving image, an oblique fixed grid and an affine between them."""
    moving_grid = Grid((12, 10, 8)[:ndim], (1.2, 0.9, 2.0)[:ndim], (-4.0, 3.0, -2.0)[:ndim],
                       _direction(ndim, 0.35).ravel())
    fixed = Grid((14, 11, 9)[:ndim], (1.0, 1.3, 1.7)[:ndim], (-6.0, 1.0, -3.0)[:ndim],
                 _direction(ndim, -0.25).ravel())
    g = torch.Generator().manual_seed(ndim)
    data = torch.rand(moving_grid.shape, generator=g, dtype=F64).to(dtype) * 100.0 + 10.0
    moving = Image(data, moving_grid)
    a = torch.eye(ndim, dtype=F64) + 0.1 * torch.randn(ndim, ndim, generator=g, dtype=F64)
    t = Affine(ndim, center=fixed.center, translation=[1.5, -2.0, 0.7][:ndim], matrix=a,
               dtype=F64)
    return moving, fixed, t


def _to_sitk(image: Image) -> sitk.Image:
    img = sitk.GetImageFromArray(image.data[0].numpy())
    img.SetSpacing(image.grid.spacing)
    img.SetOrigin(image.grid.origin)
    img.SetDirection(image.grid.direction)
    return img


def _reference(grid: Grid) -> sitk.Image:
    ref = sitk.Image(list(grid.size), sitk.sitkUInt8)
    ref.SetSpacing(grid.spacing)
    ref.SetOrigin(grid.origin)
    ref.SetDirection(grid.direction)
    return ref


def _sitk_affine(t: Affine) -> sitk.AffineTransform:
    return sitk.AffineTransform(t.matrix().detach().numpy().ravel().tolist(),
                                t.translation.detach().tolist(), t.center.tolist())


def _sitk_resample(image: Image, grid: Grid, tx, interpolator, pixel_type=sitk.sitkFloat64):
    out = sitk.Resample(_to_sitk(image), _reference(grid), tx, interpolator, 0.0, pixel_type)
    return torch.from_numpy(sitk.GetArrayFromImage(out))


def _sitk_inside(image: Image, grid: Grid, tx) -> torch.Tensor:
    ones = Image(torch.ones(image.grid.shape, dtype=torch.uint8), image.grid)
    return _sitk_resample(ones, grid, tx, sitk.sitkNearestNeighbor, sitk.sitkUInt8) > 0


@pytest.mark.parametrize("ndim", [2, 3])
def test_linear_matches_sitk(ndim):
    moving, fixed, t = _setup(ndim)
    out, inside = resample_with_mask(moving, t, fixed, mode="linear")
    ref = _sitk_resample(moving, fixed, _sitk_affine(t), sitk.sitkLinear)
    ref_inside = _sitk_inside(moving, fixed, _sitk_affine(t))
    assert inside.shape == fixed.shape and inside.dtype == torch.bool
    assert torch.equal(inside, ref_inside)
    assert 0.2 < float(inside.double().mean()) < 0.95  # partial overlap: both cases tested
    got = out.data[0]
    torch.testing.assert_close(got[inside], ref[inside], rtol=1e-4, atol=0)
    assert torch.all(got[~inside] == 0)


@pytest.mark.parametrize("ndim", [2, 3])
def test_nearest_matches_sitk(ndim):
    moving, fixed, t = _setup(ndim)
    out, inside = resample_with_mask(moving, t, fixed, mode="nearest")
    ref = _sitk_resample(moving, fixed, _sitk_affine(t), sitk.sitkNearestNeighbor)
    torch.testing.assert_close(out.data[0][inside], ref[inside], rtol=0, atol=0)


@pytest.mark.parametrize("ndim", [2, 3])
def test_label_mode_matches_sitk_label_linear(ndim):
    moving, fixed, t = _setup(ndim)
    labels = Image((moving.data / 30.0).floor().to(torch.uint8) * 2, moving.grid)
    assert labels.is_label and labels.data.unique().numel() >= 4
    out, inside = resample_with_mask(labels, t, fixed)  # auto -> label
    assert out.dtype == torch.uint8 and out.is_label
    ref = _sitk_resample(labels, fixed, _sitk_affine(t), sitk.sitkLabelLinear, sitk.sitkUInt8)
    agree = (out.data[0] == ref)[inside].double().mean()
    assert float(agree) == 1.0
    assert set(out.data.unique().tolist()) <= set(labels.data.unique().tolist())


def test_label_mode_chunks_labels(monkeypatch):
    from itreg import warp

    moving, fixed, t = _setup(2)
    labels = Image((moving.data / 10.0).floor().to(torch.int32), moving.grid)
    full = resample(labels, t, fixed, mode="label")
    monkeypatch.setattr(warp, "_LABEL_BUDGET", 1)  # one label at a time
    one_by_one = resample(labels, t, fixed, mode="label")
    assert torch.equal(full.data, one_by_one.data) and full.dtype == torch.int32


def test_bspline_through_compose_matches_sitk():
    moving, fixed, t = _setup(3)
    b = BSpline(fixed, 6.0, dtype=F64)
    with torch.no_grad():
        b.coefficients.copy_(torch.randn(b.coefficients.shape, dtype=F64,
                                         generator=torch.Generator().manual_seed(0)))
    out, inside = resample_with_mask(moving, Compose(t, b), fixed, mode="linear")
    sb = sitk.BSplineTransform(3, 3)
    fp, pp = b.to_itk_parameters()
    sb.SetFixedParameters(fp)
    sb.SetParameters(pp)
    comp = sitk.CompositeTransform([_sitk_affine(t), sb])
    ref = _sitk_resample(moving, fixed, comp, sitk.sitkLinear)
    ref_inside = _sitk_inside(moving, fixed, comp)
    assert float((inside == ref_inside).double().mean()) > 0.999  # ITK's float weights
    both = inside & ref_inside
    torch.testing.assert_close(out.data[0][both], ref[both], rtol=1e-4, atol=0)


def test_identity_padding_dtype_and_sample_shapes():
    moving, fixed, _ = _setup(2, dtype=torch.float32)
    same = resample(moving, None, moving.grid)
    assert same.dtype == torch.float32 and not same.is_label
    torch.testing.assert_close(same.data, moving.data, rtol=1e-4, atol=0)
    far = Translation(2, translation=[1000.0, 0.0])
    out, inside = resample_with_mask(moving, far, fixed, padding=-7.0)
    assert not inside.any() and torch.all(out.data == -7.0)
    pts = moving.grid.points(dtype=torch.float32)[:3, :4]  # (3, 4, 2)
    values, inside = sample(moving, pts)
    assert values.shape == (1, 3, 4) and inside.shape == (3, 4) and inside.all()
    torch.testing.assert_close(values[0], moving.data[0, :3, :4], rtol=1e-4, atol=0)
    # Linear on an integer image gives floats and no label flag.
    labels = Image(torch.arange(20, dtype=torch.int64).reshape(4, 5), Grid((5, 4)))
    lin = resample(labels, None, labels.grid, mode="linear")
    assert lin.data.is_floating_point() and not lin.is_label
    near = resample(labels, None, labels.grid, mode="nearest")
    assert near.dtype == torch.int64 and torch.equal(near.data, labels.data)


def test_bad_input():
    moving, fixed, t = _setup(2)
    with pytest.raises(ConfigError):
        resample(moving, t, fixed, mode="cubic")
    with pytest.raises(GeometryError):
        sample(moving, torch.zeros(5, 3, dtype=F64))
    with pytest.raises(GeometryError):
        resample(moving, Affine(3), fixed)
    with pytest.raises(GeometryError):
        resample(moving, None, Grid((4, 4, 4)))


def test_gradcheck_sample_and_resample():
    moving, _, _ = _setup(2)
    small = Image(moving.data[:, :4, :5].clone(), Grid((5, 4), (1.2, 0.9), (0.0, 0.0)))
    g = torch.Generator().manual_seed(0)
    # Points strictly inside and off voxel boundaries (linear interpolation is smooth there).
    index = torch.tensor([[0.3, 0.4], [1.7, 2.2], [3.6, 1.1]], dtype=F64)
    pts = small.grid.index_to_world(index + 0.01 * torch.rand(3, 2, generator=g, dtype=F64))
    pts.requires_grad_(True)
    data = small.data.clone().requires_grad_(True)

    def fn(p, d):
        return sample(Image(d, small.grid), p)[0]

    assert torch.autograd.gradcheck(fn, (pts, data))

    tiny = Grid((3, 3), (0.9, 0.7), (1.3, 0.8))  # maps off voxel boundaries
    aff = Affine(2, center=tiny.center, translation=[0.05, 0.1],
                 matrix=[[1.02, 0.03], [-0.02, 0.97]], dtype=F64)
    names = [n for n, _ in aff.named_parameters()]

    class Wrapped(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.t = aff

        def forward(self):
            return resample(small, self.t, tiny, mode="linear").data

    w = Wrapped()

    def call(*ps):
        return torch.func.functional_call(w, {f"t.{n}": p for n, p in zip(names, ps)}, ())

    inputs = tuple(p.detach().clone().requires_grad_(True) for p in aff.parameters())
    assert torch.autograd.gradcheck(call, inputs)

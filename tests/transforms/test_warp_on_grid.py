"""itreg.warp.warp_on_grid (the separable output path of affine and B-spline runs) against
SimpleITK's BSplineTransform / CompositeTransform, its resampler and displacement-field filter,
and against itreg's general point-array path, in 2D and 3D on oblique grids."""

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from itreg import io
from itreg.grid import Grid
from itreg.image import Image
from itreg.transforms import Affine, Compose
from itreg.transforms.bspline import BSpline
from itreg.warp import resample, warp_on_grid


def _rotation(d: int, seed: int) -> np.ndarray:
    q = np.linalg.qr(np.random.default_rng(seed).normal(size=(d, d)))[0]
    return q * np.sign(np.linalg.det(q))


def _case(d: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    fgrid = Grid((23, 19, 17)[:d], spacing=(1.5, 1.2, 2.0)[:d], origin=(3.0, -4.0, 2.5)[:d],
                 direction=tuple(_rotation(d, seed).ravel()))
    mgrid = Grid((21, 25, 15)[:d], spacing=(1.3, 1.1, 2.2)[:d], origin=(1.0, -6.0, 0.0)[:d],
                 direction=tuple(_rotation(d, seed + 1).ravel()))
    moving = Image(torch.as_tensor(rng.random((1, *mgrid.shape))), mgrid)
    spline = BSpline(fgrid, 9.0, dtype=torch.float64)
    with torch.no_grad():
        spline.coefficients.copy_(torch.as_tensor(rng.normal(scale=2.0,
                                                             size=spline.coefficients.shape)))
    matrix = np.eye(d) + rng.normal(scale=0.06, size=(d, d))
    affine = Affine(d, center=fgrid.center, translation=rng.normal(scale=1.5, size=d).tolist(),
                    matrix=matrix.tolist(), dtype=torch.float64)
    return fgrid, moving, affine, spline


def _sitk_transform(affine: Affine, spline: BSpline) -> sitk.Transform:
    d = spline.ndim
    h = affine.homogeneous().detach().numpy()
    a = sitk.AffineTransform(d)
    a.SetMatrix(h[:d, :d].ravel().tolist())
    a.SetTranslation(h[:d, d].tolist())
    b = sitk.BSplineTransform(d, 3)
    fixed, params = spline.to_itk_parameters()
    b.SetFixedParameters(fixed)
    b.SetParameters(params)
    comp = sitk.CompositeTransform(d)
    comp.AddTransform(a)  # applied last
    comp.AddTransform(b)  # applied first
    return comp


@pytest.mark.parametrize("d", [2, 3])
def test_field_and_warp_match_simpleitk(d):
    fgrid, moving, affine, spline = _case(d)
    warped, field = warp_on_grid(moving, Compose(affine, spline), fgrid, field=True)
    ref = io.to_sitk(Image(torch.zeros(1, *fgrid.shape, dtype=torch.float64), fgrid))
    tx = _sitk_transform(affine, spline)
    f = sitk.TransformToDisplacementFieldFilter()
    f.SetReferenceImage(ref)
    f.SetOutputPixelType(sitk.sitkVectorFloat64)
    expected = sitk.GetArrayFromImage(f.Execute(tx))
    assert np.abs(expected).max() > 2.0  # a real deformation
    np.testing.assert_allclose(field.numpy(), expected, atol=1e-6, rtol=0)
    simple = sitk.GetArrayFromImage(sitk.Resample(io.to_sitk(moving), ref, tx, sitk.sitkLinear,
                                                  0.0, sitk.sitkFloat64))
    ours = warped.data[0].numpy()
    # SimpleITK pads half a voxel earlier at the moving image's edges (ITK's inside test of
    # the linear interpolator); compare where both sample the image.
    both = (ours != 0) & (simple != 0)
    assert both.mean() > 0.15 and (ours == 0).mean() > 0.02
    np.testing.assert_allclose(ours[both], simple[both], atol=1e-9, rtol=0)


@pytest.mark.parametrize("d", [2, 3])
def test_matches_the_general_resampler(d):
    fgrid, moving, affine, spline = _case(d, seed=3)
    for transform in (Compose(affine, spline), spline, affine):
        for field in (False, True):
            warped, disp = warp_on_grid(moving, transform, fgrid, field=field)
            with torch.no_grad():
                ref = resample(moving, transform, fgrid).data
                ref_disp = transform.displacement(fgrid, dtype=torch.float64)
            np.testing.assert_allclose(warped.data.numpy(), ref.numpy(), atol=1e-9, rtol=0)
            assert (disp is None) == (not field)
            if field:
                np.testing.assert_allclose(disp.numpy(), ref_disp.numpy(), atol=1e-9, rtol=0)


def test_float32_agrees_with_float64():
    fgrid, moving, affine, spline = _case(3, seed=5)
    w64, f64 = warp_on_grid(moving, Compose(affine, spline), fgrid, field=True)
    m32 = Image(moving.data.float(), moving.grid)
    w32, f32 = warp_on_grid(m32, Compose(affine.float(), spline.float()), fgrid, field=True)
    assert f32.dtype == torch.float32
    np.testing.assert_allclose(f32.numpy(), f64.numpy(), atol=1e-4)
    np.testing.assert_allclose(w32.data.numpy(), w64.data.numpy(), atol=1e-4)


def test_declines_what_it_does_not_cover():
    fgrid, moving, affine, spline = _case(3, seed=7)
    other = Grid(fgrid.size, fgrid.spacing, fgrid.origin, tuple(_rotation(3, 11).ravel()))
    assert warp_on_grid(moving, spline, other) is None  # control grid of another direction
    labels = Image(torch.zeros(1, *moving.grid.shape, dtype=torch.int16), moving.grid,
                   is_label=True)
    assert warp_on_grid(labels, affine, fgrid) is None
    assert warp_on_grid(moving, Compose(spline, affine), fgrid) is None  # affine applied first

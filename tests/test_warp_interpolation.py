"""Cubic B-spline and per-label cubic interpolation in :mod:`itreg.warp`, against SimpleITK."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from itreg import Grid
from itreg.image import Image
from itreg.io import from_sitk
from itreg.transforms import Affine
from itreg.warp import resample, sample

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("shape", [(7, 9, 6), (30, 25, 21), (1, 12, 10)])
def test_bspline_mode_matches_simpleitk_bspline_resampling(shape):
    arr = np.random.default_rng(0).normal(size=shape)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing((1.2, 0.9, 1.5))
    img.SetOrigin((3.0, -2.0, 1.0))
    tx = sitk.AffineTransform(3)
    tx.SetMatrix((1.02, 0.1, 0.0, -0.05, 0.97, 0.03, 0.0, 0.02, 1.01))
    tx.SetTranslation((0.7, -0.4, 0.3))
    tx.SetCenter((8.0, 5.0, 10.0))
    ref = sitk.GetArrayFromImage(sitk.Resample(img, img, tx, sitk.sitkBSpline, -3.0,
                                               sitk.sitkFloat64))
    a = Affine(3, center=tx.GetCenter(), translation=tx.GetTranslation(),
               matrix=np.array(tx.GetMatrix()).reshape(3, 3), dtype=torch.float64)
    ours = resample(from_sitk(img, dtype=torch.float64), a, from_sitk(img).grid, mode="bspline",
                    padding=-3.0)
    assert (ref == -3.0).any()
    np.testing.assert_allclose(ours.data[0].detach().numpy(), ref, atol=1e-8)


def test_bspline_interpolation_is_differentiable():
    grid = Grid((6, 5), (1.0, 1.5), (0.0, 1.0))  # 2D and 3D share the code
    data = torch.randn(1, 5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    pts = torch.tensor([[1.3, 2.9], [4.2, 5.1], [0.2, 2.0]], dtype=torch.float64,
                       requires_grad=True)

    def f(d, p):
        return sample(Image(d, grid), p, mode="bspline")[0]

    assert torch.autograd.gradcheck(f, (data.requires_grad_(), pts))


def test_label_bspline_interpolates_samples_exactly_and_keeps_a_one_voxel_line():
    data = torch.zeros(1, 9, 11, dtype=torch.int16)
    data[0, 4, 1:10] = 7  # one-voxel line along x
    data[0, 6:9, 2:8] = 3
    grid = Grid((11, 9), (1.0, 1.0))
    image = Image(data, grid, is_label=True)
    same = resample(image, None, grid, mode="label-bspline")
    assert torch.equal(same.data, data) and same.data.dtype == torch.int16
    # Half a voxel off the line, linear weights tie at 1/2 and the smaller label (0) wins;
    # the cubic interpolant of the line is above 1/2 there.
    pts = torch.tensor([[5.0, 4.45], [5.0, 3.55]], dtype=torch.float64)
    assert sample(image, pts, mode="label-bspline")[0].tolist() == [[7, 7]]
    assert sample(image, pts, mode="label")[0].tolist() == [[7, 7]]
    pts = torch.tensor([[5.0, 4.5]], dtype=torch.float64)
    assert sample(image, pts, mode="label-bspline")[0].tolist() == [[7]]
    assert sample(image, pts, mode="label")[0].tolist() == [[0]]

"""Random misalignments lie in their documented ranges; padding keeps world positions."""

import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from itreg.errors import ConfigError
from itreg.grid import Grid
from itreg.image import Image
from itreg.phantoms import (
    anchor_affine,
    anchor_parameters,
    pad_grid,
    pad_image,
    random_affine,
    sample_affine_parameters,
)

SEEDS = range(40)


def _in(values, lo, hi, signed):
    mags = [abs(v) for v in values] if signed else list(values)
    return all(lo - 1e-12 <= m <= hi + 1e-12 for m in mags)


@pytest.mark.parametrize("ndim", [2, 3])
def test_paper000_ranges(ndim):
    signs_t, signs_r = set(), set()
    for seed in SEEDS:
        rigid = sample_affine_parameters(ndim, seed, "rigid")
        affine = sample_affine_parameters(ndim, seed, "affine")
        for p in (rigid, affine):
            assert len(p.translation) == ndim and len(p.angles) == (1 if ndim == 2 else 3)
            assert _in(p.translation, 1.0, 25.0, signed=True)
            assert _in(p.angles, 0.01, 0.15, signed=True)
            signs_t |= {math.copysign(1, v) for v in p.translation}
            signs_r |= {math.copysign(1, v) for v in p.angles}
        assert rigid.scales == (1.0,) * ndim and set(rigid.shear) == {0.0}
        a = rigid.matrix()
        assert np.allclose(a @ a.T, np.eye(ndim)) and np.isclose(np.linalg.det(a), 1.0)
        assert _in(affine.scales, 0.95, 1.05, signed=False)
        assert len(affine.shear) == ndim * (ndim - 1) and _in(affine.shear, -0.01, 0.01, False)
        # One seed: rigid and affine share translation and rotation.
        assert affine.translation == rigid.translation and affine.angles == rigid.angles
    assert signs_t == {-1.0, 1.0} and signs_r == {-1.0, 1.0}


def test_anchor_ranges():
    for seed in SEEDS:
        p = anchor_parameters(3, seed)
        assert _in(p.translation, 0.0, 20.0, signed=True)
        assert _in(p.angles, 0.0, math.radians(15.0), signed=True)
        assert _in(p.scales, 0.95, 1.05, signed=False) and set(p.shear) == {0.0}
    t = anchor_affine(3, (1.0, 2.0, 3.0), seed=7)
    assert torch.allclose(t.matrix().double(), torch.as_tensor(anchor_parameters(3, 7).matrix()),
                          atol=1e-6)


def test_matrix_composition():
    p = sample_affine_parameters(3, 11, "affine")
    s = np.diag(p.scales)
    h = np.eye(3)
    h[0, 1], h[0, 2], h[1, 0], h[1, 2], h[2, 0], h[2, 1] = p.shear
    # ITK Euler3DTransform: R = Rz Rx Ry.
    euler = sitk.Euler3DTransform((0, 0, 0), *p.angles)
    r = np.asarray(euler.GetMatrix()).reshape(3, 3)
    assert np.allclose(p.matrix(), r @ h @ s)


@pytest.mark.parametrize("kind", ["rigid", "affine"])
def test_random_affine_is_centred_and_seeded(kind):
    center = (10.0, -20.0, 5.0)
    t = random_affine(3, center, seed=3, kind=kind)
    p = sample_affine_parameters(3, 3, kind)
    c = torch.tensor(center)
    assert torch.allclose(t(c), c + torch.tensor(p.translation, dtype=torch.float32), atol=1e-4)
    assert torch.equal(t.matrix(), random_affine(3, center, seed=3, kind=kind).matrix())
    assert not torch.equal(t.matrix(), random_affine(3, center, seed=4, kind=kind).matrix())
    t64 = random_affine(2, (0.0, 0.0), seed=1, kind=kind, dtype=torch.float64)
    assert t64.matrix().dtype == torch.float64 and t64.ndim == 2


def test_custom_ranges_and_errors():
    p = sample_affine_parameters(3, 0, "rigid", translation_mm=(5.0, 5.0), rotation_rad=(0, 0))
    assert [abs(v) for v in p.translation] == [5.0, 5.0, 5.0] and set(p.angles) == {0.0}
    with pytest.raises(ConfigError, match="valid transform kinds"):
        sample_affine_parameters(3, 0, "bspline")
    with pytest.raises(ConfigError):
        sample_affine_parameters(3, 0, "rigid", translation_mm=(5.0, 1.0))
    with pytest.raises(ConfigError):
        sample_affine_parameters(3, 0, "affine", scale=(-1.0, 1.0))


def test_pad_image_keeps_world_positions_like_simpleitk():
    direction = sitk.VersorTransform((0.2, -0.3, 0.9), 0.4).GetMatrix()
    grid = Grid((5, 4, 3), (1.5, 2.0, 2.5), (10.0, -3.0, 7.0), direction)
    data = torch.arange(60, dtype=torch.float32).reshape(1, 3, 4, 5)
    img = Image(data, grid)
    padded = pad_image(img, (3.0, 2.0, 0.1), value=-1.0)
    pads = (2, 1, 1)  # ceil(margin / spacing)
    assert padded.grid.size == (9, 6, 5)
    assert torch.equal(padded.data[:, 1:-1, 1:-1, 2:-2], data)
    assert float(padded.data[0, 0, 0, 0]) == -1.0
    # The old voxel (0, 0, 0) is the new voxel pads, at the same world point.
    old = grid.index_to_world(torch.zeros(3, dtype=torch.float64))
    new = padded.grid.index_to_world(torch.tensor(pads, dtype=torch.float64))
    assert torch.allclose(old, new, atol=1e-9)
    # SimpleITK's ConstantPad gives the same geometry.
    ref = sitk.Image(grid.size, sitk.sitkFloat32)
    ref.SetSpacing(grid.spacing), ref.SetOrigin(grid.origin), ref.SetDirection(grid.direction)
    ref = sitk.ConstantPad(ref, pads, pads, -1.0)
    assert ref.GetSize() == padded.grid.size
    assert np.allclose(ref.GetOrigin(), padded.grid.origin, atol=1e-9)
    assert pad_grid(grid, (3.0, 2.0, 0.1)).same_as(padded.grid)


def test_pad_labels_keep_dtype_and_2d():
    lab = Image(torch.ones(1, 4, 6, dtype=torch.uint8), Grid((6, 4), (2.0, 2.0)))
    out = pad_image(lab, 4.0)
    assert out.dtype == torch.uint8 and out.is_label and out.data.shape == (1, 8, 10)
    assert int(out.data.sum()) == 24
    assert pad_image(lab, 0.0).grid.same_as(lab.grid)
    with pytest.raises(ConfigError):
        pad_image(lab, -1.0)

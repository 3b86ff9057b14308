"""Phantom pairs: the true transform realigns the moving image with the fixed one."""

import numpy as np
import pytest
import torch

from itreg.errors import ConfigError
from itreg.phantoms import (
    brain_pair,
    brain_slice_pair,
    labels,
    pair_from_tissues,
    random_affine,
    sample_affine_parameters,
    synthesize,
)
from itreg.warp import resample as _resample


def resample(*args, **kwargs):
    with torch.no_grad():
        return _resample(*args, **kwargs)


def _clean(mni4, **kw):
    return pair_from_tissues(mni4, noise_sigma=0.0, bias=None, **kw)


def _inner(mask):
    """Brain voxels at least one voxel away from the mask edge (no partial volume)."""
    m = mask.data[0] != 0
    inner = m.clone()
    for dim in range(m.dim()):
        inner &= torch.roll(m, 1, dim) & torch.roll(m, -1, dim)
    return inner


def _dice(a, b, k):
    a, b = a == k, b == k
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


@pytest.mark.parametrize("kind", ["affine", "rigid", "anchor"])
def test_true_transform_realigns(mni4, kind):
    pair = _clean(mni4, kind=kind, seed=1)
    t2 = synthesize(mni4, "t2", noise_sigma=0.0, bias=None)
    inner = _inner(pair.fixed_mask)

    def error(transform):
        warped = resample(pair.moving, transform, pair.fixed.grid)
        return float((warped.data[0] - t2.data[0])[inner].abs().mean())

    good = error(pair.true_transform)
    assert good < 0.03, good
    assert error(None) > 4 * good  # the pair is misaligned ...
    assert error(pair.true_transform.inverse()) > 4 * good  # ... and T is not T^-1


def test_point_correspondence(mni4):
    """moving(T(x)) equals the contrast at x, checked at voxel centres far from edges."""
    pair = _clean(mni4, seed=2)
    t2 = synthesize(mni4, "t2", noise_sigma=0.0, bias=None)
    grid = pair.fixed.grid
    inner = _inner(pair.fixed_mask)
    x = grid.points(dtype=torch.float64)[inner]
    y = pair.true_transform.to(torch.float64)(x)
    idx = pair.moving.grid.world_to_index(y)
    # Linear interpolation of the moving image at y, through resample on a 1-voxel grid each
    # would be slow; compare nearest voxels where y falls close to a voxel centre instead.
    near = (idx - idx.round()).abs().max(dim=-1).values < 0.1
    assert int(near.sum()) > 20
    ijk = idx[near].round().long()
    moved = pair.moving.data[0][ijk[:, 2], ijk[:, 1], ijk[:, 0]]
    assert float((moved - t2.data[0][inner][near]).abs().mean()) < 0.05


def test_labels_and_masks_follow(mni4):
    pair = _clean(mni4, seed=3)
    assert torch.equal(pair.fixed_labels.data, labels(mni4).data)
    assert pair.fixed is mni4["t1"] and pair.fixed_mask is mni4["mask"]
    back = resample(pair.moving_labels, pair.true_transform, pair.fixed.grid, mode="nearest")
    misaligned = resample(pair.moving_labels, None, pair.fixed.grid, mode="nearest")
    assert back.dtype == torch.uint8
    # At 4 mm, two nearest-neighbour resamplings cost thin CSF most (Dice about 0.7).
    for k, least in ((1, 0.6), (2, 0.85), (3, 0.85)):
        dice = _dice(back.data, pair.fixed_labels.data, k)
        assert dice > least and dice > _dice(misaligned.data, pair.fixed_labels.data, k) + 0.2
    # The whole brain stays in view: volumes scale with det(A).
    det = float(torch.linalg.det(pair.true_transform.matrix().detach().double()))
    v_fixed = float(pair.fixed_mask.data.sum())
    v_moving = float(pair.moving_mask.data.sum()) / det
    assert abs(v_moving - v_fixed) / v_fixed < 0.03
    edges = [pair.moving_mask.data[0].select(d, i) for d in range(3) for i in (0, -1)]
    assert all(int(e.sum()) == 0 for e in edges)


def test_transform_and_seed(mni4):
    a = pair_from_tissues(mni4, seed=4)
    b = pair_from_tissues(mni4, seed=4)
    c = pair_from_tissues(mni4, seed=5)
    assert torch.equal(a.moving.data, b.moving.data)
    assert not torch.equal(a.true_transform.matrix(), c.true_transform.matrix())
    assert a.parameters == sample_affine_parameters(3, 4, "affine")
    center = a.true_transform.center.tolist()
    ref = random_affine(3, center, seed=4, kind="affine")
    assert torch.allclose(a.true_transform.matrix(), ref.matrix())
    assert torch.allclose(a.true_transform.translation, ref.translation)
    # The centre of rotation is the brain's centroid.
    inside = mni4["mask"].data[0] != 0
    centroid = mni4["t1"].grid.points(dtype=torch.float64)[inside].mean(0)
    assert np.allclose(center, centroid.tolist(), atol=1e-3)
    assert a.moving.dtype == torch.float32 and a.moving.grid.spacing == (4.0, 4.0, 4.0)


def test_fixed_padding_and_errors(mni4):
    pair = _clean(mni4, seed=0, pad_mm=8.0, contrast="pd")
    assert pair.moving.grid.size == tuple(n + 4 for n in mni4["t1"].grid.size)
    with pytest.raises(ConfigError, match="valid misalignment kinds"):
        pair_from_tissues(mni4, kind="bspline")
    with pytest.raises(ConfigError, match="missing"):
        pair_from_tissues({"t1": mni4["t1"]})
    with pytest.raises(ConfigError, match="valid contrasts"):
        pair_from_tissues(mni4, contrast="flair")


def test_t1_moving_contrast(mni4):
    pair = _clean(mni4, contrast="t1", seed=6)
    warped = resample(pair.moving, pair.true_transform, pair.fixed.grid)
    inner = _inner(pair.fixed_mask)
    diff = (warped.data[0] - pair.fixed.data[0])[inner].abs().mean()
    assert float(diff) < 0.03


def test_brain_pair_front_door():
    pair = brain_pair(spacing_mm=6.0, seed=0)
    assert pair.fixed.grid.spacing == (6.0, 6.0, 6.0) and pair.fixed.ndim == 3
    assert pair.moving.ndim == 3 and pair.true_transform.ndim == 3


def test_slice_pair_2d():
    pair = brain_slice_pair(spacing_mm=3.0, seed=1, noise_sigma=0.0, bias=None)
    assert pair.fixed.ndim == pair.moving.ndim == pair.true_transform.ndim == 2
    assert pair.fixed.grid.spacing == (3.0, 3.0)
    assert len(pair.parameters.angles) == 1
    back = resample(pair.moving_labels, pair.true_transform, pair.fixed.grid, mode="nearest")
    for k, least in ((1, 0.6), (2, 0.8), (3, 0.8)):
        assert _dice(back.data, pair.fixed_labels.data, k) > least, k
    misaligned = resample(pair.moving_labels, None, pair.fixed.grid, mode="nearest")
    assert _dice(misaligned.data, pair.fixed_labels.data, 3) < _dice(
        back.data, pair.fixed_labels.data, 3)

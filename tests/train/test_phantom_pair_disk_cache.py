"""PhantomPairs' disk cache: a pair loaded from disk equals the pair built from its seed."""

from __future__ import annotations

import pytest
import torch

from itreg.phantoms import load_mni, pair_from_tissues
from itreg.train.sources import PhantomPairs
from itreg.warp import resample


@pytest.fixture(scope="module")
def mni4():
    return load_mni(4.0)


@pytest.mark.parametrize("ndim", [2, 3])
def test_disk_cached_pair_equals_the_built_one(tmp_path, mni4, ndim):
    built = PhantomPairs(2, ndim=ndim, spacing_mm=4.0, seed=11, template=mni4,
                         cache_dir=tmp_path)
    first = built[1]
    files = sorted(tmp_path.glob("*.pt"))
    assert len(files) == 1 and files[0].name.endswith("-12.pt")
    # A new source (another process) reads the file instead of building the pair again.
    loaded = PhantomPairs(2, ndim=ndim, spacing_mm=4.0, seed=11, template=mni4,
                          cache_dir=tmp_path)[1]
    fresh = PhantomPairs(2, ndim=ndim, spacing_mm=4.0, seed=11, template=mni4)[1]
    for s in (first, loaded):
        for key in ("fixed", "moving", "fixed_labels", "moving_labels"):
            a, b = getattr(s, key), getattr(fresh, key)
            assert a.grid.same_as(b.grid) and a.is_label == b.is_label
            assert a.data.dtype == b.data.dtype and torch.equal(a.data, b.data), key
        assert torch.equal(s.truth.coefficients, fresh.truth.coefficients)
    # ... and the sample is the protocol's pair: the moving image pair_from_tissues makes.
    if ndim == 3:
        pair = pair_from_tissues(mni4, "t2", "ffd", 12)
        assert torch.equal(resample(pair.moving, None, fresh.fixed.grid, mode="linear").data,
                           loaded.moving.data)


def test_other_settings_or_a_broken_file_do_not_reuse_the_cache(tmp_path, mni4):
    PhantomPairs(1, ndim=2, spacing_mm=4.0, seed=3, template=mni4, cache_dir=tmp_path)[0]
    pd = PhantomPairs(1, ndim=2, spacing_mm=4.0, seed=3, contrast="pd", template=mni4,
                      cache_dir=tmp_path)
    assert pd.cache_path(0) != PhantomPairs(1, ndim=2, spacing_mm=4.0, seed=3,
                                            cache_dir=tmp_path).cache_path(0)
    path = pd.cache_path(0)
    path.write_bytes(b"not a torch file")
    sample = pd[0]
    fresh = PhantomPairs(1, ndim=2, spacing_mm=4.0, seed=3, contrast="pd", template=mni4)[0]
    assert torch.equal(sample.moving.data, fresh.moving.data)
    assert torch.equal(torch.load(path, weights_only=True)["moving"], fresh.moving.data)


@pytest.mark.parametrize("fixed_contrast", ["pd", "t2"])
def test_fixed_contrast_gives_paper_003s_pd_t2_and_t2_t2_tasks(tmp_path, mni4, fixed_contrast):
    from itreg.phantoms import axial_slices, synthesize

    default = PhantomPairs(1, ndim=2, spacing_mm=4.0, seed=5, template=mni4)
    other = PhantomPairs(1, ndim=2, spacing_mm=4.0, seed=5, template=mni4,
                         fixed_contrast=fixed_contrast, cache_dir=tmp_path)
    a, b = default[0], other[0]
    # The fixed image is the noise-free template in that contrast; the moving side is the
    # same phantom (same seed) as in the T1-T2 task.
    want = synthesize(axial_slices(mni4), fixed_contrast, noise_sigma=0.0, bias=None)
    assert torch.equal(b.fixed.data, want.data) and not torch.equal(b.fixed.data, a.fixed.data)
    for key in ("moving", "fixed_labels", "moving_labels"):
        assert torch.equal(getattr(a, key).data, getattr(b, key).data), key
    assert other.config()["fixed_contrast"] == fixed_contrast
    assert "fixed_contrast" not in default.config()  # T1 caches keep their names
    # A pair read back from the disk cache has the same fixed image.
    again = PhantomPairs(1, ndim=2, spacing_mm=4.0, seed=5, template=mni4,
                         fixed_contrast=fixed_contrast, cache_dir=tmp_path)[0]
    assert torch.equal(again.fixed.data, want.data)

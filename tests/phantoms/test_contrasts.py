"""Synthetic contrasts: weights, ordering, seeded Rician noise and bias field, labels."""

import math

import pytest
import torch

from itreg.errors import ConfigError, MaskError
from itreg.grid import Grid
from itreg.image import Image
from itreg.phantoms import CONTRASTS, bias_field, labels, rician_noise, synthesize


def _tissue_means(image, lab):
    return [float(image.data[lab.data == k].mean()) for k in (1, 2, 3)]


def test_t2_is_the_weighted_sum(mni4):
    t2 = synthesize(mni4, "t2", noise_sigma=0.0, bias=None)
    expected = 0.84 * mni4["csf"].data + 0.58 * mni4["gm"].data + 0.37 * mni4["wm"].data
    assert torch.allclose(t2.data, expected, atol=1e-6)
    assert t2.dtype == torch.float32 and not t2.is_label and t2.grid.same_as(mni4["t1"].grid)
    assert CONTRASTS["t2"] == {"csf": 0.84, "gm": 0.58, "wm": 0.37}


@pytest.mark.parametrize("contrast", ["t2", "pd"])
def test_contrast_ordering_csf_gm_wm(mni4, contrast):
    lab = labels(mni4)
    csf, gm, wm = _tissue_means(synthesize(mni4, contrast, seed=3), lab)
    assert csf > gm > wm, (contrast, csf, gm, wm)


def test_t1_is_the_template_and_ordering_reversed(mni4):
    t1 = synthesize(mni4, "t1", noise_sigma=0.0, bias=None)
    assert torch.equal(t1.data, mni4["t1"].data)
    csf, gm, wm = _tissue_means(synthesize(mni4, "t1"), labels(mni4))
    assert wm > gm > csf


def test_noise_and_bias_are_seeded(mni4):
    a = synthesize(mni4, "t2", seed=5)
    b = synthesize(mni4, "t2", seed=5)
    c = synthesize(mni4, "t2", seed=6)
    assert torch.equal(a.data, b.data)
    assert not torch.equal(a.data, c.data)
    clean = synthesize(mni4, "t2", noise_sigma=0.0, bias=None)
    assert float((a.data - clean.data).abs().mean()) > 0.01


def test_rician_noise_on_zero_signal_is_rayleigh():
    img = Image(torch.zeros(1, 200, 300), Grid((300, 200)))
    sigma = 0.02
    noisy = rician_noise(img, sigma, seed=1).data
    assert float(noisy.min()) >= 0.0
    # Rayleigh mean sigma sqrt(pi/2) and second moment 2 sigma^2.
    assert abs(float(noisy.mean()) - sigma * math.sqrt(math.pi / 2)) < 0.02 * sigma
    assert abs(float((noisy**2).mean()) - 2 * sigma**2) / (2 * sigma**2) < 0.02
    # On a strong signal the noise is nearly Gaussian with the given sigma.
    strong = rician_noise(img.with_data(torch.ones(1, 200, 300)), sigma, seed=1).data
    assert abs(float(strong.std()) - sigma) / sigma < 0.03
    assert torch.equal(rician_noise(img, 0.0).data, img.data)
    with pytest.raises(ConfigError):
        rician_noise(img, -1.0)


def test_bias_field_range_and_smoothness(mni4):
    grid, mask = mni4["t1"].grid, mni4["mask"].data
    field = bias_field(grid, mask, (0.80, 1.17), seed=2)
    inside = mask[0] != 0
    assert field.shape == (1, *grid.shape)
    assert math.isclose(float(field[0][inside].min()), 0.80, abs_tol=1e-5)
    assert math.isclose(float(field[0][inside].max()), 1.17, abs_tol=1e-5)
    assert float(field.min()) > 0.0
    # Smooth: neighbouring voxels (4 mm apart) differ by a small fraction of the range.
    step = (field[0][1:] - field[0][:-1]).abs()[inside[1:] & inside[:-1]]
    assert float(step.max()) < 0.1
    assert torch.equal(field, bias_field(grid, mask, (0.80, 1.17), seed=2))
    assert not torch.equal(field, bias_field(grid, mask, (0.80, 1.17), seed=3))
    with pytest.raises(ConfigError):
        bias_field(grid, mask, (1.2, 0.8))
    with pytest.raises(MaskError):
        bias_field(grid, torch.zeros_like(mask))


def test_bias_multiplies_the_clean_image(mni4):
    clean = synthesize(mni4, "pd", noise_sigma=0.0, bias=None).data
    biased = synthesize(mni4, "pd", noise_sigma=0.0, bias=(0.5, 1.5), seed=4).data
    inside = (mni4["mask"].data != 0) & (clean > 0.1)
    ratio = biased[inside] / clean[inside]
    assert 0.5 - 1e-4 <= float(ratio.min()) and float(ratio.max()) <= 1.5 + 1e-4
    assert float(ratio.max() - ratio.min()) > 0.9


def test_labels(mni4):
    lab = labels(mni4)
    assert lab.dtype == torch.uint8 and lab.is_label
    inside = mni4["mask"].data != 0
    assert torch.all(lab.data[~inside] == 0)
    assert set(torch.unique(lab.data[inside]).tolist()) == {1, 2, 3}
    # Argmax: a WM-labelled voxel has WM probability at least GM's and CSF's.
    wm = lab.data == 3
    assert torch.all(mni4["wm"].data[wm] >= mni4["gm"].data[wm])
    assert torch.all(mni4["wm"].data[wm] >= mni4["csf"].data[wm])


def test_unknown_contrast_and_missing_map(mni4):
    with pytest.raises(ConfigError, match="valid contrasts are"):
        synthesize(mni4, "flair")
    with pytest.raises(ConfigError, match="missing"):
        synthesize({"csf": mni4["csf"]}, "t2")

"""The random bias-field variant of the phantoms: its range, smoothness and seeding, the pair
phantom's moving image under it, and ``itreg phantom --bias``."""

from __future__ import annotations

import json
import math

import pytest
import torch

from itreg.errors import ConfigError
from itreg.grid import Grid
from itreg.phantoms import pair_from_tissues, random_bias_field
from itreg.phantoms.contrasts import BIAS_WAVELENGTHS_MM


def test_field_spans_the_amplitude_and_is_smooth_and_seeded():
    grid = Grid((40, 48, 36), (4.0, 4.0, 4.0), (-80.0, -110.0, -60.0))
    idx = torch.stack(torch.meshgrid(*[torch.arange(n) for n in grid.shape], indexing="ij"), -1)
    mask = ((idx.double() - torch.tensor(grid.shape) / 2) / torch.tensor(grid.shape) * 2
            ).norm(dim=-1) < 0.8  # a ball-like 'brain'
    field = random_bias_field(grid, mask, 0.25, seed=3, dtype=torch.float64)[0]
    assert float(field[mask].min()) == pytest.approx(0.75, abs=1e-12)
    assert float(field[mask].max()) == pytest.approx(1.25, abs=1e-12)
    # Smooth: a sum of 6 cosines of wavelength >= 120 mm scaled to a 0.5 span can change by at
    # most 0.5 / (max - min) * 6 * 2 pi / 120 per mm; far below that bound in practice, and
    # never a voxel-to-voxel jump.
    step = max(float((field.diff(dim=a).abs() / 4.0).max()) for a in range(3))
    assert step < 0.5 * 6 * 2 * math.pi / BIAS_WAVELENGTHS_MM[0]
    assert step > 1e-4  # not constant
    same = random_bias_field(grid, mask, 0.25, seed=3, dtype=torch.float64)[0]
    other = random_bias_field(grid, mask, 0.25, seed=4, dtype=torch.float64)[0]
    assert torch.equal(field, same) and float((field - other).abs().max()) > 0.05
    assert torch.equal(random_bias_field(grid, mask, 0.0)[0], torch.ones(grid.shape))
    for bad in (-0.1, 1.0, "big"):
        with pytest.raises(ConfigError):
            random_bias_field(grid, mask, bad)


def test_same_physical_field_at_any_spacing():
    coarse = Grid((20, 24, 18), (8.0, 8.0, 8.0), (-80.0, -100.0, -70.0))
    fine = Grid((39, 47, 35), (4.0, 4.0, 4.0), (-80.0, -100.0, -70.0))  # every other = coarse
    a = random_bias_field(coarse, None, 0.3, seed=7, dtype=torch.float64)[0]
    b = random_bias_field(fine, None, 0.3, seed=7, dtype=torch.float64)[0]
    # The same waves; the linear map to [0.7, 1.3] uses each grid's extremes, which differ by
    # the sampling only: the fields agree to a few thousandths on the shared points.
    assert float((a - b[::2, ::2, ::2]).abs().max()) < 5e-3


def test_pair_moving_image_is_the_unbiased_one_times_the_field(mni4):
    plain = pair_from_tissues(mni4, "t2", "rigid", seed=2, noise_sigma=0.0, bias=None)
    biased = pair_from_tissues(mni4, "t2", "rigid", seed=2, noise_sigma=0.0, bias=0.25)
    assert torch.equal(plain.fixed.data, biased.fixed.data)  # only the moving image changes
    inside = (plain.moving_mask.data[0] != 0) & (plain.moving.data[0] > 0.05)
    ratio = biased.moving.data[0][inside] / plain.moving.data[0][inside]
    # About +-25 % over the brain (the range is exact over the moving brain mask, whose
    # extreme voxels may have little signal).
    assert 0.74 < float(ratio.min()) < 0.80 and 1.20 < float(ratio.max()) < 1.26
    assert float(ratio.max() / ratio.min()) > 1.5
    # The default quadratic field is a different one (the range tuple keeps its meaning).
    default = pair_from_tissues(mni4, "t2", "rigid", seed=2, noise_sigma=0.0)
    assert not torch.allclose(default.moving.data, biased.moving.data)


def test_phantom_command_bias_option(tmp_path, cli):
    from itreg import io

    out = tmp_path / "p"
    code, _, err = cli(["phantom", str(out), "--ndim", "2", "--spacing", "4", "--misalign",
                        "rigid", "--noise", "0", "--bias", "0.25", "--seed", "1"])
    assert code == 0, err
    manifest = json.loads((out / "phantom.json").read_text())
    assert manifest["bias"] == {"field": "random", "amplitude": 0.25}
    ref = tmp_path / "r"
    code, _, err = cli(["phantom", str(ref), "--ndim", "2", "--spacing", "4", "--misalign",
                        "rigid", "--noise", "0", "--seed", "1"])
    assert code == 0, err
    assert "bias" not in json.loads((ref / "phantom.json").read_text())
    a = io.read_image(out / "moving.nii.gz").data
    b = io.read_image(ref / "moving.nii.gz").data
    assert not torch.allclose(a, b)
    code, _, err = cli(["phantom", str(tmp_path / "x"), "--bias", "1.5"])
    assert code == 2 and "1.5" in err

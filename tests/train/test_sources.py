"""Pair sources: deterministic phantom pairs following paper 003's protocol; pairs from files."""

from __future__ import annotations

import pytest
import torch

from itreg.errors import ConfigError, GeometryError, ImageReadError
from itreg.evaluate import dice
from itreg.grid import Grid
from itreg.image import Image
from itreg.io import write_image
from itreg.train.sources import FolderPairs, PairSource, PhantomPairs, stack_samples
from itreg.transforms import BSpline
from itreg.warp import resample


@pytest.fixture(scope="module")
def mni4():
    from itreg.phantoms import load_mni

    return load_mni(4.0)


@pytest.fixture(scope="module")
def phantoms(mni4):
    return PhantomPairs(3, ndim=2, spacing_mm=4.0, seed=7, template=mni4)


def test_phantom_pairs_are_well_formed(phantoms):
    assert isinstance(phantoms, PairSource) and len(phantoms) == 3
    s = phantoms[0]
    grid = phantoms.grid
    assert grid.ndim == 2
    for img in (s.fixed, s.moving, s.fixed_labels, s.moving_labels):
        assert img.grid.same_as(grid)
    assert s.fixed.data.dtype == torch.float32 and not s.fixed.is_label
    assert s.moving_labels.is_label and set(s.moving_labels.data.unique().tolist()) <= {0, 1, 2, 3}
    assert set(s.fixed_labels.data.unique().tolist()) == {0, 1, 2, 3}
    # paper 003's FFD: cubic B-spline, 20 mm control spacing, coefficients of sd about 6 mm
    assert isinstance(s.truth, BSpline)
    assert all(abs(sp - 20.0) < 1e-6 for sp in s.truth.control_grid.spacing)
    sd = float(s.truth.coefficients.detach().std())
    assert 4.0 < sd < 8.0
    # T1 fixed vs T2-like moving: CSF is dark in the fixed and bright in the moving image
    csf_f = s.fixed.data[s.fixed_labels.data == 1].mean()
    wm_f = s.fixed.data[s.fixed_labels.data == 3].mean()
    csf_m = s.moving.data[s.moving_labels.data == 1].mean()
    wm_m = s.moving.data[s.moving_labels.data == 3].mean()
    assert csf_f < wm_f and csf_m > wm_m


def test_phantom_truth_realigns_the_moving_labels(phantoms):
    s = phantoms[1]
    before = dice(s.fixed_labels, s.moving_labels).mean
    with torch.no_grad():
        back = resample(s.moving_labels, s.truth, phantoms.grid, mode="nearest")
    after = dice(s.fixed_labels, back).mean
    assert after > before + 0.05 and after > 0.9


def test_phantom_pairs_are_deterministic_and_distinct(phantoms, mni4):
    again = PhantomPairs(3, ndim=2, spacing_mm=4.0, seed=7, cache=False, template=mni4)
    assert torch.equal(again[2].moving.data, phantoms[2].moving.data)
    assert torch.equal(again[2].moving_labels.data, phantoms[2].moving_labels.data)
    assert not torch.equal(phantoms[0].moving.data, phantoms[1].moving.data)
    shifted = PhantomPairs(2, ndim=2, spacing_mm=4.0, seed=8, template=mni4)
    assert torch.equal(shifted[0].moving.data, phantoms[1].moving.data)  # seed + index
    assert phantoms[0] is phantoms[0]  # cached
    assert phantoms.tissues is phantoms.tissues  # the template is loaded once
    with pytest.raises(IndexError):
        phantoms[3]
    batch = stack_samples([phantoms[0], phantoms[1]])
    assert batch["fixed"].shape == (2, 1, *phantoms.grid.shape)
    assert batch["moving_labels"].dtype == torch.int64


def test_phantom_settings_are_checked():
    with pytest.raises(ConfigError):
        PhantomPairs(0)
    with pytest.raises(ConfigError):
        PhantomPairs(2, ndim=4)
    with pytest.raises(ConfigError):
        PhantomPairs(2, contrast="ct")


@pytest.mark.slow
def test_a_3d_phantom_pair(mni4):
    s = PhantomPairs(1, ndim=3, spacing_mm=4.0, template=mni4)[0]
    assert s.fixed.ndim == 3 and s.moving.grid.same_as(s.fixed.grid)
    with pytest.raises(ConfigError, match="mm"):
        _ = PhantomPairs(1, ndim=3, spacing_mm=2.0, template=mni4).grid


def _write(tmp_path, name, data, grid, label=False):
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    write_image(Image(data, grid, is_label=label), path)
    return path


def test_folder_pairs_from_csv_resample_onto_the_first_fixed_grid(tmp_path):
    g = torch.Generator().manual_seed(0)
    fixed_grid = Grid((12, 10), (2.0, 2.0), (1.0, -3.0))
    moving_grid = Grid((25, 21), (1.0, 1.0), (0.5, -3.5))
    for i in range(2):
        _write(tmp_path, f"f{i}.nii.gz", torch.rand(1, 10, 12, generator=g), fixed_grid)
        m = resample(Image(torch.rand(1, 10, 12, generator=g), fixed_grid), None, moving_grid)
        _write(tmp_path, f"m{i}.nii.gz", m.data, moving_grid)
        lab = (torch.rand(1, 10, 12, generator=g) * 3).to(torch.uint8)
        _write(tmp_path, f"fl{i}.nii.gz", lab, fixed_grid, label=True)
        _write(tmp_path, f"ml{i}.nii.gz", lab, fixed_grid, label=True)
    csv = tmp_path / "pairs.csv"
    csv.write_text("fixed,moving,fixed_labels,moving_labels\n"
                   + "".join(f"f{i}.nii.gz,m{i}.nii.gz,fl{i}.nii.gz,ml{i}.nii.gz\n"
                             for i in range(2)))
    src = FolderPairs(csv)
    assert len(src) == 2 and src.has_labels and src.grid.same_as(fixed_grid)
    s = src[1]
    assert s.moving.grid.same_as(fixed_grid) and s.moving_labels.grid.same_as(fixed_grid)
    assert s.fixed_labels.is_label and not s.fixed_labels.data.is_floating_point()
    coarse = FolderPairs(csv, spacing_mm=4.0)
    assert coarse[0].fixed.grid.spacing == (4.0, 4.0)


def test_folder_pairs_from_a_folder_and_bad_inputs(tmp_path):
    grid = Grid((8, 8))
    for sub in ("fixed", "moving"):
        _write(tmp_path / "d" / sub, "a.nii.gz", torch.rand(1, 8, 8), grid)
    src = FolderPairs(tmp_path / "d")
    assert len(src) == 1 and not src.has_labels and src[0].fixed_labels is None
    with pytest.raises(ImageReadError):
        FolderPairs(tmp_path / "nothing")
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\nx,y\n")
    with pytest.raises(ConfigError, match="moving"):
        FolderPairs(bad)
    missing = tmp_path / "missing.csv"
    missing.write_text("fixed,moving\nd/fixed/a.nii.gz,nope.nii.gz\n")
    with pytest.raises(ImageReadError):
        FolderPairs(missing)[0]
    _write(tmp_path, "v3.nii.gz", torch.rand(1, 4, 8, 8), Grid((8, 8, 4)))
    mixed = tmp_path / "mixed.csv"
    mixed.write_text("fixed,moving\nd/fixed/a.nii.gz,v3.nii.gz\n")
    with pytest.raises(GeometryError):
        FolderPairs(mixed)[0]

"""Random FFDs: paper 003's protocol, seeding, masks and invertibility options."""

import math

import pytest
import torch

from itreg.errors import ConfigError, GeometryError, MaskError
from itreg.grid import Grid
from itreg.image import Image
from itreg.phantoms.deform import INJECTIVE_FRACTION, folding_fraction, random_ffd
from itreg.transforms import BSpline

GRID3 = Grid((48, 56, 44), (3.0, 3.0, 3.0), (-70.0, -90.0, -60.0))
GRID2 = Grid((90, 110), (2.0, 2.0), (-90.0, -110.0))


@pytest.mark.parametrize("grid", [GRID2, GRID3], ids=["2d", "3d"])
def test_protocol_statistics_and_layout(grid):
    ffd = random_ffd(grid, 20.0, 6.0, seed=4)
    assert isinstance(ffd, BSpline)
    assert ffd.control_spacing == pytest.approx((20.0,) * grid.ndim)
    c = ffd.coefficients.detach().double().flatten()
    assert c.numel() > 300
    # i.i.d. N(0, 6^2): sample std within a few standard errors.
    assert float(c.std()) == pytest.approx(6.0, rel=4 / math.sqrt(2 * c.numel()) + 0.02)
    assert abs(float(c.mean())) < 4 * 6.0 / math.sqrt(c.numel())


def test_seeded_and_device_follows():
    a = random_ffd(GRID2, seed=7).coefficients
    b = random_ffd(GRID2, seed=7).coefficients
    c = random_ffd(GRID2, seed=8).coefficients
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.dtype == torch.float32
    assert random_ffd(GRID2, seed=7, dtype=torch.float64).coefficients.dtype == torch.float64


def test_folding_fraction_and_bounds():
    """Paper 003's plain protocol folds rarely; the bounded variants never fold."""
    plain = [folding_fraction(random_ffd(GRID2, 20.0, 6.0, seed=s), GRID2) for s in range(8)]
    assert max(plain) < 0.01, plain  # measured: 0 on these seeds
    strong = random_ffd(GRID2, 20.0, 12.0, seed=1)
    assert folding_fraction(strong, GRID2) > 0.0  # sigma 12 mm folds
    for mode in ("clip", "scale"):
        ffd = random_ffd(GRID2, 20.0, 12.0, seed=1, bound=mode)
        limit = INJECTIVE_FRACTION * 20.0
        assert float(ffd.coefficients.detach().abs().max()) <= limit + 1e-5
        assert folding_fraction(ffd, GRID2) == 0.0


def test_zero_outside_fov_and_mask():
    ffd = random_ffd(GRID3, seed=1, zero_outside_fov=True)
    cg = ffd.control_grid
    idx = cg.indices(dtype=torch.float64)
    index_in_image = GRID3.world_to_index(cg.index_to_world(idx))
    hi = torch.tensor([n - 1 for n in GRID3.size], dtype=torch.float64)
    outside = ((index_in_image < -0.5) | (index_in_image > hi + 0.5)).any(-1)
    coef = ffd.coefficients.detach()
    assert bool(outside.any())
    assert float(coef[:, outside].abs().max()) == 0.0
    assert float(coef[:, ~outside].abs().min()) > 0.0

    m = torch.zeros(1, *GRID3.shape, dtype=torch.uint8)
    m[0, 20:25, 25:30, 20:25] = 1
    mask = Image(m, GRID3, is_label=True)
    masked = random_ffd(GRID3, seed=1, mask=mask)
    nz = (masked.coefficients.detach() != 0).any(0)
    assert 0 < int(nz.sum()) <= 5 ** 3
    # Displacement is zero far from the mask, nonzero on it.
    disp = masked.displacement(GRID3).norm(dim=-1)
    assert float(disp[0:5, 0:5, 0:5].detach().max()) == 0.0
    assert float(disp[22, 27, 22].detach()) > 0.0
    with pytest.raises(MaskError):
        random_ffd(GRID3, mask=mask.with_data(m * 0))


def test_errors():
    with pytest.raises(ConfigError):
        random_ffd(GRID2, sigma_mm=-1.0)
    with pytest.raises(ConfigError):
        random_ffd(GRID2, control_spacing_mm=0.0)
    with pytest.raises(ConfigError):
        random_ffd(GRID2, bound="nope")
    with pytest.raises(GeometryError):
        random_ffd(GRID2, mask=Image(torch.ones(1, 4, 4, 4, dtype=torch.uint8),
                                     Grid((4, 4, 4), (1, 1, 1), (0, 0, 0)), is_label=True))


def test_invert_ffd_round_trip():
    from itreg.phantoms.deform import invert_ffd
    from itreg.phantoms.misalign import pad_grid

    ffd = random_ffd(GRID2, seed=5)
    m = torch.zeros(1, *GRID2.shape, dtype=torch.uint8)
    m[0, 10:-10, 10:-10] = 1
    moving_grid = pad_grid(GRID2, 20.0)
    inverse, report = invert_ffd(ffd, moving_grid, check_mask=Image(m, GRID2, True))
    assert report.max_mm < 0.05 and report.points > 1000  # measured: mean 0.003, max 0.016
    # At the inverse field's voxel centres: T(T^-1(y)) = y up to the solver's residual.
    y = moving_grid.points(dtype=torch.float64).reshape(-1, 2)
    with torch.no_grad():
        pre = inverse(y)
        keep = (GRID2.world_to_index(pre) > 12).all(-1) & (
            GRID2.world_to_index(pre) < torch.tensor(GRID2.size) - 12).all(-1)
        err = (ffd(pre[keep]) - y[keep]).norm(dim=-1)
    assert float(err.max()) < 0.05
    # Between voxel centres the inverse field is interpolated (2 mm grid): small on average.
    x = GRID2.points(dtype=torch.float64)[m[0] != 0]
    with torch.no_grad():
        back = inverse(ffd(x))
    assert float((back - x).norm(dim=-1).mean()) < 0.05


def test_ffd_slice_pair_ground_truth(mni4):
    from itreg.phantoms import brain_slice_pair, pair_from_tissues
    from itreg.phantoms.slices import axial_slices
    from itreg.warp import resample

    pair = pair_from_tissues(axial_slices(mni4), "t2", "ffd", seed=3, noise_sigma=0.0,
                             bias=None)
    assert isinstance(pair.true_transform, BSpline) and pair.parameters is None
    assert pair.inverse_report.max_mm < 0.05
    with torch.no_grad():
        back = resample(pair.moving_labels, pair.true_transform, pair.fixed.grid)
    agree = float((back.data == pair.fixed_labels.data).float().mean())
    assert agree > 0.95
    assert callable(brain_slice_pair)


@pytest.mark.slow
def test_ffd_brain_pair_3d_ground_truth():
    """3D FFD pair at 2 mm: exact B-spline truth, inverse residual, no folding in the brain."""
    from itreg.phantoms import brain_pair
    from itreg.warp import resample

    pair = brain_pair(2.0, "t2", "ffd", seed=1, noise_sigma=0.0, bias=None)
    assert pair.inverse_report.max_mm < 0.05  # measured: mean 0.0035, max 0.016 mm
    assert folding_fraction(pair.true_transform, pair.fixed.grid, pair.fixed_mask) < 1e-3
    with torch.no_grad():
        back = resample(pair.moving_labels, pair.true_transform, pair.fixed.grid)
    assert float((back.data == pair.fixed_labels.data).float().mean()) > 0.95

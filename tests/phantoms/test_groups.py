"""Groups of misaligned mixed-contrast images: shapes, seeding, ground truth."""

import pytest
import torch

from itreg.errors import ConfigError, GeometryError
from itreg.evaluate import groupwise_registration_error, groupwise_warping_index
from itreg.phantoms.groups import brain_group, group_from_tissues
from itreg.phantoms.slices import axial_slices
from itreg.transforms import BSpline, Identity
from itreg.warp import resample


@pytest.fixture(scope="module")
def slice4(mni4):
    return axial_slices(mni4)


def test_group_shapes_contrasts_and_zscore(slice4):
    g = group_from_tissues(slice4, n=4, kind="rigid", seed=2)
    assert g.contrasts == ("t1", "t2", "pd", "t1")
    assert len(g.images) == len(g.labels) == len(g.masks) == len(g.transforms) == 4
    for img, lab in zip(g.images, g.labels):
        assert img.grid.same_as(g.grid) and lab.grid.same_as(g.grid)
        assert abs(float(img.data.mean())) < 1e-4 and float(img.data.std()) == pytest.approx(1, abs=1e-4)
        assert set(torch.unique(lab.data).tolist()) <= {0, 1, 2, 3}
    assert all(t.is_linear for t in g.transforms)
    assert g.grid.ndim == 2 and g.common_grid.ndim == 2
    # Distinct misalignments per image.
    assert not torch.equal(g.transforms[0].translation, g.transforms[1].translation)


def test_group_seeded(slice4):
    a = group_from_tissues(slice4, n=2, kind="rigid", seed=5)
    b = group_from_tissues(slice4, n=2, kind="rigid", seed=5)
    c = group_from_tissues(slice4, n=2, kind="rigid", seed=6)
    assert torch.equal(a.images[1].data, b.images[1].data)
    assert not torch.equal(a.images[1].data, c.images[1].data)


@pytest.mark.parametrize("kind,tol", [("rigid", 1e-3), ("ffd", 0.1)])
def test_group_ground_truth(slice4, kind, tol):
    g = group_from_tissues(slice4, n=3, kind=kind, seed=1, noise_sigma=0.0, bias=None)
    if kind == "ffd":
        assert all(isinstance(t, BSpline) for t in g.transforms)
    exact = groupwise_warping_index(g.transforms, g.misalignments, g.common_grid, g.common_mask)
    assert exact.value_mm < tol  # measured: ~1e-5 rigid; FFD 0.06 at 4 mm, 0.02 at 2 mm (inverse field interpolated)
    none = groupwise_warping_index([Identity(2)] * 3, g.misalignments, g.common_grid,
                                   g.common_mask)
    assert none.value_mm > 1.0
    assert groupwise_registration_error(g.transforms, g.misalignments,
                                        g.common_grid).value_mm < max(tol, 0.2)
    # Each image's labels, pulled back through T_j, match the common labels.
    for lab, t in zip(g.labels, g.transforms):
        with torch.no_grad():
            back = resample(lab, t, g.common_grid)
        assert float((back.data == g.common_labels.data).float().mean()) > 0.95


def test_group_errors(slice4):
    with pytest.raises(ConfigError):
        group_from_tissues(slice4, n=1)
    with pytest.raises(ConfigError):
        group_from_tissues(slice4, contrasts=("ct",))
    with pytest.raises(ConfigError):
        group_from_tissues(slice4, kind="twist")
    with pytest.raises(GeometryError):
        brain_group(ndim=4)

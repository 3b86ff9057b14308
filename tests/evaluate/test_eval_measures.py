"""Evaluation measures against closed forms on toy inputs."""

import json
import math

import numpy as np
import pytest
import torch

from itreg.errors import ConfigError, GeometryError, MaskError
from itreg.evaluate import (
    dice,
    evaluate_registration,
    fiducial_registration_error,
    groupwise_registration_error,
    groupwise_warping_index,
    jacobian_statistics,
    report_markdown,
    surface_distance,
    target_registration_error,
    write_report,
)
from itreg.grid import Grid
from itreg.image import Image
from itreg.transforms import Affine, BSpline, Translation


def _box(shape, lo, hi, label=1):
    t = torch.zeros(1, *shape, dtype=torch.int16)
    t[(0,) + tuple(slice(a, b) for a, b in zip(lo, hi))] = label
    return t


def test_dice_of_shifted_boxes():
    g = Grid((40, 40, 40), (1.0, 1.0, 1.0), (0, 0, 0))
    a = Image(_box(g.shape, (5, 5, 5), (25, 25, 25)), g, True)  # 20^3
    b = Image(_box(g.shape, (5, 5, 8), (25, 25, 28)), g, True)  # shifted by 3 along x
    d = dice(a, b)
    assert d.per_label[1] == pytest.approx(2 * 20 * 20 * 17 / (2 * 20 ** 3))  # 0.85
    assert d.mean == pytest.approx(0.85)
    assert dice(a, a).mean == 1.0
    two = a.data + 2 * _box(g.shape, (30, 30, 30), (35, 35, 35))
    d2 = dice(Image(two, g, True), a)
    assert d2.per_label == {1: 1.0, 2: 0.0}
    with pytest.raises(GeometryError):
        dice(a.data, a.data[..., :10])


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.8, 1.0, 1.5)])
def test_hd95_asd_of_concentric_spheres(spacing):
    size = tuple(round(64 / s) for s in spacing)
    g = Grid(size, spacing, (0, 0, 0))
    pts = g.points(dtype=torch.float64)
    c = torch.tensor(g.center, dtype=torch.float64)
    r = (pts - c).norm(dim=-1)
    r1, r2 = 12.0, 18.0
    a = Image((r <= r1)[None].to(torch.uint8), g, True)
    b = Image((r <= r2)[None].to(torch.uint8), g, True)
    s = surface_distance(a, b)
    voxel = max(spacing)
    assert s.hd95_mm == pytest.approx(r2 - r1, abs=voxel)
    assert s.asd_mm == pytest.approx(r2 - r1, abs=voxel)
    assert s.hd_mm >= s.hd95_mm
    same = surface_distance(a, a)
    assert same.hd95_mm == 0.0 and same.asd_mm == 0.0
    with pytest.raises(MaskError):
        surface_distance(a, a.with_data(a.data * 0))


def test_hd95_circles_2d_exact_for_shift():
    g = Grid((60, 60), (0.5, 0.5), (0, 0))
    a = Image(_box(g.shape, (10, 10), (30, 30)), g, True)
    b = Image(_box(g.shape, (10, 14), (30, 34)), g, True)  # 4 voxels = 2 mm along x
    s = surface_distance(a, b)
    assert s.hd_mm == pytest.approx(2.0)
    assert s.hd95_mm == pytest.approx(2.0)


def test_jacobian_of_known_affine():
    g = Grid((12, 14, 10), (1.5, 1.0, 2.0), (-5, 3, 2))
    A = np.array([[1.1, 0.05, 0.0], [0.02, 0.9, 0.1], [0.0, -0.03, 1.2]])
    t = Affine(3, center=(1.0, 2.0, 3.0), translation=(2.0, -1.0, 0.5), matrix=A,
               dtype=torch.float64)
    st = jacobian_statistics(t, g)
    assert st.det_mean == pytest.approx(float(np.linalg.det(A)), rel=1e-9)
    assert st.det_std == pytest.approx(0.0, abs=1e-9)
    assert st.folding_fraction == 0.0 and st.folding_voxels == 0
    assert st.sdlogj == pytest.approx(0.0, abs=1e-9)
    flip = Affine(3, matrix=np.diag([-1.0, 1.0, 1.0]), dtype=torch.float64)
    assert jacobian_statistics(flip, g).folding_fraction == 1.0


def test_jacobian_bspline_mask_and_displacement():
    g = Grid((30, 30), (2.0, 2.0), (0, 0))
    ffd = BSpline(g, 20.0, dtype=torch.float64)
    with torch.no_grad():
        ffd.coefficients.normal_(0, 2.0, generator=torch.Generator().manual_seed(0))
    st = jacobian_statistics(ffd, g)
    assert st.det_std > 0 and st.sdlogj > 0 and st.voxels == 900
    disp = torch.movedim(ffd.displacement(g), -1, 0)
    assert jacobian_statistics(disp, g).det_mean == pytest.approx(st.det_mean)
    m = torch.zeros(30, 30)
    m[5:10, 5:10] = 1
    assert jacobian_statistics(ffd, g, m).voxels == 25
    with pytest.raises(MaskError):
        jacobian_statistics(ffd, g, m * 0)


def test_tre_and_fre():
    p = torch.tensor([[0.0, 0.0, 0.0], [10.0, 0.0, 0.0], [0.0, 5.0, 2.0]])
    t = Translation(3, translation=(3.0, 4.0, 0.0))
    q = p + torch.tensor([3.0, 4.0, 0.0])
    assert target_registration_error(p, q).mean_mm == pytest.approx(5.0)
    assert target_registration_error(p, q, t).max_mm == pytest.approx(0.0, abs=1e-6)
    fre = fiducial_registration_error(Translation(3), t, p)
    assert fre.mean_mm == pytest.approx(5.0) and fre.points == 3
    with pytest.raises(GeometryError):
        target_registration_error(p, q[:2])


def _translations(ts):
    return [Translation(2, translation=t, dtype=torch.float64) for t in ts]


def test_gwi_gre_closed_forms():
    g = Grid((20, 24), (2.0, 2.0), (-20, -24))
    true = _translations([(3.0, 0.0), (-2.0, 5.0), (1.0, -4.0)])  # common -> image j
    mis = [t.inverse() for t in true]  # phi_dag: image j -> common
    exact = groupwise_warping_index(true, mis, g)
    assert exact.value_mm == pytest.approx(0.0, abs=1e-9)
    # A shift common to the group is invisible to groupwise registration: still 0.
    shifted = [Translation(2, translation=tuple(float(v) + s for v, s in
                                                zip(t.translation.tolist(), (7.0, -1.0))),
                           dtype=torch.float64) for t in true]
    assert groupwise_warping_index(shifted, mis, g).value_mm == pytest.approx(0.0, abs=1e-9)
    # Identity estimates: r_j = -t_j, centred; gWI = mean_j |t_j - mean t|.
    ident = _translations([(0.0, 0.0)] * 3)
    t = torch.tensor([[3.0, 0.0], [-2.0, 5.0], [1.0, -4.0]], dtype=torch.float64)
    expected = float((t - t.mean(0)).norm(dim=-1).mean())
    assert groupwise_warping_index(ident, mis, g).value_mm == pytest.approx(expected)
    assert groupwise_registration_error(ident, mis, g).value_mm == pytest.approx(expected)
    assert groupwise_registration_error(true, mis, g).value_mm == pytest.approx(0.0, abs=1e-9)
    fg = torch.zeros(1, *g.shape, dtype=torch.uint8)
    fg[0, 5:15, 5:15] = 1
    masked = groupwise_warping_index(ident, mis, g, Image(fg, g, True))
    assert masked.value_mm == pytest.approx(expected)  # translations: RMS is constant
    with pytest.raises(ConfigError):
        groupwise_warping_index(ident[:1], mis[:1], g)


def test_evaluate_registration_and_reports(tmp_path):
    g = Grid((30, 30, 30), (1.0, 1.0, 1.0), (0, 0, 0))
    a = Image(_box(g.shape, (5, 5, 5), (25, 25, 25)), g, True)
    b = Image(_box(g.shape, (5, 5, 8), (25, 25, 28)), g, True)
    t = Translation(3, translation=(1.0, 0.0, 0.0), dtype=torch.float64)
    p = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=torch.float64)
    rep = evaluate_registration(fixed_labels=a, warped_labels=b, fixed_landmarks=p,
                                moving_landmarks=p + torch.tensor([1.0, 0, 0], dtype=torch.float64),
                                transform=t, true_transform=Translation(3, dtype=torch.float64),
                                reference=g, mask=a)
    assert rep["dice"]["mean"] == pytest.approx(0.85)
    assert rep["surface"]["mean_hd95_mm"] == pytest.approx(3.0)
    assert rep["tre"]["mean_mm"] == pytest.approx(0.0, abs=1e-9)
    assert rep["landmarks_initial"]["mean_mm"] == pytest.approx(1.0)
    assert rep["warping_error"]["mean_mm"] == pytest.approx(1.0)
    assert rep["jacobian"]["folding_fraction"] == 0.0
    out = write_report(rep, tmp_path / "r.json")
    assert json.loads(out.read_text())["dice"]["per_label"]["1"] == pytest.approx(0.85)
    md = write_report(rep, tmp_path / "r.md").read_text()
    assert "| mean | 0.85 |" in md and "Warping error" in md
    assert "Dice" in report_markdown(rep)
    with pytest.raises(ConfigError):
        evaluate_registration()
    with pytest.raises(ConfigError):
        write_report(rep, tmp_path / "r.txt")
    assert not math.isnan(rep["jacobian"]["sdlogj"])

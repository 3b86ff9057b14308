"""Recovering known transforms of synthetic images (multimodal where the metric allows)."""

from __future__ import annotations

import json

import pytest
import torch
from engine_data import RAD, blob_image, blob_values, make_pair, mean_error_vox, quick, remap

from itreg.api import register
from itreg.engine.config import RegistrationConfig, load_preset
from itreg.grid import Grid
from itreg.image import Image
from itreg.transforms import Affine, Identity, LinearTransform, Rigid, Similarity, Translation
from itreg.transforms.bspline import BSpline
from itreg.transforms.compose import Compose


def _true_2d(kind: str, grid: Grid):
    c = grid.center
    return {
        "translation": Translation(2, center=c, translation=[3.0, -2.5]),
        "rigid": Rigid(2, center=c, translation=[2.0, -3.0], angles=[8 * RAD]),
        "similarity": Similarity(2, center=c, translation=[-2.0, 2.5], angles=[-6 * RAD],
                                 scale=1.04),
        "affine": Affine(2, center=c, translation=[2.0, 1.5],
                         matrix=[[1.05, 0.04], [-0.03, 0.96]]),
    }[kind]


@pytest.mark.parametrize("metric", ["mi", "nmi", "ncc"])
@pytest.mark.parametrize("kind", ["translation", "rigid", "similarity", "affine"])
def test_recovers_linear_transform_2d(grid2d, kind, metric):
    true = _true_2d(kind, grid2d)
    fixed, moving = make_pair(grid2d, true, multimodal=metric != "ncc")
    before = mean_error_vox(Identity(2), true, grid2d)
    result = register(fixed, moving, kind, metric, progress=False, overrides=quick())
    error = mean_error_vox(result.transform, true, grid2d)
    assert error < 0.2, f"{kind}/{metric}: {before:.2f} -> {error:.3f} voxels"
    assert isinstance(result.transform, LinearTransform)
    assert result.linear is not None
    assert mean_error_vox(result.linear, true, grid2d) == pytest.approx(error, abs=1e-4)
    assert all(r in ("converged", "max-iterations") for r in result.stop_reasons)


def test_recovers_rigid_3d_mi(grid3d):
    c = grid3d.center
    true = Rigid(3, center=c, translation=[2.0, -3.0, 1.5], angles=[4 * RAD, -3 * RAD, 6 * RAD])
    fixed, moving = make_pair(grid3d, true)
    result = register(fixed, moving, "rigid", "mi", progress=False,
                      overrides=quick(iterations=[60, 40]))
    assert mean_error_vox(result.transform, true, grid3d) < 0.2


@pytest.mark.slow
@pytest.mark.parametrize("metric", ["mi", "nmi", "ncc"])
def test_recovers_affine_3d(grid3d, metric):
    c = grid3d.center
    true = Affine(3, center=c, translation=[2.0, 1.5, -1.0],
                  matrix=[[1.04, 0.03, 0.0], [-0.02, 0.97, 0.02], [0.01, 0.0, 1.03]])
    fixed, moving = make_pair(grid3d, true, multimodal=metric != "ncc")
    result = register(fixed, moving, "affine", metric, progress=False,
                      overrides=quick(**{"iterations": [150, 100], "sampling.count": 8192}))
    assert mean_error_vox(result.transform, true, grid3d) < 0.2


@pytest.mark.parametrize("optimizer", ["lbfgs", "powell", "gd"])
def test_other_optimizers_recover_translation(grid2d, optimizer):
    true = _true_2d("translation", grid2d)
    fixed, moving = make_pair(grid2d, true)
    lr = {"lbfgs": 1.0, "powell": 1.0, "gd": 2.0}[optimizer]
    overrides = {"optimizer": optimizer, "shrink": [2, 1], "smoothing_mm": [1.0, 0.0],
                 "iterations": [30, 30], "learning_rate": lr, "sampling.count": 4096}
    result = register(fixed, moving, "translation", "mi", progress=False, overrides=overrides)
    assert mean_error_vox(result.transform, true, grid2d) < 0.2
    assert all(r in ("converged", "max-iterations") for r in result.stop_reasons)
    assert all(lv.optimizer == optimizer for lv in result.levels)


def _smooth_deformation(grid: Grid, spacing_mm: float, sigma_mm: float, seed: int) -> BSpline:
    true = BSpline(grid, spacing_mm, dtype=torch.float64)
    with torch.no_grad():
        true.coefficients.normal_(0.0, sigma_mm, generator=torch.Generator().manual_seed(seed))
    return true


def _deformable_pair(grid: Grid, true, blobs: int = 20, multimodal: bool = True):
    base = blob_image(grid, 0, blobs)
    with torch.no_grad():
        mapped = true(grid.points(dtype=torch.float64))
    fixed = Image(blob_values(mapped, grid, 0, blobs).float(), grid)
    return fixed, (remap(base) if multimodal else base)


def _foreground_error(found, true, fixed: Image) -> float:
    """Mean warping error in voxels where the fixed image has content (the deformation of
    an empty background is not observable)."""
    grid = fixed.grid
    pts = grid.points(dtype=torch.float64)
    with torch.no_grad():
        d = (found.to(torch.float64)(pts) - true.to(torch.float64)(pts)).norm(dim=-1)
    return float(d[fixed.data[0] > 0.05].mean()) / min(grid.spacing)


@pytest.mark.parametrize("metric", ["mi", "nmi", "ncc"])
def test_recovers_bspline_deformation_2d(grid2d, metric):
    true = _smooth_deformation(grid2d, 16.0, 2.0, seed=3)
    fixed, moving = _deformable_pair(grid2d, true, multimodal=metric != "ncc")
    before = _foreground_error(Identity(2), true, fixed)
    result = register(fixed, moving, "bspline", metric, progress=False, overrides=quick(**{
        "stages.2.control_spacing_mm": 16.0, "stages.2.sampling.count": 4096}))
    error = _foreground_error(result.transform, true, fixed)
    assert before > 0.9 and error < 0.5, f"{metric}: {before:.2f} -> {error:.3f} voxels"
    assert isinstance(result.transform, Compose)
    assert isinstance(result.transform[0], LinearTransform)
    assert isinstance(result.transform[-1], BSpline)
    assert [lv.transform for lv in result.levels] == ["rigid"] * 2 + ["affine"] * 2 + [
        "bspline"] * 2
    assert result.warped.grid.same_as(fixed.grid)


@pytest.mark.parametrize("preset", ["dense", "svf"])
def test_dense_and_svf_improve_on_affine(grid2d, preset):
    true = _smooth_deformation(grid2d, 16.0, 2.0, seed=3)
    fixed, moving = _deformable_pair(grid2d, true)
    overrides = quick(**{"stages.1.gradient_smoothing_mm": 8.0, "stages.1.iterations": 60})
    result = register(fixed, moving, preset, "mi", progress=False, overrides=overrides)
    affine_error = _foreground_error(result.linear, true, fixed)
    error = _foreground_error(result.transform, true, fixed)
    assert error < 0.5 and error < 0.7 * affine_error, f"{affine_error:.3f} -> {error:.3f}"
    assert all(lv.stop_reason in ("converged", "max-iterations") for lv in result.levels)


def test_report_is_json_serialisable(grid2d):
    true = _true_2d("translation", grid2d)
    fixed, moving = make_pair(grid2d, true)
    result = register(fixed, moving, "translation", "mi", progress=False,
                      overrides=quick(iterations=[5, 5]))
    report = json.loads(json.dumps(result.report()))
    assert report["stop_reasons"] == result.stop_reasons
    assert report["wall_time_s"] > 0
    assert report["config"]["stages"][0]["transform"] == "translation"
    assert report["settings"]["seed"] == 0 and report["settings"]["init"] == "centers"
    assert len(report["levels"]) == 2
    level = report["levels"][0]
    assert level["quantity"].startswith("MI") and level["iterations"] == len(level["losses"])
    assert report["linear"]["matrix"] == [[1.0, 0.0], [0.0, 1.0]]


def test_warped_image_matches_fixed(grid2d):
    true = _true_2d("rigid", grid2d)
    fixed, _ = make_pair(grid2d, true, multimodal=False)
    moving = blob_image(grid2d)
    result = register(fixed, moving, "rigid", "ncc", progress=False, overrides=quick())
    inner = (slice(8, -8), slice(8, -8))
    diff = (result.warped.data[0][inner] - fixed.data[0][inner]).abs().mean()
    assert float(diff) < 0.02 * float(fixed.data.max())


@pytest.mark.parametrize("metric", ["lncc", "mse"])
def test_spatial_and_same_modality_metrics(grid2d, metric):
    """LNCC needs images on a grid: the engine warps the whole level image for it."""
    true = _true_2d("rigid", grid2d)
    fixed, moving = make_pair(grid2d, true, multimodal=False)
    result = register(fixed, moving, "rigid", metric, progress=False,
                      overrides=quick(iterations=[40, 30]))
    assert mean_error_vox(result.transform, true, grid2d) < 0.2
    if metric == "lncc":  # whole-grid evaluation: the samples are the level's voxels
        assert [lv.samples for lv in result.levels] == [32 * 32, 64 * 64]


def test_bspline_full_grid_lbfgs(grid2d):
    """Whole-grid sampling of a B-spline stage goes through its separable on-grid path."""
    true = _smooth_deformation(grid2d, 16.0, 2.0, seed=3)
    fixed, moving = _deformable_pair(grid2d, true)
    result = register(fixed, moving, "bspline", "mi", progress=False, overrides=quick(**{
        "stages.2.control_spacing_mm": 16.0, "stages.2.sampling.strategy": "full",
        "stages.2.optimizer": "lbfgs", "stages.2.learning_rate": 1.0,
        "stages.2.iterations": [20, 20]}))
    assert _foreground_error(result.transform, true, fixed) < 0.5
    assert result.levels[-1].samples == 64 * 64


def test_nonlinear_init_stays_outermost(grid2d):
    """A non-linear starting transform is kept, frozen, outside the optimised stages."""
    from itreg.transforms.dense import DisplacementField

    true = _true_2d("translation", grid2d)
    fixed, moving = make_pair(grid2d, true)
    shift = torch.zeros(2, *grid2d.shape)
    shift[0] = 1.0  # 1 mm along x
    init = DisplacementField(shift, grid2d)
    result = register(fixed, moving, "translation", "mi", init=init, progress=False,
                      overrides=quick())
    assert isinstance(result.transform, Compose)
    assert isinstance(result.transform[0], DisplacementField)
    # the translation found is the true one minus the initial 1 mm shift
    torch.testing.assert_close(result.linear.offset().detach(), torch.tensor([2.0, -2.5]),
                               atol=0.25, rtol=0)
    assert mean_error_vox(result.transform, true, grid2d, margin=4) < 0.2


def _ffd_only(spacing_mm: float, iterations) -> RegistrationConfig:
    stage = next(s for s in load_preset("bspline").stages if s.transform == "bspline")
    config = RegistrationConfig(stages=(stage,))
    return config.with_overrides(quick(control_spacing_mm=spacing_mm, iterations=iterations))


def test_an_initial_ffd_on_the_stage_control_grid_continues_in_the_stage(grid2d):
    """A B-spline start on the first (B-spline) stage's control grid is that stage's starting
    point, not a frozen outer map: the result is one FFD, and with no iterations it is the
    start."""
    true = _smooth_deformation(grid2d, 16.0, 2.0, seed=3)
    fixed, moving = _deformable_pair(grid2d, true)
    start = BSpline.fit(true, grid2d, 16.0)
    result = register(fixed, moving, preset=_ffd_only(16.0, 0), init=start, progress=False)
    ffds = [t for t in result.transform if isinstance(t, BSpline)]
    assert len(ffds) == 1
    torch.testing.assert_close(ffds[0].coefficients.detach(), true.coefficients.float(),
                               atol=1e-4, rtol=0)
    # Half-way start: the stage optimises it towards the truth.
    half = BSpline.fit(true, grid2d, 16.0)
    with torch.no_grad():
        half.coefficients.mul_(0.5)
    before = _foreground_error(half, true, fixed)
    result = register(fixed, moving, preset=_ffd_only(16.0, [80, 60]), init=half,
                      progress=False)
    assert len([t for t in result.transform if isinstance(t, BSpline)]) == 1
    assert _foreground_error(result.transform, true, fixed) < 0.5 * before
    # On another control grid the start stays a frozen outer map.
    result = register(fixed, moving, preset=_ffd_only(12.0, 0), init=start, progress=False)
    assert isinstance(result.transform[0], BSpline)
    assert result.transform[0].control_grid == start.control_grid
    assert len([t for t in result.transform if isinstance(t, BSpline)]) == 2


@pytest.mark.slow
def test_recovers_bspline_deformation_3d(grid3d):
    true = _smooth_deformation(grid3d, 18.0, 2.0, seed=5)
    fixed, moving = _deformable_pair(grid3d, true, blobs=30)
    before = _foreground_error(Identity(3), true, fixed)
    result = register(fixed, moving, "bspline", "mi", progress=False, overrides=quick(**{
        "stages.2.control_spacing_mm": 18.0, "stages.2.sampling.count": 8192,
        "stages.2.iterations": [100, 80]}))
    error = _foreground_error(result.transform, true, fixed)
    assert error < 0.5 and error < 0.5 * before, f"{before:.2f} -> {error:.3f} voxels"

"""Velocity-field diffeomorphism phantoms: exp(v) against an ODE integration, det J > 0,
inverse round trips (also through SimpleITK's DisplacementFieldTransform), 2D and 3D."""

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from click.testing import CliRunner

from itreg.errors import ConfigError
from itreg.grid import Grid
from itreg.phantoms.velocity import (
    invert_velocity_diffeomorphism,
    random_velocity,
    velocity_diffeomorphism,
)
from itreg.transforms import jacobian_determinant
from itreg.transforms.dense import sample_field

GRIDS = {2: Grid((72, 64), (1.5, 1.5), (-40.0, 12.0)),
         3: Grid((36, 32, 30), (2.0, 2.0, 2.0), (-30.0, 5.0, -20.0))}


def _interior(grid: Grid, margin: int) -> torch.Tensor:
    pts = grid.points(dtype=torch.float64)
    sl = tuple(slice(margin, -margin) for _ in range(grid.ndim))
    return pts[sl].reshape(-1, grid.ndim)


def _flow(v: torch.Tensor, grid: Grid, points: torch.Tensor, steps: int = 64) -> torch.Tensor:
    """RK4 integration of dx/dt = v(x) over t in [0, 1] (v linearly interpolated)."""
    x = points.clone()
    h = 1.0 / steps

    def f(p):
        return sample_field(v, grid, p, outside="border")

    for _ in range(steps):
        k1 = f(x)
        k2 = f(x + 0.5 * h * k1)
        k3 = f(x + 0.5 * h * k2)
        k4 = f(x + h * k3)
        x = x + h / 6.0 * (k1 + 2 * k2 + 2 * k3 + k4)
    return x


@pytest.mark.parametrize("ndim", [2, 3])
@pytest.mark.parametrize("smoothness", [12.0, (6.0, 12.0, 24.0)])
def test_truth_is_the_flow_of_v_and_a_diffeomorphism(ndim, smoothness):
    grid = GRIDS[ndim]
    truth, v = velocity_diffeomorphism(grid, smoothness, sigma_mm=3.0, seed=ndim, taper_mm=8.0,
                                       dtype=torch.float64)
    # The displacement is large enough to matter and not a B-spline: it is exp(v).
    pts = _interior(grid, 3)
    ref = _flow(v, grid, pts)
    with torch.no_grad():
        got = truth(pts)
    moved = (ref - pts).norm(dim=-1)
    assert float(moved.mean()) > 1.0
    assert float((got - ref).norm(dim=-1).mean()) < 0.02 * float(moved.mean())
    det = jacobian_determinant(truth, grid)
    assert float(det.min()) > 0.0
    assert float(det.max()) > 1.05 and float(det.min()) < 0.95  # really deformed


@pytest.mark.parametrize("ndim", [2, 3])
def test_inverse_composes_to_identity(ndim):
    grid = GRIDS[ndim]
    truth, v = velocity_diffeomorphism(grid, 15.0, sigma_mm=3.0, seed=7)
    moving_grid = Grid(tuple(n + 8 for n in grid.size), grid.spacing,
                       tuple(o - 4 * s for o, s in zip(grid.origin, grid.spacing)))
    inverse, report = invert_velocity_diffeomorphism(truth, v, moving_grid)
    # Measured: mean 0.0003, max 0.001 mm (at 10 mm smoothness the fixed-point refinement
    # stalls at a few hundredths of a mm at a few voxels of strong compression).
    assert report.mean_mm < 0.002 and report.max_mm < 0.01 and report.points > 0
    y = _interior(moving_grid, 6).float()
    with torch.no_grad():
        residual = (truth(inverse(y)) - y).norm(dim=-1)
    assert float(residual.mean()) < 0.002 and float(residual.max()) < 0.01
    with torch.no_grad():
        x = _interior(grid, 3).float()
        back = inverse(truth(x))  # the inverse field interpolated between its voxels
    assert float((back - x).norm(dim=-1).mean()) < 0.05  # measured 0.013 (2D), 0.033 (3D)


def test_constant_velocity_is_a_translation_and_draws_are_seeded():
    grid = GRIDS[2]
    v = torch.zeros((2, *grid.shape), dtype=torch.float64)
    v[0], v[1] = 2.5, -1.0
    from itreg.transforms.dense import integrate_velocity

    d = integrate_velocity(v, grid, 8)
    assert torch.allclose(d[0], torch.full_like(d[0], 2.5), atol=1e-9)
    a = random_velocity(grid, 10.0, 2.0, seed=4)
    assert torch.equal(a, random_velocity(grid, 10.0, 2.0, seed=4))
    assert not torch.equal(a, random_velocity(grid, 10.0, 2.0, seed=5))
    # Untapered, the RMS per component is sigma (up to the interpolation onto the grid).
    flat = random_velocity(grid, 10.0, 2.0, seed=4, taper_mm=0.0)
    rms = flat.pow(2).mean(dim=(1, 2)).sqrt()
    assert torch.allclose(rms, torch.full_like(rms, 2.0), rtol=0.25)
    # Tapered: zero at the border voxels.
    assert float(a[:, 0].abs().max()) == 0.0 and float(a[:, :, -1].abs().max()) == 0.0
    # Smoother fields have smaller gradients.
    rough = random_velocity(grid, 4.0, 2.0, seed=4, taper_mm=0.0)
    assert float(rough.diff(dim=-1).abs().mean()) > 2 * float(flat.diff(dim=-1).abs().mean())
    for bad in (0.0, -3.0, (), float("nan")):
        with pytest.raises(ConfigError):
            random_velocity(grid, bad, 2.0)
    with pytest.raises(ConfigError):
        random_velocity(grid, 10.0, -1.0)


def test_svf_slice_pair_ground_truth(mni4):
    from itreg.phantoms import pair_from_tissues
    from itreg.phantoms.slices import axial_slices
    from itreg.transforms import DisplacementField
    from itreg.warp import resample

    pair = pair_from_tissues(axial_slices(mni4), "t2", "svf", seed=2, noise_sigma=0.0,
                             bias=None, smoothness_mm=(10.0, 20.0))
    assert isinstance(pair.true_transform, DisplacementField) and pair.parameters is None
    assert pair.inverse_report.max_mm < 0.05
    with torch.no_grad():
        back = resample(pair.moving_labels, pair.true_transform, pair.fixed.grid)
        ident = resample(pair.moving_labels, None, pair.fixed.grid)
    brain = pair.fixed_labels.data != 0
    agree = float((back.data == pair.fixed_labels.data)[brain].float().mean())
    before = float((ident.data == pair.fixed_labels.data)[brain].float().mean())
    assert agree > 0.9 and agree > before + 0.04  # measured at 4 mm: 0.94 vs 0.88


def test_phantom_cli_svf_files_round_trip_through_sitk(tmp_path):
    from itreg.cli import app

    out = tmp_path / "svf"
    result = CliRunner().invoke(app, ["phantom", "-o", str(out), "--ndim", "2", "--spacing", "4",
                                      "--misalign", "svf", "--smoothness", "10,20",
                                      "--seed", "1"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    man = json.loads((out / "phantom.json").read_text())
    assert man["misalign"] == "svf" and man["svf"] == {"smoothness_mm": [10.0, 20.0],
                                                       "sigma_mm": 4.0}
    assert not (out / "transform.tfm").exists()
    fwd = sitk.DisplacementFieldTransform(
        sitk.ReadImage(str(out / "transform_field.nii.gz"), sitk.sitkVectorFloat64))
    inv = sitk.DisplacementFieldTransform(
        sitk.ReadImage(str(out / "inverse_field.nii.gz"), sitk.sitkVectorFloat64))
    mask = sitk.ReadImage(str(out / "moving_mask.nii.gz"))
    idx = np.argwhere(sitk.GetArrayFromImage(mask) != 0)[:, ::-1]
    ys = [np.array(mask.TransformContinuousIndexToPhysicalPoint(i.astype(float).tolist()))
          for i in idx]
    err = [np.linalg.norm(np.array(fwd.TransformPoint(inv.TransformPoint(y.tolist()))) - y)
           for y in ys]
    assert max(err) < 0.05
    pf = np.loadtxt(out / "fixed_landmarks.csv", delimiter=",", skiprows=1)
    pm = np.loadtxt(out / "moving_landmarks.csv", delimiter=",", skiprows=1)
    assert max(np.linalg.norm(np.array(fwd.TransformPoint(p.tolist())) - q)
               for p, q in zip(pf, pm)) < 1e-3
    bad = CliRunner().invoke(app, ["phantom", "-o", str(tmp_path / "g"), "--kind", "group",
                                   "--misalign", "svf", "--spacing", "4", "--ndim", "2"])
    assert isinstance(bad.exception, ConfigError) and "svf" in str(bad.exception)

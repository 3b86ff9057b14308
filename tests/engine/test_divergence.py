"""Divergence detection: a level that ends worse than it started keeps its best parameters,
records it in the report and warns once."""

from __future__ import annotations

import logging

import pytest
import torch
from engine_data import make_pair, mean_error_vox

from itreg.api import register
from itreg.engine.config import RegistrationConfig
from itreg.engine.divergence import DivergenceGuard, folded_fraction
from itreg.transforms import Affine, Translation
from itreg.transforms.bspline import BSpline


def _config(transform: str, **stage) -> RegistrationConfig:
    base = {"transform": transform, "optimizer": "adam", "learning_rate": [1.0], "shrink": [1],
            "smoothing_mm": [0.0], "iterations": [80], "metric": {"name": "mse"},
            "sampling": {"strategy": "full"}}
    base.update(stage)
    return RegistrationConfig.from_dict({"stages": [base]})


@pytest.fixture(scope="module")
def ffd_pair(grid2d):
    true = BSpline(grid2d, 16.0)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(1)
        true.coefficients.copy_(torch.randn(true.coefficients.shape, generator=gen) * 2.5)
    fixed, moving = make_pair(grid2d, true, multimodal=False)
    return true, fixed, moving


def _ffd(result) -> BSpline:
    return next(m for m in result.transform.modules() if isinstance(m, BSpline))


def _unguarded(monkeypatch):
    monkeypatch.setattr(DivergenceGuard, "check", lambda self, record, ctx, level: None)


def test_folded_fraction_closed_forms(grid2d):
    assert folded_fraction(Affine(2), grid2d) == 0.0
    mirror = Affine(2, matrix=[[-1.0, 0.0], [0.0, 1.0]])
    assert folded_fraction(mirror, grid2d) == 1.0
    fold = BSpline(grid2d, 8.0)
    assert folded_fraction(fold, grid2d) == 0.0
    with torch.no_grad():  # neighbouring control points swapped far past each other
        fold.coefficients[0, :, 4] = 12.0
        fold.coefficients[0, :, 5] = -12.0
    det_le0 = folded_fraction(fold, grid2d)
    assert 0.0 < det_le0 < 1.0


def test_folding_bspline_keeps_start_reports_and_warns(ffd_pair, grid2d, caplog, monkeypatch):
    true, fixed, moving = ffd_pair
    config = _config("bspline", control_spacing_mm=8.0, learning_rate=[8.0])  # far too large
    with caplog.at_level(logging.WARNING, logger="itreg"):
        result = register(fixed, moving, preset=config, progress=False)
    events = result.divergence
    assert len(events) == 1
    event = events[0]
    assert event["stage"] == 0 and event["level"] == 0 and event["transform"] == "bspline"
    assert "folding" in event["reasons"]
    assert event["end"]["folded_fraction"] > 0.05 and event["start"]["folded_fraction"] == 0.0
    # The kept parameters are the start's (nothing better that does not fold was seen):
    # the identity B-spline, no folding; and the report carries the event.
    assert event["kept"] == "start"
    assert float(_ffd(result).coefficients.detach().abs().max()) == 0.0
    assert folded_fraction(result.transform, grid2d) == 0.0
    assert result.report()["divergence"] == events
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "divergence detected" in warnings[0].getMessage()
    assert "stage 1 (bspline) level 1: " in warnings[0].getMessage()
    # Without the guard the same run ends folded and further from the truth.
    _unguarded(monkeypatch)
    bad = register(fixed, moving, preset=config, progress=False)
    assert folded_fraction(bad.transform, grid2d) > 0.05
    assert mean_error_vox(result.transform, true, grid2d) < mean_error_vox(bad.transform, true,
                                                                          grid2d)


def test_good_registration_is_untouched(ffd_pair, grid2d, monkeypatch, caplog):
    true, fixed, moving = ffd_pair
    config = _config("bspline", control_spacing_mm=8.0)
    with caplog.at_level(logging.WARNING, logger="itreg"):
        good = register(fixed, moving, preset=config, progress=False)
    assert good.divergence == [] and good.report()["divergence"] == []
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert mean_error_vox(good.transform, true, grid2d) < 0.8 * mean_error_vox(
        BSpline(grid2d, 8.0), true, grid2d)
    _unguarded(monkeypatch)
    same = register(fixed, moving, preset=config, progress=False)
    assert torch.equal(_ffd(good).coefficients, _ffd(same).coefficients)


def test_objective_worse_keeps_best_parameters(grid2d):
    # Started at the answer, a huge step can only make the objective worse.
    true = Translation(2, translation=[2.0, -1.5])
    fixed, moving = make_pair(grid2d, true, multimodal=False)
    config = _config("translation", learning_rate=[6.0], iterations=[12],
                     optimizer="gd")
    result = register(fixed, moving, preset=config, progress=False,
                      init=Translation(2, translation=[2.0, -1.5]))
    assert len(result.divergence) == 1
    event = result.divergence[0]
    assert "objective-worse" in event["reasons"]
    kept = event["kept_values"]["loss"]
    assert kept <= event["start"]["loss"] and kept < event["end"]["loss"]
    assert mean_error_vox(result.transform, true, grid2d) < 0.05


def test_cli_warns_once_exits_zero_and_reports(ffd_pair, tmp_path, cli):
    import json

    from itreg.io import write_image

    _, fixed, moving = ffd_pair
    write_image(fixed, tmp_path / "fixed.nii.gz")
    write_image(moving, tmp_path / "moving.nii.gz")
    config = tmp_path / "fold.toml"
    config.write_text(
        'name = "fold"\n[[stages]]\ntransform = "bspline"\ncontrol_spacing_mm = 8.0\n'
        'optimizer = "adam"\nlearning_rate = [8.0]\nshrink = [1]\nsmoothing_mm = [0.0]\n'
        'iterations = [80]\nmetric = { name = "mse" }\nsampling = { strategy = "full" }\n')
    out = tmp_path / "out"
    code, _, err = cli(["register", str(tmp_path / "fixed.nii.gz"),
                        str(tmp_path / "moving.nii.gz"), "-o", str(out), "--config", str(config),
                        "--quiet"])
    assert code == 0, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("itreg: warning: divergence detected"), err
    report = json.loads((out / "report.json").read_text())
    assert [e["reasons"] for e in report["divergence"]] == [["folding", "overlap-lost"]]
    assert report["divergence"][0]["kept"] == "start"

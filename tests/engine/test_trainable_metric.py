"""The engine trains a neural MI critic while optimising the transform (MINE / KLDivNet)."""

from __future__ import annotations

import pytest
from engine_data import mean_error_vox

import itreg
from itreg.errors import ConfigError
from itreg.phantoms import brain_pair, brain_slice_pair
from itreg.transforms import Translation

QUICK_2D = {"shrink": [2, 1], "smoothing_mm": [3.0, 0.0], "iterations": [100, 80],
            "learning_rate": [2.0, 1.0], "sampling.count": 2048}


def _register(pair, preset, metric, overrides, seed=0, **kw):
    return itreg.register(pair.fixed, pair.moving, preset, metric, progress=False, seed=seed,
                          overrides=overrides, fixed_mask=pair.fixed_mask, **kw)


def test_mine_recovers_rigid_t1_vs_t2_slice():
    pair = brain_slice_pair(spacing_mm=3.0, kind="rigid", seed=2)
    start = mean_error_vox(Translation(2), pair.true_transform, pair.fixed.grid)
    res = _register(pair, "rigid", "mine", QUICK_2D, seed=2)
    err = mean_error_vox(res.transform, pair.true_transform, pair.fixed.grid)
    assert start > 3.0
    assert err < 1.0, err
    assert res.levels[-1].final_metric > 0.2  # MI estimate in nats at the end
    assert res.config.stages[0].metric.name == "mine"


@pytest.mark.parametrize("optimizer", ["powell", "lbfgs"])
def test_fixed_objective_optimizers_are_refused(optimizer):
    pair = brain_slice_pair(spacing_mm=4.0, kind="rigid", seed=0)
    with pytest.raises(ConfigError, match="critic"):
        _register(pair, "rigid", "mine", {**QUICK_2D, "optimizer": optimizer})


def test_critic_is_trained_with_configurable_steps(monkeypatch):
    from itreg.engine import trainable

    seen = {}
    real_init = trainable.CriticTraining.__init__

    def spy(self, objective, metric):
        real_init(self, objective, metric)
        seen.setdefault("trainers", []).append(self)

    monkeypatch.setattr(trainable.CriticTraining, "__init__", spy)
    pair = brain_slice_pair(spacing_mm=4.0, kind="rigid", seed=0)
    ov = {"shrink": [1], "smoothing_mm": [0.0], "iterations": [5], "learning_rate": [1.0],
          "sampling.count": 512, "metric.critic_steps": 3, "metric.warmup_steps": 4,
          "metric.critic_lr": 1e-3}
    _register(pair, "rigid", "kldiv", ov)
    (tr,) = seen["trainers"]
    assert tr.optimizer.param_groups[0]["lr"] == 1e-3
    assert tr.critic_updates == 4 + 5 * 3


@pytest.mark.slow
@pytest.mark.parametrize("metric", ["mine", "kldiv"])
def test_neural_metrics_recover_rigid_slices(metric):
    """Capture range is finite: measured successes (error < 1 voxel) on seeds 0-5 were 4 of 6
    for both (MI with the same settings: 5 of 6); seeds 0-2 must mostly succeed."""
    errors = []
    for seed in range(3):
        pair = brain_slice_pair(spacing_mm=3.0, kind="rigid", seed=seed)
        res = _register(pair, "rigid", metric, QUICK_2D, seed=seed)
        errors.append(mean_error_vox(res.transform, pair.true_transform, pair.fixed.grid))
    assert sum(e < 1.0 for e in errors) >= 2, errors


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1])
def test_mine_recovers_3d_affine_within_1mm(seed):
    """T1 vs T2-like brains at 2 mm under the anchor benchmark's random affine (rotations up to
    15 degrees, translations up to 20 mm, scales 0.95-1.05): mean error over the brain < 1 mm."""
    from itreg.evaluate import warping_error

    pair = brain_pair(spacing_mm=2.0, kind="anchor", seed=seed)
    ov = {"shrink": [2, 1], "smoothing_mm": [3.0, 0.0], "iterations": [150, 150],
          "learning_rate": [2.0, 0.5], "sampling.count": 8192}
    res = _register(pair, "affine", "mine", ov, seed=seed)
    mask = pair.fixed_mask.data[0]
    err = warping_error(res.transform, pair.true_transform, pair.fixed.grid, mask)
    assert err.mean_mm < 1.0, err.mean_mm

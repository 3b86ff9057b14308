"""The trainers ported onto :func:`itreg.train.fit` give the numbers of their former loops.

The expected values were printed by the code at commit f8d150d (before ``_Trainer`` of
``train/regnet.py`` and ``train_critic`` of ``metrics/neural.py`` ran through ``fit``), with
the same seeds, settings and one torch thread: per-epoch records (``epoch``, ``train_loss``,
``train_similarity``, ``val_dice``, ``val_loss``), the sum of absolute weights, and the critic's
``(step, train estimate, validation estimate)`` history.
"""

from __future__ import annotations

import pytest
import torch
from regnet_train_data import TinyPairs

from itreg.train.critic import train_critic
from itreg.train.regnet import TrainNetConfig, train_regnet

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = {"features": (4, 8, 8), "levels": 2, "affine_features": (4, 8), "batch_size": 4,
        "steps_per_epoch": 3, "lr": 1e-2, "ema_decay": 0.0, "patience": 0,
        "regulariser": "diffusion", "reg_weight": 0.01, "val_max_pairs": 2, "threads": 1}

KEYS = ("epoch", "train_loss", "train_similarity", "val_dice", "val_loss")

# name -> (settings, contrast, {stage: per-epoch records}, sum of |weights|), from f8d150d
REGNET = {
    "deform-lncc-ema-augment": (
        {"kind": "deform", "loss": "lncc", "epochs": 2, "ema_decay": 0.9, "augment": True},
        "same",
        {"deform": [[0.0, -0.7783704003, -0.7784635822, 0.5371899324, -0.7534659207],
                    [1.0, -0.7895033558, -0.7900872032, 0.5441392984, -0.7703413963]]},
        177.8535909),
    "deform-mine-critic": (
        {"kind": "deform", "loss": "mine", "epochs": 2, "ema_decay": 0.9, "critic_warmup": 5,
         "critic_steps": 2},
        "inverted",
        {"deform": [[0.0, -0.03608513313, -0.03624380815, 0.4382176402, -0.04836650752],
                    [1.0, -0.1225721886, -0.1241964325, 0.4224497584, -0.104306113]]},
        172.8712041),
    "cascade-two-stage-crops": (
        {"kind": "cascade", "loss": "ncc", "epochs": 2, "crop_size": 20, "crop_margin": 2},
        "same",
        {"affine": [[0.0, -0.8876079917, -0.8876079917, 0.436570098, -0.7782513499],
                    [1.0, -0.8957544963, -0.8957544963, 0.5013835395, -0.7966261804]],
         "deform": [[0.0, -0.9146261414, -0.9146979849, 0.5580825119, -0.8175024986],
                    [1.0, -0.9283538063, -0.9289084673, 0.4905424128, -0.8381520212]]},
        219.675203),
}


def _weight_sum(module: torch.nn.Module) -> float:
    return float(sum(v.double().abs().sum() for v in module.state_dict().values()
                     if v.is_floating_point()))


@pytest.mark.parametrize("name", sorted(REGNET))
def test_regnet_training_matches_the_former_loop(tmp_path, name):
    settings, contrast, expected, weights = REGNET[name]
    cfg = TrainNetConfig(**{**TINY, **settings})
    src = TinyPairs(4, seed=0, size=24, contrast=contrast)
    val = TinyPairs(2, seed=1, size=24, contrast=contrast)
    res = train_regnet(cfg, src, val, tmp_path / "net.pt", progress=False)
    assert list(res.stages) == list(expected)
    for stage, rows in expected.items():
        history = res.stages[stage].history
        assert len(history) == len(rows), stage
        for h, row in zip(history, rows):
            assert [h[k] for k in KEYS] == pytest.approx(row, rel=1e-6, abs=1e-7), stage
    assert _weight_sum(res.net) == pytest.approx(weights, rel=1e-6)


def test_critic_training_matches_the_former_loop():
    src = TinyPairs(2, seed=3, size=24, contrast="inverted")
    fixed = [src[i].fixed for i in range(2)]
    moving = [src[i].moving for i in range(2)]
    res = train_critic(fixed, moving, metric="mine", steps=35, batch=128, val_every=10,
                       patience=5, seed=2)
    assert [h[0] for h in res.history] == [10, 20, 30, 35]
    assert [v for h in res.history for v in h[1:]] == pytest.approx(
        [0.01383404434, 0.01440543681, 0.03961770982, 0.03195041418,
         0.08473688364, 0.05937299132, 0.06812560558, 0.07654353976], rel=1e-6, abs=1e-8)
    assert res.best_val == pytest.approx(0.07654353976, rel=1e-6)
    assert (res.steps, res.stop_reason) == (35, "max-steps")
    assert _weight_sum(res.metric.critic) == pytest.approx(610.4032656, rel=1e-6)

"""Training registration networks: the loss falls (mse, ncc, mi, mine), Dice supervision,
cascades, checkpoints that resume bitwise, and bad settings."""

from __future__ import annotations

import math

import pytest
import torch
from regnet_train_data import TinyPairs

from itreg.errors import ConfigError, OutputExistsError
from itreg.metrics import get_metric
from itreg.nets.regnets import Cascade, DeformNet, load_regnet
from itreg.train.regnet import (
    TrainNetConfig,
    build_network,
    checkpoint_path,
    soft_dice,
    train_regnet,
)

# Two U-Net levels on 24 x 24 images, one thread (much faster on a busy machine).
TINY = {"features": (4, 8, 8), "levels": 2, "affine_features": (4, 8), "batch_size": 4,
        "steps_per_epoch": 3, "lr": 1e-2, "ema_decay": 0.0, "patience": 0,
        "regulariser": "diffusion", "reg_weight": 0.01, "val_max_pairs": 2, "threads": 1}


pytestmark = pytest.mark.usefixtures("one_thread")


def _pairs(n, seed=0, **kw):
    return TinyPairs(n, seed=seed, size=24, **kw)


def _mean_similarity(net, source, metric) -> float:
    """Mean metric over the source's pairs after the network's prediction."""
    values = []
    net.eval()
    with torch.no_grad():
        for i in range(len(source)):
            s = source[i]
            f, m = net.prepare(s.fixed, s.moving)
            out = net(f, m, source.grid)
            values.append(float(metric(f[0], out.warped[0])))
    return sum(values) / len(values)


@pytest.mark.parametrize("loss,kwargs,contrast", [
    ("mse", {}, "same"),
    ("ncc", {}, "same"),
    ("mi", {"bins": 16}, "inverted"),
    ("mine", {}, "inverted"),
])
def test_training_loss_falls(tmp_path, loss, kwargs, contrast):
    src = _pairs(8, contrast=contrast)
    cfg = TrainNetConfig(kind="deform", loss=loss, loss_kwargs=kwargs, epochs=6,
                         critic_warmup=30, **TINY)
    metric = get_metric("mi", bins=16) if loss == "mine" else get_metric(loss, **kwargs)
    before = _mean_similarity(build_network(cfg, 2), src, metric)  # the identity
    res = train_regnet(cfg, src, None, tmp_path / "n.pt", progress=False)
    after = _mean_similarity(res.net, src, metric)
    scale = max(abs(before), 1e-3)
    assert after < before - 0.01 * scale, (before, after)
    net = load_regnet(tmp_path / "n.pt")
    assert isinstance(net, DeformNet) and net.extra["train"]["loss"] == loss
    assert len(res.history) == 6 and res.monitor == "val_dice"


def test_dice_supervision_alone_improves_label_overlap(tmp_path):
    """MIDiceRegNet's Dice term uses the labels: with no image term, Dice alone aligns them."""
    src = _pairs(8, contrast="inverted")
    cfg = TrainNetConfig(kind="deform", loss="mi", loss_weight=0.0, dice_weight=1.0,
                         epochs=4, **TINY)
    res = train_regnet(cfg, src, _pairs(4, seed=1, contrast="inverted"),
                       tmp_path / "d.pt", progress=False)
    first = res.history[0]["val_dice"]
    assert max(h["val_dice"] for h in res.history) > first + 0.02
    assert all("val_dice" in h for h in res.history)
    with pytest.raises(ConfigError, match="label"):
        train_regnet(cfg, _pairs(4, labels=False), None, tmp_path / "x.pt", progress=False)


def test_soft_dice_of_shifted_boxes():
    f = torch.zeros(1, 2, 20, 20)
    m = torch.zeros(1, 2, 20, 20)
    f[0, 1, 5:15, 5:15] = 1
    m[0, 1, 7:17, 5:15] = 1
    f[:, 0], m[:, 0] = 1 - f[:, 1], 1 - m[:, 1]
    assert abs(float(soft_dice(f, m)) - 0.8) < 1e-5


def test_cascade_two_stage_and_affine_augmentation(tmp_path):
    cfg = TrainNetConfig(kind="cascade", loss="ncc", epochs=1, augment=True, aug_flip=True,
                         aug_target="moving", **TINY)
    res = train_regnet(cfg, _pairs(4), _pairs(2, seed=1), tmp_path / "c.pt",
                       progress=False)
    assert list(res.stages) == ["affine", "deform"]
    assert all(r.epochs == 1 for r in res.stages.values())
    net = load_regnet(tmp_path / "c.pt")
    assert isinstance(net, Cascade)
    s = _pairs(1)[0]
    tf = net.predict(s.fixed, s.moving)
    assert tf.ndim == 2


def test_resume_after_interruption_equals_an_uninterrupted_run(tmp_path):
    cfg = TrainNetConfig(kind="deform", loss="mine", epochs=3, critic_warmup=5,
                         **{**TINY, "ema_decay": 0.9, "steps_per_epoch": 2})
    src, val = _pairs(4, contrast="inverted"), _pairs(2, seed=1, contrast="inverted")
    full = train_regnet(cfg, src, val, tmp_path / "full.pt", progress=False)

    class Stop(Exception):
        pass

    def interrupt(record):
        if record["epoch"] == 0:
            raise Stop

    out = tmp_path / "part.pt"
    with pytest.raises(Stop):
        train_regnet(cfg, src, val, out, progress=False, callback=interrupt)
    assert checkpoint_path(out).is_file() and not out.exists()
    resumed = train_regnet(cfg, src, val, out, progress=False)
    assert len(resumed.history) == 3
    assert [h["val_loss"] for h in resumed.history] == [h["val_loss"] for h in full.history]
    a, b = full.net.state_dict(), resumed.net.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # settings that change the run refuse the checkpoint
    with pytest.raises(ConfigError, match="other settings"):
        train_regnet(TrainNetConfig(**{**cfg.to_dict(), "lr": 5e-2}), src, val, out,
                     progress=False, force=True)


def test_bad_settings_raise_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="metric"):
        TrainNetConfig(loss="no-such-metric")
    with pytest.raises(ConfigError, match="kind"):
        TrainNetConfig(kind="bspline")
    with pytest.raises(ConfigError, match="regulariser"):
        TrainNetConfig(regulariser="elastic")
    with pytest.raises(ConfigError):
        TrainNetConfig(batch_size=0)
    with pytest.raises(ConfigError):
        TrainNetConfig(ema_decay=1.0)
    with pytest.raises(ConfigError, match="no_such_setting"):
        TrainNetConfig(loss="mi", loss_kwargs={"no_such_setting": 3})
    with pytest.raises(ConfigError, match="bins"):
        TrainNetConfig(loss="mi", loss_kwargs={"bins": 1})
    (tmp_path / "exists.pt").write_bytes(b"x")
    with pytest.raises(OutputExistsError):
        train_regnet(TrainNetConfig(**TINY), _pairs(2), None, tmp_path / "exists.pt",
                     progress=False)
    with pytest.raises(ConfigError, match="pair source"):
        train_regnet(TrainNetConfig(**TINY), [1, 2], None, tmp_path / "b.pt", progress=False)


def test_non_finite_loss_stops_training_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    from itreg.train import TrainingError
    from itreg.train.regnet import _Trainer

    calls = {"n": 0}
    original = _Trainer._similarity

    def poisoned(self, fixed, warped):
        calls["n"] += 1
        value = original(self, fixed, warped)
        return value * float("nan") if calls["n"] > 6 else value

    monkeypatch.setattr(_Trainer, "_similarity", poisoned)
    out = tmp_path / "nan.pt"
    cfg = TrainNetConfig(kind="deform", loss="mse", epochs=3, **TINY)
    with pytest.raises(TrainingError, match="NaN or infinite"):
        train_regnet(cfg, _pairs(4), None, out, progress=False)
    assert checkpoint_path(out).is_file() and not out.exists()
    state = torch.load(checkpoint_path(out), weights_only=True)
    assert state["result"]["epochs"] == 1
    assert all(bool(torch.isfinite(v).all()) for v in state["model"].values()
               if v.is_floating_point())


def test_a_deepsim_extractor_file_as_the_loss(tmp_path):
    """``loss="deepsim:PATH"``: a frozen extractor from a model file is the similarity."""
    from itreg.blocks.deepsim import MODEL_KIND, DeepSimNet
    from itreg.blocks.modelfile import save_model

    torch.manual_seed(0)
    extractor = DeepSimNet(2, mode="ae", channels=(4, 4, 4))
    path = tmp_path / "ae.pt"
    save_model(path, MODEL_KIND, extractor.config(), extractor.state_dict())
    cfg = TrainNetConfig(kind="deform", loss=f"deepsim:{path}", epochs=1, **TINY)
    res = train_regnet(cfg, _pairs(4), None, tmp_path / "n.pt", progress=False)
    assert res.stages["deform"].steps == 3 and math.isfinite(res.history[0]["val_loss"])
    assert load_regnet(tmp_path / "n.pt").extra["train"]["loss"] == f"deepsim:{path}"


def test_a_two_stage_cascade_resumed_in_its_second_stage_equals_an_uninterrupted_run(tmp_path):
    cfg = TrainNetConfig(kind="cascade", loss="ncc", epochs=2, **{**TINY, "steps_per_epoch": 2})
    src, val = _pairs(4), _pairs(2, seed=1)
    full = train_regnet(cfg, src, val, tmp_path / "full.pt", progress=False)

    class Stop(Exception):
        pass

    def interrupt(record):
        if record["stage"] == "deform" and record["epoch"] == 0:
            raise Stop

    out = tmp_path / "part.pt"
    with pytest.raises(Stop):
        train_regnet(cfg, src, val, out, progress=False, callback=interrupt)
    resumed = train_regnet(cfg, src, val, out, progress=False)
    assert list(resumed.stages) == ["affine", "deform"]
    for stage in ("affine", "deform"):
        assert [h["val_loss"] for h in resumed.stages[stage].history] == \
            [h["val_loss"] for h in full.stages[stage].history]
    a, b = full.net.state_dict(), resumed.net.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)

"""Neural MI metrics (MINE / KLDivNet critics): estimates, robustness, model files, registry."""

from __future__ import annotations

import math

import pytest
import torch

from itreg.blocks.critics import Critic
from itreg.errors import ConfigError, ModelFileError
from itreg.metrics import get_metric
from itreg.metrics.bounds import ESTIMATORS
from itreg.metrics.neural import NeuralMI, derangement, save_critic
from itreg.train.critic import train_critic

pytestmark = pytest.mark.usefixtures("one_thread")


def gaussians(rho=0.8, n=20000, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g)
    y = rho * x + math.sqrt(1 - rho**2) * torch.randn(n, generator=g)
    return x[None], y[None], -0.5 * math.log(1 - rho**2)


def _estimate(metric, x, y, estimator, calls=1):
    metric.estimator = estimator
    with torch.no_grad():
        return sum(float(metric.estimate(x, y)) for _ in range(calls)) / calls


def test_trained_critic_estimates_approach_gaussian_mi():
    """One critic trained with SMILE's JS objective reaches f = log p/q, the optimum of DV,
    SMILE and InfoNCE (up to a constant); NWJ's optimum is f + 1, trained separately."""
    x, y, mi = gaussians()
    res = train_critic([x], [y], "mine", steps=150, batch=1024, lr=5e-3, val_every=50,
                       estimator="smile", intensity="minmax", infonce_batch=128)
    metric = res.metric
    for est, calls in (("dv", 1), ("smile", 1), ("dv-ema", 1), ("infonce", 10)):
        value = _estimate(metric, x, y, est, calls)
        assert value == pytest.approx(mi, abs=0.08), (est, value, mi)
    assert _estimate(metric, x, y, "infonce", 1) <= math.log(128) + 1e-6
    res = train_critic([x], [y], "kldiv", steps=150, batch=1024, lr=5e-3, val_every=50,
                       estimator="nwj", intensity="minmax")
    assert _estimate(res.metric, x, y, "nwj") == pytest.approx(mi, abs=0.08)


@pytest.mark.slow
@pytest.mark.parametrize("estimator,arch", [("dv", "mine"), ("nwj", "kldiv"), ("smile", "mine"),
                                            ("dv-ema", "kldiv"), ("infonce", "kldiv")])
def test_each_estimator_trained_on_its_own_approaches_gaussian_mi(estimator, arch):
    x, y, mi = gaussians()
    kw = {"infonce_batch": 128} if estimator == "infonce" else {}
    res = train_critic([x], [y], arch, steps=300, batch=1024, lr=4e-3, val_every=50,
                       patience=5, estimator=estimator, intensity="minmax", **kw)
    assert res.stop_reason in ("max-steps", "early-stopping")
    est = _estimate(res.metric, x, y, estimator, 10 if estimator == "infonce" else 1)
    assert est == pytest.approx(mi, abs=0.08), (estimator, arch, est, mi)


def test_derangement_has_no_fixed_points():
    g = torch.Generator().manual_seed(0)
    for n in (2, 3, 10, 1000):
        p = derangement(n, g)
        assert sorted(p.tolist()) == list(range(n))
        assert not bool((p == torch.arange(n)).any())


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("arch", ["mine", "kldiv"])
def test_finite_on_identical_constant_and_shuffled(estimator, arch):
    metric = get_metric(arch, estimator=estimator, infonce_batch=32)
    g = torch.Generator().manual_seed(0)
    img = torch.rand(1, 24, 20, generator=g)
    shuffled = img.reshape(1, -1)[:, torch.randperm(480, generator=g)].reshape(1, 24, 20)
    const = torch.full_like(img, 0.3)
    for f, m in ((img, img), (const, const), (img, const), (img, shuffled)):
        for a, b in ((f, m), (f.reshape(1, -1), m.reshape(1, -1))):
            loss = metric(a, b)
            assert loss.dim() == 0 and torch.isfinite(loss)
            loss.backward()
            for p in metric.critic_parameters():
                assert p.grad is None or bool(torch.isfinite(p.grad).all())
    vol = torch.rand(1, 8, 8, 8, generator=g)
    mask = torch.zeros(8, 8, 8, dtype=torch.bool)
    mask[1:7, 1:7, 1:7] = True
    assert torch.isfinite(metric(vol, vol ** 2, mask=mask))


def test_gradient_reaches_moving_values():
    metric = get_metric("mine")
    f = torch.rand(1, 300, generator=torch.Generator().manual_seed(0))
    m = (f ** 2).requires_grad_(True)
    metric(f, m).backward()
    assert m.grad is not None and bool(torch.isfinite(m.grad).all())


def test_saved_critic_reloads_with_identical_values(tmp_path):
    x, y, _ = gaussians(n=4000)
    res = train_critic([x], [y], "kldiv", steps=60, batch=512, val_every=30, seed=3)
    path = tmp_path / "critic.pt"
    save_critic(res.metric, path, {"note": "test"})
    loaded = get_metric(f"kldiv:{path}")
    assert loaded.trainable is False
    assert all(not p.requires_grad for p in loaded.critic_parameters())
    assert loaded.critic.config() == res.metric.critic.config()
    res.metric.reset_generator(0)
    loaded.reset_generator(0)
    img = torch.rand(1, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for a, b in ((x, y), (img, img.sqrt())):
            assert torch.equal(res.metric(a, b), loaded(a, b))
    # loading through the other prefix keeps the file's architecture
    assert get_metric(f"mine:{path}").critic.arch == "kldiv"
    assert get_metric(f"mine:{path}", finetune=True).trainable is True


def test_model_file_errors_and_settings(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a torch file")
    with pytest.raises(ModelFileError, match="bad.pt"):
        get_metric(f"mine:{bad}")
    with pytest.raises(ConfigError):
        get_metric("mine", estimator="mmd")
    with pytest.raises(ConfigError):
        get_metric("mine", no_such_setting=1)
    with pytest.raises(ConfigError):
        get_metric("kldiv", critic_steps=0)
    metric = get_metric("mine", estimator="smile", tau=2.0)
    assert metric.config()["tau"] == 2.0 and metric.trainable
    assert metric.quantity(torch.tensor(-0.5)) == pytest.approx(0.5)


def test_nan_during_training_stops_and_keeps_last_good_weights(tmp_path, caplog):
    x, y, _ = gaussians(n=2000)
    metric = NeuralMI(arch="mine")
    real = metric.estimate
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        out = real(*args, **kwargs)
        return out * math.nan if calls["n"] > 25 else out

    metric.estimate = flaky
    ckpt = tmp_path / "ckpt.pt"
    res = train_critic([x], [y], metric, steps=100, batch=256, val_every=10, checkpoint=ckpt)
    assert res.stop_reason == "non-finite"
    assert "NaN" in res.message and "last good" in res.message
    assert all(bool(torch.isfinite(p).all()) for p in res.metric.critic.parameters())
    assert math.isfinite(res.best_val)
    assert ckpt.exists()
    reloaded = get_metric(f"mine:{ckpt}")
    for a, b in zip(reloaded.critic.parameters(), res.metric.critic.parameters()):
        assert torch.equal(a, b)


def test_kldiv_critic_pools_images_and_keeps_masked_blocks():
    critic = Critic("kldiv")
    img = torch.rand(1, 8, 6)
    mask = torch.zeros(8, 6, dtype=torch.bool)
    mask[:4, :] = True
    h, keep = critic.features(img, "fixed", mask)
    assert h.shape == (12, 32) and keep.shape == (12,) and int(keep.sum()) == 6
    s = critic.score_matrix(h[:5], h[:5])
    for i in range(5):
        for j in range(5):
            ref = critic.pair_scores(h[i:i + 1], h[j:j + 1])
            assert torch.allclose(s[i, j], ref[0], atol=1e-5)

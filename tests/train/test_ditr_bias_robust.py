"""DITR robustness to smooth intensity nonuniformity: bias-field augmentation of the training
patches (``DITRTrainConfig.bias_augment``) and per-patch normalisation in the classifier
(``DITRNet(normalize=True)``)."""

import math

import pytest
import torch
from ditr_data import blob_pair

from itreg.blocks.ditr import DITRNet, normalize_patches
from itreg.blocks.modelfile import build_model, load_model, save_model
from itreg.errors import ConfigError
from itreg.train.ditr import (
    DITRTrainConfig,
    IMLStage,
    PatchSampler,
    TrainingPair,
    prepare_stage,
    random_bias_fields,
    train_ditr,
)


def _plane_residual(logf: torch.Tensor) -> float:
    """Largest residual of a least-squares affine fit of `logf` over voxel positions."""
    nd = logf.dim()
    idx = torch.stack(torch.meshgrid(*[torch.arange(s, dtype=torch.float64) for s in logf.shape],
                                     indexing="ij"), -1).reshape(-1, nd)
    a = torch.cat([torch.ones(idx.shape[0], 1, dtype=torch.float64), idx], 1)
    y = logf.reshape(-1, 1).double()
    coef = torch.linalg.lstsq(a, y).solution
    return float((a @ coef - y).abs().max())


# ------------------------------------------------------------------ (a) bias augmentation
@pytest.mark.parametrize("ndim", [2, 3])
def test_bias_fields_are_positive_log_affine_and_in_the_documented_range(ndim):
    s = 0.15
    f = random_bias_fields(40, ndim, 7, s, torch.Generator().manual_seed(3))
    assert f.shape == (40, 2, *[7] * ndim) and bool((f > 0).all())
    bound = math.exp((1 + ndim) * s)
    assert float(f.max()) <= bound * (1 + 1e-6) and float(f.min()) >= (1 - 1e-6) / bound
    # the range is used: some fields reach well beyond a single gain of exp(+-s)
    assert float(f.max()) > math.exp(1.2 * s) and float(f.min()) < math.exp(-1.2 * s)
    log = f.double().log()
    for k in range(5):
        for c in range(2):
            assert _plane_residual(log[k, c]) < 1e-5
    # centre voxel = exp(s a) with |a| <= 1; the two channels get different fields
    centre = log[(slice(None), slice(None), *[3] * ndim)]
    assert float(centre.abs().max()) <= s + 1e-6
    assert not torch.allclose(f[:, 0], f[:, 1])


def test_bias_fields_reproducible_per_seed_and_identity_at_zero_amplitude():
    a = random_bias_fields(8, 2, 9, 0.1, torch.Generator().manual_seed(5))
    b = random_bias_fields(8, 2, 9, 0.1, torch.Generator().manual_seed(5))
    c = random_bias_fields(8, 2, 9, 0.1, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.allclose(a, c)
    assert torch.equal(random_bias_fields(3, 2, 9, 0.0, torch.Generator()), torch.ones(3, 2, 9, 9))


def test_sampler_multiplies_both_labels_by_smooth_fields_and_keeps_labels():
    fixed, mask = blob_pair()
    st = prepare_stage(TrainingPair(fixed, fixed, mask), IMLStage(0, 4.0))
    plain = PatchSampler([st], [None], 9, 4.0, torch.Generator().manual_seed(0))
    aug = PatchSampler([st], [None], 9, 4.0, torch.Generator().manual_seed(0), bias_augment=0.1)
    again = PatchSampler([st], [None], 9, 4.0, torch.Generator().manual_seed(0), bias_augment=0.1)
    x0, y0 = plain.draw(64)
    x1, y1 = aug.draw(64)
    x2, _ = again.draw(64)
    assert torch.equal(y0, y1) and torch.equal(x1, x2)
    assert not torch.allclose(x0, x1)
    bound = math.exp(3 * 0.1)
    seen = {0: 0, 1: 0}
    for i in range(64):
        for c in range(2):
            inside = x0[i, c] > 0.3
            if int(inside.sum()) < 81:  # whole patch bright: the ratio is the field everywhere
                continue
            ratio = x1[i, c] / x0[i, c]
            assert float(ratio.min()) > 1 / bound - 1e-5 and float(ratio.max()) < bound + 1e-5
            assert _plane_residual(ratio.log()) < 1e-4
            seen[int(y0[i])] += 1
    assert seen[0] > 0 and seen[1] > 0  # checked for z=1 and z=0 pairs


def test_config_validates_and_records_the_options(tmp_path):
    with pytest.raises(ConfigError):
        DITRTrainConfig(bias_augment=-0.1)
    d = DITRTrainConfig().to_dict()
    assert d["bias_augment"] == 0.0 and d["normalize_patches"] is False
    fixed, mask = blob_pair()
    cfg = DITRTrainConfig(schedule=((1, 0.0),), channels=(4, 4, 4, 4), patches_per_epoch=64,
                          val_patches=64, epochs=1, batch_size=32, patience=0, reregister=False,
                          progress=False, threads=1, bias_augment=0.1, normalize_patches=True)
    res = train_ditr([TrainingPair(fixed, fixed, mask)], cfg, output=tmp_path / "m.pt")
    _, config, _, extra = load_model(res.path, "ditr")
    assert config["normalize"] is True and extra["training"]["bias_augment"] == 0.1
    net, _ = build_model(res.path, "ditr")
    assert net.normalize and res.network.normalize


# -------------------------------------------------------------- (b) per-patch normalisation
def test_normalize_patches_standardises_each_channel():
    x = torch.rand(5, 2, 9, 9, generator=torch.Generator().manual_seed(0)) * 3 + 1
    y = normalize_patches(x)
    flat = y.flatten(2)
    assert torch.allclose(flat.mean(2), torch.zeros(5, 2), atol=1e-5)
    assert torch.allclose(flat.std(2, unbiased=False), torch.ones(5, 2), atol=1e-5)
    const = normalize_patches(torch.full((1, 2, 3, 3), 0.7))
    assert float(const.abs().max()) < 1e-3  # constant patches: 0 up to rounding


@pytest.mark.parametrize("ndim,symmetric", [(2, True), (2, False), (3, True)])
def test_normalized_network_is_invariant_to_affine_intensity_per_patch(ndim, symmetric):
    torch.manual_seed(0)
    p = 9
    g = torch.Generator().manual_seed(1)
    x = torch.rand(6, 2, *[p] * ndim, generator=g)
    shape = (6, 1, *[1] * ndim)
    a = torch.rand(shape, generator=g) * 2.5 + 0.5
    b = torch.rand(shape, generator=g) * 2 - 1
    net = DITRNet(ndim, (4, 8, 8, 8), p, symmetric=symmetric, normalize=True).eval()
    with torch.no_grad():  # larger weights: logits that clearly depend on the input
        for w in net.parameters():
            w.mul_(3.0)
    ref = DITRNet(ndim, (4, 8, 8, 8), p, symmetric=symmetric, normalize=False).eval()
    ref.load_state_dict(net.state_dict())
    with torch.no_grad():
        base = net(x)
        for c in range(2):
            y = x.clone()
            y[:, c:c + 1] = a * y[:, c:c + 1] + b
            assert torch.allclose(net(y), base, atol=1e-4, rtol=1e-4)
            assert not torch.allclose(ref(y), ref(x), atol=1e-3)  # not true without the option
        # and the option changes the logits (the convolutions see standardised patches)
        assert not torch.allclose(ref(x), base, atol=1e-3)


def test_old_model_files_load_without_normalisation(tmp_path):
    torch.manual_seed(0)
    net = DITRNet(2, (4, 4, 4, 4), 9, spacing_mm=2.0, symmetric=True)
    old_config = {k: v for k, v in net.config().items() if k != "normalize"}
    assert "normalize" in net.config()
    path = save_model(tmp_path / "old.pt", "ditr", old_config, net.state_dict())
    loaded, _ = build_model(path, "ditr")
    assert loaded.normalize is False
    x = torch.rand(4, 2, 9, 9, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(loaded(x), net.eval()(x))
        # the same weights with the option on give other logits: the default matters
        on = DITRNet(2, (4, 4, 4, 4), 9, spacing_mm=2.0, symmetric=True, normalize=True)
        on.load_state_dict(net.state_dict())
        assert not torch.allclose(on.eval()(x), loaded(x), atol=1e-4)

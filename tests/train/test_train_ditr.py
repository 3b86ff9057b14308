"""DITR training: patch sampling, IML on tiny 2D phantoms, NaN handling, shared fit loop."""

import math

import pytest
import torch
from ditr_data import blob_pair

from itreg.blocks.ditr import DITRNet
from itreg.blocks.modelfile import build_model
from itreg.train import TrainingError, ValidationPatience, fit
from itreg.train.ditr import (
    DITRTrainConfig,
    IMLStage,
    PatchSampler,
    TrainingPair,
    augment_pairs,
    prepare_stage,
    train_ditr,
)
from itreg.transforms import Rigid


def test_positive_patches_without_dither_are_corresponding():
    fixed, mask = blob_pair()
    pair = TrainingPair(fixed, fixed, mask)
    st = prepare_stage(pair, IMLStage(0, 0.0))
    sampler = PatchSampler([st], [None], 9, 0.0, torch.Generator().manual_seed(0))
    x, y = sampler.draw(64)
    assert x.shape == (64, 2, 9, 9) and float(y.sum()) == 32
    pos = y > 0.5
    assert torch.allclose(x[pos, 0], x[pos, 1], atol=1e-5)
    assert not torch.allclose(x[~pos, 0], x[~pos, 1], atol=1e-3)


def test_dither_moves_the_moving_patch():
    fixed, mask = blob_pair()
    st = prepare_stage(TrainingPair(fixed, fixed, mask), IMLStage(0, 16.0))
    x, y = PatchSampler([st], [None], 9, 16.0, torch.Generator().manual_seed(0)).draw(64)
    pos = y > 0.5
    assert not torch.allclose(x[pos, 0], x[pos, 1], atol=1e-3)


def test_augmentation_applies_the_same_op_to_both_channels():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(16, 1, 5, 5, generator=g)
    out = augment_pairs(torch.cat([a, a], 1), g)
    assert torch.equal(out[:, 0], out[:, 1])
    assert sorted(out[0, 0].reshape(-1).tolist()) == sorted(a[0, 0].reshape(-1).tolist())


def _phantom_pairs(n, seed):
    from itreg.phantoms import brain_center, load_mni
    from itreg.phantoms.pairs import pair_from_tissues
    from itreg.phantoms.slices import axial_slices

    tissues = load_mni(4.0)
    nz = tissues["t1"].grid.shape[0]
    out = []
    for i in range(n):
        sl = axial_slices(tissues, nz // 2 - n + 2 * i + seed % 2)
        p = pair_from_tissues(sl, "t2", "rigid", seed=seed + i, pad_mm=24.0)
        out.append((p, brain_center(sl["mask"])))
    return out


@pytest.fixture(scope="module")
def tiny_iml(tmp_path_factory):
    torch.manual_seed(0)
    pairs = _phantom_pairs(3, 10)
    # Roughly aligned training pairs: the true transform with up to 3 mm of translation
    # error per axis (IML starts from these, never from the exact alignment).
    from itreg.transforms import Affine

    train = []
    g = torch.Generator().manual_seed(0)
    for p, _ in pairs:
        t = p.true_transform
        noise = (torch.rand(2, generator=g) * 2 - 1) * 3.0
        rough = Affine.from_matrix(t.matrix().detach(), t.offset().detach() + noise)
        train.append(TrainingPair(p.fixed, p.moving, p.fixed_mask, rough))
    cfg = DITRTrainConfig(schedule=((2, 16.0), (1, 0.0)), channels=(8, 8, 16, 16),
                          patches_per_epoch=2048, val_patches=512, epochs=2, patience=0,
                          batch_size=128, learning_rate=3e-3, weight_decay=0.0,
                          register_iterations=3, seed=0, progress=False, threads=1,
                          normalize_patches=False)  # thresholds set for the plain classifier
    out = tmp_path_factory.mktemp("ditr") / "ditr.pt"
    return train_ditr(train, cfg, output=out), pairs


def test_iml_improves_accuracy_and_registers_held_out_pair(tiny_iml):
    import itreg
    from itreg.metrics.ditr import ditr_overrides
    from itreg.phantoms import brain_center, load_mni
    from itreg.phantoms.slices import axial_slices
    from itreg.warp import resample

    res, _ = tiny_iml
    first = res.stages[0]
    assert first["val_accuracy"] > first["val_accuracy_before"] + 0.1
    assert res.stages[-1]["val_accuracy"] > 0.7
    # Held-out slice, aligned T2-like contrast translated by 8 mm in x.
    tissues = axial_slices(load_mni(4.0), 30)
    from itreg.phantoms.pairs import pair_from_tissues
    p = pair_from_tissues(tissues, "t2", "rigid", seed=99, pad_mm=24.0)
    aligned = resample(p.moving, p.true_transform, p.fixed.grid)
    c = brain_center(tissues["mask"])
    true = Rigid(2, center=torch.tensor(c), translation=torch.tensor([8.0, 0.0]))
    moving = resample(aligned, true.inverse(), p.fixed.grid)
    pts = p.fixed.grid.points()[p.fixed_mask.data[0] > 0]
    with torch.no_grad():
        before = float((pts - true(pts)).norm(dim=-1).mean())
    reg = itreg.register(p.fixed, moving, "rigid", metric=f"ditr:{res.path}",
                         fixed_mask=p.fixed_mask, init="none", progress=False,
                         overrides=ditr_overrides(res.path, iterations=8))
    with torch.no_grad():
        after = float((reg.transform(pts) - true(pts)).norm(dim=-1).mean())
    assert after < 0.5 * before


def test_saved_model_reloads_with_identical_metric(tiny_iml):
    from itreg.metrics import get_metric
    from itreg.metrics.ditr import DITRMetric

    res, pairs = tiny_iml
    p, _ = pairs[0]
    _, extra = build_model(res.path, "ditr")
    assert extra["training"]["schedule"][0] == [2, 16.0] and len(extra["stages"]) == 2
    a = DITRMetric(res.network)(p.fixed.data, p.fixed.data)
    b = get_metric(f"ditr:{res.path}")(p.fixed.data, p.fixed.data)
    assert torch.equal(a, b) and torch.isfinite(a)


class _NaNAfter(DITRNet):
    def __init__(self, calls):
        super().__init__(2, channels=(4, 4, 4, 4), spacing_mm=2.0)
        self.calls = calls

    def forward(self, pairs):
        out = super().forward(pairs)
        if self.training:
            self.calls -= 1
            if self.calls < 0:
                return out * float("nan")
        return out


def test_nan_stops_training_and_keeps_last_good_checkpoint(tmp_path):
    fixed, mask = blob_pair()
    pair = TrainingPair(fixed, fixed, mask)
    cfg = DITRTrainConfig(schedule=((1, 0.0),), channels=(4, 4, 4, 4), patches_per_epoch=64,
                          val_patches=64, epochs=5, batch_size=32, patience=0,
                          reregister=False, progress=False, threads=1)
    out = tmp_path / "m.pt"
    with pytest.raises(TrainingError, match="NaN or infinite.*last good weights"):
        train_ditr([pair], cfg, output=out, network=_NaNAfter(calls=5))
    net, extra = build_model(out, "ditr")
    assert all(torch.isfinite(p).all() for p in net.parameters())
    assert extra["checkpoint"]["stop_reason"] == "non-finite"


def test_fit_early_stopping_and_best_weights():
    model = torch.nn.Linear(1, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    values = iter([3.0, 1.0, 2.0, 2.5, 2.7, 9.0])
    seen = []
    res = fit(model, opt, lambda e: [torch.zeros(1)], lambda b: model(b).sum() * 0,
              lambda: {"val_loss": next(values)}, epochs=6, patience=2,
              checkpoint=lambda m, info: seen.append(info["epoch"]), progress=False)
    assert res.stop_reason == "early-stopping" and res.best_epoch == 1 and res.epochs == 4
    assert seen == [0, 1]
    stopper = ValidationPatience(patience=1, mode="max")
    assert stopper.update(0.5, 0) and not stopper.update(0.4, 1) and stopper.should_stop
    assert math.isclose(stopper.best, 0.5)


def test_fit_rejects_nan_validation():
    model = torch.nn.Linear(1, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TrainingError, match="validation value"):
        fit(model, opt, lambda e: [torch.ones(1)], lambda b: model(b).sum(),
            lambda: {"val_loss": float("nan")}, epochs=2, progress=False)


def test_affine_schedule_reregisters_with_the_affine_model():
    # Paper 000's affine experiment: the "affine" schedule re-registers the training pairs
    # affinely (Eq. 12 with the transform model being trained for); other schedules rigidly,
    # unless the transform is given.
    assert DITRTrainConfig(schedule="affine").transform == "affine"
    assert DITRTrainConfig.small(schedule="affine").transform == "affine"
    assert DITRTrainConfig.full(schedule="affine").transform == "affine"
    assert DITRTrainConfig().transform == "rigid"
    assert DITRTrainConfig(schedule="edges").transform == "rigid"
    assert DITRTrainConfig(schedule=((2, 16.0), (1, 0.0))).transform == "rigid"
    assert DITRTrainConfig(schedule="affine", transform="rigid").transform == "rigid"
    assert DITRTrainConfig(schedule="affine").to_dict()["transform"] == "affine"


@pytest.mark.slow  # about 15 s (rigid) and 45 s (affine: Powell over 6 parameters) on 2 cores
@pytest.mark.parametrize("transform, orthogonal", [("affine", False), ("rigid", True)])
def test_reregistration_between_stages_uses_the_configured_transform(tmp_path, transform,
                                                                     orthogonal):
    # After one IML stage every training pair is re-registered (Eq. 12). With the affine
    # model the new transforms have scale/shear parts (A^T A != I); with the rigid one they
    # are rotations (A^T A = I).
    pairs = [TrainingPair(p.fixed, p.moving, p.fixed_mask, p.true_transform)
             for p, _ in _phantom_pairs(2, 3)]
    cfg = DITRTrainConfig(schedule=((2, 16.0), (2, 0.0)), transform=transform,
                          channels=(4, 4, 8, 8), patches_per_epoch=256, val_patches=128,
                          epochs=1, patience=0, batch_size=128, learning_rate=3e-3,
                          register_iterations=2, seed=0, progress=False, threads=1)
    res = train_ditr(pairs, cfg, output=tmp_path / "m.pt")
    _, extra = build_model(res.path, "ditr")
    assert extra["training"]["transform"] == transform
    for t in res.transforms:
        a = t.matrix().detach().double()
        gram = a.T @ a
        is_orthogonal = torch.allclose(gram, torch.eye(2, dtype=torch.float64), atol=1e-6)
        assert is_orthogonal == orthogonal, (transform, gram)

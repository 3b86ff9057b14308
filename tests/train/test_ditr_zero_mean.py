"""Zero-mean IML updates: the projection on known transforms, and that train_ditr applies it."""

import math

import pytest
import torch

from itreg.blocks.modelfile import build_model
from itreg.errors import ConfigError
from itreg.image import Image
from itreg.train.ditr import DITRTrainConfig, TrainingPair, remove_mean_update, train_ditr
from itreg.transforms import Affine, Rigid

D64 = torch.float64


def _rot2(theta):
    return torch.tensor([[math.cos(theta), -math.sin(theta)],
                         [math.sin(theta), math.cos(theta)]], dtype=D64)


def _skew3(w):
    x, y, z = w
    return torch.tensor([[0.0, -z, y], [z, 0.0, -x], [-y, x, 0.0]], dtype=D64)


def _parts(t, nd):
    if t is None:
        return torch.eye(nd, dtype=D64), torch.zeros(nd, dtype=D64)
    return t.matrix().detach().to(D64), t.offset().detach().to(D64)


def _compose_update(start, av, bv, nd):
    """``t o V`` as (matrix, offset) for ``V(x) = av x + bv``."""
    a0, b0 = _parts(start, nd)
    return a0 @ av, a0 @ bv + b0


def _about(c, d, a):
    """``V(x) = c + d + a (x - c)`` as (matrix, offset)."""
    return a, c + d - a @ c


def test_common_offset_and_rotation_are_removed_exactly_2d():
    starts = [Rigid(2, center=[1.0, 2.0], translation=[0.5, -1.0], angles=[0.1]), None,
              Affine.from_matrix([[1.1, 0.05], [0.0, 0.9]], [2.0, 3.0], dtype=D64)]
    centres = [torch.tensor([10.0, 20.0], dtype=D64), torch.tensor([-5.0, 3.0], dtype=D64),
               torch.tensor([0.0, 7.0], dtype=D64)]
    # Zero-sum pair-specific updates (translation at the centre, rotation angle) ...
    deltas = [torch.tensor(v, dtype=D64) for v in ([1.0, 0.5], [-0.3, 0.2], [-0.7, -0.7])]
    angles = [0.02, -0.05, 0.03]
    # ... plus a common drift of (+0.44, +0.15) mm and 0.01 rad on every pair.
    drift, drift_angle = torch.tensor([0.44, 0.15], dtype=D64), 0.01
    updated = []
    for t0, c, d, th in zip(starts, centres, deltas, angles):
        av, bv = _about(c, d + drift, _rot2(th + drift_angle))
        a, b = _compose_update(t0, av, bv, 2)
        updated.append(Affine.from_matrix(a, b, dtype=D64))
    out, removed = remove_mean_update(starts, updated, centres)
    assert torch.allclose(torch.tensor(removed["translation_mm"], dtype=D64), drift, atol=1e-9)
    assert math.isclose(removed["log_linear"][1][0], drift_angle, abs_tol=1e-9)
    for t0, c, d, th, t in zip(starts, centres, deltas, angles, out):
        a, b = _compose_update(t0, *_about(c, d, _rot2(th)), 2)
        assert torch.allclose(t.matrix().detach().to(D64), a, atol=1e-9)
        assert torch.allclose(t.offset().detach().to(D64), b, atol=1e-9)
    # Afterwards the mean update is the identity: zero mean translation at the centres and
    # zero mean angle; the difference between pairs is what it was.
    ds, ths = [], []
    for t0, c, t in zip(starts, centres, out):
        a0, b0 = _parts(t0, 2)
        a1, b1 = _parts(t, 2)
        av = torch.linalg.inv(a0) @ a1
        bv = torch.linalg.inv(a0) @ (b1 - b0)
        ds.append(av @ c + bv - c)
        ths.append(math.atan2(float(av[1, 0]), float(av[0, 0])))
    assert torch.stack(ds).mean(0).abs().max() < 1e-9 and abs(sum(ths)) < 1e-9
    assert torch.allclose(ds[0] - ds[1], deltas[0] - deltas[1], atol=1e-9)


def test_projection_keeps_rotations_in_3d():
    g = torch.Generator().manual_seed(3)
    n = 4
    skews = [_skew3((torch.rand(3, generator=g, dtype=D64) * 0.1 - 0.05).tolist())
             for _ in range(n)]
    mean_skew = sum(skews) / n
    skews = [s - mean_skew for s in skews]  # zero-sum pair-specific rotations
    common = _skew3([0.01, -0.02, 0.015])
    centres = [torch.rand(3, generator=g, dtype=D64) * 40 for _ in range(n)]
    deltas = [torch.rand(3, generator=g, dtype=D64) - 0.5 for _ in range(n)]
    deltas = [d - sum(deltas) / n for d in deltas]
    drift = torch.tensor([0.3, -0.2, 0.1], dtype=D64)
    starts = [Rigid(3, center=[0.0, 5.0, 1.0], translation=[1.0, 2.0, 3.0],
                    angles=[0.1, -0.05, 0.2], dtype=D64) for _ in range(n)]
    updated = []
    for t0, c, d, s in zip(starts, centres, deltas, skews):
        a, b = _compose_update(t0, *_about(c, d + drift, torch.linalg.matrix_exp(s + common)), 3)
        updated.append(Affine.from_matrix(a, b, dtype=D64))
    out, removed = remove_mean_update(starts, updated, centres)
    assert torch.allclose(torch.tensor(removed["log_linear"], dtype=D64), common, atol=1e-9)
    for t0, c, d, s, t in zip(starts, centres, deltas, skews, out):
        a, b = _compose_update(t0, *_about(c, d, torch.linalg.matrix_exp(s)), 3)
        m = t.matrix().detach().to(D64)
        assert torch.allclose(m, a, atol=1e-9)
        assert torch.allclose(t.offset().detach().to(D64), b, atol=1e-9)
        assert torch.allclose(m @ m.T, torch.eye(3, dtype=D64), atol=1e-9)  # still rigid


def test_projection_rejects_mismatched_inputs():
    with pytest.raises(ConfigError):
        remove_mean_update([None], [Rigid(2), Rigid(2)], [[0.0, 0.0]])


def _blob_pairs():
    yy, xx = torch.meshgrid(torch.arange(40.0), torch.arange(40.0), indexing="ij")
    pairs = []
    for k in range(3):
        r = (yy - 20 - k) ** 2 / 200 + (xx - 20) ** 2 / 150
        f = (r < 1).float() * (0.4 + 0.6 * (r < 0.4).float())
        f = f + 0.3 * (((yy - 15 - k) ** 2 + (xx - 25) ** 2) < 16).float()
        img = Image.from_tensor(f, spacing=(2.0, 2.0))
        pairs.append(TrainingPair(img, img, r < 1.2,
                                  Rigid(2, translation=[1.0 * k - 0.5, 0.7])))
    return pairs


def _train(zero_mean, path=None):
    cfg = DITRTrainConfig(schedule=((1, 4.0), (1, 0.0)), channels=(4, 4, 8, 8),
                          patches_per_epoch=512, val_patches=128, epochs=1, patience=0,
                          batch_size=128, learning_rate=3e-3, register_iterations=2,
                          min_patches=32, progress=False, threads=1,
                          zero_mean_updates=zero_mean)
    return train_ditr(_blob_pairs(), cfg, output=path)


def _updates(pairs, transforms):
    """Per pair: translation of ``t^-1 o T`` at the mask centroid and its rotation angle."""
    ds, ths = [], []
    for p, t in zip(pairs, transforms):
        c = p.fixed.grid.points()[p.mask].to(D64).mean(0)
        a0, b0 = _parts(p.init, 2)
        a1, b1 = _parts(t, 2)
        av = torch.linalg.inv(a0) @ a1
        bv = torch.linalg.inv(a0) @ (b1 - b0)
        ds.append(av @ c + bv - c)
        ths.append(math.atan2(float(av[1, 0]), float(av[0, 0])))
    return torch.stack(ds), torch.tensor(ths, dtype=D64)


def test_train_ditr_applies_zero_mean_updates(tmp_path):
    pairs = _blob_pairs()
    free = _train(False)
    zm = _train(True, tmp_path / "zm.pt")
    d_free, th_free = _updates(pairs, free.transforms)
    d_zm, th_zm = _updates(pairs, zm.transforms)
    # The same seed gives the same classifier and re-registration; the option only removes
    # the mean update, which the free run has (IML moved the pairs in a common direction).
    assert d_free.mean(0).norm() > 0.05
    assert d_zm.mean(0).abs().max() < 1e-3 and abs(float(th_zm.mean())) < 1e-5
    assert torch.allclose(d_zm, d_free - d_free.mean(0), atol=2e-3)
    assert torch.allclose(th_zm, th_free - th_free.mean(), atol=1e-5)
    removed = zm.stages[0]["removed_mean_update"]["translation_mm"]
    assert torch.allclose(torch.tensor(removed, dtype=D64), d_free.mean(0), atol=2e-3)
    assert "removed_mean_update" not in free.stages[0]
    _, extra = build_model(zm.path, "ditr")
    assert extra["training"]["zero_mean_updates"] is True

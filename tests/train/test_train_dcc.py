"""Training deep combined computing (paper 002, sec. 3.5): losses, supervision sets, data,
the alternating training loop and its model file."""

from __future__ import annotations

import pytest
import torch

from itreg.blocks.modelfile import build_model, load_model
from itreg.errors import ConfigError, OutputExistsError
from itreg.grid import Grid
from itreg.nets.dcc import DCCNet
from itreg.train.dcc import (
    DCCGroup,
    DCCLoss,
    DCCTrainConfig,
    PhantomGroupSource,
    labelled_mask,
    train_dcc,
)

#: Intensity of the classes (background, ring, core) in three contrasts.
TABLES = ((0.0, 1.0, 0.4), (1.0, 0.2, 0.7), (0.3, 0.6, 1.0))


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_group(index: int = 0, size: int = 20, shifts=((0, 0), (2, -1), (-1, 2))) -> DCCGroup:
    """Three contrasts of a ring around a core, each shifted by whole voxels, with noise."""
    grid = Grid((size, size), (2.0, 2.0), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0))
    g = torch.Generator().manual_seed(index)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    images, labels = [], []
    for j, (dx, dy) in enumerate(shifts):
        r2 = (xx - size / 2 - dx) ** 2 + (yy - size / 2 - dy) ** 2
        lab = torch.zeros(size, size, dtype=torch.long)
        lab[r2 < (size / 3) ** 2] = 1
        lab[r2 < (size / 6) ** 2] = 2
        img = torch.tensor(TABLES[j % 3])[lab] + 0.05 * torch.randn(size, size, generator=g)
        images.append(((img - img.mean()) / img.std())[None])
        labels.append(lab)
    n = len(shifts)
    return DCCGroup(torch.stack(images), torch.stack(labels), torch.arange(n) % 3, grid, index)


def _net(**kw) -> DCCNet:
    torch.manual_seed(0)
    base = {"ndim": 2, "domains": 3, "classes": 3, "channels": 4, "levels": 2, "dropout": 0.0,
            "momentum": 0.1, "field_scale": 2.0}
    base.update(kw)
    return DCCNet(**base)


def test_loss_falls_on_a_tiny_problem() -> None:
    groups = [tiny_group(0), tiny_group(1)]
    labelled = [torch.tensor([True, False, False])] * 2
    net = _net()
    loss = DCCLoss(levels=16, sample_rate=1.0, bending_weight=1.0)

    def value() -> float:
        with torch.no_grad():
            return float(loss(net, groups, labelled, generator=torch.Generator().manual_seed(0))[0])

    start = value()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(1)
    for _ in range(12):
        opt.zero_grad()
        total, terms = loss(net, groups, labelled, generator=gen)
        total.backward()
        opt.step()
    assert set(terms) == {"L1", "L2", "L3", "X", "BE"}
    end = value()
    assert end < start - 0.1, (start, end)


def test_phases_reach_only_their_branch() -> None:
    group = tiny_group(0)
    net = _net()
    loss = DCCLoss(levels=16, sample_rate=1.0)
    for phase, grads, none in (("seg", net.segmentation_parameters,
                                net.registration_parameters),
                               ("reg", net.registration_parameters,
                                net.segmentation_parameters)):
        net.zero_grad(set_to_none=True)
        total, _ = loss(net, [group], [torch.tensor([True, False, False])], phase=phase,
                        generator=torch.Generator().manual_seed(0))
        total.backward()
        assert any(p.grad is not None and float(p.grad.abs().sum()) > 0 for p in grads())
        assert all(p.grad is None for p in none())


def test_weak_supervision_reads_only_the_chosen_labels() -> None:
    group = tiny_group(0)
    net = _net()
    loss = DCCLoss(levels=16, sample_rate=0.5)
    chosen = [torch.tensor([False, True, False])]

    def value(g: DCCGroup) -> float:
        with torch.no_grad():
            return float(loss(net, [g], chosen, generator=torch.Generator().manual_seed(3))[0])

    base = value(group)
    garbage = group.labels.clone()
    garbage[0] = 2 - garbage[0]
    garbage[2] = torch.randint(0, 3, garbage[2].shape, generator=torch.Generator().manual_seed(0))
    same = DCCGroup(group.images, garbage, group.domains, group.grid)
    assert value(same) == base
    changed = group.labels.clone()
    changed[1] = 2 - changed[1]
    assert value(DCCGroup(group.images, changed, group.domains, group.grid)) != base
    # Unsupervised groups need no labels at all.
    no_labels = DCCGroup(group.images, None, group.domains, group.grid)
    assert torch.isfinite(loss(net, [no_labels], [torch.zeros(3, dtype=torch.bool)])[0])
    with pytest.raises(ConfigError):
        loss(net, [no_labels], chosen)


def test_labelled_mask_strategies() -> None:
    assert labelled_mask("unsupervised", 4).tolist() == [False] * 4
    assert labelled_mask("all", 3).tolist() == [True] * 3
    assert labelled_mask("weak", 3, (0, 2)).tolist() == [True, False, True]
    picks = [labelled_mask("weak", 6, label_fraction=0.5, group_index=i, seed=1)
             for i in range(5)]
    assert all(int(p.sum()) == 3 for p in picks)
    assert len({tuple(p.tolist()) for p in picks}) > 1  # chosen per group
    again = labelled_mask("weak", 6, label_fraction=0.5, group_index=2, seed=1)
    assert torch.equal(again, picks[2])
    with pytest.raises(ConfigError):
        labelled_mask("weak", 3, (3,))
    with pytest.raises(ConfigError):
        labelled_mask("semi", 3)


def test_phantom_source_is_deterministic_per_index() -> None:
    src = PhantomGroupSource(spacing_mm=6.0, slice_offsets=(-1, 1), seed=4)
    a, b, c = src[0], src[0], src[1]
    assert a.images.shape[:2] == (3, 1) and a.labels.shape == (3, *a.grid.shape)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, c.images)
    assert a.domains.tolist() == [0, 1, 2]
    assert set(torch.unique(a.labels).tolist()) == {0, 1, 2, 3}


def test_train_dcc_writes_a_model_that_reloads(tmp_path) -> None:
    train = [tiny_group(i) for i in range(3)]
    val = [tiny_group(10)]
    cfg = DCCTrainConfig.small(classes=3, channels=4, net_levels=2, epochs=2, steps_per_epoch=3,
                               batch_size=2, alternate_every=1, levels=16, progress=False,
                               momentum=0.1)
    out = tmp_path / "dcc.pt"
    result = train_dcc(train, val, cfg, output=out, domain_names=["a", "b", "c"])
    assert result.train.epochs >= 1 and result.train.steps >= 3
    assert {"reg_dice", "seg_dice", "posterior_dice"} <= set(result.after)
    model, extra = build_model(out, expected_kind="dcc")
    assert extra["inference"]["priors"] == [0] and extra["inference"]["zeta"] == 0.01
    x = val[0].images[None]
    a = model(x, val[0].domains)
    b = result.model(x, val[0].domains)
    assert torch.equal(a.field, b.field)
    assert load_model(out)[1]["domain_names"] == ["a", "b", "c"]
    with pytest.raises(OutputExistsError):
        train_dcc(train, val, cfg, output=out, resume=False)


def test_interrupted_dcc_training_resumes_to_the_same_weights(tmp_path) -> None:
    """Two epochs, or one epoch and a resumed second, give bit-identical networks."""
    train = [tiny_group(i) for i in range(3)]
    val = [tiny_group(10)]
    kw = {"classes": 3, "channels": 4, "net_levels": 2, "steps_per_epoch": 3, "batch_size": 2,
          "alternate_every": 2, "levels": 16, "progress": False, "momentum": 0.1,
          "patience": 0}
    whole = train_dcc(train, val, DCCTrainConfig.small(epochs=2, **kw), output=tmp_path / "a.pt")
    out = tmp_path / "b.pt"
    first = train_dcc(train, val, DCCTrainConfig.small(epochs=1, **kw), output=out)
    assert first.train.epochs == 1 and (tmp_path / "b.pt.ckpt").is_file()
    resumed = train_dcc(train, val, DCCTrainConfig.small(epochs=2, **kw), output=out)
    assert resumed.train.epochs == 2 and resumed.train.steps == whole.train.steps == 6
    assert resumed.before == whole.before
    assert [h["reg_dice"] for h in resumed.train.history] == \
        [h["reg_dice"] for h in whole.train.history]
    a, b = whole.model.state_dict(), resumed.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # Other settings are refused; resume=False starts afresh.
    with pytest.raises(ConfigError, match="other settings"):
        train_dcc(train, val, DCCTrainConfig.small(epochs=3, **{**kw, "levels": 8}), output=out)
    fresh = train_dcc(train, val, DCCTrainConfig.small(epochs=1, **kw), output=out, force=True,
                      resume=False)
    assert fresh.train.epochs == 1


def _authors_bending_energy(flow_px: torch.Tensor) -> torch.Tensor:
    """The release's ``BendingEnergy`` (2D): flow ``(D, Y, X)`` in pixels, central differences
    of central differences, mean over components and interior pixels (transcribed from
    xzluo97/X-metric ``core/register/LocalDisplacementEnergy.py``)."""
    def dx(f):
        return (f[..., 2:, 1:-1] - f[..., :-2, 1:-1]) / 2

    def dy(f):
        return (f[..., 1:-1, 2:] - f[..., 1:-1, :-2]) / 2

    fx, fy = dx(flow_px), dy(flow_px)
    return torch.mean(dx(fx) ** 2 + dy(fy) ** 2 + 2 * dy(fx) ** 2)


@pytest.mark.parametrize("spacing", [1.0, 4.0])
def test_paper_bending_weight_converts_the_pixel_energy_to_world_mm(spacing) -> None:
    # A quadratic field (exact under both finite-difference schemes), in world mm on a grid of
    # `spacing` mm: lambda_px * BE_px(d / s) == bending_weight_from_pixels(lambda_px) * BE_mm(d).
    from itreg.grid import Grid
    from itreg.regularisers import bending_energy
    from itreg.train.dcc import PAPER_BENDING_WEIGHT, bending_weight_from_pixels

    grid = Grid((24, 20), spacing=(spacing, spacing))
    pts = grid.points().to(torch.float64)  # (Y, X, 2) world (x, y)
    x, y = pts[..., 0], pts[..., 1]
    disp = torch.stack([0.01 * x * x + 0.003 * x * y, -0.02 * y * y + 0.004 * x * x])
    ours = float(bending_energy(disp, grid))
    theirs = float(_authors_bending_energy(disp / spacing))
    lam = bending_weight_from_pixels(PAPER_BENDING_WEIGHT, spacing, 2)
    assert lam == pytest.approx(100.0 * spacing ** 2 / 2)
    assert lam * ours == pytest.approx(PAPER_BENDING_WEIGHT * theirs, rel=1e-6)
    with pytest.raises(ConfigError):
        bending_weight_from_pixels(100.0, 0.0, 2)


def test_default_bending_weight_is_the_papers_lambda_on_the_training_grid() -> None:
    # None (the default): paper 002's lambda = 100 per pixel, i.e. 100 s^2 / D in world mm.
    from itreg.train.dcc import DCCLoss, DCCTrainConfig

    assert DCCTrainConfig().bending_weight is None
    assert DCCTrainConfig.small().loss().weight_for(Grid((30, 40), spacing=(4.0, 4.0))) \
        == pytest.approx(800.0)
    assert DCCLoss().weight_for(Grid((8, 8, 8), spacing=(2.0, 2.0, 2.0))) \
        == pytest.approx(100.0 * 4.0 / 3.0)
    assert DCCLoss(bending_weight=10.0).weight_for(Grid((30, 40), spacing=(4.0, 4.0))) == 10.0

"""Deep-combined-computing network (paper 002, sec. 3.5): identity at initialisation, order
invariance of the moment fusion, domain-specific batch norm, model files, inference pieces."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from itreg.blocks.modelfile import build_model, save_model
from itreg.errors import ConfigError
from itreg.grid import Grid
from itreg.nets.dcc import (
    DCCNet,
    DomainBatchNorm,
    clip_probabilities,
    common_anatomy,
    distance_probabilities,
    warp_group,
    world_displacements,
)


def _net(**kw) -> DCCNet:
    torch.manual_seed(0)
    base = {"ndim": 2, "domains": 3, "classes": 3, "channels": 4, "levels": 3, "dropout": 0.0}
    base.update(kw)
    return DCCNet(**base)


def _perturb_heads(net: DCCNet) -> None:
    with torch.no_grad():
        for head in net.flow_heads:
            head.weight.normal_(0.0, 0.5)
            head.bias.normal_(0.0, 0.5)


def test_identity_at_initialisation() -> None:
    net = _net()
    x = torch.randn(2, 3, 1, 13, 10)
    out = net(x, [0, 1, 2])
    assert out.logits.shape == (2, 3, 3, 13, 10)
    assert out.field.shape == (2, 3, 2, 13, 10)
    assert torch.equal(out.field, torch.zeros_like(out.field))
    grid = Grid((10, 13), (2.0, 2.0), (0.0, 0.0), (-1.0, 0.0, 0.0, -1.0))
    disp = world_displacements(out.field[0], grid)
    warped, inside = warp_group(x[0], disp, grid)
    assert bool(inside.all())
    torch.testing.assert_close(warped, x[0], atol=1e-5, rtol=0)


def test_permuting_the_group_permutes_the_outputs() -> None:
    net = _net()
    _perturb_heads(net)
    # Fill the running statistics, then compare in eval mode (no batch statistics).
    net.train()
    with torch.no_grad():
        for _ in range(3):
            net(torch.randn(2, 3, 1, 12, 12), [0, 1, 2])
    net.eval()
    x = torch.randn(1, 3, 1, 12, 12)
    doms = torch.tensor([0, 1, 2])
    perm = torch.tensor([2, 0, 1])
    a = net(x, doms)
    b = net(x[:, perm], doms[perm])
    assert a.field.abs().max() > 1e-3  # the heads are not zero
    torch.testing.assert_close(b.field, a.field[:, perm], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(b.logits, a.logits[:, perm], atol=1e-5, rtol=1e-4)
    # Eq. 37: the group mean of the fields is zero.
    assert a.field.mean(dim=1).abs().max() < 1e-5


def test_any_group_size() -> None:
    net = _net()
    net.eval()
    for n in (2, 5):
        out = net(torch.randn(1, n, 1, 8, 8), [j % 3 for j in range(n)])
        assert out.field.shape == (1, n, 2, 8, 8)
    with pytest.raises(ConfigError):
        net(torch.randn(1, 1, 1, 8, 8), [0])
    with pytest.raises(ConfigError):
        net(torch.randn(1, 2, 1, 8, 8), [0, 3])


def test_domain_batch_norm_uses_separate_statistics() -> None:
    torch.manual_seed(1)
    dbn = DomainBatchNorm(2, 2, domains=2, momentum=1.0)
    x = torch.randn(6, 2, 5, 5)
    x[1::2] = x[1::2] * 50.0 + 100.0  # domain 1: another intensity scale
    domain = torch.tensor([0, 1, 0, 1, 0, 1])
    out = dbn(x, domain)
    for d in (0, 1):
        ref = nn.BatchNorm2d(2, momentum=1.0)
        ref.train()
        sel = domain == d
        torch.testing.assert_close(out[sel], ref(x[sel]))
        # With momentum 1 the running mean is the last batch mean of that domain only.
        torch.testing.assert_close(dbn.norms[d].running_mean, x[sel].mean(dim=(0, 2, 3)))
    # One shared BN would mix the domains: the domain-0 outputs would differ.
    shared = nn.BatchNorm2d(2)(x)
    assert not torch.allclose(shared[domain == 0], out[domain == 0], atol=1e-2)


def test_saved_model_reloads_and_predicts_identically(tmp_path) -> None:
    net = _net(flow="svf", domain_names=["t1", "t2", "pd"], spacing_mm=3.0)
    _perturb_heads(net)
    net.eval()
    path = save_model(tmp_path / "dcc.pt", "dcc", net.config(), net.state_dict())
    loaded, _ = build_model(path, expected_kind="dcc")
    assert isinstance(loaded, DCCNet) and loaded.config() == net.config()
    x = torch.randn(1, 3, 1, 9, 11)
    a, b = net(x, [0, 1, 2]), loaded(x, [0, 1, 2])
    assert torch.equal(a.field, b.field) and torch.equal(a.logits, b.logits)


def test_world_displacements_direction_and_svf() -> None:
    grid = Grid((6, 5), (2.0, 3.0), (1.0, -2.0), (0.0, -1.0, 1.0, 0.0))  # rotated 90 degrees
    field = torch.zeros(2, 5, 6)
    field[0] = 1.5  # 1.5 mm along the grid's first (x) index axis
    disp = world_displacements(field, grid)
    expect = torch.tensor(grid.direction_matrix(), dtype=torch.float32) @ torch.tensor([1.5, 0.0])
    torch.testing.assert_close(disp[:, 2, 3], expect)
    # A constant velocity integrates to the translation by that velocity.
    svf = world_displacements(field, grid, flow="svf", steps=5)
    torch.testing.assert_close(svf, disp, atol=1e-5, rtol=0)


def test_warp_group_moves_by_the_displacement_and_gradcheck() -> None:
    grid = Grid((7, 6), (1.0, 1.0), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0))
    pts = grid.points(dtype=torch.float64)
    ramp = (2.0 * pts[..., 0] + 0.5 * pts[..., 1])[None, None]  # (1, 1, 6, 7) linear image
    disp = torch.zeros(1, 2, 6, 7, dtype=torch.float64)
    disp[0, 0] = 1.0  # x + 1 mm
    warped, inside = warp_group(ramp, disp, grid)
    sel = inside[0]
    torch.testing.assert_close(warped[0, 0][sel], (ramp[0, 0] + 2.0)[sel])
    assert not bool(inside[0, :, -1].any())  # the last column maps outside

    small = Grid((4, 3), (1.0, 1.0), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0))
    img = torch.rand(1, 1, 3, 4, dtype=torch.float64)
    d0 = (0.3 * torch.rand(1, 2, 3, 4, dtype=torch.float64)).requires_grad_()
    assert torch.autograd.gradcheck(lambda d: warp_group(img, d, small)[0], (d0,))


def test_distance_probabilities_closed_form() -> None:
    grid = Grid((8, 4), (2.0, 1.0), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0))
    labels = torch.zeros(4, 8, dtype=torch.long)
    labels[:, 4:] = 1  # label 1 on the right half
    rho = distance_probabilities(labels, grid, classes=3, tau=0.5)
    assert rho.shape == (3, 4, 8)
    torch.testing.assert_close(rho.sum(dim=0), torch.ones(4, 8))
    assert torch.equal(rho[:2].argmax(dim=0), labels)
    # Column 3 (label 0) is 2 mm from label 1 and touches it: D_0 = 2, D_1 = -2 -> with
    # tau = 0.5 and the absent class at -100: rho_0 / rho_1 = exp(0.5 * 4).
    ratio = rho[0, 0, 3] / rho[1, 0, 3]
    assert math.isclose(float(ratio), math.exp(2.0), rel_tol=1e-4)
    clipped = clip_probabilities(rho, 0.05)
    assert float(clipped.min()) >= 0.05 / (1 + 0.05 * 3) - 1e-6
    torch.testing.assert_close(clipped.sum(dim=0), torch.ones(4, 8))


def test_common_anatomy_recovers_two_classes() -> None:
    g = torch.Generator().manual_seed(0)
    truth = (torch.rand(400, generator=g) > 0.5).long()
    a = torch.where(truth == 1, 3.0, 0.0) + 0.1 * torch.randn(400, generator=g)
    b = torch.where(truth == 1, -2.0, 1.0) + 0.1 * torch.randn(400, generator=g)  # inverted
    onehot = torch.nn.functional.one_hot(truth, 2).T.float()
    noisy = clip_probabilities(0.7 * onehot + 0.3 * onehot.flip(0), 0.05)  # a weak guess
    gamma, pi = common_anatomy([a, b], [noisy, noisy], torch.stack([a, b]),
                               torch.ones(400, dtype=torch.bool), levels=16,
                               sample_rate=1.0, generator=g)
    assert torch.equal(gamma.argmax(dim=1), truth)
    torch.testing.assert_close(pi, truth.bincount().float() / 400, atol=0.02, rtol=0)


def test_three_dimensional_groups_share_the_code_path() -> None:
    net = _net(ndim=3, levels=2)
    _perturb_heads(net)
    net.eval()
    x = torch.randn(1, 3, 1, 5, 7, 6)
    out = net(x, [0, 1, 2])
    assert out.logits.shape == (1, 3, 3, 5, 7, 6) and out.field.shape == (1, 3, 3, 5, 7, 6)
    perm = torch.tensor([1, 2, 0])
    again = net(x[:, perm], torch.tensor([0, 1, 2])[perm])
    torch.testing.assert_close(again.field, out.field[:, perm], atol=1e-5, rtol=1e-4)
    grid = Grid((6, 7, 5), (2.0, 2.0, 3.0), (0.0, 0.0, 0.0), (1, 0, 0, 0, 1, 0, 0, 0, 1))
    disp = world_displacements(out.field[0], grid)
    warped, inside = warp_group(x[0], disp, grid)
    assert warped.shape == (3, 1, 5, 7, 6) and inside.shape == (3, 5, 7, 6)

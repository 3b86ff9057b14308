"""MIND-SSC: a brute-force reference, hand-computed ramps, contrast invariance, gradcheck, the
per-level fixed descriptor, and the command line."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from itreg.errors import ConfigError
from itreg.metrics import MINDSSC, get_metric, mind_ssc
from itreg.metrics.mind import mind_ssc_pairs

pytestmark = pytest.mark.usefixtures("one_thread")


def _ramp(shape, axis, dtype=torch.float64) -> torch.Tensor:
    idx = torch.meshgrid(*[torch.arange(n, dtype=dtype) for n in shape], indexing="ij")
    return idx[axis].unsqueeze(0).clone()


def _brute_force(image: np.ndarray, dilation: int, radius: int, sigma: float) -> np.ndarray:
    """MIND-SSC from the paper's definition, voxel by voxel (no clamp of the variance, which
    is inactive on random images): borders by clamping indices."""
    shape = image.shape
    ndim = len(shape)
    pairs = mind_ssc_pairs(ndim)
    offsets = list(itertools.product(range(-radius, radius + 1), repeat=ndim))
    weights = np.array([math.exp(-0.5 * sum(p * p for p in off) / sigma ** 2)
                        for off in offsets])
    weights /= weights.sum()

    def at(pos):
        return image[tuple(min(max(q, 0), n - 1) for q, n in zip(pos, shape))]

    out = np.zeros((len(pairs), *shape))
    for x in itertools.product(*[range(n) for n in shape]):
        dist = []
        for a, b in pairs:
            total = 0.0
            for w, p in zip(weights, offsets):
                ia = at([xi + dilation * ai + pi for xi, ai, pi in zip(x, a, p)])
                ib = at([xi + dilation * bi + pi for xi, bi, pi in zip(x, b, p)])
                total += w * (ia - ib) ** 2
            dist.append(total)
        dist = np.array(dist)
        dist -= dist.min()
        var = dist.mean()
        out[(slice(None), *x)] = np.exp(-dist / var)
    return out


def test_pairs_are_the_six_neighbourhood_ssc():
    pairs = mind_ssc_pairs(3)
    assert len(pairs) == 12 and len(mind_ssc_pairs(2)) == 4
    for a, b in pairs:
        assert sum(abs(v) for v in a) == 1 and sum(abs(v) for v in b) == 1
        assert sum((x - y) ** 2 for x, y in zip(a, b)) == 2  # sqrt(2) apart: not opposite
    assert len({frozenset(p) for p in pairs}) == 12


@pytest.mark.parametrize("shape,dilation,radius,sigma", [((9, 10), 2, 1, 0.8),
                                                         ((6, 7, 8), 1, 1, 1.0)])
def test_matches_a_brute_force_reference_away_from_borders(shape, dilation, radius, sigma):
    g = torch.Generator().manual_seed(0)
    image = torch.rand((1, *shape), generator=g, dtype=torch.float64)
    ours = mind_ssc(image, dilation, radius, sigma).numpy()
    ref = _brute_force(image[0].numpy(), dilation, radius, sigma)
    m = radius  # away from the borders the two border extensions agree
    inner = (slice(None), *[slice(m, n - m) for n in shape])
    np.testing.assert_allclose(ours[inner], ref[inner], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dilation", [1, 2])
def test_ramps_give_the_hand_computed_values(dilation):
    shape = (14, 15, 16)
    radius = 1
    margin = 2 * dilation + radius
    inner = (slice(None), *[slice(margin, n - margin) for n in shape])
    x_ramp = _ramp(shape, 2)
    desc = mind_ssc(x_ramp, dilation, radius, 0.8)
    # A pair with a neighbour along x has patch distance d^2, the others 0; their mean is
    # 8 d^2 / 12, so the 8 x-pairs give exp(-1.5) and the 4 others 1, at every inner voxel.
    for k, (a, b) in enumerate(mind_ssc_pairs(3)):
        expected = math.exp(-1.5) if a[2] or b[2] else 1.0
        assert torch.allclose(desc[k][inner[1:]], torch.tensor(expected, dtype=torch.float64))
    # x-ramp against y-ramp: 8 of the 12 channels differ by 1 - exp(-1.5).
    metric = get_metric("mind-ssc", dilation=dilation, radius=radius, sigma=0.8)
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[inner[1:]] = True
    value = float(metric(x_ramp, _ramp(shape, 1), mask=mask))
    assert value == pytest.approx(8 / 12 * (1 - math.exp(-1.5)) ** 2, rel=1e-12)
    l1 = get_metric("mind-ssc", dilation=dilation, radius=radius, sigma=0.8, distance="l1")
    assert float(l1(x_ramp, _ramp(shape, 1), mask=mask)) == \
        pytest.approx(8 / 12 * (1 - math.exp(-1.5)), rel=1e-12)
    # In 2D every pair has one neighbour along x: all distances equal, all channels 1.
    desc2 = mind_ssc(_ramp((12, 13), 1), dilation, radius, 0.8)
    assert torch.allclose(desc2[:, margin:-margin, margin:-margin],
                          torch.ones_like(desc2[:, margin:-margin, margin:-margin]))


@pytest.mark.parametrize("shape", [(24, 26), (12, 13, 14)])
def test_contrast_inversion_and_remaps_leave_the_descriptor_unchanged(shape):
    g = torch.Generator().manual_seed(1)
    smooth = torch.rand((1, *shape), generator=g, dtype=torch.float64)
    metric = get_metric("mind-ssc")
    # Any affine remap (contrast inversion included) of any image.
    inverted = 4.0 - 3.0 * smooth
    assert torch.allclose(mind_ssc(smooth), mind_ssc(inverted), atol=1e-12)
    assert float(metric(smooth, inverted)) < 1e-20
    # Any (nonlinear, non-monotone) remap of a two-level image, e.g. tissue labels.
    labels = (smooth > 0.5).to(torch.float64) * 0.7 + 0.2
    remapped = torch.where(labels > 0.5, torch.tensor(0.05, dtype=torch.float64),
                           torch.exp(labels * 3.0))
    assert torch.allclose(mind_ssc(labels), mind_ssc(remapped), atol=1e-12)
    assert float(metric(labels, remapped)) < 1e-20
    # ... but not a shifted copy.
    assert float(metric(labels, torch.roll(remapped, 1, dims=1))) > 1e-3


@pytest.mark.parametrize("shape", [(5, 6), (4, 4, 5)])
def test_gradcheck_float64(shape):
    g = torch.Generator().manual_seed(2)
    f = torch.rand((1, *shape), generator=g, dtype=torch.float64)
    m = torch.rand((1, *shape), generator=g, dtype=torch.float64).requires_grad_(True)
    w = torch.rand(shape, generator=g, dtype=torch.float64)
    for distance in ("ssd", "l1"):
        metric = get_metric("mind-ssc", dilation=1, radius=1, sigma=0.7, distance=distance)
        assert torch.autograd.gradcheck(lambda x, metric=metric: metric(f, x, mask=w), (m,),
                                        fast_mode=True)
    # Gradients through the fixed image too (no caching then).
    fg = f.clone().requires_grad_(True)
    metric = get_metric("mind-ssc", dilation=1, radius=1)
    assert torch.autograd.gradcheck(lambda x: metric(x, m.detach()), (fg,), fast_mode=True)


def test_fixed_descriptor_is_computed_once_per_fixed_tensor(monkeypatch):
    g = torch.Generator().manual_seed(3)
    f = torch.rand(1, 10, 11, 12, generator=g)
    m = torch.rand(1, 10, 11, 12, generator=g)
    metric = MINDSSC()
    calls = []
    original = metric.descriptor
    monkeypatch.setattr(metric, "descriptor", lambda x: calls.append(x) or original(x))
    first = float(metric(f, m))
    assert float(metric(f, m)) == first and float(metric(f, m * 2.0)) == pytest.approx(first)
    assert sum(c is f for c in calls) == 1 and len(calls) == 4
    f.mul_(0.5).add_(torch.rand(f.shape, generator=g))  # changed in place: recomputed
    assert float(metric(f, m)) != first
    assert sum(c is f for c in calls) == 2
    other = f.clone()
    metric(other, m)
    assert any(c is other for c in calls)


def test_invalid_settings_raise():
    for kwargs in ({"dilation": 0}, {"radius": -1}, {"radius": 1.5}, {"sigma": 0},
                   {"distance": "cosine"}, {"dilation": True}):
        with pytest.raises(ConfigError):
            get_metric("mind-ssc", **kwargs)


def test_command_line_registers_with_mind_ssc(cli, tmp_path):
    import json

    from itreg import io
    from itreg.grid import Grid
    from itreg.image import Image

    shape = (40, 44)
    idx = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in shape],
                                     indexing="ij"), -1)
    base = torch.zeros(shape)
    for centre, r, a in (((14, 15), 7.0, 1.0), ((26, 28), 9.0, 0.6), ((12, 30), 5.0, 0.8)):
        base += a * torch.sigmoid((r - (idx - torch.tensor(centre)).norm(dim=-1)) / 1.0)
    grid = Grid(shape[::-1], (1.0, 1.0), (0.0, 0.0))  # ITK order (x, y)
    fixed = Image(torch.roll(base, (1, 2), dims=(0, 1)).unsqueeze(0), grid)
    moving = Image((2.0 - base).unsqueeze(0), grid)  # inverted contrast
    io.write_image(fixed, tmp_path / "f.nii.gz")
    io.write_image(moving, tmp_path / "m.nii.gz")
    code, _, err = cli(["register", str(tmp_path / "f.nii.gz"), str(tmp_path / "m.nii.gz"),
                        "-t", "translation", "--metric", "mind-ssc", "-o", str(tmp_path / "o"),
                        "-q", "--set", "iterations=60"])
    assert code == 0, err
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert "mind-ssc" in json.dumps(report)
    tfm = io.read_transform(tmp_path / "o" / "transform.tfm")
    point = torch.tensor([[20.0, 20.0]], dtype=torch.float64)
    # fixed[y, x] = base[y - 1, x - 2]: T(x, y) = (x - 2, y - 1).
    moved = tfm.to(torch.float64)(point) - point
    assert torch.allclose(moved[0], torch.tensor([-2.0, -1.0], dtype=torch.float64), atol=0.2)

"""NGF: closed forms on ramps, remap invariance, the noise-based edge parameter, gradcheck,
masks, and a registration through the front door."""

from __future__ import annotations

import math

import pytest
import torch

from itreg.errors import ConfigError
from itreg.metrics import get_metric, ngf, ngf_epsilon, noise_sigma
from itreg.metrics.ngf import EPS_FLOOR_REL

pytestmark = pytest.mark.usefixtures("one_thread")


def _ramp(shape, direction, dtype=torch.float64) -> torch.Tensor:
    """``sum_a direction[a] * index_a`` on a grid of `shape` (tensor axis order), (1, *S)."""
    idx = torch.meshgrid(*[torch.arange(n, dtype=dtype) for n in shape], indexing="ij")
    return sum(c * i for c, i in zip(direction, idx)).unsqueeze(0)


def _blobs(shape, seed=0, dtype=torch.float64) -> torch.Tensor:
    """Soft disks / balls of random centres, radii and heights (smooth, edges ~1 voxel)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=dtype) for n in shape],
                                     indexing="ij"), -1)
    size = torch.tensor(shape, dtype=dtype)
    out = torch.zeros(shape, dtype=dtype)
    for _ in range(6):
        mu = size * (0.25 + 0.5 * torch.rand(len(shape), generator=g, dtype=dtype))
        r = float(size.min()) * (0.1 + 0.15 * float(torch.rand(1, generator=g)))
        a = 0.4 + float(torch.rand(1, generator=g))
        out += a * torch.sigmoid((r - (idx - mu).norm(dim=-1)) / 1.0)
    return out.unsqueeze(0)


@pytest.mark.parametrize("shape", [(9, 11), (7, 8, 9)])
def test_ramps_give_the_hand_computed_values(shape):
    d = len(shape)
    along = [0.0] * d
    along[-1] = 1.0
    f = _ramp(shape, along)
    # Against itself with eps = |grad| = 1: n = 1/sqrt(2), cos^2 = (1/2)^2.
    assert float(ngf(f, f, eps_fixed=1.0, eps_moving=1.0)) == pytest.approx(0.25, abs=1e-12)
    # Inverted and doubled, eps doubled too: n = -1/sqrt(2): the same value.
    m = 5.0 - 2.0 * f
    assert float(ngf(f, m, eps_fixed=1.0, eps_moving=2.0)) == pytest.approx(0.25, abs=1e-12)
    # A ramp along another axis: orthogonal gradients.
    other = [0.0] * d
    other[0] = 1.0
    assert float(ngf(f, _ramp(shape, other), eps_fixed=1e-9, eps_moving=1e-9)) == \
        pytest.approx(0.0, abs=1e-12)
    # The diagonal ramp: cos^2 = 1/2; and the module's loss is its negative.
    diag = [1.0] * 2 + [0.0] * (d - 2)
    diag = diag[::-1]
    value = ngf(f, _ramp(shape, diag), eps_fixed=1e-9, eps_moving=1e-9)
    assert float(value) == pytest.approx(0.5, abs=1e-9)
    metric = get_metric("ngf", eps=1e-9)
    loss = metric(f, _ramp(shape, diag))
    assert float(loss) == pytest.approx(-0.5, abs=1e-9)
    assert float(metric.quantity(loss)) == pytest.approx(0.5, abs=1e-9)


@pytest.mark.parametrize("shape", [(40, 44), (20, 22, 24)])
def test_monotone_and_inverted_remaps_are_optimal_at_identity(shape):
    base = _blobs(shape)
    metric = get_metric("ngf", eps=1e-4)
    # Where the image has edges (elsewhere both normalised gradients vanish: cos^2 = 0).
    grad = torch.stack(torch.gradient(base[0]), 0).norm(dim=0)
    edges = grad > 1e-2
    for remapped in (torch.exp(2.0 * base), 3.0 - base ** 2 - base):  # increasing, decreasing
        at_identity = float(metric(base, remapped, mask=edges))
        assert at_identity < -0.98  # every gradient parallel or antiparallel
        for axis in range(1, len(shape) + 1):
            for shift in (1, 2):
                shifted = torch.roll(remapped, shift, dims=axis)
                assert float(metric(base, shifted, mask=edges)) > at_identity + 0.01


@pytest.mark.parametrize("shape", [(64, 64), (20, 24, 28)])
def test_noise_sigma_recovers_white_noise(shape):
    g = torch.Generator().manual_seed(3)
    clean = 2.0 * _blobs(shape)
    assert noise_sigma(clean) < 0.002  # the noise-free image: almost 0
    for sigma in (0.02, 0.1):
        noisy = clean + sigma * torch.randn(clean.shape, generator=g, dtype=clean.dtype)
        # Edges add to the median at low noise (upward bias), hence the looser bound there.
        assert noise_sigma(noisy) == pytest.approx(sigma, rel=0.3 if sigma < 0.05 else 0.05)
        d = len(shape)
        values = noisy.reshape(-1)
        q = torch.quantile(values, torch.tensor([0.005, 0.995], dtype=values.dtype))
        expected = max(1.5 * noise_sigma(noisy) * math.sqrt(d / 2),
                       EPS_FLOOR_REL * float(q[1] - q[0]))
        assert ngf_epsilon(noisy, eta=1.5) == pytest.approx(expected, rel=1e-12)
        if sigma == 0.1:  # well above the floor: eps is the gradient noise level
            assert expected > 2 * EPS_FLOOR_REL * float(q[1] - q[0])


def test_noise_free_image_gets_the_range_floor():
    f = _ramp((16, 16, 16), (0.5, 1.0, 2.0))  # linear: the mixed difference is exactly 0
    assert noise_sigma(f) == pytest.approx(0.0, abs=1e-12)
    values = f.reshape(-1)
    q = torch.quantile(values, torch.tensor([0.005, 0.995], dtype=values.dtype))
    assert ngf_epsilon(f) == pytest.approx(EPS_FLOOR_REL * float(q[1] - q[0]), rel=1e-9)


def test_engine_range_hook_carries_eps():
    g = torch.Generator().manual_seed(0)
    f = _blobs((30, 30)) + 0.05 * torch.randn(1, 30, 30, generator=g, dtype=torch.float64)
    metric = get_metric("ngf", eta=2.0)
    lo, eps = metric.intensity_range(f)
    assert lo == 0.0 and eps == pytest.approx(ngf_epsilon(f, eta=2.0))
    m = torch.roll(f, 1, dims=2)
    # The per-level eps passed as the range is what the metric uses.
    assert float(metric(f, m, fixed_range=(0.0, 0.3), moving_range=(0.0, 0.2))) == \
        pytest.approx(-float(ngf(f, m, eps_fixed=0.3, eps_moving=0.2)), abs=1e-12)
    # The default eta (0.5, measured: see itreg.metrics.ngf).
    assert get_metric("ngf").intensity_range(f)[1] == pytest.approx(ngf_epsilon(f, eta=0.5))
    fixed = get_metric("ngf", eps=0.25)
    assert fixed.intensity_range(f) == (0.0, 0.25)
    assert fixed.config()["eps"] == 0.25 and metric.config()["eps"] == "noise"


@pytest.mark.parametrize("shape", [(6, 7), (4, 5, 6)])
def test_gradcheck_float64(shape):
    g = torch.Generator().manual_seed(1)
    f = torch.rand((1, *shape), generator=g, dtype=torch.float64)
    m = torch.rand((1, *shape), generator=g, dtype=torch.float64).requires_grad_(True)
    w = torch.rand(shape, generator=g, dtype=torch.float64)
    metric = get_metric("ngf")
    assert torch.autograd.gradcheck(
        lambda x: metric(f, x, mask=w, fixed_range=(0.0, 0.2), moving_range=(0.0, 0.3)), (m,))
    assert torch.autograd.gradcheck(lambda x: ngf(f, x, eps_fixed=0.1, eps_moving=0.05), (m,))


def test_masks_select_and_weigh():
    f = _blobs((24, 26))
    m = torch.roll(_blobs((24, 26), seed=1), 1, dims=1)
    mask = torch.zeros(24, 26, dtype=torch.bool)
    mask[5:15, 3:20] = True
    metric = get_metric("ngf", eps=0.01)
    full = -ngf(f, m, eps_fixed=0.01, eps_moving=0.01).item()
    # Reference: the per-voxel cos^2 averaged over the masked voxels, from the full-image map.
    nf = torch.stack(torch.gradient(f[0]), 0)
    nm = torch.stack(torch.gradient(m[0]), 0)
    nf = nf / (nf.pow(2).sum(0) + 1e-4).sqrt()
    nm = nm / (nm.pow(2).sum(0) + 1e-4).sqrt()
    cos2 = (nf * nm).sum(0) ** 2
    assert full == pytest.approx(-float(cos2.mean()), abs=1e-12)
    assert float(metric(f, m, mask=mask)) == pytest.approx(-float(cos2[mask].mean()), abs=1e-12)
    weights = mask.double() * 3.0
    assert float(metric(f, m, mask=weights)) == pytest.approx(float(metric(f, m, mask=mask)),
                                                              abs=1e-12)


def test_invalid_settings_raise():
    for kwargs in ({"eps": 0.0}, {"eps": -1.0}, {"eps": "big"}, {"eta": 0.0}, {"eta": None}):
        with pytest.raises(ConfigError):
            get_metric("ngf", **kwargs)


def test_register_with_ngf_recovers_a_translation_across_contrasts():
    from itreg.api import register
    from itreg.grid import Grid
    from itreg.image import Image

    grid = Grid((64, 64), (1.0, 1.0), (0.0, 0.0))
    base = _blobs((64, 64), seed=2).float()
    g = torch.Generator().manual_seed(5)
    fixed = Image(torch.roll(base, (2, -3), dims=(1, 2))
                  + 0.02 * torch.randn(base.shape, generator=g), grid)
    moving = Image(1.5 - base + 0.02 * torch.randn(base.shape, generator=g), grid)  # inverted
    result = register(fixed, moving, "translation", "ngf", progress=False, seed=0,
                      overrides={"shrink": [2, 1], "smoothing_mm": [1.0, 0.0],
                                 "iterations": [60, 40], "learning_rate": [1.0, 0.5]})
    # fixed[y, x] = base[y - 2, x + 3], moving = remap(base): T(x, y) = (x + 3, y - 2).
    point = torch.tensor([[32.0, 32.0]], dtype=torch.float64)
    moved = result.transform.to(torch.float64)(point) - point
    assert torch.allclose(moved[0], torch.tensor([3.0, -2.0], dtype=torch.float64), atol=0.15)

"""DeepSim: extractor shapes, Eq. 5 metric, model files, robustness."""

import pytest
import torch

from itreg.blocks.deepsim import DeepSimNet
from itreg.blocks.modelfile import save_model
from itreg.errors import ConfigError
from itreg.metrics import get_metric
from itreg.metrics.deepsim import DeepSimMetric, feature_cosine


@pytest.mark.parametrize("ndim,mode", [(2, "ae"), (2, "seg"), (3, "ae"), (3, "seg")])
def test_extractor_shapes(ndim, mode):
    torch.manual_seed(0)
    net = DeepSimNet(ndim, mode, channels=(4, 6, 8), classes=3).eval()
    shape = (20, 17, 12)[:ndim]
    x = torch.rand(2, 1, *shape)
    out = net(x)
    assert out.shape == (2, 3 if mode == "seg" else 1, *shape)
    feats = net.features(x)
    padded = [24, 24, 16][:ndim]
    assert [f.shape[1] for f in feats] == [4, 6, 8]
    assert [tuple(f.shape[2:]) for f in feats] == [tuple(p // 2 ** (i + 1) for p in padded)
                                                   for i in range(3)]
    enc0 = net.encoder[0].block
    kinds = [type(m).__name__ for m in enc0]
    assert kinds[0].startswith("BatchNorm")
    assert type(net.encoder[0].drop).__name__.startswith("Dropout")
    assert enc0[1].kernel_size == (4,) * ndim and enc0[1].stride == (2,) * ndim
    y, f2 = net.forward_features(x)
    assert torch.equal(y, out) and all(torch.equal(a, b) for a, b in zip(f2, feats))


def test_bad_settings():
    with pytest.raises(ConfigError):
        DeepSimNet(2, "vae")
    with pytest.raises(ConfigError):
        DeepSimNet(2, "seg", classes=1)


@pytest.fixture
def model_file(tmp_path):
    torch.manual_seed(1)
    net = DeepSimNet(2, "ae", channels=(4, 6, 8))
    # Non-trivial BatchNorm running statistics, as after training.
    net.train()
    with torch.no_grad():
        net(torch.rand(4, 1, 32, 32))
    path = tmp_path / "ae.pt"
    save_model(path, "deepsim", net.config(), net.state_dict())
    return path


def _image(seed, shape=(30, 26)):
    g = torch.Generator().manual_seed(seed)
    return torch.rand((1, *shape), generator=g)


def test_self_similarity_is_one(model_file):
    metric = get_metric(f"deepsim:{model_file}")
    assert isinstance(metric, DeepSimMetric) and metric.requires_spatial
    x = _image(0)
    loss = metric(x, x)
    assert float(loss) == pytest.approx(0.0, abs=1e-6)
    assert float(metric.quantity(loss)) == pytest.approx(1.0, abs=1e-6)
    other = metric(x, _image(1))
    assert 0.0 < float(other) <= 2.0


def test_equals_eq5_computed_independently(model_file):
    from itreg.blocks.modelfile import build_model

    net, _ = build_model(model_file, "deepsim")
    a, b = _image(2), _image(3)
    metric = get_metric(f"deepsim:{model_file}")
    loss = metric(a, b)

    def scale(x):
        return (x - x.min()) / (x.max() - x.min())
    with torch.no_grad():
        fa, fb = net.features(scale(a)[None]), net.features(scale(b)[None])
    sims = []
    for u, v in zip(fb, fa):
        cos = torch.nn.functional.cosine_similarity(u, v, dim=1, eps=0.0)
        sims.append(cos.mean())
    assert float(loss) == pytest.approx(1 - float(torch.stack(sims).mean()), abs=1e-5)


def test_eval_mode_enforced_and_reload_identical(model_file, tmp_path):
    metric = get_metric(f"deepsim:{model_file}")
    metric.train()
    assert not metric.network.training
    a, b = _image(4), _image(5)
    first = metric(a, b)
    assert torch.equal(first, metric(a, b))  # no dropout noise
    again = get_metric(f"deepsim:{model_file}")(a, b)
    assert torch.equal(first, again)


def test_finite_on_constant_shuffled_and_masked(model_file):
    metric = get_metric(f"deepsim:{model_file}")
    x = _image(6)
    g = torch.Generator().manual_seed(0)
    shuffled = x.reshape(-1)[torch.randperm(x.numel(), generator=g)].reshape(x.shape)
    const = torch.full_like(x, 0.5)
    mask = torch.zeros(x.shape[1:], dtype=torch.bool)
    mask[5:20, 4:18] = True
    for f, m, msk in [(x, x, None), (const, const, None), (x, const, None),
                      (x, shuffled, mask), (const, x, mask)]:
        assert torch.isfinite(metric(f, m, msk))
    assert float(metric(x, x, mask)) == pytest.approx(0.0, abs=1e-6)


def test_gradient_reaches_moving(model_file):
    metric = get_metric(f"deepsim:{model_file}")
    m = _image(7).requires_grad_(True)
    metric(_image(8), m).backward()
    assert m.grad is not None and torch.isfinite(m.grad).all()


def test_feature_cosine_clamps_zero_features():
    z = torch.zeros(1, 3, 4, 4)
    assert torch.isfinite(feature_cosine(z, z))


def _blobs(shape=(48, 40), seed=0):
    """A smooth image: a sum of random Gaussian blobs (no symmetry, so one true alignment)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in shape),
                            indexing="ij")
    img = torch.zeros(shape)
    for _ in range(12):
        cy, cx = (torch.rand(2, generator=g) * torch.tensor(shape, dtype=torch.float32))
        s = 2.0 + 4.0 * float(torch.rand(1, generator=g))
        img += float(torch.rand(1, generator=g)) * torch.exp(
            -((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s * s))
    return img[None]


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("shift", [(3.0, 0.0), (-1.0, 2.0)])
def test_landscape_peaks_at_known_shift_mono_modal(model_file, shift):
    """DeepSim of an image against its shifted copy peaks exactly where the landscape undoes the
    shift, with the same sign convention as MI: feature maps of both images are computed on
    the same (fixed) grid, so padding, strides and the coarse stage grids cannot offset the
    optimum. The shifts are odd and even numbers of voxels, so a stage-grid (stride) or
    half-voxel misalignment would show."""
    from itreg.evaluate.landscape import metric_landscape
    from itreg.grid import Grid
    from itreg.image import Image

    grid = Grid((32, 40), (1.0, 1.0), (0.0, 0.0))  # size in x, y order
    fixed = Image(_blobs((40, 32)), grid)
    sx, sy = shift
    # content moved by +shift: moving(x, y) = fixed(x - sx, y - sy) (rolled copy, then
    # compared away from the wrapped border by the landscape's mask)
    moving = Image(torch.roll(fixed.data, (int(sy), int(sx)), dims=(1, 2)), grid)
    mask = torch.zeros(40, 32, dtype=torch.bool)
    mask[6:-6, 6:-6] = True
    for metric in (f"deepsim:{model_file}", "mi"):
        land = metric_landscape(fixed, moving, metric, axes=("tx", "ty"),
                                ranges=[(-3.0, 3.0, 1.0)], fixed_mask=mask)
        assert land.best_offset == (sx, sy), metric


def test_stages_select_encoder_levels(model_file):
    from itreg.blocks.modelfile import build_model

    net, _ = build_model(model_file, "deepsim")
    a, b = _image(9), _image(10)

    def scale(x):
        return (x - x.min()) / (x.max() - x.min())
    with torch.no_grad():
        fa, fb = net.features(scale(a)[None]), net.features(scale(b)[None])
    cos = [float(torch.nn.functional.cosine_similarity(u, v, dim=1, eps=0.0).mean())
           for u, v in zip(fb, fa)]
    for stages in ([3], [2, 3], [1, 3]):
        metric = get_metric(f"deepsim:{model_file}", stages=stages)
        expected = 1 - sum(cos[k - 1] for k in stages) / len(stages)
        assert float(metric(a, b)) == pytest.approx(expected, abs=1e-5)
        assert metric.config()["stages"] == stages
    assert get_metric(f"deepsim:{model_file}", stages=2).stages == (2,)
    for bad in ([0], [4], [2, 2], []):
        with pytest.raises(ConfigError, match="stages"):
            get_metric(f"deepsim:{model_file}", stages=bad)

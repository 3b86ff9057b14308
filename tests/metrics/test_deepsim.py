"""DeepSim: extractor shapes, Eq. 5 metric, model files, robustness."""

import pytest
import torch

from itreg.errors import ConfigError
from itreg.metrics import get_metric
from itreg.metrics.deepsim import DeepSimMetric, feature_cosine
from itreg.nets.deepsim import DeepSimNet
from itreg.nets.modelfile import save_model


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
    assert kinds[0].startswith("BatchNorm") and kinds[-1].startswith("Dropout")
    assert enc0[1].kernel_size == (4,) * ndim and enc0[1].stride == (2,) * ndim


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
    from itreg.nets.modelfile import build_model

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

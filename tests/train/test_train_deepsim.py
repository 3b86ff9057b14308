"""DeepSim extractor training on tiny 2D phantoms: AE and segmentation, files, errors."""

import pytest
import torch

from itreg.blocks.modelfile import build_model
from itreg.errors import ConfigError, InvalidImageError, OutputExistsError
from itreg.image import Image
from itreg.metrics import get_metric
from itreg.metrics.deepsim import DeepSimMetric
from itreg.train.deepsim import CropSampler, DeepSimTrainConfig, train_deepsim


@pytest.fixture(scope="module")
def slices():
    from itreg.phantoms import labels, load_mni
    from itreg.phantoms.slices import axial_slices

    tissues = load_mni(4.0)
    nz = tissues["t1"].grid.shape[0]
    imgs, labs = [], []
    for z in (nz // 2 - 4, nz // 2, nz // 2 + 4):
        sl = axial_slices(tissues, z)
        imgs.append(sl["t1"])
        labs.append(labels(sl))
    return imgs, labs


def _cfg(mode, **kw):
    base = {"mode": mode, "channels": (4, 8, 8), "crop_size": 32, "batch_size": 4,
            "steps_per_epoch": 8, "val_crops": 8, "epochs": 4, "patience": 0,
            "learning_rate": 3e-3, "seed": 0, "progress": False, "dropout": 0.1, "threads": 1}
    base.update(kw)
    return DeepSimTrainConfig(**base)


@pytest.mark.parametrize("mode", ["ae", "seg"])
def test_training_lowers_validation_loss_and_saves(slices, tmp_path, mode):
    imgs, labs = slices
    out = tmp_path / f"{mode}.pt"
    before = torch.get_num_threads()
    res = train_deepsim(imgs, labs if mode == "seg" else None,
                        _cfg(mode, threads=before + 1), output=out)
    assert torch.get_num_threads() == before  # the threads option holds for the call only
    hist = res.train["history"]
    assert res.train["best_value"] < hist[0]["val_loss"]
    net, extra = build_model(out, "deepsim")
    assert net.mode == mode and extra["training"]["mode"] == mode
    if mode == "seg":
        assert net.classes == int(max(int(l.data.max()) for l in labs)) + 1
    a, b = imgs[0].data, imgs[1].data[:, :, :]
    m1 = DeepSimMetric(res.network)(a, a)
    m2 = get_metric(f"deepsim:{out}")
    assert float(m1) == pytest.approx(0.0, abs=1e-6)
    assert torch.equal(DeepSimMetric(res.network)(a, b), m2(a, b))
    with pytest.raises(OutputExistsError):
        train_deepsim(imgs, labs if mode == "seg" else None, _cfg(mode), output=out)


def test_bad_inputs(slices):
    imgs, _ = slices
    with pytest.raises(ConfigError, match="label"):
        train_deepsim(imgs, None, _cfg("seg"))
    bad = Image(imgs[0].data.clone(), imgs[0].grid)
    bad.data[0, 3, 3] = float("nan")
    with pytest.raises(InvalidImageError):
        train_deepsim([bad], None, _cfg("ae"))
    with pytest.raises(ConfigError):
        DeepSimTrainConfig(crop_size=30)


def test_crop_sampler_pads_and_flips_labels_with_images():
    img = torch.arange(20.0).reshape(1, 4, 5)
    lab = torch.arange(20).reshape(4, 5)
    s = CropSampler([img], [lab], 8, torch.Generator().manual_seed(0), flips=True)
    x, y = s.draw(6)
    assert x.shape == (6, 1, 8, 8) and y.shape == (6, 8, 8)
    assert torch.equal(x[:, 0].long(), y)


def test_random_remap_monotone_nonmonotone_and_identity():
    from itreg.train.deepsim import random_remap

    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 1, 9, 7, generator=g)
    x[:, 0, 0, 0], x[:, 0, 0, 1] = 0.0, 1.0
    mono = random_remap(x, g, knots=5, nonmonotone=0.0)
    assert mono.shape == x.shape
    for a, b in zip(x.reshape(6, -1), mono.reshape(6, -1)):
        order = torch.argsort(a)
        assert bool((torch.diff(b[order]) >= -1e-6).all())  # increasing map
        assert float(b[0]) == pytest.approx(0.0) and float(b[1]) == pytest.approx(1.0)
    free = random_remap(x, g, knots=5, nonmonotone=1.0)
    assert float(free.min()) >= 0.0 and float(free.max()) <= 1.0 + 1e-6
    decreasing = any(bool((torch.diff(b[torch.argsort(a)]) < -1e-3).any())
                     for a, b in zip(x.reshape(6, -1), free.reshape(6, -1)))
    assert decreasing
    # A map through its knots: a value on a knot goes to that knot's value exactly.
    knots = torch.linspace(0, 1, 5)
    on_knots = knots.repeat(6, 1).reshape(6, 1, 5, 1)
    y = random_remap(on_knots, torch.Generator().manual_seed(1), knots=5, nonmonotone=0.0)
    assert torch.allclose(torch.diff(y.reshape(6, 5)).clamp_max(0), torch.zeros(6, 4))
    assert torch.equal(random_remap(x, g, probability=0.0), x)
    with pytest.raises(ConfigError):
        DeepSimTrainConfig(intensity_remap=1.5)
    with pytest.raises(ConfigError):
        DeepSimTrainConfig(remap_knots=1)


@pytest.mark.usefixtures("one_thread")
def test_invariance_term_makes_features_contrast_invariant(slices):
    """The two-view consistency term raises DeepSim between an image and a non-monotone
    remapping of it (a T2-like change of contrast) above the paper's training on the same
    crops."""
    from itreg.train.deepsim import random_remap

    imgs, _ = slices
    common = {"epochs": 3, "steps_per_epoch": 10, "intensity_remap": 1.0, "nonmonotone": 1.0}
    plain = train_deepsim(imgs, None, _cfg("ae", **common)).network
    inv = train_deepsim(imgs, None, _cfg("ae", invariance_weight=5.0, **common)).network
    x = imgs[1].data
    x = (x - x.min()) / (x.max() - x.min())
    views = random_remap(x[None].repeat(4, 1, 1, 1), torch.Generator().manual_seed(5),
                         nonmonotone=1.0)
    sims = []
    for net in (plain, inv):
        metric = DeepSimMetric(net)
        sims.append(sum(float(metric.quantity(metric(x, v))) for v in views) / len(views))
    assert sims[1] > sims[0] + 0.05, sims

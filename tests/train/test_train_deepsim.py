"""DeepSim extractor training on tiny 2D phantoms: AE and segmentation, files, errors."""

import pytest
import torch

from itreg.errors import ConfigError, InvalidImageError, OutputExistsError
from itreg.image import Image
from itreg.metrics import get_metric
from itreg.metrics.deepsim import DeepSimMetric
from itreg.nets.modelfile import build_model
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
    res = train_deepsim(imgs, labs if mode == "seg" else None, _cfg(mode), output=out)
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

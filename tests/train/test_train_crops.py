"""Training on random crops (``TrainNetConfig.crop_size``): a crop keeps world coordinates,
its margin is left out of the similarity, and a network trained on crops of 40 x 40 images
registers the whole images."""

from __future__ import annotations

import math

import pytest
import torch
from regnet_train_data import TinyPairs

from itreg.errors import ConfigError
from itreg.grid import Grid
from itreg.metrics import get_metric
from itreg.nets.regnets import load_regnet
from itreg.train.regnet import TrainNetConfig, build_network, train_regnet
from itreg.train.regnet_batches import Batch, crop_batch

pytestmark = pytest.mark.usefixtures("one_thread")


def _rotated_grid_3d() -> Grid:
    c, s = math.cos(0.3), math.sin(0.3)
    return Grid((11, 9, 7), (1.5, 2.0, 2.5), (5.0, -3.0, 12.0), (c, -s, 0, s, c, 0, 0, 0, 1))


def test_a_crop_keeps_every_voxel_at_its_world_point():
    grid = _rotated_grid_3d()
    gen = torch.Generator().manual_seed(3)
    # Tensors whose values are the voxels' world x, y, z: a crop must carry them unchanged.
    world = grid.points(dtype=torch.float64).movedim(-1, 0)[None]  # (1, 3, Z, Y, X)
    labels = torch.arange(grid.numel).reshape(1, 1, *grid.shape)
    batch = Batch(world, world.clone(), labels, labels.clone())
    for _ in range(5):
        sub, sub_grid = crop_batch(batch, grid, (4, 6, 5), 1, gen)
        assert sub.fixed.shape == (1, 3, 4, 6, 5) and sub_grid.shape == (4, 6, 5)
        torch.testing.assert_close(sub.fixed[0].movedim(0, -1),
                                   sub_grid.points(dtype=torch.float64), atol=1e-9, rtol=0)
        assert sub_grid.spacing == grid.spacing and sub_grid.direction == grid.direction
        # The region is the crop less one voxel at every face.
        assert sub.inner(sub.fixed).shape == (1, 3, 2, 4, 3)
    # A crop larger than an axis takes the whole axis.
    whole, g = crop_batch(batch, grid, 50, 2, gen)
    assert g.same_as(grid) and torch.equal(whole.fixed_labels, labels)


def test_crop_settings_are_checked():
    assert TrainNetConfig(crop_size=[32]).crop_size == 32
    assert TrainNetConfig(crop_size=(20, 24, 28), crop_margin=4).crop_size == (20, 24, 28)
    for bad in (16, (8, 40), 2.5, True, (1, 2, 3, 4)):
        with pytest.raises(ConfigError, match="crop_size"):
            TrainNetConfig(crop_size=bad, crop_margin=8)
    with pytest.raises(ConfigError):
        TrainNetConfig(crop_margin=-1)


def test_training_on_crops_registers_whole_images(tmp_path):
    src = TinyPairs(8, size=40, seed=2)
    cfg = TrainNetConfig(kind="deform", loss="mse", features=(4, 8, 8), levels=2,
                         batch_size=4, steps_per_epoch=4, epochs=8, lr=1e-2, ema_decay=0.0,
                         patience=0, reg_weight=0.01, val_max_pairs=2, threads=1,
                         crop_size=24, crop_margin=3, norm="none")
    metric = get_metric("mse")

    def mean_mse(net) -> float:
        net.eval()
        values = []
        with torch.no_grad():
            for i in range(len(src)):
                s = src[i]
                f, m = net.prepare(s.fixed, s.moving)
                values.append(float(metric(f[0], net(f, m, src.grid).warped[0])))
        return sum(values) / len(values)

    before = mean_mse(build_network(cfg, 2))
    res = train_regnet(cfg, src, None, tmp_path / "crop.pt", progress=False)
    after = mean_mse(res.net)
    assert after < 0.8 * before, (before, after)
    assert load_regnet(tmp_path / "crop.pt").extra["train"]["crop_size"] == 24


def test_crops_with_instance_normalisation_are_warned_about(tmp_path, caplog):
    cfg = TrainNetConfig(kind="deform", loss="mse", features=(4, 8, 8), levels=2,
                         batch_size=2, steps_per_epoch=1, epochs=1, ema_decay=0.0, patience=0,
                         val_max_pairs=1, threads=1, crop_size=20, crop_margin=2,
                         norm="instance")
    with caplog.at_level("WARNING", logger="itreg.train.regnet"):
        train_regnet(cfg, TinyPairs(2, size=24), None, tmp_path / "w.pt", progress=False)
    assert "norm='batch' or 'none'" in caplog.text


def test_background_only_crops_are_drawn_again():
    grid = Grid((40, 40), (1.0, 1.0))
    fixed = torch.zeros(1, 1, 40, 40)
    fixed[..., 20:, 20:] = torch.rand(1, 1, 20, 20, generator=torch.Generator().manual_seed(0))
    batch = Batch(fixed, fixed.clone(), None, None)
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        sub, _ = crop_batch(batch, grid, 16, 2, gen)
        inner = sub.inner(sub.fixed)
        assert float(inner.max()) > float(inner.min())

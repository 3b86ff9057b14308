"""DITR patch classifier: shapes, config round trip, patch extraction."""

import pytest
import torch

from itreg.blocks.ditr import DITRNet, build_ditr, extract_patches
from itreg.errors import ConfigError


@pytest.mark.parametrize("ndim", [2, 3])
def test_logits_shape_and_layers(ndim):
    torch.manual_seed(0)
    net = DITRNet(ndim, channels=(4, 4, 4, 4))
    x = torch.rand(3, 2, *([17] * ndim))
    out = net(x)
    assert out.shape == (3,)
    convs = [m for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d))]
    assert len(convs) == 5 and all(c.stride == (2,) * ndim for c in convs)
    # 17 -> 9 -> 5 -> 3 -> 2 -> 1: the last map is one voxel.
    assert net.features(x).shape == (3, 1, *([1] * ndim))


def test_default_channels_and_rebuild():
    net = DITRNet(2, spacing_mm=4.0)
    assert [m.out_channels for m in net.modules() if isinstance(m, torch.nn.Conv2d)] == [
        32, 64, 128, 256, 1]
    again = build_ditr(net.config())
    again.load_state_dict(net.state_dict())
    x = torch.rand(2, 2, 17, 17)
    assert torch.equal(net(x), again(x))
    assert again.spacing_mm == 4.0
    sym = DITRNet(2, spacing_mm=4.0, symmetric=True)
    assert build_ditr(sym.config()).symmetric
    old = {k: v for k, v in net.config().items() if k != "symmetric"}  # files before the flag
    assert not build_ditr(old).symmetric


def test_bad_settings():
    with pytest.raises(ConfigError):
        DITRNet(4)
    with pytest.raises(ConfigError):
        DITRNet(2, patch_size=16)
    with pytest.raises(ConfigError):
        DITRNet(2)(torch.rand(1, 3, 17, 17))


@pytest.mark.parametrize("ndim", [2, 3])
def test_extract_patches_matches_slicing(ndim):
    g = torch.Generator().manual_seed(1)
    shape = (9, 11, 10)[:ndim]
    img = torch.rand((2, *shape), generator=g)
    centres = torch.tensor([[4, 5, 5][:ndim], [0, 0, 0][:ndim], [8, 10, 9][:ndim]])
    p = extract_patches(img, centres, 5)
    assert p.shape == (3, 2, *([5] * ndim))
    padded = torch.nn.functional.pad(img, [2] * (2 * ndim))
    for i, c in enumerate(centres.tolist()):
        ref = padded[(slice(None),) + tuple(slice(ci, ci + 5) for ci in c)]
        assert torch.equal(p[i], ref)

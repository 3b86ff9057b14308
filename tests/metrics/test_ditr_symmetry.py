"""A flip-symmetric DITR classifier prefers no direction: its response to shifts is even.

The response is the DITR metric of a pair against a translation of the moving image. For an
image mirror-symmetric in x, compared with itself on a mirror-symmetric patch grid, shifting
the moving image by +d or -d voxels gives mirror images of the same patch pairs; a classifier
without a preferred direction must score both alike, so the optimum of the response cannot
move off zero. A plain strided CNN (random weights here, as after training on pairs that never
show small shifts) scores them differently, which is what put the registration optimum of a
trained model about 1 mm off at 3 mm voxels.
"""

import pytest
import torch

from itreg.blocks.ditr import DITRNet
from itreg.metrics.ditr import DITRMetric


def _mirror_image(shape=(31, 41)):
    g = torch.Generator().manual_seed(5)
    yy, xx = torch.meshgrid(torch.arange(shape[0]) - 15.0, torch.arange(shape[1]) - 20.0,
                            indexing="ij")
    half = torch.rand(shape, generator=g)
    tex = 0.5 * (half + half.flip(-1))  # mirror-symmetric texture in x
    blob = (yy ** 2 / 150 + xx ** 2 / 260 < 1).float()
    return (blob * (0.3 + 0.7 * tex))[None], blob > 0


def _shift_x(img, d):
    """Shift the moving image by `d` whole voxels in x, zero fill (exact, no interpolation)."""
    out = torch.zeros_like(img)
    if d >= 0:
        out[..., d:] = img[..., :img.shape[-1] - d]
    else:
        out[..., :d] = img[..., -d:]
    return out


def _response(net, img, mask, shifts):
    metric = DITRMetric(net, stride=4, min_patches=0)  # grid symmetric in x (0..40)
    with torch.no_grad():
        return torch.stack([-metric(img, _shift_x(img, d), mask) for d in shifts])


@pytest.mark.parametrize("seed", [0, 1])
def test_symmetric_network_response_is_even_in_the_shift(seed):
    img, mask = _mirror_image()
    torch.manual_seed(seed)
    net = DITRNet(2, channels=(8, 8, 16, 16), symmetric=True).double()
    shifts = [1, 2]
    plus = _response(net, img.double(), mask, shifts)
    minus = _response(net, img.double(), mask, [-d for d in shifts])
    assert torch.allclose(plus, minus, rtol=1e-10, atol=1e-10)
    # The plain network of the same weights is lopsided on the same data.
    net.symmetric = False
    plus = _response(net, img.double(), mask, shifts)
    minus = _response(net, img.double(), mask, [-d for d in shifts])
    assert float((plus - minus).abs().max()) > 1e-4 * float(plus.abs().max())


def test_symmetric_logit_is_the_mean_over_flips():
    torch.manual_seed(2)
    net = DITRNet(3, channels=(4, 4, 4, 4), symmetric=True)
    x = torch.rand(3, 2, 17, 17, 17)
    plain = DITRNet(3, channels=(4, 4, 4, 4))
    plain.load_state_dict(net.state_dict())
    flips = [[], [2], [3], [4], [2, 3], [2, 4], [3, 4], [2, 3, 4]]
    ref = torch.stack([plain(torch.flip(x, f) if f else x) for f in flips]).mean(0)
    assert torch.allclose(net(x), ref, atol=1e-6)
    for f in flips[1:]:
        assert torch.allclose(net(torch.flip(x, f)), net(x), atol=1e-6)

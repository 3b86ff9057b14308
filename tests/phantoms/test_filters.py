"""The phantom builder's Gaussian smoothing agrees with scipy.ndimage."""

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch

from itreg.errors import ConfigError
from itreg.grid import Grid
from itreg.image import Image
from itreg.phantoms._filters import gaussian_smooth


@pytest.mark.parametrize("nz", [1, 2, 7, 20])
def test_matches_scipy_with_and_without_decimation(nz):
    gen = torch.Generator().manual_seed(nz)
    data = torch.rand(2, nz, 17, 23, generator=gen, dtype=torch.float64)
    grid = Grid((23, 17, nz), (1.0, 2.0, 1.5), (3.0, -1.0, 2.0))
    img = Image(data, grid)
    sigma_mm = (1.5, 2.0, 3.0)
    # scipy takes sigma in voxels per array axis (z, y, x); same truncation, edges replicated.
    sigma_vox = (3.0 / 1.5, 2.0 / 2.0, 1.5 / 1.0)
    ref = np.stack([ndi.gaussian_filter(data[c].numpy(), sigma_vox, mode="nearest", truncate=3.0)
                    for c in range(2)])
    out = gaussian_smooth(img, sigma_mm)
    assert out.grid.same_as(grid) and out.dtype == torch.float64
    assert np.abs(out.data.numpy() - ref).max() < 1e-12
    dec = gaussian_smooth(img, sigma_mm, stride=(2, 3, 4))
    assert np.abs(dec.data.numpy() - ref[:, ::4, ::3, ::2]).max() < 1e-12
    assert dec.grid.spacing == (2.0, 6.0, 6.0) and dec.grid.origin == grid.origin
    assert dec.grid.size == (12, 6, (nz - 1) // 4 + 1)


def test_2d_zero_sigma_and_errors():
    img = Image(torch.rand(1, 8, 9), Grid((9, 8)))
    assert torch.equal(gaussian_smooth(img, 0.0).data, img.data)
    assert torch.equal(gaussian_smooth(img, 0.0, stride=2).data, img.data[:, ::2, ::2])
    with pytest.raises(ConfigError):
        gaussian_smooth(img, -1.0)
    with pytest.raises(ConfigError):
        gaussian_smooth(img, 1.0, stride=0)
    with pytest.raises(ConfigError):
        gaussian_smooth(Image(torch.zeros(1, 8, 9, dtype=torch.uint8), Grid((9, 8))), 1.0)

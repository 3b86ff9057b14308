"""A small 2D blob image with its mask, shared by the DITR training tests."""

from __future__ import annotations

import torch

from itreg.image import Image


def blob_pair(seed: int = 0) -> tuple[Image, torch.Tensor]:
    """A 48 x 44 two-level ellipse image at 2 mm with seeded noise, and its bool mask."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(48.0), torch.arange(44.0), indexing="ij")
    r = ((yy - 24) ** 2 / 300 + (xx - 22) ** 2 / 250)
    fixed = (r < 1).float() * (0.4 + 0.6 * (r < 0.4).float())
    fixed = fixed + 0.02 * torch.rand(fixed.shape, generator=g)
    return Image.from_tensor(fixed, spacing=(2.0, 2.0)), (r < 1)

"""Tiny synthetic 2D pair sources for the registration-network training tests (fast on CPU)."""

from __future__ import annotations

import math

import torch

from itreg.grid import Grid
from itreg.image import Image
from itreg.train.sources import PairSample
from itreg.transforms import DisplacementField
from itreg.warp import resample


def _blobs(grid: Grid, gen: torch.Generator) -> torch.Tensor:
    pts = grid.points(dtype=torch.float64)
    c = torch.tensor(grid.center, dtype=torch.float64)
    out = torch.zeros(grid.shape, dtype=torch.float64)
    for _ in range(4):
        mu = c + (torch.rand(2, generator=gen, dtype=torch.float64) - 0.5) * 30.0
        s = 4.0 + 3.0 * float(torch.rand(1, generator=gen))
        out += torch.exp(-((pts - mu) ** 2).sum(-1) / (2 * s * s))
    return out.clamp(max=1.0).float()


class TinyPairs:
    """Blob images on a 32 x 32 grid (2 mm); moving = fixed through a smooth random shift field.

    ``contrast="inverted"`` makes the moving intensity ``1 - fixed`` inside the image (a
    multimodal pair: MI works, MSE does not).
    """

    def __init__(self, n: int, seed: int = 0, contrast: str = "same", labels: bool = True,
                 size: int = 32) -> None:
        self.n, self.seed, self.contrast, self.has_labels = n, seed, contrast, labels
        self.grid = Grid((size, size), (2.0, 2.0), (-30.0, -20.0))
        self._cache: dict[int, PairSample] = {}

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> PairSample:
        if not 0 <= i < self.n:
            raise IndexError(i)
        if i in self._cache:
            return self._cache[i]
        gen = torch.Generator().manual_seed(self.seed * 1000 + i)
        grid = self.grid
        fixed = _blobs(grid, gen)
        # a smooth displacement: a random shift of 2-4 mm with a gentle sinusoidal part
        pts = grid.points()
        angle = float(torch.rand(1, generator=gen)) * 2 * math.pi
        amp = 2.0 + 2.0 * float(torch.rand(1, generator=gen))
        shift = torch.tensor([math.cos(angle), math.sin(angle)]) * amp
        wave = 1.5 * torch.sin(pts[..., 1:2] / 12.0 + angle)
        disp = (shift + wave * torch.tensor([1.0, 0.0])).movedim(-1, 0)
        truth = DisplacementField(disp, grid, learnable=False)
        # moving(T(x)) = fixed(x) approximately: sample fixed at T^-1 ~ x - d(x)
        inv = DisplacementField(-disp, grid, learnable=False)
        with torch.no_grad():
            moving = resample(Image(fixed[None], grid), inv, grid, mode="linear").data
        fl = (fixed[None] > 0.5).to(torch.uint8) + (fixed[None] > 0.8).to(torch.uint8)
        ml = (moving > 0.5).to(torch.uint8) + (moving > 0.8).to(torch.uint8)
        if self.contrast == "inverted":
            moving = (1.0 - moving) * (moving > 0.05) + 0.3 * (moving <= 0.05)
        sample = PairSample(Image(fixed[None], grid), Image(moving, grid),
                            Image(fl, grid) if self.has_labels else None,
                            Image(ml, grid) if self.has_labels else None, truth, f"tiny {i}")
        self._cache[i] = sample
        return sample

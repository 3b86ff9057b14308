"""Stage penalties: closed forms where the regulariser has one, sampled fields otherwise."""

from __future__ import annotations

import pytest
import torch

from itreg.engine.config import load_preset
from itreg.engine.pyramid import Pyramid
from itreg.engine.stages import StageSetup, get_stage_transform
from itreg.grid import Grid
from itreg.image import Image
from itreg.regularisers import get_regulariser

F64 = torch.float64


class _Reg:
    def __init__(self, name: str, weight: float) -> None:
        self.name, self.weight, self.module = name, weight, get_regulariser(name)


def test_bspline_stage_penalty_uses_the_closed_form_bending_energy():
    grid = Grid((20, 18, 16), (2.0, 2.0, 2.0))
    image = Image(torch.rand(1, *grid.shape, dtype=F64), grid)
    stage = load_preset("bspline").stages[-1]
    level = Pyramid(image, image, None, None).levels([2], [1.0])[0]
    setup = StageSetup(grid, stage, F64, torch.device("cpu"))
    builder = get_stage_transform("bspline")
    b = builder.for_level(None, level, setup)
    with torch.no_grad():
        b.coefficients.normal_(0.0, 1.0, generator=torch.Generator().manual_seed(0))
    regs = [_Reg("bending", 0.5), _Reg("diffusion", 0.25)]
    total = builder.penalty(b, regs, level, setup)
    field, field_grid = builder.field(b, level, setup)
    expected = 0.5 * b.bending_energy(grid) + 0.25 * get_regulariser("diffusion")(field,
                                                                                  field_grid)
    assert float(total) == pytest.approx(float(expected), rel=1e-12)
    total.backward()
    assert b.coefficients.grad is not None and bool(b.coefficients.grad.abs().sum() > 0)

"""register(..., bias_correction="n4"): N4 removes a smooth field from what the metric sees,
inside the masks; the setting is validated first and recorded; outputs keep the intensities."""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch
from engine_data import quick

from itreg.api import register
from itreg.errors import ConfigError
from itreg.grid import Grid
from itreg.image import Image
from itreg.metrics import Metric, register_metric
from itreg.metrics import registry as registry_module


class _Spy(Metric):
    """MSE on the whole grid that keeps the images of its last call (the finest level)."""

    name = "spy"
    requires_spatial = True
    seen: ClassVar[list] = []

    def loss(self, fixed, moving, mask, fixed_range, moving_range):
        _Spy.seen[:] = [(fixed.detach().clone(), moving.detach().clone())]
        d = (fixed - moving)[:, mask] if mask is not None else fixed - moving
        return (d * d).mean()


@pytest.fixture()
def spy(monkeypatch):
    monkeypatch.setattr(registry_module, "_REGISTRY", dict(registry_module._REGISTRY))
    register_metric("spy", _Spy)
    _Spy.seen = []
    return _Spy


def _phantom():
    """A 64^2 image: a large uniform disc (value 1) with two small bright discs, in a zero
    background, and the same image under a smooth multiplicative field of 0.6 to 1.4."""
    grid = Grid((64, 64), (1.0, 1.0), (0.0, 0.0))
    yx = torch.stack(torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij"), -1)
    disc = ((yx - 31.5).norm(dim=-1) < 26).float()
    small = (((yx - torch.tensor([22.0, 25.0])).norm(dim=-1) < 5).float()
             + ((yx - torch.tensor([40.0, 38.0])).norm(dim=-1) < 6).float())
    base = disc * (1.0 + 0.8 * small.clamp(max=1.0))
    u = (yx - 31.5) / 31.5
    field = 1.0 + 0.3 * u[..., 1] + 0.1 * u[..., 0] ** 2 - 0.1 * u[..., 0] * u[..., 1]
    field = 0.6 + 0.8 * (field - field.min()) / (field.max() - field.min())
    flat = disc.bool() & (small == 0)
    # Eroded by 3 voxels: the few steps the spy's registration takes move no edge into it.
    flat = ~torch.nn.functional.max_pool2d((~flat).float()[None, None], 7, 1, 3)[0, 0].bool()
    return Image(base.unsqueeze(0), grid), Image((base * field).unsqueeze(0), grid), flat


def _cv(values: torch.Tensor) -> float:
    return float(values.std() / values.mean())


def test_n4_flattens_what_the_metric_sees_and_is_recorded(spy):
    fixed, biased, flat = _phantom()
    over = quick(iterations=[2, 1])
    before = _cv(biased.data[0][flat])
    assert before > 0.12  # the field spreads the uniform disc's values
    plain = register(fixed, biased, "translation", "spy", progress=False, overrides=over)
    seen_plain = spy.seen[0][1][0]
    spy.seen = []
    mask = torch.zeros(64, 64, dtype=torch.bool)
    mask[4:60, 4:60] = True
    corrected = register(fixed, biased, "translation", "spy", progress=False, overrides=over,
                         bias_correction="n4", fixed_mask=mask, moving_mask=mask)
    seen_n4 = spy.seen[0][1][0]
    # The metric saw the biased image without correction, and a much flatter one with N4.
    assert _cv(seen_plain[flat]) == pytest.approx(before, rel=0.05)
    assert _cv(seen_n4[flat]) < before / 3
    assert plain.report()["settings"]["bias_correction"] == "none"
    assert corrected.report()["settings"]["bias_correction"] == "n4"
    # The outputs warp the user's moving image, not the corrected one.
    assert torch.equal(corrected.moving.data, biased.data)


def test_unknown_correction_raises_before_any_work(spy):
    fixed, biased, _ = _phantom()
    for bad in ("N5", "", None, 4):
        with pytest.raises(ConfigError, match="n4"):
            register(fixed, biased, "translation", "spy", progress=False, bias_correction=bad)
    assert spy.seen == []

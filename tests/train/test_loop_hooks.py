"""The hooks of :func:`itreg.train.fit` (a second step after each optimiser step, a start step,
the training mode, an epoch callback), named loss parts in the records, and the EMA of the
weights against its closed form."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from itreg.errors import ConfigError
from itreg.train import EMA, FitHooks, fit

pytestmark = pytest.mark.usefixtures("one_thread")


class Scalar(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros((), dtype=torch.float64))


def test_ema_follows_its_closed_form():
    model = Scalar()
    ema = EMA(0.5)
    ema.start(model)
    expected = 0.0
    for n, value in enumerate([1.0, 2.0, 4.0, -3.0], start=1):
        with torch.no_grad():
            model.w.fill_(value)
        ema.update(model, n)
        d = min(0.5, (1.0 + n) / (10.0 + n))
        expected = d * expected + (1.0 - d) * value
        assert float(ema.state["w"]) == pytest.approx(expected, rel=1e-15)
    with pytest.raises(ConfigError):
        EMA(1.0)


def test_hooks_run_where_fit_says_and_parts_are_averaged():
    model = Scalar()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    calls = {"start": 0, "after": 0, "mode": 0, "epochs": []}

    def loss_fn(target):
        loss = (model.w - target) ** 2
        return loss, {"target": float(target)}

    def train_mode():
        calls["mode"] += 1
        model.eval()  # a trainer may keep parts in eval mode; fit must not override it

    def after():
        calls["after"] += 1
        assert not model.training

    hooks = FitHooks(on_start=lambda: calls.__setitem__("start", calls["start"] + 1),
                     train_mode=train_mode, after_step=after,
                     on_epoch_end=lambda r: calls["epochs"].append(r["epoch"]))
    res = fit(model, opt, lambda e: [1.0, 3.0], loss_fn, epochs=3, patience=0,
              progress=False, hooks=hooks)
    assert (calls["start"], calls["after"], calls["mode"]) == (1, 6, 3)
    assert calls["epochs"] == [0.0, 1.0, 2.0]
    assert all(h["target"] == pytest.approx(2.0) for h in res.history)


def test_with_an_ema_the_average_is_validated_and_kept():
    model = Scalar()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    seen = []

    def validate():
        seen.append(float(model.w))
        return {"val_loss": float((model.w - 1.0) ** 2)}

    ema = EMA(0.9)
    fit(model, opt, lambda e: [None], lambda _: (model.w - 1.0) ** 2, validate, epochs=1,
        patience=0, progress=False, ema=ema)
    # one SGD step from 0 with lr 1 on (w - 1)^2 lands on w = 2; the average after step 1
    # moves with decay min(0.9, 2 / 11): 2 / 11 * 0 + 9 / 11 * 2
    assert seen == [pytest.approx(18.0 / 11.0)]
    assert float(model.w.detach()) == pytest.approx(18.0 / 11.0)

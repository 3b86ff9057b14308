"""Resumable training in :func:`itreg.train.fit`: an interrupted run continued from its checkpoint
ends where an uninterrupted run ends."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from itreg.errors import ConfigError, ModelFileError
from itreg.train import FitCheckpoint, fit, make_generator

pytestmark = pytest.mark.usefixtures("one_thread")

X = torch.linspace(-1.0, 1.0, 64, dtype=torch.float64)[:, None]
Y = 3.0 * X - 0.5


def run(path, epochs: int, settings=None, resume: bool = True, patience: int = 0):
    """A seeded regression trained by Adam on shuffled mini-batches; the shuffling generator is
    the extra state the checkpoint must carry."""
    torch.manual_seed(0)
    model = nn.Linear(1, 1).double()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    gen = make_generator(1)

    def batches(epoch):
        order = torch.randperm(64, generator=gen)
        for s in range(4):
            yield order[s * 16:(s + 1) * 16]

    def loss_fn(idx):
        return ((model(X[idx]) - Y[idx]) ** 2).mean()

    def validate():
        return {"val_loss": float(((model(X) - Y) ** 2).mean())}

    ckpt = None if path is None else FitCheckpoint(
        path, settings or {"lr": 0.05}, lambda: {"gen": gen.get_state()},
        lambda s: gen.set_state(s["gen"]), resume=resume)
    result = fit(model, opt, batches, loss_fn, validate, epochs=epochs, patience=patience,
                 progress=False, resume=ckpt)
    return model, result


def test_resumed_run_matches_an_uninterrupted_one(tmp_path) -> None:
    whole, whole_result = run(None, 5)
    path = tmp_path / "m.pt.ckpt"
    _, part = run(path, 2)
    assert part.epochs == 2 and path.is_file()
    resumed, result = run(path, 5)
    assert result.epochs == 5 and result.steps == whole_result.steps == 20
    assert [h["val_loss"] for h in result.history] == [h["val_loss"] for h in whole_result.history]
    assert result.best_epoch == whole_result.best_epoch
    for a, b in zip(whole.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    # Asking for no more epochs than were run changes nothing.
    again, same = run(path, 5)
    assert same.epochs == 5 and same.steps == 20
    assert torch.equal(again.weight, resumed.weight)


def test_early_stopped_run_stays_stopped(tmp_path) -> None:
    path = tmp_path / "m.pt.ckpt"
    _, first = run(path, 200, patience=1)
    assert first.stop_reason == "early-stopping"
    _, again = run(path, 400, patience=1)
    assert again.epochs == first.epochs and again.stop_reason == "early-stopping"


def test_other_settings_and_bad_files_are_refused(tmp_path) -> None:
    path = tmp_path / "m.pt.ckpt"
    run(path, 1)
    with pytest.raises(ConfigError, match="other settings.*lr"):
        run(path, 2, settings={"lr": 0.1})
    _, fresh = run(path, 1, settings={"lr": 0.1}, resume=False)
    assert fresh.epochs == 1
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ModelFileError, match="cannot be read"):
        run(path, 2)
    torch.save({"format": "something-else"}, path)
    with pytest.raises(ModelFileError, match="not a training checkpoint"):
        run(path, 2)

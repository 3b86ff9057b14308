"""The one Adam (engine.optimizers) of the pairwise and groupwise loops against torch.optim.Adam."""

from __future__ import annotations

import pytest
import torch

from itreg.engine.callbacks import CallbackList
from itreg.engine.config import ConvergenceConfig
from itreg.engine.objective import Evaluation
from itreg.engine.optimizers import Adam, AdamMoments, LevelContext, step_factor
from itreg.errors import ConfigError


def _loss(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a - 3.0).pow(2).sum() + (a[0] * b).sin().sum() + 0.5 * b.pow(4).sum()


def test_adam_moments_follow_torch_adam_with_a_changing_step_size():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(7, generator=gen, dtype=torch.float64)
    ref = q.clone().requires_grad_(True)
    opt = torch.optim.Adam([ref], lr=0.1, betas=(0.8, 0.99), eps=1e-6)
    moments = AdamMoments(q, 0.8, 0.99, 1e-6)
    for it in range(25):
        lr = 0.1 * step_factor("exponential", 0.05, it, 25)
        x = q.clone().requires_grad_(True)
        (g,) = torch.autograd.grad(_loss(x, x[1:4]), x)
        q = q - moments.update(g, lr)
        for group in opt.param_groups:
            group["lr"] = lr
        opt.zero_grad()
        _loss(ref, ref[1:4]).backward()
        opt.step()
    torch.testing.assert_close(q, ref.detach(), rtol=1e-12, atol=1e-12)


class _Quadratic:
    """``|q - c|^2`` with a zero-mean constraint on q (as the groupwise projection)."""

    def __init__(self, c):
        self.c = c
        self.calls = 0

    def resample(self):
        pass

    def evaluate(self, q, grad=True):
        self.calls += 1
        loss = float(((q - self.c) ** 2).sum())
        return Evaluation(loss, loss, 1.0, True, grad=2 * (q - self.c) if grad else None)

    def constrain(self, q):
        return q - q.mean()


def test_engine_adam_runs_the_cosine_schedule_and_the_constraint_as_torch_adam_would():
    c = torch.tensor([3.0, -1.0, 0.5, 2.0], dtype=torch.float64)
    objective = _Quadratic(c)
    ctx = LevelContext(objective=objective, stage=0, transform="t", level=0, levels=1,
                       max_iterations=30, learning_rate=0.2,
                       options=Adam.check_options({"schedule": "cosine",
                                                   "final_lr_fraction": 0.1}),
                       convergence=ConvergenceConfig(tolerance=0.0, window=50),
                       callbacks=CallbackList(), quantity=float, quantity_name="loss",
                       start_time=0.0)
    q, reason = Adam().run(ctx, torch.zeros(4, dtype=torch.float64))
    assert reason == "max-iterations" and len(ctx.losses) == 30
    ref = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([ref], lr=0.2)
    for it in range(30):
        opt.param_groups[0]["lr"] = 0.2 * step_factor("cosine", 0.1, it, 30)
        opt.zero_grad()
        ((ref - c) ** 2).sum().backward()
        opt.step()
        with torch.no_grad():
            ref -= ref.mean()
    torch.testing.assert_close(q, ref.detach(), rtol=1e-12, atol=1e-12)
    assert float(q.sum()) == pytest.approx(0.0, abs=1e-12)


def test_an_unknown_schedule_fails_before_any_evaluation():
    objective = _Quadratic(torch.zeros(2, dtype=torch.float64))
    ctx = LevelContext(objective=objective, stage=0, transform="t", level=0, levels=1,
                       max_iterations=5, learning_rate=0.1,
                       options=Adam.check_options({"schedule": "linear"}),
                       convergence=ConvergenceConfig(), callbacks=CallbackList(),
                       quantity=float, quantity_name="loss", start_time=0.0)
    with pytest.raises(ConfigError, match="schedule"):
        Adam().run(ctx, torch.zeros(2, dtype=torch.float64))
    assert objective.calls == 0

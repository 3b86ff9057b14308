"""The one Adam update (AdamMoments) of the pairwise and groupwise loops against torch.optim.Adam."""

from __future__ import annotations

import torch

from itreg.engine.optimizers import AdamMoments, ParameterAdam, step_factor


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


def test_parameter_adam_gives_each_tensor_its_own_step_size():
    gen = torch.Generator().manual_seed(1)
    a0 = torch.randn(4, generator=gen, dtype=torch.float64)
    b0 = torch.randn(3, generator=gen, dtype=torch.float64)
    a, b = a0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
    ra, rb = a0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
    ours = ParameterAdam([(a, 0.2), (b, 0.01)])
    ref = torch.optim.Adam([{"params": [ra], "lr": 0.2}, {"params": [rb], "lr": 0.01}])
    for it in range(20):
        factor = step_factor("cosine", 0.1, it, 20)
        ours.zero_grad()
        _loss(a, b).backward()
        ours.step(factor)
        ref.param_groups[0]["lr"], ref.param_groups[1]["lr"] = 0.2 * factor, 0.01 * factor
        ref.zero_grad()
        _loss(ra, rb).backward()
        ref.step()
    torch.testing.assert_close(a.detach(), ra.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(b.detach(), rb.detach(), rtol=1e-12, atol=1e-12)
    assert float((a0 - a.detach()).abs().max()) > 0.1  # it moved

"""float64 gradcheck of every learned metric (DITR, DeepSim, MINE, KLDivNet).

The analytic gradient of each metric with respect to the moving image (the input the engine
and the registration networks differentiate) must match central finite differences in float64.
The networks are small and cast to float64; random draws (the critics' shuffled marginals) are
restarted from the same seed at every call so the function gradcheck differentiates is deterministic.
"""

from __future__ import annotations

import pytest
import torch

from itreg.blocks.deepsim import DeepSimNet
from itreg.blocks.ditr import DITRNet
from itreg.blocks.modelfile import save_model
from itreg.metrics import get_metric

pytestmark = pytest.mark.usefixtures("one_thread")


def _pair(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    fixed = torch.rand((1, *shape), generator=g, dtype=torch.float64)
    moving = (0.6 * fixed + 0.4 * torch.rand((1, *shape), generator=g, dtype=torch.float64))
    return fixed, moving


def _check(metric, fixed, moving, mask=None, seeded=False):
    metric = metric.double()

    def f(m):
        if seeded:  # the same shuffled marginal at every call
            metric.reset_generator(0)
        kwargs = {} if mask is None else {"mask": mask}
        return metric(fixed, m, fixed_range=(0.0, 1.0), moving_range=(0.0, 1.0), **kwargs)

    moving = moving.clone().requires_grad_(True)
    value = f(moving)
    assert value.dtype == torch.float64 and torch.isfinite(value)
    assert torch.autograd.gradcheck(f, (moving,), eps=1e-6, atol=1e-5, rtol=1e-3,
                                    fast_mode=True)


def test_ditr_gradcheck(tmp_path):
    torch.manual_seed(3)
    net = DITRNet(2, channels=(4, 4, 8, 8), spacing_mm=2.0)
    path = tmp_path / "ditr.pt"
    save_model(path, "ditr", net.config(), net.state_dict())
    fixed, moving = _pair((24, 22))
    metric = get_metric(f"ditr:{path}", stride=6, min_patches=0)
    _check(metric, fixed, moving)


@pytest.mark.parametrize("mode", ["ae", "seg"])
def test_deepsim_gradcheck(tmp_path, mode):
    torch.manual_seed(1)
    net = DeepSimNet(2, mode, channels=(3, 4, 5))
    net.train()
    with torch.no_grad():
        net(torch.rand(4, 1, 16, 16))  # non-trivial batch-norm statistics
    path = tmp_path / f"{mode}.pt"
    save_model(path, "deepsim", net.config(), net.state_dict())
    fixed, moving = _pair((16, 14))
    _check(get_metric(f"deepsim:{path}"), fixed, moving)


@pytest.mark.parametrize("name", ["mine", "kldiv"])
def test_neural_critic_gradcheck(name):
    torch.manual_seed(2)
    fixed, moving = _pair((10, 9))
    metric = get_metric(name)
    _check(metric, fixed, moving, seeded=True)

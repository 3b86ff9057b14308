"""itreg.runtime.limited_threads: the thread setting holds inside the block only."""

from __future__ import annotations

import pytest
import torch

from itreg.errors import ConfigError
from itreg.runtime import limited_threads


def test_threads_are_set_inside_and_restored_after() -> None:
    before = torch.get_num_threads()
    with limited_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), limited_threads(1):
        raise RuntimeError("boom")
    assert torch.get_num_threads() == before
    with limited_threads(None):
        assert torch.get_num_threads() == before


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "2"])
def test_bad_thread_counts_are_refused(bad) -> None:
    with pytest.raises(ConfigError, match="positive integer"), limited_threads(bad):
        pass


def test_seeded_repeats_draws_and_restores_the_callers_generator():
    from itreg.runtime import seeded

    torch.manual_seed(123)
    expected_after = torch.rand(3)
    torch.manual_seed(123)
    with seeded(7):
        a = torch.rand(4)
    with seeded(7, "cpu"):
        b = torch.rand(4)
    assert torch.equal(a, b)
    assert torch.equal(a, torch.rand(4, generator=torch.Generator().manual_seed(7)))
    assert torch.equal(torch.rand(3), expected_after)  # the caller's stream went on untouched

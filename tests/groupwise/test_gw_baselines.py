"""Groupwise baselines (CTE, APE, VI, congealing, GMM) through the same loop as X-CoReg."""

from __future__ import annotations

import pytest
import torch
from gw_data import make_group, residual_mm

from itreg.errors import ConfigError
from itreg.groupwise import GroupStage, available_group_metrics, get_group_metric, register_group
from itreg.groupwise.baselines import CTE, kmeans


@pytest.fixture(scope="module")
def easy_group():
    # Five images (congealing needs more than a handful of values per voxel).
    images, truths = make_group(shifts=[(4.0, -3.0), (-3.0, 4.0), (1.0, 5.0)])
    more, more_truths = make_group(shifts=[(-4.0, -2.0), (2.0, -4.0), (0.0, 0.0)])
    return images + more[:2], truths + more_truths[:2]


@pytest.mark.parametrize("metric", ["vi", "ape", "cte", "congealing", "gmm"])
def test_baseline_reduces_misalignment(easy_group, metric):
    images, truths = easy_group
    grid = images[0].grid
    before = residual_mm(register_group(images, metric=metric, iterations=0), truths, grid)
    result = register_group(images, metric=metric, seed=0,
                            stages=[GroupStage("translation", (2, 1), 30)])
    after = residual_mm(result, truths, grid)
    assert after < 0.5 * before, (metric, before, after)
    assert result.template.grid.same_as(grid)


def test_registry_lists_every_metric_and_rejects_unknown_names():
    assert available_group_metrics() == ["ape", "congealing", "cte", "gmm", "mvmm", "vi", "xmetric"]
    with pytest.raises(ConfigError, match="valid groupwise metrics"):
        get_group_metric("nmi")
    with pytest.raises(ConfigError):
        get_group_metric("vi", bogus=1)
    with pytest.raises(ConfigError):
        CTE(direction="sideways")


def test_cte_template_is_first_principal_component():
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(1000, generator=gen, dtype=torch.float64)
    values = torch.stack([base, 2 * base + 1, -base]) + 0.01 * torch.randn(
        3, 1000, generator=gen, dtype=torch.float64)
    t = CTE.pca_template(values)
    z = (base - base.mean()) / base.std()
    corr = torch.corrcoef(torch.stack([t, z]))[0, 1]
    assert abs(float(corr)) > 0.999


def test_gmm_kmeans_start_separates_components_and_posterior_is_returned(easy_group):
    x = torch.cat([torch.randn(200, 2) * 0.1, torch.randn(200, 2) * 0.1 + 3.0])
    labels = kmeans(x, 2, torch.Generator().manual_seed(0))
    assert len(set(labels[:200].tolist())) == 1 and labels[0] != labels[-1]
    images, _ = easy_group
    result = register_group(images, metric="gmm", k=3,
                            stages=[GroupStage("translation", (2,), 3)])
    probs = result.probabilities
    assert probs.channels == 3
    inside = result.overlap
    torch.testing.assert_close(probs.data.sum(0)[inside], torch.ones(int(inside.sum())),
                               atol=1e-4, rtol=0)

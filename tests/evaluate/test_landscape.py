"""Metric landscapes: optimum counting, FWHM, MI/LNCC/neural landscapes, CLI outputs."""

from __future__ import annotations

import csv
import json
import math

import numpy as np
import pytest
import torch

from itreg.errors import ConfigError
from itreg.evaluate.landscape import (
    count_local_optima,
    fwhm,
    metric_landscape,
    parse_range,
    save_landscape,
)
from itreg.grid import Grid
from itreg.image import Image
from itreg.phantoms import axial_slices, load_mni, synthesize

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def t1_t2_slice():
    tissues = axial_slices(load_mni(4.0))
    return tissues["t1"], synthesize(tissues, "t2", seed=0), tissues["mask"]


def stripes(period_mm: float = 10.0) -> Image:
    grid = Grid((64, 64), (1.0, 1.0), (0.0, 0.0))
    x = grid.points(dtype=torch.float64)[..., 0]
    return Image((0.5 + 0.4 * torch.cos(2 * math.pi * x / period_mm)).float()[None], grid)


def test_count_local_optima_and_plateaus():
    a = np.array([3.0, 1.0, 2.0, 0.5, 0.5, 0.5, 2.0, 1.5, 4.0])
    optima = count_local_optima(a)
    assert len(optima) == 3 and optima[0] in ((3,), (4,), (5,))
    assert count_local_optima(np.array([1.0, 0.9995, 1.0, 0.0]), plateau_tol=1e-3) == [(3,)]
    z = np.add.outer((np.arange(7) - 3.0) ** 2, (np.arange(9) - 4.0) ** 2)
    assert count_local_optima(z) == [(3, 4)]
    z[0, 0] = -1.0  # a corner minimum counts
    assert len(count_local_optima(z)) == 2
    assert count_local_optima(np.full(4, np.nan)) == []


def test_fwhm_of_a_triangle():
    x = np.arange(-10.0, 11.0)
    r = np.maximum(0, 1 - np.abs(x) / 4)
    width, censored = fwhm(x, r, 10)
    assert width == pytest.approx(4.0) and not censored
    width, censored = fwhm(x, np.ones_like(x) - 0.001 * np.abs(x), 10, baseline=0.0)
    assert censored


def test_parse_range():
    assert parse_range("-20:20:1") == (-20.0, 20.0, 1.0)
    for bad in ("1:2", "a:b:c", "5:1:1", "0:1:0"):
        with pytest.raises(ConfigError):
            parse_range(bad)


def test_mi_landscape_has_single_optimum_at_zero(t1_t2_slice, tmp_path):
    fixed, moving, mask = t1_t2_slice
    land = metric_landscape(fixed, moving, "mi", axes=["tx"], ranges=[(-24, 24, 1)])
    assert land.n_optima == 1
    assert land.best_offset == (0.0,)
    assert 4.0 < land.fwhm[0] < 40.0 and not land.fwhm_censored[0]
    land2 = metric_landscape(fixed, moving, "mi", axes=["tx", "rz"],
                             ranges=[(-16, 16, 8), (-20, 20, 10)], fixed_mask=mask)
    assert land2.best_offset == (0.0, 0.0)
    paths = save_landscape(land2, tmp_path / "out")
    rows = list(csv.reader(paths["csv"].read_text().splitlines()))
    assert rows[0][:3] == ["tx", "rz", "loss"] and len(rows) == 1 + 5 * 5
    summary = json.loads(paths["summary"].read_text())
    assert summary["best_offset"] == [0.0, 0.0] and summary["units"] == ["mm", "deg"]
    assert paths["png"].stat().st_size > 1000


def test_lncc_counts_periodic_optima():
    img = stripes(10.0)
    land = metric_landscape(img, img, "lncc", axes=["tx"], ranges=[(-20, 20, 1)])
    found = sorted(float(land.offsets[0][i]) for (i,) in land.optima)
    # squared local CC: in phase and in anti-phase (half periods) are optimal alike
    assert found == [-20.0, -15.0, -10.0, -5.0, 0.0, 5.0, 10.0, 15.0, 20.0]
    land_y = metric_landscape(img, img, "lncc", axes=["ty"], ranges=[(-5, 5, 1)])
    assert land_y.n_optima == 1  # constant along y: one plateau, counted once


def test_neural_landscape_fits_critic_per_offset(t1_t2_slice):
    fixed, moving, mask = t1_t2_slice
    land = metric_landscape(fixed, moving, "mine", axes=["tx"], ranges=[(-10, 10, 10)],
                            fixed_mask=mask, warmup_steps=100, fit_steps=5, repeats=1)
    q = land.quantity_sign * land.loss
    assert np.isfinite(q).all()
    assert int(np.argmax(q)) == 1  # the zero offset
    assert land.settings["trainable_metric"] and land.settings["fit_steps"] == 5


def test_quantity_comes_from_the_metric_not_only_its_sign(tmp_path):
    """A metric whose quantity is not sign * loss (DeepSim: 1 - loss) is tabulated and plotted
    as its quantity."""
    from itreg.metrics import get_metric

    class OneMinus(type(get_metric("mse"))):
        quantity_name = "one minus MSE"

        def quantity(self, loss):
            return 1.0 - loss

    img = stripes()
    land = metric_landscape(img, img, OneMinus(), axes=["tx"], ranges=[(-4, 4, 2)])
    np.testing.assert_allclose(land.quantity_values, 1.0 - land.loss)
    save_landscape(land, tmp_path)
    with open(tmp_path / "landscape.csv") as fh:
        rows = list(csv.reader(fh))[1:]
    for row in rows:
        assert float(row[-1]) == pytest.approx(1.0 - float(row[-2]))


def test_bad_axes():
    img = stripes()
    with pytest.raises(ConfigError, match="axis"):
        metric_landscape(img, img, "mi", axes=["tz"])
    with pytest.raises(ConfigError):
        metric_landscape(img, img, "mi", axes=["tx", "ty"], ranges=[(0, 1, 1)] * 3)


def test_cli_landscape(tmp_path):
    from click.testing import CliRunner

    from itreg import io
    from itreg.cli import app

    img = stripes(12.0)
    f = tmp_path / "f.nii.gz"
    io.write_image(img, f)
    out = tmp_path / "land"
    runner = CliRunner()
    args = ["landscape", str(f), str(f), "-o", str(out), "--metric", "ncc", "--axes", "tx",
            "--range", "-6:6:2"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "1 local optima" in res.output
    assert {p.name for p in out.iterdir() if not p.name.startswith(".")} == \
        {"landscape.png", "landscape.csv", "summary.json"}
    res = runner.invoke(app, args)
    assert res.exit_code != 0
    assert runner.invoke(app, [*args, "--force"]).exit_code == 0

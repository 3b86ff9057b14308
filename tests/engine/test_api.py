"""The front door: input checks before any work, stop reasons, seeds, threads, callbacks."""

from __future__ import annotations

import io
import math

import pytest
import torch
from engine_data import blob_image, make_pair, mean_error_vox, quick

from itreg.api import register
from itreg.engine.callbacks import Callback, EarlyStopping, History, Progress, StepState, Stop
from itreg.errors import ConfigError, GeometryError, ImageReadError, InvalidImageError, MaskError
from itreg.grid import Grid
from itreg.image import Image
from itreg.metrics import register_metric
from itreg.metrics.classic import MutualInformation
from itreg.transforms import Affine, Rigid, Translation


class _FailIfCalled(Callback):
    def on_level_start(self, state):
        raise AssertionError("optimisation started although the inputs are invalid")


@pytest.fixture()
def pair(grid2d):
    true = Translation(2, center=grid2d.center, translation=[3.0, -2.5])
    fixed, moving = make_pair(grid2d, true)
    return fixed, moving, true


def _reg(fixed, moving, **kwargs):
    kwargs.setdefault("progress", False)
    kwargs.setdefault("overrides", quick(iterations=[20, 10]))
    return register(fixed, moving, kwargs.pop("transform", "translation"), "mi", **kwargs)


# ---------------------------------------------------------------------------------- bad inputs
def test_nan_image_raises_with_count(pair):
    fixed, moving, _ = pair
    data = moving.data.clone()
    data[0, 3, 4:7] = math.nan
    data[0, 9, 9] = math.inf
    with pytest.raises(InvalidImageError, match="moving image has 4 NaN/Inf voxels"):
        _reg(fixed, moving.with_data(data), callbacks=[_FailIfCalled()])


def test_constant_image_raises(pair):
    fixed, moving, _ = pair
    with pytest.raises(InvalidImageError, match="fixed image is constant"):
        _reg(fixed.with_data(torch.full_like(fixed.data, 2.0)), moving,
             callbacks=[_FailIfCalled()])


def test_image_constant_inside_its_mask_raises(pair):
    fixed, moving, _ = pair
    mask = torch.zeros(fixed.grid.shape, dtype=torch.bool)
    mask[:3, :3] = True  # the corner is all background
    with pytest.raises(InvalidImageError, match="constant"):
        _reg(fixed, moving, fixed_mask=mask, callbacks=[_FailIfCalled()])


def test_empty_and_misplaced_masks_raise(pair):
    fixed, moving, _ = pair
    empty = torch.zeros(fixed.grid.shape, dtype=torch.bool)
    with pytest.raises(MaskError, match="fixed mask is empty"):
        _reg(fixed, moving, fixed_mask=empty, callbacks=[_FailIfCalled()])
    with pytest.raises(MaskError, match="moving mask is empty"):
        _reg(fixed, moving, moving_mask=Image(empty, moving.grid), callbacks=[_FailIfCalled()])
    with pytest.raises(MaskError, match="shape"):
        _reg(fixed, moving, fixed_mask=torch.ones(5, 5), callbacks=[_FailIfCalled()])
    other = Image(torch.ones(fixed.grid.shape), Grid(fixed.grid.size, (2.0, 2.0)))
    with pytest.raises(MaskError, match="another grid"):
        _reg(fixed, moving, fixed_mask=other, callbacks=[_FailIfCalled()])


def test_dimension_mismatch_names_both(pair, grid3d):
    fixed, _, _ = pair
    moving3d = blob_image(grid3d)
    with pytest.raises(GeometryError, match="moving image is 3D but fixed image is 2D"):
        _reg(fixed, moving3d, callbacks=[_FailIfCalled()])


def test_vector_image_raises(pair):
    fixed, moving, _ = pair
    two = Image(moving.data.repeat(2, 1, 1), moving.grid)
    with pytest.raises(GeometryError, match="2 components"):
        _reg(fixed, two, callbacks=[_FailIfCalled()])


def test_non_overlapping_extents_raise_and_suggest_centers(pair):
    fixed, moving, _ = pair
    far = Image(moving.data, Grid(moving.grid.size, moving.grid.spacing, (500.0, 400.0)))
    with pytest.raises(GeometryError, match="do not overlap.*init='centers'"):
        _reg(fixed, far, init="none", callbacks=[_FailIfCalled()])
    # centring the grids makes the same pair registrable
    result = _reg(fixed, far, init="centers")
    assert all(r in ("converged", "max-iterations") for r in result.stop_reasons)


def test_unknown_names_raise_config_error_before_work(pair):
    fixed, moving, _ = pair
    with pytest.raises(ConfigError, match="valid initialisations are: centers, moments, none"):
        _reg(fixed, moving, init="middle", callbacks=[_FailIfCalled()])
    with pytest.raises(ConfigError, match="valid options are: beta1"):
        _reg(fixed, moving, overrides={"optimizer_options.momentum": 0.9},
             callbacks=[_FailIfCalled()])
    with pytest.raises(ConfigError, match="valid regularisers are"):
        register(fixed, moving, "bspline", progress=False,
                 overrides={"stages.2.regularisers.wobble": 1.0}, callbacks=[_FailIfCalled()])
    with pytest.raises(ConfigError, match="threads"):
        _reg(fixed, moving, threads=0)


def test_label_images_are_registered_as_intensities(pair):
    fixed, moving, true = pair
    labels = moving.with_data((moving.data * 4).round().to(torch.int16))
    assert labels.is_label
    result = _reg(fixed, labels, overrides=quick())
    assert mean_error_vox(result.transform, true, fixed.grid) < 0.5
    assert result.warped.is_label and result.warped.dtype == torch.int16  # labels stay labels
    assert set(result.warped.data.unique().tolist()) <= set(labels.data.unique().tolist()) | {0}


# ---------------------------------------------------------------------------------- stopping
def test_content_driven_out_of_view_stops_with_no_overlap(pair):
    """Steps of hundreds of mm throw every point out of the moving image: the level stops with
    'no-overlap' and keeps the last good (finite) parameters."""
    fixed, moving, _ = pair
    for optimizer in ("adam", "gd"):
        result = _reg(fixed, moving, overrides={
            "optimizer": optimizer, "learning_rate": 500.0, "shrink": [1], "iterations": 20})
        assert result.stop_reasons == ["no-overlap"], optimizer
        t = result.transform.translation.detach()
        assert bool(torch.isfinite(t).all()) and float(t.abs().max()) < 50.0
        assert math.isfinite(result.levels[0].final_loss)
        assert result.report()["stop_reasons"] == ["no-overlap"]


class _NaNAfter(MutualInformation):
    """MI that turns NaN after a few calls (to test the non-finite stop)."""

    name = "nan-after"
    calls = 0

    def loss(self, *args):
        type(self).calls += 1
        out = super().loss(*args)
        return out * math.nan if type(self).calls > 5 else out


def test_non_finite_loss_stops_and_restores(pair):
    fixed, moving, _ = pair
    register_metric("test-nan-after", _NaNAfter, overwrite=True)
    _NaNAfter.calls = 0
    result = register(fixed, moving, "translation", "test-nan-after", progress=False,
                      overrides={"shrink": [1], "iterations": 50})
    assert result.stop_reasons == ["non-finite"]
    assert result.levels[0].iterations == 5
    assert bool(torch.isfinite(result.transform.translation).all())


# ---------------------------------------------------------------------------------- seeds, threads
def test_same_seed_gives_bitwise_identical_results(pair):
    fixed, moving, _ = pair
    a = _reg(fixed, moving, seed=7, transform="rigid")
    b = _reg(fixed, moving, seed=7, transform="rigid")
    c = _reg(fixed, moving, seed=8, transform="rigid")
    pa = [p.detach().clone() for p in a.transform.parameters()]
    pb = [p.detach().clone() for p in b.transform.parameters()]
    assert all(torch.equal(x, y) for x, y in zip(pa, pb))
    assert [lv.losses for lv in a.levels] == [lv.losses for lv in b.levels]
    assert [lv.losses for lv in a.levels] != [lv.losses for lv in c.levels]


def test_threads_are_set_for_the_call_and_restored(pair):
    fixed, moving, _ = pair
    seen = []

    class Spy(Callback):
        def on_end(self, state):  # outside the levels (small levels run on one thread)
            seen.append(torch.get_num_threads())

    before = torch.get_num_threads()
    _reg(fixed, moving, threads=2, callbacks=[Spy()])
    assert set(seen) == {2}
    assert torch.get_num_threads() == before


# ---------------------------------------------------------------------------------- init, masks
def test_init_moments_and_given_transform(grid2d):
    base = blob_image(grid2d)
    shifted = Image(base.data, Grid(grid2d.size, grid2d.spacing, (grid2d.origin[0] + 7.0,
                                                                  grid2d.origin[1] - 4.0)))
    none = {"iterations": 0, "shrink": [1]}
    moments = register(base, shifted, "translation", "mi", init="moments", progress=False,
                       overrides=none)
    torch.testing.assert_close(moments.transform.translation.detach(),
                               torch.tensor([7.0, -4.0]), atol=1e-3, rtol=0)
    centers = register(base, shifted, "translation", "mi", init="centers", progress=False,
                       overrides=none)
    torch.testing.assert_close(centers.transform.translation.detach(),
                               torch.tensor([7.0, -4.0]), atol=1e-4, rtol=0)
    given = Affine(2, center=grid2d.center, translation=[1.0, 2.0],
                   matrix=[[1.02, 0.0], [0.01, 0.99]])
    result = register(base, shifted, "affine", "mi", init=given, progress=False,
                      overrides={"iterations": 0, "shrink": [1]})
    assert mean_error_vox(result.transform, given, grid2d) < 1e-5


def test_masks_restrict_the_samples(pair):
    fixed, moving, true = pair
    mask = torch.zeros(fixed.grid.shape, dtype=torch.bool)
    mask[12:52, 12:52] = True
    result = _reg(fixed, moving, fixed_mask=mask, moving_mask=torch.ones(moving.grid.shape),
                  overrides=quick(**{"sampling.strategy": "full", "iterations": [30, 30]}))
    assert result.levels[-1].samples == int(mask.sum())
    assert mean_error_vox(result.transform, true, fixed.grid) < 0.2


def test_float64_inputs_give_float64_transforms(pair):
    fixed, moving, _ = pair
    result = _reg(fixed.float(torch.float64), moving.float(torch.float64))
    assert result.transform.translation.dtype == torch.float64
    assert result.warped.dtype == torch.float64


# ---------------------------------------------------------------------------------- callbacks
def test_callbacks_receive_frozen_states(pair):
    fixed, moving, _ = pair
    history = History()
    events = []

    class Recorder(Callback):
        def on_level_start(self, state):
            events.append(("start", state.stage, state.level))

        def on_level_end(self, state):
            events.append(("end", state.stage, state.level, state.stop_reason))

        def on_end(self, state):
            events.append(("done",))

    result = _reg(fixed, moving, transform="affine", callbacks=[history, Recorder()])
    assert events[0] == ("start", 0, 0) and events[-1] == ("done",)
    assert [e for e in events if e[0] == "end"] == [
        ("end", lv.stage, lv.level, lv.stop_reason) for lv in result.levels]
    assert len(history.steps) == sum(lv.iterations for lv in result.levels)
    state = history.steps[0]
    assert isinstance(state, StepState) and state.quantity_name.startswith("MI")
    assert state.loss == pytest.approx(-state.metric)
    assert state.learning_rate > 0 and 0 < state.overlap <= 1 and state.elapsed_s >= 0
    with pytest.raises(AttributeError):
        state.loss = 0.0  # type: ignore[misc]
    assert history.losses(stage=0, level=0) == list(result.levels[0].losses)


def test_stop_ends_a_level_and_stop_all_ends_everything(pair):
    fixed, moving, _ = pair

    class StopAt(Callback):
        def __init__(self, at, all_levels=False):
            self.at, self.all_levels = at, all_levels

        def on_step(self, state):
            if state.iteration == self.at:
                return Stop("enough", all_levels=self.all_levels) if self.all_levels else Stop

    result = _reg(fixed, moving, callbacks=[StopAt(3)])
    assert result.stop_reasons == ["callback", "callback"]
    assert [lv.iterations for lv in result.levels] == [4, 4]
    result = _reg(fixed, moving, transform="affine", callbacks=[StopAt(2, all_levels=True)])
    assert result.stop_reasons == ["callback"]


def test_stop_with_powell(pair):
    fixed, moving, _ = pair

    class StopNow(Callback):
        def on_step(self, state):
            return Stop

    result = _reg(fixed, moving, callbacks=[StopNow()],
                  overrides={"optimizer": "powell", "shrink": [1], "iterations": 10})
    assert result.stop_reasons == ["callback"] and result.levels[0].iterations == 1


def test_early_stopping(pair):
    fixed, moving, _ = pair
    result = _reg(fixed, moving, callbacks=[EarlyStopping(patience=3, min_delta=10.0)])
    assert result.stop_reasons == ["callback", "callback"]
    assert all(lv.iterations == 4 for lv in result.levels)
    with pytest.raises(ConfigError):
        EarlyStopping(patience=0)


def test_progress_bar_draws_and_closes(pair):
    from rich.console import Console

    fixed, moving, _ = pair
    out = io.StringIO()
    bar = Progress(console=Console(file=out, force_terminal=False, width=120))
    _reg(fixed, moving, callbacks=[bar])
    text = out.getvalue()
    assert "stage 1 translation level 2/2" in text and "MI" in text
    assert bar._progress is None  # stopped at the end


def test_progress_draws_a_live_bar_on_a_terminal(pair):
    from rich.console import Console

    fixed, moving, _ = pair
    out = io.StringIO()
    bar = Progress(console=Console(file=out, force_terminal=True, width=120))
    _reg(fixed, moving, callbacks=[bar])
    text = out.getvalue()
    assert "\x1b[" in text and "stage 1 translation level 2/2" in text  # ANSI redraws
    assert " iterations, loss " not in text  # no plain lines on a terminal


def test_progress_closes_on_error(pair):
    fixed, moving, _ = pair
    from rich.console import Console

    bar = Progress(console=Console(file=io.StringIO()))

    class Boom(Callback):
        def on_step(self, state):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        _reg(fixed, moving, callbacks=[bar, Boom()])
    assert bar._progress is None


def test_rigid_result_keeps_its_class(pair):
    fixed, moving, _ = pair
    result = _reg(fixed, moving, transform="rigid")
    assert isinstance(result.transform, Rigid)
    assert result.transform.translation.requires_grad


def test_paths_are_read(pair, tmp_path):
    from itreg import io

    fixed, moving, true = pair
    io.write_image(fixed, tmp_path / "f.nii.gz")
    io.write_image(moving, tmp_path / "m.nii.gz")
    mask = Image(torch.ones(fixed.grid.shape, dtype=torch.uint8), fixed.grid)
    io.write_image(mask, tmp_path / "mask.nii.gz")
    result = _reg(str(tmp_path / "f.nii.gz"), tmp_path / "m.nii.gz",
                  fixed_mask=tmp_path / "mask.nii.gz", overrides=quick())
    assert mean_error_vox(result.transform, true, fixed.grid) < 0.2
    assert "f.nii.gz" in result.report()["settings"]["fixed"]
    with pytest.raises(ImageReadError, match="nope.nii.gz"):
        _reg(tmp_path / "nope.nii.gz", moving)

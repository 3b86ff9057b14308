"""Registration with a trained network (``register_with_net``, ``itreg register --net``):
outputs as iterative registration writes them, transforms SimpleITK applies like itreg, and
``--refine`` continuing from the prediction."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from itreg.blocks.modelfile import save_model
from itreg.engine.config import load_preset
from itreg.errors import ConfigError, GeometryError, InvalidImageError, ModelFileError
from itreg.grid import Grid
from itreg.image import Image
from itreg.io import write_image
from itreg.nets.inference import refine_config, register_with_net
from itreg.nets.regnets import AffineNet, DeformNet, save_regnet
from itreg.results import save_registration
from itreg.transforms import Affine, BSpline, Translation

SHIFT = (3.0, -2.0)


def _blobs(grid: Grid, transform=None) -> Image:
    """Smooth blobs in world space; with `transform` the image is ``I(T^-1 x)``."""
    pts = grid.points(dtype=torch.float64)
    if transform is not None:
        pts = transform.inverse().to(torch.float64)(pts)
    out = torch.zeros(grid.shape, dtype=torch.float64)
    for cx, cy, r, v in [(30, 30, 12, 1.0), (20, 38, 5, 0.5), (42, 24, 6, 0.7), (36, 42, 4, 0.3)]:
        out += v * torch.exp(-((pts[..., 0] - cx) ** 2 + (pts[..., 1] - cy) ** 2) / (2 * r * r))
    return Image(out.float()[None], grid)


@pytest.fixture(scope="module")
def pair():
    grid = Grid((64, 64), (1.0, 1.0))
    true = Translation(2, translation=torch.tensor(SHIFT))
    fixed = _blobs(grid)
    moving = _blobs(grid, true)  # moving(x + SHIFT) = fixed(x): T(x) = x + SHIFT
    return fixed, moving, true


def _perturbed_affine_net() -> AffineNet:
    torch.manual_seed(3)
    net = AffineNet(2, features=(4, 8, 8, 8))
    with torch.no_grad():
        net.head.weight.normal_(0.0, 0.05)
        net.head.bias.copy_(torch.tensor([0.02, -0.03, 0.05, 0.01, 0.03, -0.04]))
    return net


def _mean_error(transform, true, grid) -> float:
    pts = grid.points(dtype=torch.float32)
    with torch.no_grad():
        return float((transform(pts) - true(pts)).norm(dim=-1).mean())


def test_prediction_is_the_networks_and_written_tfm_maps_like_it(pair, tmp_path):
    fixed, moving, _ = pair
    net = _perturbed_affine_net()
    path = save_regnet(tmp_path / "affine.pt", net, extra={"train": {"loss": "mi"}})
    res = register_with_net(fixed, moving, path)
    expected = net.predict(fixed, moving)
    pts = fixed.grid.points()[::7, ::5].reshape(-1, 2)
    assert torch.allclose(res.transform(pts), expected(pts), atol=1e-5)
    assert not torch.allclose(expected(pts), pts, atol=1e-2)  # a non-trivial affine
    assert res.refinement is None and res.stop_reasons == ["network"]
    assert res.wall_time_s == res.inference_time_s > 0
    out = save_registration(res, tmp_path / "out")
    assert {p.name for p in out.iterdir() if not p.name.startswith(".")} == {
        "warped.nii.gz", "transform.tfm", "transform.h5", "inverse.tfm", "report.json"}
    tfm = sitk.ReadTransform(str(out / "transform.tfm"))
    for p in pts[:20].double().tolist():
        assert np.allclose(tfm.TransformPoint(p), expected(torch.tensor(p)).tolist(), atol=1e-4)
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "network" and report["model"]["kind"] == "regnet-affine"
    assert report["wall_time_s"] > 0


def test_deform_net_writes_a_displacement_field(pair, tmp_path):
    fixed, moving, _ = pair
    net = DeformNet(2, features=(4, 4, 4, 4, 4))
    path = save_regnet(tmp_path / "deform.pt", net)
    res = register_with_net(fixed, moving, path)
    out = save_registration(res, tmp_path / "out")
    assert (out / "displacement.nii.gz").exists()
    field = sitk.ReadImage(str(out / "displacement.nii.gz"))
    assert np.abs(sitk.GetArrayFromImage(field)).max() == 0.0  # identity at initialisation


def test_refine_continues_from_the_prediction_and_improves(pair, tmp_path):
    fixed, moving, true = pair
    net = AffineNet(2, features=(4, 8, 8, 8))  # identity prediction: far from the truth
    path = save_regnet(tmp_path / "affine.pt", net, extra={"train": {"loss": "ncc"}})
    res = register_with_net(fixed, moving, path, refine=True, progress=False,
                            overrides={"stages.0.iterations": 60})
    before = _mean_error(res.prediction, true, fixed.grid)
    after = _mean_error(res.transform, true, fixed.grid)
    assert before > 3.0 and after < 0.3, (before, after)
    # The training loss is the refinement's metric; the rigid stage is dropped.
    stages = res.refinement.config.stages
    assert [s.transform for s in stages] == ["affine"]
    assert stages[0].metric.name == "ncc"
    assert res.wall_time_s == pytest.approx(res.inference_time_s + res.refinement.wall_time_s)
    assert res.report()["method"] == "network+refine"


def test_refine_keeps_the_training_metrics_options(pair, tmp_path):
    fixed, moving, _ = pair
    path = save_regnet(tmp_path / "affine.pt", AffineNet(2, features=(4, 8, 8, 8)),
                       extra={"train": {"loss": "mi", "loss_kwargs": {"bins": 24}}})
    res = register_with_net(fixed, moving, path, refine=True, progress=False,
                            overrides={"stages.0.iterations": 1})
    assert res.refinement.config.stages[0].metric.options["bins"] == 24
    res = register_with_net(fixed, moving, path, refine=True, progress=False, metric="nmi",
                            overrides={"stages.0.iterations": 1})
    assert res.refinement.config.stages[0].metric.name == "nmi"


def test_refine_config_drops_the_stages_the_network_replaces():
    deform = refine_config("regnet-deform")
    assert [s.transform for s in deform.stages] == ["bspline"]
    # The network did the coarse work: the FFD stage starts at the preset's second level.
    full = next(s for s in load_preset("bspline").stages if s.transform == "bspline")
    stage = deform.stages[0]
    assert stage.shrink == full.shrink[1:] and stage.iterations == full.iterations[1:]
    assert stage.smoothing_mm == full.smoothing_mm[1:]
    assert stage.learning_rate == full.learning_rate[1:]
    assert stage.sampling.count == full.sampling.count[1:]
    cascade = refine_config("regnet-cascade", metric="nmi", transform="svf")
    assert all(not s.is_linear for s in cascade.stages)
    assert {s.metric.name for s in cascade.stages} == {"nmi"}
    affine = refine_config("regnet-affine", transform="bspline")
    assert [s.transform for s in affine.stages] == ["affine", "bspline"]
    with pytest.raises(ConfigError, match="cannot refine"):
        refine_config("dcc")


def _bumpy_deform_net() -> DeformNet:
    torch.manual_seed(5)
    net = DeformNet(2, features=(4, 4, 4, 4, 4))
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0.0, 0.3)
    return net


@pytest.mark.parametrize("how", ["fit", "compose"])
def test_refine_of_a_deformable_prediction_starts_where_refine_init_says(pair, tmp_path, how):
    fixed, moving, _ = pair
    path = save_regnet(tmp_path / "deform.pt", _bumpy_deform_net(),
                       extra={"train": {"loss": "mi"}})
    # No iterations: the refinement returns its starting transform.
    res = register_with_net(fixed, moving, path, refine=True, refine_init=how, progress=False,
                            overrides={"stages.0.iterations": 0})
    grid = fixed.grid
    with torch.no_grad():
        predicted = res.prediction.displacement(grid, dtype=torch.float64)
        got = res.transform.displacement(grid, dtype=torch.float64)
    assert float(predicted.abs().max()) > 0.5  # a non-trivial prediction
    spacing = res.refinement.config.stages[0].control_spacing_mm
    want = (BSpline.fit(predicted, grid, spacing, dtype=torch.float64).displacement(grid)
            if how == "fit" else predicted)
    torch.testing.assert_close(got, want.detach(), atol=1e-4, rtol=0)
    if how == "fit":  # the fit is smoother than the network's field
        assert float((got - predicted).abs().max()) > 1e-3
    with pytest.raises(ConfigError, match="refine_init"):
        register_with_net(fixed, moving, path, refine=True, refine_init="warp")


def test_non_network_model_file_is_refused(pair, tmp_path):
    fixed, moving, _ = pair
    path = save_model(tmp_path / "other.pt", "demo", {"n": 1},
                      torch.nn.Linear(1, 1).state_dict())
    with pytest.raises(ConfigError, match="not a pairwise registration network"):
        register_with_net(fixed, moving, path)
    with pytest.raises(ModelFileError):
        register_with_net(fixed, moving, tmp_path / "missing.pt")


def test_bad_images_get_the_engines_errors(pair, tmp_path):
    fixed, moving, _ = pair
    path = save_regnet(tmp_path / "net.pt", _perturbed_affine_net())
    nan = moving.data.clone()
    nan[0, 5, 5] = float("nan")
    with pytest.raises(InvalidImageError, match="NaN"):
        register_with_net(fixed, moving.with_data(nan), path)
    with pytest.raises(InvalidImageError, match="constant"):
        register_with_net(fixed.with_data(torch.ones_like(fixed.data)), moving, path)
    vol = Image(torch.rand(1, 8, 8, 8), Grid((8, 8, 8), (1.0, 1.0, 1.0)))
    with pytest.raises(GeometryError, match="3D"):
        register_with_net(fixed, vol, path)


def test_cli_register_with_net_and_refine(pair, tmp_path, cli):
    fixed, moving, true = pair
    f, m = tmp_path / "fixed.nii.gz", tmp_path / "moving.nii.gz"
    write_image(fixed, f)
    write_image(moving, m)
    model = save_regnet(tmp_path / "net.pt", AffineNet(2, features=(4, 8, 8, 8)),
                        extra={"train": {"loss": "mi"}})
    code, out, err = cli(["register", str(f), str(m), "--net", str(model), "-o",
                           str(tmp_path / "a"), "-q"])
    assert code == 0, err
    assert "network" in out
    code, out, err = cli(["register", str(f), str(m), "--net", str(model), "--refine",
                           "--metric", "ncc", "--set", "stages.0.iterations=60",
                           "-o", str(tmp_path / "b"), "-q"])
    assert code == 0, err
    report = json.loads((tmp_path / "b" / "report.json").read_text())
    assert report["method"] == "network+refine" and report["wall_time_s"] > 0
    tfm = sitk.ReadTransform(str(tmp_path / "b" / "transform.tfm"))
    got = torch.tensor(tfm.TransformPoint((30.0, 30.0)))
    assert (got - true(torch.tensor([30.0, 30.0]))).norm() < 0.3
    # --refine without --net, and refinement settings without --refine, are input errors.
    code, _, err = cli(["register", str(f), str(m), "--refine", "-o", str(tmp_path / "c")])
    assert code == 2 and "--net" in err
    code, _, err = cli(["register", str(f), str(m), "--net", str(model), "--metric", "mi",
                         "-o", str(tmp_path / "d")])
    assert code == 2 and "--refine" in err
    code, _, err = cli(["register", str(f), str(m), "--net", str(model), "--refine-init",
                         "compose", "-o", str(tmp_path / "e")])
    assert code == 2 and "--refine-init" in err
    assert not any((tmp_path / d).exists() for d in "cde")


def test_affine_prediction_is_an_affine_about_the_fixed_centre(pair):
    fixed, moving, _ = pair
    pred = _perturbed_affine_net().predict(fixed, moving)
    assert isinstance(pred, Affine)
    assert torch.allclose(pred.center, torch.tensor(fixed.grid.center, dtype=pred.center.dtype))

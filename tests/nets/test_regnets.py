"""Registration networks: identity at init, geometry, SVF inverse consistency, SimpleITK export,
model-file round trip, padding and bad inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from itreg.blocks.modelfile import save_model
from itreg.errors import ConfigError, GeometryError, ModelFileError
from itreg.grid import Grid
from itreg.image import Image
from itreg.io import to_sitk, write_displacement_field, write_transform
from itreg.nets.regnets import (
    AffineNet,
    Cascade,
    DeformNet,
    load_regnet,
    save_regnet,
)
from itreg.transforms import Affine, Compose, DisplacementField
from itreg.transforms.dense import integrate_velocity
from itreg.warp import resample

SMALL = (4, 4, 8, 8, 8)


def _oblique_grid_2d(size=(23, 19)) -> Grid:
    a = math.radians(20.0)
    return Grid(size, (1.7, 2.3), (-12.0, 7.5), (math.cos(a), -math.sin(a), math.sin(a),
                                                  math.cos(a)))


def _blob(grid: Grid, shift=(0.0, 0.0), seed: int = 0) -> Image:
    """A smooth random image: a few Gaussian blobs in world space."""
    g = torch.Generator().manual_seed(seed)
    pts = grid.points(dtype=torch.float64)
    c = torch.tensor(grid.center, dtype=torch.float64)
    out = torch.zeros(grid.shape, dtype=torch.float64)
    ext = torch.tensor(grid.extent(), dtype=torch.float64)
    for _ in range(5):
        mu = c + (torch.rand(grid.ndim, generator=g, dtype=torch.float64) - 0.5) * ext * 0.6
        mu = mu + torch.tensor(shift[: grid.ndim], dtype=torch.float64)
        s = 0.12 * float(ext.min()) * (1 + torch.rand(1, generator=g).item())
        out += torch.exp(-((pts - mu) ** 2).sum(-1) / (2 * s * s))
    return Image(out.float()[None], grid)


def _perturb(net: torch.nn.Module, scale: float = 0.05, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))


def _pair(grid: Grid):
    return _blob(grid, seed=0), _blob(grid, shift=(2.0, -1.5, 1.0), seed=0)


# ------------------------------------------------------------------------------ identity
def test_identity_at_initialisation_on_an_oblique_grid():
    grid = _oblique_grid_2d()
    fixed, moving = _pair(grid)
    torch.manual_seed(0)
    tf = AffineNet(2, features=(4, 8)).predict(fixed, moving)
    assert isinstance(tf, Affine)
    assert torch.allclose(tf.matrix(), torch.eye(2), atol=1e-6)
    assert torch.allclose(tf.offset(), torch.zeros(2), atol=1e-4)
    # centre of rotation: the fixed image centre
    assert np.allclose(tf.center.numpy(), grid.center, atol=1e-4)
    field = DeformNet(2, features=SMALL).predict(fixed, moving)
    assert isinstance(field, DisplacementField)
    assert float(field.field.abs().max()) == 0.0
    casc = Cascade(AffineNet(2, features=(4,)), DeformNet(2, features=SMALL, field="svf"))
    tf = casc.predict(fixed, moving)
    assert isinstance(tf, Compose)
    with torch.no_grad():
        disp = tf.displacement(grid)
    assert float(disp.abs().max()) < 1e-3


def test_odd_sizes_are_padded_and_cropped_2d_and_3d():
    for grid in (Grid((13, 19), (1.0, 2.0)), Grid((7, 9, 11), (2.0, 1.0, 1.5))):
        d = grid.ndim
        x = torch.rand(2, 1, *grid.shape)
        net = DeformNet(d, features=(2, 2, 2, 2, 2))
        _perturb(net)
        out = net(x, x.flip(0), grid)
        assert out.warped.shape == x.shape
        assert out.displacement.shape == (2, d, *grid.shape)
        assert out.points.shape == (2, *grid.shape, d)
        aff = AffineNet(d, features=(2, 2))
        _perturb(aff)
        out = aff(x, x.flip(0), grid)
        assert out.warped.shape == x.shape and out.affine.shape == (2, d + 1, d + 1)


# ------------------------------------------------------------------------------ geometry
def test_affine_prediction_is_the_normalised_map_in_world_space():
    """T(x) in normalised coordinates equals theta applied to x's normalised coordinates."""
    grid = _oblique_grid_2d()
    fixed, moving = _pair(grid)
    net = AffineNet(2, features=(4,))
    theta = torch.tensor([[0.05, 0.1, 0.03], [-0.08, -0.02, -0.06]])  # added to identity
    with torch.no_grad():
        net.head.bias.copy_(theta.reshape(-1))
    tf = net.predict(fixed, moving)
    pts = grid.points(dtype=torch.float64)[::3, ::4].reshape(-1, 2)
    u = grid.world_to_normalized(pts)
    full = torch.eye(2, 3, dtype=torch.float64) + theta.double()
    expected = u @ full[:, :2].T + full[:, 2]
    got = grid.world_to_normalized(tf(pts.float()).double())
    assert torch.allclose(got, expected, atol=1e-4)
    # the batch forward warps exactly as itreg's resampling through the predicted transform
    f, m = net.prepare(fixed, moving)
    with torch.no_grad():
        out = net(f, m, grid)
    ref = resample(Image(m[0], grid), tf, grid, mode="linear")
    assert torch.allclose(out.warped[0], ref.data, atol=1e-4)


def test_deform_field_is_converted_to_world_mm():
    """A constant head bias of one voxel along i moves points by direction[:, 0] * spacing[0]."""
    grid = _oblique_grid_2d()
    net = DeformNet(2, features=SMALL)
    with torch.no_grad():
        net.head.bias.copy_(torch.tensor([1.0, -2.0]))
    x = torch.rand(1, 1, *grid.shape)
    with torch.no_grad():
        disp = net(x, x, grid).displacement[0]
    lin = grid.index_to_world_matrix()[:2, :2]
    expected = lin @ np.array([1.0, -2.0])
    assert np.allclose(disp.reshape(2, -1).mean(1).numpy(), expected, atol=1e-5)
    assert float(disp.std(dim=(1, 2)).max()) < 1e-5


def test_svf_forward_and_negated_field_compose_to_identity():
    grid = Grid((40, 36), (1.5, 1.5))
    net = DeformNet(2, features=(4, 4, 4, 4, 4), field="svf", steps=7)
    _perturb(net, 0.05, seed=3)
    x = _blob(grid).data[None]
    with torch.no_grad():
        out = net(x, x.flip(-1), grid)
        v = out.velocity[0]
        v = v * (3.0 / float(v.abs().max()))  # at most 3 mm: a substantial deformation
        fwd = integrate_velocity(v, grid, 7)
        bwd = integrate_velocity(-v, grid, 7)
        pts = grid.points()
        roundtrip = Compose(DisplacementField(bwd, grid), DisplacementField(fwd, grid))(pts)
        # the same field used as a plain displacement is not inverted by its negation
        naive = Compose(DisplacementField(-v, grid), DisplacementField(v, grid))(pts)
    inner = (slice(4, -4), slice(4, -4))
    err = (roundtrip - pts)[inner].norm(dim=-1)
    naive_err = (naive - pts)[inner].norm(dim=-1)
    assert float(err.max()) < 0.1 * float(naive_err.max())
    assert float(err.mean()) < 0.02
    assert float(fwd.abs().max()) > 1.0  # the map is not trivially small


# ------------------------------------------------------------------------------ SimpleITK
def _sitk_resample(moving: Image, fixed: Image, tx: sitk.Transform) -> np.ndarray:
    out = sitk.Resample(to_sitk(moving), to_sitk(fixed), tx, sitk.sitkLinear, 0.0,
                        sitk.sitkFloat64)
    return sitk.GetArrayFromImage(out)


def test_exported_affine_tfm_matches_itreg_warp_in_simpleitk(tmp_path):
    grid = _oblique_grid_2d()
    fixed, moving = _pair(grid)
    moving_grid = Grid((30, 27), (1.3, 1.1), (-20.0, -3.0))
    moving = resample(moving, None, moving_grid)  # another grid than the fixed one
    net = AffineNet(2, features=(4, 8))
    _perturb(net, 0.1)
    with torch.no_grad():
        net.head.bias.add_(torch.tensor([0.05, 0.08, 0.05, -0.06, 0.03, -0.04]))
    tf = net.predict(fixed, moving)
    assert float((tf.matrix() - torch.eye(2)).abs().max()) > 0.01
    path = write_transform(tf, tmp_path / "t.tfm")
    ours = resample(moving, tf, grid, mode="linear").data[0].double().numpy()
    theirs = _sitk_resample(moving, fixed, sitk.ReadTransform(str(path)))
    assert np.abs(ours - theirs).max() < 1e-4


def test_exported_displacement_and_cascade_match_simpleitk(tmp_path):
    grid = _oblique_grid_2d((21, 18))
    fixed, moving = _pair(grid)
    net = Cascade(AffineNet(2, features=(4,)), DeformNet(2, features=SMALL))
    _perturb(net, 0.1, seed=5)
    tf = net.predict(fixed, moving)
    with torch.no_grad():
        assert float(tf.displacement(grid).abs().max()) > 0.5
        ours = resample(moving, tf, grid, mode="linear").data[0].double().numpy()
    # the whole map as a displacement-field image
    write_displacement_field(tf, grid, tmp_path / "d.nii.gz", dtype=torch.float64)
    field = sitk.ReadImage(str(tmp_path / "d.nii.gz"), sitk.sitkVectorFloat64)
    theirs = _sitk_resample(moving, fixed, sitk.DisplacementFieldTransform(field))
    assert np.abs(ours - theirs).max() < 1e-4
    # the composite (affine + displacement field) as an ITK transform file
    write_transform(tf, tmp_path / "c.h5")
    theirs = _sitk_resample(moving, fixed, sitk.ReadTransform(str(tmp_path / "c.h5")))
    assert np.abs(ours - theirs).max() < 1e-4
    # and the batch forward warps the same way
    f, m = net.prepare(fixed, moving)
    with torch.no_grad():
        out = net(f, m, grid)
    ref = resample(Image(m[0], grid), tf, grid, mode="linear").data
    assert torch.allclose(out.warped[0], ref, atol=1e-4)


# ------------------------------------------------------------------------------ files
@pytest.mark.parametrize("kind", ["affine", "deform", "cascade"])
def test_save_load_reproduces_predictions_bitwise(tmp_path, kind):
    grid = Grid((20, 22), (2.0, 2.0))
    fixed, moving = _pair(grid)
    nets = {
        "affine": lambda: AffineNet(2, features=(4, 8), norm="batch"),
        "deform": lambda: DeformNet(2, features=SMALL, se=True, field="svf", steps=5),
        "cascade": lambda: Cascade(AffineNet(2, features=(4,), intensity="minmax"),
                                   DeformNet(2, features=SMALL, norm="none")),
    }
    net = nets[kind]()
    _perturb(net, 0.05)
    path = save_regnet(tmp_path / "n.pt", net, extra={"train": {"loss": "mi"}})
    again = load_regnet(path)
    assert type(again) is type(net) and again.config() == net.config()
    assert again.extra == {"train": {"loss": "mi"}}
    with torch.no_grad():
        a = net.eval().predict(fixed, moving).displacement(grid)
        b = again.predict(fixed, moving).displacement(grid)
    assert torch.equal(a, b)


def test_load_regnet_refuses_other_models_and_versions(tmp_path):
    save_model(tmp_path / "other.pt", "neural-critic", {}, {})
    with pytest.raises(ModelFileError, match="not a registration network"):
        load_regnet(tmp_path / "other.pt")
    path = save_regnet(tmp_path / "n.pt", AffineNet(2, features=(2,)))
    payload = torch.load(path, weights_only=True)
    payload["version"] = 99
    torch.save(payload, tmp_path / "v.pt")
    with pytest.raises(ModelFileError, match="version"):
        load_regnet(tmp_path / "v.pt")


# ------------------------------------------------------------------------------ bad input
def test_bad_inputs_raise_itreg_errors():
    grid = Grid((16, 16))
    x = torch.rand(1, 1, 16, 16)
    net = DeformNet(2, features=(2, 2, 2, 2, 2))
    with pytest.raises(GeometryError, match="2D network"):
        net(x[0], x[0], grid)
    with pytest.raises(GeometryError, match="channel"):
        net(torch.rand(1, 2, 16, 16), torch.rand(1, 2, 16, 16), grid)
    with pytest.raises(GeometryError, match="same shape"):
        net(x, torch.rand(1, 1, 16, 15), grid)
    with pytest.raises(GeometryError, match="grid"):
        net(x, x, Grid((15, 16)))
    with pytest.raises(GeometryError):
        net.predict(Image.from_tensor(torch.rand(4, 4, 4)), Image.from_tensor(torch.rand(4, 4, 4)))
    with pytest.raises(ConfigError, match="normalisation"):
        DeformNet(2, norm="layer")
    with pytest.raises(ConfigError, match="field"):
        DeformNet(2, field="bspline")
    with pytest.raises(ConfigError, match="features"):
        DeformNet(2, features=(4, 4), levels=4)
    with pytest.raises(GeometryError):
        AffineNet(4)
    with pytest.raises(GeometryError):
        Cascade(AffineNet(2), DeformNet(3))
    with pytest.raises(ConfigError):
        save_regnet("x.pt", torch.nn.Linear(2, 2))


def test_padding_is_undone_exactly_by_the_crop():
    from itreg.nets.regnets import _pad

    for shape in ((1, 2, 13, 19), (2, 1, 7, 9, 11), (1, 1, 32, 48)):
        x = torch.rand(shape)
        padded, crop = _pad(x, 4)
        assert all(n % 16 == 0 and n >= 32 for n in padded.shape[2:])
        assert torch.equal(padded[(slice(None), slice(None), *crop)], x)
        # symmetric: the padding splits (almost) evenly on both sides of every axis
        for n, c in zip(padded.shape[2:], crop):
            assert abs(c.start - (n - c.stop)) <= 1

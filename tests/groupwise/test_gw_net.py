"""Applying a deep-combined-computing model to a group: the direction of the returned transforms
(a group of known shifts on an LPS-like grid), the outputs on disk (read back by SimpleITK) and
bad input."""

from __future__ import annotations

import json

import pytest
import SimpleITK as sitk
import torch

from itreg.blocks.modelfile import save_model
from itreg.errors import ConfigError, GeometryError, OutputExistsError
from itreg.grid import Grid
from itreg.image import Image
from itreg.nets.dcc import DCCNet, DCCOutput
from itreg.nets.dcc_apply import apply_dcc, save_dcc

#: World shifts (mm) of the three images' content; zero mean, as the unbiased mode expects.
SHIFTS = ((4.0, 0.0), (-2.0, 2.0), (-2.0, -2.0))


class ShiftNet(DCCNet):
    """A DCC network whose field is the given constant shift of each image (index-axis mm)."""

    def __init__(self, axis_shifts: torch.Tensor) -> None:
        super().__init__(ndim=2, domains=3, classes=3, channels=2, levels=1, dropout=0.0)
        self.register_buffer("axis_shifts", axis_shifts)

    def forward(self, images, domains, train="all") -> DCCOutput:
        b, n = images.shape[:2]
        size = images.shape[-2:]
        field = self.axis_shifts[:n].reshape(1, n, 2, 1, 1).expand(b, n, 2, *size)
        logits = torch.zeros(b, n, 3, *size)
        logits[:, :, 1] = (images[:, :, 0] > 0).float() * 4.0  # some segmentation
        return DCCOutput(logits, field.clone())


def _scene(points: torch.Tensor) -> torch.Tensor:
    c1 = torch.tensor([-14.0, -16.0])
    c2 = torch.tensor([-28.0, -24.0])
    d1 = ((points - c1) ** 2).sum(-1)
    d2 = ((points - c2) ** 2).sum(-1)
    return torch.exp(-d1 / 60.0) + 0.6 * torch.exp(-d2 / 30.0)


def _shift_group():
    grid = Grid((22, 20), (2.0, 2.0), (0.0, 0.0), (-1.0, 0.0, 0.0, -1.0))
    pts = grid.points()
    images = [Image(_scene(pts - torch.tensor(t)), grid) for t in SHIFTS]
    rot = torch.tensor(grid.direction_matrix(), dtype=torch.float32)
    axis = torch.stack([rot.T @ torch.tensor(t) for t in SHIFTS])  # world = rot @ axis
    return grid, images, ShiftNet(axis)


def test_transforms_map_common_points_into_each_image() -> None:
    grid, images, net = _shift_group()
    result = apply_dcc(net, images, normalize="none")
    pts = grid.points()
    for j, t in enumerate(SHIFTS):
        mapped = result.transforms[j](pts)
        torch.testing.assert_close(mapped, pts + torch.tensor(t), atol=1e-4, rtol=0)
    # Every image resampled through its phi_j shows the one common scene.
    interior = (slice(None), slice(3, -3), slice(3, -3))
    ref = _scene(pts)[None][interior]
    for w in result.warped:
        torch.testing.assert_close(w.data[interior], ref, atol=1e-4, rtol=0)
    before = max(float((img.data[interior] - ref).abs().max()) for img in images)
    assert before > 0.2
    assert [s.data.dtype for s in result.segmentations] == [torch.uint8] * 3
    assert result.probabilities.data.shape == (3, *grid.shape)
    assert result.wall_time_s > 0


def test_save_dcc_outputs_read_back_by_simpleitk(tmp_path) -> None:
    grid, images, net = _shift_group()
    result = apply_dcc(net, images, normalize="none")
    out = save_dcc(result, tmp_path / "out")
    report = json.loads((out / "report.json").read_text())
    assert report["kind"] == "groupwise-dcc"
    for name in ("segmentation.nii.gz", "probabilities.nii.gz", "template.nii.gz",
                 "0/warped.nii.gz", "0/transform.tfm", "0/displacement.nii.gz",
                 "2/segmentation.nii.gz", "2/probabilities.nii.gz"):
        assert (out / name).is_file() and name in report["outputs"]
    field = sitk.ReadImage(str(out / "1" / "displacement.nii.gz"), sitk.sitkVectorFloat64)
    tx = sitk.DisplacementFieldTransform(field)
    p = grid.points()[5, 7].tolist()
    moved = tx.TransformPoint(p)
    assert moved == pytest.approx([p[0] + SHIFTS[1][0], p[1] + SHIFTS[1][1]], abs=1e-4)
    with pytest.raises(OutputExistsError):
        save_dcc(result, out)


def test_model_file_and_bad_input(tmp_path) -> None:
    torch.manual_seed(0)
    net = DCCNet(ndim=2, domains=3, classes=3, channels=2, levels=2, dropout=0.0,
                 domain_names=["t1", "t2", "pd"], spacing_mm=2.0)
    path = save_model(tmp_path / "dcc.pt", "dcc", net.config(), net.state_dict(),
                      {"inference": {"zeta": 0.01, "priors": [0], "levels": 16,
                                     "sample_rate": 0.5}})
    _, images, _ = _shift_group()
    result = apply_dcc(path, images, ["pd", "t1", "t2"])
    assert result.settings["domains"] == [2, 0, 1] and result.settings["priors"] == [0]
    # At initialisation the network is the identity.
    pts = result.grid.points()
    torch.testing.assert_close(result.transforms[0](pts), pts)
    with pytest.raises(ConfigError):
        apply_dcc(path, images[:1])
    with pytest.raises(ConfigError):
        apply_dcc(path, images, ["t1", "t2", "flair"])
    with pytest.raises(ConfigError):
        apply_dcc(path, images + images[:1])  # 4 images, 3 domains, no domains given
    vol = Image(torch.rand(4, 5, 6), Grid((6, 5, 4), (1.0, 1.0, 1.0), (0, 0, 0),
                                          (1, 0, 0, 0, 1, 0, 0, 0, 1)))
    with pytest.raises(GeometryError):
        apply_dcc(path, [vol, vol, vol])

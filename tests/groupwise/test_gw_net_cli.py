"""``itreg groupwise IMG... --net dcc.pt``: a DCC model applied from the command line writes the
groupwise outputs plus per-image segmentations; bad input gets exit 2 and one line."""

from __future__ import annotations

import json

import pytest
import SimpleITK as sitk
import torch

from itreg.blocks.modelfile import save_model
from itreg.grid import Grid
from itreg.image import Image
from itreg.io import write_image
from itreg.nets.dcc import DCCNet


@pytest.fixture
def group(tmp_path):
    grid = Grid((24, 20), (2.0, 2.0))
    pts = grid.points()
    paths = []
    for j, c in enumerate(((20.0, 18.0), (22.0, 20.0), (24.0, 17.0))):
        data = torch.exp(-((pts - torch.tensor(c)) ** 2).sum(-1) / 50.0) * (1.0 + j)
        path = tmp_path / f"img{j}.nii.gz"
        write_image(Image(data[None], grid), path)
        paths.append(str(path))
    torch.manual_seed(0)
    net = DCCNet(ndim=2, domains=3, classes=3, channels=2, levels=2, dropout=0.0,
                 domain_names=["t1", "t2", "pd"], spacing_mm=2.0)
    model = save_model(tmp_path / "dcc.pt", "dcc", net.config(), net.state_dict(),
                       {"inference": {"zeta": 0.01, "priors": [0], "levels": 16,
                                      "sample_rate": 0.5}})
    return paths, model


def test_groupwise_net_writes_segmentations(group, tmp_path, cli):
    paths, model = group
    out = tmp_path / "out"
    code, stdout, err = cli(["groupwise", *paths, "--net", str(model), "--domains",
                              "t2,t1,pd", "-o", str(out), "-q"])
    assert code == 0, err
    assert "segmented 3 images" in stdout
    report = json.loads((out / "report.json").read_text())
    assert report["wall_time_s"] > 0
    for j in range(3):
        seg = sitk.ReadImage(str(out / str(j) / "segmentation.nii.gz"))
        assert seg.GetSize() == (24, 20)
        assert (out / str(j) / "warped.nii.gz").is_file()
    assert (out / "segmentation.nii.gz").is_file()


def test_groupwise_net_bad_input(group, tmp_path, cli):
    paths, model = group
    code, _, err = cli(["groupwise", *paths, "--net", str(model), "--domains", "t1,t2,flair",
                         "-o", str(tmp_path / "a")])
    assert code == 2 and "flair" in err
    code, _, err = cli(["groupwise", *paths, "--domains", "t1,t2,pd", "-o",
                         str(tmp_path / "b")])
    assert code == 2 and "--net" in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()

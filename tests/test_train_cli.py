"""`itreg train-metric`: DITR, DeepSim AE/seg, neural critics, errors (exit 2, nothing written)."""

import pytest
import torch

from itreg.image import Image
from itreg.io import write_image
from itreg.metrics import get_metric


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from itreg.phantoms import labels, load_mni
    from itreg.phantoms.pairs import pair_from_tissues
    from itreg.phantoms.slices import axial_slices

    d = tmp_path_factory.mktemp("train-cli")
    tissues = load_mni(4.0)
    nz = tissues["t1"].grid.shape[0]
    out = []
    for i, z in enumerate((nz // 2 - 2, nz // 2 + 2)):
        sl = axial_slices(tissues, z)
        p = pair_from_tissues(sl, "t2", "rigid", seed=i, pad_mm=24.0)
        paths = {k: d / f"{k}{i}.nii.gz" for k in ("f", "m", "mask", "lab")}
        write_image(p.fixed, paths["f"])
        write_image(p.moving, paths["m"])
        write_image(p.fixed_mask, paths["mask"])
        write_image(labels(sl), paths["lab"])
        out.append(paths)
    return d, out


TINY_DITR = ["--set", "schedule=[[1, 4.0]]", "--set", "channels=[4, 4, 8, 8]",
             "--set", "patches_per_epoch=256", "--set", "val_patches=128", "--set", "epochs=1",
             "--set", "batch_size=64", "--set", "threads=1", "--small", "--quiet"]
TINY_DS = ["--set", "channels=[4, 4, 4]", "--set", "crop_size=32", "--set", "steps_per_epoch=2",
           "--set", "epochs=1", "--set", "val_crops=4", "--set", "threads=1", "--small",
           "--quiet"]


def test_train_ditr_and_use_it(files, tmp_path, cli):
    _, f = files
    out = tmp_path / "ditr.pt"
    args = ["train-metric", "--kind", "ditr", "-o", str(out), *TINY_DITR]
    for p in f:
        args += ["--images", f"{p['f']},{p['m']}", "--masks", str(p["mask"])]
    code, stdout, err = cli(args)
    assert code == 0, err
    assert out.exists() and "IML1" in stdout
    metric = get_metric(f"ditr:{out}")
    img = torch.rand(1, 30, 30)
    assert torch.isfinite(metric(img, img))
    # The file exists now: refused without --force, and left untouched.
    before = out.read_bytes()
    code, _, err = cli(args)
    assert code == 2 and "exists" in err and out.read_bytes() == before


@pytest.mark.parametrize("kind", ["deepsim-ae", "deepsim-seg"])
def test_train_deepsim(files, tmp_path, cli, kind):
    _, f = files
    out = tmp_path / f"{kind}.pt"
    args = ["train-metric", "--kind", kind, "-o", str(out), *TINY_DS]
    for p in f:
        args += ["--images", str(p["f"])]
        if kind == "deepsim-seg":
            args += ["--labels", str(p["lab"])]
    code, _, err = cli(args)
    assert code == 0, err
    metric = get_metric(f"deepsim:{out}")
    assert metric.network.mode == kind.split("-")[1]
    img = torch.rand(1, 24, 24)
    assert float(metric(img, img)) == pytest.approx(0.0, abs=1e-6)


def test_bad_inputs_exit_2_without_output(files, tmp_path, cli):
    _, f = files
    out = tmp_path / "x.pt"
    cases = [
        ["--kind", "ditr", "--images", str(f[0]["f"])],  # not a pair
        ["--kind", "deepsim-seg", "--images", str(f[0]["f"])],  # no labels
        ["--kind", "ditr", "--images", f"{f[0]['f']},{tmp_path / 'missing.nii.gz'}"],
        ["--kind", "ditr", "--images", f"{f[0]['f']},{f[0]['m']}", "--set", "bogus=1"],
    ]
    for case in cases:
        code, _, err = cli(["train-metric", *case, "-o", str(out), "--small", "--quiet"])
        assert code == 2 and err.startswith("itreg: error:"), err
        assert not out.exists()


def test_neural_kinds_train_a_critic_that_the_metric_loads(files, tmp_path, cli):
    _, f = files
    out = tmp_path / "mine.pt"
    args = ["train-metric", "--kind", "mine", "-o", str(out), "--small", "--quiet",
            "--set", "steps=20", "--set", "batch=256", "--set", "val_every=10"]
    for p in f:
        args += ["--images", f"{p['f']},{p['m']}"]
    code, _, err = cli(args)
    assert code == 0, err
    assert torch.isfinite(get_metric(f"mine:{out}")(torch.rand(1, 20, 20),
                                                     torch.rand(1, 20, 20)))
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("mine")) == \
        ["mine.pt"]  # no checkpoint or training folder is left


def test_spacing_option_resamples(files, tmp_path):
    from itreg.cli.train_metric import _resample

    _, f = files
    from itreg.io import read_image
    img = read_image(f[0]["f"])
    out = _resample(img, 8.0)
    assert out.grid.spacing == (8.0, 8.0)
    assert isinstance(out, Image) and torch.isfinite(out.data).all()

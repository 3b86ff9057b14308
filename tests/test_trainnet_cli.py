"""``itreg train-net`` end to end on phantom pairs, then ``itreg register --net`` with the model
it wrote; bad input gets exit 2 and one line."""

from __future__ import annotations

import json

import pytest
import SimpleITK as sitk

from itreg.io import write_image
from itreg.nets.regnets import load_regnet
from itreg.train.sources import PhantomPairs

TINY = ["--small", "--phantom", "2", "--val-phantom", "1", "--spacing", "4",
        "--set", "epochs=1", "--set", "steps_per_epoch=2", "--set", "batch_size=2", "-q"]


def test_train_net_writes_a_model_that_register_applies(tmp_path, cli):
    model = tmp_path / "net.pt"
    code, out, err = cli(["train-net", "--kind", "deform", "--loss", "mi", "--loss-set",
                           "bins=16", "--labels", "-o", str(model), *TINY])
    assert code == 0, err
    assert "wrote" in out and model.exists()
    net = load_regnet(model)
    train = net.extra["train"]
    assert train["loss"] == "mi" and train["loss_kwargs"] == {"bins": 16}
    assert train["dice_weight"] == 1.0 and train["kind"] == "deform"
    # A phantom pair the network never saw, through the CLI.
    pair = PhantomPairs(1, ndim=2, spacing_mm=4.0, seed=777)[0]
    f, m = tmp_path / "f.nii.gz", tmp_path / "m.nii.gz"
    write_image(pair.fixed, f)
    write_image(pair.moving, m)
    code, out, err = cli(["register", str(f), str(m), "--net", str(model), "-o",
                           str(tmp_path / "out"), "-q"])
    assert code == 0, err
    names = {p.name for p in (tmp_path / "out").iterdir() if not p.name.startswith(".")}
    assert names >= {"warped.nii.gz", "transform.tfm", "displacement.nii.gz", "report.json"}
    # no checkpoint or work folder remains after a successful training
    assert sorted(p.name for p in tmp_path.iterdir() if "net.pt" in p.name) == ["net.pt"]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["model"]["kind"] == "regnet-deform" and report["wall_time_s"] > 0
    warped = sitk.ReadImage(str(tmp_path / "out" / "warped.nii.gz"))
    assert warped.GetSize() == tuple(pair.fixed.grid.size)
    # The same command again refuses to overwrite the model; --force trains again.
    code, _, err = cli(["train-net", "--kind", "deform", "-o", str(model), *TINY])
    assert code == 2 and "exists" in err


def test_train_net_bad_input(tmp_path, cli):
    out = tmp_path / "x.pt"
    code, _, err = cli(["train-net", "--kind", "deform", "--loss", "nosuch", "-o", str(out),
                         *TINY])
    assert code == 2 and "nosuch" in err and "lncc" in err
    code, _, err = cli(["train-net", "--kind", "deform", "--set", "bogus=1", "-o", str(out),
                         *TINY])
    assert code == 2 and "bogus" in err
    code, _, err = cli(["train-net", "--kind", "deform", "--val-pairs", str(tmp_path), "-o",
                         str(out), *TINY])
    assert code == 2 and "--pairs" in err
    assert not out.exists()


@pytest.mark.slow
def test_train_net_dcc_small(tmp_path, cli):
    model = tmp_path / "dcc.pt"
    code, out, err = cli(["train-net", "--kind", "dcc", "--small", "--phantom", "2",
                           "--val-phantom", "1", "--set", "epochs=1", "--set",
                           "steps_per_epoch=1", "--set", "batch_size=2", "-o", str(model),
                           "-q"])
    assert code == 0, err
    assert "reg_dice" in out and model.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dcc.pt"]  # no checkpoint is left
    more = ["train-net", "--kind", "dcc", "--small", "--phantom", "2", "--val-phantom", "1",
            "--set", "epochs=2", "--set", "steps_per_epoch=1", "--set", "batch_size=2", "-q"]
    code, out, err = cli([*more, "-o", str(model)])
    assert code == 2 and "exists" in err
    # An interrupted run leaves its work in OUTPUT.training/ (made here by the API, which keeps
    # the resumable checkpoint): the same command with more epochs resumes from it.
    from itreg.io.outputs import training_folder
    from itreg.train.dcc import DCCTrainConfig, PhantomGroupSource, train_dcc

    model2 = tmp_path / "dcc2.pt"
    work = training_folder(model2) / model2.name
    work.parent.mkdir()
    config = DCCTrainConfig.small(seed=0, progress=False, train_groups=2, val_groups=1,
                                  strategy="unsupervised", epochs=1, steps_per_epoch=1,
                                  batch_size=2)
    train = PhantomGroupSource(ndim=2, spacing_mm=3.0, slice_offsets=(-4, -2, 0, 2, 4), seed=0)
    val = PhantomGroupSource(ndim=2, spacing_mm=3.0, slice_offsets=(-3, -1, 1, 3),
                             seed=100_000)
    train_dcc(train, val, config, work, force=True, resume=True)
    assert (work.parent / "dcc2.pt.ckpt").is_file()
    code, out, err = cli([*more, "-o", str(model2)])
    assert code == 0, err
    assert "after 2 epochs" in out
    assert model2.is_file() and not training_folder(model2).exists()

"""The README's DITR registration command runs as printed (issue 19: ``--set shrink=1`` used to
fail on the preset's per-level sample counts)."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import SimpleITK as sitk
import torch

from itreg.blocks.ditr import DITRNet
from itreg.blocks.modelfile import save_model

README = Path(__file__).resolve().parents[2] / "README.md"


def readme_ditr_command() -> list[str]:
    """The README's ``itreg register ... --metric ditr:ditr.pt ...`` line, as arguments."""
    text = README.read_text(encoding="utf-8").replace("\\\n", " ")
    lines = [ln for ln in text.splitlines()
             if re.match(r"\s*itreg register .*--metric ditr:ditr\.pt", ln)]
    assert len(lines) == 1, lines
    args = shlex.split(lines[0])
    assert "shrink=1" in args
    return args[1:]


def _write(path: Path, array: torch.Tensor) -> None:
    img = sitk.GetImageFromArray(array.numpy())
    img.SetSpacing((2.0, 2.0))
    sitk.WriteImage(img, str(path))


def test_the_readme_ditr_command_runs_as_printed(tmp_path, cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(3)
    net = DITRNet(2, channels=(4, 4, 8, 8), spacing_mm=2.0)
    save_model(tmp_path / "ditr.pt", "ditr", net.config(), net.state_dict())
    yy, xx = torch.meshgrid(torch.arange(40.0), torch.arange(36.0), indexing="ij")
    blob = (((yy - 20) ** 2 / 120 + (xx - 18) ** 2 / 90) < 1).float()
    shifted = (((yy - 21) ** 2 / 120 + (xx - 17) ** 2 / 90) < 1).float()
    _write(tmp_path / "fixed.nii.gz", blob * (0.6 + 0.4 * (xx / 36)))
    _write(tmp_path / "moving.nii.gz", 1.0 - 0.7 * shifted)
    code, _out, err = cli(readme_ditr_command())
    assert code == 0, err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    stages = report["config"]["stages"]
    assert all(s["shrink"] == [1] and s["optimizer"] == "powell" for s in stages)
    # The preset's finest sample count is kept (rigid: 4096, 8192, 24576 per level).
    assert stages[-1]["sampling"]["count"] == 24576

"""The device path: the same registration on a CUDA GPU as on the CPU.

Marked ``gpu``: they run where torch sees a CUDA device (``make test-gpu``) and skip cleanly
elsewhere; ``make test`` deselects them.
"""

from __future__ import annotations

import pytest
import torch
from tests.test_cli import FAST, blob_image

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device visible to torch"),
]


def _images():
    from itreg.io import from_sitk

    fixed = from_sitk(blob_image(), is_label=False)
    moving = from_sitk(blob_image(shift=(3.0, -2.0), remap=True), is_label=False)
    return fixed, moving


def test_registration_runs_on_the_gpu_and_matches_the_cpu():
    from itreg import register

    fixed, moving = _images()
    cpu = register(fixed, moving, transform="rigid", metric="mi", seed=0, progress=False,
                   overrides={"iterations": 60})
    gpu = register(fixed.to("cuda"), moving.to("cuda"), transform="rigid", metric="mi", seed=0,
                   progress=False, overrides={"iterations": 60})
    assert gpu.warped.data.device.type == "cuda"
    pts = torch.tensor([[30.0, 30.0], [10.0, 50.0]], dtype=torch.float32)
    moved_cpu = cpu.transform(pts)
    moved_gpu = gpu.transform(pts.to("cuda")).cpu()
    assert torch.allclose(moved_cpu, moved_gpu, atol=0.1)  # within sampling noise, in mm


def test_warp_and_metrics_follow_the_device():
    from itreg.metrics import get_metric
    from itreg.transforms import Translation
    from itreg.warp import resample

    fixed, moving = _images()
    t = Translation(2)
    with torch.no_grad():
        t.translation.copy_(torch.tensor([1.5, -0.5]))
    out_cpu = resample(moving, t, fixed.grid)
    out_gpu = resample(moving.to("cuda"), t.to("cuda"), fixed.grid)
    assert torch.allclose(out_cpu.data, out_gpu.data.cpu(), atol=1e-5)
    for name in ("mi", "nmi", "lncc", "ngf", "mind-ssc"):
        metric = get_metric(name)
        a = metric(fixed.data, out_cpu.data)
        b = metric.to("cuda")(fixed.data.cuda(), out_gpu.data)
        assert b.device.type == "cuda"
        assert float(a) == pytest.approx(float(b), rel=1e-3, abs=1e-4), name


def test_cli_device_cuda(tmp_path, cli):
    import SimpleITK as sitk

    sitk.WriteImage(blob_image(), str(tmp_path / "f.nii.gz"))
    sitk.WriteImage(blob_image(shift=(3.0, -2.0), remap=True), str(tmp_path / "m.nii.gz"))
    code, _, err = cli(["register", str(tmp_path / "f.nii.gz"), str(tmp_path / "m.nii.gz"),
                        "-o", str(tmp_path / "out"), "-t", "rigid", "--device", "cuda", *FAST])
    assert code == 0, err
    report = (tmp_path / "out" / "report.json").read_text()
    assert '"device": "cuda' in report

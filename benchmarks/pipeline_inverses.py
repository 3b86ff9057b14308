"""Register's pipeline outputs on the 3D 2 mm brain phantom, checked through SimpleITK.

For each deformable transform (bspline, dense, svf) on the FFD phantom pair (seed 0, 3 mm
coefficients) this registers with the fixed brain mask, writes the outputs as ``itreg register``
does, and measures over the fixed brain mask:

* ``transform.h5`` read by ``SimpleITK.ReadTransform`` and applied by ``sitk.Resample``
  against ``warped.nii.gz``: mean |difference| / intensity range;
* the inverse-consistency residual ``|inverse(T(x)) - x|`` of the written
  ``inverse_displacement.nii.gz`` (mean, 95th percentile, max, mm) as ``report.json`` records
  it, and the seconds spent writing the outputs (inverse included).

Usage: ``python benchmarks/pipeline_inverses.py OUT.md`` (about 3 minutes on one CPU thread).
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from itreg import io
from itreg.api import register
from itreg.results import save_registration
from itreg.phantoms.pairs import brain_pair


def main(out_md: str) -> None:
    torch.set_num_threads(1)
    pair = brain_pair(spacing_mm=2.0, kind="ffd", seed=0, sigma_mm=3.0)
    brain = pair.fixed_mask.data[0].bool().numpy()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        io.write_image(pair.fixed_mask, tmp / "mask.nii.gz")
        for kind in ("bspline", "dense", "svf"):
            res = register(pair.fixed, pair.moving, transform=kind, fixed_mask=pair.fixed_mask,
                           overrides={"iterations": 20}, progress=False)
            _ = res.warped
            t0 = time.perf_counter()
            out = save_registration(res, tmp / kind, inputs={"fixed_mask": tmp / "mask.nii.gz"})
            write_s = time.perf_counter() - t0
            ic = json.loads((out / "report.json").read_text())["inverse_consistency"]
            h5 = sitk.ReadTransform(str(out / "transform.h5"))
            ref = sitk.GetArrayFromImage(sitk.Resample(
                io.to_sitk(pair.moving), io.to_sitk(pair.fixed), h5, sitk.sitkLinear, 0.0,
                sitk.sitkFloat32))
            warped = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "warped.nii.gz")))
            rel = float(np.abs(ref - warped)[brain].mean() / np.ptp(warped[brain]))
            rows.append((kind, h5.GetName(), rel, ic, write_s))
            print(kind, rel, ic, round(write_s, 1), flush=True)
    lines = [
        "# Pipeline outputs on the 3D 2 mm FFD brain phantom (seed 0), through SimpleITK",
        "",
        (f"`python benchmarks/pipeline_inverses.py` (torch {torch.__version__}, SimpleITK "
         f"{sitk.Version.VersionString()}, one CPU thread, 20 iterations per level, fixed "
         f"brain mask: {int(brain.sum())} voxels)."),
        "",
        ("| transform | transform.h5 | h5 vs warped (mean, / range) | inverse mean mm "
         "| inverse p95 mm | inverse max mm | write s |"),
        "|---|---|---|---|---|---|---|",
    ]
    for kind, name, rel, ic, write_s in rows:
        lines.append(f"| {kind} | {name} | {rel:.2e} | {ic['mean_mm']:.4f} | "
                     f"{ic['p95_mm']:.4f} | {ic['max_mm']:.3f} | {write_s:.1f} |")
    Path(out_md).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "pipeline-inverses.md")

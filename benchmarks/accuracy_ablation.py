"""Ablation of the affine preset's end game, one change at a time, on the anchor phantoms.

Every run is ``itreg.register(fixed, moving, preset=<config>, seed=0)`` on
``brain_pair(spacing, "t2", "anchor", seed)`` (MNI T1 fixed, T2-like moving under the anchor
benchmark's random affine), evaluated as mean warping error over the fixed brain mask against
the true transform. Variants of the ``affine`` preset:

* ``baseline``: the preset as shipped;
* ``samples-x4``: 4x the random samples at the last level (131072 instead of 32768);
* ``full-lbfgs``: an extra final stage: affine, full resolution, every voxel (deterministic
  full-grid sampling), L-BFGS for 20 iterations.

    .venv/bin/python benchmarks/accuracy_ablation.py --cases 3 --spacing 1 --out benchmarks/results/NAME
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch


def variants() -> dict:
    from itreg.engine.config import RegistrationConfig, load_preset

    base = load_preset("affine").to_dict()
    out = {"baseline": base}
    more = json.loads(json.dumps(base))
    more["stages"][1]["sampling"]["count"] = [4096, 8192, 131072]
    out["samples-x4"] = more
    full = json.loads(json.dumps(base))
    extra = json.loads(json.dumps(base["stages"][1]))
    extra.update(optimizer="lbfgs", optimizer_options={}, learning_rate=[1.0], shrink=[1],
                 smoothing_mm=[0.0], iterations=[20], sampling={"strategy": "full"})
    full["stages"].append(extra)
    out["full-lbfgs"] = full
    return {k: RegistrationConfig.from_dict(v) for k, v in out.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", type=int, default=3)
    p.add_argument("--spacing", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, required=True, help="output stem (.md and .json)")
    args = p.parse_args()
    from itreg.api import register
    from itreg.evaluate import warping_error
    from itreg.phantoms import brain_pair

    configs = variants()
    rows = []
    for seed in range(args.cases):
        pair = brain_pair(args.spacing, "t2", "anchor", seed)
        mask = pair.fixed_mask.data[0] != 0
        true = pair.true_transform.to(torch.float64)
        for name, config in configs.items():
            load = " ".join(Path("/proc/loadavg").read_text().split()[:3])
            r = register(pair.fixed, pair.moving, preset=config, seed=0, threads=args.threads,
                         progress=False)
            err = warping_error(r.transform.to(torch.float64), true, pair.fixed.grid, mask)
            rows.append({"seed": seed, "variant": name, "mean_mm": err.mean_mm,
                         "p90_mm": err.p90_mm, "wall_s": r.wall_time_s, "load": load,
                         "divergence": len(r.divergence)})
            print(rows[-1], flush=True)
    lines = [f"# Affine end-game ablation ({time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC)",
             "", (f"Written by `benchmarks/accuracy_ablation.py` (docstring: protocol); spacing "
                  f"{args.spacing:g} mm, {args.cases} anchor cases, {args.threads} threads, "
                  f"{os.cpu_count()} cores shared with other jobs (load per row)."), "",
             "| variant | seed | mean error mm | p90 mm | wall s | load |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['seed']} | {r['mean_mm']:.4f} | {r['p90_mm']:.4f} | "
                     f"{r['wall_s']:.2f} | {r['load']} |")
    lines += ["", "| variant | median mean error mm | worst mm | median wall s |", "|---|---|---|---|"]
    for name in configs:
        vr = [r for r in rows if r["variant"] == name]
        lines.append(f"| {name} | {statistics.median(r['mean_mm'] for r in vr):.4f} | "
                     f"{max(r['mean_mm'] for r in vr):.4f} | "
                     f"{statistics.median(r['wall_s'] for r in vr):.2f} |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

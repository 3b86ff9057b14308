"""Metric landscapes over translations of an aligned T1 / T2-like pair (paper 003 Fig. 3).

Small CPU setting: the MNI template at ``--spacing`` mm (default 2), one held-out axial slice
(``--slice``, offset from the middle), fixed = the real T1, moving = the phantom builder's
T2-like image (Rician noise and bias field), aligned. Every metric is evaluated over a grid of
``tx, ty`` offsets of the moving image (``--range``), and the landscape module counts the local
optima (``--plateau-tol`` of the loss range; 0.03 by default, so shallow ripples of the noisy
estimators are not counted as optima) and measures the FWHM through the best offset.

Metrics: Mattes MI, NMI, LNCC (window 9 voxels), MINE and KLDiv critics (re-fitted at every
offset, as when they are trained beside a registration), and DeepSim with two extractors
trained here on other axial slices of both contrasts (``--deepsim`` kinds): an auto-encoder
(DeepSim_ae, unsupervised) and a segmentation network (DeepSim_seg, with the tissue labels).

Run ``python benchmarks/landscapes.py --out bench-landscape``: prints one Markdown table and
writes ``<metric>/landscape.png``, ``landscape.csv`` and ``summary.json`` per metric plus
``results.json`` (the extractors are cached in ``--out``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from itreg.evaluate.landscape import metric_landscape, save_landscape
from itreg.phantoms import labels as tissue_labels
from itreg.phantoms import load_mni, synthesize
from itreg.phantoms.slices import axial_slices

METRICS = {
    "mi": ("mi", {"bins": 32}),
    "nmi": ("nmi", {"bins": 32}),
    "lncc": ("lncc", {}),
    "mine": ("mine", {}),
    "kldiv": ("kldiv", {}),
}


def pair(tissues: dict, offset: int, seed: int = 3):
    depth = tissues["t1"].grid.size[2]
    sl = axial_slices(tissues, depth // 2 + offset)
    fixed = sl["t1"]
    moving = synthesize(sl, "t2", noise_sigma=0.02, bias=(0.8, 1.17), seed=seed)
    return fixed, moving, sl


def train_extractors(tissues: dict, out: Path, kinds: list[str], test_offset: int) -> dict:
    from itreg.train.deepsim import DeepSimTrainConfig, train_deepsim

    depth = tissues["t1"].grid.size[2]
    offsets = [o for o in range(-12, 13, 2) if o != test_offset]
    images, labels = [], []
    for i, o in enumerate(offsets):
        sl = axial_slices(tissues, depth // 2 + o)
        lab = tissue_labels(sl)
        for contrast in ("t1", "t2"):
            img = sl["t1"] if contrast == "t1" else synthesize(sl, "t2", seed=100 + i)
            images.append(img)
            labels.append(lab)
    paths = {}
    for kind in kinds:
        path = out / f"deepsim-{kind}.pt"
        paths[kind] = path
        if path.exists():
            continue
        cfg = DeepSimTrainConfig.small(mode=kind, seed=0, progress=False)
        t0 = time.time()
        train_deepsim(images, labels if kind == "seg" else None, cfg, output=path, force=True)
        print(f"trained deepsim-{kind} in {time.time() - t0:.0f} s on {len(images)} slices",
              file=sys.stderr, flush=True)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench-landscape"))
    ap.add_argument("--spacing", type=float, default=2.0)
    ap.add_argument("--slice", type=int, default=1, help="axial offset of the test slice")
    ap.add_argument("--range", type=float, nargs=3, default=(-20.0, 20.0, 2.0),
                    metavar=("START", "STOP", "STEP"))
    ap.add_argument("--plateau-tol", type=float, default=0.03)
    ap.add_argument("--metrics", nargs="+", default=[*METRICS, "deepsim-ae", "deepsim-seg"])
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    tissues = load_mni(args.spacing)
    fixed, moving, sl = pair(tissues, args.slice)
    mask = sl["mask"].data[0] > 0
    kinds = [m.split("-", 1)[1] for m in args.metrics if m.startswith("deepsim-")]
    extractors = train_extractors(tissues, args.out, kinds, args.slice) if kinds else {}
    rows = []
    for name in args.metrics:
        if name.startswith("deepsim-"):
            metric, kwargs = f"deepsim:{extractors[name.split('-', 1)[1]]}", {}
        else:
            metric, kwargs = METRICS[name]
        t0 = time.time()
        land = metric_landscape(fixed, moving, metric, axes=("tx", "ty"),
                                ranges=[tuple(args.range)], fixed_mask=mask,
                                plateau_tol=args.plateau_tol, seed=0, **kwargs)
        elapsed = time.time() - t0
        save_landscape(land, args.out / name)
        s = land.summary()
        rows.append({"metric": name, "n_optima": s["n_optima"], "best_offset": s["best_offset"],
                     "fwhm": s["fwhm"], "fwhm_censored": s["fwhm_censored"],
                     "time_s": elapsed})
        print(f"{name}: {s['n_optima']} optima, best {s['best_offset']}, {elapsed:.0f} s",
              file=sys.stderr, flush=True)
    (args.out / "results.json").write_text(json.dumps(
        {"spacing_mm": args.spacing, "slice_offset": args.slice, "range": list(args.range),
         "plateau_tol": args.plateau_tol, "rows": rows}, indent=1))
    print(f"\nT1 vs T2-like, {args.spacing:g} mm axial slice (offset {args.slice}), tx/ty in "
          f"[{args.range[0]:g}, {args.range[1]:g}] mm step {args.range[2]:g}, plateau "
          f"tolerance {args.plateau_tol:g} of the loss range\n")
    print("| metric | local optima | best offset (mm) | FWHM tx / ty (mm) | time (s) |")
    print("|---|---|---|---|---|")
    for r in rows:
        fw = " / ".join("-" if w is None else (f">{w:.1f}" if c else f"{w:.1f}")
                        for w, c in zip(r["fwhm"], r["fwhm_censored"]))
        best = ", ".join(f"{v:g}" for v in r["best_offset"])
        print(f"| {r['metric']} | {r['n_optima']} | ({best}) | {fw} | {r['time_s']:.0f} |")


if __name__ == "__main__":
    main()

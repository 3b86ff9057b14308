"""Metric landscapes over translations of an aligned T1 / T2-like pair (paper 003 Fig. 3).

Small CPU setting: the MNI template at ``--spacing`` mm (default 2; 1 = the template's full
resolution), one held-out axial slice (``--slice``, offset from the middle), fixed = the real
T1 (``--pair t2-t2``: a T2-like image, paper 003's intra-modality control), moving = the phantom
builder's T2-like image (Rician noise and bias field; ``--clean``: neither, closer to the
noise-free AAL template T2 of paper 003), aligned. Every metric is evaluated over a grid of
``tx, ty`` offsets of the moving image (``--range``), and the landscape module counts the local
optima (``--plateau-tol`` of the loss range; 0.03 by default, so shallow ripples of the noisy
estimators are not counted as optima; the counts at every ``--tolerances`` value are reported
too, and the depth of the deepest secondary optimum: the tolerance, relative to the loss
range, at which it stops counting) and measures the FWHM through the best offset.

Metrics (``--metrics``):

- ``mi``, ``nmi`` (32 bins), ``lncc`` (squared local CC, window 9 voxels; ``lncc-wK``: window
  ``K``), ``mine`` and ``kldiv`` critics (re-fitted at every offset, as when they are trained
  beside a registration);
- DeepSim with extractors trained here on 26 other axial slices of both contrasts:
  ``deepsim-ae`` / ``deepsim-seg`` as in paper 004 (no intensity augmentation, all three
  stages), and ``deepsim-ae-mm`` / ``deepsim-seg-mm`` trained for contrast invariance
  (:meth:`DeepSimTrainConfig.multimodal`: random monotone / non-monotone intensity remapping and
  the two-view feature-consistency term) and compared on ``--mm-stages`` (default 2 3).

Paper 003 does not give LNCC's window, the resolution, the offset range or step of its Fig. 3;
``--spacing 1 --range -20 20 1 --metrics mi lncc lncc-w3 lncc-w5 lncc-w15`` is the closest
full-resolution setting (2D slice; the paper's landscape is over 3D AAL volumes).

Run ``python benchmarks/landscapes.py --out bench-landscape``: prints one Markdown table and
writes ``<metric>/landscape.png``, ``landscape.csv`` and ``summary.json`` per metric,
``profiles.png`` (central tx and ty profiles of every metric, rescaled to [0, 1]),
``surfaces.png`` (contour maps of every metric with its optima) and
``results.json`` (rows of earlier runs into the same ``--out`` with the same image settings are
kept, so metrics can be run in separate processes; the extractors are cached in ``--out``).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from itreg.evaluate.landscape import count_local_optima, metric_landscape, save_landscape
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
DEEPSIM = ("deepsim-ae", "deepsim-seg", "deepsim-ae-mm", "deepsim-seg-mm")


def pair(tissues: dict, offset: int | None, seed: int = 3, kind: str = "t1-t2",
         clean: bool = False):
    """Fixed and moving images of the test slice (`offset` None: the whole volume), and the
    slice's (volume's) tissue maps."""
    depth = tissues["t1"].grid.size[2]
    sl = tissues if offset is None else axial_slices(tissues, depth // 2 + offset)
    noise = {"noise_sigma": 0.0, "bias": None} if clean else {"noise_sigma": 0.02,
                                                              "bias": (0.8, 1.17)}
    moving = synthesize(sl, "t2", seed=seed, **noise)
    fixed = sl["t1"] if kind == "t1-t2" else synthesize(sl, "t2", seed=seed + 1, **noise)
    return fixed, moving, sl


def train_extractors(tissues: dict, out: Path, kinds: list[str], test_offset: int) -> dict:
    """Train (or reuse from `out`) the DeepSim extractors named in `kinds` (``ae``, ``seg-mm``...)."""
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
        mode = kind.split("-")[0]
        make = DeepSimTrainConfig.multimodal if kind.endswith("-mm") else DeepSimTrainConfig.small
        cfg = make(mode=mode, seed=0, progress=False)
        t0 = time.time()
        res = train_deepsim(images, labels if mode == "seg" else None, cfg, output=path,
                            force=True)
        print(f"trained deepsim-{kind} in {time.time() - t0:.0f} s on {len(images)} slices "
              f"({len(res.train['history'])} epochs, best validation loss "
              f"{res.train['best_value']:.4g})", file=sys.stderr, flush=True)
    return paths


def metric_spec(name: str, extractors: dict, mm_stages: list[int]) -> tuple[str, dict]:
    """Registry name and settings of a benchmark metric name."""
    if name.startswith("deepsim-"):
        kind = name.split("-", 1)[1]
        return f"deepsim:{extractors[kind]}", ({"stages": mm_stages}
                                               if kind.endswith("-mm") else {})
    if name.startswith("lncc-w"):
        return "lncc", {"window": int(name[len("lncc-w"):])}
    if name not in METRICS:
        raise SystemExit(f"unknown metric {name!r}; valid: {', '.join([*METRICS, *DEEPSIM])}, "
                         "lncc-wK")
    return METRICS[name]


def secondary_depth(loss: np.ndarray) -> float:
    """Depth of the deepest secondary optimum, relative to the loss range: the smallest plateau
    tolerance at which only one optimum is left (bisection, 1e-4 resolution; 0 when there is
    one optimum at tolerance 0)."""
    if len(count_local_optima(loss, 0.0)) <= 1:
        return 0.0
    lo, hi = 0.0, 1.0
    while hi - lo > 1e-4:
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if len(count_local_optima(loss, mid)) <= 1 else (mid, hi)
    return hi


def read_loss(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Offsets along tx and ty and the loss grid ``(n_tx, n_ty)`` of a landscape.csv."""
    with open(path) as fh:
        rows = list(csv.DictReader(fh))
    tx = np.array(sorted({float(r["tx"]) for r in rows}))
    ty = np.array(sorted({float(r["ty"]) for r in rows}))
    loss = np.full((len(tx), len(ty)), np.nan)
    for r in rows:
        loss[np.searchsorted(tx, float(r["tx"])), np.searchsorted(ty, float(r["ty"]))] = float(
            r["loss"])
    return tx, ty, loss


def profiles_figure(out: Path, names: list[str], title: str) -> Path:
    """Central tx (ty = 0) and ty (tx = 0) profiles of every metric's response, in [0, 1]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for k, name in enumerate(names):
        path = out / name / "landscape.csv"
        if not path.exists():
            continue
        tx, ty, loss = read_loss(path)
        r = -loss
        r = (r - np.nanmin(r)) / max(np.nanmax(r) - np.nanmin(r), 1e-12)
        i0, j0 = int(np.argmin(np.abs(tx))), int(np.argmin(np.abs(ty)))
        style = "--" if name.startswith("deepsim") else "-"
        axes[0].plot(tx, r[:, j0], style, color=f"C{k % 10}", label=name, lw=1.2)
        axes[1].plot(ty, r[i0, :], style, color=f"C{k % 10}", label=name, lw=1.2)
    for ax, lab in zip(axes, ("tx (mm), ty = 0", "ty (mm), tx = 0")):
        ax.set_xlabel(lab)
        ax.axvline(0.0, color="k", lw=0.5)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("response (-loss), rescaled to [0, 1]")
    axes[1].legend(fontsize=7, loc="lower right")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = out / "profiles.png"
    fig.savefig(path, dpi=70)
    plt.close(fig)
    return path


def surfaces_figure(out: Path, names: list[str], title: str) -> Path:
    """Contour maps of every metric's response over (tx, ty), rescaled to [0, 1], with the
    local optima (plateau tolerance of the run) marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    found = [n for n in names if (out / n / "landscape.csv").exists()]
    cols = min(4, max(1, len(found)))
    rows = -(-len(found) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.5 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.set_visible(False)
    for ax, name in zip(axes.ravel(), found):
        tx, ty, loss = read_loss(out / name / "landscape.csv")
        r = -loss
        r = (r - np.nanmin(r)) / max(np.nanmax(r) - np.nanmin(r), 1e-12)
        ax.set_visible(True)
        ax.contourf(tx, ty, r.T, levels=15, cmap="viridis")
        summary = json.loads((out / name / "summary.json").read_text())
        for x, y in summary["optima_offsets"]:
            ax.plot(x, y, "o", color="red", ms=3)
        ax.set_title(f"{name}: {summary['n_optima']} optim.", fontsize=8)
        ax.tick_params(labelsize=6)
        ax.set_aspect("equal")
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    path = out / "surfaces.png"
    fig.savefig(path, dpi=70)
    plt.close(fig)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench-landscape"))
    ap.add_argument("--spacing", type=float, default=2.0)
    ap.add_argument("--slice", type=int, default=1, help="axial offset of the test slice")
    ap.add_argument("--pair", choices=("t1-t2", "t2-t2"), default="t1-t2")
    ap.add_argument("--clean", action="store_true", help="no noise or bias in the T2-like images")
    ap.add_argument("--volume", action="store_true",
                    help="the whole 3D volume instead of one slice (tx, ty offsets as in paper "
                         "003 Fig. 3; no DeepSim: its extractors here are 2D)")
    ap.add_argument("--range", type=float, nargs=3, default=(-20.0, 20.0, 2.0),
                    metavar=("START", "STOP", "STEP"))
    ap.add_argument("--plateau-tol", type=float, default=0.03)
    ap.add_argument("--tolerances", type=float, nargs="+", default=[0.0, 1e-3, 0.01, 0.03])
    ap.add_argument("--metrics", nargs="+", default=[*METRICS, *DEEPSIM])
    ap.add_argument("--mm-stages", type=int, nargs="+", default=[2, 3],
                    help="encoder stages compared by the deepsim-*-mm metrics")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    tissues = load_mni(args.spacing)
    fixed, moving, sl = pair(tissues, None if args.volume else args.slice, kind=args.pair,
                             clean=args.clean)
    mask = sl["mask"].data[0] > 0
    kinds = [m.split("-", 1)[1] for m in args.metrics if m.startswith("deepsim-")]
    if kinds and args.volume:
        raise SystemExit("the DeepSim extractors of this benchmark are 2D; drop --volume")
    extractors = train_extractors(tissues, args.out, kinds, args.slice) if kinds else {}
    setting = {"spacing_mm": args.spacing, "slice_offset": None if args.volume else args.slice,
               "pair": args.pair,
               "clean": args.clean, "range": list(args.range), "plateau_tol": args.plateau_tol,
               "image_shape": list(fixed.grid.shape)}
    rows = []
    for name in args.metrics:
        metric, kwargs = metric_spec(name, extractors, args.mm_stages)
        t0 = time.time()
        land = metric_landscape(fixed, moving, metric, axes=("tx", "ty"),
                                ranges=[tuple(args.range)], fixed_mask=mask,
                                plateau_tol=args.plateau_tol, seed=0, **kwargs)
        elapsed = time.time() - t0
        save_landscape(land, args.out / name)
        s = land.summary()
        counts = {f"{t:g}": len(count_local_optima(land.loss, t)) for t in args.tolerances}
        rows.append({"metric": name, "settings": kwargs if not name.startswith("deepsim")
                     else s["settings"]["metric_config"], "n_optima": s["n_optima"],
                     "optima_by_tolerance": counts,
                     "secondary_depth": round(secondary_depth(land.loss), 4),
                     "best_offset": s["best_offset"],
                     "optima_offsets": s["optima_offsets"][:10], "fwhm": s["fwhm"],
                     "fwhm_censored": s["fwhm_censored"], "time_s": round(elapsed, 1)})
        print(f"{name}: {s['n_optima']} optima, best {s['best_offset']}, {elapsed:.0f} s",
              file=sys.stderr, flush=True)
    results_path = args.out / "results.json"
    old_rows = []
    if results_path.exists():  # read now: other runs may have written rows meanwhile
        old = json.loads(results_path.read_text())
        if old.get("setting") == setting:
            old_rows = [r for r in old["rows"] if r["metric"] not in args.metrics]
            for r in old_rows:  # rows of an earlier version of this script
                if "secondary_depth" not in r:
                    r["secondary_depth"] = round(secondary_depth(
                        read_loss(args.out / r["metric"] / "landscape.csv")[2]), 4)
    order = {m: i for i, m in enumerate([*METRICS, *DEEPSIM])}
    rows = sorted(old_rows + rows, key=lambda r: (order.get(r["metric"], 5.5), r["metric"]))
    results_path.write_text(json.dumps({"setting": setting, "rows": rows}, indent=1))
    what = "T1 vs T2-like" if args.pair == "t1-t2" else "T2-like vs T2-like"
    where = "3D volume" if args.volume else f"axial slice (offset {args.slice})"
    title = (f"{what}{' (no noise/bias)' if args.clean else ''}, {args.spacing:g} mm {where}, "
             f"tx/ty in [{args.range[0]:g}, {args.range[1]:g}] mm step {args.range[2]:g}")
    profiles_figure(args.out, [r["metric"] for r in rows], title)
    surfaces_figure(args.out, [r["metric"] for r in rows], title)
    tols = " / ".join(f"{t:g}" for t in args.tolerances)
    print(f"\n{title}; plateau tolerance {args.plateau_tol:g} of the loss range\n")
    print(f"| metric | local optima | optima at tol {tols} | deepest secondary | "
          "best offset (mm) | FWHM tx / ty (mm) | time (s) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        fw = " / ".join("-" if w is None else (f">{w:.1f}" if c else f"{w:.1f}")
                        for w, c in zip(r["fwhm"], r["fwhm_censored"]))
        best = ", ".join(f"{v:g}" for v in r["best_offset"])
        counts = " / ".join(str(r["optima_by_tolerance"].get(f"{t:g}", "-"))
                            for t in args.tolerances)
        print(f"| {r['metric']} | {r['n_optima']} | {counts} | {r['secondary_depth']:.4f} | "
              f"({best}) | {fw} | {r['time_s']:.0f} |")


if __name__ == "__main__":
    main()

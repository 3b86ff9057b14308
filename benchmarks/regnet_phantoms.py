"""Registration networks trained with different metrics on paper 003's phantoms, beside iterative
itreg B-spline registration with MI.

Data (:class:`itreg.train.sources.PhantomPairs`): fixed = the MNI template T1, moving = a
T2-like contrast of the anatomy deformed by a random cubic B-spline FFD (20 mm control spacing,
N(0, 6^2 mm^2) per coefficient), with CSF/GM/WM labels. Training pairs use seeds ``0..``,
validation pairs ``100000..`` and test pairs ``200000..``, so no pair is shared. ``--ndim 2``
(default) uses the middle axial slice; ``--ndim 3`` the whole volume.

Methods, all evaluated on the same test pairs:

- ``none``: the identity;
- one DeformNet (:class:`itreg.nets.regnets.DeformNet`, small CPU widths) per loss in
  ``--losses``: ``lncc``, ``mi16``/``mi64`` (Parzen MI, 16/64 bins), ``mine``, ``kldiv`` (critic
  co-trained in one stage), ``nmi``, ``mse``, ``deepsim:PATH``; ``--midice`` adds MI-64 plus
  soft-Dice supervision (MIDiceRegNet, labels used in training only);
- ``itreg bspline MI``: :func:`itreg.register` with the ``bspline`` preset and ``mi``.

Measures per method: Dice per label (CSF, GM, WM) of the moving labels warped by nearest
neighbour, HD95 (mean over the three labels), the fraction of voxels with ``det J <= 0`` (over
the whole fixed grid) and the time per pair (the network's ``predict`` or the iterative
registration's wall time; model loading and training excluded, training time listed apart).

Run (small setting, minutes on two CPU cores)::

    python benchmarks/regnet_phantoms.py --out bench-regnet --train 32 --epochs 10

Trained models are kept in ``--out`` and reused by a rerun (delete them to retrain). Prints a
Markdown table; writes ``results.json`` and ``table.md`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from itreg.evaluate import dice, jacobian_statistics, surface_distance
from itreg.nets.regnets import load_regnet
from itreg.phantoms import load_mni
from itreg.train.regnet import TrainNetConfig, train_regnet
from itreg.train.sources import PhantomPairs
from itreg.transforms import Identity
from itreg.warp import resample

LABELS = {1: "CSF", 2: "GM", 3: "WM"}


def loss_setting(name: str) -> tuple[str, dict]:
    """``"mi64"`` -> ``("mi", {"bins": 64})``; other names unchanged."""
    if name.startswith("mi") and name[2:].isdigit():
        return "mi", {"bins": int(name[2:])}
    return name, {}


def evaluate(transform, sample, grid) -> dict:
    """Dice per label, mean HD95 and folding fraction of one prediction."""
    with torch.no_grad():
        warped = resample(sample.moving_labels, transform, grid, mode="nearest")
        jac = jacobian_statistics(transform, grid)
    return {**label_measures(sample.fixed_labels, warped, grid),
            "folding": jac.folding_fraction}


def label_measures(fixed_labels, warped, grid) -> dict:
    """Dice per label and mean HD95 of warped moving labels against the fixed labels."""
    d = dice(fixed_labels, warped, labels=list(LABELS))
    hd = []
    for k in LABELS:
        a = fixed_labels.data[0] == k
        b = warped.data[0] == k
        if bool(a.any()) and bool(b.any()):
            hd.append(surface_distance(a, b, spacing=grid.spacing).hd95_mm)
    return {"dice": {LABELS[k]: d.per_label.get(k, math.nan) for k in LABELS},
            "hd95": sum(hd) / len(hd) if hd else math.nan}


def summarise(rows: list[dict]) -> dict:
    out = {"dice": {}, "n": len(rows)}
    for name in LABELS.values():
        out["dice"][name] = sum(r["dice"][name] for r in rows) / len(rows)
    out["dice_mean"] = sum(out["dice"].values()) / len(LABELS)
    out["hd95"] = sum(r["hd95"] for r in rows) / len(rows)
    out["folding"] = sum(r["folding"] for r in rows) / len(rows)
    out["time_s"] = sum(r["time_s"] for r in rows) / len(rows)
    return out


def table(results: dict) -> str:
    lines = [("| method | Dice CSF | Dice GM | Dice WM | Dice mean | HD95 (mm) | det J <= 0 (%) "
              "| time / pair (s) | training (s) |"),
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        s = r["summary"]
        train = f"{r['train_s']:.0f}" if r.get("train_s") is not None else "-"
        lines.append(f"| {name} | {s['dice']['CSF']:.3f} | {s['dice']['GM']:.3f} | "
                     f"{s['dice']['WM']:.3f} | {s['dice_mean']:.3f} | {s['hd95']:.2f} | "
                     f"{100 * s['folding']:.2f} | {s['time_s']:.3f} | {train} |")
    return "\n".join(lines)


def refine_rows(path: Path, test, grid, args) -> dict:
    """The network's prediction refined by the engine (``register --net --refine``): the
    bspline preset's FFD stage with the training metric, starting from the prediction."""
    from itreg.nets.inference import register_with_net

    rows = []
    for i in range(len(test)):
        s = test[i]
        res = register_with_net(s.fixed, s.moving, path, refine=True, progress=False,
                                threads=args.threads, seed=args.seed)
        r = evaluate(res.transform, s, grid)
        r["time_s"] = res.wall_time_s
        rows.append(r)
    return {"summary": summarise(rows), "train_s": None}


def ants_rows(test, grid, args) -> dict:
    """ANTsPy SyNOnly through its own resampler (warped labels by nearest neighbour); the
    folding fraction is not measured for it (NaN)."""
    import subprocess
    import tempfile

    from itreg.image import Image
    from itreg.io import read_image, write_image

    runner = Path(__file__).resolve().parent / "tools" / "ants_runner.py"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(len(test)):
            s = test[i]
            case = Path(tmp) / f"case{i}"
            case.mkdir()
            write_image(s.fixed, case / "fixed.nii.gz")
            write_image(s.moving, case / "moving.nii.gz")
            write_image(s.moving_labels, case / "moving_labels.nii.gz")
            out = case / "ants"
            subprocess.run([args.ants_python, str(runner), str(case), str(out), "--method",
                            "SyNOnly", "--threads", str(args.threads or 2), "--seed",
                            str(args.seed + 1)], check=True, capture_output=True)
            info = json.loads((out / "result.json").read_text())
            warped = read_image(out / info["warped_labels"], is_label=True)
            labels = Image(warped.data.to(s.fixed_labels.data.dtype), grid, is_label=True)
            rows.append({**label_measures(s.fixed_labels, labels, grid),
                         "folding": math.nan, "time_s": info["wall_s"]})
    return {"summary": summarise(rows), "train_s": None}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench-regnet"))
    ap.add_argument("--ndim", type=int, default=2, choices=(2, 3))
    ap.add_argument("--spacing", type=float, default=None, help="mm (default 2 in 2D, 4 in 3D)")
    ap.add_argument("--train", type=int, default=32, help="training pairs")
    ap.add_argument("--val", type=int, default=8, help="validation pairs")
    ap.add_argument("--test", type=int, default=16, help="test pairs")
    ap.add_argument("--losses", default="lncc,mi16,mi64,mine,kldiv")
    ap.add_argument("--midice", action="store_true", help="add MI-64 + soft Dice (labels)")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--steps-per-epoch", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--reg-weight", type=float, default=0.1, help="diffusion weight")
    ap.add_argument("--features", default="8,16,16,16,16")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-iterative", action="store_true")
    ap.add_argument("--refine", default="",
                    help="comma-separated network labels (e.g. mi64,mi64-dice) whose "
                         "predictions are also refined by the iterative engine (--refine)")
    ap.add_argument("--ants", action="store_true",
                    help="add ANTsPy SyNOnly (runs benchmarks/tools/ants_runner.py in "
                         "--ants-python's venv)")
    ap.add_argument("--ants-python", default=".venv-ants/bin/python")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    spacing = args.spacing or (2.0 if args.ndim == 2 else 4.0)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    template = load_mni(spacing)
    kw = {"ndim": args.ndim, "spacing_mm": spacing, "template": template}
    train = PhantomPairs(args.train, seed=args.seed, **kw)
    val = PhantomPairs(args.val, seed=args.seed + 100_000, **kw)
    test = PhantomPairs(args.test, seed=args.seed + 200_000, **kw)
    for src in (train, val, test):
        for i in range(len(src)):
            src[i]
    grid = test.grid
    print(f"phantoms: {args.train}/{args.val}/{args.test} pairs on {grid} built in "
          f"{time.perf_counter() - t0:.0f} s", file=sys.stderr)

    results: dict[str, dict] = {}
    rows = []
    for i in range(len(test)):
        s = test[i]
        r = evaluate(Identity(grid.ndim), s, grid)
        r["time_s"] = 0.0
        rows.append(r)
    results["none"] = {"summary": summarise(rows), "train_s": None}

    runs = [(name, *loss_setting(name), 0.0) for name in args.losses.split(",") if name]
    if args.midice:
        runs.append(("mi64 + Dice (MIDice)", "mi", {"bins": 64}, 1.0))
    features = tuple(int(f) for f in args.features.split(","))
    for label, loss, loss_kwargs, dice_weight in runs:
        path = args.out / f"net-{label.split()[0]}{'-dice' if dice_weight else ''}.pt"
        cfg = TrainNetConfig.small(kind="deform", loss=loss, loss_kwargs=loss_kwargs,
                                   dice_weight=dice_weight, features=features,
                                   levels=len(features) - 1, epochs=args.epochs,
                                   steps_per_epoch=args.steps_per_epoch,
                                   batch_size=args.batch_size, lr=args.lr,
                                   reg_weight=args.reg_weight, seed=args.seed,
                                   threads=args.threads)
        train_s = None
        if path.exists():
            net = load_regnet(path)
            train_s = net.extra.get("wall_time_s")
        else:
            t = time.perf_counter()
            res = train_regnet(cfg, train, val, path, progress=False)
            train_s = time.perf_counter() - t
            net = res.net
            print(f"{label}: {res.last.message} ({train_s:.0f} s)", file=sys.stderr)
        rows = []
        for i in range(len(test)):
            s = test[i]
            t = time.perf_counter()
            tf = net.predict(s.fixed, s.moving)
            dt = time.perf_counter() - t
            r = evaluate(tf, s, grid)
            r["time_s"] = dt
            rows.append(r)
        results[f"DeformNet {label}"] = {"summary": summarise(rows), "train_s": train_s,
                                         "config": cfg.to_dict()}
        key = path.stem.removeprefix("net-")
        if key in [k for k in args.refine.split(",") if k]:
            results[f"DeformNet {label} + refine"] = refine_rows(path, test, grid, args)

    if not args.no_iterative:
        import itreg

        rows = []
        for i in range(len(test)):
            s = test[i]
            res = itreg.register(s.fixed, s.moving, "bspline", "mi", progress=False,
                                 threads=args.threads, seed=args.seed)
            r = evaluate(res.transform, s, grid)
            r["time_s"] = res.wall_time_s
            rows.append(r)
        results["itreg bspline MI (iterative)"] = {"summary": summarise(rows), "train_s": None}

    if args.ants:
        results["ANTs SyNOnly"] = ants_rows(test, grid, args)

    md = table(results)
    print(md)
    (args.out / "table.md").write_text(md + "\n")
    meta = {"argv": sys.argv[1:], "grid": repr(grid), "spacing_mm": spacing,
            "torch_threads": torch.get_num_threads(), "wall_time_s": time.perf_counter() - t0}
    (args.out / "results.json").write_text(json.dumps({"meta": meta, "results": results},
                                                       indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""DITR trained by IML vs MI: capture range, accuracy, and the effect of dithering (paper 000).

Small CPU setting, 2D axial slices of the MNI template at ``--spacing`` mm (default 3):

* Training data: T1 (fixed) / T2-like (moving) pairs from every other axial slice of a band
  around the middle of the brain, each misaligned by a **small random rigid transform**
  (translation up to ``--train-shift`` mm per axis, rotation up to 0.05 rad); the IML starts
  from the identity, so no perfectly aligned pair is ever used.
* Models (flip-symmetric classifiers, the training default): DITR with the small IML schedule ``(2, 100) -> (1, 15) -> (1, 0)`` (factors of the
  input spacing), the same schedule without dithering (all sigma^2 = 0), and for the edge
  experiment (paper 000, Exp. 3) a model on a Canny edge map of T1 (fixed) vs T2-like with the
  edge schedule ``(2, 20) -> (2, 10) -> (1, 0)``.
* Test data: the held-out slices between the training ones, each misaligned by a rigid transform
  whose translation has the norm given by the column (random direction) and a random rotation
  of 0.02-0.10 rad.
* Registration: the same optimiser and pyramid for every metric: Powell, one level at the
  data's spacing, starting from the identity; MI is Mattes MI (32 bins, all voxels in the
  fixed mask). A second MI row uses itreg's default rigid preset (Adam, 3-level pyramid) for
  reference.
* Error: mean distance over the fixed brain mask between the estimated and true transforms
  (mm); success = mean error < 1 voxel.
* Response width: the metric along x-translations of aligned held-out pairs, normalised to
  [0, 1]; FWHM in mm and the position of the peak. The k-th pair's T2-like image has its own
  bias field and noise (synthesis seed 77 + k). ``--response-seed 77`` gives every pair the
  same one, as in the 2026-11-22 run: that bias field alone shifts every peak by about
  +0.3 mm, for DITR and (with the opposite sign) MI alike
  (``results/2026-12-06-ditr-zero-mean.md``). ``--response-only`` skips the registrations.

Run ``python benchmarks/ditr_capture_range.py --out bench-ditr`` (``--train-only KIND`` trains
one model, so the three models can be trained in parallel processes; models are cached in
``--out``; ``--zero-mean`` / ``--no-zero-mean`` set ``DITRTrainConfig.zero_mean_updates``,
``--bias-augment S`` sets ``DITRTrainConfig.bias_augment`` and ``--normalize`` /
``--no-normalize`` set ``DITRTrainConfig.normalize_patches``).
Prints the tables; writes ``results.json``. Each model's ``ditr-KIND.json`` also records the
error of its final IML training labels against the true training transforms.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

import itreg
from itreg.image import Image
from itreg.metrics import get_metric
from itreg.metrics.ditr import ditr_overrides
from itreg.phantoms import brain_center, load_mni, pad_grid, synthesize
from itreg.phantoms.slices import axial_slices
from itreg.train.ditr import DITRTrainConfig, TrainingPair, train_ditr
from itreg.transforms import Rigid
from itreg.warp import resample

SIZES = (3.0, 8.0, 15.0, 25.0)
#: Classifier widths of this benchmark: half the methods.md widths (32-64-128-256), to fit the
#: CPU time of a shared two-core machine.
CHANNELS = (16, 32, 64, 128)


# ------------------------------------------------------------------------------------ data
def canny(image: Image, sigma_vox: float = 1.0, low: float = 0.1, high: float = 0.2) -> Image:
    """A Canny edge map (0/1 float) of a 2D image: Gaussian blur, Sobel, NMS, hysteresis."""
    x = image.data[0].float()
    r = max(1, math.ceil(3 * sigma_vox))
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma_vox) ** 2)
    k = k / k.sum()
    x = torch.nn.functional.conv2d(x[None, None], k.view(1, 1, 1, -1), padding=(0, r))
    x = torch.nn.functional.conv2d(x, k.view(1, 1, -1, 1), padding=(r, 0))
    sx = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]])
    gx = torch.nn.functional.conv2d(x, sx.view(1, 1, 3, 3), padding=1)[0, 0]
    gy = torch.nn.functional.conv2d(x, sx.t().reshape(1, 1, 3, 3), padding=1)[0, 0]
    mag = torch.hypot(gx, gy)
    mag = mag / mag.max().clamp_min(1e-12)
    ang = torch.remainder(torch.atan2(gy, gx), math.pi)
    sector = torch.round(ang / (math.pi / 4)).long() % 4
    pad = torch.nn.functional.pad(mag, (1, 1, 1, 1))
    h, w = mag.shape
    shifts = {0: (0, 1), 1: (1, 1), 2: (1, 0), 3: (1, -1)}
    keep = torch.zeros_like(mag, dtype=torch.bool)
    for s, (dy, dx) in shifts.items():
        a = pad[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]
        b = pad[1 - dy:1 - dy + h, 1 - dx:1 - dx + w]
        keep |= (sector == s) & (mag >= a) & (mag >= b)
    nms = mag * keep
    strong = nms >= high
    weak = nms >= low
    edges = strong
    for _ in range(50):
        grown = torch.nn.functional.max_pool2d(edges.float()[None, None], 3, 1, 1)[0, 0] > 0
        grown = grown & weak
        if torch.equal(grown, edges):
            break
        edges = grown
    return Image(edges.float()[None], image.grid, is_label=False)


def moved_pair(tissues: dict, transform, seed: int, fixed_kind: str = "t1") -> tuple:
    """(fixed, moving T2-like, fixed mask) with ``moving(T(x)) = T2(x)`` as in itreg.phantoms."""
    fixed = tissues["t1"]
    grid = fixed.grid
    mask = tissues["mask"]
    moving_grid = pad_grid(grid, 40.0)
    keys = ("csf", "gm", "wm")
    stack = torch.cat([tissues[k].data.float() for k in keys] + [(mask.data != 0).float()])
    with torch.no_grad():
        warped = resample(Image(stack, grid, is_label=False), transform.inverse(), moving_grid,
                          mode="linear").data.clamp(0, 1)
    mmask = (warped[-1:] >= 0.5).to(torch.uint8)
    mt = {k: Image(warped[i:i + 1].contiguous(), moving_grid, is_label=False)
          for i, k in enumerate(keys)}
    mt["csf"] = mt["csf"].with_data(mt["csf"].data * mmask, is_label=False)
    mt["mask"] = Image(mmask, moving_grid, is_label=True)
    moving = synthesize(mt, "t2", noise_sigma=0.02, bias=(0.8, 1.17), seed=seed)
    if fixed_kind == "edges":
        fixed = canny(fixed)
    return fixed, moving, mask


def rigid(center, shift, angle) -> Rigid:
    return Rigid(2, center=torch.tensor(center, dtype=torch.float32),
                 translation=torch.tensor(shift, dtype=torch.float32),
                 angles=torch.tensor([angle], dtype=torch.float32))


def slices(spacing: float):
    tissues = load_mni(spacing)
    n = tissues["t1"].grid.shape[0]
    band = list(range(n // 2 - int(24 / spacing * 2), n // 2 + int(24 / spacing * 2) + 1))
    train = band[0::2]
    test = band[1::2]
    return tissues, train, test


# ------------------------------------------------------------------------------------ training
MODELS = {
    "t2": ("t1", ((2, 100.0), (1, 15.0), (1, 0.0))),
    "t2-nodither": ("t1", ((2, 0.0), (1, 0.0), (1, 0.0))),
    "edges": ("edges", ((2, 20.0), (2, 10.0), (1, 0.0))),
}


def train_model(kind: str, out: Path, spacing: float, shift: float, quick: bool,
                zero_mean: bool | None = None, bias_augment: float | None = None,
                normalize: bool | None = None) -> Path:
    path = out / f"ditr-{kind}.pt"
    if (out / f"ditr-{kind}.json").exists():
        return path
    tissues, train, _ = slices(spacing)
    fixed_kind, schedule = MODELS[kind]
    g = torch.Generator().manual_seed(7)
    pairs, truths = [], []
    for i, z in enumerate(train):
        sl = axial_slices(tissues, z)
        c = brain_center(sl["mask"])
        t = (torch.rand(2, generator=g) * 2 - 1) * shift
        a = float((torch.rand(1, generator=g) * 2 - 1) * 0.05)
        truth = rigid(c, t.tolist(), a)
        fixed, moving, mask = moved_pair(sl, truth, 1000 + i, fixed_kind)
        pairs.append(TrainingPair(fixed, moving, mask))
        truths.append(truth)
    extra = {"patches_per_epoch": 4096, "epochs": 2, "val_patches": 1024} if quick else {
        "patches_per_epoch": 8192, "epochs": 5, "val_patches": 2048}
    if zero_mean is not None:
        extra["zero_mean_updates"] = zero_mean
    if bias_augment is not None:
        extra["bias_augment"] = bias_augment
    if normalize is not None:
        extra["normalize_patches"] = normalize
    cfg = DITRTrainConfig.small(schedule=schedule, seed=1, threads=1, progress=False,
                                channels=CHANNELS, **extra)
    t0 = time.time()
    res = train_ditr(pairs, cfg, output=path, force=True)
    info = {"kind": kind, "time_s": time.time() - t0, "pairs": len(pairs),
            "zero_mean_updates": cfg.zero_mean_updates,
            "bias_augment": cfg.bias_augment, "normalize_patches": cfg.normalize_patches,
            "stages": [{k: v for k, v in s.items() if k != "train"} for s in res.stages],
            "label_error_mm": label_errors(pairs, res.transforms, truths)}
    (out / f"ditr-{kind}.json").write_text(json.dumps(info, indent=1))
    return path


def label_errors(pairs, transforms, truths) -> dict:
    """Errors of the final IML training labels against the true transforms: mean distance
    over each fixed mask (mm), and the mean over pairs of the mean displacement (the common
    bias, mm, x then y)."""
    errs, bias = [], []
    for p, est, true in zip(pairs, transforms, truths):
        pts = p.fixed.grid.points()[p.mask.data[0] > 0]
        with torch.no_grad():
            diff = (est(pts) if est is not None else pts) - true(pts)
        errs.append(float(diff.norm(dim=-1).mean()))
        bias.append(diff.mean(0).tolist())
    return {"mean_error_mm": float(torch.tensor(errs).mean()), "per_pair_mm": errs,
            "common_bias_mm": torch.tensor(bias).mean(0).tolist()}


# ------------------------------------------------------------------------------------ eval
def mean_error(est, true, points) -> float:
    with torch.no_grad():
        return float((est(points) - true(points)).norm(dim=-1).mean())


def run_case(metric: str, fixed, moving, mask, spacing, preset_mi=False):
    mimg = Image(mask.data.to(torch.uint8), mask.grid, is_label=True)
    if metric.startswith("ditr:"):
        ov = ditr_overrides(metric[5:], iterations=30)
    elif preset_mi:
        return itreg.register(fixed, moving, "rigid", metric="mi", fixed_mask=mimg, init="none",
                              progress=False, threads=1)
    else:
        ov = {"optimizer": "powell", "shrink": [1], "smoothing_mm": [0.0],
              "learning_rate": [1.0], "iterations": [30], "sampling.strategy": "full",
              "metric.bins": 32}
    return itreg.register(fixed, moving, "rigid", metric=metric, fixed_mask=mimg,
                          init="none", progress=False, overrides=ov, threads=1)


def response(metric_name: str, fixed, moving_aligned_fn, mask, offsets):
    """Metric quantity along x-translations (normalised to [0, 1])."""
    metric = get_metric(metric_name) if not metric_name.startswith("mi") else get_metric(
        "mi", bins=32)
    vals = []
    for dx in offsets:
        t = Rigid(2, translation=torch.tensor([dx, 0.0]))
        warped, inside = moving_aligned_fn(t)
        with torch.no_grad():
            loss = metric(fixed.data, warped.data, mask=(mask.data[0] > 0) & inside)
        vals.append(-float(loss))
    v = torch.tensor(vals)
    v = (v - v.min()) / (v.max() - v.min()).clamp_min(1e-12)
    return v


def fwhm(offsets, v) -> tuple[float, float]:
    """FWHM (mm, on the sample grid) and the peak position (mm, parabola through the maximum
    and its two neighbours, so not quantised to the sampling step)."""
    i = int(v.argmax())
    peak = float(offsets[i])
    if 0 < i < len(v) - 1:
        a, b, c = float(v[i - 1]), float(v[i]), float(v[i + 1])
        den = a - 2 * b + c
        if den < 0:
            peak += 0.5 * (a - c) / den * float(offsets[i + 1] - offsets[i])
    lo = i
    while lo > 0 and v[lo] >= 0.5:
        lo -= 1
    hi = i
    while hi < len(v) - 1 and v[hi] >= 0.5:
        hi += 1
    return float(offsets[hi] - offsets[lo]), peak


def evaluate(out: Path, spacing: float, cases: int, sizes, tasks=("t1", "edges"),
             ditr_only: bool = False, only=None, response_seed: int | None = None) -> dict:
    tissues, _, test = slices(spacing)
    g = torch.Generator().manual_seed(11)
    models = {k: out / f"ditr-{k}.pt" for k in MODELS}
    methods = {
        "t1": [("DITR (IML + dither)", f"ditr:{models['t2']}", False),
               ("DITR (IML, no dither)", f"ditr:{models['t2-nodither']}", False),
               ("MI (Powell, 1 level)", "mi", False),
               ("MI (rigid preset: Adam, 3 levels)", "mi", True)],
        "edges": [("DITR edges (IML + dither)", f"ditr:{models['edges']}", False),
                  ("MI (Powell, 1 level)", "mi", False),
                  ("MI (rigid preset: Adam, 3 levels)", "mi", True)],
    }
    results: dict = {"spacing_mm": spacing, "sizes_mm": list(sizes), "cases": cases,
                     "tables": {}, "response": {}}
    methods = {k: [r for r in v if (not ditr_only or r[1].startswith("ditr:"))
                   and (not only or any(w in r[0] for w in only))]
               for k, v in methods.items() if k in tasks}
    for task, rows in (methods.items() if sizes else ()):
        table = {name: {"success": [], "median_error": [], "initial": [], "errors": [],
                        "seconds_per_case": []} for name, _, _ in rows}
        for size in sizes:
            errs = {name: [] for name, _, _ in rows}
            secs = {name: 0.0 for name, _, _ in rows}
            inits = []
            for c in range(cases):
                z = test[int(torch.randint(len(test), (1,), generator=g))]
                sl = axial_slices(tissues, z)
                center = brain_center(sl["mask"])
                phi = float(torch.rand(1, generator=g)) * 2 * math.pi
                shift = [size * math.cos(phi), size * math.sin(phi)]
                ang = float(torch.empty(1).uniform_(0.02, 0.10, generator=g)) * (
                    1 if float(torch.rand(1, generator=g)) < 0.5 else -1)
                true = rigid(center, shift, ang)
                fixed, moving, mask = moved_pair(sl, true, 5000 + c, task)
                pts = fixed.grid.points()[mask.data[0] > 0]
                inits.append(mean_error(Rigid(2), true, pts))
                for name, metric, preset in rows:
                    t0 = time.time()
                    res = run_case(metric, fixed, moving, mask, spacing, preset)
                    secs[name] += (time.time() - t0) / cases
                    errs[name].append(mean_error(res.transform, true, pts))
            for name, values in errs.items():
                e = torch.tensor(values)
                table[name]["success"].append(float((e < spacing).float().mean()))
                table[name]["median_error"].append(float(e.median()))
                table[name]["initial"].append(float(torch.tensor(inits).mean()))
                table[name]["errors"].append(values)
                table[name]["seconds_per_case"].append(secs[name])
            print(f"[{task}] size {size:g} mm done", file=sys.stderr, flush=True)
        results["tables"][task] = table
    # Response widths on aligned held-out pairs.
    offsets = torch.arange(-30.0, 30.01, spacing / 2)
    for task, rows in methods.items():
        widths: dict = {}
        for name, metric, preset in rows:
            if preset:
                continue
            ws, ps, seeds = [], [], []
            for k, z in enumerate(test[::3]):
                sl = axial_slices(tissues, z)
                seed = 77 + k if response_seed is None else response_seed
                seeds.append(seed)
                fixed, moving, mask = moved_pair(sl, Rigid(2), seed, task)

                def warp_fn(t, moving=moving, fixed=fixed):
                    from itreg.warp import resample_with_mask
                    return resample_with_mask(moving, t, fixed.grid)

                v = response(metric, fixed, warp_fn, mask, offsets.tolist())
                w, p = fwhm(offsets.tolist(), v)
                ws.append(w)
                ps.append(p)
            widths[name] = {"fwhm_mm": float(torch.tensor(ws).mean()),
                            "mean_abs_peak_mm": float(torch.tensor(ps).abs().mean()),
                            "mean_peak_mm": float(torch.tensor(ps).mean()),
                            "peaks_mm": ps, "synthesis_seeds": seeds}
        results["response"][task] = widths
    return results


def print_tables(results: dict) -> None:
    sizes = results["sizes_mm"]
    sp = results["spacing_mm"]
    for task, table in results["tables"].items():
        title = "T1 -> T2-like" if task == "t1" else "T1 Canny edges -> T2-like"
        print(f"\n{title}: success rate (mean error < {sp:g} mm = 1 voxel), "
              f"{results['cases']} held-out cases per size; median error mm in brackets")
        print("| method | " + " | ".join(f"|t|={s:g} mm" for s in sizes) + " |")
        print("|---|" + "---|" * len(sizes))
        first = next(iter(table.values()))
        print("| initial mean error (mm) | " + " | ".join(f"{x:.1f}" for x in first["initial"])
              + " |")
        for name, row in table.items():
            cells = [f"{s * 100:.0f}% ({m:.1f})" for s, m in zip(row["success"],
                                                                 row["median_error"])]
            print(f"| {name} | " + " | ".join(cells) + " |")
    for task, widths in results["response"].items():
        print(f"\nResponse to x-translation ({task}, aligned held-out pairs): FWHM and |peak|")
        print("| method | FWHM (mm) | mean abs peak offset (mm) | mean peak offset (mm) |\n"
              "|---|---|---|---|")
        for name, w in widths.items():
            print(f"| {name} | {w['fwhm_mm']:.1f} | {w['mean_abs_peak_mm']:.2f} | "
                  f"{w.get('mean_peak_mm', float('nan')):+.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench-ditr"))
    ap.add_argument("--spacing", type=float, default=3.0)
    ap.add_argument("--train-shift", type=float, default=4.0)
    ap.add_argument("--cases", type=int, default=5)
    ap.add_argument("--sizes", type=float, nargs="+", default=list(SIZES))
    ap.add_argument("--train-only", choices=sorted(MODELS))
    ap.add_argument("--quick", action="store_true", help="tiny training (smoke test)")
    ap.add_argument("--zero-mean", action=argparse.BooleanOptionalAction, default=None,
                    help="train with (or without) zero-mean IML updates "
                    "(DITRTrainConfig.zero_mean_updates; default: the config's default)")
    ap.add_argument("--bias-augment", type=float, default=None,
                    help="amplitude of the bias-field augmentation of the training patches "
                    "(DITRTrainConfig.bias_augment; default: the config's default)")
    ap.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None,
                    help="per-patch intensity normalisation in the classifier "
                    "(DITRTrainConfig.normalize_patches; default: the config's default)")
    ap.add_argument("--task", choices=["t1", "edges"], help="evaluate one task only")
    ap.add_argument("--report", action="store_true", help="print the tables of saved results")
    ap.add_argument("--ditr-only", action="store_true", help="skip the MI rows")
    ap.add_argument("--response-only", action="store_true",
                    help="only the response widths (no registration cases)")
    ap.add_argument("--response-seed", type=int, default=None,
                    help="one synthesis seed (bias field and noise of the T2-like image) for "
                    "every response pair; 77 is the 2026-11-22 definition. Default: seed 77+k "
                    "for the k-th pair, so one bias field does not shift every peak alike")
    ap.add_argument("--rows", nargs="+", help="evaluate only the rows whose name contains one "
                    "of these words (e.g. 'MI' 'no dither'), with the models already in --out; "
                    "results-*.json merge in --report")
    args = ap.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.train_only:
        train_model(args.train_only, args.out, args.spacing, args.train_shift, args.quick,
                    args.zero_mean, args.bias_augment, args.normalize)
        return
    if args.report:
        merged: dict = {}
        for f in sorted(args.out.glob("results-*.json")):
            r = json.loads(f.read_text())
            if not merged:
                merged = r
            else:
                for key in ("tables", "response"):
                    for task, part in r[key].items():
                        merged[key].setdefault(task, {}).update(part)
        print_tables(merged)
        return
    tasks = (args.task,) if args.task else ("t1", "edges")
    needed = [] if args.rows else [k for k in MODELS if MODELS[k][0] in tasks]
    for kind in needed:
        if not (args.out / f"ditr-{kind}.json").exists():
            train_model(kind, args.out, args.spacing, args.train_shift, args.quick,
                        args.zero_mean, args.bias_augment, args.normalize)
    for kind in needed:
        info = args.out / f"ditr-{kind}.json"
        if info.exists():
            print(f"model {kind}: {info.read_text()}", file=sys.stderr)
    t0 = time.time()
    results = evaluate(args.out, args.spacing, args.cases,
                       [] if args.response_only else args.sizes, tasks, args.ditr_only,
                       args.rows, args.response_seed)
    results["response_seed"] = args.response_seed
    results["eval_wall_s"] = time.time() - t0
    tag = "-".join(tasks) + ("-" + "-".join(w.replace(" ", "_") for w in args.rows)
                             if args.rows else "") + ("-response" if args.response_only else "")
    (args.out / f"results-{tag}.json").write_text(json.dumps(results, indent=1))
    print_tables(results)


if __name__ == "__main__":
    main()

"""Metrics under an MR bias field: MI, NGF, MIND-SSC and MI after N4, with and without the field.

Cases are :func:`itreg.phantoms.brain_pair` pairs (fixed: the MNI T1; moving: T2-like) at
``--spacing`` mm: random 20 mm B-spline FFDs for the ``bspline`` preset (the benchmark's FFD
kind) and the anchor benchmark's affine ranges for the ``affine`` preset (its affine kind).
Each case is built twice from the same seed: without a bias field (``bias=None``) and with
the random field of amplitude ``--bias`` (0.25: the moving image multiplied by a smooth field
spanning 0.75 to 1.25 over the brain), so the two rows of a case differ by the field only.

Every run is ``itreg.register(fixed, moving, preset, metric, seed=0, threads=--threads)``
without masks, as ``benchmarks/run.py`` runs itreg; ``mi+n4`` is ``metric="mi"`` with
``bias_correction="n4"`` (N4 inside each image's Otsu foreground). The error is the mean
warping error over the fixed brain mask against the true transform
(:func:`itreg.evaluate.warping_error`, as in ``benchmarks/run.py``), with the fraction of
det J <= 0 for deformable runs and the registration's wall time (noisy: shared cores).

    .venv/bin/python benchmarks/bias_metrics.py --cases 2 --spacing 2 \\
        --out benchmarks/results/2026-12-08-bias-metrics

Rows are appended to ``OUT.json`` as they finish (a rerun skips rows already there, so the
runs can be split with ``--presets`` / ``--metrics``); ``OUT.md`` is rewritten from it.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

#: Preset -> phantom kind.
PHANTOM_KIND = {"bspline": "ffd", "affine": "anchor"}
METRICS = ("mi", "ngf", "mind-ssc", "mi+n4")


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def build(kind: str, seed: int, spacing: float, bias: float | None):
    from itreg.phantoms import brain_pair

    return brain_pair(spacing_mm=spacing, contrast="t2", kind=kind, seed=seed, bias=bias)


def run_one(pair, preset: str, metric: str, threads: int, overrides: dict | None) -> dict:
    from itreg import register
    from itreg.evaluate import jacobian_statistics, warping_error

    name, _, extra = metric.partition("+")
    t0 = time.perf_counter()
    result = register(pair.fixed, pair.moving, preset, name, seed=0, threads=threads,
                      progress=False, bias_correction=extra or "none", overrides=overrides)
    wall = time.perf_counter() - t0
    grid = pair.fixed.grid
    mask = pair.fixed_mask.data[0] != 0
    true = pair.true_transform.to(torch.float64)
    with torch.no_grad():
        err = warping_error(result.transform.to(torch.float64), true, grid, mask)
        row = {"mean_mm": err.mean_mm, "p90_mm": err.p90_mm, "wall_s": wall,
               "stop_reasons": sorted(set(result.stop_reasons))}
        if preset != "affine":
            row["folding"] = jacobian_statistics(result.transform, grid, mask).folding_fraction
    return row


def key(row: dict) -> tuple:
    return (row["preset"], row["metric"], row["seed"], row["bias"])


def fmt(v, digits=3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def write_markdown(data: dict, path: Path) -> None:
    rows = data["rows"]
    lines = [f"# Metrics under an MR bias field ({data['date']})", "",
             "Written by `benchmarks/bias_metrics.py` (its docstring has the protocol).", "",
             "Commands:", ""]
    lines += [f"    {c}" for c in data["commands"]]
    lines += ["", f"Machine: {data['machine']}; load average at the runs' starts: "
              f"{', '.join(sorted(set(data['loads'])))}. Spacing {data['spacing_mm']} mm, "
              f"bias amplitude {data['bias']}, {data['threads']} thread(s).", "",
              "Mean warping error over the fixed brain mask (mm), one column per case seed, "
              "then the mean; `ratio` is the mean with the field over the mean without it.", ""]
    for preset in sorted({r["preset"] for r in rows}, reverse=True):
        sub = [r for r in rows if r["preset"] == preset]
        seeds = sorted({r["seed"] for r in sub})
        head = " | ".join(f"seed {s}" for s in seeds)
        lines += [f"## `{preset}` preset ({PHANTOM_KIND[preset]} phantoms)", "",
                  f"| metric | field | {head} | mean | ratio | det J <= 0 | wall s (mean) |",
                  "|---|---|" + "---|" * (len(seeds) + 4)]
        for metric in [m for m in METRICS if any(r["metric"] == m for r in sub)]:
            means = {}
            for bias in (None, data["bias"]):
                cells = {r["seed"]: r for r in sub if r["metric"] == metric and r["bias"] == bias}
                if not cells:
                    continue
                errs = [cells[s]["mean_mm"] for s in seeds if s in cells]
                means[bias] = statistics.mean(errs) if len(errs) == len(seeds) else None
                ratio = ""
                if bias is not None and means.get(None) and means[bias] is not None:
                    ratio = f"{means[bias] / means[None]:.2f}"
                fold = [cells[s].get("folding") for s in seeds if s in cells]
                fold_cell = ("-" if any(f is None for f in fold)
                             else f"{100 * max(fold):.3f} % (max)")
                wall = statistics.mean(cells[s]["wall_s"] for s in seeds if s in cells)
                label = "none" if bias is None else f"+-{int(round(100 * bias))} %"
                lines.append(f"| {metric} | {label} | "
                             + " | ".join(fmt(cells[s]["mean_mm"]) if s in cells else "-"
                                          for s in seeds)
                             + f" | {fmt(means[bias])} | {ratio} | {fold_cell} | {wall:.0f} |")
        lines.append("")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cases", type=int, default=2, help="case seeds 0..cases-1")
    p.add_argument("--spacing", type=float, default=2.0)
    p.add_argument("--bias", type=float, default=0.25, help="amplitude of the field")
    p.add_argument("--presets", default="bspline,affine")
    p.add_argument("--metrics", default=",".join(METRICS))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--set", dest="sets", action="append", default=[],
                   help="KEY=VALUE override passed to every run (JSON value), recorded")
    p.add_argument("--out", default="benchmarks/results/bias-metrics")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    out_json = Path(args.out + ".json")
    overrides = {k: json.loads(v) for k, v in (s.split("=", 1) for s in args.sets)} or None
    data = {"date": time.strftime("%Y-%m-%d"), "spacing_mm": args.spacing, "bias": args.bias,
            "threads": args.threads, "machine": f"{platform.machine()}, "
            f"{torch.get_num_threads()} torch thread(s), torch {torch.__version__}",
            "commands": [], "loads": [], "rows": []}
    if out_json.exists():
        data = json.loads(out_json.read_text())
    command = shlex.join([".venv/bin/python", *sys.argv])
    if command not in data["commands"]:
        data["commands"].append(command)
    data["loads"].append(load_average())
    done = {key(r) for r in data["rows"]}
    presets = [s for s in args.presets.split(",") if s]
    metrics = [m for m in args.metrics.split(",") if m]
    for preset in presets:
        for seed in range(args.cases):
            for bias in (None, args.bias):
                todo = [m for m in metrics
                        if (preset, m, seed, bias) not in done]
                if not todo:
                    continue
                pair = build(PHANTOM_KIND[preset], seed, args.spacing, bias)
                for metric in todo:
                    row = {"preset": preset, "metric": metric, "seed": seed, "bias": bias,
                           "overrides": overrides}
                    row.update(run_one(pair, preset, metric, args.threads, overrides))
                    print(f"[{time.strftime('%H:%M:%S')}] {preset} {metric} seed {seed} "
                          f"bias {bias}: {row['mean_mm']:.3f} mm in {row['wall_s']:.0f} s "
                          f"(load {load_average()})", flush=True)
                    data["rows"].append(row)
                    out_json.parent.mkdir(parents=True, exist_ok=True)
                    out_json.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
                    write_markdown(data, Path(args.out + ".md"))


if __name__ == "__main__":
    main()

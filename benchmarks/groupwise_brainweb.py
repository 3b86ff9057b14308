"""Issue 4 evidence: groupwise registration of BrainWeb-style groups (X-CoReg and baselines).

Part 1 (accuracy, 2D, nonrigid): each group is ``itreg.phantoms.groups.brain_group``: the
middle axial slice of the MNI template at 2 mm in three contrasts (T1, T2-like, PD-like;
Rician noise 3 %, bias field 0.9-1.1, z-scored), each image under its own random cubic B-spline
FFD (40 mm control spacing, coefficient sigma 5 mm), and the group is registered by X-CoReg and
each baseline with the same schedule (``itreg.groupwise.coreg.ffd_stages``: a 40 mm FFD at half
resolution, then a 20 mm FFD at full resolution, control-mesh bending weight 1e-2; unbiased
mode; X-CoReg with K = 5, the k-means start of Gamma and sample rate 0.25 by default,
see --k/--init/--sample-rate). The groupwise warping index (Eqs. 49-50) is measured over the
brain before and after. ``--bias-correction n4`` runs every method on N4-corrected images
(register_group's ``bias_correction``; its time is included in the per-group time);
``--no-bias`` builds the groups without a bias field.

Part 2 (cost, 3D, rigid): groups of N = 4, 8, 16, 32 images at 4 mm (contrasts T1/T2/PD in
turn, each under a random rigid motion with rotations up to 15 degrees and translations up to
20 mm) are registered by X-CoReg and APE for a fixed number of iterations; the seconds per
iteration are reported with their growth relative to N = 4 (linear: N/4; quadratic:
(N (N - 1)) / 12). X-CoReg's iteration includes the E-step on every voxel of the level grid
(N full warps without gradient), a constant factor over APE's sampled pairs that the
quadratic pair count overtakes between N = 16 and 32. For N = 8 both methods also run the
full rigid schedule and the groupwise registration error (Eqs. 51-52, the 8 corners of the
volume) is reported.

    python benchmarks/groupwise_brainweb.py --groups 10 --threads 1
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch

from itreg.evaluate.groupwise import groupwise_registration_error, groupwise_warping_index
from itreg.groupwise import GroupStage, register_group
from itreg.groupwise.coreg import ffd_stages
from itreg.phantoms import load_mni, random_affine, synthesize
from itreg.phantoms.groups import brain_group
from itreg.transforms import Identity
from itreg.warp import resample

CONTRASTS = ("t1", "t2", "pd")


def gwi(misalignments, estimates, grid, mask) -> float:
    """Groupwise warping index (Eqs. 49-50) over the phantom's foreground, in mm."""
    estimates = [Identity(grid.ndim) if e is None else e for e in estimates]
    return groupwise_warping_index(estimates, misalignments, grid, mask).value_mm


def gre(misalignments, estimates, grid) -> float:
    """Groupwise registration error (Eqs. 51-52) at the corners of the volume, in mm."""
    estimates = [Identity(grid.ndim) if e is None else e for e in estimates]
    return groupwise_registration_error(estimates, misalignments, grid).value_mm


def part1(args) -> dict:
    stages = ffd_stages(args.iterations)
    table: dict[str, list[float]] = {"none": []}
    times: dict[str, list[float]] = {}
    for g in range(args.groups):
        group = brain_group(3, kind="ffd", ndim=2, spacing_mm=2.0, seed=args.seed + g,
                            noise_sigma=args.noise,
                            bias=None if args.no_bias else (0.9, 1.1), control_spacing_mm=40.0,
                            sigma_mm=args.sigma)
        images, mis, mask = group.images, group.misalignments, group.common_mask
        grid = images[0].grid
        table["none"].append(gwi(mis, [None] * 3, grid, mask))
        for method in args.methods:
            opts = {"k": args.k} if method in ("xmetric", "gmm", "mvmm") else {}
            if method == "xmetric":
                opts.update(init=args.init, sample_rate=args.sample_rate,
                            full_update_every=args.full_update_every,
                            lookup=args.density_lookup)
                if args.warmup:
                    opts["warmup"] = args.warmup
            res = register_group(images, metric=method, stages=stages, seed=g,
                                 threads=args.threads, bias_correction=args.bias_correction,
                                 **opts)
            table.setdefault(method, []).append(gwi(mis, res.transforms, grid, mask))
            times.setdefault(method, []).append(res.wall_time_s
                                                + res.settings["bias_correction_time_s"])
        print(f"group {g}: " + ", ".join(f"{k} {v[-1]:.3f}" for k, v in table.items()),
              flush=True)
    return {"gwi": table, "time_s": times}


def brain_group_3d(tissues, n: int, seed: int):
    grid = tissues["t1"].grid
    center = grid.center
    images, truths = [], []
    for j in range(n):
        base = synthesize(tissues, CONTRASTS[j % 3], noise_sigma=0.02, bias=(0.9, 1.1),
                          seed=1000 * seed + j)
        t = random_affine(3, center, seed=1000 * seed + 500 + j, kind="rigid",
                          translation_mm=(0.0, 20.0), rotation_rad=(0.0, math.radians(15)))
        with torch.no_grad():
            img = resample(base, t, grid)
        images.append(img.with_data(img.data.detach()))
        truths.append(t)  # image_j(y) = base(t(y)): phi_dag_j = t (image j -> common space)
    return images, truths


def part2(args) -> dict:
    tissues = load_mni(4.0)
    grid = tissues["t1"].grid
    out: dict = {"per_iteration_s": {}, "gre": {}}
    timing_stages = [GroupStage("rigid", (1,), args.timing_iterations)]
    for n in args.timing_n:
        images, _ = brain_group_3d(tissues, n, args.seed)
        for method in args.part2_methods:
            opts = ({"k": 8, "levels": 32, "full_update_every": args.full_update_every}
                    if method == "xmetric" else {"levels": 32})
            res = register_group(images, metric=method, stages=timing_stages,
                                 threads=args.threads, **opts)
            per_it = res.records[-1].time_s / max(res.records[-1].iterations, 1)
            out["per_iteration_s"].setdefault(method, {})[n] = per_it
            print(f"N={n} {method}: {per_it:.3f} s/iteration", flush=True)
    n = 8
    images, truths = brain_group_3d(tissues, n, args.seed + 1)
    out["gre"]["none"] = gre(truths, [None] * n, grid)
    stages = [GroupStage("translation", (4, 2), args.gre_iterations, learning_rate=1.0),
              GroupStage("rigid", (2, 1), args.gre_iterations, learning_rate=1.0)]
    for method in args.part2_methods:
        opts = ({"k": 8, "levels": 32, "full_update_every": args.full_update_every}
                if method == "xmetric" else {"levels": 32})
        res = register_group(images, metric=method, stages=stages, threads=args.threads,
                             **opts)
        out["gre"][method] = gre(truths, res.transforms, grid)
        out["gre"][method + "_time_s"] = res.wall_time_s
        print(f"gRE N=8 {method}: {out['gre'][method]:.2f} mm in {res.wall_time_s:.1f} s",
              flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--groups", type=int, default=10)
    ap.add_argument("--methods", nargs="+", default=["xmetric", "cte", "ape", "gmm", "vi"])
    ap.add_argument("--iterations", type=int, default=100, help="Adam steps per level (2D).")
    ap.add_argument("--sigma", type=float, default=5.0, help="FFD coefficient sigma in mm.")
    ap.add_argument("--timing-n", type=int, nargs="+", default=[4, 8, 16, 32])
    ap.add_argument("--timing-iterations", type=int, default=10)
    ap.add_argument("--gre-iterations", type=int, default=100)
    ap.add_argument("--skip", choices=["part1", "part2"], nargs="*", default=[])
    ap.add_argument("--warmup", type=int, default=0,
                    help="X-CoReg EM warm-up updates before the first step (0: the paper's).")
    ap.add_argument("--k", type=int, default=5, help="classes of X-CoReg, GMM and MvMM (2D part).")
    ap.add_argument("--init", choices=["random", "kmeans"], default="kmeans",
                    help="X-CoReg start of Gamma (random: the paper's Eq. 22).")
    ap.add_argument("--sample-rate", type=float, default=0.25,
                    help="X-CoReg density/gradient sample rate (2D part; 0.25 of a 2 mm slice "
                    "is about as many points as the paper's 0.1 of a 1 mm slice).")
    ap.add_argument("--bias-correction", choices=["none", "n4"], default="none",
                    help="Preprocessing of every method's images (register_group's "
                    "bias_correction; 2D part).")
    ap.add_argument("--full-update-every", type=int, default=1,
                    help="X-CoReg E-step on every voxel every m-th iteration, at the sample in "
                    "between (1: every iteration, Algorithm 1).")
    ap.add_argument("--density-lookup", choices=["truncate", "linear", "nearest"],
                    default="truncate",
                    help="X-CoReg E-step density lookup (2D part): the authors' truncation (the "
                    "default; half a bin off), linear interpolation between bin centres, or the "
                    "nearest centre.")
    ap.add_argument("--part2-methods", nargs="+", choices=["xmetric", "ape"],
                    default=["xmetric", "ape"])
    ap.add_argument("--noise", type=float, default=0.03, help="Rician noise sigma (2D part).")
    ap.add_argument("--no-bias", action="store_true",
                    help="No bias field (default: 0.9-1.1 over the brain of every slice).")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None, help="Write the numbers here.")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = {}
    t0 = time.perf_counter()
    if "part1" not in args.skip:
        results["part1"] = part1(args)
        print("\ngWI (mm) over", args.groups, "groups, mean +- sd (median):")
        for method, values in results["part1"]["gwi"].items():
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            t = results["part1"]["time_s"].get(method)
            ts = f"  time {statistics.fmean(t):.1f} s/group" if t else ""
            print(f"  {method:10s} {statistics.fmean(values):.3f} +- {sd:.3f} "
                  f"({statistics.median(values):.3f}){ts}")
        print("  congealing N/A (N = 3, as in the paper)")
    if "part2" not in args.skip:
        results["part2"] = part2(args)
        per = results["part2"]["per_iteration_s"]
        n0 = args.timing_n[0]
        print(f"\nseconds per iteration (3D rigid, 4 mm) and growth vs N = {n0}:")
        print("  N    " + "".join(f"{m} (x)".ljust(19) for m in per) + "linear  quadratic")
        for n in args.timing_n:
            cells = "".join(f"{per[m][n]:.3f} ({per[m][n] / per[m][n0]:5.2f})".ljust(19)
                            for m in per)
            print(f"  {n:<4d} {cells}{n / n0:5.2f}   {n * (n - 1) / (n0 * (n0 - 1)):6.2f}")
        g = results["part2"]["gre"]
        print(f"gRE N=8: none {g['none']:.2f} mm; " + "; ".join(
            f"{m} {g[m]:.2f} mm ({g[m + '_time_s']:.1f} s)" for m in args.part2_methods))
    print(f"total {time.perf_counter() - t0:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

"""Issue 7 evidence: deep combined computing (paper 002, sec. 3.5) on 2D phantom groups.

Groups: :class:`itreg.train.dcc.PhantomGroupSource`: axial slices of the MNI template (T1,
T2-like, PD-like, z-scored), each image under its own random cubic B-spline FFD (by default
40 mm control spacing and coefficient sigma 5 mm, the groupwise benchmark's setting, under which
iterative X-CoReg improves the alignment at 4 mm; paper 003's 20 mm / 6 mm FFDs are too fine for
4 mm slices: X-CoReg made them worse in our trial), labels background / CSF / GM / WM (K = 4). Training groups use even slice offsets from the middle slice; validation and
test groups use odd offsets and other seeds, so no test group is seen in training.

For each strategy (``unsupervised``: J empty, paper's DGR; ``weak``: labels on image 0, the T1,
of every group, as DCC+BS; ``all``: DCC+All) a network is trained with
:func:`itreg.train.dcc.train_dcc` (alternating branches, best validation registration Dice
kept), written to a model file, and applied to the held-out test groups with
:func:`itreg.nets.dcc_apply.apply_dcc` (from the file). Measures on the test groups, before
(the untrained network: identity transforms) and after training:

- Reg Dice: mean over image pairs of the Dice (CSF, GM, WM averaged) of the labels propagated to
  the common grid through each ``phi_j`` (paper 002's Reg DSC);
- gWI: groupwise warping index (Eqs. 49-50) over the brain, against the true FFDs, in mm;
- Seg Dice: each image's network segmentation (argmax rho_hat_j) against its own labels, as
  predicted and after the best renaming of the classes (the unsupervised strategy's classes
  have no names: the paper does not score its segmentation);
- Post Dice: the common-space posterior (Eq. 53) against each propagated label map (paper 002's
  Seg DSC);
- the time to train and to apply the model to one group.

Optionally (``--xcoreg``) iterative X-CoReg (FFD schedule of :func:`itreg.register_group`) runs
on the first test groups as a reference.

    python benchmarks/dcc_groups.py --threads 2
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from itreg.evaluate import dice
from itreg.evaluate.groupwise import groupwise_warping_index
from itreg.groupwise import register_group
from itreg.nets.dcc_apply import apply_dcc
from itreg.blocks.modelfile import save_model
from itreg.train.dcc import DCCTrainConfig, PhantomGroupSource, initial_network, train_dcc
from itreg.transforms import Identity
from itreg.warp import resample

CLASSES = (1, 2, 3)


def reg_dice(transforms, labels, grid) -> float:
    """Mean pairwise Dice of the labels propagated onto `grid` through each transform."""
    warped = [resample(lab, t, grid, mode="label") for lab, t in zip(labels, transforms)]
    pairs = [(i, j) for i in range(len(warped)) for j in range(i + 1, len(warped))]
    return statistics.fmean(dice(warped[i], warped[j], CLASSES).mean for i, j in pairs)


def matched_dice(pred: torch.Tensor, labels: torch.Tensor, k: int = 4) -> float:
    """Dice after the best one-to-one renaming of the predicted classes (for the unsupervised
    strategy, whose class indices carry no anatomical meaning)."""
    best = 0.0
    for perm in itertools.permutations(range(k)):
        renamed = torch.tensor(perm, dtype=torch.long)[pred.long()]
        best = max(best, dice(renamed, labels.long(), CLASSES).mean)
    return best


def measure(model, phantoms, domain_names) -> dict[str, float]:
    """Reg Dice, gWI, Seg Dice, Post Dice and apply time of `model` over the test phantoms."""
    acc: dict[str, list[float]] = {k: [] for k in ("reg", "gwi", "seg", "seg_matched", "post",
                                                    "apply_s")}
    for g in phantoms:
        res = apply_dcc(model, g.images, list(g.contrasts), grid=g.grid)
        acc["apply_s"].append(res.wall_time_s)
        acc["reg"].append(reg_dice(res.transforms, g.labels, res.grid))
        acc["gwi"].append(groupwise_warping_index(res.transforms, g.misalignments, g.common_grid,
                                                  g.common_mask).value_mm)
        acc["seg"].append(statistics.fmean(dice(s, lab, CLASSES).mean
                                           for s, lab in zip(res.segmentations, g.labels)))
        acc["seg_matched"].append(statistics.fmean(
            matched_dice(s.data, lab.data) for s, lab in zip(res.segmentations, g.labels)))
        post = res.segmentation
        ov = res.overlap
        scores = []
        for lab, t in zip(g.labels, res.transforms):
            wl = resample(lab, t, res.grid, mode="label").data[0]
            scores.append(dice(post.data[0][ov], wl[ov].to(torch.uint8), CLASSES).mean)
        acc["post"].append(statistics.fmean(scores))
    return {k: statistics.fmean(v) for k, v in acc.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--strategies", nargs="*", default=["unsupervised", "weak"])
    ap.add_argument("--spacing", type=float, default=4.0)
    ap.add_argument("--sigma", type=float, default=5.0, help="FFD sigma (mm)")
    ap.add_argument("--control-spacing", type=float, default=40.0, help="FFD spacing (mm)")
    ap.add_argument("--train-groups", type=int, default=48)
    ap.add_argument("--val-groups", type=int, default=6)
    ap.add_argument("--test-groups", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--steps", type=int, default=20, help="steps per epoch")
    ap.add_argument("--labelled", type=int, nargs="+", default=[0])
    ap.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                    help="DCCTrainConfig overrides (Python literals)")
    ap.add_argument("--xcoreg", type=int, default=0, help="test groups for iterative X-CoReg")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import ast

    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        overrides[key] = ast.literal_eval(value)
    even = tuple(range(-8, 9, 2))
    odd = tuple(range(-7, 8, 2))
    common = {"spacing_mm": args.spacing, "sigma_mm": args.sigma,
              "control_spacing_mm": args.control_spacing}
    train_src = PhantomGroupSource(slice_offsets=even, seed=1, **common)
    val_src = PhantomGroupSource(slice_offsets=odd, seed=2, **common)
    test_src = PhantomGroupSource(slice_offsets=odd, seed=3, **common)
    tests = [test_src.phantom(i) for i in range(args.test_groups)]
    results: dict = {"args": vars(args) | {"json": str(args.json)}, "strategies": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for strategy in args.strategies:
            settings = {"momentum": 0.1, "reg_norm": "none", "field_scale": args.spacing,
                        "epochs": args.epochs, "steps_per_epoch": args.steps, "patience": 0,
                        "train_groups": args.train_groups, "val_groups": args.val_groups,
                        "labelled_images": tuple(args.labelled), "seed": args.seed,
                        "reg_lr": 1e-3, "progress": False} | overrides
            cfg = DCCTrainConfig.small(strategy=strategy, **settings)
            names = list(train_src.contrasts)
            first = train_src[0]
            init = initial_network(cfg, first.grid, len(names), names)
            init_path = save_model(Path(tmp) / f"{strategy}-init.pt", "dcc", init.config(),
                                   init.state_dict(), {"inference": {
                                       "zeta": cfg.zeta_test, "levels": cfg.levels,
                                       "sample_rate": cfg.sample_rate,
                                       "priors": list(cfg.labelled_images)
                                       if strategy == "weak" else
                                       ([0, 1, 2] if strategy == "all" else [])}})
            before = measure(init_path, tests, names)
            t0 = time.perf_counter()
            trained = train_dcc(train_src, val_src, cfg, output=Path(tmp) / f"{strategy}.pt")
            train_s = time.perf_counter() - t0
            after = measure(trained.path, tests, names)
            results["strategies"][strategy] = {
                "before": before, "after": after, "train_s": train_s,
                "epochs": trained.train.epochs, "best_epoch": trained.train.best_epoch,
                "val_history": trained.train.history}
            print(f"{strategy}: trained {trained.train.epochs} epochs in {train_s:.0f} s "
                  f"(best epoch {trained.train.best_epoch + 1}); before {before}; after {after}",
                  flush=True)
    if args.xcoreg:
        acc: dict[str, list[float]] = {"reg": [], "gwi": [], "time_s": []}
        for g in tests[:args.xcoreg]:
            res = register_group(g.images, transform="ffd", k=4, seed=args.seed)
            acc["reg"].append(reg_dice(res.transforms, g.labels, res.grid))
            acc["gwi"].append(groupwise_warping_index(res.transforms, g.misalignments,
                                                      g.common_grid, g.common_mask).value_mm)
            acc["time_s"].append(res.wall_time_s)
        results["xcoreg"] = {k: statistics.fmean(v) for k, v in acc.items()}
    none = {"reg": statistics.fmean(reg_dice([Identity(2)] * len(g.images), g.labels, g.grid)
                                    for g in tests)}
    results["none"] = none
    print(f"\n{len(tests)} held-out groups (3 images, {args.spacing:g} mm, FFD "
          f"{args.control_spacing:g} mm / sigma {args.sigma:g} mm); Reg Dice with no "
          f"registration: {none['reg']:.3f}")
    print("| strategy | Reg Dice before -> after | gWI mm before -> after | Seg Dice before -> "
          "after | Seg Dice, classes matched | Post Dice before -> after | train s | "
          "apply s/group |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results["strategies"].items():
        b, a = r["before"], r["after"]
        print(f"| {name} | {b['reg']:.3f} -> {a['reg']:.3f} | {b['gwi']:.2f} -> {a['gwi']:.2f} | "
              f"{b['seg']:.3f} -> {a['seg']:.3f} | {b['seg_matched']:.3f} -> "
              f"{a['seg_matched']:.3f} | {b['post']:.3f} -> {a['post']:.3f} | "
              f"{r['train_s']:.0f} | {a['apply_s']:.3f} |")
    if "xcoreg" in results:
        x = results["xcoreg"]
        print(f"| X-CoReg (iterative, {args.xcoreg} groups) | -> {x['reg']:.3f} | -> "
              f"{x['gwi']:.2f} | | | | | {x['time_s']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()

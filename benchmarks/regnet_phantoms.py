"""Registration networks trained with different metrics on paper 003's phantoms, beside iterative
itreg B-spline registration with MI.

Data (:class:`itreg.train.sources.PhantomPairs`): fixed = the MNI template T1 (or, with
``--fixed-contrast t2|pd``, a noise-free T2-like or PD-like template: paper 003's T2-T2 and
PD-T2 tasks), moving = a T2-like contrast of the anatomy deformed by a random cubic B-spline
FFD (20 mm control spacing, N(0, 6^2 mm^2) per coefficient), with CSF/GM/WM labels. Training pairs use seeds ``0..``,
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

Incremental runs. Every row is kept as ``--out/rows/<key>.json`` (per-pair measures keyed by
the pair's seed, the summary, the training time, the settings) and written after every test
pair: a rerun with the same settings computes only the pairs a row still lacks and skips
complete rows (``--force`` computes the selected rows again), so a long table is built by
several processes or sessions, each doing some rows (``--methods`` picks ``none``, ``nets``,
``iterative``, ``ants``; ``--losses`` the networks). Phantom pairs are cached on disk in
``--out/pairs`` (one ``.pt`` per seed, :class:`~itreg.train.sources.PhantomPairs`'
``cache_dir``) and shared by those processes. Trained models ``--out/net-<key>.pt`` are
reused; an interrupted training resumes from its checkpoint ``net-<key>.pt.ckpt``, and the
training time summed over the runs is kept in ``net-<key>.pt.train_s.json``. ``--table`` only
assembles whatever rows exist into ``--out/table.md`` (with the number of test pairs per row,
so partial rows show) and ``--out/table.json`` (the rows with their per-pair measures).

3D setting (paper 003's phantoms at 2 mm, 94 x 116 x 98 voxels; chosen to fit two shared CPU
cores, no GPU): 150 training, 4 validation and 50 test pairs; DeformNet widths
8,16,16,16,16 (4 levels) with batch normalisation, batch 1, trained on random 64^3 crops
(``--crop 64``, 6 voxels per face left out of the similarity; a step costs about 1 s of CPU
against 5 s on a whole volume), 38 epochs of 40 steps, no early stopping (the weights of
the best validation epoch are kept), Adam lr 1e-3, EMA 0.99, diffusion weight 0.1 (as in 2D);
validation and test predictions on whole volumes. Settings that did not learn within 60-180
steps (validation Dice within 0.005 of the identity's, or below it): instance normalisation on
crops, no normalisation, diffusion weight 1.0, lr 3e-3 (train loss rose), lr 1e-2 (diverged),
whole 4 mm volumes. Each network takes about an hour of one core::

    OUT=/work/bench-regnet3d; COMMON="--ndim 3 --spacing 2 --out $OUT --train 150 --val 4
        --test 50 --epochs 38 --steps-per-epoch 40 --batch-size 1 --patience 0
        --reg-weight 0.1 --lr 1e-3 --threads 1 --crop 64 --crop-margin 6 --norm batch"
    nice -n 10 python benchmarks/regnet_phantoms.py $COMMON --methods none,iterative
    nice -n 10 python benchmarks/regnet_phantoms.py $COMMON --methods ants
    nice -n 10 python benchmarks/regnet_phantoms.py $COMMON --methods nets --losses lncc
    nice -n 10 python benchmarks/regnet_phantoms.py $COMMON --methods nets --losses mi64
    nice -n 10 python benchmarks/regnet_phantoms.py $COMMON --methods nets --losses deepsim-ae
    ...  (mi16, mine, kldiv; --midice; --refine mi64)
    python benchmarks/regnet_phantoms.py --out $OUT --table

Without ``--table`` the run prints the Markdown table of its own rows and writes
``table.md`` and ``results.json`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
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
NET_ORDER = ("lncc", "mi16", "mi64", "mine", "kldiv", "deepsim", "nmi", "mse", "ncc")
DEEPSIM = ("deepsim-ae", "deepsim-ae-mm")


def net_key(label: str, dice_weight: float) -> str:
    """File-name key of a network: ``"mi64"``, ``"mi64-dice"``, ``"deepsim-ae3d"`` (the
    extractor file's stem for ``deepsim:PATH``)."""
    name = label.split()[0]
    if name.startswith("deepsim:"):
        name = "deepsim-" + Path(name.partition(":")[2]).stem
    return name + ("-dice" if dice_weight else "")


def net_order(key: str) -> int:
    base = key.split("-")[0]
    return 10 + (NET_ORDER.index(base) if base in NET_ORDER else len(NET_ORDER)) * 2 + (
        len(NET_ORDER) * 2 if key.endswith("-dice") else 0)


def loss_setting(name: str, extractors: dict[str, Path] | None = None) -> tuple[str, dict]:
    """``"mi64"`` -> ``("mi", {"bins": 64})``; ``"deepsim-ae"`` -> the registry name of the
    extractor in `extractors` (``deepsim-ae-mm``: its deeper stages 2, 3); other names
    unchanged."""
    if name.startswith("mi") and name[2:].isdigit():
        return "mi", {"bins": int(name[2:])}
    if name in DEEPSIM:
        return f"deepsim:{extractors[name]}", ({"stages": [2, 3]} if name.endswith("-mm")
                                                else {})
    return name, {}


def train_extractor(name: str, out: Path, kw: dict, seed: int, threads: int | None) -> Path:
    """Train (or reuse) the DeepSim auto-encoder `name` (``deepsim-ae``: paper 004's, small
    setting; ``deepsim-ae-mm``: with contrast invariance) on other phantom volumes: the
    template T1 and the T2-like moving images of 8 pairs of seeds ``seed + 300000..``, none
    of them a training, validation or test pair. 3D crops are 32^3 voxels."""
    from itreg.train.deepsim import DeepSimTrainConfig, train_deepsim

    path = out / f"{name}.pt"
    if path.exists():
        return path
    src = PhantomPairs(8, seed=seed + 300_000, cache=False, **kw)
    images = [src[0].fixed] + [src[i].moving for i in range(len(src))]
    make = DeepSimTrainConfig.multimodal if name.endswith("-mm") else DeepSimTrainConfig.small
    crop = {"crop_size": 32} if kw["ndim"] == 3 else {}
    cfg = make(mode="ae", seed=seed, progress=False, threads=threads, **crop)
    t = time.perf_counter()
    res = train_deepsim(images, None, cfg, output=path, force=True)
    train_s = time.perf_counter() - t
    path.with_name(path.name + ".train_s.json").write_text(json.dumps({"train_s": train_s}))
    print(f"{name}: trained in {train_s:.0f} s on {len(images)} volumes "
          f"({len(res.train['history'])} epochs)", file=sys.stderr)
    return path


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
    """Means over pairs (NaN without pairs)."""
    out = {"dice": {}, "n": len(rows)}
    if not rows:
        return {**out, "dice": dict.fromkeys(LABELS.values(), math.nan), "dice_mean": math.nan,
                "hd95": math.nan, "folding": math.nan, "time_s": math.nan, "cpu_s": math.nan,
                "n_cpu": 0}
    for name in LABELS.values():
        out["dice"][name] = sum(r["dice"][name] for r in rows) / len(rows)
    out["dice_mean"] = sum(out["dice"].values()) / len(LABELS)
    out["hd95"] = sum(r["hd95"] for r in rows) / len(rows)
    out["folding"] = sum(r["folding"] for r in rows) / len(rows)
    out["time_s"] = sum(r["time_s"] for r in rows) / len(rows)
    cpu = [r["cpu_s"] for r in rows if "cpu_s" in r]
    out["cpu_s"] = sum(cpu) / len(cpu) if cpu else math.nan
    out["n_cpu"] = len(cpu)
    return out


def table(results: dict) -> str:
    lines = [("| method | n pairs | Dice CSF | Dice GM | Dice WM | Dice mean | HD95 (mm) "
              "| det J <= 0 (%) | time / pair (s) | CPU / pair (s) | training (s) |"),
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        s = r["summary"]
        train = f"{r['train_s']:.0f}" if r.get("train_s") is not None else "-"
        cpu = s.get("cpu_s", math.nan)
        cpu = "-" if not math.isfinite(cpu) else (
            f"{cpu:.3f}" if s["n_cpu"] == s["n"] else f"{cpu:.3f} ({s['n_cpu']} pairs)")
        lines.append(f"| {name} | {s['n']} | {s['dice']['CSF']:.3f} | {s['dice']['GM']:.3f} | "
                     f"{s['dice']['WM']:.3f} | {s['dice_mean']:.3f} | {s['hd95']:.2f} | "
                     f"{100 * s['folding']:.2f} | {s['time_s']:.3f} | {cpu} | {train} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------- rows
class Row:
    """One method's row, kept as ``ROWS/<key>.json`` and written after every test pair.

    The file holds the per-pair measures keyed by the pair's seed, the summary over them, the
    training time of a network and the settings the row depends on (``setting``): a rerun
    with the same settings only computes the pairs still missing (none when the row is
    complete), so a row can be built over several processes or sessions; other settings (or
    ``--force``) start the row again.
    """

    def __init__(self, folder: Path, key: str, label: str, order: int, setting: dict,
                 force: bool = False) -> None:
        self.path = folder / f"{key}.json"
        self.data = {"key": key, "label": label, "order": order, "setting": setting,
                     "pairs": {}, "train_s": None, "runs": []}
        if self.path.is_file() and not force:
            old = json.loads(self.path.read_text())
            if old.get("setting") == setting:
                self.data["pairs"] = old.get("pairs", {})
                self.data["train_s"] = old.get("train_s")
                self.data["runs"] = old.get("runs", [])
            else:
                print(f"{self.path}: other settings, computing the row again", file=sys.stderr)
        self.data["runs"].append({"argv": sys.argv[1:], "started": time.strftime(
            "%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "torch_threads": torch.get_num_threads()})

    def missing(self, test) -> list[int]:
        """Indices of the test pairs without measures."""
        return [i for i in range(len(test)) if str(test.seed + i) not in self.data["pairs"]]

    def add(self, seed: int, measures: dict) -> None:
        self.data["pairs"][str(seed)] = {**measures, "load1": os.getloadavg()[0]}
        self.save()

    def save(self) -> None:
        self.data["summary"] = summarise(list(self.data["pairs"].values()))
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.path)

    def result(self, test) -> dict:
        """The row over the pairs of `test` (summary, training time, settings)."""
        rows = [self.data["pairs"][str(test.seed + i)] for i in range(len(test))
                if str(test.seed + i) in self.data["pairs"]]
        return {"summary": summarise(rows), "train_s": self.data["train_s"],
                **({"config": self.data["setting"]["config"]}
                   if "config" in self.data["setting"] else {})}


def fill(row: Row, test, measure) -> None:
    """Compute ``measure(sample) -> dict`` for every test pair the row lacks."""
    todo = row.missing(test)
    for n, i in enumerate(todo):
        row.add(test.seed + i, measure(test[i]))
        print(f"{row.data['label']}: pair {n + 1}/{len(todo)} "
              f"({row.data['pairs'][str(test.seed + i)]['time_s']:.2f} s)", file=sys.stderr)
    if not todo:
        print(f"{row.data['label']}: complete in {row.path}, reused", file=sys.stderr)
    elif not row.path.is_file():
        row.save()


def assemble(folder: Path) -> tuple[str, list[dict]]:
    """The Markdown table of every row in `folder` (over the pairs each holds), and the rows
    (each with its summary recomputed)."""
    rows = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
    rows = [{**r, "summary": summarise(list(r["pairs"].values()))} for r in rows if r["pairs"]]
    rows.sort(key=lambda r: (r["order"], r["label"]))
    return table({r["label"]: r for r in rows}), rows


# ---------------------------------------------------------------------------------- methods
def network_measure(net, grid):
    def measure(s) -> dict:
        t, c = time.perf_counter(), time.process_time()
        tf = net.predict(s.fixed, s.moving)
        dt, dc = time.perf_counter() - t, time.process_time() - c
        return {**evaluate(tf, s, grid), "time_s": dt, "cpu_s": dc}
    return measure


def refine_measure(path: Path, grid, args):
    """The network's prediction refined by the engine (``register --net --refine``): the
    bspline preset's FFD stage from its second level on, with the training metric, starting
    from the least-squares FFD of the prediction (``refine_init="fit"``)."""
    from itreg.nets.inference import register_with_net

    def measure(s) -> dict:
        c = time.process_time()
        res = register_with_net(s.fixed, s.moving, path, refine=True, progress=False,
                                threads=args.threads, seed=args.seed)
        return {**evaluate(res.transform, s, grid), "time_s": res.wall_time_s,
                "cpu_s": time.process_time() - c}
    return measure


def iterative_measure(grid, args):
    import itreg

    def measure(s) -> dict:
        c = time.process_time()
        res = itreg.register(s.fixed, s.moving, "bspline", "mi", progress=False,
                             threads=args.threads, seed=args.seed)
        return {**evaluate(res.transform, s, grid), "time_s": res.wall_time_s,
                "cpu_s": time.process_time() - c}
    return measure


def ants_measure(grid, args, tmp: Path):
    """ANTsPy SyNOnly through its own resampler (warped labels by nearest neighbour); the
    folding fraction is not measured for it (NaN). Its CPU time is the runner process's
    (ANTs, its Python start and image I/O); its time is ANTs' own registration time."""
    import resource
    import subprocess

    from itreg.image import Image
    from itreg.io import read_image, write_image

    runner = Path(__file__).resolve().parent / "tools" / "ants_runner.py"

    def measure(s) -> dict:
        case = tmp / s.name.replace(" ", "-")
        case.mkdir()
        write_image(s.fixed, case / "fixed.nii.gz")
        write_image(s.moving, case / "moving.nii.gz")
        write_image(s.moving_labels, case / "moving_labels.nii.gz")
        out = case / "ants"
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        subprocess.run([args.ants_python, str(runner), str(case), str(out), "--method",
                        "SyNOnly", "--threads", str(args.threads or 2), "--seed",
                        str(args.seed + 1)], check=True, capture_output=True)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
        info = json.loads((out / "result.json").read_text())
        warped = read_image(out / info["warped_labels"], is_label=True)
        labels = Image(warped.data.to(s.fixed_labels.data.dtype), grid, is_label=True)
        return {**label_measures(s.fixed_labels, labels, grid), "folding": math.nan,
                "time_s": info["wall_s"], "cpu_s": cpu}
    return measure


def train_network(cfg: TrainNetConfig, path: Path, train, val, label: str) -> float | None:
    """Train (or resume, or reuse) the network at `path`; returns the training time summed
    over the runs that trained it (kept beside the model in ``<path>.train_s.json`` with the
    CPU time, ``train_cpu_s``)."""
    side = path.with_name(path.name + ".train_s.json")
    old = json.loads(side.read_text()) if side.is_file() else {}
    before, before_cpu = old.get("train_s", 0.0), old.get("train_cpu_s", 0.0)
    if path.exists():
        return before or load_regnet(path).extra.get("wall_time_s")
    t, c = time.perf_counter(), time.process_time()

    def log(record: dict) -> None:
        side.write_text(json.dumps({"train_s": before + time.perf_counter() - t,
                                    "train_cpu_s": before_cpu + time.process_time() - c}))
        print(f"{label}: epoch {int(record['epoch']) + 1} train loss "
              f"{record['train_loss']:.4f} val Dice {record.get('val_dice', math.nan):.4f} "
              f"({time.perf_counter() - t:.0f} s)", file=sys.stderr)

    res = train_regnet(cfg, train, val, path, progress=False, callback=log)
    train_s = before + time.perf_counter() - t
    side.write_text(json.dumps({"train_s": train_s,
                                "train_cpu_s": before_cpu + time.process_time() - c}))
    print(f"{label}: {res.last.message} ({train_s:.0f} s)", file=sys.stderr)
    return train_s


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("bench-regnet"))
    ap.add_argument("--ndim", type=int, default=2, choices=(2, 3))
    ap.add_argument("--spacing", type=float, default=None, help="mm (default 2 in 2D, 4 in 3D)")
    ap.add_argument("--train", type=int, default=32, help="training pairs")
    ap.add_argument("--val", type=int, default=8, help="validation pairs")
    ap.add_argument("--test", type=int, default=16, help="test pairs")
    ap.add_argument("--methods", default="none,nets,iterative",
                    help="rows to compute: none, nets (one per --losses, + --midice), "
                         "iterative, ants (same as --ants)")
    ap.add_argument("--losses", default="lncc,mi16,mi64,mine,kldiv",
                    help="networks' losses: lncc, mi16, mi64 (MI bins), mine, kldiv, nmi, mse, "
                         "deepsim:PATH, deepsim-ae (trained here on other phantom volumes, "
                         "paper 004's auto-encoder), deepsim-ae-mm (contrast-invariant)")
    ap.add_argument("--midice", action="store_true", help="add MI-64 + soft Dice (labels)")
    ap.add_argument("--paper001", action="store_true",
                    help="add paper 001's MIRegNet and MIDiceRegNet (AffineNet + DeformNet, "
                         "MINE (+ Dice), L_TV at mu = 0.01)")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--steps-per-epoch", type=int, default=16)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--patience", type=int, default=5,
                    help="early-stopping patience in epochs (0: train all epochs)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--reg-weight", type=float, default=0.1, help="diffusion weight")
    ap.add_argument("--features", default="8,16,16,16,16")
    ap.add_argument("--crop", type=int, default=None,
                    help="train on random crops of this many voxels per axis (TrainNetConfig."
                         "crop_size); prediction and validation use whole images")
    ap.add_argument("--crop-margin", type=int, default=6,
                    help="crop voxels per face left out of the similarity and Dice terms")
    ap.add_argument("--norm", default="instance", choices=("instance", "batch", "none"),
                    help="the networks' normalisation (batch or none with --crop: instance "
                         "statistics of a crop differ from those of a whole volume)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--no-iterative", action="store_true")
    ap.add_argument("--refine", default="",
                    help="comma-separated network labels (e.g. mi64,mi64-dice) whose "
                         "predictions are also refined by the iterative engine (--refine)")
    ap.add_argument("--ants", action="store_true",
                    help="add ANTsPy SyNOnly (runs benchmarks/tools/ants_runner.py in "
                         "--ants-python's venv)")
    ap.add_argument("--ants-python", default=".venv-ants/bin/python")
    ap.add_argument("--force", action="store_true",
                    help="compute the selected rows again (trained models are still reused)")
    ap.add_argument("--table", action="store_true",
                    help="only assemble the rows in --out into table.md and print it")
    ap.add_argument("--fixed-contrast", default="t1", choices=("t1", "t2", "pd"),
                    help="fixed image: the template's T1 (default) or a noise-free T2-like / "
                         "PD-like template (paper 003's PD-T2 and T2-T2 tasks)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rows_dir = args.out / "rows"
    if args.table:
        md, rows = assemble(rows_dir)
        print(md)
        (args.out / "table.md").write_text(md + "\n")
        (args.out / "table.json").write_text(json.dumps(rows, indent=1, default=str))
        return 0
    methods = {m for m in args.methods.split(",") if m}
    unknown = methods - {"none", "nets", "iterative", "ants"}
    if unknown:
        ap.error(f"unknown --methods {sorted(unknown)}")
    if args.no_iterative:
        methods.discard("iterative")
    if args.ants:
        methods.add("ants")
    spacing = args.spacing or (2.0 if args.ndim == 2 else 4.0)
    rows_dir.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)

    t0 = time.perf_counter()
    template = load_mni(spacing)
    kw = {"ndim": args.ndim, "spacing_mm": spacing, "template": template,
          "cache_dir": args.out / "pairs", "fixed_contrast": args.fixed_contrast}
    train = PhantomPairs(args.train, seed=args.seed, **kw)
    val = PhantomPairs(args.val, seed=args.seed + 100_000, **kw)
    test = PhantomPairs(args.test, seed=args.seed + 200_000, **kw)
    grid = test.grid
    base = {k: v for k, v in test.config().items() if k != "n"}

    def row(key: str, label: str, order: int, **setting) -> Row:
        return Row(rows_dir, key, label, order, {**base, **setting}, force=args.force)

    results: dict[str, dict] = {}
    if "none" in methods:
        r = row("none", "none", 0)
        fill(r, test, lambda s: {**evaluate(Identity(grid.ndim), s, grid), "time_s": 0.0,
                                 "cpu_s": 0.0})
        results["none"] = r.result(test)

    names = [n for n in args.losses.split(",") if n] if "nets" in methods else []
    extractors = {n: train_extractor(n, args.out, kw, args.seed, args.threads)
                  for n in names if n in DEEPSIM}
    # (label, loss, loss options, Dice weight, other TrainNetConfig settings, row label)
    runs = [(name, *loss_setting(name, extractors), 0.0, {}, f"DeformNet {name}")
            for name in names]
    if args.midice:
        runs.append(("mi64 + Dice (MIDice)", "mi", {"bins": 64}, 1.0, {},
                     "DeformNet mi64 + Dice (MIDice)"))
    if args.paper001:
        # Paper 001: AffineNet + DeformNet trained in two stages with MINE (lambda = 1) and
        # L_TV = ||grad phi_D||^2 at mu = 0.01 (+ Dice, lambda2 = 1, for MIDiceRegNet). L_TV is
        # read as the mean over voxels and displacement components of the squared forward
        # differences summed over directions: itreg's `diffusion` / D, so mu = 0.01 is a
        # diffusion weight of 0.01 / D (world mm; paper 001's 1 mm voxels).
        p001 = {"kind": "cascade", "cascade_mode": "two-stage", "regulariser": "diffusion",
                "reg_weight": 0.01 / args.ndim}
        runs.append(("MIRegNet", "mine", {}, 0.0, p001,
                     "MIRegNet (AffineNet + DeformNet, MINE, L_TV mu 0.01)"))
        runs.append(("MIDiceRegNet", "mine", {}, 1.0, p001,
                     "MIDiceRegNet (AffineNet + DeformNet, MINE + Dice, L_TV mu 0.01)"))
    features = tuple(int(f) for f in args.features.split(","))
    for label, loss, loss_kwargs, dice_weight, extra, row_label in (
            runs if "nets" in methods else []):
        key = net_key(label, dice_weight)
        path = args.out / f"net-{key}.pt"
        settings = {"kind": "deform", "reg_weight": args.reg_weight, **extra}
        cfg = TrainNetConfig.small(loss=loss, loss_kwargs=loss_kwargs,
                                   dice_weight=dice_weight, features=features,
                                   levels=len(features) - 1, epochs=args.epochs,
                                   steps_per_epoch=args.steps_per_epoch,
                                   batch_size=args.batch_size, lr=args.lr,
                                   seed=args.seed,
                                   threads=args.threads, patience=args.patience,
                                   crop_size=args.crop, crop_margin=args.crop_margin,
                                   norm=args.norm, **settings)
        config = {k: v for k, v in cfg.to_dict().items() if k not in ("threads", "device")}
        r = row(f"net-{key}", row_label, net_order(key), config=config,
                n_train=args.train, n_val=args.val)
        if label in extractors:
            side = extractors[label].with_name(extractors[label].name + ".train_s.json")
            r.data["extractor_train_s"] = (json.loads(side.read_text())["train_s"]
                                           if side.is_file() else None)
        todo = r.missing(test)
        if todo or r.data["train_s"] is None:
            r.data["train_s"] = train_network(cfg, path, train, val, label)
            side = path.with_name(path.name + ".train_s.json")
            if side.is_file():
                r.data["train_cpu_s"] = json.loads(side.read_text()).get("train_cpu_s")
            r.save()
        if todo:
            fill(r, test, network_measure(load_regnet(path), grid))
        results[r.data["label"]] = r.result(test)
        if key in [k for k in args.refine.split(",") if k]:
            rr = row(f"net-{key}-refine", f"DeformNet {label} + refine", net_order(key) + 1,
                     config=config,
                     n_train=args.train, n_val=args.val)
            fill(rr, test, refine_measure(path, grid, args))
            results[rr.data["label"]] = rr.result(test)

    if "iterative" in methods:
        r = row("iterative-bspline-mi", "itreg bspline MI (iterative)", 100)
        fill(r, test, iterative_measure(grid, args))
        results[r.data["label"]] = r.result(test)

    if "ants" in methods:
        import tempfile

        r = row("ants-synonly", "ANTs SyNOnly", 101)
        with tempfile.TemporaryDirectory() as tmp:
            fill(r, test, ants_measure(grid, args, Path(tmp)))
        results[r.data["label"]] = r.result(test)

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

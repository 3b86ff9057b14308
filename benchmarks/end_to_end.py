"""End-to-end speed and memory of ``itreg register`` (and ``groupwise``, ``register --net``):
the whole process against the registration's own ``wall_time_s``, per voxel spacing.

Each case runs as its own process, measured from outside: wall clock (``time.perf_counter``
around the child), CPU seconds and peak resident memory (``os.wait4``'s ``ru_maxrss``), plus
the stages that ``report.json`` records under ``timings_s`` (read, prepare, register,
resample, transforms, write; ``import`` is loading torch and itreg's modules once the
command has started; the rest of the process, ``other``, is interpreter start-up, the CLI and
exit). A 'before' code tree (``--before SRC``, e.g. a ``git worktree`` of an older commit,
run with the same virtual environment through ``PYTHONPATH``) runs side by side with this
tree, alternating, so the two see the same machine load; ratios are the figures to compare
on a shared machine. The machine load (``uptime``) is recorded before and after.

Usage::

    python benchmarks/end_to_end.py --work /tmp/e2e --before /tmp/before/src \\
        --spacings 2 1 0.75 --out benchmarks/results/2026-12-08-end-to-end

Phantoms (``itreg phantom --misalign ffd --contrast t2 --spacing S``) are made once under
``--work/phS``. Results go to ``OUT.json`` (written after every case) and ``OUT.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
STAGES = ("import", "read", "prepare", "register", "resample", "transforms", "write")


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], check=False, capture_output=True, text=True).stdout.strip()
    except OSError:
        return "unknown"


def run_child(args: list[str], src: Path, timeout_s: float) -> dict:
    """Run ``python -c 'itreg.cli.main()' ARGS`` with `src` first on the path; wall, CPU, peak
    RSS (MB) and exit code."""
    env = dict(os.environ, PYTHONPATH=str(src))
    code = "import sys; from itreg.cli import main; sys.exit(main())"
    cmd = [sys.executable, "-c", code, *args]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = t0 + timeout_s
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.perf_counter() > deadline:
            proc.kill()
            pid, status, usage = os.wait4(proc.pid, 0)
            return {"timed_out": True, "wall_s": time.perf_counter() - t0,
                    "command": shlex.join(["itreg", *args])}
        time.sleep(0.02)
    wall = time.perf_counter() - t0
    out, err = proc.stdout.read().decode(), proc.stderr.read().decode()
    return {"wall_s": round(wall, 3), "cpu_s": round(usage.ru_utime + usage.ru_stime, 3),
            "peak_mb": round(usage.ru_maxrss / 1024, 1),
            "exit": os.waitstatus_to_exitcode(status),
            "command": shlex.join(["itreg", *args]),
            "stdout": out.strip()[-300:], "stderr": err.strip()[-300:]}


def phantom(work: Path, spacing: float, kind: str = "pair") -> Path:
    folder = work / (f"ph{spacing:g}" if kind == "pair" else f"grp{spacing:g}")
    if not (folder / "phantom.json").exists():
        args = ["phantom", "--misalign", "ffd", "--spacing", str(spacing), "-o", str(folder),
                "-q", "--force"]
        args += ["--contrast", "t2"] if kind == "pair" else ["--kind", "group", "-n", "3"]
        r = run_child(args, SRC, 3600)
        if r.get("exit") != 0:
            raise SystemExit(f"phantom failed: {r}")
    return folder


def with_report(result: dict, out: Path) -> dict:
    """Add the registration's own seconds and the stages of ``report.json``."""
    report_path = out / "report.json"
    if result.get("exit") == 0 and report_path.exists():
        report = json.loads(report_path.read_text())
        result["register_s"] = report.get("wall_time_s")
        result["timings_s"] = report.get("timings_s")
        result["outputs"] = report.get("outputs")
        # The optimiser's own levels (registration = these + checks between them).
        result["levels_s"] = round(sum(lv.get("time_s") or 0.0
                                       for lv in report.get("levels", [])), 3)
        if result["register_s"]:
            result["ratio"] = round(result["wall_s"] / result["register_s"], 2)
        stages = result["timings_s"] or {}
        if stages:
            result["other_s"] = round(result["wall_s"] - sum(stages.values()), 3)
    return result


def startup(trees: dict[str, Path], work: Path, repeats: int) -> dict:
    """Median wall of ``itreg --help`` and of a register on a missing file (exit 2)."""
    out: dict = {}
    cases = {"help": ["--help"],
             "bad_input": ["register", str(work / "missing.nii.gz"), str(work / "missing.nii.gz"),
                           "-o", str(work / "bad-out")]}
    for name, args in cases.items():
        for label, src in trees.items():
            walls = []
            for _ in range(repeats):
                r = run_child(args, src, 120)
                walls.append(r["wall_s"])
            walls.sort()
            out[f"{name}/{label}"] = {"median_wall_s": walls[len(walls) // 2], "walls_s": walls,
                                      "exit": r.get("exit"), "peak_mb": r.get("peak_mb")}
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True, help="phantoms and outputs")
    ap.add_argument("--before", type=Path, default=None, help="src/ of the 'before' tree")
    ap.add_argument("--spacings", type=float, nargs="+", default=[2.0, 1.0, 0.75])
    ap.add_argument("--transforms", nargs="+", default=["affine", "bspline"])
    ap.add_argument("--before-max-voxels", type=float, default=float("inf"),
                    help="run the 'before' tree only up to this many voxels per deformable "
                         "case (its full-resolution inverse takes ~12x the registration)")
    ap.add_argument("--after-args", default="", help="extra register options of the after run")
    ap.add_argument("--variant", action="append", default=[], metavar="NAME=OPTIONS",
                    help="also run this tree with these register options, as tree NAME "
                         "(e.g. 'none=--compress none'); repeatable")
    ap.add_argument("--no-startup", action="store_true", help="skip the start-up timings")
    ap.add_argument("--groupwise", action="store_true", help="add groupwise N=3, 2 mm, ffd")
    ap.add_argument("--groupwise-args", default="", help="extra groupwise options (both trees)")
    ap.add_argument("--net", type=Path, default=None, help="add register --net MODEL (2 mm)")
    ap.add_argument("--startup-repeats", type=int, default=5)
    ap.add_argument("--timeout", type=float, default=3600)
    ap.add_argument("--out", type=Path, required=True, help="result path without extension")
    args = ap.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    trees = {"after": SRC}
    if args.before:
        trees = {"before": args.before.resolve(), "after": SRC}
    record: dict = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                                "python": platform.python_version(),
                                "uptime_start": uptime()},
                    "command": shlex.join([sys.executable, *sys.argv]),
                    "trees": {k: str(v) for k, v in trees.items()}, "cases": []}

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(record, indent=2))

    variants = dict(v.split("=", 1) for v in args.variant)
    record["variants"] = variants
    if not args.no_startup:
        record["startup"] = startup(trees, args.work, args.startup_repeats)
    save()
    runs = [(label, src, args.after_args if label == "after" else "")
            for label, src in trees.items()]
    runs += [(name, SRC, opts) for name, opts in variants.items()]
    for spacing in args.spacings:
        ph = phantom(args.work, spacing)
        for transform in args.transforms:
            import SimpleITK as sitk

            voxels = sitk.ReadImage(str(ph / "fixed.nii.gz")).GetNumberOfPixels()
            for label, src, opts in runs:
                if label == "before" and transform != "affine" and voxels > args.before_max_voxels:
                    continue
                out = args.work / f"out-{label}-{transform}-{spacing:g}"
                extra = shlex.split(opts)
                cmd = ["register", str(ph / "fixed.nii.gz"), str(ph / "moving.nii.gz"),
                       "-t", transform, "-o", str(out), "--force", "-q", *extra]
                r = with_report(run_child(cmd, src, args.timeout), out)
                r.update(case="register", tree=label, transform=transform, spacing_mm=spacing,
                         voxels=voxels, uptime=uptime())
                record["cases"].append(r)
                save()
                print(json.dumps({k: r.get(k) for k in ("tree", "transform", "spacing_mm",
                                                        "wall_s", "register_s", "ratio",
                                                        "peak_mb", "timings_s")}), flush=True)
    if args.groupwise:
        grp = phantom(args.work, 2.0, kind="group")
        images = sorted(str(p) for p in grp.glob("image*.nii.gz")) or sorted(
            str(p) for p in grp.glob("*.nii.gz") if "label" not in p.name
            and "mask" not in p.name and "field" not in p.name)[:3]
        for label, src in trees.items():
            out = args.work / f"out-{label}-groupwise"
            cmd = ["groupwise", *images, "-t", "ffd", "-o", str(out), "--force", "-q",
                   *shlex.split(args.groupwise_args)]
            r = with_report(run_child(cmd, src, args.timeout), out)
            r.update(case="groupwise", tree=label, transform="ffd", spacing_mm=2.0,
                     uptime=uptime())
            record["cases"].append(r)
            save()
    if args.net:
        ph = phantom(args.work, 2.0)
        for label, src in trees.items():
            out = args.work / f"out-{label}-net"
            cmd = ["register", str(ph / "fixed.nii.gz"), str(ph / "moving.nii.gz"), "--net",
                   str(args.net), "-o", str(out), "--force", "-q"]
            r = with_report(run_child(cmd, src, args.timeout), out)
            r.update(case="register --net", tree=label, transform="net", spacing_mm=2.0,
                     uptime=uptime())
            record["cases"].append(r)
            save()
    record["machine"]["uptime_end"] = uptime()
    save()
    args.out.with_suffix(".md").write_text(render(record))


def render_file(path: Path) -> None:
    """Write ``PATH.md`` from ``PATH.json`` (a run stopped before its end writes no table)."""
    record = json.loads(path.with_suffix(".json").read_text())
    path.with_suffix(".md").write_text(render(record))


def _fmt(v, nd=2):
    return "" if v is None else f"{v:.{nd}f}"


def render(record: dict) -> str:
    lines = [f"# End-to-end: process vs registration ({time.strftime('%Y-%m-%d')})", "",
             f"Command: `{record['command']}`", "",
             (f"Machine: {record['machine']['platform']}, {record['machine']['cpus']} CPUs, "
             f"Python {record['machine']['python']}; shared with other benchmarks."), "",
             (f"Load at start: `{record['machine']['uptime_start']}`; at end: "
             f"`{record['machine'].get('uptime_end', '')}`."), "",
             "## Start-up (median wall of repeated runs, s)", "",
             "| case | tree | median wall s | exit |", "|---|---|---|---|"]
    for key, v in record.get("startup", {}).items():
        case, tree = key.split("/")
        lines.append(f"| {case} | {tree} | {v['median_wall_s']:.3f} | {v['exit']} |")
    variants = record.get("variants") or {}
    lines += ["", "## Per case", ""]
    if variants:
        lines += ["Trees besides before/after: " + "; ".join(
            f"{name} = this tree with `{opts}`" for name, opts in variants.items()) + ".", ""]
    lines += [
              ("Stages are report.json's `timings_s`; `outside` = process wall - registration "
              "(everything the command does besides registering); `other` = process wall - the "
              "stages' sum (interpreter start-up, CLI, exit)."), "",
              ("| case | spacing mm (voxels) | tree | process s | registration s | process / "
              "registration | outside s | CPU s | peak MB | import | read | prepare | register | "
              "resample | transforms | write | other |"),
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in record["cases"]:
        st = c.get("timings_s") or {}
        name = c["case"] + ("" if c["case"] != "register" else f" {c['transform']}")
        vox = f"{c['spacing_mm']:g} ({c['voxels'] / 1e6:.1f} M)" if c.get("voxels") else \
            f"{c['spacing_mm']:g}"
        if c.get("timed_out"):
            lines.append(f"| {name} | {vox} | {c['tree']} | > {c['wall_s']:.0f} (timed out) |"
                         + " |" * 13)
            continue
        outside = (c["wall_s"] - c["register_s"]) if c.get("register_s") else None
        lines.append(
            f"| {name} | {vox} | {c['tree']} | {_fmt(c.get('wall_s'))} | "
            f"{_fmt(c.get('register_s'))} | {_fmt(c.get('ratio'))} | {_fmt(outside)} | "
            f"{_fmt(c.get('cpu_s'))} | "
            f"{_fmt(c.get('peak_mb'), 0)} | "
            + " | ".join(_fmt(st.get(s)) for s in STAGES) + f" | {_fmt(c.get('other_s'))} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

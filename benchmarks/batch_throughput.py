"""Throughput of `itreg batch` against sequential `itreg register` processes and an ANTsPy pool.

N brain phantom pairs at 2 mm (MNI T1 fixed, T2-like moving under a known random affine, or a
random cubic B-spline FFD for the bspline kind) are written once; then, for each kind, the same
N pairs are registered by

* `itreg batch` with 1 worker process (2 torch threads a job) and with 2 worker processes
  (1 thread a job), through the installed command (embedded Dask LocalCluster);
* N sequential `itreg register` processes (2 threads each: what a shell loop does);
* ANTsPy (`Affine`, or `SyNOnly` for bspline) in a 2-process pool, one ITK thread a process,
  in its own venv (`make bench` builds `.venv-ants`).

Every configuration runs as one process tree in its own session; a sampler reads the tree
every 0.2 s (psutil): peak RSS of the largest process (a worker), and CPU seconds summed over
every process. Reported: wall time, pairs per hour, CPU seconds per pair, peak MB per process,
and ratios measured side by side in this one run. The machine's load is recorded before and
after each configuration (shared machine: compare ratios, not absolute times).

    python benchmarks/batch_throughput.py --pairs 16 --kinds affine,bspline \
        --out benchmarks/results/2026-12-08-batch-throughput-2
    python benchmarks/batch_throughput.py --pairs 6 --spacing 1 --kinds bspline \
        --out benchmarks/results/2026-12-08-batch-throughput-2-1mm
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]

ANTS_CODE = r"""
import os, sys, time
os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = "1"
from multiprocessing import Pool

def one(args):
    case, method, seed = args
    import ants
    fixed = ants.image_read(os.path.join(case, "fixed.nii.gz"))
    moving = ants.image_read(os.path.join(case, "moving.nii.gz"))
    t = time.perf_counter()
    reg = ants.registration(fixed, moving, type_of_transform=method, random_seed=seed)
    out = os.path.join(case, "ants-" + method)
    os.makedirs(out, exist_ok=True)
    ants.image_write(reg["warpedmovout"], os.path.join(out, "warped.nii.gz"))
    return time.perf_counter() - t

if __name__ == "__main__":
    method, procs, cases = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    with Pool(procs) as pool:
        times = pool.map(one, [(c, method, i + 1) for i, c in enumerate(cases)], chunksize=1)
    print(sum(times) / len(times))
"""


class TreeSampler:
    """Samples a process tree: peak RSS per process and CPU seconds per process."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        self.root = psutil.Process(pid)
        self.interval = interval
        self.rss: dict[int, int] = {}
        self.cpu: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                procs = []
            for p in procs:
                try:
                    with p.oneshot():
                        rss = p.memory_info().rss
                        t = p.cpu_times()
                except psutil.Error:
                    continue
                self.rss[p.pid] = max(self.rss.get(p.pid, 0), rss)
                self.cpu[p.pid] = max(self.cpu.get(p.pid, 0.0), t.user + t.system)
            self._stop.wait(self.interval)

    def stop(self) -> dict:
        self._stop.set()
        self._thread.join()
        return {"peak_mb": max(self.rss.values(), default=0) / 2**20,
                "cpu_s": sum(self.cpu.values()), "processes": len(self.rss),
                "root_cpu_s": self.cpu.get(self.root.pid, 0.0)}


def run_tree(cmds: list[list[str]], env: dict | None = None, timeout: float = 7200) -> dict:
    """Run commands one after another, each sampled as a tree; wall time over all."""
    start = time.perf_counter()
    deadline = start + timeout
    peak, cpu, procs, root_cpu = 0.0, 0.0, 0, 0.0
    load_before = os.getloadavg()[0]
    for cmd in cmds:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                start_new_session=True, env=env)
        sampler = TreeSampler(proc.pid)
        try:
            out, err = proc.communicate(timeout=max(1.0, deadline - time.perf_counter()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            sampler.stop()
            raise
        stats = sampler.stop()
        if proc.returncode != 0:
            raise RuntimeError(f"{cmd[:3]} exited {proc.returncode}: {err[-2000:]}")
        peak, cpu, procs = max(peak, stats["peak_mb"]), cpu + stats["cpu_s"], \
            procs + stats["processes"]
        root_cpu += stats["root_cpu_s"]
    # root_cpu_s: the commands' own processes (for itreg batch: client, scheduler and nannies;
    # the rest of cpu_s is its worker processes).
    return {"wall_s": time.perf_counter() - start, "peak_mb": peak, "cpu_s": cpu,
            "root_cpu_s": root_cpu, "processes": procs, "load_before": load_before,
            "load_after": os.getloadavg()[0], "uptime_after": uptime(),
            "stdout_tail": out[-300:]}


def run_config(cmds: list[list[str]], timeout: float) -> dict:
    try:
        return run_tree(cmds, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"timed_out": True, "timeout_s": timeout, "load_after": os.getloadavg()[0]}


def save(stem: Path | None, results: dict) -> None:
    """Write the results so far (a long run keeps what it measured if it is stopped)."""
    if stem is not None:
        stem.parent.mkdir(parents=True, exist_ok=True)
        stem.with_suffix(".json").write_text(json.dumps(results, indent=2))


def make_pairs(workdir: Path, n: int, spacing: float, kind: str) -> list[Path]:
    from itreg import io
    from itreg.phantoms import brain_pair

    cases = []
    for i in range(n):
        case = case_root(workdir, kind, spacing) / f"case{i:02d}"
        if not (case / "moving.nii.gz").exists():
            pair = brain_pair(spacing_mm=spacing, contrast="t2",
                              kind="ffd" if kind == "bspline" else "affine", seed=i)
            case.mkdir(parents=True, exist_ok=True)
            io.write_image(pair.fixed, case / "fixed.nii.gz")
            io.write_image(pair.moving, case / "moving.nii.gz")
        cases.append(case)
    return cases


def case_root(workdir: Path, kind: str, spacing: float) -> Path:
    """Folder of a kind's pairs (the 2 mm pairs keep the folder of the first runs)."""
    return workdir / (kind if spacing == 2.0 else f"{kind}-{spacing:g}mm")


def probe_job(case: str, threads: int) -> dict:
    """Run one bspline pair as a batch job here (the process and thread that call it) and
    return its CPU seconds, system seconds and minor page faults (getrusage of this process)."""
    import resource
    import shutil
    import tempfile

    from itreg.batch.jobs import JobOptions, run_job
    from itreg.batch.manifest import jobs_from_rows

    job = jobs_from_rows([{"id": Path(case).name, "fixed": f"{case}/fixed.nii.gz",
                           "moving": f"{case}/moving.nii.gz", "transform": "bspline",
                           "metric": "mi"}])[0]
    out = tempfile.mkdtemp(prefix="itreg-probe-")
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    record = run_job(job, out, JobOptions(force=True, threads=threads, device="cpu"))
    r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    shutil.rmtree(out)
    if record["status"] != "done":
        raise RuntimeError(record["error"])
    return {"case": job.id, "wall_s": t1 - t0, "registration_s": record["registration_s"],
            "cpu_s": r1.ru_utime - r0.ru_utime + r1.ru_stime - r0.ru_stime,
            "sys_s": r1.ru_stime - r0.ru_stime, "minor_faults": r1.ru_minflt - r0.ru_minflt,
            "malloc_trim_threshold": os.environ.get("MALLOC_TRIM_THRESHOLD_"),
            "torch_threads": record["torch_threads"]}


def probe(cases: list[Path], threads: int) -> dict:
    """One bspline job at a time, the same cases in each setting: in this process; in the one
    worker of a LocalCluster with Dask's default worker environment; in the one worker of
    itreg batch's embedded LocalCluster (itreg.batch.cluster.worker_environ)."""
    import logging

    from distributed import Client, LocalCluster

    from itreg.batch.cluster import ClusterSpec, open_client

    cases = [str(c) for c in cases]
    rows: dict[str, list] = {"plain process": [probe_job(c, threads) for c in cases]}
    with LocalCluster(n_workers=1, threads_per_worker=1, dashboard_address=":0",
                      silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
        rows["Dask default worker"] = [client.submit(probe_job, c, threads, pure=False).result()
                                       for c in cases]
    with open_client(ClusterSpec(workers=1), job_threads=threads) as client:
        rows["itreg batch worker"] = [client.submit(probe_job, c, threads, pure=False).result()
                                      for c in cases]
    return rows


def render_probe(result: dict) -> str:
    title = (f"## One bspline job: plain process vs Dask worker ({result['threads']} torch "
             "threads)")
    load = f"Load before: `{result['uptime_start']}`; after: `{result['uptime_end']}`"
    header = ("| setting | MALLOC_TRIM_THRESHOLD_ | case | wall s | CPU s | of it system s | "
              "minor page faults |")
    lines = ["", title, "", load, "", header, "|---|---|---|---|---|---|---|"]
    for name, rows in result["rows"].items():
        for r in rows:
            lines.append(f"| {name} | {r['malloc_trim_threshold'] or 'unset'} | {r['case']} | "
                         f"{r['wall_s']:.1f} | {r['cpu_s']:.2f} | {r['sys_s']:.2f} | "
                         f"{r['minor_faults']} |")
    for name, rows in result["rows"].items():
        mean = sum(r["cpu_s"] for r in rows) / len(rows)
        lines.append(f"\nMean CPU s per job, {name}: {mean:.2f}")
    return "\n".join(lines) + "\n"


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()


def itreg_exe() -> str:
    exe = Path(sys.executable).with_name("itreg")
    return str(exe) if exe.exists() else "itreg"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=16)
    p.add_argument("--pairs-bspline", type=int, default=None,
                   help="Pairs of the bspline kind (default: --pairs).")
    p.add_argument("--timeout", type=float, default=3600,
                   help="Seconds a configuration may run before it is recorded as timed out.")
    p.add_argument("--spacing", type=float, default=2.0)
    p.add_argument("--kinds", default="affine,bspline")
    p.add_argument("--configs", default="batch-1,batch-2,sequential,ants")
    p.add_argument("--workdir", type=Path, default=ROOT / "bench-out" / "batch")
    p.add_argument("--ants-python", default=str(ROOT / ".venv-ants" / "bin" / "python"))
    p.add_argument("--out", type=Path, default=None,
                   help="Result path stem: writes STEM.json and STEM.md.")
    p.add_argument("--probe", type=int, default=0, metavar="N",
                   help="Only run N bspline pairs one job at a time in a plain process, in a "
                        "Dask worker with Dask's default environment and in an itreg batch "
                        "worker; write STEM-probe.json/.md (--out).")
    p.add_argument("--render", type=Path, default=None,
                   help="Only write STEM.md (--out) from a results JSON of an earlier run.")
    args = p.parse_args()
    if args.probe:
        args.workdir = args.workdir.resolve()
        cases = make_pairs(args.workdir, args.probe, args.spacing, "bspline")
        start = uptime()
        result = {"threads": 2, "spacing_mm": args.spacing, "uptime_start": start,
                  "rows": probe(cases, 2)}
        result["uptime_end"] = uptime()
        text = render_probe(result)
        print(text)
        if args.out:
            stem = args.out.with_name(args.out.name + "-probe")
            stem.with_suffix(".json").write_text(json.dumps(result, indent=2))
            stem.with_suffix(".md").write_text(text)
        return
    if args.render:
        results = json.loads(args.render.read_text())
        text = render(results)
        print(text)
        if args.out:
            args.out.with_suffix(".md").write_text(text)
        return
    args.workdir = args.workdir.resolve()  # manifests hold absolute paths
    args.workdir.mkdir(parents=True, exist_ok=True)
    results: dict = {"pairs": args.pairs, "spacing_mm": args.spacing, "cpus": os.cpu_count(),
                     "uptime_start": uptime(),
                     "started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
                     "kinds": {}}
    exe = itreg_exe()
    for kind in args.kinds.split(","):
        n = args.pairs_bspline if kind == "bspline" and args.pairs_bspline else args.pairs
        cases = make_pairs(args.workdir, n, args.spacing, kind)
        transform = "affine" if kind == "affine" else "bspline"
        manifest = case_root(args.workdir, kind, args.spacing) / "jobs.csv"
        with open(manifest, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["id", "fixed", "moving"])
            for c in cases:
                w.writerow([c.name, c / "fixed.nii.gz", c / "moving.nii.gz"])
        rows = {}
        results["kinds"][kind] = rows
        for config in args.configs.split(","):
            out = case_root(args.workdir, kind, args.spacing) / f"out-{config}"
            print(f"[{time.strftime('%H:%M:%S')}] {kind} {config} ...", flush=True)
            if config.startswith("batch-"):
                workers = int(config.split("-")[1])
                cmd = [exe, "batch", str(manifest), "-o", str(out), "--force", "-q",
                       "-t", transform, "-m", "mi", "--workers", str(workers),
                       "--threads", str(max(1, 2 // workers)), "--device", "cpu"]
                stats = run_config([cmd], args.timeout)
            elif config == "sequential":
                cmds = [[exe, "register", str(c / "fixed.nii.gz"), str(c / "moving.nii.gz"),
                         "-o", str(out / c.name), "-t", transform, "-m", "mi", "--threads",
                         "2", "--quiet", "--force", "--device", "cpu"] for c in cases]
                stats = run_config(cmds, args.timeout)
            elif config == "ants":
                if not Path(args.ants_python).exists():
                    print("  ANTsPy venv missing; skipped", flush=True)
                    continue
                method = "Affine" if kind == "affine" else "SyNOnly"
                cmd = [args.ants_python, "-c", ANTS_CODE, method, "2", *map(str, cases)]
                stats = run_config([cmd], args.timeout)
                stats["method"] = method
            else:
                raise SystemExit(f"unknown config {config}")
            stats["pairs"] = n
            if stats.get("timed_out"):
                rows[config] = stats
                print(f"  timed out after {args.timeout:.0f} s", flush=True)
                save(args.out, results)
                continue
            stats["pairs_per_hour"] = n / stats["wall_s"] * 3600
            stats["cpu_s_per_pair"] = stats["cpu_s"] / n
            rows[config] = stats
            save(args.out, results)
            print(f"  wall {stats['wall_s']:.1f} s, {stats['pairs_per_hour']:.0f} pairs/h, "
                  f"{stats['cpu_s_per_pair']:.1f} CPU s/pair, peak {stats['peak_mb']:.0f} MB, "
                  f"load {stats['load_before']:.1f} -> {stats['load_after']:.1f}", flush=True)
    results["uptime_end"] = uptime()
    text = render(results)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_suffix(".json").write_text(json.dumps(results, indent=2))
        args.out.with_suffix(".md").write_text(text)


def render(results: dict) -> str:
    lines = [f"# itreg batch throughput (brain phantom pairs at {results['spacing_mm']} mm)",
             "", f"Started {results['started']}; {results['cpus']} CPUs.",
             f"Load at start: `{results['uptime_start']}`",
             f"Load at end: `{results.get('uptime_end', '')}`", ""]
    for kind, rows in results["kinds"].items():
        n = next(iter(rows.values()), {}).get("pairs", results["pairs"])
        lines += [f"## {kind} ({n} pairs)", "",
                  ("| configuration | wall s | pairs/hour | CPU s/pair | of it in the batch "
                   "process | peak MB (largest process) | ratio to sequential | "
                   "load before/after |"),
                  "|---|---|---|---|---|---|---|---|"]
        seq = rows.get("sequential", {}).get("pairs_per_hour")
        for config, s in rows.items():
            if s.get("timed_out"):
                lines.append(f"| {config} | timed out after {s['timeout_s']:.0f} s | | | | | | |")
                continue
            ratio = f"{s['pairs_per_hour'] / seq:.2f}" if seq else "-"
            name = {"batch-1": "itreg batch, 1 worker x 2 threads",
                    "batch-2": "itreg batch, 2 workers x 1 thread",
                    "sequential": "sequential itreg register (2 threads)",
                    "ants": f"ANTsPy {s.get('method', '')}, 2-process pool"}.get(config, config)
            # The client, scheduler and nannies of `itreg batch` (one process); the rest is
            # the workers'.
            root = (f"{s['root_cpu_s'] / s['pairs']:.2f}"
                    if config.startswith("batch") and "root_cpu_s" in s else "-")
            lines.append(f"| {name} | {s['wall_s']:.1f} | {s['pairs_per_hour']:.0f} | "
                         f"{s['cpu_s_per_pair']:.1f} | {root} | {s['peak_mb']:.0f} | {ratio} | "
                         f"{s['load_before']:.1f} / {s['load_after']:.1f} |")
        if "ants" in rows and not rows["ants"].get("timed_out"):
            best = max((rows[c]["pairs_per_hour"] for c in rows if c.startswith("batch")),
                       default=None)
            if best:
                lines.append("")
                lines.append(f"Best itreg batch / ANTsPy pairs per hour: "
                             f"{best / rows['ants']['pairs_per_hour']:.2f}")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()

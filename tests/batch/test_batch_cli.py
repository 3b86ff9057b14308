"""``itreg batch`` end to end on an embedded LocalCluster of 2 worker processes: a bad job does
not stop the others (exit 3), a rerun does no work, --retry-failed redoes the failed one; bad
manifests are refused (exit 2)."""

from __future__ import annotations

import csv
import json
import re

import numpy as np
import pytest
import SimpleITK as sitk
from batch_data import blob, write_manifest

FAST = ["-t", "translation", "--set", "stages.0.iterations=15", "--threads", "1",
        "--device", "cpu"]


def _snapshot(root):
    """{relative path: (mtime_ns, size)} of every file under root."""
    return {str(p.relative_to(root)): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in root.rglob("*") if p.is_file()}


def _ledger_jobs(out):
    lines = (out / "ledger.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if json.loads(line)["event"] == "job"]


def test_batch_isolates_a_bad_job_skips_finished_ones_and_retries_failed(pairs, tmp_path, cli):
    data, rows = pairs
    rows = [*rows, {"id": "missing", "fixed": "f0.nii.gz", "moving": "absent.nii.gz"}]
    manifest = write_manifest(data / "jobs.csv", rows)
    out = tmp_path / "out"

    code, stdout, err = cli(["batch", str(manifest), "-o", str(out), "--workers", "2", *FAST])
    assert code == 3, err
    assert "4 of 5 jobs done" in stdout
    assert "failed missing: image" in stdout and "absent.nii.gz" in stdout
    with open(out / "summary.csv") as f:
        summary = {r["id"]: r for r in csv.DictReader(f)}
    assert [summary[f"s{i}"]["status"] for i in range(4)] == ["done"] * 4
    assert summary["missing"]["status"] == "failed"
    assert "absent.nii.gz" in summary["missing"]["error"]
    assert not (out / "missing").exists()  # a failed job leaves nothing behind
    pids = {summary[f"s{i}"]["pid"] for i in range(4)}
    assert len(pids) == 2  # two worker processes shared the jobs
    for i in range(4):
        report = json.loads((out / f"s{i}" / "report.json").read_text())
        assert report["inputs"]["moving"] == str(data / f"m{i}.nii.gz")
        np.testing.assert_allclose(report["linear"]["offset"], [2.0, -1.0], atol=0.5)
    html = (out / "summary.html").read_text()
    assert html.count("<tr class=") == 5 and html.count("data:image/png;base64,") == 4

    # A rerun does no work: no job runs, no output file changes, exit 3 for the old failure.
    before = _snapshot(out)
    jobs_before = len(_ledger_jobs(out))
    code, stdout, err = cli(["batch", str(manifest), "-o", str(out), *FAST])
    assert code == 3
    assert "0 this run" in stdout and "--retry-failed" in stdout
    after = _snapshot(out)
    jobs = {f"s{i}" for i in range(4)}
    for name, stamp in before.items():
        if name.split("/")[0] in jobs:
            assert after[name] == stamp, name
    assert len(_ledger_jobs(out)) == jobs_before

    # The missing image appears; --retry-failed runs that job only.
    sitk.WriteImage(blob(shift=(2.0, -1.0), remap=True, seed=7), str(data / "absent.nii.gz"))
    code, stdout, err = cli(["batch", str(manifest), "-o", str(out), "--retry-failed",
                             "--workers", "1", *FAST])
    assert code == 0, err
    assert "5 of 5 jobs done (1 this run, 4 earlier)" in stdout
    assert [e["id"] for e in _ledger_jobs(out)][jobs_before:] == ["missing"]
    after = _snapshot(out)
    for name, stamp in before.items():
        if name.split("/")[0] in jobs:
            assert after[name] == stamp, name


@pytest.mark.parametrize("content, message", [
    ("id,fixed\ns0,f0.nii.gz\n", "has no moving image"),
    ("id,fixed,moving\ns0,f0.nii.gz,m0.nii.gz\ns0,f1.nii.gz,m1.nii.gz\n", "the id 's0' twice"),
    ("id,fixd,moving\ns0,f0.nii.gz,m0.nii.gz\n", "unknown column(s) 'fixd'"),
    ("fixed,moving\nf0.nii.gz,m0.nii.gz\n", "no 'id' column"),
    ("id,fixed,moving\n../up,f0.nii.gz,m0.nii.gz\n", "cannot name a folder"),
    ("id,fixed,moving,transform\ns0,f0.nii.gz,m0.nii.gz,wobble\n", "wobble"),
    ("id,fixed,moving,set.metric.binz\ns0,f0.nii.gz,m0.nii.gz,3\n", "line 2"),
    ("id,kind,images\ng0,group,a.nii.gz\n", "at least two images"),
    ("", "is empty"),
    ("id,fixed,moving\n", "has no jobs"),
])
def test_bad_manifests_are_refused_before_anything_runs(tmp_path, cli, content, message):
    manifest = tmp_path / "jobs.csv"
    manifest.write_text(content)
    out = tmp_path / "out"
    code, _, err = cli(["batch", str(manifest), "-o", str(out)])
    assert code == 2
    assert err.startswith("itreg: error: ") and err.count("\n") == 1, err
    assert message in err
    assert not out.exists()


def test_unreadable_manifests_exit_2(tmp_path, cli):
    code, _, err = cli(["batch", str(tmp_path / "nope.csv"), "-o", str(tmp_path / "o")])
    assert code == 2 and "does not exist" in err
    code, _, err = cli(["batch", str(tmp_path), "-o", str(tmp_path / "o")])
    assert code == 2 and "is a folder" in err
    (tmp_path / "bin.csv").write_bytes(b"\xff\xfe\x00id,\x81\x82")
    code, _, err = cli(["batch", str(tmp_path / "bin.csv"), "-o", str(tmp_path / "o")])
    assert code == 2 and "cannot be read" in err


@pytest.mark.slow
def test_ctrl_c_exits_130_and_keeps_finished_jobs(pairs, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    data, rows = pairs
    slow = {"transform": "translation", "set.stages.0.iterations": "300"}
    rows = [rows[0], *({**r, **slow} for r in rows[1:])]
    manifest = write_manifest(data / "jobs.csv", rows)
    out = tmp_path / "out"
    exe = [sys.executable, "-m", "itreg.cli", "batch", str(manifest), "-o", str(out), "--workers",
           "1", "--threads", "1", "--device", "cpu", "-t", "translation", "--set",
           "stages.0.iterations=15"]
    proc = subprocess.Popen(exe, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # wait for the first (fast) job to be in the ledger
        ledger = out / "ledger.jsonl"
        if ledger.exists() and '"status": "done"' in ledger.read_text():
            break
        time.sleep(0.1)
    else:
        proc.kill()
        pytest.fail(f"no job finished within 120 s: {proc.communicate()[1]}")
    os.kill(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "interrupted" in stderr and "run the same command again" in stderr
    with open(out / "summary.csv") as f:
        status = {r["id"]: r["status"] for r in csv.DictReader(f)}
    assert status["s0"] == "done" and "interrupted" in status.values()
    done_before = [k for k, v in status.items() if v == "done"]
    # The rerun finishes the rest and redoes none of the finished jobs.
    rerun = subprocess.run(exe, capture_output=True, text=True, timeout=300, check=False)
    assert rerun.returncode == 0, rerun.stderr
    # A job running at Ctrl-C may still have moved its complete outputs into place: then the
    # rerun counts it as finished earlier too.
    now, earlier = map(int, re.search(r"\((\d+) this run, (\d+) earlier\)",
                                      rerun.stdout).groups())
    assert "4 of 4 jobs done" in rerun.stdout
    assert now + earlier == 4 and earlier >= len(done_before)

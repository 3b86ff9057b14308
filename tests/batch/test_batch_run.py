"""``itreg.batch.run`` on a real 2-process Dask LocalCluster shared by this module: group and
label jobs, a worker killed mid-job, and the CLI submitting to that cluster by address."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import numpy as np
import SimpleITK as sitk
from batch_data import blob, write_manifest

from itreg.batch import run

FAST = {"transform": "translation", "set.stages.0.iterations": "15"}
CLI_FAST = ["-t", "translation", "--set", "stages.0.iterations=15", "--threads", "1",
            "--device", "cpu"]


def _executing(dask_worker):
    """Keys of the tasks a worker is executing right now (run on the worker)."""
    return [str(ts.key) for ts in dask_worker.state.executing]


def test_a_killed_worker_loses_no_job(dask_client, pairs, tmp_path):
    data, rows = pairs
    slow = {"transform": "translation", "set.stages.0.iterations": "250"}
    manifest = write_manifest(data / "jobs.csv",
                              [{**r, **(slow if i < 2 else FAST)} for i, r in enumerate(rows)])
    out = tmp_path / "out"
    outcome = {}

    def target():
        outcome["result"] = run(manifest, client=dask_client, output=out, threads=1,
                                device="cpu", progress=False)

    thread = threading.Thread(target=target)
    thread.start()
    victim, key = None, None
    deadline = time.monotonic() + 120
    while victim is None and time.monotonic() < deadline:
        for address, keys in dask_client.run(_executing).items():
            slow_keys = [k for k in keys if k.split("-")[2] in ("s0", "s1")]
            if slow_keys:
                victim, key = address, slow_keys[0]
                break
        time.sleep(0.05)
    assert victim is not None, "no job started within 120 s"
    time.sleep(0.3)  # well inside the job (250 iterations per level take seconds)
    assert key in dask_client.run(_executing, workers=[victim])[victim], "job ended too soon"
    pid = dask_client.run(os.getpid, workers=[victim])[victim]
    os.kill(pid, signal.SIGKILL)
    thread.join(300)
    assert not thread.is_alive()
    result = outcome["result"]
    assert result.exit_code == 0, [r.get("error") for r in result.failed]
    killed_job = key.split("-")[2]
    record = next(r for r in result.records if r["id"] == killed_job)
    assert record["status"] == "done" and record["pid"] != pid  # rerun by another process
    assert json.loads((out / killed_job / "report.json").read_text())["inputs"]["fixed"]
    entries = {p.name for p in out.iterdir() if not p.name.startswith(".")}
    assert entries == {"s0", "s1", "s2", "s3", "ledger.jsonl", "summary.csv", "summary.html"}
    ledger = [json.loads(line) for line in (out / "ledger.jsonl").read_text().splitlines()]
    assert [e["id"] for e in ledger if e["event"] == "job"].count(killed_job) == 1


def test_group_jobs_and_label_maps(dask_client, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for j, shift in enumerate([(0.0, 0.0), (2.0, -1.0), (-1.0, 2.0)]):
        sitk.WriteImage(blob(shift=shift, seed=j), str(data / f"g{j}.nii.gz"))
    sitk.WriteImage(blob(seed=9), str(data / "f.nii.gz"))
    sitk.WriteImage(blob(shift=(3.0, 0.0), remap=True, seed=10), str(data / "m.nii.gz"))
    labels = np.zeros((32, 32), np.uint8)
    labels[10:20, 13:23] = 1  # a box around the moving blob, 3 mm right of the fixed one
    sitk.WriteImage(sitk.GetImageFromArray(labels), str(data / "m_labels.nii.gz"))
    rows = [{"id": "grp", "kind": "group", "images": "g0.nii.gz;g1.nii.gz;g2.nii.gz",
             "transform": "translation", "set.iterations": "10"},
            {"id": "lab", "fixed": "f.nii.gz", "moving": "m.nii.gz",
             "moving_labels": "m_labels.nii.gz", **FAST}]
    manifest = write_manifest(data / "jobs.csv", rows)
    result = run(manifest, client=dask_client, output=tmp_path / "out", threads=1,
                 device="cpu", progress=False)
    assert result.exit_code == 0, result.failed
    grp = tmp_path / "out" / "grp"
    assert {"0", "1", "2", "template.nii.gz", "report.json"} <= {p.name for p in grp.iterdir()}
    report = json.loads((grp / "report.json").read_text())
    assert report["kind"] == "groupwise" and report["settings"]["transform"] == "translation"
    assert report["inputs"] == [str(data / f"g{j}.nii.gz") for j in range(3)]
    warped = sitk.ReadImage(str(tmp_path / "out" / "lab" / "warped_labels.nii.gz"))
    assert warped.GetPixelID() == sitk.sitkUInt8
    arr = sitk.GetArrayFromImage(warped)
    assert set(np.unique(arr)) == {0, 1}
    cols = np.nonzero(arr.any(axis=0))[0]
    assert abs(cols.mean() - 17.5 + 3.0) < 1.0  # moved back 3 mm onto the fixed blob
    # The rerun skips both: their reports match their rows.
    again = run(manifest, client=dask_client, output=tmp_path / "out", progress=False)
    assert [r["ran"] for r in again.records] == ["earlier", "earlier"]


def test_changed_settings_or_inputs_rerun_only_with_force(dask_client, pairs, tmp_path):
    data, rows = pairs
    manifest = write_manifest(data / "jobs.csv", [{**rows[0], **FAST}])
    out = tmp_path / "out"
    assert run(manifest, client=dask_client, output=out, progress=False).exit_code == 0
    # Other settings for the same id: the old folder does not match; refused without --force.
    changed = write_manifest(data / "jobs2.csv",
                             [{**rows[0], **FAST, "set.stages.0.iterations": "16"}])
    result = run(changed, client=dask_client, output=out, progress=False)
    assert result.exit_code == 3 and "use --force" in result.failed[0]["error"]
    result = run(changed, client=dask_client, output=out, force=True, progress=False)
    assert result.exit_code == 0
    report = json.loads((out / "s0" / "report.json").read_text())
    assert report["config"]["stages"][0]["iterations"] == [16, 16, 16]
    # A newer input file makes the finished job stale again.
    time.sleep(0.01)
    os.utime(data / "m0.nii.gz")
    assert run(changed, client=dask_client, output=out, progress=False).exit_code == 3


def test_outputs_equal_those_of_register_through_the_scheduler_option(dask_client, pairs,
                                                                    tmp_path, cli):
    data, rows = pairs
    manifest = write_manifest(data / "one.csv", rows[:1])
    code, _, err = cli(["batch", str(manifest), "-o", str(tmp_path / "b"), "--scheduler",
                        dask_client.scheduler.address, "-q", *CLI_FAST])
    assert code == 0, err
    # This cluster's workers have Dask's default environment: the batch says what it costs.
    assert "MALLOC_TRIM_THRESHOLD_=65536" in err and "DASK_DISTRIBUTED__NANNY__" in err
    code, _, err = cli(["register", str(data / "f0.nii.gz"), str(data / "m0.nii.gz"), "-o",
                        str(tmp_path / "r"), "-q", *CLI_FAST])
    assert code == 0, err
    batch_dir, reg_dir = tmp_path / "b" / "s0", tmp_path / "r"
    assert sorted(p.name for p in batch_dir.iterdir()) == sorted(p.name for p in reg_dir.iterdir())
    rb = json.loads((batch_dir / "report.json").read_text())
    rr = json.loads((reg_dir / "report.json").read_text())
    assert rb["linear"] == rr["linear"]  # bitwise equal parameters on CPU, same seed
    assert rb["config"] == rr["config"] and rb["final_metric"] == rr["final_metric"]
    wb = sitk.GetArrayFromImage(sitk.ReadImage(str(batch_dir / "warped.nii.gz")))
    wr = sitk.GetArrayFromImage(sitk.ReadImage(str(reg_dir / "warped.nii.gz")))
    np.testing.assert_array_equal(wb, wr)

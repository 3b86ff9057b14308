"""The manifest reader (no cluster): paths, defaults and set.KEY columns, group rows, job
identity; and the options that cannot work, refused before any output exists."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from batch_data import write_manifest

from itreg.batch import ClusterSpec, Defaults, read_manifest, run
from itreg.batch.cluster import (
    WORKER_ENVIRON_EXPORT,
    check_spec,
    default_workers,
    jobqueue_cluster,
    machine_cpus,
)
from itreg.batch.manifest import jobs_from_rows
from itreg.errors import ConfigError


def test_paths_defaults_and_set_columns(tmp_path):
    (tmp_path / "cfg").mkdir()
    manifest = tmp_path / "cfg" / "jobs.csv"
    manifest.write_text(
        "\ufeffid, fixed ,moving,transform,set.metric.bins,seed\n"
        "a,f.nii.gz,/abs/m.nii.gz,,64,\n"
        "\n"
        "#skipped,x,y,,,\n"
        "b,sub/f.nii.gz,~/m.nii.gz,rigid,,7\n", encoding="utf-8")
    jobs = read_manifest(manifest, Defaults(transform="translation", metric="nmi", seed=3,
                                            sets={"metric.bins": 16, "stages.0.iterations": 5}))
    a, b = jobs
    assert [j.id for j in jobs] == ["a", "b"] and (a.line, b.line) == (2, 5)
    assert a.fixed == str(tmp_path / "cfg" / "f.nii.gz") and a.moving == "/abs/m.nii.gz"
    assert b.fixed == str(tmp_path / "cfg" / "sub" / "f.nii.gz")
    assert b.moving == str(Path.home() / "m.nii.gz")
    assert (a.transform, b.transform, a.metric) == ("translation", "rigid", "nmi")
    assert a.overrides == {"metric.bins": 64, "stages.0.iterations": 5}  # the cell wins
    assert b.overrides == {"metric.bins": 16, "stages.0.iterations": 5}
    assert (a.seed, b.seed) == (3, 7)


def test_group_rows_and_job_identity(tmp_path):
    rows = [{"id": "g", "kind": "group", "images": "a.nii.gz; b.nii.gz;c.nii.gz",
             "set.iterations": "20"},
            {"id": "p", "fixed": "f.nii.gz", "moving": "m.nii.gz"}]
    g, p = jobs_from_rows(rows, base=tmp_path)
    assert g.images == tuple(str(tmp_path / n) for n in ("a.nii.gz", "b.nii.gz", "c.nii.gz"))
    assert (g.transform, g.metric, g.overrides) == ("rigid", "xmetric", {"iterations": 20})
    assert p.transform is None and p.init == "centers"
    # The fingerprint follows the settings, not the manifest line.
    same = jobs_from_rows([{"id": "p", "fixed": "f.nii.gz", "moving": "m.nii.gz"}],
                          base=tmp_path)[0]
    other = jobs_from_rows([{"id": "p", "fixed": "f.nii.gz", "moving": "m.nii.gz",
                             "seed": "1"}], base=tmp_path)[0]
    assert same.fingerprint() == p.fingerprint() != other.fingerprint()
    with pytest.raises(ConfigError, match="set.iterations"):
        jobs_from_rows([{"id": "g", "kind": "group", "images": "a;b", "set.metric.bins": "8"}])
    with pytest.raises(ConfigError, match="cannot have fixed"):
        jobs_from_rows([{"id": "g", "kind": "group", "images": "a;b", "fixed": "f"}])
    with pytest.raises(ConfigError, match="kind 'trio'"):
        jobs_from_rows([{"id": "g", "kind": "trio", "images": "a;b"}])


def test_cluster_options_that_cannot_work_are_refused_first(tmp_path, cli, monkeypatch):
    manifest = write_manifest(tmp_path / "jobs.csv",
                              [{"id": "s0", "fixed": "f.nii.gz", "moving": "m.nii.gz"}])
    out = tmp_path / "out"
    code, _, err = cli(["batch", str(manifest), "-o", str(out), "--cluster-set", "queue=q"])
    assert code == 2 and "add --cluster" in err
    code, _, err = cli(["batch", str(manifest), "-o", str(out), "--cluster", "slurm",
                        "--scheduler", "tcp://127.0.0.1:1"])
    assert code == 2 and "exclude each other" in err
    monkeypatch.setitem(sys.modules, "dask_jobqueue", None)  # as if the extra were missing
    code, _, err = cli(["batch", str(manifest), "-o", str(out), "--cluster", "pbs"])
    assert code == 2 and "pip install 'itreg[cluster]'" in err
    assert not out.exists()
    with pytest.raises(ConfigError, match="unknown device"):
        run(manifest, output=out, device="gpu")
    assert default_workers(ClusterSpec(workers=3)) == 3
    assert 1 <= default_workers(ClusterSpec(threads_per_worker=2, device="cpu")) <= max(
        1, machine_cpus() // 2)


def test_slurm_job_script_from_cluster_sets():
    pytest.importorskip("dask_jobqueue")
    check_spec(ClusterSpec(cluster="slurm"))
    cluster = jobqueue_cluster("slurm", {"queue": "short", "account": "lab",
                                         "walltime": "00:10:00", "memory": "8GB"})
    try:
        script = cluster.job_script()
    finally:
        cluster.close()
    assert "#SBATCH -p short" in script and "#SBATCH -A lab" in script
    assert "#SBATCH -t 00:10:00" in script and "--mem=8G" in script
    assert WORKER_ENVIRON_EXPORT in script.splitlines()
    with pytest.raises(ConfigError, match="cluster-set"):
        jobqueue_cluster("sge", {"no_such_option": 1})


def test_dry_run_checks_and_lists_without_running(tmp_path, cli):
    manifest = write_manifest(tmp_path / "jobs.csv",
                              [{"id": "s0", "fixed": "f.nii.gz", "moving": "m.nii.gz"},
                               {"id": "s1", "fixed": "f.nii.gz", "moving": "m.nii.gz"}])
    out = tmp_path / "out"
    code, stdout, err = cli(["batch", str(manifest), "-o", str(out), "--dry-run"])
    assert code == 0, err
    assert "2 jobs in" in stdout and "2 would run" in stdout and "run s1" in stdout
    assert not out.exists()

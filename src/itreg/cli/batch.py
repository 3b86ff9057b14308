"""Batch command: ``itreg batch JOBS.csv -o OUTROOT`` (many jobs through Dask distributed)."""

from __future__ import annotations

import sys

import click

from itreg.cli.app import DEVICE_HELP, app, parse_sets, standard_options
from itreg.cli.app import PATH as _PATH


@app.command()
@click.argument("manifest", type=_PATH)
@click.option("-t", "--transform", default=None,
              help="Default transform or preset for jobs whose 'transform' cell is empty.")
@click.option("-m", "--metric", default=None,
              help="Default metric for jobs whose 'metric' cell is empty.")
@click.option("--config", "config", type=_PATH, default=None,
              help="Default TOML config file for pair jobs whose 'config' cell is empty.")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Worker processes of the local cluster (default: sized to CPUs and "
                   "memory; one per GPU with --device cuda).")
@click.option("--threads-per-worker", type=click.IntRange(min=1), default=1, show_default=True,
              help="Jobs each worker process runs at once.")
@click.option("--memory-limit", default="auto", show_default=True,
              help="Memory per worker process (e.g. 4GB); Dask restarts a worker above it and "
                   "reschedules its job. auto = RAM / workers.")
@click.option("--scheduler", default=None, metavar="ADDRESS",
              help="Submit to a running Dask scheduler (tcp://host:8786) instead of starting a "
                   "local cluster; workers must see the same paths.")
@click.option("--cluster", type=click.Choice(["slurm", "pbs", "sge"]), default=None,
              help="Start workers as batch-system jobs through dask-jobqueue "
                   "(pip install 'itreg[cluster]').")
@click.option("--cluster-set", "cluster_sets", multiple=True, metavar="KEY=VALUE",
              help="dask-jobqueue option, e.g. queue=short, account=lab, cores=4, memory=16GB, "
                   "walltime=02:00:00 (repeatable).")
@click.option("--jobs", "cluster_jobs", type=click.IntRange(min=1), default=4,
              show_default=True, help="With --cluster: batch-system jobs to start.")
@click.option("--retry-failed", is_flag=True,
              help="Rerun jobs that failed in an earlier run (skipped otherwise).")
@click.option("--dry-run", is_flag=True,
              help="Check the manifest and print what would run; run nothing.")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="Torch CPU threads per job (default: the CPUs divided among the jobs the "
                   "local cluster runs at once; 1 on --scheduler/--cluster workers).")
@click.option("--device", default="auto", show_default=True,
              help=DEVICE_HELP + " With cuda each worker process uses one GPU.")
@standard_options(output_help="Output root: a folder per job id, ledger.jsonl, summary.csv "
                              "and summary.html.",
                  sets_help="Default setting for every job; a set.KEY cell overrides it "
                            "(repeatable).", compute=False)
def batch(manifest, transform, metric, config, workers, threads_per_worker, memory_limit,
          scheduler, cluster, cluster_sets, cluster_jobs, retry_failed, dry_run, threads, device,
          output, force, quiet, seed, sets) -> None:
    """Run every job of MANIFEST (CSV: id,fixed,moving[,...]) through Dask.

    With --device cuda (or auto on a GPU machine) each worker process uses one GPU. Each job
    writes OUTPUT/<id>/ as 'itreg register' (or, for kind=group rows with
    images=a;b;c, 'itreg groupwise') does. Finished jobs are skipped on a rerun. Exit status:
    0 all done, 3 some jobs failed (listed), 2 bad manifest or options, 130 interrupted.
    """
    from itreg.batch import ClusterSpec, Defaults, load_jobs, run
    from itreg.batch.ledger import read_ledger
    from itreg.batch.run import plan_job
    from itreg.errors import ConfigError

    if scheduler and cluster:
        raise ConfigError("--scheduler and --cluster exclude each other: give one")
    if cluster_sets and not cluster:
        raise ConfigError("--cluster-set configures --cluster slurm|pbs|sge; add --cluster")
    defaults = Defaults(transform=transform, metric=metric,
                        config=str(config) if config else None, seed=seed,
                        sets=parse_sets(sets))
    jobs = load_jobs(manifest, defaults)
    if dry_run:
        earlier = read_ledger(output) if output.is_dir() else {}
        planned = [plan_job(j, output.absolute(), earlier.get(j.id), force, retry_failed)
                   for j in jobs]
        to_run = [j.id for j, p in zip(jobs, planned) if p is None]
        click.echo(f"{len(jobs)} jobs in {manifest}: {len(to_run)} would run, "
                   f"{sum(p is not None and p['status'] == 'done' for p in planned)} finished, "
                   f"{sum(p is not None and p['status'] == 'failed' for p in planned)} failed "
                   "earlier (not retried)")
        for job_id in to_run:
            click.echo(f"  run {job_id}")
        return
    verbosity = (click.get_current_context().find_root().obj or {}).get(
        "logging", {}).get("verbosity", 0)
    spec = ClusterSpec(workers=workers, threads_per_worker=threads_per_worker,
                       memory_limit=memory_limit, scheduler=scheduler, cluster=cluster,
                       cluster_sets=parse_sets(cluster_sets), cluster_jobs=cluster_jobs,
                       device=device, dashboard=verbosity > 0)
    try:
        result = run(jobs, output=output, force=force, retry_failed=retry_failed,
                     threads=threads, device=device, cluster=spec, progress=not quiet)
    except KeyboardInterrupt:
        click.echo(f"interrupted: finished jobs are kept in {output} (ledger.jsonl, "
                   "summary.html); run the same command again to continue", err=True)
        raise
    click.echo(f"batch: {result.describe()}; summary: {output / 'summary.html'}")
    for record in result.failed:
        click.echo(f"  failed {record['id']}: {record.get('error')}")
    if result.exit_code:
        sys.exit(result.exit_code)

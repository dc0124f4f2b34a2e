"""``prepretrain pipeline``: check the data, write the plan, have the executor run what is not done,
then write the report; ``prepretrain pipeline status``: where every job stands.

The driver holds no state of its own: each job's directory says whether it is done, failed,
running or queued (:mod:`.state`), so the driver can be stopped and rerun at any time. A lock
(``out_dir/.pipeline.lock``) keeps two drivers off one ``out_dir``.
"""

from __future__ import annotations

import fcntl
import math
import os
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ..config import ConfigError, dump_config
from ..files import write_json, write_text
from . import state
from .config import PipelineConfig, grid_points
from .figures import jobs_at, point_label, sweep_blocks, varying
from .local import LocalExecutor
from .plan import Job, build_job_config, plan_jobs, training_flops_per_sample
from .preflight import pre_flight
from .progress import Outcome, Progress, clock
from .report import write_pipeline_report
from .resources import Estimate, estimate_jobs, remaining_path_hours

PLAN_FILE = "plan.json"
LOCK_FILE = ".pipeline.lock"


class JobsFailed(RuntimeError):
    """Some jobs failed (each named with its log) or were skipped; every other job ran."""


class PipelineStopped(JobsFailed):
    """The driver was asked to stop (SIGINT/SIGTERM): its running jobs checkpointed; a rerun resumes."""


@contextmanager
def driver_lock(out: Path):
    out.mkdir(parents=True, exist_ok=True)
    handle = open(out / LOCK_FILE, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise ConfigError("out_dir", f"{out}: another pipeline driver works on it ({holder}); wait for it, or "
                                     f"see 'prepretrain pipeline status out_dir={out}'") from None
    handle.truncate(0)
    handle.write(f"pid {os.getpid()}")
    handle.flush()
    try:
        yield
    finally:
        handle.close()


def write_plan(cfg: PipelineConfig, jobs: list[Job], estimates: dict[str, Estimate]) -> None:
    """``pipeline.yaml`` (the resolved config) and ``plan.json``: every job with its dependencies,
    key, and the resources and hours it is planned with."""
    out = Path(cfg.out_dir)
    write_text(out / "pipeline.yaml", dump_config(cfg))
    write_json(out / PLAN_FILE, {"executor": cfg.executor, "jobs": [
        {**job.to_dict(), "resources": {key: None if isinstance(value, float) and math.isnan(value) else value
                                        for key, value in asdict(estimates[job.name]).items()}} for job in jobs]})


def run_pipeline(cfg: PipelineConfig) -> dict[str, Any]:
    """Check every data source (:func:`pre_flight`), run every job not already done with the same
    key on the configured executor, then write the report. Returns job name -> results."""
    jobs = plan_jobs(cfg)
    for check in pre_flight(cfg, jobs):
        print(f"[pipeline] data {check.describe()}", flush=True)
    for job in jobs:
        if not job.deps:
            build_job_config(job)  # config mistakes surface before any compute (jobs reading others: at their turn)
    out = Path(cfg.out_dir)
    estimates = estimate_jobs(cfg, jobs)
    with driver_lock(out):
        write_plan(cfg, jobs, estimates)
        outcome = execute(cfg, jobs, estimates)
        if outcome.stopped:
            raise PipelineStopped(f"stopped: {len(outcome.done)} of {len(jobs)} jobs done; rerun the same command "
                                  "to resume")
        if cfg.executor == "slurm" and not cfg.slurm_wait:
            queued = len(jobs) - len(outcome.finished)
            print(f"[pipeline] {queued} job(s) queued; 'prepretrain pipeline status out_dir={out}' shows them; "
                  "rerun this command to wait for them and write the report", flush=True)
            return {name: record["results"] for name, record in outcome.done.items()}
        return finish(cfg, jobs, outcome, estimates)


def execute(cfg: PipelineConfig, jobs: list[Job], estimates: dict[str, Estimate]) -> Outcome:
    """Run (or queue) every job that is not done on the configured executor."""
    if cfg.executor == "slurm":
        from .slurm import SlurmExecutor  # submitit: an extra

        slurm = SlurmExecutor(cfg)
        progress = Progress(Path(cfg.out_dir), jobs, parallel=len(jobs))
        print(f"[pipeline] {len(jobs)} jobs; {slurm.describe()}", flush=True)
        _read_cached(cfg, jobs, progress)
        ids = slurm.submit(jobs, estimates, progress)
        print(f"[pipeline] {len(ids)} job(s) in the queue", flush=True)
        if cfg.slurm_wait:
            slurm.watch(jobs, ids, progress)
        return progress.outcome
    local = LocalExecutor(cfg)
    progress = Progress(Path(cfg.out_dir), jobs, parallel=len(local.slots.workers))
    print(f"[pipeline] {len(jobs)} jobs; {local.describe()}", flush=True)
    _read_cached(cfg, jobs, progress)
    priority = remaining_path_hours(jobs, {name: est.hours for name, est in estimates.items()})
    return local.run(jobs, priority, progress)


def _read_cached(cfg: PipelineConfig, jobs: list[Job], progress: Progress) -> None:
    for job in jobs:
        record = state.done_record(Path(cfg.out_dir), job)
        if record is not None:
            progress.cached(job, record)


def finish(cfg: PipelineConfig, jobs: list[Job], outcome: Outcome, estimates: dict[str, Estimate]) -> dict[str, Any]:
    """results.json and the report from every finished job; JobsFailed if any failed or was skipped."""
    out = Path(cfg.out_dir)
    results = {job.name: outcome.done[job.name]["results"] for job in jobs if job.name in outcome.done}
    write_json(out / "results.json", results)
    flops = {job.name: training_flops_per_sample(job) for job in jobs if job.kind in ("mae", "wsp")}
    missing = [job.name for job in jobs if job.name not in outcome.done]
    points = grid_points(cfg)
    point = None
    if len(points) > 1:  # the verdict and tables of one point (the last: largest budgets as listed), then the sweep
        point = (point_label(points[-1], varying(points)), jobs_at(points[-1], jobs))
    training_flops = {name: estimate.flops for name, estimate in estimates.items()}
    sweep = sweep_blocks(cfg, jobs, results, training_flops, out)
    md, html = write_pipeline_report(cfg, jobs, results, flops, timeline(jobs, outcome), missing, sweep, point)
    spent = [record.get("finished", 0) - record.get("started", 0) for record in outcome.done.values()]
    print(f"[pipeline] {len(outcome.done)} of {len(jobs)} jobs done ({clock(sum(spent))} of job time); "
          f"report: {md} and {html}", flush=True)
    if missing:
        lines = [f"{name}: failed (exit {record.get('exit_code')}): {record.get('error')}; log: {record.get('log')}"
                 for name, record in outcome.failed.items()]
        lines += [f"{name}: skipped, it reads {blocked}" for name, blocked in outcome.skipped.items()]
        lines += [f"{name}: not finished (rerun to resume)" for name in missing
                  if name not in outcome.failed and name not in outcome.skipped]
        raise JobsFailed(f"{len(missing)} of {len(jobs)} jobs did not finish:\n  " + "\n  ".join(lines))
    return results


def timeline(jobs: list[Job], outcome: Outcome) -> list[dict[str, Any]]:
    """Each finished job's start, end and where it ran (worker or SLURM job), for the report."""
    rows = []
    for job in jobs:
        record = outcome.done.get(job.name)
        if record and "started" in record and "finished" in record:
            rows.append({"name": job.name, "kind": job.kind, "started": record["started"],
                         "finished": record["finished"], "worker": record.get("worker", ""),
                         "host": record.get("host", "")})
    return rows


def pipeline_status(cfg: PipelineConfig) -> str:
    """One line per job: its state, where it runs or ran, and its log."""
    out = Path(cfg.out_dir)
    if not (out / PLAN_FILE).exists():
        raise ConfigError("out_dir", f"{out}: no pipeline plan here ({PLAN_FILE}); start one with "
                                     f"'prepretrain pipeline out_dir={out}'")
    jobs = [Job.from_dict({k: v for k, v in record.items() if k != "resources"})
            for record in (state.read_json(out / PLAN_FILE) or {}).get("jobs", [])]
    submitted = {job.name: state.submitted_record(out, job) for job in jobs}
    queue: dict[str, tuple[str, str]] = {}
    ids = [record["job_id"] for record in submitted.values() if record]
    if ids:
        from .slurm import queue_states

        try:
            queue = queue_states(ids)
        except RuntimeError as error:
            print(f"[pipeline] {error}: SLURM states unknown")
    width = max((len(job.name) for job in jobs), default=3) + 1
    lines = [f"{'job':<{width}} {'state':<22} {'where':<16} log"]
    counts: dict[str, int] = {}
    for job in jobs:
        where_dir = state.job_dir(out, job)
        done, failed = state.done_record(out, job), state.failed_record(out, job)
        record = submitted[job.name]
        where, log = "", str(where_dir / state.LOG_FILE)
        if record:
            where, log = f"slurm {record['job_id']}", record.get("log", log)
        if done:
            status = "done"
            where = done.get("worker") or where
        elif failed:
            status = f"failed (exit {failed.get('exit_code')})"
        elif record and record["job_id"] in queue:
            slurm_state, reason = queue[record["job_id"]]
            status = slurm_state.lower() + (f" ({reason})" if reason not in ("None", "") else "")
        elif state.running_elsewhere(out, job):
            status, where = "running", (state.read_json(where_dir / state.RUNNING_FILE) or {}).get("worker", "")
        elif (where_dir / state.STARTED_FILE).exists():
            status = "interrupted"
        else:
            status, log = "not started", ""
        counts[status.split(" (")[0]] = counts.get(status.split(" (")[0], 0) + 1
        lines.append(f"{job.name:<{width}} {status:<22} {where:<16} {log}")
    lines.append(", ".join(f"{count} {name}" for name, count in counts.items()))
    return "\n".join(lines)

"""What the pipeline knows about a job lies in the job's own directory, in files that any driver,
worker or ``prepretrain pipeline status`` reads the same way. This module is their one owner.

| file | written by | means |
|---|---|---|
| ``job.json`` | the driver, before the job starts | the job as planned (kind, values, key): what the worker runs |
| ``pipeline_job.started`` | the driver, before the job starts | the key of the run begun in this directory |
| ``pipeline_job.running`` | the local executor | a local process runs it: pid, host, worker, start time |
| ``pipeline_job.slurm`` | the SLURM executor | it was queued: SLURM job id, submission time, log |
| ``pipeline_job.json`` | the worker, at the end | done: key, results, start and end time, where it ran |
| ``pipeline_job.failed`` | the worker | it failed: key, the error in one line, exit code, log |
| ``pipeline_job.log`` | the local executor | the job's output (SLURM: ``slurm/<id>_0_log.out``) |

A job is done when ``pipeline_job.json`` holds its current key; anything else in its directory
belongs to an interrupted run of the same key (resumed from its checkpoints) or, under another
key, is set aside by :func:`set_aside_if_stale` before the job starts again.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

from ..files import write_json, write_text
from .plan import Job

JOB_FILE = "job.json"
STARTED_FILE = "pipeline_job.started"
RUNNING_FILE = "pipeline_job.running"
SLURM_FILE = "pipeline_job.slurm"
DONE_FILE = "pipeline_job.json"
FAILED_FILE = "pipeline_job.failed"
LOG_FILE = "pipeline_job.log"


def job_dir(out: Path, job: Job) -> Path:
    return Path(out) / job.name


def read_json(path: Path) -> dict[str, Any] | None:
    """A marker's content, or None when it is missing or unreadable (a torn write is never there:
    every marker is written atomically, but a user may have edited one)."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def done_record(out: Path, job: Job) -> dict[str, Any] | None:
    """The finished run's record when it ran this job's key, else None."""
    record = read_json(job_dir(out, job) / DONE_FILE)
    return record if record and record.get("key") == job.key else None


def failed_record(out: Path, job: Job) -> dict[str, Any] | None:
    record = read_json(job_dir(out, job) / FAILED_FILE)
    return record if record and record.get("key") == job.key else None


def prepare(out: Path, job: Job) -> Path:
    """Make the job's directory ready for a (re)start: another key's run set aside, the job record
    and the started key written, an old failure of this key cleared. Returns the directory."""
    set_aside_if_stale(out, job)
    where = job_dir(out, job)
    where.mkdir(parents=True, exist_ok=True)
    write_json(where / JOB_FILE, job.to_dict())
    write_text(where / STARTED_FILE, job.key)  # what a checkpoint here was trained for
    (where / FAILED_FILE).unlink(missing_ok=True)
    return where


def load_job(where: Path) -> Job:
    record = read_json(Path(where) / JOB_FILE)
    if record is None:
        raise FileNotFoundError(f"{Path(where) / JOB_FILE}: no job record (the driver writes it before a job starts)")
    return Job.from_dict(record)


def write_done(where: Path, job: Job, results: dict[str, Any], started: float, host: str, worker: str) -> None:
    finished = time.time()
    write_json(where / DONE_FILE, {"key": job.key, "kind": job.kind, "values": job.values,
                                   "seconds": finished - started, "started": started, "finished": finished,
                                   "host": host, "worker": worker, "results": results})


def write_failed(where: Path, job: Job, error: str, exit_code: int, log: str) -> None:
    write_json(where / FAILED_FILE, {"key": job.key, "error": error, "exit_code": exit_code, "log": log,
                                     "finished": time.time()})


def write_running(where: Path, job: Job, pid: int, worker: str) -> None:
    write_json(where / RUNNING_FILE, {"key": job.key, "pid": pid, "host": socket.gethostname(), "worker": worker,
                                      "started": time.time()})


def running_elsewhere(out: Path, job: Job) -> dict[str, Any] | None:
    """The record of a local process still running this job (started by another driver on this
    host, e.g. one stopped with SIGKILL), or None."""
    record = read_json(job_dir(out, job) / RUNNING_FILE)
    if not record or record.get("key") != job.key or record.get("host") != socket.gethostname():
        return None
    try:
        os.kill(int(record["pid"]), 0)
    except (ProcessLookupError, PermissionError, ValueError, KeyError):
        return None
    return record if not pid_is_zombie(int(record["pid"])) else None


def pid_is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def write_submitted(where: Path, job: Job, slurm_id: str, log: str) -> None:
    write_json(where / SLURM_FILE, {"key": job.key, "job_id": slurm_id, "submitted": time.time(), "log": log})


def submitted_record(out: Path, job: Job) -> dict[str, Any] | None:
    record = read_json(job_dir(out, job) / SLURM_FILE)
    return record if record and record.get("key") == job.key else None


def set_aside_if_stale(out: Path, job: Job) -> Path | None:
    """Move ``job``'s directory to ``out/.replaced/`` when it holds another configuration's run
    (a finished one, or an interrupted one) and return where it went. Otherwise the stage would
    resume from that run's checkpoints and report the old configuration's results as the new
    one's (an MAE changed upstream, and its WSP "resumed" at its last step). An interrupted run
    of the same job stays, so it resumes mid-run; nothing finished is deleted."""
    where = job_dir(out, job)
    if not where.exists():
        return None
    keys = []
    for name in (DONE_FILE, STARTED_FILE):
        path = where / name
        if path.exists():
            keys.append((read_json(path) or {}).get("key") if name.endswith(".json") else path.read_text().strip())
    if not keys or all(key == job.key for key in keys):
        return None
    target = Path(out) / ".replaced" / f"{job.name.replace('/', '__')}-{keys[0]}"
    if target.exists():
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    where.rename(target)
    print(f"[pipeline] {job.name}: its directory held a run of another configuration; moved to {target}",
          flush=True)
    return target

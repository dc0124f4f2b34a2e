"""``executor=slurm``: the whole job graph queued at once through submitit.

Each job is one sbatch job with its own resources (:mod:`.resources`): the pretraining stages on
``gpus`` GPUs as nodes x ``gpus_per_node``, transfer trainings on ``transfer_gpus``, evaluations on
one GPU; one task per GPU, with torch.distributed set up from SLURM's environment (submitit's
``TorchDistributedEnvironment``). A job waits for the jobs it reads with ``afterok``; when one
fails, SLURM cancels its dependents (``--kill-on-invalid-dep=yes``) and the driver names them.
Preemption, ``scontrol requeue`` and the time limit: the job's training checkpoints at its next
step (SIGTERM, or submitit's SIGUSR2 shortly before the limit, after which it requeues itself),
and the requeued job resumes from that checkpoint. The driver only submits and watches: it can
be stopped and rerun at any time; a rerun finds the queued jobs (``pipeline_job.slurm`` + squeue)
and submits only what is neither done nor queued.
"""

from __future__ import annotations

import getpass
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from ..config import ConfigError
from ..train.engine import Preempted
from . import state, worker
from .config import PipelineConfig, slurm_extra
from .plan import Job
from .progress import Progress
from .resources import Estimate

# squeue states of a job that has not ended yet (it may still run, or run again)
ALIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_FED", "REQUEUE_HOLD", "RESIZING",
         "SUSPENDED", "SIGNALING", "STAGE_OUT", "STOPPED", "RESV_DEL_HOLD", "SPECIAL_EXIT"}


class SlurmTask:
    """What each task of a job's sbatch runs (pickled by submitit): the job's worker in this process."""

    def __init__(self, where: str) -> None:
        self.where = where

    def __call__(self) -> int:
        import submitit

        environment = submitit.JobEnvironment()
        if environment.num_tasks > 1:  # one task per GPU: RANK, WORLD_SIZE, MASTER_ADDR/PORT from SLURM's
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        import torch

        torch.set_num_threads(int(os.environ.get("SLURM_CPUS_PER_TASK", "1")))
        try:
            code = worker.run_recorded_job(self.where, f"slurm {environment.job_id}")
        except Preempted as stop:
            print(f"[pipeline] {self.where}: {stop}", flush=True)
            notice = signal.getsignal(signal.SIGUSR2)
            if stop.signal_name == "SIGUSR2" and callable(notice):  # the time limit is near: requeue and resume
                notice(signal.SIGUSR2, None)  # submitit's handler: requeues this job, then exits
            sys.exit(75)  # SIGTERM: SLURM requeues (scontrol requeue, preemption) or cancelled the job
        if code:
            sys.exit(code)  # the job fails in SLURM's eyes too: its dependents are cancelled
        return code

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        """submitit asks this at the time limit outside training: run the same task again."""
        import submitit

        return submitit.helpers.DelayedSubmission(self)


def queue_states(job_ids: list[str]) -> dict[str, tuple[str, str]]:
    """SLURM job id -> (state, reason) for this user's jobs that SLURM still knows (queued, running
    or recently ended)."""
    if not job_ids:
        return {}
    command = ["squeue", "-h", "--states=all", "-u", getpass.getuser(), "-o", "%i|%T|%r"]
    try:
        text = subprocess.run(command, check=True, capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as error:
        raise RuntimeError(f"squeue failed: {error}") from error
    wanted = set(job_ids)
    states: dict[str, tuple[str, str]] = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 3 and parts[0] in wanted:
            states[parts[0]] = (parts[1], parts[2])
    return states


def require_slurm() -> Any:
    try:
        import submitit
    except ImportError:
        raise ConfigError("executor", "slurm needs submitit: pip install 'prepretrain[slurm]'") from None
    if shutil.which("sbatch") is None or shutil.which("squeue") is None:
        raise ConfigError("executor", "slurm needs sbatch and squeue on PATH (run the pipeline on a SLURM login "
                                      "node; scripts/local_slurm.sh start makes a one-node cluster here)")
    logging.getLogger("submitit").setLevel(logging.ERROR)  # it warns about sacct on clusters without accounting
    return submitit


class SlurmExecutor:
    def __init__(self, cfg: PipelineConfig) -> None:
        self.cfg = cfg
        self.out = Path(cfg.out_dir)
        self.submitit = require_slurm()

    def describe(self) -> str:
        partition = self.cfg.slurm_partition or "the default partition"
        return f"SLURM executor: every job queued at once on {partition}, dependencies afterok"

    def sbatch_parameters(self, job: Job, estimate: Estimate, after: list[str]) -> dict[str, Any]:
        cfg = self.cfg
        additional: dict[str, Any] = {"kill-on-invalid-dep": "yes"}
        if after:
            additional["dependency"] = "afterok:" + ":".join(after)
        additional.update({key: value or True for key, value in slurm_extra(cfg).items()})  # KEY alone: a flag
        parameters: dict[str, Any] = {
            "job_name": f"pp-{job.name.replace('/', '-')}", "nodes": estimate.nodes,
            "ntasks_per_node": estimate.tasks_per_node, "cpus_per_task": estimate.cpus_per_task,
            "time": estimate.slurm_minutes(cfg), "signal_delay_s": 120, "stderr_to_stdout": True,
            "additional_parameters": additional,
            "setup": [f"export OMP_NUM_THREADS={estimate.cpus_per_task}"],
        }
        if estimate.gpus_per_node:
            parameters["gpus_per_node"] = estimate.gpus_per_node
        for key in ("partition", "account", "qos", "constraint"):
            if getattr(cfg, f"slurm_{key}"):
                parameters[key] = getattr(cfg, f"slurm_{key}")
        return parameters

    def queued(self, jobs: list[Job], progress: Progress) -> dict[str, str]:
        """Jobs of this plan already in SLURM's queue (a driver ran before): name -> SLURM id. A queued
        job of an older configuration (another key) is cancelled: it would run the new one twice."""
        records = {job.name: state.read_json(state.job_dir(self.out, job) / state.SLURM_FILE) for job in jobs}
        alive = {job_id for job_id, (status, _) in queue_states(
            [record["job_id"] for record in records.values() if record]).items() if status in ALIVE}
        current: dict[str, str] = {}
        for job in jobs:
            record = records[job.name]
            if not record or record.get("job_id") not in alive:
                continue
            if record.get("key") == job.key:
                current[job.name] = record["job_id"]
                progress.note(f"{job.name}: already queued as SLURM job {record['job_id']}")
            else:
                subprocess.run(["scancel", record["job_id"]], capture_output=True, timeout=60)
                progress.note(f"{job.name}: cancelled SLURM job {record['job_id']}, queued for another configuration")
        return current

    def submit(self, jobs: list[Job], estimates: dict[str, Estimate], progress: Progress) -> dict[str, str]:
        """Queue every job that is neither done nor queued; returns name -> SLURM id of all queued ones."""
        outcome = progress.outcome
        ids = self.queued([job for job in jobs if job.name not in outcome.done], progress)
        for job in jobs:  # plan order: every dependency is done or queued before its readers
            if job.name in outcome.done or job.name in ids:
                continue
            missing = [dep for dep in job.deps if dep not in outcome.done and dep not in ids]
            if missing:  # cannot happen in plan order; kept as a guard with a clear message
                raise RuntimeError(f"{job.name}: its dependency {missing[0]} is neither done nor queued")
            where = state.prepare(self.out, job)
            folder = where / "slurm"
            executor = self.submitit.SlurmExecutor(folder=str(folder), max_num_timeout=20)
            executor.update_parameters(**self.sbatch_parameters(
                job, estimates[job.name], [ids[dep] for dep in job.deps if dep in ids]))
            try:
                submitted = executor.submit(SlurmTask(str(where)))
            except Exception as error:  # noqa: BLE001 - sbatch's refusal (account, partition...) in one line
                kept = f"; the {len(ids)} job(s) queued before it stay queued (rerun once fixed)" if ids else ""
                raise ConfigError("executor", f"sbatch refused {job.name}: {' '.join(str(error).split())}{kept}"
                                  ) from None
            ids[job.name] = str(submitted.job_id)
            log = folder / f"{submitted.job_id}_0_log.out"
            state.write_submitted(where, job, ids[job.name], str(log))
            progress.started(job, f"slurm {submitted.job_id}")
        return ids

    def watch(self, jobs: list[Job], ids: dict[str, str], progress: Progress) -> None:
        """Wait until every queued job has ended, one line per job as it ends."""
        outcome = progress.outcome
        waiting = {job.name: job for job in jobs if job.name in ids and job.name not in outcome.finished}
        by_id = {ids[name]: name for name in waiting}
        while waiting:
            states = queue_states(list(by_id))
            for name, job in list(waiting.items()):
                job_id = ids[name]
                status, reason = states.get(job_id, ("", ""))
                where = state.job_dir(self.out, job)
                log = (state.submitted_record(self.out, job) or {}).get("log", str(where / "slurm"))
                if state.done_record(self.out, job) is not None or state.failed_record(self.out, job) is not None:
                    if status not in ALIVE or status == "COMPLETING":
                        progress.finished(job, None, Path(log), None)
                        del waiting[name]
                elif status not in ALIVE:
                    del waiting[name]
                    blocked = next((dep for dep in job.deps if dep in outcome.failed or dep in outcome.skipped), None)
                    if blocked or reason == "DependencyNeverSatisfied":
                        progress.skipped(job, blocked or "a failed dependency")
                    else:
                        progress.lost(job, f"SLURM job {job_id} ended ({status or 'gone from the queue'}) without "
                                           "a result", log)
            if waiting:
                time.sleep(self.cfg.poll_s)

"""``executor=local``: the jobs on this machine, side by side as their dependencies finish.

On CPU, ``workers`` jobs at a time (``auto``: one per core), each with ``threads`` torch threads
(0: cores / workers), since two one-thread processes do about twice the work of one two-thread
process on small models. With CUDA, one job per GPU (``CUDA_VISIBLE_DEVICES``); a training job
that asks for several GPUs gets them through torchrun. The job with the most estimated work
behind it starts first (critical-path order). A failed job is reported in one line with its log;
the jobs that read it are skipped and named; every other job still runs. SIGINT/SIGTERM reach
the running jobs as SIGTERM (they checkpoint at their next step), and a rerun resumes them.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import state
from .config import PipelineConfig
from .plan import PRETRAINING_KINDS, TRAINING_KINDS, Job
from .progress import Outcome, Progress
from .worker import forked_main

POLL_S = 0.2  # between two looks at the running jobs (they last seconds to days)


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def local_gpus(cfg: PipelineConfig) -> list[str]:
    """The GPU ids this machine lends its jobs (none on ``device=cpu`` or without CUDA)."""
    if cfg.device == "cpu":
        return []
    import torch

    if not torch.cuda.is_available():
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [part.strip() for part in visible.split(",") if part.strip()] if visible else []
    return ids or [str(index) for index in range(torch.cuda.device_count())]


@dataclass
class Slots:
    """What is free: worker numbers, and on a GPU machine the GPU ids."""

    workers: list[int]
    gpus: list[str] = field(default_factory=list)
    threads: int = 1

    def gpus_for(self, cfg: PipelineConfig, job: Job, total_gpus: int) -> int:
        if not total_gpus:
            return 0
        if job.kind in PRETRAINING_KINDS:
            return min(cfg.gpus, total_gpus)
        if job.kind in TRAINING_KINDS:
            return min(cfg.transfer_gpus or cfg.gpus, total_gpus)
        return 1


class Running:
    """A started job: a forked worker, or torchrun for a job on several GPUs."""

    def __init__(self, job: Job, where: Path, worker: int, gpus: list[str], handle: Any) -> None:
        self.job, self.where, self.worker, self.gpus, self.handle = job, where, worker, gpus, handle
        self.started = time.time()

    @property
    def pid(self) -> int:
        return int(self.handle.pid)

    def exit_code(self) -> int | None:
        if isinstance(self.handle, subprocess.Popen):
            return self.handle.poll()
        if self.handle.is_alive():
            return None
        self.handle.join()
        code = self.handle.exitcode
        return 128 - code if code is not None and code < 0 else code  # killed by a signal: 128 + signal

    def terminate(self) -> None:
        try:
            os.kill(self.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


class LocalExecutor:
    def __init__(self, cfg: PipelineConfig) -> None:
        self.cfg = cfg
        self.out = Path(cfg.out_dir)
        self.gpus = local_gpus(cfg)
        cores = cpu_count()
        if cfg.workers == "auto":
            workers = len(self.gpus) or cores
        else:
            workers = int(cfg.workers)
        self.slots = Slots(list(range(1, workers + 1)), list(self.gpus),
                           cfg.threads or max(1, cores // workers))
        self._context = None
        self._stop_signal = 0

    def describe(self) -> str:
        where = f"{len(self.gpus)} GPU(s)" if self.gpus else f"{cpu_count()} CPU core(s)"
        return (f"local executor: {len(self.slots.workers)} job(s) at a time on {where}, "
                f"{self.slots.threads} torch thread(s) each")

    # ------------------------------------------------------------------ starting one job
    def start(self, job: Job, worker: int, gpus: list[str]) -> Running:
        where = state.prepare(self.out, job)
        env = dict(os.environ)
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(self.slots.threads)
        if self.gpus:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
        name = f"worker {worker}" + (f" GPU {','.join(gpus)}" if gpus else "")
        if len(gpus) > 1:  # one process per GPU, meeting at a rendezvous on this machine
            with open(where / state.LOG_FILE, "ab") as log:
                handle = subprocess.Popen(
                    [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={len(gpus)}",
                     "-m", "prepretrain.pipeline.worker", str(where), name],
                    stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        else:
            handle = self.context().Process(target=forked_main, name=job.name,
                                            args=(str(where), name, os.getcwd(), env, self.slots.threads))
            handle.start()
        running = Running(job, where, worker, gpus, handle)
        state.write_running(where, job, running.pid, name)
        return running

    def context(self):
        """A fork server that imported the worker once: each job then starts in milliseconds,
        as its own process, with nothing of the driver's threads or CUDA state."""
        if self._context is None:
            self._context = multiprocessing.get_context("forkserver")
            self._context.set_forkserver_preload(["prepretrain.pipeline.worker"])
        return self._context

    # ------------------------------------------------------------------ the schedule
    def run(self, jobs: list[Job], priority: dict[str, float], progress: Progress) -> Outcome:
        """Run every job not done yet; returns what became of each."""
        outcome = progress.outcome
        pending = sorted((job for job in jobs if job.name not in outcome.finished),
                         key=lambda job: -priority.get(job.name, 0.0))
        running: dict[str, Running] = {}
        elsewhere: dict[str, Job] = {}
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            while pending or running or elsewhere:
                if self._stop_signal:
                    self._stop(running, progress)
                    break
                pending = self._start_ready(pending, running, elsewhere, progress)
                pending += self._reap(running, elsewhere, progress)
                if (pending or running or elsewhere) and not self._stop_signal:
                    time.sleep(POLL_S)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return outcome

    def _start_ready(self, pending: list[Job], running: dict[str, Running], elsewhere: dict[str, Job],
                     progress: Progress) -> list[Job]:
        outcome = progress.outcome
        still: list[Job] = []
        for job in pending:
            blocked = next((dep for dep in job.deps if dep in outcome.failed or dep in outcome.skipped), None)
            if blocked:
                progress.skipped(job, blocked)
                continue
            if any(dep not in outcome.done for dep in job.deps):
                still.append(job)
                continue
            if state.running_elsewhere(self.out, job):  # a job left running by an earlier driver
                elsewhere[job.name] = job
                progress.note(f"{job.name}: already running (started by an earlier driver); waiting for it")
                continue
            gpus_needed = self.slots.gpus_for(self.cfg, job, len(self.gpus))
            if not self.slots.workers or len(self.slots.gpus) < gpus_needed:
                still.append(job)
                continue
            worker = self.slots.workers.pop(0)
            gpus = [self.slots.gpus.pop(0) for _ in range(gpus_needed)]
            running[job.name] = self.start(job, worker, gpus)
            progress.started(job, f"worker {worker}")
        return still

    def _reap(self, running: dict[str, Running], elsewhere: dict[str, Job], progress: Progress,
              stopping: bool = False) -> list[Job]:
        """Record the jobs whose processes ended; returns those to start again: jobs an earlier
        driver left running that ended without a result (they resume from their checkpoints)."""
        for name, run in list(running.items()):
            code = run.exit_code()
            if code is None:
                continue
            if stopping and code:  # ended by our SIGTERM (an evaluation has no checkpoint to save): not a failure
                code = None
            del running[name]
            self.slots.workers.append(run.worker)
            self.slots.workers.sort()
            self.slots.gpus.extend(run.gpus)
            (run.where / state.RUNNING_FILE).unlink(missing_ok=True)
            progress.finished(run.job, code, run.where / state.LOG_FILE, time.time() - run.started)
        again = []
        for name, job in list(elsewhere.items()):
            if not state.running_elsewhere(self.out, job):
                del elsewhere[name]
                if state.done_record(self.out, job) or state.failed_record(self.out, job):
                    progress.finished(job, None, state.job_dir(self.out, job) / state.LOG_FILE, None)
                else:
                    progress.note(f"{job.name}: the earlier driver's process ended without a result; starting it "
                                  "again")
                    again.append(job)
        return again

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._stop_signal = signum

    def _stop(self, running: dict[str, Running], progress: Progress) -> None:
        """Stop every running job with SIGTERM (a training job checkpoints at its next step boundary)
        and wait for them; a second signal while waiting kills them."""
        name = signal.Signals(self._stop_signal).name
        progress.note(f"{name}: stopping {len(running)} running job(s) (they save a checkpoint first); "
                      "rerun the same command to resume")
        for run in running.values():
            run.terminate()
        self._stop_signal = 0
        while running:
            if self._stop_signal:  # asked twice: do not wait for checkpoints
                for run in running.values():
                    try:
                        os.kill(run.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            self._reap(running, {}, progress, stopping=True)
            time.sleep(POLL_S)
        progress.outcome.stopped = True

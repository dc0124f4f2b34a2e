"""What became of each job, and the console's one line per finished job (with the ETA)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import state
from .plan import Job


@dataclass
class Outcome:
    done: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> its done record
    failed: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> error, exit code, log
    skipped: dict[str, str] = field(default_factory=dict)  # name -> the failed job it reads
    interrupted: set[str] = field(default_factory=set)  # stopped by a signal: resumes on a rerun
    stopped: bool = False  # the driver was asked to stop

    @property
    def finished(self) -> set[str]:
        return set(self.done) | set(self.failed) | set(self.skipped)


def clock(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class Progress:
    """Prints ``[pipeline 12/54] NAME: done in 1:05 (worker 1); elapsed 3:10, ETA ~8:40`` per job."""

    def __init__(self, out: Path, jobs: list[Job], parallel: int) -> None:
        self.out = Path(out)
        self.total = len(jobs)
        self.parallel = max(1, parallel)
        self.start = time.perf_counter()
        self.durations: list[float] = []
        self.outcome = Outcome()
        self.where: dict[str, str] = {}

    def print(self, text: str) -> None:
        print(text, flush=True)

    def note(self, text: str) -> None:
        self.print(f"[pipeline] {text}")

    def _count(self) -> str:
        return f"[pipeline {len(self.outcome.finished)}/{self.total}]"

    def _times(self) -> str:
        elapsed = time.perf_counter() - self.start
        remaining = self.total - len(self.outcome.finished)
        eta = ""
        if self.durations and remaining:
            eta = f", ETA ~{clock(sum(self.durations) / len(self.durations) * remaining / self.parallel)}"
        return f"elapsed {clock(elapsed)}{eta}"

    def cached(self, job: Job, record: dict[str, Any]) -> None:
        self.outcome.done[job.name] = record
        self.print(f"{self._count()} {job.name}: cached")

    def started(self, job: Job, where: str) -> None:
        self.where[job.name] = where

    def finished(self, job: Job, code: int | None, log: Path, seconds: float | None) -> None:
        """A job's process ended (``code`` None: one another driver started, or one the driver stopped):
        its markers say how."""
        done = state.done_record(self.out, job)
        if done is not None:
            self.outcome.done[job.name] = done
            seconds = seconds if seconds is not None else done.get("seconds")
            if seconds is not None:
                self.durations.append(seconds)
            took = f" in {clock(seconds)}" if seconds is not None else ""
            where = f" ({self.where[job.name]})" if job.name in self.where else ""
            self.print(f"{self._count()} {job.name}: done{took}{where}; {self._times()}")
            return
        failure = state.failed_record(self.out, job)
        if failure is None and code == 75 or failure is None and code is None:
            self.outcome.interrupted.add(job.name)
            self.note(f"{job.name}: stopped before the end (rerun to resume); log: {log}")
            return
        if failure is None:
            failure = {"error": f"the job's process ended with exit code {code} and no result", "exit_code": code,
                       "log": str(log)}
        self.outcome.failed[job.name] = failure
        self.print(f"{self._count()} {job.name}: FAILED (exit {failure.get('exit_code')}): {failure.get('error')}; "
                   f"log: {failure.get('log') or log}")

    def lost(self, job: Job, why: str, log: str) -> None:
        """A queued job that ended without a marker (cancelled, timed out, node failure)."""
        self.outcome.failed[job.name] = {"error": why, "exit_code": None, "log": log}
        self.print(f"{self._count()} {job.name}: FAILED: {why}; log: {log}")

    def skipped(self, job: Job, blocked: str) -> None:
        self.outcome.skipped[job.name] = blocked
        self.print(f"{self._count()} {job.name}: skipped: it reads {blocked}, which "
                   f"{'failed' if blocked in self.outcome.failed else 'was skipped'}")

"""One pipeline job, run in the process that calls it: the one path every executor takes.

The local executor forks it from a server that imported the package once (a job starts in
milliseconds, not the seconds an interpreter and torch take); a job on several local GPUs runs
it under torchrun (``python -m prepretrain.pipeline.worker JOB_DIR``); on SLURM each task of the
job calls it through submitit. It reads the job record the driver wrote (``job.json``), runs the
job, and on rank 0 writes the done marker with the results, or the failure in one line. A job
stopped by a signal has saved a checkpoint and exits with 75: run again, it resumes.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from ..failures import EXIT_PREEMPTED, expected_failure
from ..train.engine import Preempted
from . import state
from .plan import run_job

EXIT_BUG = 1


def execute(where: str | Path, worker: str = "") -> int:
    """Run the job recorded in ``where``; the exit code (0 done, 75 stopped by a signal, else failed)."""
    try:
        return run_recorded_job(where, worker)
    except Preempted as stop:
        print(f"[pipeline] {where}: {stop}", flush=True)
        return EXIT_PREEMPTED


def run_recorded_job(where: str | Path, worker: str = "") -> int:
    """:func:`execute` without the handling of :class:`Preempted`, which a SLURM task handles itself
    (a stop before the time limit requeues the job)."""
    where = Path(where)
    job = state.load_job(where)
    rank = int(os.environ.get("RANK", "0"))
    started = time.time()
    print(f"[pipeline] {job.name} ({job.kind}) on {socket.gethostname()} {worker}".rstrip(), flush=True)
    try:
        results = _jsonable(run_job(job))
    except Preempted:
        raise
    except Exception as error:  # noqa: BLE001 - every failure is recorded for the driver, then the exit code
        failure = expected_failure(error)
        traceback.print_exc()
        code, message = failure if failure else (EXIT_BUG, f"{type(error).__name__}: {error}")
        message = " ".join(message.split())
        print(f"[pipeline] {job.name} failed: {message}", file=sys.stderr, flush=True)
        if rank == 0:
            state.write_failed(where, job, message, code, str(log_path(where)))
        return code
    if rank == 0:
        state.write_done(where, job, results, started, socket.gethostname(), worker)
    return 0


def log_path(where: Path) -> Path:
    """Where the job's output goes: the local log, or SLURM's log named in the submission record."""
    submitted = state.read_json(where / state.SLURM_FILE)
    return Path(submitted["log"]) if submitted and submitted.get("log") else where / state.LOG_FILE


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def forked_main(where: str, worker: str, cwd: str, env: dict[str, str], threads: int) -> None:
    """A forked local job: the driver's working directory and environment (this process was forked
    from a server started earlier), its own session (a Ctrl-C in the terminal reaches the driver,
    which stops its jobs with SIGTERM: they checkpoint first), output to the job's log."""
    os.setsid()
    os.chdir(cwd)
    os.environ.clear()
    os.environ.update(env)
    log = os.open(Path(where) / state.LOG_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)
    sys.stdout.reconfigure(line_buffering=True)
    import torch

    torch.set_num_threads(threads)
    sys.exit(execute(where, worker))


def main(argv: list[str] | None = None) -> int:
    """``python -m prepretrain.pipeline.worker JOB_DIR [WORKER]``: under torchrun, one process per GPU."""
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print("usage: python -m prepretrain.pipeline.worker JOB_DIR [WORKER]", file=sys.stderr)
        return 2
    return execute(args[0], args[1] if len(args) > 1 else "")


if __name__ == "__main__":
    sys.exit(main())

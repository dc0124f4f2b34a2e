"""The pipeline's jobs as processes: side by side on this machine (executor=local) and queued on a
real SLURM (executor=slurm, a one-node cluster on localhost: scripts/local_slurm.sh), with the
same results; failures named with their logs and their readers skipped; stops and requeues that
resume where they stopped."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
from safetensors.torch import load_file

from prepretrain.cli import main
from prepretrain.config import build_config
from prepretrain.pipeline import PipelineConfig, pipeline_status, plan_jobs, run_pipeline
from prepretrain.pipeline.slurm import queue_states

# MAE -> WSP, WSP from scratch, and their probes: 6 jobs, 3 deep
SMALL = {"seeds": "0", "num_images": 120, "mae_steps": 3, "wsp_steps": 4, "lit_steps": 2, "finetune_steps": 2,
         "eval_every": 2, "batch_size": 16, "evaluations": "probe", "tasks": "coarse", "random_baseline": "false",
         "control_arms": "false", "device": "cpu"}
SLURM = {"executor": "slurm", "slurm_cpus_per_task": 1, "poll_s": 0.5}


def numbers(results: dict) -> dict:
    """Every numeric result, flattened, without timings."""
    flat = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for key, inner in value.items():
                if "second" not in key and key not in ("features_computed", "samples_per_s"):
                    walk(f"{prefix}/{key}", inner)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[prefix] = value

    walk("", results)
    return flat


def arguments(values: dict) -> list[str]:
    return [f"{key}={value}" for key, value in values.items()]


def images_without_hashtags(root: Path) -> Path:
    """An ImageFolder: fine for MAE and the pre-flight, but WSP finds no hashtag to learn from."""
    from PIL import Image

    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for index in range(20):
            Image.new("RGB", (32, 32), (10 * index, 40, 0)).save(root / label / f"{index}.png")
    return root


def read(path: Path) -> dict:
    return json.loads(path.read_text())


def wait_for_step(metrics: Path, step: int, timeout: float = 180) -> None:
    """Until the run at ``metrics`` has logged ``step``."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if metrics.exists():
            rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip().endswith("}")]
            if any(row.get("step", 0) >= step for row in rows):
                return
        time.sleep(0.2)
    raise AssertionError(f"{metrics} never reached step {step}")


def release_requeued(job_id: str, timeout: float = 60) -> None:
    """SLURM holds a requeued job about two minutes (reason BeginTime) before it may start again;
    the test lets it start at once."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if queue_states([job_id]).get(job_id, ("", ""))[1] == "BeginTime":
            subprocess.run(["scontrol", "update", f"jobid={job_id}", "starttime=now"], check=True,
                           capture_output=True, timeout=30)
            return
        time.sleep(0.2)
    raise AssertionError(f"SLURM job {job_id} was not held after its requeue")


def encoder_of(run: Path) -> dict:
    return load_file(str(run / "encoder.safetensors"))


def train_alone(config: Path, out_dir: Path) -> None:
    """The same stage from its resolved config, uninterrupted, in its own one-thread process."""
    stage = read(config.parent / "job.json")["kind"]
    subprocess.run([sys.executable, "-m", "prepretrain.cli", stage, "--config", str(config), f"out_dir={out_dir}"],
                   check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)


def test_a_failed_job_is_named_with_its_log_its_readers_skipped_and_every_other_job_runs(tmp_path, capsys):
    plain = images_without_hashtags(tmp_path / "plain")
    out = tmp_path / "out"
    code = main(["pipeline", *arguments({**SMALL, "out_dir": out, "wsp_data": plain, "control_arms": "true",
                                         "workers": 2})])
    printed = capsys.readouterr()
    assert code == 1
    for run in ("wsp_mae", "wsp_maeinit", "wsp"):  # one line each, with the log that holds the traceback
        line = next(line for line in printed.out.splitlines() if f"seed0/{run}: FAILED" in line)
        assert "(exit 3): no hashtag is left for the vocabulary" in line
        log = Path(line.rsplit("log: ", 1)[1])
        assert log == out / "seed0" / run / "pipeline_job.log" and "Traceback" in log.read_text()
    for arm, run in (("mae_wsp", "wsp_mae"), ("maeinit_wsp", "wsp_maeinit"), ("wsp", "wsp")):
        assert f"seed0/eval/{arm}/coarse: skipped: it reads seed0/{run}, which failed" in printed.out
    assert "6 of 9 jobs did not finish" in printed.err  # the summary names each again
    results = read(out / "results.json")  # every job that could run ran
    assert sorted(results) == ["seed0/eval/mae/coarse", "seed0/eval/mae_init/coarse", "seed0/mae"]
    report = (out / "report.md").read_text()
    assert "**Incomplete**: 6 of 9 jobs" in report and "| linear probe (coarse) |" in report
    status = pipeline_status(build_config(PipelineConfig, None, {"out_dir": str(out)}))
    assert "seed0/wsp_mae" in status and "failed (exit 3)" in status and "3 done, 3 failed, 3 not started" in status


def test_the_driver_stops_its_jobs_on_sigint_and_a_rerun_resumes_them(tmp_path, capsys):
    """Ctrl-C reaches the running jobs as SIGTERM: each checkpoints at its next step boundary; the
    pipeline exits with 75 and the rerun resumes them mid-run instead of starting again. A job still
    running from an earlier driver is waited for, not started twice."""
    out = tmp_path / "out"
    values = {**SMALL, "out_dir": out, "mae_steps": 60, "workers": 2}
    driver = subprocess.Popen([sys.executable, "-m", "prepretrain.cli", "pipeline", *arguments(values)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        wait_for_step(out / "seed0" / "mae" / "metrics.jsonl", 10)
        driver.send_signal(signal.SIGINT)
        printed, _ = driver.communicate(timeout=120)
    finally:
        driver.kill()
    assert driver.returncode == 75, printed
    assert "SIGINT: stopping" in printed and "seed0/mae: stopped before the end (rerun to resume)" in printed
    log = (out / "seed0" / "mae" / "pipeline_job.log").read_text()
    stopped_at = int(log.split("stopped by SIGTERM after step ", 1)[1].split(";")[0])
    assert 10 <= stopped_at < 60
    # as if a driver killed with SIGKILL had left a process on the MAE: the rerun waits for it, not
    # starting the job twice, and starts it again when it ends without a result
    mae = next(job for job in plan_jobs(build_config(PipelineConfig, None, values)) if job.name == "seed0/mae")
    orphan = subprocess.Popen(["sleep", "3"])
    (out / "seed0" / "mae" / "pipeline_job.running").write_text(json.dumps(
        {"key": mae.key, "pid": orphan.pid, "host": socket.gethostname(), "worker": "worker 9"}))
    capsys.readouterr()
    assert main(["pipeline", *arguments(values)]) == 0
    printed = capsys.readouterr().out
    assert "seed0/mae: already running (started by an earlier driver); waiting for it" in printed
    assert "seed0/mae: the earlier driver's process ended without a result; starting it again" in printed
    orphan.wait()
    log = (out / "seed0" / "mae" / "pipeline_job.log").read_text()
    assert f"at step {stopped_at}/60" in log.split("stopped by SIGTERM", 1)[1]  # resumed, not restarted
    assert read(out / "seed0" / "mae" / "pipeline_job.json")["results"]["steps"] == 60


@pytest.mark.slow
def test_slurm_queues_the_whole_graph_at_once_and_matches_the_local_executor(tmp_path, slurm_cluster):
    """Every job is submitted (afterok on what it reads) before the first one finishes; the driver
    can leave and come back without submitting anything twice; the numbers are those of the local
    executor running one job at a time in another directory, bit for bit (one torch thread per job
    in both): neither the order nor the placement of jobs changes a result."""
    local = run_pipeline(build_config(PipelineConfig, None, {**SMALL, "out_dir": str(tmp_path / "local"),
                                                             "workers": 1, "threads": 1}))
    cfg = build_config(PipelineConfig, None, {**SMALL, **SLURM, "out_dir": str(tmp_path / "slurm"),
                                              "slurm_wait": "false"})
    assert run_pipeline(cfg) == {}  # queued, not waited for
    jobs = plan_jobs(cfg)
    queued = {job.name: read(tmp_path / "slurm" / job.name / "pipeline_job.slurm") for job in jobs}
    assert len({record["job_id"] for record in queued.values()}) == len(jobs)
    slurm = run_pipeline(replace(cfg, slurm_wait=True))  # a second driver: waits, submits nothing again
    assert {job.name: read(tmp_path / "slurm" / job.name / "pipeline_job.slurm") for job in jobs} == queued
    assert numbers(slurm) == numbers(local) and len(numbers(slurm)) > 20
    finished = [read(tmp_path / "slurm" / job.name / "pipeline_job.json")["finished"] for job in jobs]
    assert max(record["submitted"] for record in queued.values()) < min(finished)
    status = pipeline_status(cfg)
    for job in jobs:
        line = next(line for line in status.splitlines() if line.startswith(job.name + " "))
        assert " done " in line and f"slurm {queued[job.name]['job_id']}" in line
    assert "| `seed0/mae` | mae | slurm " in (tmp_path / "slurm" / "report.md").read_text()  # the schedule


@pytest.mark.slow
def test_slurm_requeue_resumes_bit_exact_and_a_failed_job_cancels_its_readers(tmp_path, slurm_cluster):
    """``scontrol requeue`` of the running MAE: it checkpoints on SIGTERM, runs again and resumes,
    ending with the weights of an uninterrupted run. The WSP jobs fail (their data has no hashtags):
    SLURM cancels the jobs that read them, and the driver names them."""
    plain = images_without_hashtags(tmp_path / "plain")
    out = tmp_path / "out"
    values = {**SMALL, **SLURM, "out_dir": out, "mae_steps": 50, "wsp_data": plain}
    driver = subprocess.Popen([sys.executable, "-m", "prepretrain.cli", "pipeline", *arguments(values)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_for_step(out / "seed0" / "mae" / "metrics.jsonl", 10)
        mae_id = read(out / "seed0" / "mae" / "pipeline_job.slurm")["job_id"]
        subprocess.run(["scontrol", "requeue", mae_id], check=True, capture_output=True, timeout=30)
        release_requeued(mae_id)
        printed, _ = driver.communicate(timeout=600)
    finally:
        driver.kill()
    assert driver.returncode == 1, printed
    log = Path(read(out / "seed0" / "mae" / "pipeline_job.slurm")["log"]).read_text()
    stopped_at = int(log.split("stopped by SIGTERM after step ", 1)[1].split(";")[0])
    assert 10 <= stopped_at < 50 and f"at step {stopped_at}/50" in log  # the requeued job resumed there
    train_alone(out / "seed0" / "mae" / "config.yaml", tmp_path / "uninterrupted")
    requeued, uninterrupted = encoder_of(out / "seed0" / "mae"), encoder_of(tmp_path / "uninterrupted")
    assert requeued.keys() == uninterrupted.keys()
    assert all(requeued[key].equal(uninterrupted[key]) for key in requeued)
    for run in ("wsp_mae", "wsp"):
        assert f"seed0/{run}: FAILED (exit 3): no hashtag is left" in printed
    for arm, run in (("mae_wsp", "wsp_mae"), ("wsp", "wsp")):
        assert f"seed0/eval/{arm}/coarse: skipped: it reads seed0/{run}, which failed" in printed
        cancelled = read(out / "seed0" / "eval" / arm / "coarse" / "pipeline_job.slurm")["job_id"]
        assert queue_states([cancelled])[cancelled] == ("CANCELLED", "DependencyNeverSatisfied")
    assert read(out / "results.json").keys() == {"seed0/mae", "seed0/eval/mae/coarse"}


def test_a_job_slurm_refuses_stops_the_pipeline_in_one_line(tmp_path, capsys, slurm_cluster):
    code = main(["pipeline", *arguments({**SMALL, **SLURM, "out_dir": tmp_path, "slurm_partition": "no-such-one"})])
    assert code == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]  # after what sbatch itself printed
    assert message.startswith("prepretrain pipeline: config key 'executor': sbatch refused seed0/mae:")
    assert "invalid partition" in message.lower()

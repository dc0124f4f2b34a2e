"""``prepretrain pipeline --dry-run``: the plan without running it: the data sources, every job's
FLOPs, memory per GPU and hours, the critical path and the GPU-hours; with ``executor=slurm`` the
sbatch resources each job would be queued with."""

from __future__ import annotations

import math

from .config import PipelineConfig, grid_points, slurm_extra
from .figures import jobs_at, point_label, varying
from .plan import TASK_STAGES, TRAINING_KINDS, plan_jobs
from .preflight import pre_flight
from .resources import critical_path, estimate_jobs


def dry_run(cfg: PipelineConfig) -> str:
    """The plan: stages, FLOPs, memory per GPU and estimated time on the GPUs each job gets."""
    lines = [f"pipeline plan: {len(cfg.seeds)} seed(s); pretraining on {cfg.gpus} GPU(s), transfer trainings on "
             f"{cfg.transfer_gpus or cfg.gpus}, evaluations on 1, of {cfg.gpu_memory_gib:g} GiB; "
             f"assumed MFU {cfg.assumed_mfu:.0%}"]
    jobs = plan_jobs(cfg)
    lines.append("data sources (opened now; a source not at hand is planned with the sizes below):")
    lines += [f"  {check.describe()}" for check in pre_flight(cfg, jobs, strict=False)]
    estimates = estimate_jobs(cfg, jobs)
    width = max(len(job.name) for job in jobs) + 1
    lines.append(f"{'job':<{width}} {'kind':<9} {'model':<11} {'GPUs':>4} {'steps':>8} {'PFLOP':>12} "
                 f"{'mem/GPU GiB':>12} {'fits':>6} {'est. hours':>10}")
    for job in jobs:
        est = estimates[job.name]
        if job.kind in TRAINING_KINDS:
            lines.append(f"{job.name:<{width}} {job.kind:<9} {est.model:<11} {est.gpus:>4} {est.steps:>8} "
                         f"{est.flops / 1e15:>12.1f} {est.memory_gib:>12.1f} {est.fits:>6} {est.hours:>10.2f}")
        else:
            lines.append(f"{job.name:<{width}} {job.kind:<9} {'(inference)':<11} {est.gpus:>4} {'':>8} {'':>12} "
                         f"{'':>12} {'':>6} {est.hours:>10.2f}")
    lines.append("lit rows count the image tower as trained: an upper bound, since LiT keeps it frozen")
    if any(job.kind in TASK_STAGES for job in jobs):
        lines.append("video and detect rows are priced as the image model on one image per sample: a lower bound "
                     "(a clip has num_frames / tubelet_size times the tokens; the detector adds its heads)")
    lines.append("steps: from each recipe's epochs; data not at hand counts as IG-3B (3.0B images) for pretraining, "
                 "ImageNet-1k (1.28M) for finetuning, Kinetics-400 (240K videos) and COCO (118K images); "
                 "an evaluation reads a train split and 50K held-out images, plus 3 minutes")
    if cfg.executor == "slurm":
        lines += ["", *slurm_lines(cfg, jobs, estimates, width)]
    lines += grid_lines(cfg, jobs, estimates)
    total_flops = sum(est.flops for est in estimates.values())
    hours, path = critical_path(jobs, {name: est.hours for name, est in estimates.items()})
    gpu_hours = sum(est.gpu_hours for est in estimates.values())
    lines.append("")
    lines.append(f"critical path: {hours:.1f} hours, {' -> '.join(path)}")
    lines.append(f"total training: {total_flops / 1e18:.2f} EFLOP; all {len(jobs)} jobs: {gpu_hours:,.0f} GPU-hours "
                 f"at {cfg.assumed_mfu:.0%} MFU of 989 TFLOP/s")
    return "\n".join(lines)


def slurm_lines(cfg: PipelineConfig, jobs, estimates, width: int) -> list[str]:
    """Every job's sbatch resources, as the SLURM executor would queue it."""
    shared = {"partition": cfg.slurm_partition, "account": cfg.slurm_account, "qos": cfg.slurm_qos,
              "constraint": cfg.slurm_constraint, **slurm_extra(cfg)}
    shared_text = " ".join(f"--{key}={value}" if value else f"--{key}" for key, value in shared.items()
                           if value or key in slurm_extra(cfg))
    lines = [f"sbatch resources (executor=slurm; every job also: {shared_text or 'the cluster defaults'}; "
             "dependencies afterok, dependents of a failed job cancelled):"]
    lines.append(f"{'job':<{width}} {'nodes':>5} {'GPUs/node':>9} {'tasks/node':>10} {'CPUs/task':>9} "
                 f"{'time':>9} {'after':>5}")
    for job in jobs:
        est = estimates[job.name]
        minutes = est.slurm_minutes(cfg)
        lines.append(f"{job.name:<{width}} {est.nodes:>5} {est.gpus_per_node:>9} {est.tasks_per_node:>10} "
                     f"{est.cpus_per_task:>9} {minutes // 60:>6}:{minutes % 60:02d} {len(job.deps):>5}")
    longest = max(estimates.values(), key=lambda est: 0.0 if math.isnan(est.hours) else est.hours)
    if longest.hours * 60 * 1.5 + 15 > longest.slurm_minutes(cfg):
        lines.append("a job longer than its time limit checkpoints at the limit (submitit's SIGUSR2), requeues "
                     "itself and resumes")
    return lines


def grid_lines(cfg: PipelineConfig, jobs, estimates) -> list[str]:
    """A sweep's grid: each point with its jobs, the jobs it adds to the points before it (a job shared
    by several points is planned and counted once) and their GPU-hours and training FLOPs."""
    points = grid_points(cfg)
    axes = varying(points)
    if not axes:
        return []
    width = max(len(point_label(point, axes)) for point in points) + 1
    lines = ["", f"sweep grid: {len(points)} points over {', '.join(axes)}; {len(cfg.seeds)} seed(s) each; "
                 f"{len(jobs)} jobs in all",
             f"{'grid point':<{width}} {'jobs':>5} {'new jobs':>8} {'new GPU-hours':>14} {'new train FLOP':>14}"]
    seen: set[str] = set()
    for point in points:
        here = jobs_at(point, jobs)
        new = [job for job in here if job.name not in seen]
        seen.update(job.name for job in new)
        gpu_hours = sum(estimates[job.name].gpu_hours for job in new)
        flops = sum(estimates[job.name].flops for job in new)
        lines.append(f"{point_label(point, axes):<{width}} {len(here):>5} {len(new):>8} {gpu_hours:>14,.0f} "
                     f"{flops:>14.3g}")
    return lines

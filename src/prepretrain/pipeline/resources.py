"""What each job needs and how long it should take: the resources the SLURM executor asks for, the
order the local executor starts jobs in, and the dry run's plan.

Training jobs are priced by the planner (:func:`prepretrain.plan.plan_run`: FLOPs per step, memory
per GPU) times their steps; evaluations by the encoder's forward FLOPs per image times the images
they read. Time = FLOPs / (GPUs x 989 TFLOP/s x ``assumed_mfu``). These are estimates, stated as
such: the images of a set not at hand are assumed (IG-3B for pretraining, ImageNet-1k, Kinetics-400,
COCO), and an evaluation is assumed to add a fixed 3 minutes of start-up and probe fitting.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..config import ConfigError
from ..plan import PlanConfig, plan_config_from, plan_run
from .config import PipelineConfig
from .plan import PRETRAINING_KINDS, TRAINING_KINDS, Job, build_job_config

PEAK_FLOPS = 989e12  # dense bf16 of one H100 SXM, the planner's default
EVALUATION_OVERHEAD_HOURS = 0.05  # start-up, loading, probe fitting: an assumption
MAX_SLURM_MINUTES = 72 * 60  # a longer job requeues itself at its limit and resumes from its checkpoint
# images a job reads when its data is not at hand: IN-1k train, K400 train videos, COCO train2017;
# pretraining IG-3B; an evaluation reads a train split and a 50k held-out split
DATASET_SIZES = {"finetune": 1_281_167, "video": 240_436, "detect": 118_287}
PRETRAINING_IMAGES = 3_000_000_000
HELD_OUT_IMAGES = 50_000


@dataclass
class Estimate:
    """One job's resources and expected run time."""

    gpus: int  # 0: a CPU job
    nodes: int
    gpus_per_node: int
    tasks_per_node: int  # processes per node: one per GPU (torch.distributed), 1 for a CPU job
    cpus_per_task: int
    hours: float  # on those GPUs at the assumed MFU (nan: not priced)
    flops: float = 0.0  # training FLOPs (0: an evaluation)
    steps: int = 0
    memory_gib: float = float("nan")
    fits: str = ""
    model: str = ""

    @property
    def gpu_hours(self) -> float:
        return self.gpus * self.hours if self.gpus and not math.isnan(self.hours) else 0.0

    def slurm_minutes(self, cfg: PipelineConfig) -> int:
        if cfg.slurm_time:
            return cfg.slurm_time
        hours = 0.0 if math.isnan(self.hours) else self.hours
        return min(MAX_SLURM_MINUTES, math.ceil(hours * 60 * 1.5 + 15))


def job_gpus(cfg: PipelineConfig, job: Job) -> int:
    """GPUs a job asks for on a cluster: ``gpus`` for the pretraining stages, ``transfer_gpus`` for
    the transfer trainings, one for an evaluation, none on ``device=cpu``."""
    if cfg.device == "cpu":
        return 0
    if job.kind in PRETRAINING_KINDS:
        return cfg.gpus
    if job.kind in TRAINING_KINDS:
        return cfg.transfer_gpus or cfg.gpus
    return 1


def layout(cfg: PipelineConfig, gpus: int) -> tuple[int, int]:
    """(nodes, GPUs per node) for ``gpus`` GPUs: whole nodes of ``gpus_per_node`` past one node."""
    if gpus <= cfg.gpus_per_node:
        return 1, max(gpus, 0)
    if gpus % cfg.gpus_per_node:
        raise ConfigError("gpus", f"{gpus} GPUs is not a whole number of nodes of gpus_per_node="
                                  f"{cfg.gpus_per_node}")
    return gpus // cfg.gpus_per_node, cfg.gpus_per_node


_PLANS: dict[str, dict[str, Any]] = {}  # repr(PlanConfig) -> plan: a plan depends on its config only


class Estimator:
    """Prices jobs; plans of the same shape are computed once per process (they build meta-device
    models: a sweep over model sizes, or a second dry run, reuses them)."""

    def __init__(self, cfg: PipelineConfig) -> None:
        self.cfg = cfg

    def plan(self, plan_cfg: PlanConfig) -> dict[str, Any]:
        key = repr(plan_cfg)
        if key not in _PLANS:
            _PLANS[key] = plan_run(plan_cfg)
        return _PLANS[key]

    def estimate(self, job: Job) -> Estimate:
        cfg = self.cfg
        gpus = job_gpus(cfg, job)
        nodes, per_node = layout(cfg, gpus)
        base = Estimate(gpus, nodes, per_node, max(per_node, 1), cfg.slurm_cpus_per_task, float("nan"))
        priced_gpus = max(gpus, 1)
        throughput = priced_gpus * PEAK_FLOPS * cfg.assumed_mfu
        if job.kind in TRAINING_KINDS:
            stage_cfg = build_job_config(planned(job))
            strategy = getattr(stage_cfg, "strategy", "auto")
            plan = self.plan(replace(plan_config_from(stage_cfg), gpus=priced_gpus, gpu_memory_gib=cfg.gpu_memory_gib,
                                     strategy="auto" if strategy == "none" or priced_gpus == 1 else strategy))
            steps = steps_of(stage_cfg)
            flops = float(plan["train_flops_per_step"]) * steps
            fits = str(plan.get("fits", "?"))
            if job.kind == "lit":  # the plan trains the whole image tower; LiT keeps it frozen (over-estimate)
                fits = f"<={fits}"
            return replace(base, hours=flops / throughput / 3600, flops=flops, steps=steps,
                           memory_gib=float(plan["total_gib"]), fits=fits, model=getattr(stage_cfg, "model", ""))
        model = str(job.grid.get("model") or cfg.model[0])  # zeroshot's and classify's model= is a run
        forward = self.forward_flops_per_image(model, cfg.image_size)
        images = self.evaluation_images(job)
        return replace(base, hours=forward * images / throughput / 3600 + EVALUATION_OVERHEAD_HOURS, model=model)

    def forward_flops_per_image(self, model: str, image_size: int) -> float:
        try:
            plan = self.plan(PlanConfig(model=model, stage="finetune", gpus=1, batch_size=1, image_size=image_size,
                                        precision="bf16"))
        except (ConfigError, KeyError, ValueError):
            return 0.0
        return float(plan["train_flops_per_step"]) / 3  # forward = a third of forward + backward

    def evaluation_images(self, job: Job) -> int:
        data = str(job.values.get("data", ""))
        if data == "synthetic":
            return int(job.values.get("num_images") or self.cfg.num_images)
        if job.kind == "frozen":
            return DATASET_SIZES["finetune"] + 2 * HELD_OUT_IMAGES  # features of train, val and test
        return HELD_OUT_IMAGES


def planned(job: Job) -> Job:
    """The job with its inputs blanked: a plan needs shapes, not weights (dependencies do not
    exist yet in a dry run), and LiT's plan does not read its tokenizer (a placeholder file)."""
    blank: dict[str, Any] = {k: "" for k in ("init", "encoder") if k in job.values}
    if job.kind == "lit":
        placeholder = Path(tempfile.gettempdir()) / "prepretrain-plan-placeholder.model"
        placeholder.touch()
        blank["tokenizer"] = str(placeholder)
    return Job(job.name, job.kind, {**job.values, **blank}, config_file=job.config_file)


def steps_of(stage_cfg: Any) -> int:
    if getattr(stage_cfg, "steps", 0):
        return int(stage_cfg.steps)
    if stage_cfg.data == "synthetic":
        samples = stage_cfg.num_images
    else:
        samples = int(getattr(stage_cfg, "epoch_size", 0) or 0) or dataset_size_guess(stage_cfg)
    return max(1, math.ceil(stage_cfg.epochs * samples / stage_cfg.batch_size))


def dataset_size_guess(stage_cfg: Any) -> int:
    """Without the data at hand a dry run assumes the paper's sets: IG-3B for pretraining (MAE, WSP,
    LiT), ImageNet-1k's 1.28M training images for finetuning, Kinetics-400's training videos for
    video and COCO train2017 for detection."""
    return DATASET_SIZES.get(getattr(stage_cfg, "stage_name", ""), PRETRAINING_IMAGES)


def estimate_jobs(cfg: PipelineConfig, jobs: list[Job]) -> dict[str, Estimate]:
    estimator = Estimator(cfg)
    return {job.name: estimator.estimate(job) for job in jobs}


def critical_path(jobs: list[Job], hours: dict[str, float]) -> tuple[float, list[str]]:
    """The longest chain of dependent jobs by estimated hours: (its hours, its jobs in order)."""
    best: dict[str, tuple[float, list[str]]] = {}
    for job in jobs:  # plan order: dependencies first
        own = hours.get(job.name, 0.0)
        own = 0.0 if math.isnan(own) else own
        before = max((best[dep] for dep in job.deps if dep in best), key=lambda item: item[0], default=(0.0, []))
        best[job.name] = (before[0] + own, [*before[1], job.name])
    return max(best.values(), key=lambda item: item[0], default=(0.0, []))


def remaining_path_hours(jobs: list[Job], hours: dict[str, float]) -> dict[str, float]:
    """Each job's hours plus the longest chain after it: the local executor starts the job with the
    most work behind it first (critical-path scheduling)."""
    after: dict[str, float] = {}
    readers: dict[str, list[str]] = {}
    for job in jobs:
        for dep in job.deps:
            readers.setdefault(dep, []).append(job.name)
    for job in reversed(jobs):
        own = hours.get(job.name, 0.0)
        own = 0.0 if math.isnan(own) else own
        after[job.name] = own + max((after[reader] for reader in readers.get(job.name, [])), default=0.0)
    return after

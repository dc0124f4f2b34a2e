"""The experiment as a graph of jobs, declared once.

For each seed: MAE; WSP initialised from MAE; the control arm, WSP initialised from an
*untrained* MAE encoder (the MAE's initialisation scheme, no MAE steps); WSP from scratch
(timm's initialisation) with the same WSP budget; LiT on every WSP tower; and for every encoder
(MAE->WSP, MAE init->WSP, WSP, MAE, MAE init, random init) the transfer suite: linear probe, kNN,
low-shot 1/5/10, zero-shot (where a text tower exists), a short finetune, and the benchmarks,
video and detection tasks asked for. The control arm separates what MAE learns (MAE->WSP minus
MAE init->WSP) from how it initialises (MAE init->WSP minus WSP); ``control_arms=false`` leaves
it out. A sweep (lists in ``model``, ``mae_steps``/``mae_epochs``, ``wsp_steps``/``wsp_epochs``) plans
these arms at every grid point; a job shared by several points (the WSP from scratch at one WSP
budget reads no MAE) is planned once.

Each :class:`Job` carries what the report reads (seed, arm, task, set) beside what it runs (its
kind and config values), and a key: a hash of its resolved config and of the keys of the jobs it
reads, so a rerun skips what is done and a change upstream reruns everything downstream.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..config import build_config
from ..evaluate.runner import evaluate_encoder
from ..models.resolve import MAE_INIT
from ..registry import command
from .config import (
    RECIPE_KEYS,
    TASK_STAGES,
    GridPoint,
    PipelineConfig,
    classify_sets,
    eval_sets,
    grid_points,
    recipe_file,
    recipe_overrides,
    stage_data,
)

TRAINING_KINDS = ("mae", "wsp", "lit", "finetune", *TASK_STAGES)  # run on the training loop
PRETRAINING_KINDS = ("mae", "wsp", "lit")  # the pipeline's own stages (``gpus``); the rest is transfer


@dataclass
class Job:
    """One cached unit of work: a training stage or an evaluation, in ``out_dir/<name>``."""

    name: str
    kind: str  # a registry command (mae, wsp, lit, finetune, video, detect, zeroshot, classify) or "frozen"
    values: dict[str, Any]
    deps: list[str] = field(default_factory=list)
    config_file: str = ""
    key: str = ""
    # what the report reads: the seed, the encoder arm it trains or reads (mae_wsp, maeinit_wsp, wsp,
    # mae, mae_init, random), the label task of an evaluation, and the named set ("" = eval_data)
    seed: int = 0
    arm: str = ""
    task: str = ""
    eval_set: str = ""
    # the sweep's values the job depends on (model, mae, wsp budgets: ARM_AXES), e.g. {"model":
    # "vit_micro4", "mae": "200 steps"}; the report places it at every grid point that has them
    grid: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> Job:
        return cls(**values)


# --------------------------------------------------------------------------------- the plan
# The sweep axes each encoder arm depends on: a job lives under the grid values of its arm only, so
# the WSP of the control arm and of the scratch arm is shared by every MAE budget, and an MAE run by
# every WSP budget.
ARM_AXES = {"mae_wsp": ("model", "mae", "wsp"), "maeinit_wsp": ("model", "wsp"), "wsp": ("model", "wsp"),
            "mae": ("model", "mae"), "mae_init": ("model",), "random": ("model",)}


def plan_jobs(cfg: PipelineConfig) -> list[Job]:
    """Every job of the pipeline, dependencies before the jobs that read them: the arms of every grid
    point (:func:`grid_points`) and seed, each job once however many points read it."""
    jobs: dict[str, Job] = {}
    for point in grid_points(cfg):
        for seed in cfg.seeds:
            for job in point_jobs(cfg, point, seed):
                if job.name not in jobs:
                    jobs[job.name] = job
                elif jobs[job.name].values != job.values:  # one path per job: a naming bug, not a user's error
                    raise AssertionError(f"two different jobs named {job.name}")
    by_name = jobs
    for job in jobs.values():
        payload = json.dumps({"kind": job.kind, "values": job.values, "file": _file_text(job.config_file),
                              "deps": [by_name[d].key for d in job.deps if d in by_name]}, sort_keys=True)
        job.key = hashlib.sha256(payload.encode()).hexdigest()[:16]
    return list(jobs.values())


def point_jobs(cfg: PipelineConfig, point: GridPoint, seed: int) -> list[Job]:
    """The jobs of one grid point and seed (some shared with other points: see ``ARM_AXES``)."""
    out = Path(cfg.out_dir)
    model = point.model
    common = {"data": cfg.data, "device": cfg.device, "precision": cfg.precision}
    demo = {"model": model, "image_size": cfg.image_size, "num_images": cfg.num_images,
            "batch_size": cfg.batch_size, "progress": False}
    jobs: list[Job] = []
    eval_data = cfg.eval_data or cfg.data
    zeroshot_files = {"zeroshot_classes": cfg.zeroshot_classes, "zeroshot_templates": cfg.zeroshot_templates}
    sets = eval_sets(cfg)
    recipes = {key: recipe_file(cfg, key, model) for key in RECIPE_KEYS}
    budgets = {"mae": point.mae, "wsp": point.wsp}

    def where(arm: str, rest: str) -> str:
        return f"{point.prefix(*ARM_AXES[arm])}seed{seed}/{rest}"

    def training(kind: str, steps: int, seed: int, name: str, **extra: Any) -> dict[str, Any]:
        recipe = recipes[f"{kind}_config"]
        values = {**common, **({"model": model} if recipe and kind in PRETRAINING_KINDS else {}),
                  **(recipe_overrides(cfg, kind) if recipe else {}), "seed": seed, "out_dir": str(out / name), **extra}
        if not recipe:
            values.update(demo)
            values["steps"] = steps
        if kind in budgets:
            values.update(budgets[kind].overrides())
        if "data" not in extra:  # a named transfer set (eval_sets) says its own
            values["data"] = stage_data(cfg, kind)[1]
        return values

    def frozen_values(encoder: str, task: str, where: str, data: str, seed: int, evaluations: tuple[str, ...]):
        return {"encoder": encoder, "task": task, "evaluations": list(evaluations), "seed": seed,
                "out_dir": str(out / where), "model": model, "image_size": cfg.image_size, **common,
                "data": data, "num_images": cfg.num_images}

    def add(name: str, kind: str, values: dict[str, Any], deps: list[str], recipe: str = "", **about: Any) -> Job:
        job = Job(name, kind, values, [dep for dep in deps if dep], recipe, seed=seed,
                  grid=point.axes(*ARM_AXES[about["arm"]]), **about)
        jobs.append(job)
        return job

    if point.mae.trains:
        mae = where("mae", "mae")
        add(mae, "mae", training("mae", 0, seed, mae), [], recipes["mae_config"], arm="mae")
    wsp_extra = {"eval_every": cfg.eval_every, "eval_images": cfg.wsp_eval_images}
    # arm -> (what init= says, the job it reads): the three WSP arms differ only in their initialisation;
    # at MAE budget 0 the control arm is the MAE->WSP arm of no MAE steps
    wsp_arms = {}
    if point.mae.trains:
        wsp_arms["mae_wsp"] = ("wsp_mae", str(out / mae), mae)
    if cfg.control_arms or not point.mae.trains:
        wsp_arms["maeinit_wsp"] = ("wsp_maeinit", MAE_INIT, "")
    wsp_arms["wsp"] = ("wsp", "", "")
    encoders: dict[str, tuple[str, str]] = {}  # arm -> (what encoder= says, the job it reads: "" untrained)
    for arm, (run, init, source) in wsp_arms.items():
        name = where(arm, run)
        add(name, "wsp", training("wsp", 0, seed, name, init=init, **wsp_extra), [source], recipes["wsp_config"],
            arm=arm)
        encoders[arm] = (str(out / name), name)
    if point.mae.trains:
        encoders["mae"] = (str(out / mae), mae)
    if cfg.control_arms:
        encoders["mae_init"] = (MAE_INIT, "")
    if cfg.random_baseline:
        encoders["random"] = ("", "")
    if "zeroshot" in cfg.evaluations:
        for arm in wsp_arms:
            encoder, source = encoders[arm]
            lit_name = where(arm, f"lit_{arm}")
            lit = add(lit_name, "lit",
                      training("lit", cfg.lit_steps, seed, lit_name, encoder=encoder, model=model,
                               **{k: v for k, v in zeroshot_files.items() if v}),
                      [source], recipes["lit_config"], arm=arm)
            name = where(arm, f"eval/{arm}/zeroshot")
            add(name, "zeroshot", {"model": str(out / lit.name), "out_dir": str(out / name), "data": eval_data,
                                   "task": cfg.tasks[0], "device": cfg.device, "num_images": cfg.num_images,
                                   "classes": cfg.zeroshot_classes, "templates": cfg.zeroshot_templates},
                [lit.name], arm=arm, task=cfg.tasks[0])
            for set_name, path in sets.items():  # the set's own class names and label task
                name = where(arm, f"eval/{arm}/sets/{set_name}/zeroshot")
                add(name, "zeroshot", {"model": str(out / lit.name), "out_dir": str(out / name), "data": path,
                                       "split": "val", "device": cfg.device, "num_images": cfg.num_images,
                                       "templates": cfg.zeroshot_templates},
                    [lit.name], arm=arm, task="auto", eval_set=set_name)
    frozen = tuple(e for e in ("probe", "knn", "lowshot") if e in cfg.evaluations)
    for arm, (encoder, source) in encoders.items():
        # a finetune from the untrained MAE init asks the random baseline's question again (measured:
        # 12.3 vs 10.9); its frozen rows are what tell what MAE learned
        finetunes = "finetune" in cfg.evaluations and arm != "mae_init"
        for task in cfg.tasks if frozen else ():
            name = where(arm, f"eval/{arm}/{task}")
            add(name, "frozen", frozen_values(encoder, task, name, eval_data, seed, frozen), [source],
                arm=arm, task=task)
        for set_name, path in sets.items():
            name = where(arm, f"eval/{arm}/sets/{set_name}")
            if frozen:
                add(f"{name}/label", "frozen", frozen_values(encoder, "auto", f"{name}/label", path, seed, frozen),
                    [source], arm=arm, task="auto", eval_set=set_name)
            if finetunes:
                add(f"{name}/finetune", "finetune",
                    training("finetune", cfg.finetune_steps, seed, f"{name}/finetune", encoder=encoder,
                             task="auto", data=path),
                    [source], recipes["finetune_config"], arm=arm, task="auto", eval_set=set_name)
        if finetunes:
            name = where(arm, f"eval/{arm}/finetune")
            finetune = add(name, "finetune",
                           training("finetune", cfg.finetune_steps, seed, name, encoder=encoder,
                                    task=cfg.tasks[0], data=eval_data),
                           [source], recipes["finetune_config"], arm=arm, task=cfg.tasks[0])
            for bench in classify_sets(cfg):
                name = where(arm, f"eval/{arm}/classify_{bench.name}")
                add(name, "classify", {
                    "model": str(out / finetune.name), "data": bench.path, "split": bench.split,
                    "real_labels": "builtin" if bench.real else "", "out_dir": str(out / name),
                    "num_images": cfg.num_images, "device": cfg.device, "precision": cfg.precision,
                    "num_workers": 0, "progress": False}, [finetune.name], arm=arm, eval_set=bench.name)
        for kind in (k for k in TASK_STAGES if k in cfg.evaluations):
            name = where(arm, f"eval/{arm}/{kind}")
            values, recipe = task_stage_values(cfg, kind, seed, name, encoder, model)
            add(name, kind, values, [source], recipe, arm=arm)
    return jobs


def task_stage_values(cfg: PipelineConfig, kind: str, seed: int, name: str, encoder: str,
                      model: str) -> tuple[dict, str]:
    """A ``video`` / ``detect`` job's values and recipe file: the stage's own defaults (or its recipe)
    with the pipeline's encoder, seed and device (and model, without a recipe); only the demo budget
    is set here, when asked."""
    data_key, recipe_key, steps_key = TASK_STAGES[kind]
    recipe = recipe_file(cfg, recipe_key, model)
    values: dict[str, Any] = {"data": getattr(cfg, data_key), "encoder": encoder, "seed": seed,
                              "out_dir": str(Path(cfg.out_dir) / name), "device": cfg.device,
                              "precision": cfg.precision}
    if recipe:  # the recipe's model (the random-init baseline's architecture), as for finetuning
        values.update(recipe_overrides(cfg, kind))
    else:
        values.update({"model": model, "progress": False})
        if getattr(cfg, steps_key):
            values["steps"] = getattr(cfg, steps_key)
    return values, recipe


def _file_text(path: str) -> str:
    return Path(path).read_text() if path else ""


def build_job_config(job: Job) -> Any:
    """The job's stage config (validated), or None for the frozen evaluations (built when they run)."""
    if job.kind == "frozen":
        return None
    return build_config(command(job.kind).config, job.config_file or None, dict(job.values))


def run_job(job: Job) -> dict[str, Any]:
    """Run one job in this process and return its results (the worker calls this)."""
    if job.kind == "frozen":
        values = dict(job.values)
        evaluations = tuple(values.pop("evaluations"))
        out_dir = Path(values.pop("out_dir"))  # each evaluation writes to out_dir/<evaluation>
        return evaluate_encoder(values.pop("encoder"), out_dir, evaluations, overrides=values)
    return command(job.kind).run(build_job_config(job))


def training_flops_per_sample(job: Job) -> float:
    """Training FLOPs per sample of a training job's stage (0 when unknown)."""
    stage_cls = command(job.kind).stage if job.kind != "frozen" else None
    if stage_cls is None:
        return 0.0
    try:
        return stage_cls(build_job_config(job)).flops_per_sample()
    except Exception:  # noqa: BLE001 - the FLOPs plot leaves out what it cannot price
        return 0.0


def downstream(jobs: list[Job], failed: str) -> list[str]:
    """Every job that reads ``failed``'s output, directly or through others, in plan order."""
    hit = {failed}
    for job in jobs:  # plan order: dependencies come first
        if any(dep in hit for dep in job.deps):
            hit.add(job.name)
    return [job.name for job in jobs if job.name in hit and job.name != failed]

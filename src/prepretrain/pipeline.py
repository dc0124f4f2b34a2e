"""``prepretrain pipeline``: MAE -> WSP -> transfer beside the baselines, over seeds, with a report.

For each seed the pipeline runs: MAE; WSP initialised from MAE; the control arm, WSP initialised
from an *untrained* MAE encoder (the MAE's initialisation scheme, no MAE steps); WSP from scratch
(timm's initialisation) with the same WSP budget; LiT on every WSP tower; and for every encoder
(MAE->WSP, MAE init->WSP, WSP, MAE, MAE init, random init) the transfer suite: linear probe, kNN,
low-shot 1/5/10, zero-shot (where a text tower exists) and a short finetune. The control arm
separates what MAE learns (MAE->WSP minus MAE init->WSP) from how it initialises (MAE init->WSP
minus WSP); ``control_arms=false`` leaves it out. Each job is cached by a hash of its resolved
config (and of the jobs it reads), so a rerun skips what is done and an interrupted pipeline
resumes where it stopped (training stages also resume mid-run from their checkpoints).

Data: ``data`` feeds pretraining unless a stage has its own (``mae_data``, ``wsp_data``,
``lit_data``); ``eval_data`` feeds the transfer suite (empty = ``data``). Before any job runs,
:func:`pre_flight` opens every source the plan reads and stops with a ``ConfigError`` naming the
pipeline key and the path when one is missing or lacks what its jobs need (a task's labels).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .config import ConfigError, build_config, config_to_dict, dump_config, read_yaml
from .data.loader import open_data, open_source
from .evaluate.common import open_eval_data
from .evaluate.runner import evaluate_encoder
from .evaluate.zeroshot import (
    CLASS_SETS,
    TEMPLATE_SETS,
    ZeroShotConfig,
    check_names_file,
    read_class_names,
    source_classes,
)
from .files import write_json, write_text
from .models.resolve import MAE_INIT
from .pipeline_report import write_pipeline_report
from .plan import plan_config_from, plan_run
from .registry import command


@dataclass
class PipelineConfig:
    """The whole experiment. Defaults: the CPU demo on the synthetic dataset (about 15 min on 2 cores)."""

    stage_name = "pipeline"
    out_dir: str = "runs/pipeline"
    seeds: tuple[int, ...] = (0, 1)
    data: str = "synthetic"  # pretraining images (MAE, WSP, LiT captions)
    mae_data: str = ""  # MAE's images; empty = data
    wsp_data: str = ""  # WSP's images with hashtags; empty = data
    lit_data: str = ""  # LiT's image-caption pairs; empty = data
    eval_data: str = ""  # transfer datasets (labelled splits); empty = data
    # more transfer sets, NAME=PATH (e.g. inat=/data/inat2018,food=/data/food-101): each gets the frozen
    # evaluations, zero-shot and finetuning of eval_data, on its own label task, as rows "NAME: ..."
    eval_sets: tuple[str, ...] = ()
    num_images: int = 2000
    model: str = "vit_micro4"
    image_size: int = 32
    device: str = "auto"
    precision: str = "auto"
    # budgets of the CPU demo (optimizer steps); ignored for a stage given a recipe file
    mae_steps: int = 200
    wsp_steps: int = 150
    lit_steps: int = 40
    finetune_steps: int = 30
    batch_size: int = 64
    eval_every: int = 25  # WSP evaluation interval: the convergence curves
    wsp_eval_images: int = 200  # held-out images scored at each WSP evaluation
    # paper-scale recipes (configs/*.yaml); the pipeline then only sets data, seed and out_dir
    mae_config: str = ""
    wsp_config: str = ""
    lit_config: str = ""
    finetune_config: str = ""
    # key=value applied on top of every recipe file ("steps=20"), or of one stage's ("lit.text_model=
    # text_micro"): a rehearsal of the paper recipes with a small model and budget, nothing else changed
    recipe_overrides: tuple[str, ...] = ()
    evaluations: tuple[str, ...] = ("probe", "knn", "lowshot", "zeroshot", "finetune")  # + video, detect
    # benchmarks every finetuned model is scored on without more training (prepretrain classify, classes
    # matched by id): NAME=PATH[@SPLIT][+real], e.g. v2=/data/imagenetv2-matched-frequency-format-val,
    # real=/data/imagenet@val+real (ReaL with timm's labels), objectnet=/data/objectnet-1.0
    classify_sets: tuple[str, ...] = ()
    tasks: tuple[str, ...] = ("coarse", "fine")
    # the video and detection tasks (in evaluations): their own data ("synthetic": the stage's
    # embedded set), recipe files, and demo budgets (0 = the stage's default steps)
    video_data: str = "synthetic"
    detect_data: str = "synthetic"
    video_config: str = ""
    detect_config: str = ""
    video_steps: int = 0
    detect_steps: int = 0
    # zero-shot class names and templates: a file, or a shipped set (classes: imagenet1k; templates:
    # prepretrain | openai80); empty = the data's own names (WordNet-id folders become words) / prepretrain
    zeroshot_classes: str = ""
    zeroshot_templates: str = ""
    random_baseline: bool = True
    # the control arm: WSP (and the frozen evaluations) from the MAE's initialisation without MAE
    # training, so the report can tell what MAE learns from how it initialises
    control_arms: bool = True
    # --dry-run estimates
    gpus: int = 8
    gpu_memory_gib: float = 80.0
    assumed_mfu: float = 0.3

    # Every numeric key this class defines, with its interval (config.check_bounds).
    bounds = {
        "num_images": "> 0", "image_size": "> 0", "mae_steps": "> 0", "wsp_steps": "> 0", "lit_steps": "> 0",
        "finetune_steps": "> 0", "batch_size": "> 0", "eval_every": ">= 0", "wsp_eval_images": ">= 0",
        "video_steps": ">= 0", "detect_steps": ">= 0", "gpus": "> 0", "gpu_memory_gib": "> 0",
        "assumed_mfu": "(0, 1]",
    }

    def validate(self) -> None:
        if not self.seeds:
            raise ConfigError("seeds", "give at least one seed")
        known = {"probe", "knn", "lowshot", "zeroshot", "finetune", *TASK_STAGES}
        unknown = set(self.evaluations) - known
        if unknown:
            raise ConfigError("evaluations", f"unknown {sorted(unknown)}; known: {sorted(known)}")
        for key in ("mae_config", "wsp_config", "lit_config", "finetune_config", "video_config", "detect_config"):
            if getattr(self, key) and not Path(getattr(self, key)).exists():
                raise ConfigError(key, f"file not found: {getattr(self, key)}")
        recipe_overrides(self, "mae")  # malformed entries name the key now
        classify_sets(self)
        eval_sets(self)
        check_names_file("zeroshot_classes", self.zeroshot_classes, CLASS_SETS)
        check_names_file("zeroshot_templates", self.zeroshot_templates, TEMPLATE_SETS)


@dataclass(frozen=True)
class ClassifySet:
    """One ``classify_sets`` entry: a named benchmark a finetuned model is scored on."""

    name: str
    path: str
    split: str = "val"
    real: bool = False  # also ImageNet-ReaL top-1 (timm's real.json)


def classify_sets(cfg: PipelineConfig) -> list[ClassifySet]:
    """The parsed ``classify_sets`` (``NAME=PATH[@SPLIT][+real]``); a malformed entry is a ConfigError."""
    found: list[ClassifySet] = []
    for entry in cfg.classify_sets:
        name, sep, rest = str(entry).partition("=")
        real = rest.endswith("+real")
        rest = rest.removesuffix("+real")
        path, at, split = rest.rpartition("@") if "@" in rest else (rest, "", "val")
        if not sep or not name.strip() or not path.strip() or "/" in name or not split:
            raise ConfigError("classify_sets", f"expected NAME=PATH[@SPLIT][+real], got '{entry}'")
        if any(other.name == name.strip() for other in found):
            raise ConfigError("classify_sets", f"the name '{name.strip()}' is used twice")
        found.append(ClassifySet(name.strip(), path.strip(), split.strip(), real))
    if found and "finetune" not in cfg.evaluations:
        raise ConfigError("classify_sets", "scores the finetuned models: add finetune to evaluations")
    return found


def eval_sets(cfg: PipelineConfig) -> dict[str, str]:
    """The parsed ``eval_sets`` (``NAME=PATH``, names unique); a malformed entry is a ConfigError."""
    found: dict[str, str] = {}
    for entry in cfg.eval_sets:
        name, sep, path = (part.strip() for part in str(entry).partition("="))
        if not sep or not name or not path or not name.replace("_", "").replace("-", "").isalnum():
            raise ConfigError("eval_sets", f"expected NAME=PATH with a name of letters, digits, - or _; got '{entry}'")
        if name in found:
            raise ConfigError("eval_sets", f"the name '{name}' is used twice")
        found[name] = path
    return found


@dataclass
class Job:
    """One cached unit of work: a training stage or an evaluation, in ``out_dir/<name>``."""

    name: str
    kind: str
    values: dict[str, Any]
    deps: list[str] = field(default_factory=list)
    config_file: str = ""
    key: str = ""


# --------------------------------------------------------------------------------- the plan
def plan_jobs(cfg: PipelineConfig) -> list[Job]:
    """Every job of the pipeline in the order it runs (dependencies first)."""
    out = Path(cfg.out_dir)
    common = {"data": cfg.data, "device": cfg.device, "precision": cfg.precision}
    demo = {"model": cfg.model, "image_size": cfg.image_size, "num_images": cfg.num_images,
            "batch_size": cfg.batch_size, "progress": False}
    jobs: list[Job] = []
    eval_data = cfg.eval_data or cfg.data
    zeroshot_files = {"zeroshot_classes": cfg.zeroshot_classes, "zeroshot_templates": cfg.zeroshot_templates}

    def train_values(kind: str, steps: int, recipe: str, seed: int, name: str, **extra: Any) -> Job:
        values = {**common, **(recipe_overrides(cfg, kind) if recipe else {}), "seed": seed,
                  "out_dir": str(out / name), **extra}
        if not recipe:
            values.update(demo)
            values["steps"] = steps
        if "data" not in extra:  # a named transfer set (eval_sets) says its own
            values["data"] = stage_data(cfg, kind)[1]
        return Job(name, kind, values, config_file=recipe)

    for seed in cfg.seeds:
        s = f"seed{seed}"
        jobs.append(train_values("mae", cfg.mae_steps, cfg.mae_config, seed, f"{s}/mae"))
        wsp_extra = {"eval_every": cfg.eval_every, "eval_images": cfg.wsp_eval_images}
        job = train_values("wsp", cfg.wsp_steps, cfg.wsp_config, seed, f"{s}/wsp_mae",
                           init=str(out / f"{s}/mae"), **wsp_extra)
        job.deps = [f"{s}/mae"]
        jobs.append(job)
        if cfg.control_arms:
            jobs.append(train_values("wsp", cfg.wsp_steps, cfg.wsp_config, seed, f"{s}/wsp_maeinit", init=MAE_INIT,
                                     **wsp_extra))
        jobs.append(train_values("wsp", cfg.wsp_steps, cfg.wsp_config, seed, f"{s}/wsp", init="", **wsp_extra))
        # label -> (what encoder= says, the job it reads: "" for an untrained encoder)
        encoders = {"mae_wsp": (str(out / f"{s}/wsp_mae"), f"{s}/wsp_mae")}
        if cfg.control_arms:
            encoders["maeinit_wsp"] = (str(out / f"{s}/wsp_maeinit"), f"{s}/wsp_maeinit")
        encoders["wsp"] = (str(out / f"{s}/wsp"), f"{s}/wsp")
        encoders["mae"] = (str(out / f"{s}/mae"), f"{s}/mae")
        if cfg.control_arms:
            encoders["mae_init"] = (MAE_INIT, "")
        if cfg.random_baseline:
            encoders["random"] = ("", "")
        if "zeroshot" in cfg.evaluations:
            for label in (label for label in ("mae_wsp", "maeinit_wsp", "wsp") if label in encoders):
                encoder, source = encoders[label]
                lit = train_values("lit", cfg.lit_steps, cfg.lit_config, seed, f"{s}/lit_{label}",
                                   encoder=encoder, model=cfg.model,
                                   **{k: v for k, v in zeroshot_files.items() if v})
                lit.deps = [source]
                jobs.append(lit)
                zs = Job(f"{s}/eval/{label}/zeroshot", "zeroshot",
                         {"model": str(out / f"{s}/lit_{label}"), "out_dir": str(out / f"{s}/eval/{label}/zeroshot"),
                          "data": eval_data, "task": cfg.tasks[0], "device": cfg.device,
                          "num_images": cfg.num_images, "classes": cfg.zeroshot_classes,
                          "templates": cfg.zeroshot_templates},
                         deps=[f"{s}/lit_{label}"])
                jobs.append(zs)
                for set_name, path in eval_sets(cfg).items():  # the set's own class names and label task
                    name = f"{s}/eval/{label}/sets/{set_name}/zeroshot"
                    jobs.append(Job(name, "zeroshot", {
                        "model": str(out / f"{s}/lit_{label}"), "out_dir": str(out / name), "data": path,
                        "split": "val", "device": cfg.device, "num_images": cfg.num_images,
                        "templates": cfg.zeroshot_templates}, deps=[f"{s}/lit_{label}"]))
        frozen = tuple(e for e in ("probe", "knn", "lowshot") if e in cfg.evaluations)
        for label, (encoder, source) in encoders.items():
            for task in cfg.tasks:
                if frozen:
                    jobs.append(Job(f"{s}/eval/{label}/{task}", "frozen",
                                    {"encoder": encoder, "task": task, "evaluations": list(frozen), "seed": seed,
                                     "out_dir": str(out / f"{s}/eval/{label}/{task}"),
                                     "model": cfg.model, "image_size": cfg.image_size, **common,
                                     "data": eval_data, "num_images": cfg.num_images},
                                    deps=[source] if source else []))
            for set_name, path in eval_sets(cfg).items():
                where = f"{s}/eval/{label}/sets/{set_name}"
                if frozen:
                    jobs.append(Job(f"{where}/label", "frozen",
                                    {"encoder": encoder, "task": "auto", "evaluations": list(frozen), "seed": seed,
                                     "out_dir": str(out / where / "label"), "model": cfg.model,
                                     "image_size": cfg.image_size, **common, "data": path,
                                     "num_images": cfg.num_images}, deps=[source] if source else []))
                if "finetune" in cfg.evaluations and label != "mae_init":
                    job = train_values("finetune", cfg.finetune_steps, cfg.finetune_config, seed,
                                       f"{where}/finetune", encoder=encoder, task="auto", data=path)
                    job.deps = [source] if source else []
                    jobs.append(job)
            if "finetune" in cfg.evaluations and label != "mae_init":  # its frozen rows tell what MAE learned;
                # a finetune from it asks the random baseline's question again (measured: 12.3 vs 10.9)
                job = train_values("finetune", cfg.finetune_steps, cfg.finetune_config, seed,
                                   f"{s}/eval/{label}/finetune", encoder=encoder, task=cfg.tasks[0],
                                   data=eval_data)
                job.deps = [source] if source else []
                jobs.append(job)
                for bench in classify_sets(cfg):
                    name = f"{s}/eval/{label}/classify_{bench.name}"
                    jobs.append(Job(name, "classify", {
                        "model": str(out / job.name), "data": bench.path, "split": bench.split,
                        "real_labels": "builtin" if bench.real else "", "out_dir": str(out / name),
                        "num_images": cfg.num_images, "device": cfg.device, "precision": cfg.precision,
                        "num_workers": 0, "progress": False}, deps=[job.name]))
            for kind in (k for k in TASK_STAGES if k in cfg.evaluations):
                jobs.append(task_stage_job(cfg, kind, seed, f"{s}/eval/{label}/{kind}", encoder, source))
    by_name = {job.name: job for job in jobs}
    for job in jobs:
        payload = json.dumps({"kind": job.kind, "values": job.values, "file": _file_text(job.config_file),
                              "deps": [by_name[d].key for d in job.deps if d in by_name]}, sort_keys=True)
        job.key = hashlib.sha256(payload.encode()).hexdigest()[:16]
    return jobs


# Transfer tasks that train a stage of their own on their own data (video clips, detection):
# pipeline kind -> (data key, recipe key, demo steps key). Each runs once per encoder.
TASK_STAGES = {"video": ("video_data", "video_config", "video_steps"),
               "detect": ("detect_data", "detect_config", "detect_steps")}


def task_stage_job(cfg: PipelineConfig, kind: str, seed: int, name: str, encoder: str, source: str) -> Job:
    """A ``video`` / ``detect`` job: the stage's own defaults (or its recipe) with the pipeline's
    encoder, seed and device (and model, without a recipe); only the demo budget is set here, when asked."""
    data_key, recipe_key, steps_key = TASK_STAGES[kind]
    recipe = getattr(cfg, recipe_key)
    values: dict[str, Any] = {"data": getattr(cfg, data_key), "encoder": encoder, "seed": seed,
                              "out_dir": str(Path(cfg.out_dir) / name), "device": cfg.device,
                              "precision": cfg.precision}
    if recipe:  # the recipe's model (the random-init baseline's architecture), as for finetuning
        values.update(recipe_overrides(cfg, kind))
    else:
        values.update({"model": cfg.model, "progress": False})
        if getattr(cfg, steps_key):
            values["steps"] = getattr(cfg, steps_key)
    return Job(name, kind, values, deps=[source] if source else [], config_file=recipe)


RECIPE_STAGES = ("mae", "wsp", "lit", "finetune", *TASK_STAGES)
RECIPE_KEYS = tuple(f"{stage}_config" for stage in RECIPE_STAGES)


def recipe_overrides(cfg: PipelineConfig, kind: str) -> dict[str, str]:
    """The ``recipe_overrides`` entries that apply to a ``kind`` job: ``key=value`` for every
    stage, ``kind.key=value`` for that one (the later entry wins)."""
    values: dict[str, str] = {}
    for entry in cfg.recipe_overrides:
        key, sep, value = str(entry).partition("=")
        if not sep or not key.strip():
            raise ConfigError("recipe_overrides", f"expected key=value or stage.key=value, got '{entry}'")
        stage, dot, name = key.strip().rpartition(".")
        if dot and stage not in RECIPE_STAGES:
            raise ConfigError("recipe_overrides", f"'{entry}': unknown stage '{stage}' (one of "
                                                  f"{', '.join(RECIPE_STAGES)})")
        if not dot or stage == kind:
            values[name] = value.strip()
    return values


def stage_data(cfg: PipelineConfig, kind: str) -> tuple[str, str]:
    """(pipeline key, data) a job of ``kind`` reads: its own key when set, else ``data``."""
    if kind in TASK_STAGES:
        key = TASK_STAGES[kind][0]
        return key, getattr(cfg, key)
    key = {"mae": "mae_data", "wsp": "wsp_data", "lit": "lit_data"}.get(kind, "eval_data")
    return (key, getattr(cfg, key)) if getattr(cfg, key) else ("data", cfg.data)


# ------------------------------------------------------------------------------ rehearsal
# What a rehearsal changes in a paper pipeline: the model's size, the budgets and the hardware.
# Every other value of every recipe (optimizer, schedule shape, loss, vocabulary rules, crops,
# the data layouts and the evaluation protocol) runs as written.
REHEARSAL_OVERRIDES = (
    "model=vit_micro4", "image_size=32", "batch_size=32", "micro_batch_size=0", "num_workers=0",
    "strategy=none", "log_every=5", "ckpt_every=1000", "eval_every=0", "progress=false",
    "mae.decoder_embed_dim=64", "mae.decoder_depth=1", "mae.decoder_num_heads=4",
    "wsp.eval_images=200",
    # LiT: a small text tower with the byte tokenizer (no SentencePiece file needed); micro-batches
    # of 8 keep the recipe's accumulation over one global contrastive batch in the rehearsal
    "lit.text_model=text_micro", "lit.tokenizer=", "lit.embed_dim=64", "lit.micro_batch_size=8",
    "lit.max_text_tokens=60",
)


def rehearsal_config(paper_config: str | Path, data: str, eval_data: str, out_dir: str, steps: int = 4,
                     seeds: tuple[int, ...] = (0,)) -> dict[str, Any]:
    """A paper pipeline config (``configs/pipeline_vit_*.yaml``) pointed at rehearsal data, with
    only the model size, budgets (``steps`` per training stage) and hardware overridden; recipe
    paths made absolute so the result runs from anywhere. Returns the values of a pipeline YAML."""
    paper = Path(paper_config)
    values = read_yaml(paper) or {}
    if not isinstance(values, dict) or values.get("stage", "pipeline") != "pipeline":
        raise ConfigError(str(paper), "not a pipeline config (stage: pipeline)")
    for key in RECIPE_KEYS:
        recipe = values.get(key)
        if recipe and not Path(recipe).is_file():
            beside = paper.resolve().parent.parent / recipe  # recipes are named from the repository root
            if not beside.is_file():
                raise ConfigError(key, f"{recipe}: recipe file not found (from {paper})")
            recipe = beside
        if recipe:
            values[key] = str(Path(recipe).resolve())
    values.update({"model": "vit_micro4", "image_size": 32, "out_dir": out_dir, "data": data, "eval_data": eval_data,
                   "seeds": list(seeds), "device": "cpu", "precision": "fp32", "tasks": ["label"], "mae_data": "",
                   "wsp_data": "", "lit_data": ""})
    values["recipe_overrides"] = [*REHEARSAL_OVERRIDES, f"steps={steps}"]
    build_config(PipelineConfig, None, {k: v for k, v in values.items() if k != "stage"})  # valid as written
    return values


# ------------------------------------------------------------------------------ pre-flight
@dataclass
class DataCheck:
    """One data source of the plan, as :func:`pre_flight` opened it."""

    key: str  # the pipeline key it comes from
    path: str
    task: str = ""  # evaluation sources: the label task the jobs read
    sizes: dict[str, int] = field(default_factory=dict)  # split/role -> images (shards: "shards" -> files)
    num_classes: int = 0
    zeroshot: bool = False  # zero-shot jobs read it: its classes need names
    error: str = ""

    def describe(self) -> str:
        task = (f" ({self.task})" if self.task in TASK_STAGES else f" split={self.task.split('@', 1)[1]}"
                if self.task.startswith("classify@") else f" task={self.task}" if self.task else "")
        where = f"{self.key}={self.path}{task}"
        if self.error:
            return f"{where}: NOT USABLE: {self.error}"
        sizes = ", ".join(f"{role} {count:,}" for role, count in self.sizes.items()) or "generated by the stage"
        classes = f", {self.num_classes} classes" if self.num_classes else ""
        return f"{where}: {sizes}{classes}"


def planned_sources(cfg: PipelineConfig, jobs: list[Job]) -> list[DataCheck]:
    """Every (pipeline key, data, task) the jobs read, once each, in plan order."""
    seen: dict[tuple[str, str, str], DataCheck] = {}
    named = {path: f"eval_sets[{name}]" for name, path in eval_sets(cfg).items()}
    for job in jobs:
        data = job.values.get("data", "")
        if "/sets/" in job.name:  # a named transfer set: its own key, its own label task and class names
            entry = (named[data], data, "auto")
        elif job.kind in ("mae", "wsp", "lit"):
            entry = (stage_data(cfg, job.kind)[0], data, "")
        elif job.kind in TASK_STAGES:
            entry = (stage_data(cfg, job.kind)[0], data, job.kind)
        elif job.kind == "zeroshot":
            entry = (stage_data(cfg, "eval")[0], data, job.values.get("task") or ZeroShotConfig.task)
        elif job.kind == "classify":
            entry = ("classify_sets", data, f"classify@{job.values['split']}")
        else:  # frozen evaluations and finetuning
            entry = (stage_data(cfg, "eval")[0], data, job.values["task"])
        check = seen.setdefault(entry, DataCheck(*entry))
        check.zeroshot = check.zeroshot or job.kind == "zeroshot"
    return list(seen.values())


def pre_flight(cfg: PipelineConfig, jobs: list[Job] | None = None, strict: bool = True) -> list[DataCheck]:
    """Open every data source the plan reads: pretraining sources with ``open_data`` (train split),
    evaluation sources with ``open_eval_data`` per label task. ``strict``: the first unusable
    source raises a ``ConfigError`` naming its pipeline key and path; otherwise it is returned
    with ``error`` set (a dry run plans without the data at hand)."""
    checks = planned_sources(cfg, plan_jobs(cfg) if jobs is None else jobs)
    for check in checks:
        try:
            _open_check(cfg, check)
        except (ConfigError, OSError, ValueError, KeyError) as error:
            message = str(error)
            if isinstance(error, ConfigError):  # the stage's own key means nothing at pipeline level
                message = message.removeprefix(f"config key '{error.key}': ")
            check.error = message
            if strict:
                raise ConfigError(check.key, f"{check.path}: {message}") from None
    return checks


def _open_check(cfg: PipelineConfig, check: DataCheck) -> None:
    if check.task in TASK_STAGES:  # the stage opens its own data (annotations, splits) when built
        if check.path == "synthetic":
            return  # generated by the stage itself
        recipe_key = TASK_STAGES[check.task][1]
        stage_cls = command(check.task).stage
        probe = Job("pre-flight", check.task, {"data": check.path, "encoder": "", "device": "cpu"},
                    config_file=getattr(cfg, recipe_key))
        stage = stage_cls(build_job_config(probe))
        check.sizes = dict(getattr(stage, "data_sizes", dict)())
        return
    if check.task.startswith("classify@"):  # a benchmark a finetuned model is scored on: labelled, not empty
        split = check.task.split("@", 1)[1]
        if check.path == "synthetic":
            source = open_data("synthetic", split=split, image_size=cfg.image_size, num_images=cfg.num_images)
        else:
            source = open_source(check.path, split=split)
        if not len(source) or not getattr(source, "class_names", None):
            raise ValueError(f"the {split} split has {'no labels' if len(source) else 'no images'}")
        check.sizes = {split: len(source)}
        check.num_classes = max(len(names) for names in source.class_names.values())
        return
    if check.task:
        data = open_eval_data(check.path, check.task, cfg.image_size, cfg.num_images)
        check.sizes = {role: len(data.sources[role]) for role in ("train", "val", "test")}
        check.num_classes = data.num_classes
        for role, count in check.sizes.items():
            if count == 0:
                raise ValueError(f"the {data.split_names[role]} split has no images")
        if check.zeroshot:
            own_names = check.key.startswith("eval_sets") or not cfg.zeroshot_classes
            classes = (source_classes(data.sources["test"], data.task) if own_names
                       else read_class_names(cfg.zeroshot_classes, check.task))
            if len(classes) != data.num_classes:
                raise ValueError(f"zero-shot has {len(classes)} class names for the {data.num_classes} classes of "
                                 f"task {check.task!r} (zeroshot_classes={cfg.zeroshot_classes or 'the data'})")
        return
    source = open_data(check.path, split="train", image_size=cfg.image_size, num_images=cfg.num_images)
    urls = getattr(source, "urls", None)
    if urls is not None:  # shards: their files, not a count (that could read every tar header)
        local = [url for url in urls if "://" not in url and not url.startswith("pipe:")]
        missing = [url for url in local if not Path(url).is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} of {len(urls)} shards not found, e.g. {missing[0]}")
        check.sizes = {"shards": len(urls)}
        return
    check.sizes = {"train": len(source)}
    if not check.sizes["train"]:
        raise ValueError("no images found")


def _file_text(path: str) -> str:
    return Path(path).read_text() if path else ""


def build_job_config(job: Job) -> Any:
    if job.kind == "frozen":
        return None
    return build_config(command(job.kind).config, job.config_file or None, {k: v for k, v in job.values.items()})


def training_flops_per_sample(job: Job) -> float:
    """Training FLOPs per sample of a training job's stage (0 when unknown)."""
    stage_cls = command(job.kind).stage if job.kind != "frozen" else None
    if stage_cls is None:
        return 0.0
    try:
        return stage_cls(build_job_config(job)).flops_per_sample()
    except Exception:  # noqa: BLE001 - the FLOPs plot leaves out what it cannot price
        return 0.0


# ------------------------------------------------------------------------------- running
def run_job(job: Job) -> dict[str, Any]:
    if job.kind == "frozen":
        values = dict(job.values)
        evaluations = tuple(values.pop("evaluations"))
        out_dir = Path(values.pop("out_dir"))  # each evaluation writes to out_dir/<evaluation>
        return evaluate_encoder(values.pop("encoder"), out_dir, evaluations, overrides=values)
    return command(job.kind).run(build_job_config(job))


def run_pipeline(cfg: PipelineConfig) -> dict[str, Any]:
    """Check every data source (:func:`pre_flight`), run every job not already done with the same
    key, then write the report."""
    jobs = plan_jobs(cfg)
    for check in pre_flight(cfg, jobs):
        print(f"[pipeline] data {check.describe()}", flush=True)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "pipeline.yaml", dump_config(cfg))
    for job in jobs:
        if not job.deps:
            build_job_config(job)  # config mistakes surface before any compute (jobs reading others: at their turn)
    results: dict[str, Any] = {}
    start = time.perf_counter()
    ran: list[float] = []
    for index, job in enumerate(jobs, 1):
        job_dir = out / job.name
        marker = job_dir / "pipeline_job.json"
        if marker.exists():
            saved = json.loads(marker.read_text())
            if saved.get("key") == job.key:
                results[job.name] = saved["results"]
                print(f"[pipeline {index}/{len(jobs)}] {job.name}: cached", flush=True)
                continue
        set_aside_if_stale(out, job)
        remaining = len(jobs) - index + 1
        eta = f", ETA ~{_clock(remaining * sum(ran) / len(ran))}" if ran else ""
        print(f"[pipeline {index}/{len(jobs)}] {job.name} ({job.kind}); elapsed {_clock(time.perf_counter() - start)}"
              f"{eta}", flush=True)
        job_start = time.perf_counter()
        job_dir.mkdir(parents=True, exist_ok=True)
        write_text(job_dir / STARTED_FILE, job.key)  # what a checkpoint here was trained for
        result = run_job(job)
        ran.append(time.perf_counter() - job_start)
        results[job.name] = _jsonable(result)
        write_json(marker, {"key": job.key, "kind": job.kind, "values": job.values, "seconds": ran[-1],
                            "results": results[job.name]})
    write_json(out / "results.json", results)
    flops = {job.name: training_flops_per_sample(job) for job in jobs if job.kind in ("mae", "wsp")}
    md, html = write_pipeline_report(cfg, jobs, results, flops)
    print(f"[pipeline] done in {_clock(time.perf_counter() - start)}; report: {md} and {html}", flush=True)
    return results


STARTED_FILE = "pipeline_job.started"  # the key of the job whose run began in this directory


def set_aside_if_stale(out: Path, job: Job) -> Path | None:
    """Move ``job``'s directory to ``out/.replaced/`` when it holds another configuration's run
    (a finished one, or an interrupted one) and return where it went. Otherwise the stage would
    resume from that run's checkpoints and report the old configuration's results as the new
    one's (an MAE changed upstream, and its WSP "resumed" at its last step). An interrupted run
    of the same job stays, so it resumes mid-run; nothing finished is deleted."""
    job_dir = out / job.name
    if not job_dir.exists():
        return None
    keys = []
    for name in ("pipeline_job.json", STARTED_FILE):
        path = job_dir / name
        if path.exists():
            text = path.read_text()
            keys.append(json.loads(text).get("key") if name.endswith(".json") else text.strip())
    if not keys or all(key == job.key for key in keys):
        return None
    target = out / ".replaced" / f"{job.name.replace('/', '__')}-{keys[0]}"
    if target.exists():
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    job_dir.rename(target)
    print(f"[pipeline] {job.name}: its directory held a run of another configuration; moved to {target}",
          flush=True)
    return target


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}:{seconds % 60:02d}"


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


# ------------------------------------------------------------------------------- dry run
def dry_run(cfg: PipelineConfig) -> str:
    """The plan: stages, FLOPs, memory per GPU and estimated time on ``cfg.gpus`` GPUs."""
    lines = [f"pipeline plan: {len(cfg.seeds)} seed(s), {cfg.gpus} GPU(s) of {cfg.gpu_memory_gib:g} GiB, "
             f"assumed MFU {cfg.assumed_mfu:.0%}"]
    jobs = plan_jobs(cfg)
    lines.append("data sources (opened now; a source not at hand is planned with the sizes below):")
    lines += [f"  {check.describe()}" for check in pre_flight(cfg, jobs, strict=False)]
    total_flops = 0.0
    peak = 989e12
    lines.append(f"{'job':<32} {'kind':<9} {'model':<11} {'steps':>8} {'PFLOP':>12} {'mem/GPU GiB':>12} "
                 f"{'fits':>5} {'est. hours':>10}")
    for job in jobs:
        if job.kind in ("frozen", "zeroshot"):
            lines.append(f"{job.name:<32} {job.kind:<9} {'(inference)':<11}")
            continue
        # the plan needs shapes, not weights: dependencies do not exist yet in a dry run
        blank = {k: "" for k in ("init", "encoder") if k in job.values}
        if job.kind == "lit":  # the towers' plan does not read the tokenizer: a placeholder file passes validation
            placeholder = Path(tempfile.gettempdir()) / "prepretrain-plan-placeholder.model"
            placeholder.touch()
            blank["tokenizer"] = str(placeholder)
        planned = Job(job.name, job.kind, {**job.values, **blank}, config_file=job.config_file)
        stage_cfg = build_job_config(planned)
        strategy = getattr(stage_cfg, "strategy", "auto")
        plan = plan_run(replace(plan_config_from(stage_cfg), gpus=cfg.gpus, gpu_memory_gib=cfg.gpu_memory_gib,
                                strategy="auto" if strategy == "none" else strategy))
        steps = _steps_of(stage_cfg)
        flops = float(plan["train_flops_per_step"]) * steps
        total_flops += flops
        hours = flops / (cfg.gpus * peak * cfg.assumed_mfu) / 3600 if flops else float("nan")
        memory = plan["total_gib"]
        fits = str(plan.get("fits", "?"))
        if job.kind == "lit":  # the plan trains the whole image tower; LiT keeps it frozen (over-estimate)
            fits = f"<={fits}"
        lines.append(f"{job.name:<32} {job.kind:<9} {getattr(stage_cfg, 'model', ''):<11} {steps:>8} "
                     f"{flops / 1e15:>12.1f} {float(memory):>12.1f} {fits:>5} {hours:>10.2f}")
    hours = total_flops / (cfg.gpus * peak * cfg.assumed_mfu) / 3600
    lines.append("lit rows count the image tower as trained: an upper bound, since LiT keeps it frozen")
    if any(job.kind in TASK_STAGES for job in jobs):
        lines.append("video and detect rows are priced as the image model on one image per sample: a lower bound "
                     "(a clip has num_frames / tubelet_size times the tokens; the detector adds its heads)")
    lines.append("steps: from each recipe's epochs; data not at hand counts as IG-3B (3.0B images) for pretraining, "
                 "ImageNet-1k (1.28M) for finetuning, Kinetics-400 (240K videos) and COCO (118K images)")
    lines.append(f"total training: {total_flops / 1e18:.2f} EFLOP, about {hours:.1f} hours on {cfg.gpus} GPUs "
                 f"at {cfg.assumed_mfu:.0%} MFU of 989 TFLOP/s")
    return "\n".join(lines)


def _steps_of(stage_cfg: Any) -> int:
    if getattr(stage_cfg, "steps", 0):
        return int(stage_cfg.steps)
    if stage_cfg.data == "synthetic":
        samples = stage_cfg.num_images
    else:
        samples = int(getattr(stage_cfg, "epoch_size", 0) or 0) or _dataset_size_guess(stage_cfg)
    return max(1, math.ceil(stage_cfg.epochs * samples / stage_cfg.batch_size))


DATASET_SIZES = {"finetune": 1_281_167, "video": 240_436, "detect": 118_287}  # IN-1k, K400, COCO train2017


def _dataset_size_guess(stage_cfg: Any) -> int:
    """Without the data at hand a dry run assumes the paper's sets: IG-3B for pretraining (MAE, WSP,
    LiT), ImageNet-1k's 1.28M training images for finetuning, Kinetics-400's training videos for
    video and COCO train2017 for detection."""
    return DATASET_SIZES.get(getattr(stage_cfg, "stage_name", ""), 3_000_000_000)


def config_summary(cfg: PipelineConfig) -> dict[str, Any]:
    return config_to_dict(cfg)

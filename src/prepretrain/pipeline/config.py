"""The pipeline's keys (:class:`PipelineConfig`) and the readers of its structured ones.

Which stages run and on what data (``data``, ``mae_data``, ...), the budgets of the CPU demo or
the paper recipes (``mae_config``, ...), the transfer protocols and sets, and how the jobs run
(``executor``, ``workers``, the ``slurm_*`` keys). A rehearsal (:func:`rehearsal_config`) is a
paper pipeline config with only model size, budgets and hardware changed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import ConfigError, build_config, read_yaml
from ..evaluate.zeroshot import CLASS_SETS, TEMPLATE_SETS, check_names_file

EXECUTORS = ("local", "slurm")


@dataclass
class PipelineConfig:
    """The whole experiment. Defaults: the CPU demo on the synthetic dataset (about 12 min on 2 cores)."""

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
    # how the jobs run. executor=local: on this machine, jobs whose dependencies are done side by
    # side (workers: "auto" = one per GPU with device cuda, else one per CPU core; threads: torch
    # threads of a CPU job, 0 = cores / workers). executor=slurm: every job queued at once through
    # submitit, each with its own resources and afterok dependencies (docs/cluster.md)
    executor: str = "local"
    workers: str = "auto"
    threads: int = 0
    # GPUs of the pretraining stages (MAE, WSP, LiT) on SLURM, and of --dry-run's estimates; transfer
    # trainings (finetune, video, detect) use transfer_gpus (0 = gpus), evaluations one GPU
    gpus: int = 8
    transfer_gpus: int = 0
    gpus_per_node: int = 8
    gpu_memory_gib: float = 80.0
    assumed_mfu: float = 0.3
    # sbatch options of every job (empty: the cluster's default); slurm_time: minutes per job, 0 =
    # each job's own estimate x 1.5 + 15 minutes (at most 72 h: a longer job requeues itself at its
    # time limit and resumes from its checkpoint); slurm_extra: more sbatch options, KEY=VALUE
    slurm_partition: str = ""
    slurm_account: str = ""
    slurm_qos: str = ""
    slurm_constraint: str = ""
    slurm_time: int = 0
    slurm_cpus_per_task: int = 10  # CPU cores per process: one process per GPU, or per job on CPU
    slurm_extra: tuple[str, ...] = ()
    slurm_wait: bool = True  # wait for the jobs and write the report; false: submit and return
    poll_s: float = 5.0  # seconds between two looks at queued jobs (SLURM, or another driver's)

    # Every numeric key this class defines, with its interval (config.check_bounds).
    bounds = {
        "num_images": "> 0", "image_size": "> 0", "mae_steps": "> 0", "wsp_steps": "> 0", "lit_steps": "> 0",
        "finetune_steps": "> 0", "batch_size": "> 0", "eval_every": ">= 0", "wsp_eval_images": ">= 0",
        "video_steps": ">= 0", "detect_steps": ">= 0", "gpus": "> 0", "gpu_memory_gib": "> 0",
        "assumed_mfu": "(0, 1]", "threads": ">= 0", "transfer_gpus": ">= 0", "gpus_per_node": "> 0",
        "slurm_time": ">= 0", "slurm_cpus_per_task": "> 0", "poll_s": "> 0",
    }
    # Every key with a fixed set of values (config.check_bounds).
    choices = {"executor": EXECUTORS}

    def validate(self) -> None:
        if self.workers != "auto" and not (self.workers.isdigit() and int(self.workers) > 0):
            raise ConfigError("workers", f"must be auto or a positive number of jobs at a time; got '{self.workers}'")
        slurm_extra(self)
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


def slurm_extra(cfg: PipelineConfig) -> dict[str, str]:
    """The parsed ``slurm_extra`` (``KEY=VALUE`` sbatch options, ``--`` optional; ``KEY`` alone is a
    flag); a malformed entry is a ConfigError."""
    found: dict[str, str] = {}
    for entry in cfg.slurm_extra:
        key, sep, value = (part.strip() for part in str(entry).partition("="))
        key = key.removeprefix("--")
        if not key or not key.replace("-", "").replace("_", "").isalnum():
            raise ConfigError("slurm_extra", f"expected sbatch options as KEY=VALUE (mem=200G), got '{entry}'")
        found[key] = value if sep else ""
    return found


# Transfer tasks that train a stage of their own on their own data (video clips, detection):
# pipeline kind -> (data key, recipe key, demo steps key). Each runs once per encoder.
TASK_STAGES = {"video": ("video_data", "video_config", "video_steps"),
               "detect": ("detect_data", "detect_config", "detect_steps")}


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

"""The pipeline's keys (:class:`PipelineConfig`) and the readers of its structured ones.

Which stages run and on what data (``data``, ``mae_data``, ...), the budgets of the CPU demo or
the paper recipes (``mae_config``, ...), the transfer protocols and sets, and how the jobs run
(``executor``, ``workers``, the ``slurm_*`` keys). A rehearsal (:func:`rehearsal_config`) is a
paper pipeline config with only model size, budgets and hardware changed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import ConfigError, build_config, read_yaml
from ..evaluate.zeroshot import CLASS_SETS, TEMPLATE_SETS, check_names_file
from ..models.vit import resolve_name

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
    # the sweep axes (a list runs every combination: the paper's Figs. 3-5; docs/experiment.md): the
    # model, the MAE budget (0 = no MAE: the untrained-init control) and the WSP budget. Budgets in
    # optimizer steps for the demo (ignored for a stage given a recipe file), or in epochs
    # (mae_epochs, wsp_epochs: epochs=E of the recipe or the demo; empty = the steps / the recipe's)
    model: tuple[str, ...] = ("vit_micro4",)
    image_size: int = 32
    device: str = "auto"
    precision: str = "auto"
    mae_steps: tuple[int, ...] = (200,)
    wsp_steps: tuple[int, ...] = (150,)
    mae_epochs: tuple[float, ...] = ()
    wsp_epochs: tuple[float, ...] = ()
    lit_steps: int = 40
    finetune_steps: int = 30
    batch_size: int = 64
    eval_every: int = 25  # WSP evaluation interval: the convergence curves
    wsp_eval_images: int = 200  # held-out images scored at each WSP evaluation
    # paper-scale recipes (configs/*.yaml); the pipeline then only sets data, seed, out_dir, the model
    # and the budgets it sweeps. "{model}" in a path is the model of each grid point
    # (configs/mae_{model}.yaml reads configs/mae_vit_l16.yaml for model vit_l16)
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
    # rows of the transfer table the sweep's figures draw (e.g. "linear probe (coarse)"); empty = the first
    figure_rows: tuple[str, ...] = ()
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
        "num_images": "> 0", "image_size": "> 0", "mae_steps": ">= 0", "wsp_steps": "> 0", "mae_epochs": ">= 0",
        "wsp_epochs": "> 0", "lit_steps": "> 0",
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
        grid_points(self)  # the sweep axes: no empty or repeated values
        for key in RECIPE_KEYS:
            for model in self.model:
                path = recipe_file(self, key, model)
                if path and not Path(path).exists():
                    raise ConfigError(key, f"file not found: {path}" + (f" (model {model})" if path != getattr(
                        self, key) else ""))
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


# ------------------------------------------------------------------------------ the sweep grid
@dataclass(frozen=True)
class Budget:
    """How long a stage trains at one grid point: ``steps`` (the demo), ``epochs`` (``epochs=E`` of
    the recipe or the demo), ``recipe`` (the recipe file's own), or ``none`` (no MAE: value 0)."""

    stage: str  # mae | wsp
    unit: str  # steps | epochs | recipe | none
    value: float = 0.0

    @property
    def trains(self) -> bool:
        return self.unit != "none"

    def overrides(self) -> dict[str, Any]:
        """What the budget sets in the stage's config."""
        if self.unit == "steps":
            return {"steps": int(self.value)}
        if self.unit == "epochs":
            return {"epochs": self.value, "steps": 0}
        return {}

    @property
    def tag(self) -> str:
        """The budget in a directory name: mae600, mae0.5ep, mae0."""
        if self.unit == "steps":
            return f"{self.stage}{int(self.value)}"
        if self.unit == "epochs":
            return f"{self.stage}{self.value:g}ep"
        return f"{self.stage}0" if self.unit == "none" else f"{self.stage}_recipe"

    @property
    def label(self) -> str:
        return {"steps": f"{int(self.value)} steps", "epochs": f"{self.value:g} ep", "recipe": "recipe",
                "none": "0"}[self.unit]


@dataclass(frozen=True)
class GridPoint:
    """One point of the sweep: a model and the MAE and WSP budgets its arms train with; ``base``: the
    first value of each axis, whose jobs keep the layout of a pipeline without a sweep."""

    model: str
    mae: Budget
    wsp: Budget
    base: tuple[str, Budget, Budget] | None = field(default=None, compare=False)

    def axes(self, *names: str) -> dict[str, Any]:
        """The point's values on ``names`` (model, mae, wsp), as a job records them."""
        values = {"model": self.model, "mae": self.mae.label, "wsp": self.wsp.label}
        return {name: values[name] for name in names}

    def prefix(self, *names: str) -> str:
        """The directory of the jobs that depend on ``names``: their values that differ from the first
        value of their axis, e.g. "vit_tiny4/mae600/"; "" at the first point. So a pipeline without a
        sweep keeps its layout, and values added after the first never rename a job that ran."""
        base_model, base_mae, base_wsp = self.base or (self.model, self.mae, self.wsp)
        parts = {"model": self.model if self.model != base_model else "",
                 "mae": self.mae.tag if self.mae != base_mae else "",
                 "wsp": self.wsp.tag if self.wsp != base_wsp else ""}
        return "".join(f"{parts[name]}/" for name in names if parts[name])


def recipe_file(cfg: PipelineConfig, key: str, model: str) -> str:
    """A ``*_config`` recipe path for ``model`` ("{model}" replaced); "" when the key is not set."""
    return str(getattr(cfg, key)).replace("{model}", model)


def stage_budgets(cfg: PipelineConfig, stage: str) -> list[Budget]:
    """The budgets ``stage`` (mae or wsp) is swept over, in the order given; a ConfigError names the key
    of an empty, repeated or (with a recipe) ignored value."""
    steps, epochs = getattr(cfg, f"{stage}_steps"), getattr(cfg, f"{stage}_epochs")
    if epochs:
        key = f"{stage}_epochs"
        budgets = [Budget(stage, "epochs", float(e)) if e else Budget(stage, "none") for e in epochs]
    elif getattr(cfg, f"{stage}_config"):
        key = f"{stage}_steps"  # a recipe trains for its own epochs: steps only say whether there is a stage
        budgets = [Budget(stage, "recipe") if n else Budget(stage, "none") for n in steps]
    else:
        key = f"{stage}_steps"
        budgets = [Budget(stage, "steps", n) if n else Budget(stage, "none") for n in steps]
    if not budgets:
        raise ConfigError(key, "give at least one value")
    if len(set(budgets)) < len(budgets):
        hint = (f": with {stage}_config the recipe sets the budget; sweep it in epochs with {stage}_epochs="
                if getattr(cfg, f"{stage}_config") and not epochs else "")
        raise ConfigError(key, f"a value is repeated in {list(epochs or steps)}{hint}")
    return budgets


def grid_points(cfg: PipelineConfig) -> list[GridPoint]:
    """Every combination of the sweep axes (model x MAE budget x WSP budget); one point without a sweep."""
    if not cfg.model or any(not str(model).strip() for model in cfg.model):
        raise ConfigError("model", "give at least one model name")
    if len(set(cfg.model)) < len(cfg.model):
        raise ConfigError("model", f"a value is repeated in {list(cfg.model)}")
    for model in cfg.model:
        try:
            resolve_name(model)
        except ValueError as error:
            raise ConfigError("model", str(error)) from None
    maes, wsps = stage_budgets(cfg, "mae"), stage_budgets(cfg, "wsp")
    base = (cfg.model[0], maes[0], wsps[0])
    return [GridPoint(model, mae, wsp, base) for model in cfg.model for mae in maes for wsp in wsps]


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

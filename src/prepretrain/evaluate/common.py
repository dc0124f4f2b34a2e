"""What every transfer evaluation shares: its config, its data splits, and the frozen encoder.

The interface (big_vision style, one shape for all evaluators) is::

    evaluate(encoder: FrozenEncoder, data: EvalData, cfg: EvalConfig) -> dict[str, Any]

``FrozenEncoder`` gives both what feature-based evaluators need (``encoder.features(data,
"train")``: cached frozen features, computed once per encoder x dataset x split x resolution
and shared by the linear probe, low-shot and kNN) and what model-based ones need
(``encoder.model``: the frozen timm ViT, e.g. for prompt tuning or zero-shot). ``EvalData``
names the splits by *role*: ``train`` (labels the evaluator may learn from), ``val`` (a
held-out split for model selection, used by finetuning) and ``test`` (reported only; an
evaluator must never choose a hyperparameter on it). Hyperparameter searches carve their
validation set out of ``train``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError
from ..data.readers.open import open_data
from ..data.readers.releases import DataLayoutError, align_classes, layout_splits
from ..data.records import MapSource
from ..files import write_json
from ..models.resolve import EncoderSpec, build_encoder, check_weights, resolve_encoder
from ..models.vit import VIT_SHAPES, resolve_name
from ..train.distributed import pick_device
from .features import Features, extract_features, feature_cache_key, load_features, save_features

POOLS = ("token", "avg")
_SPLIT_FILE_SUFFIXES = (".jsonl", ".ndjson", ".csv", ".tsv")


@dataclass
class EvalConfig:
    """Settings shared by the frozen-encoder evaluations (``probe``, ``lowshot``, ``knn``)."""

    stage_name = "eval"
    out_dir: str = ""  # default: runs/<command>
    encoder: str = ""  # run dir or weights file; empty = random init (the baseline); mae-init: untrained MAE init
    model: str = "vit_micro4"  # architecture when the weights carry no metadata
    image_size: int = 0  # 0 = the encoder's own resolution (metadata, else the model's default)
    pool: str = "token"  # frozen feature: CLS token ("token") or mean of patch tokens ("avg")
    data: str = "synthetic"  # "synthetic" or a folder with train/ and val/ (+ optional test/) splits
    task: str = "auto"  # label task: coarse | fine (synthetic), label (image folders); auto picks
    num_images: int = 4000  # synthetic training-split size (val/test sized from it)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # feature extraction: auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    batch_size: int = 256  # images per forward when extracting features
    num_workers: int = 0
    cache: bool = True  # keep frozen features on disk and reuse them
    cache_dir: str = ""  # default: <parent of out_dir>/feature_cache, shared by sibling evaluations
    progress: bool = True

    # Every numeric key this class defines, with its interval (config.check_bounds).
    bounds = {
        "image_size": ">= 0", "num_images": "> 0", "seed": "any", "batch_size": "> 0", "num_workers": ">= 0",
    }
    choices = {"pool": POOLS, "precision": ("auto", "bf16", "fp32")}

    def validate(self) -> None:
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ConfigError("device", f"must be auto, cpu, cuda or cuda:N, got '{self.device}'")
        try:
            name = resolve_name(self.model)
        except ValueError as error:
            raise ConfigError("model", str(error)) from None
        if self.image_size and self.image_size % VIT_SHAPES[name].patch_size:
            raise ConfigError("image_size", f"{self.image_size} is not a multiple of the patch size")
        if self.data == "synthetic" and self.task not in ("auto", "coarse", "fine"):
            raise ConfigError("task", f"the synthetic dataset has tasks coarse and fine; got '{self.task}'")
        check_weights("encoder", self.encoder)

    def run_dir(self) -> Path:
        return Path(self.out_dir or f"runs/{self.stage_name}")

    def feature_cache_dir(self) -> Path | None:
        if not self.cache:
            return None
        return Path(self.cache_dir) if self.cache_dir else self.run_dir().parent / "feature_cache"


# ------------------------------------------------------------------------------------ data


def split_exists(data: str, split: str) -> bool:
    """Whether a dataset folder has ``split``: a subfolder, a ``<split>.jsonl/.csv`` manifest, or a split
    its release layout lists in files (iNaturalist's ``val2018.json``, Food-101's ``meta/test.txt``)."""
    root = Path(data)
    in_files = layout_splits(root)
    if in_files is not None and split in in_files:
        return True
    return (root / split).is_dir() or any((root / f"{split}{suffix}").is_file() for suffix in _SPLIT_FILE_SUFFIXES)


@dataclass
class EvalData:
    """A labeled dataset seen by role: ``train``, ``val`` (selection) and ``test`` (report only)."""

    spec: str  # "synthetic" or the dataset folder
    task: str
    num_classes: int
    class_names: list[str]
    image_size: int
    split_names: dict[str, str]  # role -> split name on disk
    sources: dict[str, MapSource] = field(default_factory=dict)  # role -> source (public: tests wrap them)

    def source(self, role: str) -> MapSource:
        return self.sources[role]

    def identity(self, role: str) -> str:
        """What the cache key needs to know about a split: where it is, how big, and its classes (the
        cached features hold the labels, whose numbering follows train's classes)."""
        where = "synthetic:seed0" if self.spec == "synthetic" else str(Path(self.spec).resolve())
        names = getattr(self.sources[role], "class_names", None) or {}
        classes = hashlib.sha256(json.dumps(names, sort_keys=True).encode()).hexdigest()[:12]
        return f"{where}|{self.split_names[role]}|{len(self.sources[role])}|{self.image_size}px|{classes}"

    @property
    def selection_is_test(self) -> bool:
        """True for folders without a test/ split: their val/ is both what we select on and report."""
        return self.split_names["val"] == self.split_names["test"]


def label_task(source: MapSource, task: str, spec: str, *, required: bool = True) -> str:
    """The label task ``task=`` names for ``source`` (``spec``: what ``data=`` said): as given, or for
    ``auto``, ``coarse`` on the synthetic set, else ``label`` or the data's only task. ``""`` for data
    without labels when not ``required`` (``classify`` then labels the images); a ConfigError otherwise."""
    tasks = sorted((getattr(source, "class_names", None) or {}).keys())
    if task != "auto":
        if task not in tasks:
            raise ConfigError("task", f"'{task}' is not a label task of {spec}; it has {tasks or 'no labels'}")
        return task
    if not tasks and not required:
        return ""
    if spec == "synthetic":
        return "coarse"
    if "label" in tasks:
        return "label"
    if len(tasks) == 1:
        return tasks[0]
    raise ConfigError("task", f"{spec} has label tasks {tasks or 'none'}; choose one with task=NAME")


def open_eval_data(data: str, task: str = "auto", image_size: int = 32, num_images: int = 4000) -> EvalData:
    """Open the train/val/test splits of ``data`` for evaluation.

    Synthetic: the three splits of the embedded dataset. A folder: ``train`` is required,
    ``test`` is ``test/`` when present and labelled, otherwise ``val/`` (ImageNet-style releases
    report on val; their test sets are unlabelled), and ``val`` is ``val/`` (or ``test/``). Each
    split is opened once, so a role that reads the same split shares its source. A folder without split subfolders is
    refused: evaluating on images one also trained on is the bug we must never make silently.
    """
    if data == "synthetic":
        names = {"train": "train", "val": "val", "test": "test"}
    else:
        if not Path(data).is_dir():
            raise ConfigError("data", f"{data}: evaluations need a folder with train/ and val/ (or test/) splits")
        if not split_exists(data, "train"):
            raise ConfigError("data", f"{data} has no train split (train/ or train.jsonl)")
        held_out = [s for s in ("test", "val") if split_exists(data, s)]
        if not held_out:
            raise ConfigError("data", f"{data} has no val/ or test/ split to evaluate on")
        names = {"train": "train", "test": held_out[0], "val": "val" if "val" in held_out else held_out[0]}
    opened: dict[str, Any] = {}
    for split in dict.fromkeys(names.values()):
        opened[split] = open_data(data, split=split, image_size=image_size, num_images=num_images)
    if names["test"] != names["val"] and not getattr(opened[names["test"]], "class_names", None):
        # An unlabelled test/ (ImageNet's and iNaturalist's competition test sets): report on val.
        names["test"] = names["val"]
    sources = {role: opened[split] for role, split in names.items()}
    task = label_task(sources["train"], task, data)
    class_names = list(sources["train"].class_names[task])
    for role in ("val", "test"):
        other = list((getattr(sources[role], "class_names", None) or {}).get(task, []))
        if other and other != class_names:
            # Splits named by class ids (WordNet ids, folder names) share train's class index by id.
            try:
                sources[role] = align_classes(sources[role], task, class_names)
            except DataLayoutError as error:
                raise ConfigError("data", f"{data}: the {names[role]} split does not fit train's classes: {error}; "
                                          "every class of a held-out split needs images in train") from None
    return EvalData(data, task, len(class_names), class_names, image_size, names, sources)


# ---------------------------------------------------------------------------------- encoder


class FrozenEncoder:
    """A frozen encoder plus its feature cache: the one thing every evaluator receives."""

    def __init__(self, spec: EncoderSpec, device: torch.device | str = "cpu", *, precision: str = "auto",
                 batch_size: int = 256, num_workers: int = 0, cache_dir: str | Path | None = None,
                 progress: bool = False):
        self.spec = spec
        self.device = torch.device(device)
        use_bf16 = precision == "bf16" or (precision == "auto" and self.device.type == "cuda")
        self.dtype = torch.bfloat16 if use_bf16 else None
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.progress = progress
        self._model: torch.nn.Module | None = None
        self._memory: dict[str, Features] = {}
        self.extracted: list[str] = []  # roles computed (not read from cache) by this object, for reports
        self.skipped: dict[str, int] = {}  # role -> unreadable samples left out of its features

    @property
    def model(self) -> torch.nn.Module:
        """The frozen timm ViT (eval mode, no gradients), built on first use."""
        if self._model is None:
            model = build_encoder(self.spec).to(self.device).eval()
            for param in model.parameters():
                param.requires_grad_(False)
            self._model = model
        return self._model

    def cache_key(self, data: EvalData, role: str) -> str:
        return feature_cache_key(
            encoder=self.spec.identity, model=self.spec.model, depth=self.spec.depth,
            image_size=self.spec.image_size, data=data.identity(role),
            precision="bf16" if self.dtype is not None else "fp32",
        )

    def features(self, data: EvalData, role: str) -> Features:
        """Frozen features of one split; read from the cache when this encoder has seen it before."""
        key = self.cache_key(data, role)
        if key in self._memory:
            return self._memory[key]
        path = self.cache_dir / f"{key}.safetensors" if self.cache_dir is not None else None
        features = load_features(path) if path is not None and path.is_file() else None
        if features is None:
            features = extract_features(
                self.model, data.source(role), data.image_size, batch_size=self.batch_size, device=self.device,
                dtype=self.dtype, num_workers=self.num_workers,
                description=f"features {data.split_names[role]}" if self.progress else None,
            )
            self.extracted.append(role)
            if path is not None:
                save_features(path, features, {"encoder": self.spec.description, "split": data.split_names[role]})
        self._memory[key] = features
        self.skipped[role] = features.skipped
        return features


def open_encoder(cfg: EvalConfig) -> FrozenEncoder:
    """The frozen encoder ``cfg`` names, with its cache directory."""
    spec = resolve_encoder(cfg.encoder, cfg.model, cfg.image_size, cfg.seed)
    return FrozenEncoder(spec, pick_device(cfg.device), precision=cfg.precision, batch_size=cfg.batch_size,
                         num_workers=cfg.num_workers, cache_dir=cfg.feature_cache_dir(), progress=cfg.progress)


# ---------------------------------------------------------------------------------- metrics


def write_results(run_dir: Path, results: dict[str, Any]) -> Path:
    """``results.json`` written atomically so a crash never leaves half a file for the report."""
    return write_json(run_dir / "results.json", results)

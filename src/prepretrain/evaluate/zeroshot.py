"""Zero-shot classification with a LiT/CLIP model: class names x synonyms x prompt templates.

The classifier for class c is the mean over (synonyms of c) x (templates) of the
L2-normalised text embeddings of the filled-in prompts, renormalised (CLIP's prompt
ensembling, Radford et al. 2021, arXiv 2103.00020; facebookresearch/maws eval_zeroshot.py);
an image is assigned the class with the highest cosine similarity. Reported: top-1, top-5
(top-k capped at the number of classes) and the mean per-class top-1, all in percent.

Inputs users bring (CLIP_benchmark-style, because users ask for zero-shot on their own data):

* class names: a text file with one class per line, synonyms separated by commas
  (``ring, donut, hoop``); or JSON: a list of names, a list of synonym lists, a mapping
  ``name -> [synonyms]``, or a ``classes.json`` written by ``prepretrain data synth``
  (``{"synonyms": {task: ...}, "class_names": {task: ...}}``, the task picked by ``task=``).
  Classes are in label order: line i is label i.
* templates: a text file, one template per line, ``{}`` where the class name goes
  (``#`` comments and blank lines skipped), or a shipped set by name: ``prepretrain`` (the
  default, 44 ImageNet-style templates of our own) or ``openai80`` (the 80 templates of
  OpenAI's CLIP ImageNet evaluation). Class names likewise: ``classes=imagenet1k`` is the
  1000 ImageNet-1k names in label order, and a folder whose class folders are WordNet ids
  (``n01440764``) gets those names (ImageNet-21k ids: WordNet's lemmas) without any file.
  Templates are filled verbatim (``template.replace("{}", name)``). ``article_fix`` writes "an"
  for "a" before a vowel ("a photo of an oval"): ``auto`` (default) = only for the ``prepretrain``
  set, which is written with "a {}" and the fix in mind; ``true`` / ``false`` = for every set.

``prepretrain zeroshot model=RUN_DIR_OR_FILE [data=... split=... task=... classes=... templates=...]``
writes ``results.json`` (``evaluation``, the setting, ``top1``, ``top5``,
``mean_per_class_top1``, counts) in ``out_dir`` (default ``RUN_DIR/zeroshot`` or ``runs/zeroshot``),
and beside it ``clip_benchmark_zeroshot_classification.json``: the same run in the file
CLIP_benchmark's ``clip_benchmark eval`` writes for a zero-shot classification (LAION-AI/CLIP_benchmark
``clip_benchmark/cli.py``: ``dataset``, ``model``, ``pretrained``, ``task``, ``metrics`` with ``acc1``,
``acc5``, ``mean_per_class_recall`` as fractions, ``acc5`` NaN under 5 classes as theirs, and
``language``), so that ``clip_benchmark build`` puts our runs in its tables. ``model=`` may also be an
open_clip folder written by ``prepretrain convert --to open_clip`` (or an open_clip checkpoint
file with its ``open_clip_config.json`` beside it or named by ``open_clip_config=``).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..config import ConfigError, dump_config
from ..data.images.transforms import eval_transform
from ..data.loader import RecordDataset, eval_loader
from ..data.readers.open import open_data
from ..data.records import BadSample
from ..files import write_json, write_text
from ..models.clip import CLIPModel, load_clip
from ..models.resolve import check_weights
from ..models.tokenizers import Tokenizer
from ..train.distributed import pick_device
from .common import label_task
from .metrics import topk_hits

# Built-in sets, chosen by name wherever a templates or classes file is accepted.
TEMPLATE_SETS = {"prepretrain": "prepretrain_templates.txt", "openai80": "openai_imagenet_templates.txt"}
CLASS_SETS = {"imagenet1k": "imagenet1k_classes.txt"}
WORDNET_ID = re.compile(r"^n\d{8}$")


def _asset_text(name: str) -> str:
    return resources.files("prepretrain").joinpath("assets", name).read_text(encoding="utf-8")


def default_templates() -> list[str]:
    """The shipped ImageNet-style prompt set (our own wording, written for the article fix)."""
    return read_templates("prepretrain")


def check_names_file(key: str, value: str, builtin: dict[str, str]) -> None:
    """ConfigError naming ``key`` unless ``value`` is empty, a built-in set's name or an existing file."""
    if value and value not in builtin and not Path(value).is_file():
        raise ConfigError(key, f"file not found: {value} (or one of the built-in sets: {', '.join(builtin)})")


def parse_templates(text: str, origin: str = "templates") -> list[str]:
    templates = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    bad = [t for t in templates if t.count("{}") != 1]
    if bad:
        raise ValueError(f"{origin}: every template needs exactly one '{{}}'; not: {bad[:3]}")
    if not templates:
        raise ValueError(f"{origin}: no templates found")
    return templates


def read_templates(path: str | Path) -> list[str]:
    """Templates from a file, one per line with ``{}``; or a built-in set by name (``TEMPLATE_SETS``)."""
    if str(path) in TEMPLATE_SETS:
        return parse_templates(_asset_text(TEMPLATE_SETS[str(path)]), str(path))
    return parse_templates(Path(path).read_text(encoding="utf-8"), str(path))


def read_class_names(path: str | Path, task: str = "") -> list[list[str]]:
    """Synonym lists (first = the class name) from a ``.txt`` or ``.json`` file, in label order;
    or a built-in set by name (``CLASS_SETS``: ``imagenet1k``)."""
    if str(path) in CLASS_SETS:
        return _class_lines(_asset_text(CLASS_SETS[str(path)]), str(path))
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        return _classes_from_json(json.loads(text), task, str(path))
    return _class_lines(text, str(path))


def _class_lines(text: str, path: str) -> list[list[str]]:
    classes = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        names = [name.strip() for name in line.split(",") if name.strip()]
        if not names:
            raise ValueError(f"{path}:{number}: no class name on this line")
        classes.append(names)
    if not classes:
        raise ValueError(f"{path}: no class names found")
    return classes


def _classes_from_json(data: Any, task: str, origin: str) -> list[list[str]]:
    if isinstance(data, dict) and ("synonyms" in data or "class_names" in data):
        table = data.get("synonyms") or data.get("class_names")
        if isinstance(table, dict):
            if not task or task not in table:
                raise ValueError(f"{origin}: pick a task with task= (one of {sorted(table)})")
            table = table[task]
        data = table
    if isinstance(data, dict):
        return [[str(name), *[str(s) for s in (synonyms or []) if str(s) != str(name)]]
                for name, synonyms in data.items()]
    if isinstance(data, list) and data:
        return [[str(entry)] if isinstance(entry, str) else [str(s) for s in entry] for entry in data]
    raise ValueError(f"{origin}: expected a list of names, a list of synonym lists or a mapping name -> synonyms")


ARTICLE_FIX_CHOICES = ("auto", "true", "false")


def check_article_fix(key: str, value: str) -> None:
    """ConfigError naming ``key`` unless ``value`` is auto | true | false."""
    if str(value).lower() not in ARTICLE_FIX_CHOICES:
        raise ConfigError(key, f"must be auto, true or false; got '{value}'")


def article_fix_for(setting: str, templates_file: str) -> bool:
    """Whether to apply the "a" -> "an" fix: ``auto`` = only for prepretrain's own set (the default,
    written for it); published sets (``openai80``) and users' files are used verbatim."""
    setting = str(setting).lower()
    return templates_file in ("", "prepretrain") if setting == "auto" else setting == "true"


def fill_template(template: str, name: str, article_fix: bool = False) -> str:
    """``template`` with ``{}`` replaced by ``name``, verbatim; with ``article_fix`` "a" becomes "an"
    before a vowel ("a photo of an oval")."""
    if article_fix and name[:1].lower() in "aeiou":
        template = re.sub(r"(^|\s)([Aa]) \{\}", lambda m: f"{m.group(1)}{m.group(2)}n {{}}", template)
    return template.replace("{}", name)


@torch.no_grad()
def build_classifier(model: CLIPModel, tokenizer: Tokenizer, classes: Sequence[Sequence[str]],
                     templates: Sequence[str], device: torch.device | str = "cpu",
                     batch_size: int = 512, article_fix: bool = False) -> torch.Tensor:
    """(num_classes, embed_dim) unit vectors: mean of normalised prompt embeddings, renormalised.
    Prompts are the templates filled verbatim, or with "an" before vowels when ``article_fix``."""
    device = torch.device(device)
    weights = []
    for synonyms in classes:
        prompts = [fill_template(t, name, article_fix) for name in synonyms for t in templates]
        embeddings = torch.cat([
            model.encode_texts(tokenizer(prompts[i : i + batch_size]).to(device), normalize=True).float()
            for i in range(0, len(prompts), batch_size)
        ])
        weights.append(F.normalize(embeddings.mean(dim=0), dim=-1))
    return torch.stack(weights)


class ZeroShotScorer:
    """The zero-shot evaluator: image embeddings scored against a class classifier
    (:func:`build_classifier`), accumulated over batches. The ``zeroshot`` command feeds it
    image batches; LiT's in-training evaluation feeds it the locked tower's cached features."""

    def __init__(self, classifier: torch.Tensor, task: str = ""):
        self.classifier = classifier
        self.task = task
        self.num_classes = classifier.shape[0]
        self.hits = {1: 0, 5: 0}
        self.per_class_hits = torch.zeros(self.num_classes)
        self.per_class_total = torch.zeros(self.num_classes)
        self.total = 0

    def add(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        labels = labels.to(self.classifier.device)
        if (labels < 0).any() or (labels >= self.num_classes).any():
            raise ValueError(f"labels of task {self.task!r} go beyond the {self.num_classes} class names given")
        logits = embeddings.float() @ self.classifier.t()
        for k, count in topk_hits(logits, labels, tuple(self.hits)).items():
            self.hits[k] += count
        correct = (logits.argmax(dim=1) == labels).float().cpu()
        self.per_class_total += torch.bincount(labels.cpu(), minlength=self.num_classes).float()
        self.per_class_hits += torch.bincount(labels.cpu(), weights=correct, minlength=self.num_classes)
        self.total += len(labels)

    def top1_fraction(self) -> float:
        """Top-1 as a fraction of the images (CLIP_benchmark's ``acc1``), from the counts."""
        return self.hits[1] / self.total if self.total else 0.0

    def result(self) -> dict[str, Any]:
        """Top-1/top-5 and mean per-class top-1 (percent), and the number of images scored."""
        if self.total == 0:
            raise ValueError("no labelled images were evaluated")
        seen = self.per_class_total > 0
        return {
            "top1": 100.0 * self.hits[1] / self.total,
            "top5": 100.0 * self.hits[5] / self.total,
            "mean_per_class_top1": float(100.0 * (self.per_class_hits[seen] / self.per_class_total[seen]).mean()),
            "num_images": self.total,
        }


def labelled_images(transform, task: str):
    """Record -> {image, label}; a record without the task's label is an error, not a drop."""

    def apply(record) -> dict[str, Any]:
        if task not in record.labels:
            raise BadSample(record.key, "missing_label", f"no '{task}' label")
        return {"image": transform(record.image), "label": int(record.labels[task])}

    return apply


def source_classes(source: Any, task: str) -> list[list[str]]:
    """Synonym lists of a source's task (``synonyms`` when it has them, else ``class_names``).
    Folder names that are WordNet ids (ImageNet's ``n01440764``) become words: see :func:`wordnet_names`."""
    synonyms = (getattr(source, "synonyms", None) or {}).get(task)
    if synonyms:
        return [list(s) for s in synonyms]
    names = (getattr(source, "class_names", None) or {}).get(task)
    if names:
        if all(WORDNET_ID.match(str(n)) for n in names):
            return wordnet_names([str(n) for n in names])
        return [[n] for n in names]
    raise ValueError(f"the data has no class names for task {task!r}: pass classes=FILE (or classes=imagenet1k)")


def wordnet_names(ids: Sequence[str]) -> list[list[str]]:
    """Class names for WordNet ids: the ImageNet-1k ids get the shipped ``imagenet1k`` names (then
    WordNet's lemmas as synonyms); other ids (ImageNet-21k) WordNet's lemmas, from the tables timm
    ships. An id found in neither is a ``ValueError`` naming it."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo("imagenet-1k")
    clean = dict(zip(info.label_names(), (c[0] for c in read_class_names("imagenet1k"))))
    lemmas = ImageNetInfo("imagenet-22k").label_descriptions(as_dict=True)  # id -> "tench, Tinca tinca"
    classes, unknown = [], []
    for wnid in ids:
        words = [w.strip() for w in str(lemmas.get(wnid, "")).split(",") if w.strip()]
        first = [clean[wnid]] if wnid in clean else []
        names = first + [w for w in words if w not in first]
        if not names:
            unknown.append(wnid)
        classes.append(names)
    if unknown:
        raise ValueError(f"no class name known for WordNet id(s) {', '.join(unknown[:5])}: pass classes=FILE")
    return classes


# ------------------------------------------------------------------------------ CLIP_benchmark's file

CLIP_BENCHMARK_FILE = "clip_benchmark_zeroshot_classification.json"


def clip_benchmark_result(results: dict[str, Any], model: str, acc1: float) -> dict[str, Any]:
    """A zero-shot run in CLIP_benchmark's result format (its ``eval`` command's JSON).

    ``model`` is what ``model=`` named (their ``--model``), ``pretrained`` the weights file read (their
    ``--pretrained``), ``dataset`` the ``data=`` given. Their metrics are fractions: ``acc1`` is taken
    from the hit count (exactly our top-1 / 100), ``acc5`` is NaN below 5 classes (theirs is; ours is
    capped at the class count), ``mean_per_class_recall`` (sklearn's balanced accuracy: the mean
    over the classes that have images) is our ``mean_per_class_top1`` / 100.
    """
    acc5 = results["top5"] / 100.0 if results["num_classes"] >= 5 else float("nan")
    return {
        "dataset": results["data"],
        "model": model,
        "pretrained": results["model"],
        "task": "zeroshot_classification",
        "metrics": {"acc1": acc1, "acc5": acc5, "mean_per_class_recall": results["mean_per_class_top1"] / 100.0},
        "language": "en",
    }


# ------------------------------------------------------------------------------ command


@dataclass
class ZeroShotConfig:
    """``prepretrain zeroshot``: evaluate a LiT/CLIP model on labelled images, zero-shot."""

    stage_name = "zeroshot"

    model: str = ""  # LiT run directory, clip.safetensors, an official MAWS CLIP file, or an open_clip folder
    data: str = "synthetic"  # "synthetic" or a labelled folder / manifest / shards
    split: str = "val"
    task: str = "auto"  # label task: auto (synthetic: coarse; else the data's one task, e.g. label) | coarse | fine
    classes: str = ""  # class names (+ synonyms) file or imagenet1k; empty = the data's own names and synonyms
    templates: str = ""  # templates file, or prepretrain | openai80 (shipped sets); empty = prepretrain
    article_fix: str = "auto"  # "a {}" -> "an {}" before a vowel: auto (= shipped set only) | true | false
    tokenizer: str = ""  # XLM-R SentencePiece .model (needed for official MAWS CLIP files)
    open_clip_config: str = ""  # open_clip_config.json of an open_clip checkpoint file (default: beside it)
    image_size: int = 0  # 0 = the model's resolution
    num_images: int = 4000  # synthetic: size of the training split (val/test sized from it)
    max_images: int = 0  # evaluate at most this many images; 0 = the whole split
    batch_size: int = 256
    num_workers: int = 0
    device: str = "auto"
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    out_dir: str = ""  # default: RUN_DIR/zeroshot, or runs/zeroshot for a file

    # Every numeric key this class defines, with its interval (config.check_bounds).
    bounds = {
        "image_size": ">= 0", "num_images": "> 0", "max_images": ">= 0", "batch_size": "> 0", "num_workers": ">= 0",
    }
    choices = {"precision": ("auto", "bf16", "fp32")}

    def validate(self) -> None:
        if not self.model:
            raise ConfigError("model", "give a LiT run directory or a CLIP checkpoint file: model=runs/lit")
        check_weights("model", self.model)
        check_names_file("classes", self.classes, CLASS_SETS)
        check_names_file("templates", self.templates, TEMPLATE_SETS)
        if self.tokenizer and not Path(self.tokenizer).is_file():
            raise ConfigError("tokenizer", f"file not found: {self.tokenizer}")
        if self.open_clip_config and not Path(self.open_clip_config).is_file():
            raise ConfigError("open_clip_config", f"file not found: {self.open_clip_config}")
        check_article_fix("article_fix", self.article_fix)


def run_zeroshot(cfg: ZeroShotConfig) -> dict[str, Any]:
    """Load the model, build the classifier, score the split, write ``results.json``."""

    start = time.perf_counter()
    device = pick_device(cfg.device)
    model, tokenizer, info = load_clip(cfg.model, tokenizer=cfg.tokenizer, device=device,
                                       open_clip_config=cfg.open_clip_config)
    image_size = cfg.image_size or info["image_size"]
    source = open_data(cfg.data, split=cfg.split, image_size=image_size, num_images=cfg.num_images)
    task = label_task(source, cfg.task, cfg.data)
    classes = read_class_names(cfg.classes, task) if cfg.classes else source_classes(source, task)
    templates = read_templates(cfg.templates) if cfg.templates else default_templates()
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    dtype = torch.bfloat16 if use_bf16 else None
    article_fix = article_fix_for(cfg.article_fix, cfg.templates)
    scorer = ZeroShotScorer(build_classifier(model, tokenizer, classes, templates, device,
                                             article_fix=article_fix), task)
    dataset = RecordDataset(source, labelled_images(eval_transform(image_size, crop_fraction=1.0), task))
    skipped = 0
    for batch in eval_loader(dataset, cfg.batch_size, cfg.num_workers):
        skipped += len(batch.get("_skipped", []))
        if "image" not in batch:
            continue
        with torch.no_grad(), torch.autocast(device.type, dtype=dtype) if dtype else nullcontext():
            embeddings = model.encode_images(batch["image"].to(device), normalize=True)
        scorer.add(embeddings, batch["label"])
        if cfg.max_images and scorer.total >= cfg.max_images:
            break
    scores = scorer.result()
    results = {
        "evaluation": "zeroshot",
        "model": info["path"],
        "data": cfg.data,
        "split": cfg.split,
        "task": task,
        "num_classes": len(classes),
        "num_templates": len(templates),
        "article_fix": article_fix,
        "image_size": image_size,
        **scores,
        "skipped_images": skipped,
        "seconds": time.perf_counter() - start,
    }
    out_dir = Path(cfg.out_dir) if cfg.out_dir else (
        Path(cfg.model) / "zeroshot" if Path(cfg.model).is_dir() else Path("runs/zeroshot")
    )
    write_text(out_dir / "config.yaml", dump_config(cfg))
    write_json(out_dir / CLIP_BENCHMARK_FILE, clip_benchmark_result(results, cfg.model, scorer.top1_fraction()))
    write_json(out_dir / "results.json", results)  # atomic: a report never reads half a file
    results["out_dir"] = str(out_dir)
    return results

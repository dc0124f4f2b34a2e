"""Zero-shot classification with a LiT/CLIP model: class names x synonyms x prompt templates.

The classifier for class c is the mean over (synonyms of c) x (templates) of the
L2-normalised text embeddings of the filled-in prompts, renormalised (REFERENCE.md section 2);
an image is assigned the class with the highest cosine similarity. Reported: top-1, top-5
(top-k capped at the number of classes) and the mean per-class top-1, all in percent.

Inputs users bring (CLIP_benchmark-style, because users ask for zero-shot on their own data):

* class names: a text file with one class per line, synonyms separated by commas
  (``ring, donut, hoop``); or JSON: a list of names, a list of synonym lists, a mapping
  ``name -> [synonyms]``, or a ``classes.json`` written by ``prepretrain data synth``
  (``{"synonyms": {task: ...}, "class_names": {task: ...}}``, the task picked by ``task=``).
  Classes are in label order: line i is label i.
* templates: a text file, one template per line, ``{}`` where the class name goes
  (``#`` comments and blank lines skipped). Default: the 44 ImageNet-style templates
  shipped in ``prepretrain/assets/zeroshot_templates.txt``.

``prepretrain zeroshot model=RUN_DIR_OR_FILE [data=... split=... task=... classes=... templates=...]``
writes ``results.json`` (``evaluation``, the setting, ``top1``, ``top5``,
``mean_per_class_top1``, counts) in ``out_dir`` (default ``RUN_DIR/zeroshot`` or ``runs/zeroshot``).
"""

from __future__ import annotations

import argparse
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
from ..data.loader import RecordDataset, eval_loader, open_data
from ..data.transforms import eval_transform
from ..models.clip import CLIPModel
from ..models.tokenizers import Tokenizer

TEMPLATE_ASSET = "zeroshot_templates.txt"


def default_templates() -> list[str]:
    """The shipped ImageNet-style prompt set (our own wording)."""
    text = resources.files("prepretrain").joinpath("assets", TEMPLATE_ASSET).read_text(encoding="utf-8")
    return parse_templates(text, TEMPLATE_ASSET)


def parse_templates(text: str, origin: str = "templates") -> list[str]:
    templates = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    bad = [t for t in templates if t.count("{}") != 1]
    if bad:
        raise ValueError(f"{origin}: every template needs exactly one '{{}}'; not: {bad[:3]}")
    if not templates:
        raise ValueError(f"{origin}: no templates found")
    return templates


def read_templates(path: str | Path) -> list[str]:
    """Templates from a file, one per line with ``{}``."""
    return parse_templates(Path(path).read_text(encoding="utf-8"), str(path))


def read_class_names(path: str | Path, task: str = "") -> list[list[str]]:
    """Synonym lists (first = the class name) from a ``.txt`` or ``.json`` file, in label order."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        return _classes_from_json(json.loads(text), task, str(path))
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


def fill_template(template: str, name: str) -> str:
    """``template.format(name)``, writing "an" for "a" before a vowel ("a photo of an oval")."""
    if name[:1].lower() in "aeiou":
        template = re.sub(r"(^|\s)([Aa]) \{\}", lambda m: f"{m.group(1)}{m.group(2)}n {{}}", template)
    return template.replace("{}", name)


@torch.no_grad()
def build_classifier(model: CLIPModel, tokenizer: Tokenizer, classes: Sequence[Sequence[str]],
                     templates: Sequence[str], device: torch.device | str = "cpu",
                     batch_size: int = 512) -> torch.Tensor:
    """(num_classes, embed_dim) unit vectors: mean of normalised prompt embeddings, renormalised."""
    device = torch.device(device)
    weights = []
    for synonyms in classes:
        prompts = [fill_template(t, name) for name in synonyms for t in templates]
        embeddings = torch.cat([
            model.encode_texts(tokenizer(prompts[i : i + batch_size]).to(device), normalize=True).float()
            for i in range(0, len(prompts), batch_size)
        ])
        weights.append(F.normalize(embeddings.mean(dim=0), dim=-1))
    return torch.stack(weights)


def accuracy_counts(logits: torch.Tensor, labels: torch.Tensor, topk: Sequence[int] = (1, 5)) -> dict[int, int]:
    """Number of samples whose label is among the top-k scores, per k (k capped at the classes)."""
    counts = {}
    largest = min(max(topk), logits.shape[1])
    top = logits.topk(largest, dim=1).indices
    for k in topk:
        counts[k] = int((top[:, : min(k, largest)] == labels[:, None]).any(dim=1).sum())
    return counts


@torch.no_grad()
def zeroshot_accuracy(model: CLIPModel, classifier: torch.Tensor, loader, task: str, device: torch.device | str,
                      precision_dtype: torch.dtype | None = None, max_images: int = 0) -> dict[str, Any]:
    """Top-1/top-5 (percent) and mean per-class top-1 of the classifier on a loader of images."""
    device = torch.device(device)
    num_classes = classifier.shape[0]
    total, skipped = 0, 0
    hits = {1: 0, 5: 0}
    per_class_hits = torch.zeros(num_classes)
    per_class_total = torch.zeros(num_classes)
    for batch in loader:
        skipped += len(batch.get("_skipped", []))
        if "image" not in batch:
            continue
        images, labels = batch["image"].to(device), batch["label"].to(device)
        if (labels < 0).any() or (labels >= num_classes).any():
            raise ValueError(f"labels of task {task!r} go beyond the {num_classes} class names given")
        autocast = torch.autocast(device.type, dtype=precision_dtype) if precision_dtype else nullcontext()
        with autocast:
            features = model.encode_images(images, normalize=True)
        logits = features.float() @ classifier.t()
        for k, count in accuracy_counts(logits, labels).items():
            hits[k] += count
        correct = (logits.argmax(dim=1) == labels).float().cpu()
        per_class_total += torch.bincount(labels.cpu(), minlength=num_classes).float()
        per_class_hits += torch.bincount(labels.cpu(), weights=correct, minlength=num_classes)
        total += len(labels)
        if max_images and total >= max_images:
            break
    if total == 0:
        raise ValueError("no labelled images were evaluated")
    seen = per_class_total > 0
    return {
        "top1": 100.0 * hits[1] / total,
        "top5": 100.0 * hits[5] / total,
        "mean_per_class_top1": float(100.0 * (per_class_hits[seen] / per_class_total[seen]).mean()),
        "num_images": total,
        "skipped": skipped,
    }


def labelled_images(transform, task: str):
    """Record -> {image, label}; a record without the task's label is an error, not a drop."""
    from ..data.records import BadSample

    def apply(record) -> dict[str, Any]:
        if task not in record.labels:
            raise BadSample(record.key, "missing_label", f"no '{task}' label")
        return {"image": transform(record.image), "label": int(record.labels[task])}

    return apply


def source_classes(source: Any, task: str) -> list[list[str]]:
    """Synonym lists of a source's task (``synonyms`` when it has them, else ``class_names``)."""
    synonyms = (getattr(source, "synonyms", None) or {}).get(task)
    if synonyms:
        return [list(s) for s in synonyms]
    names = (getattr(source, "class_names", None) or {}).get(task)
    if names:
        return [[n] for n in names]
    raise ValueError(f"the data has no class names for task {task!r}: pass classes=FILE")


# ------------------------------------------------------------------------------ command


@dataclass
class ZeroShotConfig:
    """``prepretrain zeroshot``: evaluate a LiT/CLIP model on labelled images, zero-shot."""

    stage_name = "zeroshot"

    model: str = ""  # LiT run directory, clip.safetensors, or an official MAWS CLIP file
    data: str = "synthetic"  # "synthetic" or a labelled folder / manifest / shards
    split: str = "val"
    task: str = "coarse"  # label task (synthetic: coarse | fine; image folders: label)
    classes: str = ""  # class names (+ synonyms) file; empty = the data's own names and synonyms
    templates: str = ""  # templates file; empty = the shipped ImageNet-style set
    tokenizer: str = ""  # XLM-R SentencePiece .model (needed for official MAWS CLIP files)
    image_size: int = 0  # 0 = the model's resolution
    num_images: int = 4000  # synthetic: size of the training split (val/test sized from it)
    max_images: int = 0  # evaluate at most this many images; 0 = the whole split
    batch_size: int = 256
    num_workers: int = 0
    device: str = "auto"
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    out_dir: str = ""  # default: RUN_DIR/zeroshot, or runs/zeroshot for a file

    def validate(self) -> None:
        if not self.model:
            raise ConfigError("model", "give a LiT run directory or a CLIP checkpoint file: model=runs/lit")
        if not Path(self.model).exists():
            raise ConfigError("model", f"{self.model} does not exist")
        for key in ("classes", "templates", "tokenizer"):
            value = getattr(self, key)
            if value and not Path(value).is_file():
                raise ConfigError(key, f"file not found: {value}")
        for key in ("batch_size", "num_images"):
            if getattr(self, key) <= 0:
                raise ConfigError(key, f"must be > 0, got {getattr(self, key)}")
        for key in ("image_size", "max_images", "num_workers"):
            if getattr(self, key) < 0:
                raise ConfigError(key, f"must be >= 0, got {getattr(self, key)}")
        if self.precision not in ("auto", "bf16", "fp32"):
            raise ConfigError("precision", f"must be auto, bf16 or fp32; got '{self.precision}'")


def run_zeroshot(cfg: ZeroShotConfig) -> dict[str, Any]:
    """Load the model, build the classifier, score the split, write ``results.json``."""
    from ..models.clip import load_clip
    from ..train.distributed import pick_device

    start = time.perf_counter()
    device = pick_device(cfg.device)
    model, tokenizer, info = load_clip(cfg.model, tokenizer=cfg.tokenizer, device=device)
    image_size = cfg.image_size or info["image_size"]
    source = open_data(cfg.data, split=cfg.split, image_size=image_size, num_images=cfg.num_images)
    classes = read_class_names(cfg.classes, cfg.task) if cfg.classes else source_classes(source, cfg.task)
    templates = read_templates(cfg.templates) if cfg.templates else default_templates()
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    dtype = torch.bfloat16 if use_bf16 else None
    classifier = build_classifier(model, tokenizer, classes, templates, device)
    dataset = RecordDataset(source, labelled_images(eval_transform(image_size, crop_fraction=1.0), cfg.task))
    loader = eval_loader(dataset, cfg.batch_size, cfg.num_workers)
    scores = zeroshot_accuracy(model, classifier, loader, cfg.task, device, dtype, cfg.max_images)
    results = {
        "evaluation": "zeroshot",
        "model": info["path"],
        "data": cfg.data,
        "split": cfg.split,
        "task": cfg.task,
        "num_classes": len(classes),
        "num_templates": len(templates),
        "image_size": image_size,
        **{k: v for k, v in scores.items() if k != "skipped"},
        "skipped_images": scores["skipped"],
        "seconds": time.perf_counter() - start,
    }
    out_dir = Path(cfg.out_dir) if cfg.out_dir else (
        Path(cfg.model) / "zeroshot" if Path(cfg.model).is_dir() else Path("runs/zeroshot")
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(dump_config(cfg))
    tmp = out_dir / ".results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2))
    tmp.replace(out_dir / "results.json")  # atomic: a report never reads half a file
    results["out_dir"] = str(out_dir)
    return results


ZEROSHOT_EPILOG = """\
Examples:
  prepretrain zeroshot model=runs/lit
  prepretrain zeroshot model=runs/lit task=fine
  prepretrain zeroshot model=runs/lit data=/data/pets split=test task=label classes=pets.txt templates=t.txt
  prepretrain zeroshot model=vit_b16_xlmr_b.pt tokenizer=xlmr.sentencepiece.bpe.model image_size=224 \\
      data=/data/imagenet split=val task=label classes=imagenet_classes.txt device=cuda
Class files: one class per line, synonyms separated by commas (or JSON). Templates: one per line with {}.
"""


def _zeroshot_arguments(parser: argparse.ArgumentParser) -> None:
    from dataclasses import fields

    from prepretrain.config import add_config_arguments

    add_config_arguments(parser)
    keys = ", ".join(f.name for f in fields(ZeroShotConfig))
    parser.epilog = ZEROSHOT_EPILOG + f"Keys: {keys}\n"


def _zeroshot_run(args: argparse.Namespace) -> int:
    from ..config import build_config, dump_config

    cfg = build_config(ZeroShotConfig, args.config, args.overrides)
    if args.print_config:
        print(dump_config(cfg), end="")
        return 0
    results = run_zeroshot(cfg)
    print(f"zero-shot {results['task']} on {results['data']}/{results['split']}: top-1 {results['top1']:.2f}%  "
          f"top-5 {results['top5']:.2f}%  ({results['num_images']} images, {results['num_classes']} classes, "
          f"{results['num_templates']} templates) -> {results['out_dir']}/results.json")
    return 0


ZEROSHOT_COMMAND: dict[str, Any] = {
    "help": "zero-shot classification with a LiT/CLIP model (class names x synonyms x templates)",
    "add_arguments": _zeroshot_arguments,
    "run": _zeroshot_run,
}

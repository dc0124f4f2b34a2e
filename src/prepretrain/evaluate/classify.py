"""Score a trained classifier on a labelled set, or label a folder (``prepretrain classify``).

The model is any classifier :mod:`prepretrain.models.classifier` resolves (a finetune run, a
released IN-1k finetune, a timm/SWAG/torchvision classifier file); the data is any source
``data=`` opens, the benchmarks' release layouts included (:mod:`prepretrain.data.readers.releases`).
The model's outputs and the set's classes are matched **by class id**, never by position, so a
model trained on ``train/<wnid>/`` folders scores ImageNet-v2 (folders ``0`` ... ``999``), a flat
ImageNet val, ReaL and ObjectNet correctly, and a set that covers only some of the model's
classes works. A set class the model has no output for is refused before any image is read.

Protocols:

* **top-1 / top-5**: the prediction is the model's highest output over *all* its classes; it is
  right when that output's class is the image's class (or one of the classes the set's class
  covers). ``restrict=true`` predicts among the set's classes only (ImageNet-A/R style).
* **ObjectNet** (``restrict=auto`` turns it on for sets whose classes cover several model
  classes): each of its 113 classes scores as the maximum logit over its ImageNet classes and
  the prediction is the best of those 113; images of ObjectNet classes outside ImageNet are left
  out by the reader; a 2 px border is cropped off every image.
* **ReaL** (``real_labels=real.json`` or ``builtin``): top-1 is right when the predicted
  ImageNet class is in the image's list of valid labels; images whose list is empty are left out
  (``real_top1`` over ``real_images``).

Writes ``results.json`` and ``predictions.csv`` (one row per image: ``path``, ``target`` and
``target_name`` (empty when unlabelled), then ``top1`` ... ``top5`` as class ids with
``*_name`` and ``*_score`` (softmax probability), and ``real`` (the ReaL list) when asked).
"""

from __future__ import annotations

import csv
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError, dump_config
from ..data.images.transforms import crop_eval_transform, parse_crop_fraction
from ..data.loader import RecordDataset, eval_loader
from ..data.readers.open import open_data, open_source, source_format
from ..data.readers.releases import LAYOUTS, DataLayoutError, RealLabels, display_names, labels_present
from ..data.records import Record
from ..files import atomic_path, write_json, write_text
from ..models.classifier import ClassifierSpec, build_classifier, resolve_classifier
from ..models.resolve import check_weights
from ..models.vit import resolve_name
from ..train.distributed import pick_device
from .common import label_task

SOURCE_KINDS = ("folder", "imagefolder", "manifest", "shards")
TOP_K = 5


@dataclass
class ClassifyConfig:
    """``prepretrain classify``: a classifier on a labelled set (or a folder to label)."""

    stage_name = "classify"
    model: str = ""  # a finetune run dir, a classifier file, or a released finetune (maws:vit_h14_ft_in1k)
    data: str = ""  # a labelled set in any layout `prepretrain data stats` names, a folder of images, or synthetic
    split: str = "val"  # the split of data= (a layout without splits is read whole)
    layout: str = "auto"  # auto (from what is on disk) | imagenet-val | imagenet-v2 | objectnet | inaturalist |
    #                       food101 | imagefolder | folder | manifest | shards
    task: str = "auto"  # label task (synthetic: coarse | fine)
    real_labels: str = ""  # ImageNet-ReaL: a real.json, or builtin (timm's copy); adds real_top1
    classes: str = ""  # the model's class ids when its weights do not name them: a file (one per line) | imagenet1k
    restrict: str = "auto"  # predict among the set's classes only: auto (ObjectNet-style sets) | true | false
    arch: str = ""  # architecture when the weights do not say (vit_b16, ...); default: read off the weights
    image_size: int = 0  # 0 = the model's own resolution
    eval_crop: str = ""  # "" = the model's own transform | auto | squash | a crop fraction in (0, 1]
    num_images: int = 4000  # data=synthetic: the training split's size (the others sized from it)
    max_images: int = 0  # score at most this many images; 0 = all
    batch_size: int = 64
    num_workers: int = 2  # loader processes decoding images beside the model
    device: str = "auto"
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    progress: bool = True
    out_dir: str = ""  # default: <run>/classify/<data>-<split> for a run directory, else runs/classify

    # Every numeric key this class defines, with its interval (config.check_bounds).
    bounds = {
        "image_size": ">= 0", "num_images": "> 0", "max_images": ">= 0", "batch_size": "> 0", "num_workers": ">= 0",
    }
    choices = {"layout": ("auto", *LAYOUTS, *SOURCE_KINDS), "restrict": ("auto", "true", "false"),
               "precision": ("auto", "bf16", "fp32")}

    def validate(self) -> None:
        if not self.model:
            raise ConfigError("model", "name the classifier: model=runs/finetune, a weights file, or "
                                       "maws:vit_h14_ft_in1k")
        check_weights("model", self.model)
        if not self.data:
            raise ConfigError("data", "name the images: data=/data/imagenet (split=val), a folder, or synthetic")
        if self.data != "synthetic" and not Path(self.data).exists() and "{" not in self.data:
            raise ConfigError("data", f"not found: {self.data}")
        if self.real_labels and self.real_labels != "builtin" and not Path(self.real_labels).is_file():
            raise ConfigError("real_labels", f"file not found: {self.real_labels} (or builtin: timm's copy)")
        if self.arch:
            try:
                resolve_name(self.arch)
            except ValueError as error:
                raise ConfigError("arch", str(error)) from None
        if self.eval_crop and self.eval_crop not in ("auto", "squash"):
            try:
                parse_crop_fraction(self.eval_crop)
            except ValueError as error:
                raise ConfigError("eval_crop", str(error)) from None

    def run_dir(self) -> Path:
        if self.out_dir:
            return Path(self.out_dir)
        model = Path(self.model)
        if model.is_dir():
            name = "synthetic" if self.data == "synthetic" else Path(self.data.rstrip("/")).name
            return model / "classify" / f"{name}-{self.split}"
        return Path("runs/classify")


# ------------------------------------------------------------------------------ classes


@dataclass
class ClassMatch:
    """How the set's classes meet the model's outputs."""

    task: str  # "" when the data is unlabelled
    set_ids: list[str]
    set_names: list[str]
    columns: list[list[int]]  # per set class: the model outputs it covers
    restricted: bool
    absent: list[int] = field(default_factory=list)  # set classes the model has no output for (no images either)

    def model_to_set(self, num_outputs: int) -> torch.Tensor:
        """Per model output, the set class it belongs to (-1: none)."""
        table = torch.full((num_outputs,), -1, dtype=torch.long)
        absent = set(self.absent)
        for index, columns in enumerate(self.columns):
            if index in absent:  # its column is a placeholder, not an output of this class
                continue
            for column in columns:
                if table[column] < 0:
                    table[column] = index
        return table

    def gather_index(self) -> torch.Tensor:
        """(set classes, widest cover) model columns, padded by repeating a class's first column."""
        width = max(len(c) for c in self.columns)
        return torch.tensor([c + [c[0]] * (width - len(c)) for c in self.columns], dtype=torch.long)


def open_images(cfg: ClassifyConfig, image_size: int) -> Any:
    """The split of ``data=`` to score; a folder that cannot be read as data is a ``ConfigError`` naming it
    (an incomplete release layout stays a ``DataLayoutError``: exit code 3)."""
    if cfg.data == "synthetic":
        return open_data("synthetic", split=cfg.split, image_size=image_size, num_images=cfg.num_images)
    try:
        return open_source(cfg.data, split=cfg.split, kind=None if cfg.layout == "auto" else cfg.layout)
    except DataLayoutError:
        raise
    except (ValueError, FileNotFoundError, NotADirectoryError) as error:
        raise ConfigError("data", str(error)) from None


def match_classes(spec: ClassifierSpec, source: Any, task: str, restrict: str) -> ClassMatch:
    """Align the set's classes with the model's outputs by id; refuse a set class the model lacks."""
    if not task:
        return ClassMatch("", [], [], [], False)
    ids = [str(c) for c in source.class_names[task]]
    members = (getattr(source, "class_members", None) or {}).get(task) or [[c] for c in ids]
    output = {c: j for j, c in enumerate(spec.class_ids)}
    names = display_names(source, task)
    columns = [[output[m] for m in cover if m in output] for cover in members]
    present = labels_present(source, task)
    missing = [ids[i] for i in sorted(present) if not columns[i]]
    if missing:
        overlap = "none of them is" if len(missing) == len(present) else f"{len(missing)} of {len(present)} are not"
        raise ConfigError(
            "model", f"the classes of {getattr(source, 'root', 'the data')} must be outputs of the model, and "
                     f"{overlap}: {', '.join(missing[:5])} (model classes: {', '.join(spec.class_ids[:5])}, ...; "
                     f"from {spec.classes_from})")
    restricted = restrict == "true" or (restrict == "auto" and any(len(c) > 1 for c in members))
    # Classes without images and without outputs play no part: a placeholder column keeps the gather
    # rectangular, and their scores are set to -inf so a restricted prediction never picks them.
    absent = [i for i, c in enumerate(columns) if not c]
    columns = [c or [0] for c in columns]
    return ClassMatch(task, ids, names, columns, restricted, absent)


# ------------------------------------------------------------------------------ scoring


def prediction_header(with_real: bool) -> list[str]:
    """The columns of ``predictions.csv``."""
    header = ["path", "target", "target_name"]
    for k in range(1, TOP_K + 1):
        header += [f"top{k}", f"top{k}_name", f"top{k}_score"]
    return header + (["real"] if with_real else [])


class _Keyed:
    """Record -> image, label (-1: none) and the record's key (its path: the CSV's first column, ReaL's lookup)."""

    def __init__(self, transform: Any, task: str):
        self.transform = transform
        self.task = task

    def __call__(self, record: Record) -> dict[str, Any]:
        label = int(record.labels.get(self.task, -1)) if self.task else -1
        return {"image": self.transform(record.image), "label": label, "key": record.key}


def run_classify(cfg: ClassifyConfig) -> dict[str, Any]:
    """Score (or label) ``cfg.data`` with ``cfg.model``; writes results.json and predictions.csv."""
    start = time.perf_counter()
    spec = resolve_classifier(cfg.model, cfg.arch, cfg.image_size, cfg.classes, cfg.eval_crop)
    source = open_images(cfg, spec.image_size)
    task = label_task(source, cfg.task, cfg.data, required=False)
    match = match_classes(spec, source, task, cfg.restrict)
    real = RealLabels(cfg.real_labels) if cfg.real_labels else None
    if real is not None and match.restricted:
        raise ConfigError("real_labels", "ReaL scores predictions over the 1000 ImageNet classes: not with restrict")
    run_dir = cfg.run_dir()
    write_text(run_dir / "config.yaml", dump_config(cfg))
    device = pick_device(cfg.device)
    use_bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    net = build_classifier(spec).to(device)
    transform = crop_eval_transform(spec.image_size, spec.eval_crop)
    dataset = RecordDataset(source, _Keyed(transform, task))
    batches: Any = eval_loader(dataset, cfg.batch_size, cfg.num_workers)
    if cfg.progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc=f"classify {Path(str(cfg.data)).name}", unit="batch", dynamic_ncols=True)
    counts = {"images": 0, "labelled": 0, "top1": 0, "top5": 0, "real_images": 0, "real_top1": 0}
    skipped: dict[str, int] = {}
    model_to_set = match.model_to_set(spec.num_classes)
    gather = match.gather_index() if match.restricted else None
    out_names = list(spec.class_names)
    # predictions.csv streams to a temporary file, renamed when every image is scored (atomic_path)
    with atomic_path(run_dir / "predictions.csv") as tmp, open(tmp, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(prediction_header(real is not None))
        for batch in batches:
            for reason, _ in batch.get("_skipped", []):
                skipped[reason] = skipped.get(reason, 0) + 1
            if "image" not in batch:
                continue
            with torch.inference_mode(), (torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16
                                          else nullcontext()):
                logits = net(batch["image"].to(device, non_blocking=True)).float().cpu()
            _score(batch, logits, match, model_to_set, gather, out_names, spec, real, counts, writer)
            if cfg.max_images and counts["images"] >= cfg.max_images:
                break
    seconds = time.perf_counter() - start
    results = _results(cfg, spec, source, match, counts, skipped, seconds)
    write_json(run_dir / "results.json", results)
    return {**results, "out_dir": str(run_dir)}


def _score(batch: dict[str, Any], logits: torch.Tensor, match: ClassMatch, model_to_set: torch.Tensor,
           gather: torch.Tensor | None, out_names: list[str], spec: ClassifierSpec, real: RealLabels | None,
           counts: dict[str, int], writer: Any) -> None:
    labels = batch["label"]
    if gather is not None:  # restricted: one score per set class (the max over the outputs it covers)
        scores = logits[:, gather].amax(dim=2)
        scores[:, match.absent] = float("-inf")
        ids, names = match.set_ids, match.set_names
        to_set = None
    else:
        scores = logits
        ids, names = list(spec.class_ids), out_names
        to_set = model_to_set
    probs = scores.softmax(dim=1)
    k = min(TOP_K, probs.shape[1])
    top_p, top_i = probs.topk(k, dim=1)
    predicted_set = top_i if to_set is None else to_set[top_i]
    labelled = labels >= 0
    counts["images"] += len(labels)
    counts["labelled"] += int(labelled.sum())
    hits = (predicted_set == labels.view(-1, 1)) & labelled.view(-1, 1)
    counts["top1"] += int(hits[:, 0].sum())
    counts["top5"] += int(hits.any(dim=1).sum())
    for row in range(len(labels)):
        target = int(labels[row])
        values: list[Any] = [batch["key"][row], match.set_ids[target] if target >= 0 else "",
                             match.set_names[target] if target >= 0 else ""]
        for j in range(TOP_K):
            if j < k:
                column = int(top_i[row, j])
                values += [ids[column], names[column], f"{float(top_p[row, j]):.6f}"]
            else:
                values += ["", "", ""]
        if real is not None:
            valid = real.of(batch["key"][row])
            if valid is not None:
                counts["real_images"] += 1
                counts["real_top1"] += int(spec.class_ids[int(top_i[row, 0])] in valid)
            values.append(" ".join(valid or []))
        writer.writerow(values)


def _results(cfg: ClassifyConfig, spec: ClassifierSpec, source: Any, match: ClassMatch, counts: dict[str, int],
             skipped: dict[str, int], seconds: float) -> dict[str, Any]:
    results: dict[str, Any] = {
        "evaluation": "classify",
        "model": str(spec.path),
        "arch": spec.model,
        "image_size": spec.image_size,
        "eval_crop": spec.eval_crop,
        "eval_transform_from": spec.eval_from,
        "model_classes": spec.num_classes,
        "model_classes_from": spec.classes_from,
        "data": cfg.data,
        "split": cfg.split,
        "format": source_format(source),
        "task": match.task,
        "num_images": counts["images"],
    }
    if match.task:
        labelled = counts["labelled"]
        results.update({
            "num_classes": len(match.set_ids),
            "restricted_to_set_classes": match.restricted,
            "labelled_images": labelled,
            "top1": 100.0 * counts["top1"] / labelled if labelled else float("nan"),
            "top5": 100.0 * counts["top5"] / labelled if labelled else float("nan"),
        })
    if cfg.real_labels:
        real_images = counts["real_images"]
        results["real_top1"] = 100.0 * counts["real_top1"] / real_images if real_images else float("nan")
        results["real_images"] = real_images
    results["skipped_images"] = skipped
    results["left_out"] = dict(getattr(source, "left_out", {}) or {})
    results["seconds"] = seconds
    results["images_per_second"] = counts["images"] / seconds if seconds > 0 else 0.0
    results["predictions"] = "predictions.csv"
    return results


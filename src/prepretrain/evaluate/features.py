"""Frozen features: computed once per encoder x split, cached on disk, shared by evaluators.

The encoder is the expensive part of a linear probe, a kNN or a low-shot sweep (5 splits x 3
shot counts); the classifiers on top are cheap. So the forward pass runs once, both poolings
(CLS token and mean of patch tokens, after the final norm) are kept, and every label task of
the records is stored, so that one cache file serves every pooling and task.

A cache file is a safetensors file named by a hash of everything the numbers depend on
(encoder weights hash, architecture, resolution, dataset split and size, precision, this
module's version); it is written to a temporary name and renamed, so a crash never leaves a
truncated file that a later run would trust.
"""

from __future__ import annotations

import hashlib
import json
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from ..data.images.transforms import eval_transform
from ..data.loader import RecordDataset, eval_loader
from ..data.records import MapSource, Record
from ..files import read_safetensors, save_safetensors

FEATURE_VERSION = "1"  # bump when extraction changes what the numbers mean


@dataclass
class LabeledFeatures:
    """Rows of one split that carry a label of the task: features, labels, source indices."""

    x: torch.Tensor  # (N, D) float32
    y: torch.Tensor  # (N,) int64
    indices: torch.Tensor  # (N,) index of each row in the split's source

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, rows: torch.Tensor) -> LabeledFeatures:
        return LabeledFeatures(self.x[rows.to(self.x.device)], self.y[rows.to(self.y.device)],
                               self.indices[rows.to(self.indices.device)])


@dataclass
class Features:
    """Frozen features of every readable sample of one split (unreadable ones are counted)."""

    token: torch.Tensor  # (N, D) CLS token after the final norm
    avg: torch.Tensor  # (N, D) mean of the patch tokens after the final norm
    labels: dict[str, torch.Tensor]  # task -> (N,) class index, -1 where a record has none
    indices: torch.Tensor  # (N,) source index of each row
    skipped: int = 0

    def labeled(self, task: str, pool: str = "token") -> LabeledFeatures:
        if task not in self.labels:
            raise KeyError(f"the features have no labels for task {task!r}; tasks: {sorted(self.labels)}")
        x = self.token if pool == "token" else self.avg
        keep = self.labels[task] >= 0
        return LabeledFeatures(x[keep].float(), self.labels[task][keep].long(), self.indices[keep])


def feature_cache_key(**fields: Any) -> str:
    """A stable hash of everything the features depend on (the cache file's name)."""
    text = json.dumps({"version": FEATURE_VERSION, **fields}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def label_tasks(source: MapSource) -> list[str]:
    return sorted((getattr(source, "class_names", None) or {}).keys())


class _IndexedRecords(Dataset):
    """Adds each sample's source index, so rows stay traceable when unreadable samples are skipped."""

    def __init__(self, dataset: RecordDataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        item = self.dataset[index]
        if "_bad" not in item:
            item["index"] = index
        return item


def labeled_image_transform(image_size: int, tasks: list[str], transform=None):
    """Record -> {"image", "labels"}: the eval transform and one label per task (-1 = absent)."""
    transform = transform or eval_transform(image_size)

    def apply(record: Record) -> dict[str, Any]:
        labels = torch.tensor([int(record.labels.get(task, -1)) for task in tasks], dtype=torch.long)
        return {"image": transform(record.image), "labels": labels}

    return apply


@torch.no_grad()
def extract_features(model: nn.Module, source: MapSource, image_size: int, *, batch_size: int = 256,
                     device: torch.device | str = "cpu", dtype: torch.dtype | None = None, num_workers: int = 0,
                     description: str | None = None) -> Features:
    """Run the frozen ``model`` (a timm ViT) once over ``source`` and pool its final tokens."""
    device = torch.device(device)
    tasks = label_tasks(source)
    dataset = _IndexedRecords(RecordDataset(source, labeled_image_transform(image_size, tasks)))
    loader = eval_loader(dataset, batch_size=batch_size, num_workers=num_workers)
    prefix = getattr(model, "num_prefix_tokens", 1)
    token, avg, labels, indices, skipped = [], [], [], [], 0
    batches = loader
    if description:
        from tqdm.auto import tqdm

        batches = tqdm(loader, desc=description, unit="batch", dynamic_ncols=True)
    was_training = model.training
    model.eval()
    for batch in batches:
        skipped += len(batch.get("_skipped", []))
        if "image" not in batch:
            continue
        images = batch["image"].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext():
            tokens = model.forward_features(images)
        token.append(tokens[:, 0].float().cpu())
        avg.append(tokens[:, prefix:].mean(dim=1).float().cpu())
        labels.append(batch["labels"])
        indices.append(batch["index"])
    model.train(was_training)
    if not token:
        raise ValueError(f"no readable images in {source!r}")
    label_matrix = torch.cat(labels)
    return Features(
        token=torch.cat(token), avg=torch.cat(avg),
        labels={task: label_matrix[:, i].contiguous() for i, task in enumerate(tasks)},
        indices=torch.cat(indices).long(), skipped=skipped,
    )


def save_features(path: Path, features: Features, info: dict[str, str] | None = None) -> None:
    """One safetensors file per encoder x split (written atomically)."""
    tensors = {"token": features.token.contiguous(), "avg": features.avg.contiguous(),
               "indices": features.indices.contiguous()}
    tensors.update({f"label.{task}": values.contiguous() for task, values in features.labels.items()})
    metadata = {"skipped": str(features.skipped), "version": FEATURE_VERSION, **(info or {})}
    save_safetensors(path, tensors, metadata)


def load_features(path: Path) -> Features | None:
    """Read a cache file; None when it is unreadable (it is then recomputed, never trusted)."""
    try:
        tensors, metadata = read_safetensors(path)
    except Exception:  # noqa: BLE001 - a corrupt cache file is recomputed, whatever the error
        return None
    labels = {key[len("label."):]: value for key, value in tensors.items() if key.startswith("label.")}
    return Features(tensors["token"], tensors["avg"], labels, tensors["indices"], int(metadata.get("skipped", 0)))

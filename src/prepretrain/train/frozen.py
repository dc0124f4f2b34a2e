"""Inputs a frozen part of the model turns into features once, before training.

LiT trains a text tower against a locked image tower: without augmentation an image's
features never change, so computing them every step wastes most of the step. A stage declares
:class:`FrozenInputs` in its ``TrainData``; the training loop (not the stage) runs the frozen
part over the data once, counts unreadable samples under the run's one bad-data rule, keeps the
result in the run directory (reused on resume while its key matches) and trains from memory.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.utils.data import Dataset

from .. import files
from ..data.loader import eval_loader
from ..data.records import BadSample, SkipCounter
from .distributed import gathered
from .limits import TooManyBadSamples, check_bad_fraction
from .run import Run


@dataclass
class FrozenInputs:
    """What to precompute: ``dataset`` yields ``{"image", ...}``; ``encode(model, images)`` gives
    the features stored under ``field``; other fields of the samples are kept as they are."""

    dataset: Dataset
    encode: Callable[[nn.Module, torch.Tensor], torch.Tensor]
    key: str  # identity of data, frozen weights and preprocessing: a different key recomputes
    column: str = "image_features"
    file: str = "feature_cache.safetensors"
    skipped: dict[str, int] = field(default_factory=dict)  # filled in when computed or read: reason -> count


class CachedInputs(Dataset):
    """Precomputed rows held in memory; items are indices or the loader's (index, seed) pairs."""

    def __init__(self, tensors: dict[str, torch.Tensor]):
        lengths = {name: len(value) for name, value in tensors.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"cached inputs of different lengths: {lengths}")
        self.tensors = tensors

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        index = item[0] if isinstance(item, tuple) else item
        return {name: value[index] for name, value in self.tensors.items()}


def compute_frozen_inputs(run: Run, model: nn.Module, frozen: FrozenInputs, num_workers: int,
                          max_bad_fraction: float) -> tuple[CachedInputs, int]:
    """The cached dataset (and its length): read from the run's cache file when its key
    matches, else computed by ``frozen.encode`` over every sample and saved."""
    path = run.path(frozen.file)
    if path.is_file() and files.read_metadata(path).get("key") == frozen.key:
        tensors, meta = files.read_safetensors(path)
        if frozen.column in tensors:
            frozen.skipped = json.loads(meta.get("skipped", "{}"))
            run.print(f"image features read from {path}")
            cached = CachedInputs(tensors)
            return cached, len(cached)
    device = next(model.parameters()).device
    start = time.perf_counter()
    columns: dict[str, list[torch.Tensor]] = {}
    skips = SkipCounter()
    for batch in eval_loader(frozen.dataset, batch_size=256, num_workers=num_workers):
        bad = batch.pop("_skipped", [])
        for reason, key in bad:
            skips.skip(BadSample(key, reason))
        skips.seen += batch.pop("_seen") - len(bad)
        if "image" not in batch:
            continue
        with torch.no_grad(), gathered(model):
            features = frozen.encode(model, batch.pop("image").to(device))
        columns.setdefault(frozen.column, []).append(features.float().cpu())
        for name, value in batch.items():
            if isinstance(value, torch.Tensor):
                columns.setdefault(name, []).append(value)
    frozen.skipped = dict(skips.skipped)
    if not columns:
        raise TooManyBadSamples(f"no usable samples to precompute features from (skipped: {frozen.skipped})")
    check_bad_fraction(skips, max_bad_fraction, min_seen=1, where="frozen features: ")
    tensors = {name: torch.cat(parts).contiguous() for name, parts in columns.items()}
    cached = CachedInputs(tensors)
    run.print(f"cached image features of {len(cached)} images in {time.perf_counter() - start:.1f}s"
              + (f" (skipped {frozen.skipped})" if frozen.skipped else ""))
    run.save_weights(frozen.file, tensors, {"key": frozen.key, "skipped": json.dumps(frozen.skipped)})
    return cached, len(cached)


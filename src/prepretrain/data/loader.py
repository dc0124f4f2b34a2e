"""From a source of records to batches of tensors, reproducibly and resumably.

The training stream is a sequence of *global sample positions* 0, 1, 2, ... Position ``p``
maps to a source index through a per-epoch permutation (or weighted draw) seeded by
``(seed, epoch)``, and to an augmentation seed derived from ``(seed, p)``. Each optimizer
step consumes ``batch_size`` consecutive positions, split across ranks and accumulation
steps. Hence: the data position of a run is just ``step * batch_size``; a resumed run sees
exactly what an uninterrupted one would; and the global batch is the same on 1 or N ranks.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, default_collate

from .records import BadSample, MapSource, Record

SEED_MIX = 0x9E3779B1  # spreads (seed, position) pairs so neighbouring seeds do not correlate


def sample_seed(seed: int, position: int) -> int:
    return (seed * SEED_MIX + position * 2654435761 + 12345) % (2**63 - 1)


class SampleStream:
    """Batch sampler over global positions for one rank: yields ``[(index, aug_seed), ...]``.

    ``weights`` (optional, one per source index) turn each epoch into ``epoch_size`` weighted
    draws with replacement (WSP resampling); otherwise an epoch is a permutation of the source.
    """

    def __init__(
        self,
        num_samples: int,
        micro_batch_size: int,
        *,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        start_position: int = 0,
        shuffle: bool = True,
        weights: torch.Tensor | None = None,
        epoch_size: int | None = None,
    ):
        if num_samples <= 0:
            raise ValueError("the training data is empty")
        self.num_samples = num_samples
        self.micro_batch_size = micro_batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.start_position = start_position
        self.shuffle = shuffle
        self.weights = weights
        self.epoch_size = epoch_size or num_samples
        self._epoch = -1
        self._order: torch.Tensor | None = None

    def order(self, epoch: int) -> torch.Tensor:
        """Source indices of one epoch, in the order they are visited."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        if self.weights is not None:
            return torch.multinomial(self.weights, self.epoch_size, replacement=True, generator=generator)
        if not self.shuffle:
            return torch.arange(self.num_samples)
        return torch.randperm(self.num_samples, generator=generator)

    def index_at(self, position: int) -> int:
        epoch, offset = divmod(position, self.epoch_size)
        if epoch != self._epoch:
            self._order, self._epoch = self.order(epoch), epoch
        return int(self._order[offset])

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        position = self.start_position
        step = self.micro_batch_size * self.world_size
        while True:
            first = position + self.rank * self.micro_batch_size
            yield [(self.index_at(p), sample_seed(self.seed, p)) for p in range(first, first + self.micro_batch_size)]
            position += step


class RecordDataset(Dataset):
    """Applies a stage's transform to records; augmentation is seeded per sample position."""

    def __init__(self, source: MapSource, transform: Callable[[Record], dict[str, Any]]):
        self.source = source
        self.transform = transform

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, Any]:
        index, seed = item if isinstance(item, tuple) else (item, item)
        python_state = random.getstate()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                random.seed(seed)
                try:
                    return self.transform(self.source.get(index))
                except BadSample as error:
                    return {"_bad": (error.reason, error.key)}
        finally:
            random.setstate(python_state)


def collate_skipping_bad(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack good samples; report bad ones in ``_skipped`` so the engine can count them."""
    good = [item for item in items if "_bad" not in item]
    bad = [item["_bad"] for item in items if "_bad" in item]
    batch = default_collate(good) if good else {}
    batch["_skipped"] = bad
    batch["_seen"] = len(items)
    return batch


def train_loader(
    dataset: Dataset, stream: SampleStream, num_workers: int = 0, pin_memory: bool = False
) -> DataLoader:
    """A DataLoader over ``stream``; its own generator keeps the global RNG untouched (resume)."""
    return DataLoader(
        dataset,
        batch_sampler=stream,
        num_workers=num_workers,
        collate_fn=collate_skipping_bad,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(0),
        persistent_workers=False,
        prefetch_factor=4 if num_workers else None,
    )


def eval_loader(dataset: Dataset, batch_size: int, num_workers: int = 0) -> DataLoader:
    """Deterministic, in-order batches for evaluation (and feature extraction)."""
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate_skipping_bad,
        generator=torch.Generator().manual_seed(0),
    )


def open_data(spec: str, *, split: str = "train", image_size: int = 32, num_images: int = 4000, seed: int = 0,
              min_size_hint: int | None = None) -> MapSource:
    """``synthetic`` -> the embedded dataset; anything else -> a folder, manifest or shards."""
    if spec == "synthetic":
        from .synthetic import SyntheticSource, synthetic_split_sizes

        sizes = synthetic_split_sizes(num_images)
        return SyntheticSource(num_images=sizes[split], image_size=image_size, seed=seed, split=split)
    from .sources import open_source

    return open_source(spec, split=split, min_size_hint=min_size_hint)

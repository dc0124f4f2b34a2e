"""From a source of records to batches of tensors, reproducibly and resumably.

The training stream is a sequence of *global sample positions* 0, 1, 2, ... Position ``p``
maps to a source index through a per-epoch permutation (or weighted draw) seeded by
``(seed, epoch)``, and to an augmentation seed derived from ``(seed, p)``. Each optimizer
step consumes ``batch_size`` consecutive positions, split across ranks and accumulation
steps. Hence: the data position of a run is just ``step * batch_size``; a resumed run sees
exactly what an uninterrupted one would; and the global batch is the same on 1 or N ranks.

Iterable sources (WebDataset shards, :class:`~prepretrain.data.shards.reader.ShardSource`) have
no random access, so :func:`train_loader` reads them through :class:`ShardStream` instead:

* **Readers.** Each rank has ``W = max(num_workers, 1)`` readers; reader ``i`` of rank ``r``
  reads the shards dealt to slot ``r * W + i`` (``ShardSource.iter_outcomes``), epoch after
  epoch, as one endless stream of *sample positions* (a bad sample takes a position too,
  and reaches the batch as a counted skip). Within each of its epochs a reader sees each of
  its samples exactly once, so across all readers every sample is read once per epoch.
  Readers start their next epoch independently when their shards run out; because no
  reader ever ends, every rank always has a next batch (no DDP hang from unequal shards).
* **Batches.** The DataLoader takes batches from its workers round-robin, so the rank's
  micro-batch ``k`` is the ``k // W``-th batch of reader ``k % W``: ``micro_batch_size``
  consecutive positions of its stream. A sample's augmentation seed is
  ``sample_seed(seed, p)`` with ``p`` the global position the map-style stream gives that
  slot (``k * world_size * micro + rank * micro + j``).
* **Resume.** ``start_position = step * batch_size`` means the rank has consumed
  ``k0 = start_position // (world_size * micro_batch_size)`` micro-batches, so reader ``i``
  has consumed ``ceil((k0 - i) / W)`` batches: it skips that many times ``micro`` positions,
  which become (epochs, offset) through its per-epoch counts (``index.json``; without one
  the tar headers are read, nothing is decoded). DataLoader worker ``w`` then plays reader
  ``(w + k0) % W`` so the first batch it delivers is micro-batch ``k0``. Hence resuming
  with the same world size, worker count and micro-batch size continues the exact stream.
* **Changed layout.** With another world size or worker count the readers are different
  slots; each new reader skips the share of ``start_position`` it would have consumed had
  the new layout been used from the start. The number of samples consumed is kept, but in
  the epochs in progress some samples are then seen twice and others not at all; from each
  reader's next epoch on, every sample is again read once per epoch.

Where the records come from is decided beside the readers
(:mod:`prepretrain.data.readers.open`); the readers never import this module.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, default_collate, get_worker_info

from prepretrain.data.records import BadSample, Record
from prepretrain.data.shards.reader import ShardProblem

SHARD_SHUFFLE_BLOCK = 256  # encoded samples per shuffled block of a shard reader (memory: one block per worker)

SEED_MIX = 0x9E3779B1  # spreads (seed, position) pairs so neighbouring seeds do not correlate


def sample_seed(seed: int, position: int) -> int:
    return (seed * SEED_MIX + position * 2654435761 + 12345) % (2**63 - 1)


# Above this many samples an epoch's order is computed per position (a keyed permutation, or
# weighted draws per block) instead of held whole: a randperm of 3 * 10^9 indices is 24 GB per rank.
LARGE_SOURCE = 1 << 24
DRAW_BLOCK = 1 << 20


class KeyedPermutation:
    """A pseudo-random permutation of ``range(n)`` computed per element in O(1) memory: a
    4-round Feistel network on the smallest even power of two >= n, walked until the value falls
    below n (cycle walking keeps it a bijection). Why: shuffling a billions-long epoch without
    materialising it, with exact resume (``at(position)`` is a pure function of the key)."""

    MASK64 = (1 << 64) - 1

    def __init__(self, n: int, key: int):
        self.n = n
        bits = max(2, (n - 1).bit_length())
        self.half = (bits + 1) // 2
        self.mask = (1 << self.half) - 1
        self.keys = [(key * 0x9E3779B97F4A7C15 + round_ * 0xBF58476D1CE4E5B9 + 1) & self.MASK64 for round_ in range(4)]

    def _round(self, value: int, key: int) -> int:
        x = (value * 0x94D049BB133111EB + key) & self.MASK64
        x ^= x >> 31
        x = (x * 0xD6E8FEB86659FD93) & self.MASK64
        return (x ^ (x >> 29)) & self.mask

    def _encrypt(self, value: int) -> int:
        left, right = value >> self.half, value & self.mask
        for key in self.keys:
            left, right = right, left ^ self._round(right, key)
        return (left << self.half) | right

    def at(self, position: int) -> int:
        value = self._encrypt(position)
        while value >= self.n:
            value = self._encrypt(value)
        return value


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
        if self.shuffle and self.num_samples > LARGE_SOURCE:
            return self._large_index(epoch, offset)
        if epoch != self._epoch:
            self._order, self._epoch = self.order(epoch), epoch
        return int(self._order[offset])

    def _large_index(self, epoch: int, offset: int) -> int:
        """Sources above ``LARGE_SOURCE``: no epoch-long order in memory. Unweighted: a keyed
        permutation per epoch; weighted: draws by inverse CDF, generated one block of positions
        at a time from a generator seeded by (seed, epoch, block)."""
        key = self.seed * 1_000_003 + epoch
        if self.weights is None:
            if epoch != self._epoch:
                self._order, self._epoch = KeyedPermutation(self.num_samples, key), epoch
            return self._order.at(offset)
        block, within = divmod(offset, DRAW_BLOCK)
        if (epoch, block) != self._epoch:
            if getattr(self, "_cdf", None) is None:
                cdf = torch.cumsum(self.weights.double(), 0)
                self._cdf = cdf / cdf[-1]
            count = min(DRAW_BLOCK, self.epoch_size - block * DRAW_BLOCK)
            generator = torch.Generator().manual_seed(key * 1_000_003 + block)
            uniform = torch.rand(count, generator=generator, dtype=torch.float64)
            draws = torch.searchsorted(self._cdf, uniform, right=True).clamp_(max=self.num_samples - 1)
            self._order, self._epoch = draws, (epoch, block)
        return int(self._order[within])

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        position = self.start_position
        step = self.micro_batch_size * self.world_size
        while True:
            first = position + self.rank * self.micro_batch_size
            yield [(self.index_at(p), sample_seed(self.seed, p)) for p in range(first, first + self.micro_batch_size)]
            position += step


class RecordDataset(Dataset):
    """Applies a stage's transform to records; augmentation is seeded per sample position.

    ``source`` is map-style (``get``) or iterable (shards: ``iter_outcomes``); the latter is
    not indexable, and :func:`train_loader` / :func:`eval_loader` stream it instead.
    ``batch_transform`` (optional) runs on each collated batch inside the loader (in the
    worker): e.g. ``gpu.NormalizeImages()`` turns ``uint8`` images into normalised floats
    once per batch instead of once per sample.
    """

    def __init__(self, source: Any, transform: Callable[[Record], dict[str, Any]],
                 batch_transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None):
        self.source = source
        self.transform = transform
        self.batch_transform = batch_transform

    @property
    def is_iterable(self) -> bool:
        """True for sources without random access (shards), read as streams."""
        return not hasattr(self.source, "get") and hasattr(self.source, "iter_outcomes")

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, Any]:
        index, seed = item if isinstance(item, tuple) else (item, item)
        if self.is_iterable:
            raise TypeError(f"{self.source!r} has no random access; read it with train_loader or eval_loader")
        return _seeded(seed, lambda: self.transform(self.source.get(index)))

    def transform_record(self, record: Record, seed: int) -> dict[str, Any]:
        """The transform under torch and Python RNGs seeded by ``seed``; the caller's RNG state is kept."""
        return _seeded(seed, lambda: self.transform(record))


class ImageOnly:
    """Record -> ``{"image": transform(record.image)}``: for stages that need pixels only (a
    class, not a closure, so loader workers can pickle it under any start method)."""

    def __init__(self, transform: Callable[[Any], Any]):
        self.transform = transform

    def __call__(self, record: Record) -> dict[str, Any]:
        return {"image": self.transform(record.image)}


def _seeded(seed: int, make_item: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``make_item()`` with torch and Python RNGs seeded by ``seed``; a ``BadSample`` becomes ``{"_bad": ...}``."""
    python_state = random.getstate()
    try:
        with torch.random.fork_rng(devices=[]):
            # Only the CPU generator: torch.manual_seed would also queue a reseed of every
            # accelerator generator (formatting a stack trace each time, ~0.3 ms per sample)
            # and leave them reseeded, since fork_rng(devices=[]) restores the CPU state only.
            torch.random.default_generator.manual_seed(seed)
            random.seed(seed)
            try:
                return make_item()
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


def _collate_then(batch_transform: Callable[[dict[str, Any]], dict[str, Any]],
                  items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    batch = collate_skipping_bad(items)
    return batch_transform(batch) if len(batch["_skipped"]) < batch["_seen"] else batch


def _collate_for(dataset: Any) -> Callable[[Sequence[dict[str, Any]]], dict[str, Any]]:
    batch_transform = getattr(dataset, "batch_transform", None)
    if batch_transform is None:
        return collate_skipping_bad
    return functools.partial(_collate_then, batch_transform)  # a partial pickles for spawned workers


def _already_collated(batch: dict[str, Any]) -> dict[str, Any]:
    return batch


def _count_below(total: int, residue: int, modulus: int) -> int:
    """How many k in [0, total) have k % modulus == residue."""
    return max(0, (total - residue + modulus - 1) // modulus)


class ShardStream(IterableDataset):
    """One rank's micro-batches from an iterable source (shards), endless and resumable.

    See the module docstring for the reader layout, epochs and resume semantics. Yields
    collated batches (``collate_skipping_bad`` plus ``batch_transform``); shard-level
    problems (a missing or cut-off tar) are added to ``_skipped`` of the batch in which they
    surface, so the engine's skip count shows them.
    """

    def __init__(self, dataset: RecordDataset, stream: SampleStream, shuffle_block: int = SHARD_SHUFFLE_BLOCK):
        if stream.weights is not None:
            raise ValueError(
                "weighted resampling (per-sample weights) needs random access; it is not available for shards. "
                "Resample shards in the stream instead (ShardSource.repeats, e.g. hashtags.RepeatFactors), "
                "or use a manifest or image folder"
            )
        self.dataset = dataset
        self.stream = stream
        self.shuffle_block = shuffle_block
        self.collate = _collate_for(dataset)

    def reader_layout(self, worker_id: int, num_workers: int) -> tuple[int, int]:
        """(reader this worker plays, batches that reader consumed before ``start_position``)."""
        stream = self.stream
        consumed = stream.start_position // (stream.world_size * stream.micro_batch_size)
        reader = (worker_id + consumed) % num_workers
        return reader, _count_below(consumed, reader, num_workers)

    def _outcomes(self, reader: int, readers: int, skip: int) -> Iterator[Any]:
        """The reader's endless stream of outcomes, starting ``skip`` positions in."""
        source, stream = self.dataset.source, self.stream
        split = dict(rank=stream.rank, world_size=stream.world_size, worker_id=reader, num_workers=readers,
                     seed=stream.seed, shuffle=stream.shuffle)
        empty_epochs = 0
        for epoch in range(2**62):
            if skip:
                count = source.reader_count(epoch=epoch, **split)
                if skip >= count:
                    skip -= count
                    empty_epochs = empty_epochs + 1 if count == 0 else 0
                    self._check_not_starved(empty_epochs, reader, readers)
                    continue
            positions = 0
            for outcome in source.iter_outcomes(epoch=epoch, skip=skip, shuffle_block=self.shuffle_block, **split):
                positions += not _is_shard_problem(outcome)
                yield outcome
            empty_epochs = empty_epochs + 1 if positions == 0 and skip == 0 else 0
            self._check_not_starved(empty_epochs, reader, readers)
            skip = 0

    def _check_not_starved(self, empty_epochs: int, reader: int, readers: int) -> None:
        shards = len(getattr(self.dataset.source, "urls", ())) or 1
        if empty_epochs > (shards if self.stream.shuffle else 0) + 1:
            raise RuntimeError(
                f"rank {self.stream.rank} reader {reader} of {readers} got no samples in {empty_epochs} epochs: "
                f"{self.dataset.source!r} has too few (non-empty) shards or samples for "
                f"{self.stream.world_size} ranks x {readers} loader workers; use fewer workers or more shards"
            )

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker = get_worker_info()
        worker_id, readers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        reader, batches_done = self.reader_layout(worker_id, readers)
        stream = self.stream
        micro = stream.micro_batch_size
        outcomes = self._outcomes(reader, readers, batches_done * micro)
        for batch_index in range(batches_done, 2**62):
            rank_batch = batch_index * readers + reader
            first = rank_batch * stream.world_size * micro + stream.rank * micro
            items: list[dict[str, Any]] = []
            problems: list[tuple[str, str]] = []
            while len(items) < micro:
                outcome = next(outcomes)
                if _is_shard_problem(outcome):
                    problems.append((outcome.reason, outcome.key))
                elif isinstance(outcome, BadSample):
                    items.append({"_bad": (outcome.reason, outcome.key)})
                else:
                    seed = sample_seed(stream.seed, first + len(items))
                    items.append(self.dataset.transform_record(outcome, seed))
            batch = self.collate(items)
            batch["_skipped"] = problems + list(batch["_skipped"])
            yield batch


def _is_shard_problem(outcome: Any) -> bool:
    return isinstance(outcome, ShardProblem)


class ShardPass(IterableDataset):
    """One in-order pass over an iterable source for evaluation: batches of ``batch_size``, the last one partial.

    With several workers each reads its own shards, so batches interleave across workers;
    within a batch, records stay paired with their labels, which is all evaluation needs.
    """

    def __init__(self, dataset: RecordDataset, batch_size: int):
        self.dataset = dataset
        self.batch_size = batch_size
        self.collate = _collate_for(dataset)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker = get_worker_info()
        worker_id, readers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        items: list[dict[str, Any]] = []
        position = worker_id
        outcomes = self.dataset.source.iter_outcomes(worker_id=worker_id, num_workers=readers, shuffle=False)
        for outcome in outcomes:
            if _is_shard_problem(outcome):
                continue
            if isinstance(outcome, BadSample):
                items.append({"_bad": (outcome.reason, outcome.key)})
            else:
                items.append(self.dataset.transform_record(outcome, position))
            position += readers
            if len(items) == self.batch_size:
                yield self.collate(items)
                items = []
        if items:
            yield self.collate(items)


def train_loader(
    dataset: Dataset, stream: SampleStream, num_workers: int = 0, pin_memory: bool = False,
    *, shuffle_block: int = SHARD_SHUFFLE_BLOCK,
) -> DataLoader:
    """An endless DataLoader of micro-batches over ``stream``, exactly resumable from ``stream.start_position``.

    Map-style datasets are indexed through ``stream`` (a batch sampler). A
    ``RecordDataset`` over shards is streamed by :class:`ShardStream` (see the module
    docstring; ``shuffle_block`` is its per-reader shuffle block). Either way batches are
    ``collate_skipping_bad`` dicts (then the dataset's ``batch_transform``), and the loader
    has its own generator so the global RNG is untouched (resume).
    """
    common = dict(
        num_workers=num_workers,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(0),
        persistent_workers=False,
        prefetch_factor=4 if num_workers else None,
    )
    if isinstance(dataset, RecordDataset) and dataset.is_iterable:
        shards = ShardStream(dataset, stream, shuffle_block=shuffle_block)
        return DataLoader(shards, batch_size=None, collate_fn=_already_collated, **common)
    return DataLoader(dataset, batch_sampler=stream, collate_fn=_collate_for(dataset), **common)


def eval_loader(dataset: Dataset, batch_size: int, num_workers: int = 0) -> DataLoader:
    """Deterministic, in-order batches for evaluation (and feature extraction); one pass over shards too."""
    common = dict(num_workers=num_workers, generator=torch.Generator().manual_seed(0))
    if isinstance(dataset, RecordDataset) and dataset.is_iterable:
        return DataLoader(ShardPass(dataset, batch_size), batch_size=None, collate_fn=_already_collated, **common)
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=_collate_for(dataset), **common)


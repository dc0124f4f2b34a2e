"""WebDataset tar shards: the format for datasets too big to list or to read file by file.

Millions of small files are slow on every shared filesystem (one metadata round trip per
image); a few thousand sequentially read tars are not. :func:`~prepretrain.data.shards.write.write_shards`
converts any map-style source into shards, and :class:`ShardSource` streams them back as
``Record`` objects, split across ranks and DataLoader workers so that no sample repeats
within an epoch, resumable by skipping the samples a worker already consumed. This module
only reads; the writer is :mod:`prepretrain.data.shards.write`.

``ShardSource`` is here with its readers (shards dealt to ranks and workers, shuffle, resume by
skipping positions); its parts live beside it: :mod:`~prepretrain.data.shards.samples` (a shard's
tar members into WebDataset samples, decoded into records), :mod:`~prepretrain.data.shards.index`
(sample counts per shard) and :mod:`~prepretrain.data.shards.copies` (resampling copies per sample).

Layout (readable by any WebDataset tool)::

    out_dir/shard-000000.tar     000000000.jpg  000000000.json  000000001.png ...
    out_dir/index.json           per-shard sample counts, class names, skip counts

The tar member stem is the zero-padded source index, not the source key: WebDataset
splits a member name at the *first* dot of its basename (``a.b.jpg`` is key ``a`` with
extension ``b.jpg``), so real file names would silently merge or split samples. The
original key travels in the ``.json`` member.

``ShardSource`` also reads shards made by other tools: the image is the first member
among ``jpg jpeg png webp bmp gif tif tiff``; annotations come from ``json`` (``hashtags``,
``caption``, ``labels``, ``key``; the hashtag and caption fields can be renamed), falling
back to the WebDataset conventions ``txt`` (caption) and ``cls`` (integer label, task ``label``).

Sample counts (``len()``, exact resume, lost-sample accounting) come, per shard, from the first
of: ``index.json``; img2dataset's ``<shard>_stats.json`` beside a local tar (its ``successes``
are the samples written to that tar, the layout of LAION/DataComp downloads::

    dir/00000.tar  00000_stats.json  00000.parquet  00001.tar ...
        members 000000000.jpg 000000000.txt 000000000.json ...

); or, for other local tars, one pass over the tar headers (no payload is read), cached in
the source. ``ShardSource.count_source`` says which was used. Remote shards without an index
have no known length.
"""

from __future__ import annotations

import itertools
import os
import random
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from prepretrain.data.images.decode import DEFAULT_MAX_PIXELS, check_pixel_format
from prepretrain.data.records import Annotation, BadSample, Record, SkipCounter, num_classes_of
from prepretrain.data.shards.copies import ShardCopies
from prepretrain.data.shards.index import (
    COUNT_SOURCES,
    INDEX_FORMAT,
    INDEX_NAME,
    ShardIndex,
    UnknownSampleCount,
    img2dataset_stats_path,
)
from prepretrain.data.shards.samples import (
    ANNOTATION_MEMBERS,
    SHARD_SUFFIXES,
    ShardProblem,
    ShardSamples,
    _read_annotation_members,
    expand_shard_spec,
)


def _ceil_div(numerator: int, denominator: int) -> int:
    return -((-numerator) // denominator)


def _kept_in_range(start: int, count: int, slot: int, slots: int) -> int:
    """How many positions p in [start, start + count) have p % slots == slot."""
    return _ceil_div(start + count - slot, slots) - _ceil_div(start - slot, slots)


class ShardSource(ShardIndex, ShardCopies, ShardSamples):
    """An iterable source over WebDataset tar shards (local paths or any ``gopen`` URL).

    Not map-style: shards are read sequentially, so there is no ``get``. Use
    :meth:`iter_records` with the rank/worker/epoch of the caller. ``skips`` counts skipped
    samples by reason in *this* process (each DataLoader worker has its own copy, to be
    reported back by the loader); a shard that cannot be read to the end is counted once
    under ``broken_shard`` (or ``missing_shard``) without adding to ``skips.seen``, so
    ``seen`` stays a count of samples.

    ``len()`` / ``num_samples``: per shard, the count in ``index.json`` (written by
    :func:`~prepretrain.data.shards.write.write_shards`; ``index=`` names one elsewhere, which then
    also matches remote shards by file name), else for local tars ``successes`` of
    img2dataset's ``<shard>_stats.json``, else one pass over the local tar's headers (no
    payload read, no image decoded), done on the first ``len()`` and kept. ``count_source``
    says which (``"index"``, ``"img2dataset_stats"``, ``"counted"``, several joined by
    ``+``). Remote shards that no index lists have no known count: ``num_samples`` is
    ``None`` and ``len()`` raises :class:`UnknownSampleCount` (a ``ValueError``) naming them.

    ``hashtag_field`` / ``caption_field``: the ``.json`` fields that hold an image's hashtags
    (a list, or one string split on whitespace, commas or ``|``) and caption (without one,
    the ``.txt`` member is the caption), for shards that keep tags under e.g. ``"tags"``.

    ``repeats`` (optional, also settable later): resampling in the stream, each sample read
    ``repeats(annotation)`` times per epoch (WSP tail resampling,
    :class:`~prepretrain.data.labels.hashtags.RepeatFactors`); see the :attr:`repeats` property.
    ``len()`` stays the number of samples; :meth:`expanded_count` is an epoch's positions.
    """


    def __init__(
        self,
        urls: str | os.PathLike | Sequence[str | os.PathLike],
        *,
        min_size_hint: int | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        seed: int = 0,
        index: str | os.PathLike | None = None,
        pixels: str = "pil",
        hashtag_field: str = "hashtags",
        caption_field: str = "caption",
        repeats: Callable[[Annotation], int] | None = None,
    ):
        self.urls = expand_shard_spec(urls)
        if not self.urls:
            raise ValueError(f"no shards found for {os.fspath(urls) if isinstance(urls, (str, os.PathLike)) else urls}")
        for name, value in (("hashtag_field", hashtag_field), ("caption_field", caption_field)):
            if not isinstance(value, str) or not value:
                raise ValueError(f"{name} must be a non-empty JSON field name, got {value!r}")
        self.min_size_hint = min_size_hint
        self.max_pixels = max_pixels
        self.pixels = check_pixel_format(pixels)  # Record.image: "pil" image or "tensor" (uint8, 3 x H x W)
        self.hashtag_field = hashtag_field
        self.caption_field = caption_field
        self.metadata: Any = None  # a prepretrain.data.readers.metadata.MetadataTable joined to each sample (metadata=)
        self.seed = seed
        self.epoch = 0
        self.skips = SkipCounter()
        self.counts: list[int | None] = [None] * len(self.urls)
        self.count_sources: list[str | None] = [None] * len(self.urls)  # per shard: one of COUNT_SOURCES
        self.class_names: dict[str, list[str]] = {}
        self.num_classes_by_task: dict[str, int] = {}
        self._repeats: Callable[[Annotation], int] | None = None
        self._expanded: dict[int, int] = {}  # shard -> sample positions after repeats
        self._repeat_arrays: dict[int, np.ndarray] = {}  # shard -> repeats per sample (few-shards layout)
        self.repeats = repeats
        self._read_index(Path(index) if index is not None else None)

    def __bool__(self) -> bool:  # len() may raise; an existing source is always truthy
        return True

    def __repr__(self) -> str:  # never counts: known counts only
        known = None if any(count is None for count in self.counts) else sum(self.counts)  # type: ignore[arg-type]
        return f"ShardSource({len(self.urls)} shards, {known} samples)"

    def num_classes(self, task: str) -> int:
        """Classes of a label task, from ``index.json`` (same call as ``SyntheticSource``)."""
        return num_classes_of(self, task)

    def set_epoch(self, epoch: int) -> None:
        """The epoch :meth:`__iter__` uses (as with ``DistributedSampler.set_epoch``)."""
        self.epoch = epoch

    def shard_order(self, epoch: int = 0, seed: int = 0, shuffle: bool = True) -> list[int]:
        """Shard indices in the order of an epoch: the same on every rank and worker."""
        order = list(range(len(self.urls)))
        if shuffle:
            random.Random(seed * 1_000_003 + epoch).shuffle(order)
        return order

    def _assigned_samples(
        self,
        *,
        rank: int,
        world_size: int,
        worker_id: int,
        num_workers: int,
        epoch: int,
        seed: int,
        skip: int,
        shuffle: bool,
        problems: list[ShardProblem] | None = None,
    ) -> Iterator[dict[str, Any]]:
        order, slot, slots = self._reader_slot(rank, world_size, worker_id, num_workers, epoch, seed, shuffle)
        if skip < 0:
            raise ValueError(f"skip must be >= 0, got {skip}")
        if len(order) >= slots:
            # Whole shards per (rank, worker): each tar is read by exactly one reader.
            for shard in order[slot::slots]:
                # with repeats a shard's positions take a pass over its annotations: only when skipping
                count = self.counts[shard] if self._repeats is None else self._positions(shard) if skip else None
                if count is not None and skip >= count:
                    skip -= count  # resume without opening shards that were fully consumed
                    continue
                for sample in self._raw_samples(shard, problems):
                    copies = self._repeat_of(sample)
                    if skip >= copies:
                        skip -= copies
                        continue
                    for _ in range(copies - skip):
                        yield sample
                    skip = 0
            return
        # Fewer shards than readers: every reader streams all shards and keeps every
        # slots-th sample. Reading bytes is cheap next to decoding, which only the owner does.
        start = 0
        for shard in order:
            kept: int | None = None
            if self._repeats is None:
                count = self.counts[shard]
                kept = _kept_in_range(start, count, slot, slots) if count is not None else None
            elif skip:
                kept, count = self._kept_positions(shard, start, slot, slots)
            if kept is not None and skip >= kept:
                skip -= kept
                start += count
                continue
            position = start
            # Every reader reads this shard; only one of them reports a problem with it.
            for sample in self._raw_samples(shard, problems if shard % slots == slot else None):
                if position % slots == slot:
                    copies = self._repeat_of(sample)
                    if skip >= copies:
                        skip -= copies
                    else:
                        for _ in range(copies - skip):
                            yield sample
                        skip = 0
                position += 1
            start = position

    def _reader_slot(
        self, rank: int, world_size: int, worker_id: int, num_workers: int, epoch: int, seed: int, shuffle: bool
    ) -> tuple[list[int], int, int]:
        """(shard order of the epoch, this reader's slot, number of slots), validated."""
        if not (0 <= rank < world_size and 0 <= worker_id < num_workers):
            raise ValueError(f"bad split: rank {rank}/{world_size}, worker {worker_id}/{num_workers}")
        return self.shard_order(epoch, seed, shuffle), rank * num_workers + worker_id, world_size * num_workers

    def reader_count(
        self,
        *,
        rank: int = 0,
        world_size: int = 1,
        worker_id: int = 0,
        num_workers: int = 1,
        epoch: int = 0,
        seed: int = 0,
        shuffle: bool = True,
    ) -> int:
        """How many sample positions one reader has in one epoch: the unit of ``skip``.

        From the shards' counts (``index.json``, img2dataset stats, or local tar headers read
        once and kept); remote shards without an index are read without decoding anything
        (the resume of such a run pays this once per epoch it skips).
        """
        order, slot, slots = self._reader_slot(rank, world_size, worker_id, num_workers, epoch, seed, shuffle)
        if self._repeats is not None:
            if len(order) >= slots:
                return sum(self._positions(shard) or 0 for shard in order[slot::slots])
            total = start = 0
            for shard in order:
                kept, count = self._kept_positions(shard, start, slot, slots)
                total, start = total + kept, start + count
            return total
        self._ensure_counts(order if len(order) < slots else order[slot::slots])
        if len(order) < slots:
            if self.num_samples is not None:
                return _kept_in_range(0, self.num_samples, slot, slots)
            shards = order
        else:
            shards = order[slot::slots]
        total = 0
        scratch, self.skips = self.skips, SkipCounter()  # counting must not count shard problems twice
        try:
            for shard in shards:
                count = self.counts[shard]
                total += count if count is not None else sum(1 for _ in self._raw_samples(shard))
        finally:
            self.skips = scratch
        return total if len(order) >= slots else _kept_in_range(0, total, slot, slots)

    def iter_outcomes(
        self,
        *,
        rank: int = 0,
        world_size: int = 1,
        worker_id: int = 0,
        num_workers: int = 1,
        epoch: int = 0,
        seed: int = 0,
        skip: int = 0,
        shuffle: bool = True,
        shuffle_block: int = 0,
    ) -> Iterator[Record | BadSample]:
        """One outcome per sample position of a reader: a ``Record`` or the ``BadSample``.

        What :meth:`iter_records` filters, for callers that must account for every position
        themselves (the training loader puts bad samples into the batch that reaches them,
        so they are counted where they occur). Samples are *not* counted in ``skips`` here;
        a shard that cannot be read to its end is, and is also yielded as a
        :class:`ShardProblem`, which takes no position.

        ``shuffle_block``: with ``shuffle``, the reader's stream of an epoch is cut into
        blocks of this many samples, each block permuted by ``(seed, epoch, reader, block)``
        before decoding. This is WebDataset's shuffle buffer made resumable: skipping ``n``
        positions drops ``n // block`` whole blocks undecoded and ``n % block`` samples of the
        next permuted block. It holds one block of encoded samples in memory. 0 or 1: off.
        """
        problems: list[ShardProblem] = []
        block = max(1, shuffle_block) if shuffle else 1
        first_block, drop = divmod(skip, block)
        raw = self._assigned_samples(
            rank=rank, world_size=world_size, worker_id=worker_id, num_workers=num_workers, epoch=epoch,
            seed=seed, skip=first_block * block, shuffle=shuffle, problems=problems,
        )  # fmt: skip
        slot = rank * num_workers + worker_id
        for block_number in itertools.count(first_block):
            chunk = list(itertools.islice(raw, block))
            yield from problems
            problems.clear()
            if not chunk:
                return
            if block > 1:
                random.Random(f"{seed}/{epoch}/{slot}/{block_number}").shuffle(chunk)
            for sample in chunk[drop:]:
                try:
                    yield self._record(sample)
                except BadSample as error:
                    yield error
            drop = 0

    def iter_records(
        self,
        *,
        rank: int = 0,
        world_size: int = 1,
        worker_id: int = 0,
        num_workers: int = 1,
        epoch: int = 0,
        seed: int = 0,
        skip: int = 0,
        shuffle: bool = True,
        shuffle_block: int = 0,
    ) -> Iterator[Record]:
        """The records of one (rank, worker) reader for one epoch.

        The shard list is shuffled by ``(seed, epoch)`` identically everywhere, then dealt
        round-robin to the ``world_size * num_workers`` readers (reader ``rank *
        num_workers + worker_id``), so within an epoch every sample is read by exactly one
        reader. With fewer shards than readers, samples (not shards) are dealt round-robin.
        Readers may get unequal counts when shards do; the training loader
        (``prepretrain.data.loader.train_loader``) therefore streams each reader endlessly,
        epoch after epoch, so no rank ever runs dry (see that module).

        ``skip``: the number of this reader's samples to pass over without decoding, for
        resume. It counts samples, good or bad, i.e. records yielded plus samples skipped
        as bad (``skips.seen`` of a fresh counter), so a resumed reader continues exactly
        where the interrupted one stopped. Whole shards are skipped without being opened
        when ``index.json`` gives their counts. ``shuffle=False`` keeps the shard order
        (evaluation). ``shuffle_block``: see :meth:`iter_outcomes`.
        """
        for outcome in self.iter_outcomes(
            rank=rank,
            world_size=world_size,
            worker_id=worker_id,
            num_workers=num_workers,
            epoch=epoch,
            seed=seed,
            skip=skip,
            shuffle=shuffle,
            shuffle_block=shuffle_block,
        ):
            if isinstance(outcome, ShardProblem):
                continue  # already counted once by _count_shard_problem
            if isinstance(outcome, BadSample):
                self.skips.skip(outcome)
                continue
            self.skips.ok()
            yield outcome

    def iter_annotation_outcomes(self) -> Iterator[Annotation | BadSample]:
        """One outcome per sample in shard order: its ``Annotation``, or the ``BadSample``
        (unreadable ``.json``, a sample lost in a cut-off shard). Only the ``json``/``txt``/``cls``
        members are read; image payloads are skipped (seeked over in local tars), never decoded.
        A shard that cannot be read to its end is counted in ``skips`` as when training."""
        for shard in range(len(self.urls)):
            yield from self.shard_annotation_outcomes(shard)

    def shard_annotation_outcomes(self, shard: int) -> Iterator[Annotation | BadSample]:
        """:meth:`iter_annotation_outcomes` of one shard: one outcome per raw sample, in the order
        (and number) a reader's stream and :attr:`repeats` see them."""
        for sample in self._raw_samples(shard, members=_read_annotation_members):
            try:
                yield self._annotation(sample)
            except BadSample as error:
                yield error

    def iter_annotations(self) -> Iterator[Annotation]:
        """Every sample's annotations in shard order, without decoding any image (statistics);
        bad samples are counted in ``skips``."""
        for outcome in self.iter_annotation_outcomes():
            if isinstance(outcome, BadSample):
                self.skips.skip(outcome)
            else:
                yield outcome

    def __iter__(self) -> Iterator[Record]:
        """Records for the calling process: rank from ``torch.distributed`` (if initialised),
        worker from ``torch.utils.data.get_worker_info()``, epoch from :meth:`set_epoch`."""
        import torch.distributed as dist
        from torch.utils.data import get_worker_info

        rank, world_size = 0, 1
        if dist.is_available() and dist.is_initialized():
            rank, world_size = dist.get_rank(), dist.get_world_size()
        worker = get_worker_info()
        yield from self.iter_records(
            rank=rank,
            world_size=world_size,
            worker_id=worker.id if worker is not None else 0,
            num_workers=worker.num_workers if worker is not None else 1,
            epoch=self.epoch,
            seed=self.seed,
        )


__all__ = [
    "ANNOTATION_MEMBERS",
    "COUNT_SOURCES",
    "INDEX_FORMAT",
    "INDEX_NAME",
    "SHARD_SUFFIXES",
    "ShardProblem",
    "ShardSource",
    "UnknownSampleCount",
    "expand_shard_spec",
    "img2dataset_stats_path",
]

"""Resampling in the stream: each shard sample read ``repeats(annotation)`` times per epoch.

The part of :class:`~prepretrain.data.shards.reader.ShardSource` that expands samples into copies
(:class:`ShardCopies`, WSP's tail resampling through
:class:`~prepretrain.data.labels.hashtags.RepeatFactors`) and counts the sample positions they take,
per shard, from the annotation members alone (or from WSP's label cache: :meth:`set_expanded_counts`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from prepretrain.data.records import Annotation, BadSample, SkipCounter
from prepretrain.data.shards.samples import LABELLED, _read_annotation_members


class ShardCopies:
    """Copies per sample and positions per shard; a part of ``ShardSource`` (which holds ``urls``,
    ``counts``, ``skips`` and the ``_repeats``, ``_expanded``, ``_repeat_arrays`` state)."""

    @property
    def repeats(self) -> Callable[[Annotation], int] | None:
        """Per-sample repeat count (e.g. :class:`~prepretrain.data.labels.hashtags.RepeatFactors`), or
        ``None`` (every sample once). A reader expands each sample into ``repeats(annotation)``
        consecutive copies *before* its stream is cut into shuffle blocks, so the block shuffle
        mixes the copies; 0 removes the sample without taking a position (so does a sample whose
        annotations cannot be read). Sample positions (``skip``, :meth:`reader_count`) count
        copies. It must depend on the annotations only (never on the epoch or reader), so a
        shard's expanded count is a fixed number, counted once per shard from its ``json``/``txt``/
        ``cls`` members (no image read) and kept; setting it drops those counts."""
        return self._repeats

    @repeats.setter
    def repeats(self, repeats: Callable[[Annotation], int] | None) -> None:
        self._repeats = repeats
        self._expanded.clear()
        self._repeat_arrays.clear()

    def _repeat_of(self, sample: dict[str, Any]) -> int:
        """Copies of one raw sample in the stream (1 without ``repeats``)."""
        if self._repeats is None:
            return 1
        try:
            annotation = self._annotation(sample)
        except BadSample:
            return 0
        labelled = getattr(self._repeats, "labelled_copies", None)
        if labelled is None:
            copies = int(self._repeats(annotation))
        else:  # the sample carries its annotation and label indices on to the record: labelled once
            copies, known = labelled(annotation)
            sample[LABELLED] = (annotation, known)
        if copies < 0:
            raise ValueError(f"repeats({annotation.key!r}) = {copies}; must be >= 0")
        return copies

    def _repeat_array(self, shard: int) -> np.ndarray:
        """Copies of every sample of one shard, in order, from its annotation members only."""
        scratch, self.skips = self.skips, SkipCounter()  # shard problems are counted when training reads it
        try:
            copies = [self._repeat_of(sample) for sample in self._raw_samples(shard, members=_read_annotation_members)]
        finally:
            self.skips = scratch
        array = np.asarray(copies, dtype=np.int64)
        self._expanded[shard] = int(array.sum())
        return array

    def _positions(self, shard: int) -> int | None:
        """Sample positions of one shard in a reader's stream: its count, or with ``repeats``
        its expanded count (counted once, kept); ``None`` when unknown (a remote shard without
        an index and no repeats)."""
        if self._repeats is None:
            return self.counts[shard]
        if shard not in self._expanded:
            self._repeat_array(shard)
        return self._expanded[shard]

    def _kept_positions(self, shard: int, start: int, slot: int, slots: int) -> tuple[int, int]:
        """Few-shards layout with ``repeats``: (positions of ``slot`` in this shard whose first
        raw sample has stream index ``start``, raw samples in the shard)."""
        array = self._repeat_arrays.get(shard)
        if array is None:
            array = self._repeat_arrays[shard] = self._repeat_array(shard)
        indices = np.arange(start, start + len(array))
        return int(array[indices % slots == slot].sum()), len(array)

    def expanded_count(self) -> int:
        """Sample positions of one epoch over all readers: ``len()`` without ``repeats``, else the
        sum of every sample's copies (one annotation-only pass over shards not counted yet)."""
        if self._repeats is None:
            return len(self)
        return sum(self._positions(shard) or 0 for shard in range(len(self.urls)))

    def set_expanded_counts(self, positions: Sequence[int]) -> None:
        """Give every shard's expanded count (the sum of its samples' :attr:`repeats`), computed
        elsewhere from the same annotations (WSP's label cache), so :meth:`expanded_count` reads
        no shard. Set :attr:`repeats` first: setting it clears these."""
        if self._repeats is None:
            raise ValueError("set repeats before the expanded counts they give")
        if len(positions) != len(self.urls):
            raise ValueError(f"{len(positions)} expanded counts for {len(self.urls)} shards")
        self._expanded.update({shard: int(count) for shard, count in enumerate(positions)})

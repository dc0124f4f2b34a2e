"""How many samples each shard holds: ``index.json``, img2dataset's stats files, or the tar headers.

The part of :class:`~prepretrain.data.shards.reader.ShardSource` that knows its sample counts
(:class:`ShardIndex`): ``len()``, exact resume and lost-sample accounting rest on them (see the
module docstring of :mod:`prepretrain.data.shards.reader`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import urlparse

from prepretrain.data.records import SkipCounter
from prepretrain.data.shards.samples import SHARD_SUFFIXES, _is_local, _local_path, _read_no_members

INDEX_NAME = "index.json"
INDEX_FORMAT = "prepretrain-shards/1"
IMG2DATASET_STATS_SUFFIX = "_stats.json"  # img2dataset writes 00000_stats.json beside 00000.tar
COUNT_SOURCES = ("index", "img2dataset_stats", "counted")  # where a shard's sample count came from


def _shard_stem(name: str) -> str:
    lowered = name.lower()
    for suffix in sorted(SHARD_SUFFIXES, key=len, reverse=True):
        if lowered.endswith(suffix):
            return name[: -len(suffix)]
    return name


def img2dataset_stats_path(url: str) -> Path | None:
    """``dir/00000_stats.json`` for the local shard ``dir/00000.tar``; ``None`` for remote shards."""
    if not _is_local(url):
        return None
    path = Path(_local_path(url))
    return path.with_name(_shard_stem(path.name) + IMG2DATASET_STATS_SUFFIX)


def _img2dataset_successes(url: str) -> int | None:
    """Samples img2dataset wrote to this tar (``successes`` of its stats file), or ``None``
    when there is no readable stats file with a non-negative integer ``successes``."""
    path = img2dataset_stats_path(url)
    if path is None or not path.is_file():
        return None
    try:
        stats = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    successes = stats.get("successes") if isinstance(stats, dict) else None
    if isinstance(successes, bool) or not isinstance(successes, int) or successes < 0:
        return None
    return successes


class UnknownSampleCount(ValueError):
    """``len()`` of remote shards that no index lists: their sample count is not known."""


class ShardIndex:
    """Per-shard sample counts and where they came from; a part of ``ShardSource`` (which holds
    ``urls``, ``counts``, ``count_sources``, ``class_names``, ``num_classes_by_task``)."""

    def _read_index(self, index_path: Path | None) -> None:
        explicit = index_path is not None
        if index_path is None:
            first = self.urls[0]
            if not _is_local(first):
                return
            index_path = Path(_local_path(first)).parent / INDEX_NAME
        if not index_path.is_file():
            if explicit:
                raise FileNotFoundError(f"shard index not found: {index_path}")
            return
        content = json.loads(index_path.read_text(encoding="utf-8"))
        by_name = {entry["name"]: int(entry["count"]) for entry in content.get("shards", [])}
        directory = index_path.parent.resolve()
        for position, url in enumerate(self.urls):
            if _is_local(url) and Path(_local_path(url)).parent.resolve() == directory:
                count = by_name.get(Path(_local_path(url)).name)
            elif explicit and not _is_local(url):
                count = by_name.get(Path(urlparse(url).path).name)  # a given index names remote shards by file name
            else:
                continue
            if count is not None:
                self.counts[position], self.count_sources[position] = count, "index"
        self.class_names = {task: list(names) for task, names in content.get("class_names", {}).items()}
        self.num_classes_by_task = {task: int(number) for task, number in content.get("num_classes", {}).items()}

    def _ensure_counts(self, shards: Iterable[int] | None = None) -> None:
        """Fill in the unknown counts of local ``shards`` (default: all): img2dataset's stats
        file, else one pass over the tar headers. Remote shards stay unknown."""
        for shard in range(len(self.urls)) if shards is None else shards:
            url = self.urls[shard]
            if self.counts[shard] is not None or not _is_local(url):
                continue
            successes = _img2dataset_successes(url)
            if successes is not None:
                self.counts[shard], self.count_sources[shard] = successes, "img2dataset_stats"
            else:
                self.counts[shard], self.count_sources[shard] = self._count_tar(shard), "counted"

    def _count_tar(self, shard: int) -> int:
        """Samples in one shard from its tar headers alone, grouped as the reader groups them.
        A missing or damaged shard counts what can be read; its problem is reported when the
        shard is read for training, not here."""
        scratch, self.skips = self.skips, SkipCounter()
        try:
            return sum(1 for _ in self._raw_samples(shard, members=_read_no_members))
        finally:
            self.skips = scratch

    @property
    def num_samples(self) -> int | None:
        """Total samples (see the class docstring); ``None`` while a remote shard's count is unknown."""
        self._ensure_counts()
        if any(count is None for count in self.counts):
            return None
        return sum(self.counts)  # type: ignore[arg-type]

    @property
    def count_source(self) -> str | None:
        """Where the sample counts come from: ``"index"``, ``"img2dataset_stats"`` or
        ``"counted"`` (tar headers), joined by ``+`` when shards differ; ``None`` while a
        remote shard's count is unknown."""
        self._ensure_counts()
        if any(origin is None for origin in self.count_sources):
            return None
        used = set(self.count_sources)
        return "+".join(origin for origin in COUNT_SOURCES if origin in used)

    def _count_origin(self, shard: int) -> str:
        """Where shard ``shard``'s count came from, for messages."""
        origin = self.count_sources[shard]
        if origin == "img2dataset_stats":
            return f"listed in {img2dataset_stats_path(self.urls[shard]).name}"  # type: ignore[union-attr]
        if origin == "counted":
            return "counted from its tar headers"
        return f"listed in {INDEX_NAME}"

    def __len__(self) -> int:
        total = self.num_samples
        if total is None:
            unknown = [url for url, count in zip(self.urls, self.counts) if count is None]
            shown = ", ".join(unknown[:3]) + (f" and {len(unknown) - 3} more" if len(unknown) > 3 else "")
            raise UnknownSampleCount(
                f"the number of samples of {len(unknown)} remote shard(s) is unknown ({shown}): no {INDEX_NAME} "
                f"lists them, and remote tars are not counted. Convert the data with `prepretrain data shards` "
                f"(which writes {INDEX_NAME}), copy the shards to a local directory (counted from img2dataset's "
                f"*{IMG2DATASET_STATS_SUFFIX} or the tar headers), or pass index=PATH to an {INDEX_NAME} that lists "
                "these shard names with their counts"
            )
        return total

"""WebDataset tar shards: the format for datasets too big to list or to read file by file.

Millions of small files are slow on every shared filesystem (one metadata round trip per
image); a few thousand sequentially read tars are not. :func:`~prepretrain.data.shards.write.write_shards`
converts any map-style source into shards, and :class:`ShardSource` streams them back as
``Record`` objects, split across ranks and DataLoader workers so that no sample repeats
within an epoch, resumable by skipping the samples a worker already consumed. This module
only reads; the writer is :mod:`prepretrain.data.shards.write`.

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
import json
import os
import random
import re
import tarfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import braceexpand
import numpy as np
from webdataset import gopen
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_expander

from prepretrain.data.images.decode import DEFAULT_MAX_PIXELS, check_pixel_format, load_pixels
from prepretrain.data.records import Annotation, BadSample, Record, SkipCounter, num_classes_of, split_hashtags

SHARD_SUFFIXES = (".tar", ".tgz", ".tar.gz")
INDEX_NAME = "index.json"
INDEX_FORMAT = "prepretrain-shards/1"
IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
ANNOTATION_MEMBERS = ("json", "txt", "cls")  # the members ShardSource reads annotations from
IMG2DATASET_STATS_SUFFIX = "_stats.json"  # img2dataset writes 00000_stats.json beside 00000.tar
COUNT_SOURCES = ("index", "img2dataset_stats", "counted")  # where a shard's sample count came from
_LOST = "__lost__"  # marks the placeholder of a sample lost in a cut-off shard
_META_MEMBER = re.compile(r"__[^/]*__($|/)")  # webdataset skips such members (tar_file_iterator)


# -- naming shards --------------------------------------------------------------------------


def expand_shard_spec(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Shard URLs from a list, a directory, ``a::b`` lists and brace patterns.

    ``shards-{000000..000009}.tar`` expands to ten names (``braceexpand``, as WebDataset
    does); a directory expands to its ``.tar``/``.tgz``/``.tar.gz`` files in sorted order.
    """
    if not isinstance(spec, (str, os.PathLike)):
        return [os.fspath(item) for item in spec]
    urls: list[str] = []
    for part in os.fspath(spec).split("::"):
        for url in braceexpand.braceexpand(part):
            if _is_local(url) and Path(_local_path(url)).is_dir():
                directory = Path(_local_path(url))
                urls.extend(
                    str(path)
                    for path in sorted(directory.iterdir())
                    if path.is_file() and path.name.lower().endswith(SHARD_SUFFIXES)
                )
            else:
                urls.append(url)
    return urls


def _is_local(url: str) -> bool:
    scheme = urlparse(url).scheme
    return scheme in ("", "file") or len(scheme) == 1  # len 1: a Windows drive letter


def _local_path(url: str) -> str:
    return urlparse(url).path if url.startswith("file:") else url


def _open_shard(url: str):
    """Open a shard for reading. Local files are opened directly rather than through
    ``webdataset.gopen``, which refuses local paths when ``WDS_SECURE=1`` is set."""
    if _is_local(url):
        return open(_local_path(url), "rb")
    return gopen(url, "rb")


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


def _tar_members(
    stream: Any, url: str, handler: Callable[[BaseException], bool], read: Callable[[str], bool], seekable: bool
) -> Iterator[dict[str, Any]]:
    """The members of one tar as ``webdataset``'s ``tar_file_iterator`` yields them (regular
    files, ``__meta__`` members skipped), except that a payload is read only when
    ``read(extension)`` is true; other members come with ``data=b""``. Grouping these into
    samples (``group_by_keys``) therefore gives the same samples from the tar headers alone.

    ``seekable``: ``stream`` is a local uncompressed tar, opened for random access so skipped
    payloads are seeked over rather than read (a header pass over a 1 GB shard of JPEGs
    reads a few MB). Otherwise, or when that open fails, the tar is streamed (``r|*``).
    """
    archive = None
    if seekable:
        try:
            archive = tarfile.open(fileobj=stream, mode="r:")
        except tarfile.TarError:
            stream.seek(0)  # e.g. a gzip file named .tar: stream it instead
    try:
        if archive is None:
            archive = tarfile.open(fileobj=stream, mode="r|*")
        while True:
            info = archive.next()
            if info is None:
                return
            archive.members = []  # nothing refers back to earlier members: keep memory flat
            name = info.name
            if not info.isreg() or _META_MEMBER.match(name):
                continue
            _, extension = base_plus_ext(name)
            data = b""
            if extension is not None and read(extension.lower()):
                try:
                    data = archive.extractfile(info).read()
                except (tarfile.TarError, OSError, EOFError) as error:
                    if handler(error):
                        continue
                    return
            yield {"fname": name, "data": data, "__url__": url}
    except (tarfile.TarError, OSError, EOFError) as error:
        handler(error)


def _read_annotation_members(extension: str) -> bool:
    return extension in ANNOTATION_MEMBERS


def _read_no_members(extension: str) -> bool:
    return False


class UnknownSampleCount(ValueError):
    """``len()`` of remote shards that no index lists: their sample count is not known."""


# -- reading --------------------------------------------------------------------------------


class ShardProblem(BadSample):
    """A shard that is missing or could not be read to its end; ``key`` is its URL.

    Not a sample: it takes no sample position. Its lost samples, when ``index.json`` says how
    many there were, follow as ``BadSample(reason="lost_in_shard")`` one by one.
    """


def _ceil_div(numerator: int, denominator: int) -> int:
    return -((-numerator) // denominator)


def _kept_in_range(start: int, count: int, slot: int, slots: int) -> int:
    """How many positions p in [start, start + count) have p % slots == slot."""
    return _ceil_div(start + count - slot, slots) - _ceil_div(start - slot, slots)


_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")  # gzip, bzip2, xz


def _is_compressed(url: str, stream: Any) -> bool:
    """A compressed tar: its file size and trailing bytes say nothing about the archive inside
    (the decompressor reports a cut-off stream itself)."""
    if url.lower().endswith((".tgz", ".tar.gz")):
        return True
    try:
        if not stream.seekable():
            return False
        position = stream.tell()
        stream.seek(0)
        head = stream.read(6)
        stream.seek(position)
    except (AttributeError, OSError, ValueError):
        return False
    return head.startswith(_COMPRESSED_MAGIC)


def _tail_problem(stream: Any) -> str | None:
    """Why the archive did not end cleanly, or ``None``. See ``ShardSource._raw_samples``."""
    try:
        for chunk in iter(lambda: stream.read(1 << 16), b""):
            if chunk.count(0) != len(chunk):
                return "data after the point where the tar reader stopped (damaged member header)"
        if not (hasattr(stream, "fileno") and stream.seekable()):
            return None
        size = os.fstat(stream.fileno()).st_size
        if size % 512:
            return f"size {size} is not a multiple of 512 bytes (truncated)"
        if size < 1024:
            return "no end-of-archive marker (truncated)"
        stream.seek(size - 1024)
        if stream.read(1024).count(0) != 1024:
            return "no end-of-archive marker (truncated)"
    except (OSError, ValueError):  # pipes and remote streams: nothing more to check
        return None
    return None


class ShardSource:
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

    # -- repeats (resampling in the stream) ------------------------------------------------
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
        copies = int(self._repeats(annotation))
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

    # -- sample counts --------------------------------------------------------------------
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

    # -- raw tar access -------------------------------------------------------------------
    def _raw_samples(
        self, shard: int, problems: list[ShardProblem] | None = None, *, members: Callable[[str], bool] | None = None
    ) -> Iterator[dict[str, Any]]:
        """Grouped tar members of one shard; a shard that is not read to its end is counted.

        ``members``: read only the payloads of members whose extension it accepts (the others
        are present with empty data, so samples group and count the same); ``None`` reads all.

        Python's streaming tar reader treats a damaged or cut-off member header as the end
        of the archive *without an error*, so the samples after it would vanish silently.
        After the last sample we therefore also check the count in ``index.json``, that
        nothing but zero padding follows where the reader stopped, and (local files) that
        the file ends with the end-of-archive marker every tar writer emits on close.

        When ``index.json`` gives the shard's count and fewer samples could be read (cut-off
        or missing shard), one placeholder per lost sample follows; it becomes
        ``BadSample(reason="lost_in_shard")``. Every shard is then exactly as long as the index
        says, which keeps resume positions exact (they skip whole shards by their indexed
        count) and counts lost samples one by one against ``max_bad_fraction``. The problem
        itself is counted once in ``skips`` and, if given, appended to ``problems``.
        """
        url = self.urls[shard]
        errors: list[str] = []
        expected = self.counts[shard]

        def handler(error: BaseException) -> bool:
            detail = str(error.args[0]) if error.args else ""
            message = f"{type(error).__name__}: {detail.split(' @ ')[0]}"
            if message not in errors:
                errors.append(message)
            return True  # keep going: one bad member or a cut-off tail must not stop training

        read = 0
        try:
            stream = _open_shard(url)
        except OSError as error:
            self._count_shard_problem(url, "missing_shard", str(error), problems)
        else:
            with stream:
                if members is None:
                    files = tar_file_expander([{"url": url, "stream": stream}], handler=handler)
                else:
                    seekable = _is_local(url) and url.lower().endswith(".tar")
                    files = _tar_members(stream, url, handler, members, seekable)
                for sample in group_by_keys(files, handler=handler):
                    read += 1
                    yield sample
                if not errors and not _is_compressed(url, stream):
                    tail = _tail_problem(stream)
                    if tail:
                        errors.append(tail)
            if expected is not None and read != expected:
                errors.append(f"read {read} of {expected} samples {self._count_origin(shard)}")
            if errors:
                self._count_shard_problem(url, "broken_shard", "; ".join(errors), problems)
        name = Path(_local_path(url)).name
        for lost in range(read, expected or 0):
            yield {"__key__": f"lost-{lost:09d}", "__url__": url, _LOST: f"sample {lost} of {expected} in {name}"}

    def _count_shard_problem(
        self, url: str, reason: str, detail: str, problems: list[ShardProblem] | None = None
    ) -> None:
        self.skips.skipped[reason] += 1
        self.skips.examples.setdefault(reason, f"{url}: {detail}")
        if problems is not None:
            problems.append(ShardProblem(url, reason, detail))

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

    # -- records --------------------------------------------------------------------------
    def _annotation(self, sample: dict[str, Any]) -> Annotation:
        shard_name = Path(_local_path(sample.get("__url__", ""))).name
        fallback_key = f"{shard_name}/{sample['__key__']}"
        if _LOST in sample:
            raise BadSample(fallback_key, "lost_in_shard", sample[_LOST])
        meta: dict[str, Any] = {}
        if "json" in sample:
            try:
                meta = json.loads(sample["json"].decode("utf-8", errors="replace"))
            except json.JSONDecodeError as error:
                raise BadSample(fallback_key, "bad_json", error.msg) from None
            if not isinstance(meta, dict):
                raise BadSample(fallback_key, "bad_json", "not an object")
        key = str(meta.get("key") or fallback_key)
        hashtags = meta.get(self.hashtag_field) or []
        if isinstance(hashtags, str):
            hashtags = split_hashtags(hashtags)
        elif not isinstance(hashtags, (list, tuple, dict)):
            raise BadSample(key, "bad_json", f"{self.hashtag_field!r} must be a list or a string, got {hashtags!r}")
        caption = meta.get(self.caption_field)
        if caption is None and "txt" in sample:
            caption = sample["txt"].decode("utf-8", errors="replace")
        labels = meta.get("labels")
        try:
            if labels is None and "cls" in sample:
                labels = {"label": int(sample["cls"].decode("ascii", errors="replace").strip())}
            labels = {str(task): int(value) for task, value in (labels or {}).items() if value is not None}
        except (TypeError, ValueError, AttributeError):
            raise BadSample(key, "bad_json", f"labels must map task -> int, got {labels!r}") from None
        annotation = Annotation(key=key, hashtags=[str(tag) for tag in hashtags], caption=str(caption or ""),
                                labels=labels)
        return annotation if self.metadata is None else self.metadata.join(annotation, meta)

    def _record(self, sample: dict[str, Any]) -> Record:
        annotation = self._annotation(sample)
        member = next((name for name in IMAGE_MEMBERS if name in sample), None)
        if member is None:
            raise BadSample(annotation.key, "missing_image", f"members: {sorted(k for k in sample if k[0] != '_')}")
        image = load_pixels(
            sample[member], annotation.key, pixels=self.pixels, min_size_hint=self.min_size_hint,
            max_pixels=self.max_pixels,
        )
        return annotation.record(image)

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

    def set_expanded_counts(self, positions: Sequence[int]) -> None:
        """Give every shard's expanded count (the sum of its samples' :attr:`repeats`), computed
        elsewhere from the same annotations (WSP's label cache), so :meth:`expanded_count` reads
        no shard. Set :attr:`repeats` first: setting it clears these."""
        if self._repeats is None:
            raise ValueError("set repeats before the expanded counts they give")
        if len(positions) != len(self.urls):
            raise ValueError(f"{len(positions)} expanded counts for {len(self.urls)} shards")
        self._expanded.update({shard: int(count) for shard, count in enumerate(positions)})

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
    "INDEX_NAME",
    "SHARD_SUFFIXES",
    "ShardProblem",
    "ShardSource",
    "UnknownSampleCount",
    "expand_shard_spec",
    "img2dataset_stats_path",
]

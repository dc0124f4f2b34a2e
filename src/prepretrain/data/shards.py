"""WebDataset tar shards: the format for datasets too big to list or to read file by file.

Millions of small files are slow on every shared filesystem (one metadata round trip per
image); a few thousand sequentially read tars are not. :func:`~prepretrain.data.tools.write_shards`
converts any map-style source into shards, and :class:`ShardSource` streams them back as
``Record`` objects, split across ranks and DataLoader workers so that no sample repeats
within an epoch, resumable by skipping the samples a worker already consumed. This module
only reads; the writer lives with the other tools in :mod:`prepretrain.data.tools`.

Layout (readable by any WebDataset tool)::

    out_dir/shard-000000.tar     000000000.jpg  000000000.json  000000001.png ...
    out_dir/index.json           per-shard sample counts, class names, skip counts

The tar member stem is the zero-padded source index, not the source key: WebDataset
splits a member name at the *first* dot of its basename (``a.b.jpg`` is key ``a`` with
extension ``b.jpg``), so real file names would silently merge or split samples. The
original key travels in the ``.json`` member.

``ShardSource`` also reads shards made by other tools: the image is the first member
among ``jpg jpeg png webp bmp gif tif tiff``; annotations come from ``json`` (``hashtags``,
``caption``, ``labels``, ``key``), falling back to the WebDataset conventions ``txt``
(caption) and ``cls`` (integer label, task ``label``).
"""

from __future__ import annotations

import itertools
import json
import os
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import braceexpand
from webdataset import gopen
from webdataset.tariterators import group_by_keys, tar_file_expander

from prepretrain.data.decode import DEFAULT_MAX_PIXELS, check_pixel_format, load_pixels
from prepretrain.data.records import Annotation, BadSample, Record, SkipCounter, num_classes_of, split_hashtags

SHARD_SUFFIXES = (".tar", ".tgz", ".tar.gz")
INDEX_NAME = "index.json"
INDEX_FORMAT = "prepretrain-shards/1"
IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
_LOST = "__lost__"  # marks the placeholder of a sample lost in a cut-off shard


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
    :meth:`iter_records` with the rank/worker/epoch of the caller. ``len()`` works when an
    ``index.json`` (written by :func:`~prepretrain.data.tools.write_shards`) lists every
    shard; ``num_samples`` is ``None`` otherwise. ``skips`` counts skipped samples by reason in *this* process (each
    DataLoader worker has its own copy, to be reported back by the loader); a shard that
    cannot be read to the end is counted once under ``broken_shard`` (or ``missing_shard``)
    without adding to ``skips.seen``, so ``seen`` stays a count of samples.
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
    ):
        self.urls = expand_shard_spec(urls)
        if not self.urls:
            raise ValueError(f"no shards found for {os.fspath(urls) if isinstance(urls, (str, os.PathLike)) else urls}")
        self.min_size_hint = min_size_hint
        self.max_pixels = max_pixels
        self.pixels = check_pixel_format(pixels)  # Record.image: "pil" image or "tensor" (uint8, 3 x H x W)
        self.seed = seed
        self.epoch = 0
        self.skips = SkipCounter()
        self.counts: list[int | None] = [None] * len(self.urls)
        self.class_names: dict[str, list[str]] = {}
        self.num_classes_by_task: dict[str, int] = {}
        self._read_index(Path(index) if index is not None else None)

    def _read_index(self, index_path: Path | None) -> None:
        if index_path is None:
            first = self.urls[0]
            if not _is_local(first):
                return
            index_path = Path(_local_path(first)).parent / INDEX_NAME
        if not index_path.is_file():
            return
        content = json.loads(index_path.read_text(encoding="utf-8"))
        by_name = {entry["name"]: int(entry["count"]) for entry in content.get("shards", [])}
        directory = index_path.parent.resolve()
        for position, url in enumerate(self.urls):
            if _is_local(url) and Path(_local_path(url)).parent.resolve() == directory:
                self.counts[position] = by_name.get(Path(_local_path(url)).name)
        self.class_names = {task: list(names) for task, names in content.get("class_names", {}).items()}
        self.num_classes_by_task = {task: int(number) for task, number in content.get("num_classes", {}).items()}

    @property
    def num_samples(self) -> int | None:
        """Total samples if ``index.json`` knows every shard, else ``None``."""
        if any(count is None for count in self.counts):
            return None
        return sum(self.counts)  # type: ignore[arg-type]

    def __len__(self) -> int:
        total = self.num_samples
        if total is None:
            raise TypeError("the number of samples is unknown (no index.json lists these shards)")
        return total

    def __bool__(self) -> bool:  # len() may raise; an existing source is always truthy
        return True

    def __repr__(self) -> str:
        return f"ShardSource({len(self.urls)} shards, {self.num_samples} samples)"

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
    def _raw_samples(self, shard: int, problems: list[ShardProblem] | None = None) -> Iterator[dict[str, Any]]:
        """Grouped tar members of one shard; a shard that is not read to its end is counted.

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
                files = tar_file_expander([{"url": url, "stream": stream}], handler=handler)
                for sample in group_by_keys(files, handler=handler):
                    read += 1
                    yield sample
                if not errors:
                    tail = _tail_problem(stream)
                    if tail:
                        errors.append(tail)
            if expected is not None and read != expected:
                errors.append(f"read {read} of {expected} samples listed in {INDEX_NAME}")
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
                count = self.counts[shard]
                if count is not None and skip >= count:
                    skip -= count  # resume without opening shards that were fully consumed
                    continue
                for sample in self._raw_samples(shard, problems):
                    if skip:
                        skip -= 1
                        continue
                    yield sample
            return
        # Fewer shards than readers: every reader streams all shards and keeps every
        # slots-th sample. Reading bytes is cheap next to decoding, which only the owner does.
        start = 0
        for shard in order:
            count = self.counts[shard]
            if count is not None:
                kept = _kept_in_range(start, count, slot, slots)
                if skip >= kept:
                    skip -= kept
                    start += count
                    continue
            position = start
            # Every reader reads this shard; only one of them reports a problem with it.
            for sample in self._raw_samples(shard, problems if shard % slots == slot else None):
                if position % slots == slot:
                    if skip:
                        skip -= 1
                    else:
                        yield sample
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

        From ``index.json`` when it lists the reader's shards (instant), otherwise by reading
        the tar headers of those shards without decoding anything (the resume of a run on
        shards without an index pays this once per epoch it skips).
        """
        order, slot, slots = self._reader_slot(rank, world_size, worker_id, num_workers, epoch, seed, shuffle)
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
        hashtags = meta.get("hashtags") or []
        if isinstance(hashtags, str):
            hashtags = split_hashtags(hashtags)
        caption = meta.get("caption")
        if caption is None and "txt" in sample:
            caption = sample["txt"].decode("utf-8", errors="replace")
        labels = meta.get("labels")
        try:
            if labels is None and "cls" in sample:
                labels = {"label": int(sample["cls"].decode("ascii", errors="replace").strip())}
            labels = {str(task): int(value) for task, value in (labels or {}).items() if value is not None}
        except (TypeError, ValueError, AttributeError):
            raise BadSample(key, "bad_json", f"labels must map task -> int, got {labels!r}") from None
        return Annotation(key=key, hashtags=[str(tag) for tag in hashtags], caption=str(caption or ""), labels=labels)

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

    def iter_annotations(self) -> Iterator[Annotation]:
        """Every sample's annotations in shard order, without decoding any image (statistics)."""
        for shard in range(len(self.urls)):
            for sample in self._raw_samples(shard):
                try:
                    yield self._annotation(sample)
                except BadSample as error:
                    self.skips.skip(error)

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
    "INDEX_NAME",
    "SHARD_SUFFIXES",
    "ShardProblem",
    "ShardSource",
    "expand_shard_spec",
]

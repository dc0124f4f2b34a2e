"""WSP's preparation over shards in one annotation pass per dataset, shared by every rank.

Before its first step, WSP on shards needs the vocabulary (label counts over every image), the
images per label, the sum of the draw weights with the resampled target prior, and each shard's
number of sample copies per epoch (:class:`~prepretrain.data.labels.hashtags.RepeatFactors`). Computed
from the annotations directly that is three or four passes over every ``.json``/``.txt`` member
(with captions: every caption tokenised, lemmatised and matched again each time), on every rank.

Here the annotations are read once:

1. :meth:`LabelCache.build` reads the annotations of some shards (rank ``r`` of ``w`` takes shards
   ``r, r + w, ...``) and writes, per shard, the labels of every sample (normalised, synonyms
   mapped, each once) as indices into that shard's own label table, the samples' keys, and the
   images per label. About 10-20 bytes per sample, atomically, one ``.npz`` per shard.
2. :func:`build_cached_vocab` (rank 0) merges the shards' label counts into the vocabulary, and
   :func:`derive` (every rank, its own shards, arrays summed across ranks by an all-reduce)
   computes with NumPy the images per vocabulary label, the draw weights, their sum and the prior,
   and every shard's copies. Rank 0 writes the result (``prepared-<settings>.json`` beside the
   shard files), which later runs on the same data and settings read instead.
   :func:`prepare_shards` is the whole protocol, run through the :class:`Communicator` a stage hands
   in; with a ``scratch`` folder (``label_cache=false``) nothing is kept on disk.

The cache folder is named by the shards (path, size, modification time), the labelling (
``labels_from``, synset table, fields, metadata table, synonyms), so a changed shard or setting
gets a new cache; it lives beside the data (``<shard folder>/.prepretrain-labels/``) when that is
writable, so every run and rank on the same data shares it, else in ``$PREPRETRAIN_CACHE``.
The results equal those of the annotation passes (the tests compare them), with one documented
difference: the prior's sums are taken in another order (float64 rounding, ~1e-16 relative).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from prepretrain.data.labels.hashtags import (
    HashtagVocab,
    image_tags,
    prune_rarest,
    tag_weights,
    unit_hash,
    vocab_from_counts,
)
from prepretrain.data.labels.weaklabels import WeakLabeler
from prepretrain.data.readers.rowindex import cache_root
from prepretrain.data.records import BadSample
from prepretrain.files import atomic_path, write_text

CACHE_VERSION = "labelcache-v1"
FOLDER_NAME = ".prepretrain-labels"


def _local_file(url: str) -> Path | None:
    path = Path(url[len("file:"):] if url.startswith("file:") else url)
    return path if path.is_file() else None


def _digest(text: str, size: int = 16) -> str:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=size).hexdigest()


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".probe{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
        return True
    except OSError:
        return False


@dataclass
class ShardLabels:
    """One shard's samples in stream order: their labels as indices into ``labels`` and keys."""

    labels: list[str]  # the shard's distinct labels (canonical, normalised)
    counts: np.ndarray  # images per label of this shard
    flat: np.ndarray  # int32 label indices, sample after sample
    offsets: np.ndarray  # int64, samples + 1
    keys: list[str]  # "" for an unreadable sample (never drawn)

    @property
    def samples(self) -> int:
        return len(self.offsets) - 1


class LabelCache:
    """The per-shard label files of one shard source under one labelling (see the module docstring)."""

    def __init__(self, source: Any, labels: WeakLabeler, aliases: dict[str, str] | None = None,
                 folder: str | Path | None = None):
        self.source = source
        self.labels = labels
        self.aliases = dict(aliases or {})
        metadata = getattr(source, "metadata", None)
        setting = json.dumps({
            "version": CACHE_VERSION, "labels": labels.identity, "aliases": sorted(self.aliases.items()),
            "fields": [source.hashtag_field, source.caption_field],
            "metadata": [metadata.index_dir.name, metadata.key_field] if metadata is not None else None,
        }, sort_keys=True)
        self.shard_names = []
        for url in source.urls:
            local = _local_file(url)
            stat = local.stat() if local is not None else None
            identity = f"{local.resolve()}|{stat.st_size}|{stat.st_mtime_ns}" if stat else url
            self.shard_names.append(_digest(identity + setting))
        dataset = _digest("|".join(self.shard_names))
        if folder is None:
            first = _local_file(source.urls[0]) if source.urls else None
            beside = first.parent / FOLDER_NAME if first is not None else None
            folder = beside if beside is not None and _writable(beside) else cache_root() / "labels"
        self.folder = Path(folder) / dataset

    def shard_path(self, shard: int) -> Path:
        return self.folder / f"{shard:06d}-{self.shard_names[shard]}.npz"

    def missing(self, shards: Iterable[int] | None = None) -> list[int]:
        chosen = range(len(self.shard_names)) if shards is None else shards
        return [shard for shard in chosen if not self.shard_path(shard).is_file()]

    def build(self, shards: Iterable[int] | None = None) -> int:
        """Write the label files of ``shards`` (default: all) that are not there yet; returns the
        number written. Safe to run from several processes at once (atomic renames)."""
        written = 0
        for shard in self.missing(shards):
            self._write(shard, self._read(shard))
            written += 1
        return written

    def _read(self, shard: int) -> ShardLabels:
        index: dict[str, int] = {}
        flat: list[int] = []
        offsets = [0]
        keys: list[str] = []
        scratch, self.source.skips = self.source.skips, type(self.source.skips)()  # counted when training reads it
        try:
            for outcome in self.source.shard_annotation_outcomes(shard):
                if isinstance(outcome, BadSample):
                    keys.append("")
                else:
                    keys.append(str(outcome.key))
                    for label in sorted(image_tags(self.labels(outcome), self.aliases)):
                        flat.append(index.setdefault(label, len(index)))
                offsets.append(len(flat))
        finally:
            self.source.skips = scratch
        flat_array = np.asarray(flat, dtype=np.int32)
        return ShardLabels(list(index), np.bincount(flat_array, minlength=len(index)).astype(np.int64), flat_array,
                           np.asarray(offsets, dtype=np.int64), keys)

    def _write(self, shard: int, data: ShardLabels) -> None:
        path = self.shard_path(shard)
        path.parent.mkdir(parents=True, exist_ok=True)
        key_bytes = [key.encode("utf-8", "surrogatepass") for key in data.keys]
        key_offsets = np.zeros(len(key_bytes) + 1, dtype=np.int64)
        key_offsets[1:] = np.cumsum([len(key) for key in key_bytes])
        header = json.dumps({"labels": data.labels, "url": self.source.urls[shard]})
        with atomic_path(path) as tmp, open(tmp, "wb") as handle:
            np.savez(handle, header=np.frombuffer(header.encode("utf-8"), dtype=np.uint8), counts=data.counts,
                     flat=data.flat, offsets=data.offsets, keys=np.frombuffer(b"".join(key_bytes), dtype=np.uint8),
                     key_offsets=key_offsets)

    def read(self, shard: int, with_keys: bool = True) -> ShardLabels:
        with np.load(self.shard_path(shard)) as arrays:
            header = json.loads(arrays["header"].tobytes().decode("utf-8"))
            keys: list[str] = []
            if with_keys:
                blob, ends = arrays["keys"].tobytes(), arrays["key_offsets"]
                keys = [blob[ends[i] : ends[i + 1]].decode("utf-8", "surrogatepass") for i in range(len(ends) - 1)]
            return ShardLabels(header["labels"], arrays["counts"], arrays["flat"], arrays["offsets"], keys)


@dataclass
class Prepared:
    """What WSP needs from the annotations before its first step (see :func:`prepare_shards`)."""

    vocab: HashtagVocab
    tag_counts: np.ndarray  # images per vocabulary label
    prior: torch.Tensor  # target_prior under the resampling
    stats: dict[str, int]  # images, images_without_known_tag, known/unknown_tag_occurrences, ..._truncated
    weight_sum: float
    positions: list[int]  # per shard: its samples' copies per epoch

    def save(self, path: Path) -> None:
        body = {"vocab": {"tags": self.vocab.tags, "counts": self.vocab.counts, "info": self.vocab.info,
                          "aliases": self.vocab.aliases},
                "tag_counts": self.tag_counts.tolist(), "prior": self.prior.tolist(), "stats": self.stats,
                "weight_sum": self.weight_sum, "positions": self.positions}
        write_text(path, json.dumps(body))

    @classmethod
    def load(cls, path: Path) -> Prepared:
        body = json.loads(path.read_text())
        vocab = body["vocab"]
        return cls(HashtagVocab(vocab["tags"], vocab["counts"], vocab["info"], vocab["aliases"]),
                   np.asarray(body["tag_counts"], dtype=np.int64), torch.tensor(body["prior"], dtype=torch.float64),
                   body["stats"], float(body["weight_sum"]), [int(p) for p in body["positions"]])


def settings_name(*, vocab: HashtagVocab | None, min_count: int, max_size: int, power: float, reduce: str,
                  loss: str, epoch_size: int, seed: int, max_tags: int) -> str:
    """The file name of a preparation: every setting it depends on (a given vocabulary by content)."""
    given = _digest(json.dumps([vocab.tags, vocab.aliases])) if vocab is not None else "built"
    return "prepared-" + _digest(json.dumps([given, min_count, max_size, power, reduce, loss, epoch_size, seed,
                                             max_tags])) + ".json"


def build_cached_vocab(cache: LabelCache, *, min_count: int, max_size: int,
                       max_distinct: int = 5_000_000) -> HashtagVocab:
    """The vocabulary of the cached labels, as :func:`~prepretrain.data.labels.vocab.build_vocab_streaming`
    builds it from the annotations (pruning the rarest half whenever more than ``max_distinct``
    labels are held; then approximate, and said so in its info). Reads only each shard's label
    table and counts, not its samples."""
    check_complete(cache)
    counter: Counter[str] = Counter()
    images = prunings = pruned = error_bound = 0
    for shard in range(len(cache.shard_names)):
        data = cache.read(shard, with_keys=False)
        images += data.samples
        counter.update(dict(zip(data.labels, data.counts.tolist())))
        if len(counter) > max_distinct:
            counter, dropped, threshold = prune_rarest(counter)
            prunings, pruned, error_bound = prunings + 1, pruned + dropped, error_bound + threshold
    vocab = vocab_from_counts(counter, images, min_count=min_count, max_size=max_size, aliases=cache.aliases)
    if prunings:
        vocab.info.update(approximate=True, prunings=prunings, pruned_tags=pruned, count_error_bound=error_bound)
    return vocab


def check_complete(cache: LabelCache) -> None:
    missing = cache.missing()
    if missing:
        raise FileNotFoundError(f"label cache {cache.folder} lacks {len(missing)} shards (first: {missing[0]})")


def _no_reduce(values: np.ndarray) -> np.ndarray:
    return values


STAT_KEYS = ("images", "images_without_known_tag", "known_tag_occurrences", "unknown_tag_occurrences",
             "images_with_tags_truncated")


def derive(cache: LabelCache, vocab: HashtagVocab, *, power: float, reduce: str, loss: str, epoch_size: int,
           seed: int, max_tags: int, shards: Sequence[int] | None = None,
           reduce_sum: Callable[[np.ndarray], np.ndarray] = _no_reduce) -> Prepared:
    """Images per label, draw weights, their sum, the prior, the coverage statistics and every
    shard's copies under ``vocab``, from the cached samples of ``shards`` (default: all).

    Several processes share the work: each passes its own ``shards`` and a ``reduce_sum`` that
    sums an array over all of them (an all-reduce); every process gets the whole result. Counts,
    statistics and copies are exact, and so is the weight sum, added per shard in shard order,
    so the copies are the same for any number of processes; the prior's sums may differ in the
    last bits (float64 sums in another order)."""
    total_shards = len(cache.shard_names)
    mine = range(total_shards) if shards is None else shards
    to_vocab: dict[int, np.ndarray] = {}

    def known_of(shard: int, data: ShardLabels) -> np.ndarray:
        if shard not in to_vocab:
            to_vocab[shard] = np.asarray([vocab.index.get(label, -1) for label in data.labels] or [0], dtype=np.int64)
        return to_vocab[shard][data.flat] if len(data.flat) else np.zeros(0, dtype=np.int64)

    # pass 1: images per vocabulary label (the weights use this data's counts, as on map sources)
    tag_counts = np.zeros(len(vocab), dtype=np.int64)
    for shard in mine:
        mapped = known_of(shard, cache.read(shard, with_keys=False))
        tag_counts += np.bincount(mapped[mapped >= 0], minlength=len(vocab))
    tag_counts = reduce_sum(tag_counts)
    if not tag_counts.any():
        raise ValueError(f"none of the training images has a label in the {len(vocab)}-label vocabulary")
    per_tag = tag_weights(tag_counts, power)

    def sample_weights(shard: int, data: ShardLabels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(known labels, the sample of each, the weight of each sample) of one shard."""
        mapped = known_of(shard, data)
        sample_of = np.repeat(np.arange(data.samples), np.diff(data.offsets))
        keep = mapped >= 0
        mapped, sample_of = mapped[keep], sample_of[keep]
        order = np.lexsort((mapped, sample_of))  # each sample's labels in vocabulary order, as vocab.encode gives
        mapped, sample_of = mapped[order], sample_of[order]
        weights = np.zeros(data.samples, dtype=np.float64)
        known_per_sample = np.bincount(sample_of, minlength=data.samples)
        if len(mapped):
            values = per_tag[mapped]
            starts = np.flatnonzero(np.r_[True, sample_of[1:] != sample_of[:-1]])
            owners = sample_of[starts]
            if reduce == "max":
                weights[owners] = np.maximum.reduceat(values, starts)
            else:
                weights[owners] = np.add.reduceat(values, starts) / known_per_sample[owners]
        return mapped, sample_of, weights

    # pass 2: the draw weights' sum (per shard), the resampled prior and the coverage statistics
    mass = np.zeros(len(vocab), dtype=np.float64)
    shard_weights = np.zeros(total_shards, dtype=np.float64)
    stats = np.zeros(len(STAT_KEYS), dtype=np.int64)
    weights_of: dict[int, np.ndarray] = {}  # this rank's samples' weights (8 bytes each), for pass 3
    for shard in mine:
        data = cache.read(shard, with_keys=False)
        mapped, sample_of, weights = sample_weights(shard, data)
        weights_of[shard] = weights
        known_per_sample = np.bincount(sample_of, minlength=data.samples)
        stats += [data.samples, int((known_per_sample == 0).sum()), len(mapped), len(data.flat) - len(mapped),
                  int((known_per_sample > max_tags).sum()) if max_tags else 0]
        shard_weights[shard] = weights.sum()
        share = weights[sample_of] / known_per_sample[sample_of] if loss == "softmax" else weights[sample_of]
        mass += np.bincount(mapped, weights=share, minlength=len(vocab))
    mass, shard_weights = reduce_sum(mass), reduce_sum(shard_weights)
    statistics = dict(zip(STAT_KEYS, (int(v) for v in reduce_sum(stats))))
    total = float(shard_weights.sum())
    if total <= 0:
        raise ValueError(f"none of the {statistics['images']} images has a label in the {len(vocab)}-label vocabulary")

    # pass 3: every sample's copies per epoch (RepeatFactors' rule, with its unit_hash)
    scale = (epoch_size or statistics["images"]) / total
    positions = np.zeros(total_shards, dtype=np.int64)
    for shard in mine:
        keys, weights = cache.read(shard).keys, weights_of.pop(shard)
        expected = weights * scale
        whole = np.floor(expected)
        draws = np.asarray([unit_hash(seed, key) if w > 0 else 1.0 for key, w in zip(keys, weights)],
                           dtype=np.float64)
        positions[shard] = int(whole.sum() + (draws < expected - whole).sum())
    positions = reduce_sum(positions)
    return Prepared(vocab, tag_counts, torch.from_numpy(mass / total), statistics, total,
                    [int(p) for p in positions])


class Communicator(Protocol):
    """What the preparation needs from the processes of a job; the stage hands one in
    (:class:`Alone` for one process, :class:`prepretrain.train.distributed.Collectives` under torch.distributed)."""

    rank: int
    world_size: int

    def barrier(self) -> None: ...

    def sum(self, values: np.ndarray) -> np.ndarray: ...


class Alone:
    """The communicator of a single process: no one to wait for, sums are the values themselves."""

    rank, world_size = 0, 1

    def barrier(self) -> None:
        pass

    def sum(self, values: np.ndarray) -> np.ndarray:
        return values


def prepare_shards(source: Any, labels: WeakLabeler, aliases: dict[str, str], *, vocab: HashtagVocab | None,
                   min_count: int, max_size: int, power: float, reduce: str, loss: str, epoch_size: int, seed: int,
                   max_tags: int, comm: Communicator | None = None, scratch: str | Path | None = None) -> Prepared:
    """Everything WSP derives from the annotations of shards, from one annotation pass shared by every
    rank: each rank labels its share of the shards into the cache (:meth:`LabelCache.build`); rank 0
    builds the vocabulary from the cached label counts unless ``vocab`` is given (``vocab=`` or a
    resumed run); every rank derives counts, weights, prior and copies for its share, summed across
    ranks (:func:`derive`); rank 0 writes the result, which a later run on the same data and
    settings reads instead.

    ``scratch``: a folder every rank sees (the run directory) to label into instead of the shared
    cache beside the data, removed afterwards: ``label_cache=false``, nothing kept on disk and
    nothing read from an earlier run. ``vocab`` brings its own synonyms when it has them. ``comm``:
    the job's processes (default :class:`Alone`).
    """
    comm = comm or Alone()
    main = comm.rank == 0
    folder = None if scratch is None else Path(scratch)
    cache = LabelCache(source, labels, vocab.aliases if vocab is not None else aliases, folder=folder)
    mine = shards_of_rank(len(source.urls), comm.rank, comm.world_size)
    cache.build(mine)
    comm.barrier()
    name = settings_name(vocab=vocab, min_count=min_count, max_size=max_size, power=power, reduce=reduce, loss=loss,
                         epoch_size=epoch_size, seed=seed, max_tags=max_tags)
    path = cache.folder / name
    if comm.sum(np.array([main and path.is_file()], dtype=np.int64))[0]:  # rank 0 decides for all
        prepared = Prepared.load(path)
    else:
        if vocab is None:
            vocab_path = cache.folder / f"vocab-{name}"
            if main:
                build_cached_vocab(cache, min_count=min_count, max_size=max_size).save(vocab_path)
            comm.barrier()
            vocab = HashtagVocab.load(vocab_path)
        prepared = derive(cache, vocab, power=power, reduce=reduce, loss=loss, epoch_size=epoch_size, seed=seed,
                          max_tags=max_tags, shards=mine, reduce_sum=comm.sum)
        if main and scratch is None:
            prepared.save(path)
    if scratch is not None:
        comm.barrier()  # every rank has read the scratch labels
        if main:
            shutil.rmtree(folder, ignore_errors=True)
    return prepared


def shards_of_rank(count: int, rank: int, world_size: int) -> Sequence[int]:
    """The shards rank ``rank`` reads when building the cache: ``rank, rank + world, ...``."""
    return range(rank, count, world_size)


__all__ = ["Alone", "Communicator", "LabelCache", "Prepared", "ShardLabels", "build_cached_vocab", "derive",
           "prepare_shards", "settings_name", "shards_of_rank"]

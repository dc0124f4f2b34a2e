"""Hashtag vocabulary, per-image targets and tail resampling for weakly supervised pretraining.

WSP (SWAG, Singh et al. 2022, arXiv 2201.08371; MAWS, arXiv 2303.13496) classifies each image into
the ~28K most useful hashtags of a web dataset. Three things turn raw per-image tag lists into that
training signal:

* :func:`normalize_hashtag` + :func:`build_vocab`: people write ``#Dog``, ``dog`` and
  ``DOG `` for one tag, so tags are normalised (Unicode NFKC, case folding, leading ``#``
  and whitespace removed) and counted once per image; tags seen fewer than ``min_count``
  times are dropped and the ``max_size`` most frequent are kept (the paper: ~28K). The
  result (:class:`HashtagVocab`) is saved with the run (``vocab.json``) so the classifier
  head always has a vocabulary that explains its rows.
* Synonyms (optional, :func:`synonym_map` / :func:`load_synonyms`): the paper's ~28K classes
  are hashtags mapped to WordNet synsets, so ``#puppy`` and ``#dog`` are one class. An alias
  map sends each normalised tag to its canonical class tag before counting; it is saved in
  the vocabulary so encoding at evaluation time agrees with training.
* :func:`encode_images`: every image's tags as vocabulary indices, with the unknown tags
  and the images left without any known tag counted, never silently dropped.
* :func:`sampling_weights`: hashtag frequencies follow a Zipf law, so uniform sampling
  shows the head of the distribution almost exclusively. SWAG resamples by the inverse
  square root of tag frequency; here an image's weight is ``max`` (default) or ``mean`` over
  its known tags of ``count ** -power``. ``max`` is the default because an image is worth
  seeing more often as soon as it carries *one* rare tag: a generic tag next to a rare one
  (``#photooftheday #axolotl``) must not dilute the rare one's boost, which ``mean`` does.
  Images without a known tag get weight 0, so they are never drawn.

The weights feed ``TrainData(weights=..., epoch_size=...)``: the loader then draws each
epoch with a generator seeded by ``(seed, epoch)`` and splits positions across ranks, so
resampling is deterministic, resumable and identical however the run is sharded.

Shards have no random access, so they are resampled in the stream instead
(:class:`RepeatFactors`): each sample appears ``floor(r)`` or ``ceil(r)`` times per epoch, ``r``
its expected count under the same weights, the choice fixed by a hash of ``(seed, key)``.
:func:`stream_statistics` gives the weight sum and the resampled prior in one pass over the
tags without holding per-image arrays.
"""

from __future__ import annotations

import hashlib
import json
import math
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from prepretrain.data.records import BadSample
from prepretrain.files import write_text

VOCAB_FORMAT = "prepretrain-hashtag-vocab-v1"


class EmptyVocabulary(ValueError):
    """No tag survives the vocabulary filters: there is nothing to train a classifier on."""


class VocabularyMismatch(ValueError):
    """A vocabulary does not fit the classifier head it is paired with."""


def normalize_hashtag(raw: str) -> str:
    """Canonical spelling of one hashtag; ``""`` when nothing is left.

    NFKC first (full-width ``＃ＤＯＧ`` and ligatures become plain text), then case folding
    (``casefold`` rather than ``lower`` so ``Straße`` meets ``STRASSE``), then every leading
    ``#`` and all whitespace are removed: a hashtag cannot contain a space, so ``new york``
    in a manifest means ``#newyork``.
    """
    text = unicodedata.normalize("NFKC", str(raw)).casefold()
    text = "".join(text.split())
    return text.lstrip("#＃")


@dataclass
class HashtagVocab:
    """An ordered tag list (index = class) with the per-image counts it was built from."""

    tags: list[str]
    counts: list[int] = field(default_factory=list)  # images carrying each tag (0 when unknown)
    info: dict[str, Any] = field(default_factory=dict)  # how it was built, for the record
    aliases: dict[str, str] = field(default_factory=dict)  # normalised synonym -> canonical class tag

    def __post_init__(self) -> None:
        if not self.tags:
            raise EmptyVocabulary("the hashtag vocabulary is empty")
        if not self.counts:
            self.counts = [0] * len(self.tags)
        if len(self.counts) != len(self.tags):
            raise ValueError(f"{len(self.tags)} tags but {len(self.counts)} counts")
        self.index: dict[str, int] = {}
        for position, tag in enumerate(self.tags):
            if tag != normalize_hashtag(tag) or not tag:
                raise ValueError(f"vocabulary entry {position} ({tag!r}) is not a normalised hashtag")
            if tag in self.index:
                raise ValueError(f"vocabulary entry {position} ({tag!r}) is a duplicate of entry {self.index[tag]}")
            self.index[tag] = position
        for alias, canonical in self.aliases.items():
            if alias != normalize_hashtag(alias) or canonical != normalize_hashtag(canonical) or not canonical:
                raise ValueError(f"synonym {alias!r} -> {canonical!r} is not between normalised hashtags")
            if alias in self.index and alias != canonical:
                raise ValueError(f"{alias!r} is both a vocabulary class and a synonym of {canonical!r}")

    def canonical(self, raw: str) -> str:
        """The class tag a raw hashtag counts as: normalised, then mapped through the synonyms."""
        tag = normalize_hashtag(raw)
        return self.aliases.get(tag, tag)

    def __len__(self) -> int:
        return len(self.tags)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, HashtagVocab) and self.tags == other.tags

    def encode(self, raw_tags: Iterable[str]) -> tuple[list[int], int]:
        """(sorted unique indices of the known tags, number of unknown tag occurrences)."""
        known: set[int] = set()
        unknown = 0
        for raw in raw_tags:
            tag = self.canonical(raw)
            if not tag:
                continue
            position = self.index.get(tag)
            if position is None:
                unknown += 1
            else:
                known.add(position)
        return sorted(known), unknown

    def save(self, path: str | Path) -> Path:
        """Write ``.json`` (tags, counts, synonyms, build info) or ``.txt`` (``tag<TAB>count``
        lines; synonyms need the JSON form), atomically."""
        path = Path(path)
        if path.suffix == ".txt":
            if self.aliases:
                raise ValueError("a vocabulary with synonyms is saved as .json (the .txt form has no place for them)")
            text = "".join(f"{tag}\t{count}\n" for tag, count in zip(self.tags, self.counts))
        else:
            body = {"format": VOCAB_FORMAT, "size": len(self), "info": self.info, "tags": self.tags,
                    "counts": self.counts, "aliases": self.aliases}
            text = json.dumps(body, ensure_ascii=False, indent=0)
        return write_text(path, text)

    @classmethod
    def load(cls, path: str | Path) -> HashtagVocab:
        """Read a vocabulary written by :meth:`save`, a JSON list of tags, or a text file with
        one tag per line (optionally ``tag<TAB>count``). Entries are normalised on reading, so a
        hand-written list of ``#Dog`` lines works; duplicates after normalisation are an error."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"hashtag vocabulary not found: {path}")
        text = path.read_text(encoding="utf-8")
        counts: list[int] = []
        info: dict[str, Any] = {}
        aliases: dict[str, str] = {}
        if path.suffix == ".json":
            body = json.loads(text)
            if isinstance(body, list):
                raw = [str(tag) for tag in body]
            elif isinstance(body, dict) and isinstance(body.get("tags"), list):
                raw = [str(tag) for tag in body["tags"]]
                counts = [int(c) for c in body.get("counts") or []]
                info = dict(body.get("info") or {})
                aliases = {normalize_hashtag(k): normalize_hashtag(v) for k, v in (body.get("aliases") or {}).items()}
            else:
                raise ValueError(f"{path}: expected a list of tags or an object with a 'tags' list")
        else:
            raw = []
            for line in text.splitlines():
                if not line.strip():
                    continue
                tag, _, count = line.partition("\t")
                raw.append(tag)
                if count.strip():
                    counts.append(int(count))
            if counts and len(counts) != len(raw):
                raise ValueError(f"{path}: some lines have a count and some do not")
        tags = [normalize_hashtag(tag) for tag in raw]
        if not any(tags):
            raise EmptyVocabulary(f"{path} holds no hashtags")
        empty = [i for i, tag in enumerate(tags) if not tag]
        if empty:
            raise ValueError(f"{path}: entry {empty[0]} ({raw[empty[0]]!r}) is empty after normalisation")
        return cls(tags, counts, info, aliases)


def synonym_map(groups: Iterable[Sequence[str]]) -> dict[str, str]:
    """``[["dog", "puppy", "doggo"], ...]`` (canonical first) -> ``{"puppy": "dog", "doggo": "dog"}``
    on normalised spellings; a tag claimed by two groups is an error, not a silent pick."""
    aliases: dict[str, str] = {}
    canonicals: set[str] = set()
    for group in groups:
        names = [normalize_hashtag(tag) for tag in group]
        names = [name for name in names if name]
        if not names:
            continue
        canonical = names[0]
        canonicals.add(canonical)
        for name in names[1:]:
            if name != canonical and aliases.get(name, canonical) != canonical:
                raise ValueError(f"synonym {name!r} belongs to both {aliases[name]!r} and {canonical!r}")
            if name != canonical:
                aliases[name] = canonical
    clash = sorted(canonicals & set(aliases))
    if clash:
        raise ValueError(f"{clash[0]!r} is a class of its own and a synonym of {aliases[clash[0]]!r}")
    return aliases


def load_synonyms(path: str | Path) -> dict[str, str]:
    """Read a synonym table: JSON ``{"dog": ["puppy", "doggo"]}`` (class -> synonyms) or
    ``{"puppy": "dog"}`` (synonym -> class), or text with one group per line, class first
    (``dog puppy doggo``, separated by spaces, commas or tabs)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"synonym table not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        body = json.loads(text)
        if not isinstance(body, dict):
            raise ValueError(f"{path}: expected an object mapping class -> synonyms or synonym -> class")
        groups: list[list[str]] = []
        for key, value in body.items():
            if isinstance(value, str):
                groups.append([value, key])
            elif isinstance(value, list):
                groups.append([key, *map(str, value)])
            else:
                raise ValueError(f"{path}: entry {key!r} must be a string or a list of strings")
    else:
        groups = [line.replace(",", " ").split() for line in text.splitlines() if line.strip()]
    return synonym_map(groups)


def check_vocab_limits(min_count: int, max_size: int) -> None:
    """ValueError unless ``min_count >= 1`` and ``max_size >= 1`` (checked before any counting)."""
    if min_count < 1:
        raise ValueError(f"min_count must be >= 1, got {min_count}")
    if max_size < 1:
        raise ValueError(f"max_size must be >= 1, got {max_size}")


def image_tags(raw_tags: Iterable[str], aliases: dict[str, str] | None = None) -> set[str]:
    """The class tags one image counts for: normalised, synonyms mapped to their class, each once."""
    aliases = aliases or {}
    normalised = (normalize_hashtag(raw) for raw in raw_tags)
    return {aliases.get(tag, tag) for tag in normalised if tag}


def build_vocab(tag_lists: Iterable[Sequence[str]], *, min_count: int = 1, max_size: int = 28_000,
                aliases: dict[str, str] | None = None) -> HashtagVocab:
    """Count tags (normalised, synonyms mapped to their class) once per image; keep those seen
    ``>= min_count`` times, the ``max_size`` most frequent, ordered by count (ties
    alphabetically, so the order -- and the class index of every tag -- is the same on every
    rank and every run). For sources too large to hold every tag list, see
    :func:`~prepretrain.data.labels.vocab.build_vocab_streaming`."""
    check_vocab_limits(min_count, max_size)
    aliases = dict(aliases or {})
    counter: Counter[str] = Counter()
    images = 0
    for raw_tags in tag_lists:
        images += 1
        counter.update(image_tags(raw_tags, aliases))
    return vocab_from_counts(counter, images, min_count=min_count, max_size=max_size, aliases=aliases)


def prune_rarest(counts: Counter) -> tuple[Counter, int, int]:
    """Drop every tag whose count is at most the median count: at least the rarest half of
    the distinct tags (all ties of the median go, so the result does not depend on the order
    tags arrived in). Returns (the kept counts, tags dropped, largest count dropped)."""
    values = np.fromiter(counts.values(), dtype=np.int64, count=len(counts))
    threshold = int(np.partition(values, (len(values) - 1) // 2)[(len(values) - 1) // 2])
    kept = Counter({tag: number for tag, number in counts.items() if number > threshold})
    return kept, len(counts) - len(kept), threshold


def vocab_from_counts(counter: Counter[str] | dict[str, int], images: int, *, min_count: int = 1,
                      max_size: int = 28_000, aliases: dict[str, str] | None = None) -> HashtagVocab:
    """The vocabulary :func:`build_vocab` makes from per-image tag counts (``image_tags`` of
    ``images`` images): tags seen ``>= min_count`` times, the ``max_size`` most frequent,
    ordered by count then alphabetically; the synonyms of the kept tags travel with it."""
    check_vocab_limits(min_count, max_size)
    aliases = dict(aliases or {})
    kept = sorted(((tag, n) for tag, n in counter.items() if n >= min_count), key=lambda item: (-item[1], item[0]))
    if not kept:
        raise EmptyVocabulary(
            f"no hashtag is left for the vocabulary: {images} images carry {len(counter)} distinct tags, "
            f"none seen >= {min_count} times (lower vocab_min_count, or check that the data has hashtags)"
        )
    kept = kept[:max_size]
    info = {"images": images, "distinct_tags": len(counter), "min_count": min_count, "max_size": max_size,
            "dropped_rare_tags": len(counter) - len(kept)}
    kept_tags = {tag for tag, _ in kept}
    used_aliases = {alias: canonical for alias, canonical in aliases.items() if canonical in kept_tags}
    return HashtagVocab([tag for tag, _ in kept], [n for _, n in kept], info, used_aliases)


def annotation_tags(annotation: Any) -> list[str]:
    """An annotation's raw hashtags: the default labeller (see
    :class:`~prepretrain.data.labels.weaklabels.WeakLabeler` for tags, captions and synsets)."""
    return list(annotation.hashtags)


def source_hashtags(source: Any, labels: Callable[[Any], list[str]] = annotation_tags) -> Iterator[list[str]]:
    """Raw tag lists (``labels`` of each annotation) of a map source in index order, without
    decoding pixels when it can.

    File sources and the synthetic set expose ``annotation(i)``; other map sources are read
    through ``get(i)``. A record that cannot be read counts as an image without tags. Shards
    (no index access): :func:`~prepretrain.data.labels.vocab.count_hashtags`.
    """
    read = getattr(source, "annotation", None) or source.get
    for index in range(len(source)):
        try:
            yield labels(read(index))
        except BadSample:
            yield []


@dataclass
class EncodedTags:
    """Every image's known tag indices, stored flat (``offsets[i]:offsets[i+1]``) so millions
    of images cost two arrays instead of millions of Python lists."""

    flat: np.ndarray  # int32 tag indices
    offsets: np.ndarray  # int64, len = images + 1
    unknown_occurrences: int = 0
    known_occurrences: int = 0

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def tags_of(self, image: int) -> np.ndarray:
        return self.flat[self.offsets[image] : self.offsets[image + 1]]

    @property
    def num_tags(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def images_without_known_tag(self) -> int:
        return int((self.num_tags == 0).sum())

    def stats(self) -> dict[str, int]:
        """What the run reports about how well the vocabulary covers the data."""
        return {
            "images": len(self),
            "images_without_known_tag": self.images_without_known_tag,
            "known_tag_occurrences": self.known_occurrences,
            "unknown_tag_occurrences": self.unknown_occurrences,
        }


def encode_images(vocab: HashtagVocab, tag_lists: Iterable[Sequence[str]]) -> EncodedTags:
    """Encode each image's raw tags with ``vocab``, counting unknown tags and tagless images."""
    flat: list[int] = []
    offsets = [0]
    unknown_total = 0
    for raw_tags in tag_lists:
        known, unknown = vocab.encode(raw_tags)
        flat.extend(known)
        offsets.append(len(flat))
        unknown_total += unknown
    return EncodedTags(np.asarray(flat, dtype=np.int32), np.asarray(offsets, dtype=np.int64),
                       unknown_occurrences=unknown_total, known_occurrences=len(flat))


def tag_image_counts(encoded: EncodedTags, vocab_size: int) -> np.ndarray:
    """Images carrying each tag (the frequencies resampling is based on)."""
    return np.bincount(encoded.flat, minlength=vocab_size).astype(np.int64)


def sampling_weights(encoded: EncodedTags, tag_counts: np.ndarray, *, power: float = 0.5,
                     reduce: str = "max") -> torch.Tensor:
    """Per-image draw weights: ``reduce`` over the image's tags of ``tag_count ** -power``.

    ``power=0.5`` is inverse-square-root resampling, ``power=0`` uniform over tagged images,
    ``power=1`` fully class-balanced. Images without a known tag get 0 (never drawn).
    Float64: with billions of images, float32 sums lose the tail's share.
    """
    if power < 0:
        raise ValueError(f"power must be >= 0, got {power}")
    if reduce not in ("max", "mean"):
        raise ValueError(f"reduce must be 'max' or 'mean', got {reduce!r}")
    counts = np.asarray(tag_counts, dtype=np.float64)
    if len(encoded.flat) and counts[encoded.flat].min() <= 0:
        raise ValueError("a tag used by an image has a count of 0; counts must come from the same images")
    per_tag = np.zeros_like(counts)
    used = counts > 0
    per_tag[used] = counts[used] ** -power
    values = per_tag[encoded.flat]
    weights = np.zeros(len(encoded), dtype=np.float64)
    has_tags = encoded.num_tags > 0
    starts = encoded.offsets[:-1][has_tags]
    if reduce == "max":
        weights[has_tags] = np.maximum.reduceat(values, starts) if len(starts) else weights[has_tags]
    else:
        sums = np.add.reduceat(values, starts) if len(starts) else weights[has_tags]
        weights[has_tags] = sums / encoded.num_tags[has_tags]
    return torch.from_numpy(weights)


def target_prior(encoded: EncodedTags, weights: torch.Tensor, vocab_size: int, loss: str) -> torch.Tensor:
    """The best constant prediction under the sampling distribution, per tag.

    ``softmax``: the expected normalised target ``E[t / |t|]`` (sums to 1); ``sigmoid``: the
    probability that a drawn image carries the tag. Initialising the head's bias at its log
    (or logit) makes the first steps start from the loss of the frequency baseline instead of
    spending them -- and large gradients into the pretrained encoder -- on learning priors.
    """
    if loss not in ("softmax", "sigmoid"):
        raise ValueError(f"loss must be 'softmax' or 'sigmoid', got {loss!r}")
    image_weights = weights.double().numpy()
    total = image_weights.sum()
    if total <= 0:
        raise EmptyVocabulary("no image has a known tag, so no image can be drawn")
    num_tags = encoded.num_tags
    per_image = np.repeat(image_weights, num_tags)
    if loss == "softmax":
        per_image = per_image / np.repeat(np.maximum(num_tags, 1), num_tags)
    prior = np.bincount(encoded.flat, weights=per_image, minlength=vocab_size) / total
    return torch.from_numpy(prior)



# -- resampling in a stream (shards) -------------------------------------------------------


def tag_weights(tag_counts: np.ndarray, power: float) -> np.ndarray:
    """Per tag ``count ** -power`` (0 for tags with no image): the factors an image's weight
    is reduced from (:func:`sampling_weights` uses the same)."""
    if power < 0:
        raise ValueError(f"power must be >= 0, got {power}")
    counts = np.asarray(tag_counts, dtype=np.float64)
    per_tag = np.zeros_like(counts)
    used = counts > 0
    per_tag[used] = counts[used] ** -power
    return per_tag


def unit_hash(seed: int, key: str) -> float:
    """A uniform number in [0, 1) from ``(seed, key)``: the same in every process and run
    (blake2b, not Python's per-process randomised ``hash``)."""
    digest = hashlib.blake2b(f"{seed}\x00{key}".encode("utf-8", errors="surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


class RepeatFactors:
    """How many times each sample appears per epoch when resampling in a stream (shards).

    The stream counterpart of :func:`sampling_weights`: a sample's weight is ``w = reduce``
    over its known tags of ``count ** -power``, its expected number of appearances per epoch
    ``r = w * scale`` with ``scale = epoch_size / sum(w)`` over all images, and it appears
    ``n = floor(r) + (u < frac(r))`` times, ``u`` = :func:`unit_hash` of ``(seed, key)``. So
    ``n`` depends only on the seed, the key and the tags: the same on every rank, worker,
    epoch and resume, and an epoch holds ``sum(n)`` samples, ``epoch_size`` in expectation,
    with the same per-tag distribution as the weighted draw (stratified: only the fractional
    parts are random). Images without a known tag get ``n = 0``.

    A plain object (vocabulary, per-tag factors, numbers), so DataLoader workers can pickle
    it; called on an :class:`~prepretrain.data.records.Annotation` (anything with ``key``
    and what ``labels`` reads: by default ``hashtags``).
    """

    def __init__(self, vocab: HashtagVocab, tag_counts: np.ndarray, *, power: float = 0.5, reduce: str = "max",
                 scale: float = 1.0, seed: int = 0, labels: Callable[[Any], list[str]] = annotation_tags):
        if reduce not in ("max", "mean"):
            raise ValueError(f"reduce must be 'max' or 'mean', got {reduce!r}")
        if len(tag_counts) != len(vocab):
            raise ValueError(f"{len(tag_counts)} tag counts for a {len(vocab)}-tag vocabulary")
        if not (scale >= 0 and math.isfinite(scale)):
            raise ValueError(f"scale must be a finite number >= 0, got {scale}")
        self.vocab = vocab
        self.per_tag = tag_weights(tag_counts, power)
        self.power = power
        self.reduce = reduce
        self.scale = float(scale)
        self.seed = int(seed)
        self.labels = labels

    def weight(self, known: Sequence[int]) -> float:
        """The draw weight of an image with these known tag indices (0 without any)."""
        if not len(known):
            return 0.0
        values = self.per_tag[np.asarray(known, dtype=np.int64)]
        if values.min() <= 0:
            raise ValueError("a tag used by an image has a count of 0; counts must come from the same images")
        return float(values.max()) if self.reduce == "max" else float(values.sum()) / len(values)

    def expected(self, annotation: Any) -> float:
        """``r``: the sample's expected appearances per epoch."""
        known, _ = self.vocab.encode(self.labels(annotation))
        return self.weight(known) * self.scale

    def __call__(self, annotation: Any) -> int:
        return self.labelled_copies(annotation)[0]

    def labelled_copies(self, annotation: Any) -> tuple[int, list[int]]:
        """(copies of the sample per epoch, its known tag indices): a reader that labels a sample
        to count its copies hands the indices on with it, so the transform does not label it again."""
        known, _ = self.vocab.encode(self.labels(annotation))
        expected = self.weight(known) * self.scale
        whole = math.floor(expected)
        return int(whole) + (unit_hash(self.seed, str(annotation.key)) < expected - whole), known


@dataclass
class StreamStatistics:
    """What one pass over a stream's tags gives WSP (see :func:`stream_statistics`)."""

    weight_sum: float  # sum of the images' draw weights
    prior: torch.Tensor  # target_prior under the weights
    tag_counts: np.ndarray  # images per tag
    stats: dict[str, int]  # EncodedTags.stats() keys, plus images_with_tags_truncated


def stream_statistics(factors: RepeatFactors, tag_lists: Iterable[Sequence[str]], *, loss: str,
                      max_tags: int = 0) -> StreamStatistics:
    """One pass over every image's raw tags: the sum of the draw weights (for
    ``RepeatFactors.scale``), the resampled :func:`target_prior`, the images per tag and the
    coverage statistics, holding only per-tag arrays (any number of images).

    ``max_tags``: also count the images with more known tags than that (0: not counted)."""
    if loss not in ("softmax", "sigmoid"):
        raise ValueError(f"loss must be 'softmax' or 'sigmoid', got {loss!r}")
    size = len(factors.vocab)
    mass = np.zeros(size, dtype=np.float64)
    counts = np.zeros(size, dtype=np.int64)
    total = 0.0
    images = without = known_total = unknown_total = truncated = 0
    for raw_tags in tag_lists:
        images += 1
        known, unknown = factors.vocab.encode(raw_tags)
        unknown_total += unknown
        known_total += len(known)
        truncated += bool(max_tags) and len(known) > max_tags
        if not known:
            without += 1
            continue
        counts[known] += 1
        weight = factors.weight(known)
        total += weight
        mass[known] += weight / len(known) if loss == "softmax" else weight
    if total <= 0:
        raise EmptyVocabulary(f"none of the {images} images has a tag in the {size}-tag vocabulary")
    stats = {"images": images, "images_without_known_tag": without, "known_tag_occurrences": known_total,
             "unknown_tag_occurrences": unknown_total, "images_with_tags_truncated": truncated}
    return StreamStatistics(total, torch.from_numpy(mass / total), counts, stats)


def pad_tags(indices: Sequence[int], max_tags: int) -> torch.Tensor:
    """Fixed-length tag indices (``-1`` padding) so batches collate; the dense multi-hot target
    over tens of thousands of tags is built on the device, not shipped through the loader.

    ``indices`` are sorted by frequency (vocabulary order); an image with more than
    ``max_tags`` known tags keeps its ``max_tags`` rarest ones, the most informative.
    """
    padded = torch.full((max_tags,), -1, dtype=torch.long)
    kept = list(indices)[-max_tags:]
    if kept:
        padded[: len(kept)] = torch.as_tensor(kept, dtype=torch.long)
    return padded


__all__ = [
    "EmptyVocabulary",
    "EncodedTags",
    "HashtagVocab",
    "RepeatFactors",
    "StreamStatistics",
    "annotation_tags",
    "VocabularyMismatch",
    "build_vocab",
    "check_vocab_limits",
    "encode_images",
    "image_tags",
    "load_synonyms",
    "normalize_hashtag",
    "pad_tags",
    "prune_rarest",
    "sampling_weights",
    "source_hashtags",
    "stream_statistics",
    "synonym_map",
    "tag_image_counts",
    "tag_weights",
    "target_prior",
    "unit_hash",
    "vocab_from_counts",
]

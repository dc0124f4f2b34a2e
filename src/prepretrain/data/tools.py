"""Tools over the readers: describe a source, write shards, write the synthetic dataset to disk.

Readers (:mod:`~prepretrain.data.sources`, :mod:`~prepretrain.data.shards`,
:mod:`~prepretrain.data.synthetic`) only read; everything that *produces* something from a
source lives here: the statistics of ``prepretrain data stats`` (:func:`describe_source`),
hashtag counts and vocabularies of sources of any size in one streaming pass
(:func:`count_hashtags`, :func:`build_vocab_streaming`), the conversion of a map-style source
to WebDataset shards (:func:`write_shards`) and the export of the synthetic dataset to image
files plus manifests (:func:`write_synthetic`). All of them read annotations through
:func:`iter_annotations`, which leaves pixels undecoded wherever the source allows it.
Tools import readers; readers never import tools. Every file is written atomically
(:mod:`prepretrain.files`), so an interrupted tool never leaves a file that looks finished.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
import random
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from webdataset import TarWriter

from prepretrain.data.hashtags import (
    HashtagVocab,
    annotation_tags,
    check_vocab_limits,
    image_tags,
    load_synonyms,
    prune_rarest,
    synonym_map,
    vocab_from_counts,
)
from prepretrain.data.loader import source_format
from prepretrain.data.records import Annotation, BadSample, Record, SkipCounter
from prepretrain.data.shards import INDEX_FORMAT, INDEX_NAME, ShardSource
from prepretrain.data.synthetic import (
    ATTRIBUTE_TAGS,
    CLASS_NAMES,
    HASHTAG_VOCAB,
    SYNONYMS,
    SyntheticSource,
    synthetic_split_sizes,
)
from prepretrain.data.weaklabels import LabelCounts, WeakLabeler
from prepretrain.files import atomic_path, write_text

# -- reading annotations without pixels -----------------------------------------------------


def iter_annotations(source: Any, indices: Iterable[int] | None = None) -> Iterator[Annotation | BadSample]:
    """One outcome per sample: its ``Annotation`` (hashtags, caption, labels, key) or the
    ``BadSample`` that stops it, with the pixels left undecoded wherever the source allows:

    - shards (``iter_annotation_outcomes``): only the ``json``/``txt``/``cls`` members are
      read, in shard order; image payloads are skipped (seeked over in local tars);
    - sources with ``annotation(i)`` (manifests, folders, the synthetic set): their rows,
      paths or generators, nothing is decoded or rendered;
    - any other map source: ``get(i)``, which decodes (it has nothing cheaper).

    ``indices``: only those samples of a map source, in that order.
    """
    outcomes = getattr(source, "iter_annotation_outcomes", None)
    if outcomes is not None and not hasattr(source, "get"):
        if indices is not None:
            raise ValueError(f"{type(source).__name__} is read in order; it cannot read chosen indices")
        yield from outcomes()
        return
    annotation = getattr(source, "annotation", None)
    for index in range(len(source)) if indices is None else indices:
        try:
            if annotation is not None:
                yield annotation(index)
            else:
                record = source.get(index)
                yield Annotation(record.key, record.hashtags, record.caption, record.labels)
        except BadSample as error:
            yield error


@contextlib.contextmanager
def _scratch_skips(source: Any) -> Iterator[SkipCounter]:
    """A fresh ``source.skips`` for the duration (shards count shard problems there), so
    statistics neither pollute nor reset the source's own counter."""
    scratch = SkipCounter()
    if not hasattr(source, "skips"):
        yield scratch
        return
    previous, source.skips = source.skips, scratch
    try:
        yield scratch
    finally:
        source.skips = previous


def iter_hashtags(source: Any, labels: Callable[[Any], list[str]] = annotation_tags) -> Iterator[list[str]]:
    """Every sample's raw tags (``labels`` of its annotation: hashtags by default, see
    :class:`~prepretrain.data.weaklabels.WeakLabeler`) in :func:`iter_annotations` order (shards:
    shard order, no image read), ``[]`` for a sample whose annotations cannot be read (as
    :func:`~prepretrain.data.hashtags.source_hashtags`); the source's own ``skips`` are left alone."""
    with _scratch_skips(source):
        for outcome in iter_annotations(source):
            yield [] if isinstance(outcome, BadSample) else labels(outcome)


# -- counting hashtags in one pass ----------------------------------------------------------------


def count_hashtags(source: Any, *, max_distinct: int = 5_000_000, aliases: dict[str, str] | None = None,
                   labels: Callable[[Any], list[str]] = annotation_tags) -> tuple[Counter, dict[str, Any]]:
    """In how many images each tag appears, from one streaming pass that decodes no image.

    Tags are counted as :func:`~prepretrain.data.hashtags.build_vocab` counts them: normalised
    (:func:`~prepretrain.data.hashtags.normalize_hashtag`), mapped through ``aliases``
    (synonym -> class tag) and counted once per image. Annotations come from
    :func:`iter_annotations` (shards: ``json``/``txt`` members only; manifests: their rows).
    A sample whose annotations cannot be read counts as an image without tags, as in
    :func:`~prepretrain.data.hashtags.source_hashtags`.

    Memory is bounded by ``max_distinct`` distinct tags: whenever there are more, every tag
    whose count is at most the median is dropped (at least the rarest half) and counts again
    from zero if it reappears. That is an approximation: a kept tag's count can then be too low
    by at most ``stats["count_error_bound"]`` (the sum of the largest count dropped at each
    pruning), a tag dropped late may be missing, and ``stats["exact"]`` is false. Without
    pruning the counts are exact.

    ``labels``: what an annotation's tags are (its hashtags; captions, Flickr tags or synsets
    through a :class:`~prepretrain.data.weaklabels.WeakLabeler`).

    Returns ``(counts, stats)``; ``stats``: ``images`` (samples read), ``images_without_tags``
    (including ``unreadable`` ones), ``tag_occurrences`` (image-tag pairs counted),
    ``distinct_tags`` (in ``counts``), ``max_distinct``, ``prunings``, ``pruned_tags`` (entries
    dropped, a tag dropped twice counts twice), ``count_error_bound``, ``exact`` and
    ``skipped`` (bad samples and shard problems by reason).
    """
    if max_distinct < 2:
        raise ValueError(f"max_distinct must be >= 2, got {max_distinct}")
    aliases = dict(aliases or {})
    counts: Counter = Counter()
    images = without = unreadable = occurrences = prunings = pruned_tags = error_bound = 0
    with _scratch_skips(source) as skips:
        for outcome in iter_annotations(source):
            images += 1
            if isinstance(outcome, BadSample):
                skips.skip(outcome)
                unreadable += 1
                without += 1
                continue
            tags = image_tags(labels(outcome), aliases)
            if not tags:
                without += 1
                continue
            occurrences += len(tags)
            counts.update(tags)
            if len(counts) > max_distinct:
                counts, dropped, threshold = prune_rarest(counts)
                prunings += 1
                pruned_tags += dropped
                error_bound += threshold
    stats = {
        "images": images,
        "images_without_tags": without,
        "unreadable": unreadable,
        "tag_occurrences": occurrences,
        "distinct_tags": len(counts),
        "max_distinct": max_distinct,
        "prunings": prunings,
        "pruned_tags": pruned_tags,
        "count_error_bound": error_bound,
        "exact": prunings == 0,
        "skipped": dict(skips.skipped),
    }
    return counts, stats


def build_vocab_streaming(source: Any, *, min_count: int = 1, max_size: int = 28_000,
                          aliases: dict[str, str] | None = None, max_distinct: int = 5_000_000,
                          labels: Callable[[Any], list[str]] = annotation_tags) -> HashtagVocab:
    """The vocabulary ``build_vocab(source_hashtags(source), min_count=..., max_size=...,
    aliases=...)`` builds, from one streaming pass (:func:`count_hashtags`) that holds at most
    ``max_distinct`` distinct tags and decodes no image: for shards (which ``source_hashtags``
    cannot read) and sources too large to hold every tag list.

    Identical to ``build_vocab`` (tags, order, counts, kept synonyms, ``info``) whenever no
    pruning happened. Otherwise ``info`` also holds ``approximate: true``, ``prunings``,
    ``pruned_tags`` and ``count_error_bound`` (see :func:`count_hashtags`).
    """
    return _streamed_vocab(source, min_count, max_size, aliases, max_distinct, labels)[0]


def _streamed_vocab(source: Any, min_count: int, max_size: int, aliases: dict[str, str] | None, max_distinct: int,
                    labels: Callable[[Any], list[str]]) -> tuple[HashtagVocab, Counter, dict[str, Any]]:
    """(vocabulary, counts, :func:`count_hashtags` stats) of one streaming pass; an approximate
    count (pruned) is said so in the vocabulary's info."""
    check_vocab_limits(min_count, max_size)
    counts, stats = count_hashtags(source, max_distinct=max_distinct, aliases=aliases, labels=labels)
    vocab = vocab_from_counts(counts, stats["images"], min_count=min_count, max_size=max_size, aliases=aliases)
    if not stats["exact"]:
        vocab.info.update(approximate=True, prunings=stats["prunings"], pruned_tags=stats["pruned_tags"],
                          count_error_bound=stats["count_error_bound"])
    return vocab, counts, stats


def build_label_vocab(source: Any, labels: WeakLabeler, *, min_count: int = 1, max_size: int = 28_000,
                      aliases: dict[str, str] | None = None,
                      max_distinct: int = 5_000_000) -> tuple[HashtagVocab, dict[str, Any]]:
    """``prepretrain data vocab``: the vocabulary of ``labels`` (a
    :class:`~prepretrain.data.weaklabels.WeakLabeler`) over ``source`` from one streaming pass
    (:func:`count_hashtags`: bounded memory, no image decoded), and its coverage.

    Coverage (also saved in ``vocab.info["coverage"]``): images; the share with at least one label;
    labels per image; the share of label occurrences the vocabulary keeps; what labelling left out
    (empty captions, words in other scripts, machine tags); the vocabulary's 10 most and 10 least
    frequent entries with their image counts. The share of images left with a *vocabulary* label
    needs a second pass: a WSP run reports it (``train_images_without_known_tag``)."""
    labels.counts = LabelCounts()
    vocab, counts, stats = _streamed_vocab(source, min_count, max_size, aliases, max_distinct, labels)
    images = stats["images"]
    occurrences = stats["tag_occurrences"]
    names = labels.display_name
    coverage = {
        "labels_from": labels.labels_from,
        "images": images,
        "images_with_labels": images - stats["images_without_tags"],
        "share_with_labels": (images - stats["images_without_tags"]) / images if images else 0.0,
        "labels_per_image": occurrences / images if images else 0.0,
        "distinct_labels": len(counts),
        "vocab_size": len(vocab),
        "share_of_occurrences_in_vocab": sum(vocab.counts) / occurrences if occurrences else 0.0,
        "unreadable": stats["unreadable"],
        **{key: value for key, value in labels.counts.as_dict().items() if key != "images"},
        "head": [[tag, count, names(tag)] for tag, count in zip(vocab.tags[:10], vocab.counts[:10])],
        "tail": [[tag, count, names(tag)] for tag, count in zip(vocab.tags[-10:], vocab.counts[-10:])],
        "exact": stats["exact"],
    }
    vocab.info.update(labels_from=labels.labels_from, coverage=coverage)
    return vocab, coverage


def coverage_text(coverage: dict[str, Any]) -> str:
    """The coverage of :func:`build_label_vocab` as a few readable lines."""

    def entries(rows: list[list[Any]]) -> str:
        return ", ".join(f"{tag}{'' if name == tag else f' ({name})'} {count}" for tag, count, name in rows)

    lines = [
        f"images: {coverage['images']}, {100 * coverage['share_with_labels']:.1f}% with at least one label, "
        f"{coverage['labels_per_image']:.2f} labels per image, {coverage['distinct_labels']} distinct labels",
        f"vocabulary: {coverage['vocab_size']} labels, {100 * coverage['share_of_occurrences_in_vocab']:.1f}% of the "
        "label occurrences" + ("" if coverage["exact"] else " (counts approximate: the rarest labels were pruned)"),
        f"left out: {coverage['empty_captions']} empty captions, {coverage['non_latin_words']} words in non-Latin "
        f"scripts, {coverage['machine_tags']} machine tags, {coverage['unreadable']} unreadable annotations",
        f"head: {entries(coverage['head'])}",
        f"tail: {entries(coverage['tail'])}",
    ]
    return "\n".join(lines)


# -- describing a source ------------------------------------------------------------------


def _summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": 0.0, "min": 0.0, "median": 0.0, "max": 0.0}
    array = np.asarray(values, dtype=np.float64)
    return {
        "mean": round(float(array.mean()), 3),
        "min": float(array.min()),
        "median": float(np.median(array)),
        "max": float(array.max()),
    }


SIZE_BINS = (64, 128, 256, 512, 1024)


def _size_bin(shorter_side: int) -> str:
    lower = 0
    for upper in SIZE_BINS:
        if shorter_side < upper:
            return f"<{upper}" if lower == 0 else f"{lower}-{upper - 1}"
        lower = upper
    return f">={SIZE_BINS[-1]}"


def _sample_indices(length: int, limit: int, seed: int) -> list[int]:
    if length <= limit:
        return list(range(length))
    return sorted(random.Random(seed).sample(range(length), limit))


def describe_source(source: Any, *, max_images: int = 64, max_annotations: int = 200_000, seed: int = 0) -> dict:
    """Statistics for ``prepretrain data stats``: what is in a dataset before training on it.

    Annotation statistics (labels, hashtags, captions) cover every sample when the source
    can read annotations without decoding pixels (manifests, folders, shards) and there are
    at most ``max_annotations`` of them; otherwise a seeded random subset. Image sizes and
    bad-sample counts come from decoding ``max_images`` samples (sizes are as decoded, so a
    source built with ``min_size_hint`` reports reduced JPEG sizes). All keys are strings
    and all values JSON-serialisable.
    """
    counter = SkipCounter()
    annotations: list[Annotation] = []
    sizes: list[tuple[int, int]] = []
    try:
        count: int | None = len(source)
    except (TypeError, ValueError):  # remote shards without an index have no known length
        count = None

    if isinstance(source, ShardSource):
        with _scratch_skips(source):
            for outcome in iter_annotations(source):
                if isinstance(outcome, BadSample):
                    continue
                annotations.append(outcome)
                if len(annotations) >= max_annotations:
                    break
        with _scratch_skips(source) as skips:
            for record in source.iter_records():
                sizes.append(record.image.size)
                if len(sizes) >= max_images:
                    break
            counter.merge(skips)
        annotation_scope = "all" if count is not None and len(annotations) == count else "first"
    else:
        if count is None:
            raise TypeError(f"cannot describe {type(source).__name__}: it has no length")
        image_indices = _sample_indices(count, max_images, seed)
        records: list[Record] = []
        for index in image_indices:
            try:
                record = source.get(index)
            except BadSample as error:
                counter.skip(error)
                continue
            counter.ok()
            records.append(record)
            sizes.append(record.image.size)
        if hasattr(source, "annotation"):
            annotation_indices = _sample_indices(count, max_annotations, seed)
            annotations = [outcome for outcome in iter_annotations(source, annotation_indices)
                           if not isinstance(outcome, BadSample)]
            annotation_scope = "all" if len(annotation_indices) == count else "random_subset"
        else:
            annotations = [Annotation(r.key, r.hashtags, r.caption, r.labels) for r in records]
            annotation_scope = "decoded_sample"

    label_counts: dict[str, Counter] = {}
    hashtag_counter: Counter = Counter()
    per_image_tags: list[float] = []
    caption_chars: list[float] = []
    caption_words: list[float] = []
    for annotation in annotations:
        for task, value in annotation.labels.items():
            label_counts.setdefault(task, Counter())[value] += 1
        per_image_tags.append(len(annotation.hashtags))
        hashtag_counter.update(annotation.hashtags)
        caption_chars.append(len(annotation.caption))
        caption_words.append(len(annotation.caption.split()))

    class_names = getattr(source, "class_names", {}) or {}
    labels: dict[str, Any] = {}
    for task, counts in sorted(label_counts.items()):
        names = class_names.get(task, [])
        labels[task] = {
            "num_classes": max(len(names), max(counts) + 1),
            "labeled": sum(counts.values()),
            "counts": {
                (names[index] if index < len(names) else str(index)): number for index, number in sorted(counts.items())
            },
        }

    widths = [width for width, _ in sizes]
    heights = [height for _, height in sizes]
    histogram: dict[str, int] = {}
    for width, height in sizes:
        name = _size_bin(min(width, height))
        histogram[name] = histogram.get(name, 0) + 1
    return {
        "type": type(source).__name__,
        "layout": source_format(source),
        "count": count,
        "annotations": {"scope": annotation_scope, "read": len(annotations)},
        "class_names": {task: len(names) for task, names in class_names.items()},
        "labels": labels,
        "hashtags": {
            "per_image": _summary(per_image_tags),
            "images_without": sum(1 for number in per_image_tags if number == 0),
            "unique": len(hashtag_counter),
            "top": [[tag, number] for tag, number in hashtag_counter.most_common(10)],
        },
        "caption": {
            "chars": _summary(caption_chars),
            "words": _summary(caption_words),
            "empty": sum(1 for number in caption_chars if number == 0),
        },
        "image_size": {
            "decoded": len(sizes),
            "width": _summary(widths),
            "height": _summary(heights),
            "aspect_ratio": _summary([round(w / h, 3) for w, h in sizes if h]),
            "shorter_side_histogram": {name: histogram[name] for name in _ordered_bins() if name in histogram},
        },
        "skipped": counter.as_dict(),
    }


def _ordered_bins() -> list[str]:
    names = []
    lower = 0
    for upper in SIZE_BINS:
        names.append(f"<{upper}" if lower == 0 else f"{lower}-{upper - 1}")
        lower = upper
    names.append(f">={SIZE_BINS[-1]}")
    return names


# -- writing WebDataset shards ---------------------------------------------------------------

_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _original_bytes(source: Any, index: int, key: str) -> tuple[str, bytes] | None:
    """The file's own bytes when they are JPEG or PNG: no re-encode, no quality loss."""
    path_of = getattr(source, "path_of", None)
    if path_of is None:
        return None
    try:
        data = Path(path_of(index)).read_bytes()
    except OSError as error:
        raise BadSample(key, "unreadable", str(error)) from error
    if data.startswith(_JPEG_MAGIC):
        return "jpg", data
    if data.startswith(_PNG_MAGIC):
        return "png", data
    return None  # GIF/BMP/TIFF/WebP: re-encoded below so every shard member is jpg or png


def _encode(image: Image.Image, image_format: str) -> tuple[str, bytes]:
    buffer = io.BytesIO()
    if image_format == "jpg":
        image.save(buffer, format="JPEG", quality=95)
    else:
        image.save(buffer, format="PNG", compress_level=3)
    return image_format, buffer.getvalue()


def _label_space(source: Any) -> dict[str, int]:
    """Classes per task, from ``num_classes_by_task`` or ``num_classes(task)`` per named task."""
    known = dict(getattr(source, "num_classes_by_task", None) or {})
    method = getattr(source, "num_classes", None)
    for task in getattr(source, "class_names", None) or {}:
        if task not in known and callable(method):
            known[task] = int(method(task))
    return known


def _tar_samples(source: Any, order: list[int], image_format: str, counter: SkipCounter) -> Iterator[dict[str, Any]]:
    """The tar samples (WebDataset member dicts) of the good records of ``source`` in ``order``.

    Each record is decoded here; a ``BadSample`` is counted in ``counter`` and left out.
    """
    for index in order:
        try:
            record = source.get(index)
            member = _original_bytes(source, index, record.key) or _encode(record.image, image_format)
        except BadSample as error:
            counter.skip(error)
            continue
        counter.ok()
        meta = {
            "key": record.key,
            "index": index,
            "hashtags": list(record.hashtags),
            "caption": record.caption,
            "labels": dict(record.labels),
        }
        extension, data = member
        yield {
            "__key__": f"{index:09d}",
            extension: data,
            "json": json.dumps(meta, ensure_ascii=False).encode("utf-8"),
        }


def _write_tar(path: Path, samples: Iterable[dict[str, Any]]) -> int:
    """Write ``samples`` as one tar at ``path``, atomically; returns how many were written.

    The tar is written under a temporary name and renamed when complete; an exception
    mid-shard removes the partial file.
    """
    count = 0
    with atomic_path(path) as temporary, open(temporary, "wb") as handle:
        writer = TarWriter(handle, encoder=False, mtime=0)  # fixed mtime: reproducible tars
        for sample in samples:
            writer.write(sample)
            count += 1
        writer.close()
    return count


def write_shards(
    source: Any,
    out_dir: str | os.PathLike,
    *,
    samples_per_shard: int = 1000,
    prefix: str = "shard",
    image_format: str = "png",
    overwrite: bool = False,
    skips: SkipCounter | None = None,
    verbose: bool = True,
    shuffle_seed: int | None = None,
) -> list[Path]:
    """Convert a map-style source into WebDataset shards plus ``index.json``; returns the shards.

    Every record is decoded once (so bad samples are found and skipped here, counted in
    ``skips`` and in ``index.json``, rather than at training time). Files that are already
    JPEG or PNG are copied byte for byte; anything else (GIF, BMP, TIFF, WebP, or a source
    with no files such as the synthetic set) is encoded as ``image_format`` (``"png"``,
    lossless, or ``"jpg"``, quality 95). Each shard is written to a temporary name and
    renamed when complete, and ``index.json`` is written last, so an interrupted
    conversion never leaves a short shard that looks finished. Existing shards with the
    same prefix are an error unless ``overwrite=True`` (which deletes them), because stale
    extra shards from an earlier, larger run would otherwise be read as part of the set.

    ``shuffle_seed``: write the samples in a permutation seeded by it instead of source order.
    Readers shuffle shards and (in the training loader) blocks of samples, never the whole
    set, so shards cut from a class-sorted source (an image folder) would otherwise feed
    batches drawn from a handful of classes. ``None`` keeps the source order.
    """
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    image_format = {"jpeg": "jpg"}.get(image_format.lower(), image_format.lower())
    if image_format not in ("png", "jpg"):
        raise ValueError(f"image_format must be 'png' or 'jpg', got {image_format!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    existing = sorted(out.glob(f"{prefix}-*.tar"))
    if existing:
        if not overwrite:
            raise FileExistsError(f"{out} already has {len(existing)} '{prefix}-*.tar' shards (pass overwrite=True)")
        for path in existing:
            path.unlink()
        (out / INDEX_NAME).unlink(missing_ok=True)

    counter = skips if skips is not None else SkipCounter()
    order = list(range(len(source)))
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(order)
    samples = _tar_samples(source, order, image_format, counter)
    shards: list[Path] = []
    counts: list[int] = []
    for first in samples:  # each shard: the next good sample and up to samples_per_shard - 1 more
        final = out / f"{prefix}-{len(shards):06d}.tar"
        counts.append(_write_tar(final, itertools.chain([first], itertools.islice(samples, samples_per_shard - 1))))
        shards.append(final)

    index_content = {
        "format": INDEX_FORMAT,
        "prefix": prefix,
        "total": sum(counts),
        "shards": [{"name": path.name, "count": count} for path, count in zip(shards, counts)],
        "skipped": dict(counter.skipped),
        "class_names": dict(getattr(source, "class_names", {}) or {}),
        "num_classes": _label_space(source),
    }
    index_text = json.dumps(index_content, indent=1, ensure_ascii=False)
    write_text(out / INDEX_NAME, index_text)
    if verbose:
        skipped = ", ".join(f"{reason}={number}" for reason, number in sorted(counter.skipped.items())) or "none"
        print(f"wrote {sum(counts)} samples to {len(shards)} shards in {out} (skipped: {skipped})")
    return shards


# -- writing the synthetic dataset ------------------------------------------------------------


def write_synthetic(
    out_dir: str | Path,
    num_images: int = 4000,
    image_size: int = 32,
    seed: int = 0,
    splits: tuple[str, ...] | list[str] = ("train", "val", "test"),
    sizes: dict[str, int] | None = None,
    image_format: str = "png",
) -> Path:
    """Export the synthetic dataset to files: ``<split>/images/00000000.<ext>`` plus one JSONL
    manifest per split (``<split>.jsonl``: path relative to ``out_dir``, hashtags, caption,
    labels) and ``classes.json`` (class names, synonyms, hashtag vocabulary).

    Why: the folder/manifest/shard readers and the ``data`` command need real files whose
    correct annotations are known. ``sizes`` overrides
    :func:`~prepretrain.data.synthetic.synthetic_split_sizes`.
    """
    fmt = image_format.lower().lstrip(".")
    if fmt == "jpeg":
        fmt = "jpg"
    if fmt not in ("png", "jpg"):
        raise ValueError(f"image_format must be 'png' or 'jpg', got {image_format!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    default_sizes = synthetic_split_sizes(num_images)
    sizes = dict(sizes or {})
    for split in splits:
        count = sizes.get(split, default_sizes.get(split, num_images))
        source = SyntheticSource(count, image_size=image_size, seed=seed, split=split)
        image_dir = out / split / "images"
        image_dir.mkdir(parents=True, exist_ok=True)
        manifest = out / f"{split}.jsonl"
        # Written under a temporary name: a manifest exists only once all its images do.
        with atomic_path(manifest) as temporary, open(temporary, "w", encoding="utf-8") as lines:
            for index in range(count):
                record = source.get(index)
                relative = f"{split}/images/{index:08d}.{fmt}"
                if fmt == "png":
                    record.image.save(out / relative, format="PNG", compress_level=1)
                else:
                    record.image.save(out / relative, format="JPEG", quality=95)
                entry = {
                    "path": relative,
                    "hashtags": record.hashtags,
                    "caption": record.caption,
                    "labels": record.labels,
                }
                lines.write(json.dumps(entry) + "\n")
    classes = {
        "class_names": CLASS_NAMES,
        "synonyms": SYNONYMS,
        "hashtag_vocab": HASHTAG_VOCAB,
        "image_size": image_size,
        "seed": seed,
    }
    write_text(out / "classes.json", json.dumps(classes, indent=1))  # ASCII: json.dumps escapes the rest
    return out


__all__ = [
    "build_label_vocab",
    "build_vocab_streaming",
    "coverage_text",
    "count_hashtags",
    "describe_source",
    "iter_annotations",
    "iter_hashtags",
    "write_shards",
    "write_synthetic",
]


def tag_aliases(source: Any, choice: str = "auto", labels: WeakLabeler | None = None) -> dict[str, str]:
    """The hashtag -> class map (the paper's hashtag-to-synset step): ``none``; a synonym file;
    or, with ``auto``, the table the source ships (``source.hashtag_synonyms`` groups; for the
    synthetic set, its attribute tag groups such as ``circle/round/disc``). That table is a hashtag
    table: with ``labels`` that do not include hashtags (captions, Flickr tags, synsets), ``auto``
    gives none."""
    if choice == "none" or (choice == "auto" and labels is not None and "hashtags" not in labels.kinds):
        return {}
    if choice != "auto":
        return load_synonyms(choice)
    groups = getattr(source, "hashtag_synonyms", None)
    if groups is None and isinstance(source, SyntheticSource):
        groups = [group for attribute in ATTRIBUTE_TAGS.values() for group in attribute]
    return synonym_map(groups) if groups else {}


# -- a rehearsal of the paper-scale data layout ---------------------------------------------


def write_rehearsal_data(out_dir: str | Path, num_images: int = 3000, image_size: int = 32, seed: int = 0,
                         samples_per_shard: int = 500) -> dict[str, str]:
    """The data layout of a paper-scale run, small: pretraining images with hashtags and captions
    as WebDataset shards (``pretrain/{train,val}/shard-NNNNNN.tar`` + ``index.json``, JPEG), and a labelled
    evaluation set as an image folder (``eval/{train,val,test}/<class name>/<n>.png``, the
    synthetic coarse classes, drawn with another seed than the pretraining images).

    Returns ``{"data": <shards folder>, "eval_data": <folder>}``: what a pipeline config
    points at. Why: a paper pipeline config can then run end to end on CPU with only model size
    and budgets overridden (``prepretrain data rehearsal``), before a cluster sees it.
    """
    out = Path(out_dir)
    for split, count in synthetic_split_sizes(num_images).items():
        if split != "test":  # train: what the stages learn from; val: WSP's held-out tag precision
            source = SyntheticSource(count, image_size=image_size, seed=seed, split=split)
            write_shards(source, out / "pretrain" / split, samples_per_shard=samples_per_shard, image_format="jpg",
                         overwrite=True, shuffle_seed=seed, verbose=False)
    eval_sizes = synthetic_split_sizes(max(200, num_images // 2))
    for split, count in eval_sizes.items():
        source = SyntheticSource(count, image_size=image_size, seed=seed + 1, split=split)
        names = source.class_names["coarse"]
        for index in range(count):
            record = source.get(index)
            folder = out / "eval" / split / names[int(record.labels["coarse"])]
            folder.mkdir(parents=True, exist_ok=True)
            with atomic_path(folder / f"{index:06d}.png") as tmp:
                record.image.save(tmp, format="PNG")
    return {"data": str(out / "pretrain"), "eval_data": str(out / "eval")}


def check_source(source: Any, max_errors: int = 20) -> dict[str, Any]:
    """Validate every sample's annotation without decoding pixels (``prepretrain data check``):
    a manifest checks each row and names bad ones by ``file:line``; other sources read their
    annotations (shards: the metadata members) and count what cannot be used."""
    if hasattr(source, "check"):
        return source.check(max_errors=max_errors)
    rows = errors = 0
    examples: list[str] = []
    for outcome in iter_annotations(source):
        rows += 1
        if isinstance(outcome, BadSample):
            errors += 1
            if len(examples) < max_errors:
                examples.append(str(outcome))
    return {"source": repr(source), "rows": rows, "bad_rows": errors, "examples": examples}


"""Tools over the readers: describe a source, write shards, write the synthetic dataset to disk.

Readers (:mod:`~prepretrain.data.sources`, :mod:`~prepretrain.data.shards`,
:mod:`~prepretrain.data.synthetic`) only read; everything that *produces* something from a
source lives here: the statistics of ``prepretrain data stats`` (:func:`describe_source`),
the conversion of a map-style source to WebDataset shards (:func:`write_shards`) and the
export of the synthetic dataset to image files plus manifests (:func:`write_synthetic`).
Tools import readers; readers never import tools. Every file is written atomically
(:mod:`prepretrain.files`), so an interrupted tool never leaves a file that looks finished.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import random
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from webdataset import TarWriter

from prepretrain.data.records import Annotation, BadSample, Record, SkipCounter
from prepretrain.data.shards import INDEX_FORMAT, INDEX_NAME, ShardSource
from prepretrain.data.synthetic import (
    CLASS_NAMES,
    HASHTAG_VOCAB,
    SYNONYMS,
    SyntheticSource,
    synthetic_split_sizes,
)
from prepretrain.files import atomic_path, write_text

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
    except TypeError:
        count = None

    if isinstance(source, ShardSource):
        # Use scratch counters so statistics neither pollute nor reset the source's own.
        previous = source.skips
        try:
            source.skips = SkipCounter()
            for annotation in source.iter_annotations():
                annotations.append(annotation)
                if len(annotations) >= max_annotations:
                    break
            source.skips = SkipCounter()
            for record in source.iter_records():
                sizes.append(record.image.size)
                if len(sizes) >= max_images:
                    break
            counter.merge(source.skips)
        finally:
            source.skips = previous
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
            annotations = [source.annotation(index) for index in annotation_indices]
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
    "describe_source",
    "write_shards",
    "write_synthetic",
]

"""What a source holds, read without training on it: ``prepretrain data stats`` and ``data check``.

:func:`describe_source` samples images for sizes and reads annotations for labels, hashtags and
captions; :func:`check_source` validates every annotation without decoding pixels. Both read
annotations through :func:`~prepretrain.data.records.iter_annotations`.
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import numpy as np

from prepretrain.data.readers.open import source_format
from prepretrain.data.records import Annotation, BadSample, Record, SkipCounter, iter_annotations, scratch_skips
from prepretrain.data.shards.reader import ShardSource

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
        with scratch_skips(source):
            for outcome in iter_annotations(source):
                if isinstance(outcome, BadSample):
                    continue
                annotations.append(outcome)
                if len(annotations) >= max_annotations:
                    break
        with scratch_skips(source) as skips:
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

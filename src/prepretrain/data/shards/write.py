"""Writing WebDataset tar shards from any map-style source (``prepretrain data shards``).

The reader (:mod:`~prepretrain.data.shards.reader`) only reads; this is its writer. Original
encoded bytes are copied where the source has them, so a JPEG is never re-encoded; the shard
index (``index.json``: samples per shard) is written last, atomically, so an interrupted
conversion never looks finished.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import random
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from PIL import Image
from webdataset import TarWriter

from prepretrain.data.records import BadSample, SkipCounter
from prepretrain.data.shards.index import INDEX_FORMAT, INDEX_NAME
from prepretrain.files import atomic_path, write_text

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

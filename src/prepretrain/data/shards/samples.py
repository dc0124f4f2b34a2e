"""WebDataset samples from tar shards: naming and opening shards, reading their members, decoding samples.

The part of :class:`~prepretrain.data.shards.reader.ShardSource` that turns one shard into samples
(:class:`ShardSamples`): ``group_by_keys`` over the tar members (only the members a caller needs,
payloads seeked over otherwise), the checks that a shard was read to its end (a cut-off tar is a
counted :class:`ShardProblem`, its lost samples placeholders that keep positions exact), and a
sample's ``json``/``txt``/``cls`` members into an ``Annotation`` and its image member into a ``Record``.
"""

from __future__ import annotations

import json
import os
import re
import tarfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import braceexpand
from webdataset import gopen
from webdataset.tariterators import base_plus_ext, group_by_keys, tar_file_expander

from prepretrain.data.images.decode import load_pixels
from prepretrain.data.records import Annotation, BadSample, Record, split_hashtags

SHARD_SUFFIXES = (".tar", ".tgz", ".tar.gz")
IMAGE_MEMBERS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
ANNOTATION_MEMBERS = ("json", "txt", "cls")  # the members ShardSource reads annotations from
_LOST = "__lost__"  # marks the placeholder of a sample lost in a cut-off shard
LABELLED = "__labelled__"  # a sample's (annotation, label indices), set when its resampling copies were counted
_META_MEMBER = re.compile(r"__[^/]*__($|/)")  # webdataset skips such members (tar_file_iterator)
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00")  # gzip, bzip2, xz


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


class ShardProblem(BadSample):
    """A shard that is missing or could not be read to its end; ``key`` is its URL.

    Not a sample: it takes no sample position. Its lost samples, when ``index.json`` says how
    many there were, follow as ``BadSample(reason="lost_in_shard")`` one by one.
    """


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


class ShardSamples:
    """Reading and decoding the samples of one shard; a part of ``ShardSource``, which holds the
    state it uses (``urls``, ``counts``, ``skips``, the annotation fields, ``metadata``, the pixel
    settings) and gives ``_count_origin`` (its index part)."""

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
        labelled = sample.get(LABELLED)  # (annotation, label indices) when the copies were counted
        annotation = self._annotation(sample) if labelled is None else labelled[0]
        member = next((name for name in IMAGE_MEMBERS if name in sample), None)
        if member is None:
            raise BadSample(annotation.key, "missing_image", f"members: {sorted(k for k in sample if k[0] != '_')}")
        image = load_pixels(
            sample[member], annotation.key, pixels=self.pixels, min_size_hint=self.min_size_hint,
            max_pixels=self.max_pixels,
        )
        record = annotation.record(image)
        if labelled is not None:
            record.label_ids = labelled[1]
        return record

"""Metadata tables joined to images by key: YFCC100M's TSV, caption TSVs, parquet, JSONL/CSV.

Open image-text datasets often keep their text apart from their pixels: YFCC100M's titles,
descriptions and user tags are in one 25-column TSV (``yfcc100m_dataset``, plain or bz2) and the
images are downloaded separately; CC3M/CC12M are caption TSVs whose images img2dataset fetches
into shards; DataComp's captions sit in parquet files keyed by ``uid``. ``metadata=PATH`` (and
``prepretrain data vocab --metadata``) joins such a table to any source (folder, manifest, shards):
each image's key (or the field ``metadata_key`` names, e.g. ``uid`` or ``url`` in an img2dataset
``.json``) is looked up, and the table's tags and caption replace the image's own (an image the
table has no row for keeps its own, and is counted in ``missing``).

Formats (detected from the file):

* **YFCC100M** (``.tsv``/``.txt``/no suffix, optionally ``.bz2``; 25 tab-separated columns,
  or the 23 of the first release, which lacks the line number and the hash): key = the photo id;
  tags = the user tags as stored (comma-separated, URL-encoded, ``+`` for a space:
  ``labels_from=tags`` decodes them); caption = title and description, URL-decoded, with HTML
  tags and links removed. Videos (marker ``1``) are left out (counted).
* **Caption TSV** (CC3M ``caption<TAB>url``, CC12M ``url<TAB>caption``, no header, or a header
  naming ``url`` and ``caption``): key = the URL (img2dataset's ``.json`` keeps it: use
  ``metadata_key=url``), caption = the other column.
* **Parquet** (pyarrow, the ``parquet`` extra): DataComp metadata or img2dataset's per-shard
  parquet. **JSONL / CSV** with named fields. Key column: the first of ``key``, ``uid``,
  ``photoid``, ``photo_id``, ``id``, ``url`` present; caption: ``caption``, ``text``, ``TEXT``,
  ``title``; tags: ``tags``, ``hashtags``, ``usertags``, ``user_tags`` (a list, or a string
  split on commas, whitespace or ``|``).

The table is read once into an index in the cache folder (``$PREPRETRAIN_CACHE``, named by the
file's path, size, modification time and ends, as manifests' row indexes are): sorted 64-bit key
hashes, row numbers and the rows' text, all memory-mapped, so a lookup costs a binary search and
one read, opening costs nothing, and DataLoader workers share the pages.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import hashlib
import io
import itertools
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote_plus

import numpy as np

from prepretrain.data.labels.weaklabels import split_flickr_tags
from prepretrain.data.readers.rowindex import cache_root, file_identity
from prepretrain.data.records import Annotation, split_hashtags

TABLE_VERSION = "metadata-v1"
KEY_COLUMNS = ("key", "uid", "photoid", "photo_id", "id", "url")
CAPTION_COLUMNS = ("caption", "text", "TEXT", "title")
TAG_COLUMNS = ("tags", "hashtags", "usertags", "user_tags")
_FIELD_SEP, _TAG_SEP = "\x1f", "\x1e"
_HTML_TAG = re.compile(r"<[^>]*>")
_LINK = re.compile(r"(?:https?://|www\.)\S+")
_PROBE = 1000  # lookups after which a table none of them matched is an error


class MetadataError(ValueError):
    """A metadata table that cannot be read or joined; the message names the file."""


def yfcc_text(field: str) -> str:
    """A YFCC100M title or description as text: URL-decoded, HTML tags and links removed."""
    text = _LINK.sub(" ", _HTML_TAG.sub(" ", unquote_plus(field)))
    return " ".join(text.split())


def key_hash(key: str) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


def _open_text(path: Path) -> io.TextIOBase:
    name = path.name.lower()
    if name.endswith(".bz2"):
        return bz2.open(path, "rt", encoding="utf-8", errors="replace", newline="")
    if name.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", errors="replace", newline="")
    return open(path, encoding="utf-8", errors="replace", newline="")


def _base_suffix(path: Path) -> str:
    name = path.name.lower()
    for compressed in (".bz2", ".gz"):
        if name.endswith(compressed):
            name = name[: -len(compressed)]
    return Path(name).suffix


def detect_format(path: Path) -> str:
    """``yfcc``, ``caption-tsv``, ``parquet``, ``jsonl`` or ``csv``, from the name and first line."""
    suffix = _base_suffix(path)
    if suffix == ".parquet":
        return "parquet"
    if suffix in (".jsonl", ".ndjson", ".json"):
        return "jsonl"
    if suffix == ".csv":
        return "csv"
    with _open_text(path) as handle:
        first = next((line for line in handle if line.strip()), "")
    columns = first.rstrip("\r\n").split("\t")
    if len(columns) in (23, 25):
        return "yfcc"
    if len(columns) == 2:
        return "caption-tsv"
    raise MetadataError(f"{path}: cannot tell the metadata format: the first line has {len(columns)} tab-separated "
                        "columns (YFCC100M has 25, or 23; a caption TSV 2); parquet, .jsonl and .csv are read by name")


def _yfcc_rows(path: Path, counts: dict[str, int]) -> Iterator[tuple[str, list[str], str]]:
    with _open_text(path) as handle:
        for line in handle:
            columns = line.rstrip("\r\n").split("\t")
            if len(columns) == 25:
                photo, title, description, tags, marker = columns[1], columns[8], columns[9], columns[10], columns[24]
            elif len(columns) == 23:
                photo, title, description, tags, marker = columns[0], columns[6], columns[7], columns[8], columns[22]
            else:
                counts["bad_rows"] += bool(line.strip())
                continue
            if marker.strip() == "1":
                counts["videos"] += 1
                continue
            caption = ". ".join(part for part in (yfcc_text(title), yfcc_text(description)) if part)
            yield photo.strip(), split_flickr_tags(tags), caption


def _caption_tsv_rows(path: Path, counts: dict[str, int]) -> Iterator[tuple[str, list[str], str]]:
    with _open_text(path) as handle:
        for number, line in enumerate(handle):
            columns = line.rstrip("\r\n").split("\t")
            if len(columns) != 2:
                counts["bad_rows"] += bool(line.strip())
                continue
            lowered = [column.strip().lower() for column in columns]
            if number == 0 and "url" in lowered:
                continue  # a header
            url_column = 0 if columns[0].lstrip().startswith(("http://", "https://")) else 1
            yield columns[url_column].strip(), [], columns[1 - url_column].strip()


def _pick(names: list[str], options: tuple[str, ...]) -> str | None:
    return next((name for name in options if name in names), None)


def _record_rows(records: Iterator[dict[str, Any]], names: list[str], path: Path,
                 counts: dict[str, int]) -> Iterator[tuple[str, list[str], str]]:
    key_column = _pick(names, KEY_COLUMNS)
    if key_column is None:
        raise MetadataError(f"{path}: no key column; expected one of {', '.join(KEY_COLUMNS)} among {names[:20]}")
    caption_column, tag_column = _pick(names, CAPTION_COLUMNS), _pick(names, TAG_COLUMNS)
    if caption_column is None and tag_column is None:
        raise MetadataError(f"{path}: no caption ({', '.join(CAPTION_COLUMNS)}) or tag ({', '.join(TAG_COLUMNS)}) "
                            f"column among {names[:20]}")
    for record in records:
        key = record.get(key_column)
        if key is None or str(key) == "":
            counts["bad_rows"] += 1
            continue
        tags = record.get(tag_column) if tag_column else None
        if isinstance(tags, str):
            tags = split_hashtags(tags)
        caption = record.get(caption_column) if caption_column else None
        yield str(key), [str(tag) for tag in (tags or [])], str(caption or "")


def _parquet_rows(path: Path, counts: dict[str, int]) -> Iterator[tuple[str, list[str], str]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise MetadataError(f"{path}: reading parquet needs pyarrow: pip install 'prepretrain[parquet]'") from None
    table = pq.ParquetFile(path)
    names = list(table.schema_arrow.names)
    wanted = [name for name in (_pick(names, KEY_COLUMNS), _pick(names, CAPTION_COLUMNS), _pick(names, TAG_COLUMNS))
              if name]

    def records() -> Iterator[dict[str, Any]]:
        for batch in table.iter_batches(columns=wanted, batch_size=65536):
            yield from batch.to_pylist()

    yield from _record_rows(records(), names, path, counts)


def _jsonl_rows(path: Path, counts: dict[str, int]) -> Iterator[tuple[str, list[str], str]]:
    with _open_text(path) as handle:

        def parsed() -> Iterator[dict[str, Any]]:
            for line in handle:
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    row = None
                if isinstance(row, dict):
                    yield row
                else:
                    counts["bad_rows"] += 1

        rows = parsed()
        first = next(rows, None)
        if first is not None:  # its fields name the columns
            yield from _record_rows(itertools.chain([first], rows), list(first), path, counts)


def _csv_rows(path: Path, counts: dict[str, int]) -> Iterator[tuple[str, list[str], str]]:
    with _open_text(path) as handle:
        reader = csv.DictReader(handle)
        yield from _record_rows(iter(reader), list(reader.fieldnames or []), path, counts)


READERS = {"yfcc": _yfcc_rows, "caption-tsv": _caption_tsv_rows, "parquet": _parquet_rows, "jsonl": _jsonl_rows,
           "csv": _csv_rows}


def build_table_index(path: Path, fmt: str, out: Path) -> dict[str, Any]:
    """Read the table once into ``out`` (hashes.npy sorted, rows.npy, offsets.npy, values.bin,
    info.json); returns the info (rows, format, what was left out)."""
    counts = {"bad_rows": 0, "videos": 0}
    hashes: list[int] = []
    offsets = [0]
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "values.bin", "wb") as blob:
        for key, tags, caption in READERS[fmt](path, counts):
            text = _FIELD_SEP.join((key, _TAG_SEP.join(tags), caption)).encode("utf-8", "surrogatepass")
            blob.write(text)
            offsets.append(offsets[-1] + len(text))
            hashes.append(key_hash(key))
    hash_array = np.asarray(hashes, dtype=np.uint64)
    order = np.argsort(hash_array, kind="stable")
    np.save(out / "hashes.npy", hash_array[order])
    np.save(out / "rows.npy", order.astype(np.int64))
    np.save(out / "offsets.npy", np.asarray(offsets, dtype=np.int64))
    info = {"format": fmt, "rows": len(hashes), "source": str(path), **counts, "version": TABLE_VERSION}
    (out / "info.json").write_text(json.dumps(info))
    return info


class MetadataTable:
    """A metadata file as ``key -> (tags, caption)`` (see the module docstring).

    ``key_field``: the image-side field to match (a shard ``.json`` field or a manifest column;
    empty: the image's key, then its file name without folders and suffix). Picklable: workers
    reopen the memory-mapped index."""

    def __init__(self, path: str | Path, key_field: str = ""):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"metadata table not found: {self.path}")
        self.key_field = key_field
        self.format = detect_format(self.path)
        self.index_dir = cache_root() / "metadata" / file_identity(self.path, TABLE_VERSION + self.format)
        if not (self.index_dir / "info.json").is_file():
            scratch = self.index_dir.with_name(f".{self.index_dir.name}.tmp{os.getpid()}")
            try:
                build_table_index(self.path, self.format, scratch)
                try:
                    os.replace(scratch, self.index_dir)
                except OSError:  # another process finished the same index first: keep that one
                    if not (self.index_dir / "info.json").is_file():
                        raise
            finally:
                shutil.rmtree(scratch, ignore_errors=True)
        self.info = json.loads((self.index_dir / "info.json").read_text())
        self.found = self.missing = 0
        self.example_miss = ""
        self._arrays: tuple[np.ndarray, ...] | None = None

    def __len__(self) -> int:
        return int(self.info["rows"])

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_arrays": None}

    def _open(self) -> tuple[np.ndarray, ...]:
        if self._arrays is None:
            folder = self.index_dir
            self._arrays = (np.load(folder / "hashes.npy", mmap_mode="r"), np.load(folder / "rows.npy", mmap_mode="r"),
                            np.load(folder / "offsets.npy", mmap_mode="r"),
                            np.memmap(folder / "values.bin", dtype=np.uint8, mode="r") if len(self) else np.zeros(0))
        return self._arrays

    def lookup(self, key: str) -> tuple[list[str], str] | None:
        """(tags, caption) of ``key``, or ``None`` when the table has no row for it."""
        if not key or not len(self):
            return None
        hashes, rows, offsets, blob = self._open()
        wanted = np.uint64(key_hash(key))
        position = int(np.searchsorted(hashes, wanted))
        while position < len(hashes) and hashes[position] == wanted:
            row = int(rows[position])
            text = bytes(blob[offsets[row] : offsets[row + 1]]).decode("utf-8", "surrogatepass")
            stored, tags, caption = text.split(_FIELD_SEP, 2)
            if stored == key:
                return [tag for tag in tags.split(_TAG_SEP) if tag], caption
            position += 1
        return None

    def join(self, annotation: Annotation, fields: dict[str, Any] | None = None) -> Annotation:
        """``annotation`` with the table's tags and caption where the table has them."""
        if self.key_field:
            value = (fields or {}).get(self.key_field)
            candidates = [str(value)] if value not in (None, "") else []
        else:
            stem = Path(annotation.key).stem if annotation.key else ""
            candidates = [annotation.key] + ([stem] if stem and stem != annotation.key else [])
        for candidate in candidates:
            found = self.lookup(candidate)
            if found is not None:
                self.found += 1
                tags, caption = found
                return Annotation(annotation.key, tags or annotation.hashtags, caption or annotation.caption,
                                  annotation.labels)
        self.missing += 1
        self.example_miss = self.example_miss or (candidates[0] if candidates else f"(no {self.key_field!r} field)")
        if self.found == 0 and self.missing == _PROBE:
            field = f"field {self.key_field!r}" if self.key_field else "key (or file name stem)"
            raise MetadataError(
                f"metadata={self.path}: none of the first {_PROBE} images was found in it by their {field} "
                f"(e.g. {self.example_miss!r}); set metadata_key= to the image field that holds the table's keys")
        return annotation


class JoinedSource:
    """A map source (folder, manifest) whose annotations are joined to a :class:`MetadataTable`;
    everything else is the source's own."""

    def __init__(self, source: Any, table: MetadataTable):
        self.source = source
        self.metadata = table

    def __len__(self) -> int:
        return len(self.source)

    def __getattr__(self, name: str) -> Any:
        if name in ("source", "metadata"):
            raise AttributeError(name)
        return getattr(self.source, name)

    def _fields(self, index: int) -> dict[str, Any]:
        row = getattr(self.source, "row", None)
        return row(index) if (row is not None and self.metadata.key_field) else {}

    def annotation(self, index: int) -> Annotation:
        read = getattr(self.source, "annotation", None)
        if read is None:
            record = self.source.get(index)
            base = Annotation(record.key, record.hashtags, record.caption, record.labels)
        else:
            base = read(index)
        return self.metadata.join(base, self._fields(index))

    def get(self, index: int) -> Any:
        record = self.source.get(index)
        joined = self.metadata.join(Annotation(record.key, record.hashtags, record.caption, record.labels),
                                    self._fields(index))
        return joined.record(record.image)

    __getitem__ = get


def join_metadata(source: Any, path: str, key_field: str = "") -> Any:
    """``source`` with the annotations of the table at ``path`` joined (shards: set on the source,
    whose reader joins each sample's ``.json`` fields; map sources: wrapped in :class:`JoinedSource`)."""
    table = MetadataTable(path, key_field)
    if hasattr(source, "iter_annotation_outcomes") and not hasattr(source, "get"):
        source.metadata = table
        return source
    if key_field:
        raise MetadataError(f"metadata_key={key_field} names a field of shard .json members; folders and manifests "
                            "are joined by their key or file name (leave metadata_key empty)")
    return JoinedSource(source, table)


__all__ = ["JoinedSource", "MetadataError", "MetadataTable", "build_table_index", "detect_format", "join_metadata",
           "yfcc_text"]

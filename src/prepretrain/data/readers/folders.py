"""Map-style sources over files users already have: image folders and manifests.

Every source yields :class:`~prepretrain.data.records.Record` objects and raises
``BadSample`` for a sample it cannot use, so the loader counts it instead of crashing.
Listing is done once, at construction, and kept *compact*: folder paths live in one ``bytes``
blob plus a NumPy offset array rather than millions of Python strings; manifest rows stay in
their file, found through a memory-mapped offset index (:mod:`prepretrain.data.readers.rowindex`).
That matters twice: a list of 10M small objects costs GBs, and DataLoader workers forked
from the main process touch every object's reference count, which copies the pages
(copy-on-write) and multiplies that memory by the number of workers. A blob and an array
are never written to after construction, so the pages stay shared.

Choosing a source from a path (``open_source``) is :mod:`prepretrain.data.readers.open`'s job;
statistics (``describe_source``) and conversion to shards are in
:mod:`prepretrain.data.describe` and :mod:`prepretrain.data.shards.write`.
"""

from __future__ import annotations

import csv
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from prepretrain.data.images.decode import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    check_pixel_format,
    image_files,
    load_pixels,
)
from prepretrain.data.readers.rowindex import RowIndex, cache_root, file_identity
from prepretrain.data.records import Annotation, BadSample, Record, num_classes_of, split_hashtags
from prepretrain.files import atomic_path

MANIFEST_SUFFIXES = (".jsonl", ".ndjson", ".csv", ".tsv")


class PackedStrings:
    """An immutable list of strings stored as one UTF-8 blob plus an int64 offset array.

    Why not ``list[str]``: see the module docstring (memory and copy-on-write in workers).
    Items are stored as raw bytes, so undecodable bytes survive until :meth:`text` decodes
    them with ``errors="replace"``.
    """

    def __init__(self, items: Iterable[str | bytes]):
        blob = bytearray()
        ends: list[int] = []
        for item in items:
            blob += item.encode("utf-8") if isinstance(item, str) else item
            ends.append(len(blob))
        self._blob = bytes(blob)
        self._offsets = np.zeros(len(ends) + 1, dtype=np.int64)
        self._offsets[1:] = ends

    def __len__(self) -> int:
        return len(self._offsets) - 1

    def raw(self, index: int) -> bytes:
        return self._blob[self._offsets[index] : self._offsets[index + 1]]

    def text(self, index: int) -> str:
        return self.raw(index).decode("utf-8", errors="replace")

    def __getitem__(self, index: int) -> str:
        return self.text(index)


def _check_index(index: int, length: int) -> int:
    if index < 0:
        index += length
    if not 0 <= index < length:
        raise IndexError(f"index {index} out of range for a source of {length} samples")
    return index


class _FileSource(ABC):
    """Shared behaviour of sources whose samples are image files on disk."""

    root: Path
    class_names: dict[str, list[str]]
    num_classes_by_task: dict[str, int]

    def __init__(self, *, min_size_hint: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                 pixels: str = "pil"):
        self.min_size_hint = min_size_hint
        self.max_pixels = max_pixels
        self.pixels = check_pixel_format(pixels)

    def num_classes(self, task: str) -> int:
        """Classes of a label task (same call as ``SyntheticSource.num_classes``)."""
        return num_classes_of(self, task)

    @abstractmethod
    def __len__(self) -> int:
        """Number of samples listed."""

    @abstractmethod
    def entry(self, index: int) -> tuple[Annotation, Path]:
        """Annotation and file of sample ``index``, without decoding anything."""

    def annotation(self, index: int) -> Annotation:
        """Everything but the pixels: what statistics and hashtag vocabularies read."""
        return self.entry(index)[0]

    def path_of(self, index: int) -> Path:
        """The file holding sample ``index`` (``tools.write_shards`` copies its original bytes)."""
        return self.entry(index)[1]

    def get(self, index: int) -> Record:
        """Decode sample ``index``; raises ``BadSample`` if its file is missing or unusable.

        ``Record.image`` is an RGB PIL image, or with ``pixels="tensor"`` an RGB ``uint8``
        ``(3, H, W)`` tensor (``decode.load_tensor``: faster, for tensor transforms).
        """
        annotation, path = self.entry(index)
        image = load_pixels(
            path, annotation.key, pixels=self.pixels, min_size_hint=self.min_size_hint, max_pixels=self.max_pixels
        )
        return annotation.record(image)

    __getitem__ = get

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.root)!r}, {len(self)} samples)"


class FolderSource(_FileSource):
    """Unlabeled images anywhere under ``root`` (nested folders, mixed formats).

    The input of MAE pre-pretraining: pixels only, so hashtags, caption and labels are empty.
    The key of a sample is its POSIX path relative to ``root``.
    """

    def __init__(
        self, root: str | os.PathLike, *, min_size_hint: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
        pixels: str = "pil",
    ):
        super().__init__(min_size_hint=min_size_hint, max_pixels=max_pixels, pixels=pixels)
        self.root = Path(root)
        files = image_files(self.root)
        if not files:
            raise ValueError(
                f"no images under {self.root} (looked for {', '.join(sorted(IMAGE_EXTENSIONS))}, hidden files skipped)"
            )
        self._paths = PackedStrings(path.relative_to(self.root).as_posix() for path in files)
        self.class_names = {}
        self.num_classes_by_task = {}

    def __len__(self) -> int:
        return len(self._paths)

    def entry(self, index: int) -> tuple[Annotation, Path]:
        relative = self._paths.text(_check_index(index, len(self)))
        return Annotation(key=relative), self.root / relative


class ImageFolderSource(_FileSource):
    """The torchvision ImageFolder layout, ``root/<class>/**/<image>``, as labels ``{"label": i}``.

    Classes are the sorted names of the non-hidden immediate subdirectories (torchvision's
    order, so class indices agree with models trained on it); images may be nested deeper
    inside a class directory. Empty class directories keep their index, so adding images
    to one later does not renumber the others. Files directly in ``root`` are ignored.
    """

    def __init__(
        self, root: str | os.PathLike, *, min_size_hint: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
        pixels: str = "pil",
    ):
        super().__init__(min_size_hint=min_size_hint, max_pixels=max_pixels, pixels=pixels)
        self.root = Path(root)
        classes = sorted(
            entry.name for entry in os.scandir(self.root) if entry.is_dir() and not entry.name.startswith(".")
        )
        if not classes:
            raise ValueError(f"{self.root}: an image-folder dataset needs one subdirectory per class")
        relative: list[str] = []
        labels: list[int] = []
        for label, name in enumerate(classes):
            for path in image_files(self.root / name):
                relative.append(path.relative_to(self.root).as_posix())
                labels.append(label)
        if not relative:
            raise ValueError(f"no images in the class directories of {self.root}")
        self._paths = PackedStrings(relative)
        self._labels = np.asarray(labels, dtype=np.int32)
        self.class_names = {"label": classes}
        self.num_classes_by_task = {"label": len(classes)}

    def __len__(self) -> int:
        return len(self._paths)

    def entry(self, index: int) -> tuple[Annotation, Path]:
        index = _check_index(index, len(self))
        relative = self._paths.text(index)
        return Annotation(key=relative, labels={"label": int(self._labels[index])}), self.root / relative


class ManifestSource(_FileSource):
    """Images listed in a JSONL or CSV manifest, with hashtags, captions and labels.

    JSONL (``.jsonl``/``.ndjson``), one object per line::

        {"path": "img/0001.jpg", "hashtags": ["#dog", "beach"], "caption": "...",
         "labels": {"coarse": 3, "fine": 17}}

    CSV (``.csv``; ``.tsv`` is tab-separated), with a header row: ``path`` (required),
    ``hashtags`` (one string split on whitespace, commas or ``|``), ``caption``, and label
    columns ``label`` (task ``label``) or ``label_<task>`` (task ``<task>``) holding
    integers, empty for "no label". Other columns are ignored.

    ``path`` is relative to the manifest's directory, or absolute. Opening is bounded in time
    and memory whatever the size (:class:`~prepretrain.data.readers.rowindex.RowIndex`: one streaming
    pass records each row's byte offset in a cache file the first time, later opens memory-map
    it; a CSV is first normalised to JSONL rows in the cache, in one streaming pass). Nothing
    about a row is checked when the manifest is opened: a malformed row, like a missing file,
    is a ``BadSample`` when its sample is read (``bad_row``, ``missing_file``), counted by the
    loop's bad-data rule. ``prepretrain data check MANIFEST`` validates every row and names
    each bad one by ``file:line``. Bytes that are not UTF-8 are decoded with replacement
    characters: a mangled caption is still a usable image.

    Class names come from ``class_names=``, else from ``classes.json`` next to the manifest
    (``{"class_names": {task: [...]}}``, as :func:`~prepretrain.data.synthetic.export.write_synthetic`
    writes, or ``{task: [...]}``), else are empty; ``num_classes(task)`` is the larger of
    their count and the largest label + 1, found by reading every row the first time it is
    asked (evaluation sets are small; at pretraining scale nothing asks).

    ``hashtag_field`` / ``caption_field`` name the JSON field (CSV column) holding the
    hashtags and the caption when they are not ``hashtags`` and ``caption``, e.g. ``tags``.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        min_size_hint: int | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        class_names: dict[str, list[str]] | None = None,
        pixels: str = "pil",
        hashtag_field: str = "hashtags",
        caption_field: str = "caption",
    ):
        super().__init__(min_size_hint=min_size_hint, max_pixels=max_pixels, pixels=pixels)
        self.path = Path(path)
        self.root = self.path.parent
        suffix = self.path.suffix.lower()
        if suffix not in MANIFEST_SUFFIXES:
            raise ValueError(f"{self.path}: a manifest must end in one of {MANIFEST_SUFFIXES}")
        for name, value in (("hashtag_field", hashtag_field), ("caption_field", caption_field)):
            if not isinstance(value, str) or not value or value in ("path", "labels"):
                raise ValueError(f"{name} must name a manifest field other than 'path' and 'labels', got {value!r}")
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: manifest not found")
        self.hashtag_field = hashtag_field
        self.caption_field = caption_field
        if suffix in (".jsonl", ".ndjson"):
            # JSONL rows are read as written, by the chosen field names.
            self._row_fields = (hashtag_field, caption_field)
            self._rows = RowIndex(self.path)
        else:
            # CSV rows are normalised once into JSONL rows (under "hashtags" and "caption").
            self._row_fields = ("hashtags", "caption")
            self._rows = RowIndex(normalised_csv(self.path, "\t" if suffix == ".tsv" else ",", hashtag_field,
                                                 caption_field))
        if not len(self._rows):
            raise ValueError(f"{self.path}: the manifest lists no images")
        self.class_names = dict(class_names) if class_names is not None else self._sidecar_class_names()
        self._num_classes: dict[str, int] | None = None

    @property
    def num_classes_by_task(self) -> dict[str, int]:
        """Classes per label task: names given, or the largest label + 1 (one pass over the rows,
        the first time it is asked; rows that cannot be read are left out here and counted where
        they are drawn)."""
        if self._num_classes is None:
            counts = {task: len(names) for task, names in self.class_names.items()}
            for index in range(len(self)):
                try:
                    labels = self._parse(index)[3]
                except BadSample:
                    continue
                for task, value in labels.items():
                    counts[task] = max(counts.get(task, 0), value + 1)
            self._num_classes = counts
        return self._num_classes

    def _sidecar_class_names(self) -> dict[str, list[str]]:
        sidecar = self.root / "classes.json"
        if not sidecar.is_file():
            return {}
        try:
            content = json.loads(sidecar.read_text(encoding="utf-8", errors="replace"))
        except json.JSONDecodeError as error:
            raise ValueError(f"{sidecar}: malformed JSON ({error.msg})") from None
        names = content.get("class_names", content) if isinstance(content, dict) else {}
        return {str(task): [str(name) for name in values] for task, values in names.items() if isinstance(values, list)}

    # -- rows --------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._rows)

    def __repr__(self) -> str:
        return f"ManifestSource({str(self.path)!r}, {len(self)} samples)"

    def _parse(self, index: int) -> tuple[str, list[str], str, dict[str, int]]:
        """(path, hashtags, caption, labels) of row ``index``; ``BadSample("bad_row")`` when malformed."""
        raw = self._rows.raw(_check_index(index, len(self)))
        try:
            return parse_row(raw, *self._row_fields)
        except ValueError as error:
            raise BadSample(f"{self.path.name}:row{index}", "bad_row", str(error)) from None

    def entry(self, index: int) -> tuple[Annotation, Path]:
        path, hashtags, caption, labels = self._parse(index)
        annotation = Annotation(key=path, hashtags=hashtags, caption=caption, labels=labels)
        file = Path(path)
        return annotation, (file if file.is_absolute() else self.root / file)

    def check(self, max_errors: int = 20) -> dict[str, Any]:
        """Validate every row in one streaming pass (``prepretrain data check``): counts, and the
        first ``max_errors`` bad rows as ``file:line: message``. Files are not opened."""
        bad: list[str] = []
        rows = errors = 0
        for line, raw in iter_rows(self.path, self.hashtag_field, self.caption_field):
            rows += 1
            try:
                parse_row(raw, *self._row_fields)
            except ValueError as error:
                errors += 1
                if len(bad) < max_errors:
                    bad.append(f"{self.path}:{line}: {error}")
        return {"manifest": str(self.path), "rows": rows, "bad_rows": errors, "examples": bad}


def parse_row(raw: bytes | str, hashtag_key: str = "hashtags",
              caption_key: str = "caption") -> tuple[str, list[str], str, dict[str, int]]:
    """(path, hashtags, caption, labels) of one JSON manifest row; ``ValueError`` saying what is wrong."""
    text = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else raw
    if not text.strip():
        raise ValueError("blank row")
    try:
        row = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"malformed JSON ({error.msg} at column {error.colno})") from None
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    if "_error" in row:  # a CSV line that could not be normalised
        raise ValueError(str(row["_error"]))
    path = row.get("path")
    if not isinstance(path, str) or not path:
        raise ValueError("missing or empty 'path'")
    hashtags = row.get(hashtag_key) or []
    if isinstance(hashtags, str):
        hashtags = split_hashtags(hashtags)
    if not isinstance(hashtags, list):
        raise ValueError(f"'{hashtag_key}' must be a list of strings (or one string)")
    caption = row.get(caption_key) or ""
    if not isinstance(caption, str):
        raise ValueError(f"'{caption_key}' must be a string")
    labels = row.get("labels") or {}
    if not isinstance(labels, dict):
        raise ValueError("'labels' must be an object mapping task -> class index")
    clean: dict[str, int] = {}
    for task, value in labels.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"label {task!r} must be a non-negative integer, got {value!r}")
        clean[str(task)] = value
    return path, [str(tag) for tag in hashtags], caption, clean


def iter_rows(path: Path, hashtag_field: str = "hashtags", caption_field: str = "caption") -> Iterator[tuple[int, str]]:
    """(line number, JSON row) of a manifest, streaming; CSV lines normalised as they are read."""
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        with open(path, "rb") as handle:
            for number, raw in enumerate(handle, start=1):
                stripped = raw.strip()
                if stripped and not stripped.startswith(b"#"):
                    yield number, stripped.decode("utf-8", errors="replace")
        return
    yield from _csv_rows(path, "\t" if suffix == ".tsv" else ",", hashtag_field, caption_field)


def _csv_rows(path: Path, delimiter: str, hashtag_column: str, caption_column: str) -> Iterator[tuple[int, str]]:
    with open(path, encoding="utf-8-sig", errors="replace", newline="") as handle:
        reader = csv.reader(handle, delimiter=delimiter)
        header = next(reader, None)
        if header is None:
            return
        header = [name.strip() for name in header]
        if "path" not in header:
            raise ValueError(f"{path}:1: the header needs a 'path' column, got {header}")
        label_columns = {
            name: ("label" if name == "label" else name[len("label_") :])
            for name in header
            if name == "label" or (name.startswith("label_") and len(name) > len("label_"))
        }
        column = {name: position for position, name in enumerate(header)}
        for cells in reader:
            number = reader.line_num
            if not any(cell.strip() for cell in cells):
                continue
            if len(cells) != len(header):
                yield number, json.dumps({"_error": f"expected {len(header)} columns, got {len(cells)}"})
                continue
            labels: dict[str, int] = {}
            error = ""
            for name, task in label_columns.items():
                value = cells[column[name]].strip()
                if value:
                    try:
                        labels[task] = int(value)
                    except ValueError:
                        error = f"column {name!r} must be an integer, got {value!r}"
            if error:
                yield number, json.dumps({"_error": error})
                continue
            row = {
                "path": cells[column["path"]].strip(),
                "hashtags": split_hashtags(cells[column[hashtag_column]]) if hashtag_column in column else [],
                "caption": cells[column[caption_column]] if caption_column in column else "",
                "labels": labels,
            }
            yield number, json.dumps(row, ensure_ascii=False, separators=(",", ":"))


def normalised_csv(path: Path, delimiter: str, hashtag_column: str, caption_column: str) -> Path:
    """The CSV's rows as JSONL in the cache (written once, streaming; named by the file's identity
    and the columns read), so a CSV opens like a JSONL manifest afterwards."""
    out = cache_root() / "rows" / f"{file_identity(path, f'{delimiter}|{hashtag_column}|{caption_column}')}.jsonl"
    if not out.is_file():
        with atomic_path(out) as tmp, open(tmp, "w", encoding="utf-8") as sink:
            for _, row in _csv_rows(path, delimiter, hashtag_column, caption_column):
                sink.write(row + "\n")
    return out


__all__ = [
    "FolderSource",
    "ImageFolderSource",
    "ManifestSource",
    "PackedStrings",
]

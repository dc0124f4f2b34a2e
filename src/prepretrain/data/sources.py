"""Map-style sources over files users already have: image folders and manifests.

Every source yields :class:`~prepretrain.data.records.Record` objects and raises
``BadSample`` for a sample it cannot use, so the loader counts it instead of crashing.
Listing is done once, at construction, and kept *compact*: paths and manifest rows live in
one ``bytes`` blob plus a NumPy offset array rather than millions of Python strings/dicts.
That matters twice: a list of 10M small objects costs GBs, and DataLoader workers forked
from the main process touch every object's reference count, which copies the pages
(copy-on-write) and multiplies that memory by the number of workers. A blob and an array
are never written to after construction, so the pages stay shared.

Choosing a source from a path (``open_source``) is :mod:`prepretrain.data.loader`'s job;
statistics (``describe_source``) and conversion to shards are in :mod:`prepretrain.data.tools`.
"""

from __future__ import annotations

import csv
import io
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from prepretrain.data.decode import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    check_pixel_format,
    image_files,
    load_pixels,
)
from prepretrain.data.records import Annotation, Record, num_classes_of, split_hashtags

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

    ``path`` is relative to the manifest's directory, or absolute. Files are *not* checked
    at construction (a stat per row is minutes on network storage for millions of rows): a
    missing file is ``BadSample(reason="missing_file")`` when the sample is read. Rows are
    validated at construction, so a malformed line fails before any compute with
    ``file:line``. Bytes that are not UTF-8 are decoded with replacement characters: a
    mangled caption is still a usable image.

    Class names come from ``class_names=``, else from ``classes.json`` next to the manifest
    (``{"class_names": {task: [...]}}``, as :func:`~prepretrain.data.tools.write_synthetic`
    writes, or ``{task: [...]}``), else are empty; ``num_classes(task)`` is the larger of
    their count and the largest label seen + 1.

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
        self.hashtag_field = hashtag_field
        self.caption_field = caption_field
        data = self.path.read_bytes()
        max_label: dict[str, int] = {}
        if suffix in (".jsonl", ".ndjson"):
            # JSONL rows are kept as written, so they are read by the chosen field names.
            self._row_fields = (hashtag_field, caption_field)
            rows = self._read_jsonl(data, max_label)
        else:
            # CSV rows are stored normalised, under "hashtags" and "caption".
            self._row_fields = ("hashtags", "caption")
            rows = self._read_csv(data, "\t" if suffix == ".tsv" else ",", max_label)
        self._rows = PackedStrings(rows)
        if not len(self._rows):
            raise ValueError(f"{self.path}: the manifest lists no images")
        self.class_names = dict(class_names) if class_names is not None else self._sidecar_class_names()
        self.num_classes_by_task = {task: len(names) for task, names in self.class_names.items()}
        for task, largest in max_label.items():
            self.num_classes_by_task[task] = max(self.num_classes_by_task.get(task, 0), largest + 1)

    # -- parsing (construction time) ---------------------------------------------------
    def _fail(self, line: int, message: str) -> ValueError:
        return ValueError(f"{self.path}:{line}: {message}")

    def _validate(self, row: Any, line: int, max_label: dict[str, int]) -> None:
        if not isinstance(row, dict):
            raise self._fail(line, f"expected a JSON object, got {type(row).__name__}")
        path = row.get("path")
        if not isinstance(path, str) or not path:
            raise self._fail(line, "missing or empty 'path'")
        hashtag_key, caption_key = self._row_fields
        hashtags = row.get(hashtag_key, [])
        if hashtags is not None and not isinstance(hashtags, (list, str)):
            raise self._fail(line, f"'{hashtag_key}' must be a list of strings (or one string)")
        caption = row.get(caption_key, "")
        if caption is not None and not isinstance(caption, str):
            raise self._fail(line, f"'{caption_key}' must be a string")
        labels = row.get("labels", {})
        if labels is None:
            return
        if not isinstance(labels, dict):
            raise self._fail(line, "'labels' must be an object mapping task -> class index")
        for task, value in labels.items():
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise self._fail(line, f"label {task!r} must be a non-negative integer, got {value!r}")
            max_label[task] = max(max_label.get(task, -1), value)

    def _read_jsonl(self, data: bytes, max_label: dict[str, int]) -> Iterator[bytes]:
        for number, raw in enumerate(data.splitlines(), start=1):
            stripped = raw.strip()
            if not stripped or stripped.startswith(b"#"):
                continue
            try:
                row = json.loads(stripped.decode("utf-8", errors="replace"))
            except json.JSONDecodeError as error:
                raise self._fail(number, f"malformed JSON ({error.msg} at column {error.colno})") from None
            self._validate(row, number, max_label)
            yield stripped

    def _read_csv(self, data: bytes, delimiter: str, max_label: dict[str, int]) -> Iterator[str]:
        text = data.decode("utf-8-sig", errors="replace")
        reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
        header = next(reader, None)
        if header is None:
            return
        header = [name.strip() for name in header]
        if "path" not in header:
            raise self._fail(1, f"the header needs a 'path' column, got {header}")
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
                raise self._fail(number, f"expected {len(header)} columns, got {len(cells)}")
            labels: dict[str, int] = {}
            for name, task in label_columns.items():
                value = cells[column[name]].strip()
                if not value:
                    continue
                try:
                    labels[task] = int(value)
                except ValueError:
                    raise self._fail(number, f"column {name!r} must be an integer, got {value!r}") from None
            hashtag_column, caption_column = self.hashtag_field, self.caption_field
            row = {
                "path": cells[column["path"]].strip(),
                "hashtags": split_hashtags(cells[column[hashtag_column]]) if hashtag_column in column else [],
                "caption": cells[column[caption_column]] if caption_column in column else "",
                "labels": labels,
            }
            self._validate(row, number, max_label)
            yield json.dumps(row, ensure_ascii=False, separators=(",", ":"))

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

    # -- access ------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self._rows)

    def __repr__(self) -> str:
        return f"ManifestSource({str(self.path)!r}, {len(self)} samples)"

    def entry(self, index: int) -> tuple[Annotation, Path]:
        row = json.loads(self._rows.text(_check_index(index, len(self))))
        hashtag_key, caption_key = self._row_fields
        hashtags = row.get(hashtag_key) or []
        if isinstance(hashtags, str):
            hashtags = split_hashtags(hashtags)
        labels = {str(task): int(value) for task, value in (row.get("labels") or {}).items() if value is not None}
        annotation = Annotation(
            key=row["path"],
            hashtags=[str(tag) for tag in hashtags],
            caption=row.get(caption_key) or "",
            labels=labels,
        )
        path = Path(row["path"])
        return annotation, (path if path.is_absolute() else self.root / path)


__all__ = [
    "FolderSource",
    "ImageFolderSource",
    "ManifestSource",
    "PackedStrings",
]

"""The one sample format every data source yields and every stage consumes.

Sources (synthetic, folders, manifests, WebDataset shards) differ in where images and
annotations live; stages (MAE, WSP, LiT, transfer) differ in which fields they read. A
``Record`` sits between them so that neither side knows about the other.

Also here, because several readers share them: :class:`Annotation` (a record without its
pixels), :func:`split_hashtags` and :func:`num_classes_of`. This module imports nothing else
from the package, so every reader, tool and stage can import it.
"""

from __future__ import annotations

import contextlib
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from PIL import Image

_HASHTAG_SEPARATORS = re.compile(r"[\s,|]+")


@dataclass
class Record:
    """One image with everything known about it.

    ``labels`` maps a task name to a class index (the synthetic dataset has ``coarse`` and
    ``fine``; an ImageFolder has ``label``); it is empty for unlabeled images.
    """

    image: Image.Image  # always RGB
    key: str  # a path or id, for error messages and deduplication
    hashtags: list[str] = field(default_factory=list)
    caption: str = ""
    labels: dict[str, int] = field(default_factory=dict)
    # vocabulary indices of the sample's weak labels when its reader already labelled it (WSP on
    # shards: the resampling copies need them), so the transform does not label it a second time
    label_ids: list[int] | None = None


@dataclass
class Annotation:
    """Everything about a sample except its pixels: cheap to read for statistics."""

    key: str
    hashtags: list[str] = field(default_factory=list)
    caption: str = ""
    labels: dict[str, int] = field(default_factory=dict)

    def record(self, image: object) -> Record:
        """The sample: these annotations with its decoded pixels."""
        return Record(image=image, key=self.key, hashtags=self.hashtags, caption=self.caption, labels=self.labels)


def split_hashtags(text: str) -> list[str]:
    """Hashtags from one string: separated by whitespace, commas or ``|`` (CSV manifests)."""
    return [tag for tag in _HASHTAG_SEPARATORS.split(text) if tag]


def num_classes_of(source: Any, task: str) -> int:
    """Classes of ``task`` for any source with ``num_classes_by_task`` or ``class_names``."""
    known = dict(getattr(source, "num_classes_by_task", None) or {})
    for name, names in (getattr(source, "class_names", None) or {}).items():
        known[name] = max(known.get(name, 0), len(names))
    if task not in known:
        raise KeyError(f"unknown label task {task!r}; this source has {sorted(known)}")
    return known[task]


class BadSample(Exception):
    """A sample that cannot be used; ``reason`` is a short counted category."""

    def __init__(self, key: str, reason: str, detail: str = ""):
        super().__init__(f"{key}: {reason}{': ' + detail if detail else ''}")
        self.key = key
        self.reason = reason
        self.detail = detail


@runtime_checkable
class MapSource(Protocol):
    """A random-access collection of records (folders, manifests, the synthetic set)."""

    def __len__(self) -> int: ...

    def get(self, index: int) -> Record:
        """Return record ``index`` or raise ``BadSample``."""
        ...


MAX_NAMED_FILES = 1000  # distinct files remembered per reason (counting goes on past it)


@dataclass
class SkipCounter:
    """Counts skipped samples by reason so a run can report them and stop when too many.

    ``files`` remembers which files (keys) were skipped, each once, with how many times it was
    read: a broken video read 80 times in a run is one file, named once in the report."""

    seen: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)
    files: dict[str, Counter] = field(default_factory=dict)  # reason -> key -> reads (first MAX_NAMED_FILES)

    def ok(self) -> None:
        self.seen += 1

    def _name(self, reason: str, key: str, reads: int) -> None:
        named = self.files.setdefault(reason, Counter())
        if key in named or len(named) < MAX_NAMED_FILES:
            named[key] += reads

    def skip(self, error: BadSample) -> None:
        self.seen += 1
        self.skipped[error.reason] += 1
        self.examples.setdefault(error.reason, error.key)
        self._name(error.reason, error.key, 1)

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())

    @property
    def bad_fraction(self) -> float:
        return self.total_skipped / self.seen if self.seen else 0.0

    def merge(self, other: SkipCounter) -> None:
        self.seen += other.seen
        self.skipped.update(other.skipped)
        for reason, key in other.examples.items():
            self.examples.setdefault(reason, key)
        for reason, named in other.files.items():
            for key, reads in named.items():
                self._name(reason, key, reads)

    def describe(self, shown: int = 5) -> str:
        """``unreadable: 2 files (a.mp4 79 reads, b.mp4 79 reads)``, one clause per reason."""
        parts = []
        for reason, count in self.skipped.most_common():
            named = self.files.get(reason, Counter())
            files = ", ".join(f"{key} ({reads} read{'s' * (reads > 1)})" for key, reads in named.most_common(shown))
            more = f", ... {len(named) - shown} more" if len(named) > shown else ""
            capped = "+" if len(named) >= MAX_NAMED_FILES else ""
            parts.append(f"{reason}: {count} samples from {len(named)}{capped} files ({files}{more})")
        return "; ".join(parts)

    def as_dict(self) -> dict:
        return {"seen": self.seen, "skipped": dict(self.skipped), "examples": dict(self.examples),
                "distinct_files": {reason: len(named) for reason, named in self.files.items()},
                "files": {reason: dict(named.most_common(100)) for reason, named in self.files.items()}}


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
def scratch_skips(source: Any) -> Iterator[SkipCounter]:
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

"""The one sample format every data source yields and every stage consumes.

Sources (synthetic, folders, manifests, WebDataset shards) differ in where images and
annotations live; stages (MAE, WSP, LiT, transfer) differ in which fields they read. A
``Record`` sits between them so that neither side knows about the other.

Also here, because several readers share them: :class:`Annotation` (a record without its
pixels), :func:`split_hashtags` and :func:`num_classes_of`. This module imports nothing else
from the package, so every reader, tool and stage can import it.
"""

from __future__ import annotations

import re
from collections import Counter
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


@dataclass
class SkipCounter:
    """Counts skipped samples by reason so a run can report them and stop when too many."""

    seen: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, str] = field(default_factory=dict)

    def ok(self) -> None:
        self.seen += 1

    def skip(self, error: BadSample) -> None:
        self.seen += 1
        self.skipped[error.reason] += 1
        self.examples.setdefault(error.reason, error.key)

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

    def as_dict(self) -> dict:
        return {"seen": self.seen, "skipped": dict(self.skipped), "examples": dict(self.examples)}

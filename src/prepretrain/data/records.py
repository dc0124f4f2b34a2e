"""The one sample format every data source yields and every stage consumes.

Sources (synthetic, folders, manifests, WebDataset shards) differ in where images and
annotations live; stages (MAE, WSP, LiT, transfer) differ in which fields they read. A
``Record`` sits between them so that neither side knows about the other.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from PIL import Image


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

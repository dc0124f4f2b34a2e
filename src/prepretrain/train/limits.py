"""When a run must stop rather than go on: too much unreadable data, too many non-finite losses."""

from __future__ import annotations

from ..data.records import SkipCounter


class NonFiniteLoss(RuntimeError):
    """Too many consecutive non-finite losses: the run stops instead of saving NaN weights."""


class TooManyBadSamples(RuntimeError):
    """More of the data is unreadable than ``max_bad_fraction`` allows."""


def check_bad_fraction(skips: SkipCounter, max_bad_fraction: float, min_seen: int = 50, where: str = "") -> None:
    """Stop with :class:`TooManyBadSamples` once more than ``max_bad_fraction`` of at least
    ``min_seen`` samples were unreadable: the one rule for training batches and frozen caches."""
    if skips.seen >= min_seen and skips.seen and skips.bad_fraction > max_bad_fraction:
        examples = ", ".join(f"{r}: {k}" for r, k in list(skips.examples.items())[:5])
        raise TooManyBadSamples(
            f"{where}{skips.total_skipped} of {skips.seen} samples unreadable ({skips.bad_fraction:.1%} > "
            f"max_bad_fraction {max_bad_fraction:.1%}); examples: {examples}"
        )

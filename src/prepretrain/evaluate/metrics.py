"""Accuracy from scores and labels: the one top-k count every evaluator and stage uses."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def topk_hits(scores: torch.Tensor, labels: torch.Tensor, ks: Sequence[int] = (1, 5)) -> dict[int, int]:
    """Number of rows whose label is among the top-k scores, per k (k capped at the number of classes)."""
    largest = min(max(ks), scores.shape[1])
    top = scores.topk(largest, dim=1).indices
    return {k: int((top[:, : min(k, largest)] == labels.view(-1, 1)).any(dim=1).sum()) for k in ks}


def reported_ks(num_classes: int, ks: Sequence[int] = (1, 5)) -> tuple[int, ...]:
    """The k of ``ks`` worth reporting: a k that is not below the number of classes is trivially 100%."""
    return tuple(k for k in ks if not (k > num_classes or (k > 1 and k == num_classes)))


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, ks: tuple[int, ...] = (1, 5)) -> dict[str, float]:
    """Top-k accuracies in percent; a k that is not below the number of classes (trivially 100%) is left out."""
    kept = reported_ks(scores.shape[1], ks)
    if not kept:
        return {}
    hits = topk_hits(scores, labels, kept)
    return {f"top{k}": 100.0 * hits[k] / len(labels) if len(labels) else 0.0 for k in kept}

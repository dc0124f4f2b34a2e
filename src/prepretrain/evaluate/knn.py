"""Weighted k-nearest-neighbour classification on frozen features (no training at all).

Why kNN next to the linear probe: it has no hyperparameters fitted on labels beyond ``k``
and the temperature, so it measures how well the feature space itself clusters classes.
The protocol is the common one for self-supervised ViTs: cosine similarity between
L2-normalised features, the ``k`` most similar training images vote for their class with
weight ``exp(similarity / T)`` (k=20, T=0.07 by default).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .common import EvalConfig, EvalData, FrozenEncoder
from .metrics import topk_accuracy


@dataclass
class KNNConfig(EvalConfig):
    """kNN classifier (``prepretrain knn``)."""

    stage_name = "knn"
    k: int = 20
    temperature: float = 0.07
    chunk_size: int = 1024  # test rows per similarity matrix (bounds memory on large sets)

    # Every numeric key this class defines, with its interval (config.check_bounds).
    bounds = {
        "k": "> 0", "temperature": "> 0", "chunk_size": "> 0",
    }


@torch.no_grad()
def knn_scores(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, num_classes: int, *,
               k: int = 20, temperature: float = 0.07, chunk_size: int = 1024) -> torch.Tensor:
    """Per-class vote totals (N_test, C): sum of ``exp(cos / T)`` over each test row's k neighbours."""
    train_n = F.normalize(train_x.float(), dim=1)
    k = min(k, len(train_n))
    scores = []
    for chunk in test_x.float().split(chunk_size):
        similarity = F.normalize(chunk, dim=1) @ train_n.T
        top_similarity, top_rows = similarity.topk(k, dim=1)
        votes = torch.zeros(len(chunk), num_classes, device=chunk.device)
        votes.scatter_add_(1, train_y[top_rows], (top_similarity / temperature).exp())
        scores.append(votes)
    return torch.cat(scores)


def evaluate_knn(encoder: FrozenEncoder, data: EvalData, cfg: KNNConfig) -> dict[str, Any]:
    """kNN top-1/top-5 (%) on the test split; the evaluator interface of ``knn``."""
    device = encoder.device
    train = encoder.features(data, "train").labeled(data.task, cfg.pool)
    test = encoder.features(data, "test").labeled(data.task, cfg.pool)
    scores = knn_scores(train.x.to(device), train.y.to(device), test.x.to(device), data.num_classes,
                        k=cfg.k, temperature=cfg.temperature, chunk_size=cfg.chunk_size)
    return {"k": cfg.k, "temperature": cfg.temperature, "pool": cfg.pool, "num_train": len(train),
            "num_test": len(test), **topk_accuracy(scores.cpu(), test.y)}

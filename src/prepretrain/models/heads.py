"""The multi-label hashtag head of WSP: initialisation, losses, metrics, export.

The head is the ``head`` Linear of the timm ``VisionTransformer`` (``create_vit(...,
num_classes=vocab_size)``), so a WSP model's state dict is a timm state dict: the encoder
keys plus ``head.weight`` [V, D] and ``head.bias`` [V]. One Linear is the cheapest head
over tens of thousands of tags; targets arrive as padded index lists (``-1`` = padding) and
become dense only on the device, inside the loss.

Losses (SWAG, Singh et al. 2022, arXiv 2201.08371; facebookresearch/SWAG):

* ``softmax`` (the paper's): cross-entropy between the softmax over all tags and the
  multi-hot target normalised to sum to 1, i.e. the mean of ``-log p(tag)`` over the image's
  tags.
* ``sigmoid``: independent binary cross-entropy per tag, summed over tags and averaged over
  images (summing keeps the per-image loss on the scale of one image's labels instead of
  vanishing as 1/V with a 28K vocabulary).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..data.labels.hashtags import VocabularyMismatch
from ..files import save_safetensors

LOSSES = ("softmax", "sigmoid")
HEAD_KEYS = ("head.weight", "head.bias")


def valid_tags(tag_indices: torch.Tensor) -> torch.Tensor:
    """Mask of real entries in a ``-1``-padded (N, T) index tensor."""
    return tag_indices >= 0


def multi_hot(tag_indices: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(N, T) padded indices -> (N, V) 0/1 float targets (duplicates count once)."""
    target = torch.zeros(tag_indices.shape[0], num_classes, device=tag_indices.device)
    target.scatter_add_(1, tag_indices.clamp(min=0), valid_tags(tag_indices).float())
    return target.clamp_(max=1.0)


def softmax_multilabel_loss(logits: torch.Tensor, tag_indices: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against the sum-to-one multi-hot target, averaged over images with tags.

    Gathering the image's tags from ``log_softmax`` equals the dense ``-(t/|t|) . log p``
    without materialising an (N, V) target; computed in float32 under bf16 autocast.
    """
    log_probs = F.log_softmax(logits.float(), dim=-1)
    mask = valid_tags(tag_indices)
    picked = log_probs.gather(1, tag_indices.clamp(min=0)) * mask
    per_image_tags = mask.sum(1)
    has_tags = per_image_tags > 0
    per_image = -picked.sum(1) / per_image_tags.clamp(min=1)
    # where(), not per_image[has_tags]: boolean indexing sizes its output on the host (a sync per step)
    return torch.where(has_tags, per_image, 0.0).sum() / has_tags.sum().clamp(min=1)


def sigmoid_multilabel_loss(logits: torch.Tensor, tag_indices: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy per tag, summed over tags, averaged over images."""
    target = multi_hot(tag_indices, logits.shape[-1])
    per_entry = F.binary_cross_entropy_with_logits(logits.float(), target, reduction="none")
    return per_entry.sum(1).mean()


def multilabel_loss(logits: torch.Tensor, tag_indices: torch.Tensor, kind: str = "softmax") -> torch.Tensor:
    if kind == "softmax":
        return softmax_multilabel_loss(logits, tag_indices)
    if kind == "sigmoid":
        return sigmoid_multilabel_loss(logits, tag_indices)
    raise ValueError(f"loss must be one of {LOSSES}, got {kind!r}")


def prior_bias(prior: torch.Tensor, kind: str, floor: float = 1e-8) -> torch.Tensor:
    """Bias whose predictions equal ``prior``: log-probabilities for softmax, logits for sigmoid.

    ``floor`` keeps never-seen tags finite (a tag from a fixed vocabulary file may be absent).
    """
    p = prior.double().clamp(min=floor, max=1 - floor)
    if kind == "softmax":
        return p.log().float()
    if kind == "sigmoid":
        return (p.log() - (-p).log1p()).float()
    raise ValueError(f"loss must be one of {LOSSES}, got {kind!r}")


@torch.no_grad()
def init_head(head: nn.Linear, *, bias: torch.Tensor | None = None, weight_std: float = 0.0) -> None:
    """Weights ``N(0, weight_std)`` (zero by default: the first steps fit the head on top of the
    pretrained features instead of back-propagating a random head's noise into them), bias as
    given (e.g. :func:`prior_bias`) or zero."""
    if weight_std > 0:
        nn.init.trunc_normal_(head.weight, std=weight_std, a=-2 * weight_std, b=2 * weight_std)
    else:
        head.weight.zero_()
    if head.bias is not None:
        if bias is None:
            head.bias.zero_()
        else:
            if bias.shape != head.bias.shape:
                raise ValueError(f"bias of shape {tuple(bias.shape)} for a head of {tuple(head.bias.shape)}")
            head.bias.copy_(bias.to(head.bias))


def split_head(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(encoder state with timm keys, ``head.*`` entries) of a WSP model's state dict."""
    encoder = {k: v for k, v in state.items() if not k.startswith("head.")}
    head = {k: v for k, v in state.items() if k.startswith("head.")}
    return encoder, head


def save_head(path: str | Path, model: nn.Module, metadata: dict[str, str] | None = None) -> Path:
    """Write ``head.weight``/``head.bias`` (safetensors): merged with ``encoder.safetensors`` they
    load strictly into ``create_vit(name, num_classes=V)``."""
    _, head = split_head(model.state_dict())
    if set(head) != set(HEAD_KEYS):
        raise ValueError(f"model has no Linear head (found {sorted(head)})")
    tensors = {k: v.detach().cpu().contiguous() for k, v in head.items()}
    info = {"num_classes": str(tensors["head.weight"].shape[0]), "embed_dim": str(tensors["head.weight"].shape[1])}
    return save_safetensors(path, tensors, {**info, **(metadata or {})})


def load_head(path: str | Path, num_classes: int | None = None) -> dict[str, torch.Tensor]:
    """Read a head written by :func:`save_head`; with ``num_classes`` (the vocabulary size),
    a head with another number of rows raises ``VocabularyMismatch`` instead of silently
    mapping tags to the wrong classes."""
    from safetensors.torch import load_file


    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"head weights not found: {path}")
    state = load_file(str(path), device="cpu")
    if set(state) != set(HEAD_KEYS):
        raise ValueError(f"{path}: expected keys {HEAD_KEYS}, found {sorted(state)}")
    rows = state["head.weight"].shape[0]
    if num_classes is not None and rows != num_classes:
        raise VocabularyMismatch(
            f"{path} has {rows} tag classes but the vocabulary has {num_classes} tags: the vocabulary file "
            "does not belong to this head (use the vocab.json saved beside it)"
        )
    return state


# ------------------------------------------------------------------------------------ metrics


def precision_at_k(scores: torch.Tensor, targets: torch.Tensor, k: int) -> float:
    """Mean over images of (true tags among the top ``k`` predictions) / k."""
    k = min(k, scores.shape[1])
    top = scores.topk(k, dim=1).indices
    hits = targets.gather(1, top)
    return float(hits.sum(1).div(k).mean())


def average_precision(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per-class AP over images (columns without positives get NaN).

    AP = mean, over the positives, of the precision of the ranking cut at each positive;
    ties are broken by image order (stable sort), so the number is deterministic.
    """
    order = torch.sort(scores, dim=0, descending=True, stable=True).indices
    ranked = targets.gather(0, order).double()
    hits = ranked.cumsum(0)
    ranks = torch.arange(1, scores.shape[0] + 1, dtype=torch.float64, device=scores.device).unsqueeze(1)
    positives = ranked.sum(0)
    ap = (hits / ranks * ranked).sum(0) / positives
    ap[positives == 0] = math.nan
    return ap


def tag_prediction_metrics(scores: torch.Tensor, targets: torch.Tensor, train_prior: torch.Tensor,
                           prefix: str = "val_") -> dict[str, float]:
    """Precision@1/@5 and mAP (over tags present in ``targets``) of the model beside the same
    numbers for the constant most-frequent-tag predictor ranked by ``train_prior``.

    The baseline's mAP is that of a ranking that ignores the image: in expectation the
    fraction of images carrying each tag, so it is reported as that mean prevalence.
    """
    targets = targets.float()
    present = targets.sum(0) > 0
    model_ap = average_precision(scores, targets)
    constant = train_prior.float().to(scores.device).expand_as(scores)
    prevalence = targets.mean(0)[present]
    return {
        f"{prefix}precision_at_1": precision_at_k(scores, targets, 1),
        f"{prefix}precision_at_5": precision_at_k(scores, targets, 5),
        f"{prefix}mAP": float(model_ap[present].mean()) if present.any() else math.nan,
        f"{prefix}baseline_precision_at_1": precision_at_k(constant, targets, 1),
        f"{prefix}baseline_precision_at_5": precision_at_k(constant, targets, 5),
        f"{prefix}baseline_mAP": float(prevalence.mean()) if present.any() else math.nan,
    }


__all__ = [
    "HEAD_KEYS",
    "LOSSES",
    "average_precision",
    "init_head",
    "load_head",
    "multi_hot",
    "multilabel_loss",
    "precision_at_k",
    "prior_bias",
    "save_head",
    "sigmoid_multilabel_loss",
    "softmax_multilabel_loss",
    "split_head",
    "tag_prediction_metrics",
]

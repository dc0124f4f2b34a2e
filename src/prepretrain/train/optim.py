"""Optimizer parameter groups and the learning-rate schedule of the MAE reference recipe."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

# Parameters that are embeddings or tokens, not weights: never decayed.
NO_DECAY_NAMES = ("cls_token", "pos_embed", "mask_token", "decoder_pos_embed", "reg_token", "dist_token",
                  "logit_scale", "position_embedding", "positional_embedding")


# Parameters that sit before the first block (depth 0 for layer-wise lr decay).
EMBEDDING_PARAMS = ("cls_token", "pos_embed", "reg_token", "dist_token")


def layer_id(name: str, num_layers: int) -> int:
    """Depth of a timm-ViT parameter: embeddings 0, ``blocks.i`` i + 1, everything after (norm, head) L + 1."""
    if name in EMBEDDING_PARAMS or name.startswith("patch_embed."):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_layers + 1


def layer_decay_scale(name: str, num_layers: int, decay: float) -> float:
    """lr multiplier ``decay ** (num_layers + 1 - layer_id)``: the head trains at the full lr,
    each block below at ``decay`` times the one above (lower layers hold more general features).
    Names are those of a timm ``VisionTransformer``; strip any wrapper prefix before asking."""
    return decay ** (num_layers + 1 - layer_id(name, num_layers))


def decays(name: str, param: torch.Tensor) -> bool:
    """Weight decay applies to matrices only: not to biases, norms, tokens or position embeddings."""
    leaf = name.split(".")[-1]
    return param.ndim > 1 and not name.endswith(".bias") and leaf not in NO_DECAY_NAMES and not any(
        part in NO_DECAY_NAMES for part in name.split(".")
    )


def param_groups(
    model: nn.Module,
    weight_decay: float,
    lr_scale: Callable[[str], float] | None = None,
) -> list[dict]:
    """AdamW groups by (decay or not, lr scale); ``lr_scale(name)`` gives layer-wise decay."""
    groups: dict[tuple[bool, float], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = decays(name, param)
        scale = lr_scale(name) if lr_scale else 1.0
        group = groups.setdefault(
            (decay, scale),
            {"params": [], "names": [], "weight_decay": weight_decay if decay else 0.0, "lr_scale": scale},
        )
        group["params"].append(param)
        group["names"].append(name)
    return list(groups.values())


def build_optimizer(groups: list[dict], lr: float, betas: tuple[float, float], device: torch.device, *,
                    fused: bool = True):
    """AdamW, fused (one kernel for all parameters) on CUDA and CPU: 5x faster than the foreach
    implementation on a CPU core for ViT-S, and it can skip a step on the device (``found_inf``,
    see :func:`step_unless_flagged`), which keeps the training step free of host syncs.
    ``fused=False`` gives torch's default implementation (the benchmarks' baseline)."""
    clean = [{k: v for k, v in g.items() if k != "names"} for g in groups]
    if not fused:
        return torch.optim.AdamW(clean, lr=lr, betas=tuple(betas))
    return torch.optim.AdamW(clean, lr=lr, betas=tuple(betas), fused=device.type in ("cuda", "cpu"))


def step_unless_flagged(optimizer: torch.optim.Optimizer, flagged: torch.Tensor) -> None:
    """One step of a fused AdamW that changes nothing (weights, moments, step counts) when the
    device tensor ``flagged`` is > 0, decided on the device: the host never waits for the flag."""
    optimizer.found_inf = (flagged > 0).float()
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf


def lr_at(step: int, total_steps: int, warmup_steps: int, peak_lr: float, min_lr: float = 0.0, *,
          schedule: str = "cosine", decay_at: tuple[float, ...] = (), decay_rate: float = 0.1) -> float:
    """Per-iteration linear warmup from 0, then half-cycle cosine down to ``min_lr`` or, with
    ``schedule="step"``, ``peak_lr`` times ``decay_rate`` once for each fraction of ``total_steps``
    in ``decay_at`` already reached (detectron2's MultiStepParamScheduler, as ViTDet uses it)."""
    if warmup_steps > 0 and step < warmup_steps:
        return peak_lr * step / warmup_steps
    if schedule == "step":
        return peak_lr * decay_rate ** sum(step >= round(fraction * total_steps) for fraction in decay_at)
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)

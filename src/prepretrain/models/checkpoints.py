"""Reading weights from files without running their code, and fitting them to a model.

Accepted: safetensors files, and PyTorch pickles read with ``weights_only=True`` (so an
untrusted file cannot execute code). Wrappers are unwrapped (``model``, ``state_dict``,
``module.``), and the three layouts users bring are recognised: a timm/MAWS encoder, an MAE
"full" checkpoint (decoder dropped when only the encoder is wanted), and a MAWS CLIP
checkpoint (``vision_encoder.*``).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..files import load_torch, read_keys
from .layouts import CheckpointMismatch, encoder_from_any

WRAPPER_KEYS = ("model", "state_dict", "model_state", "module", "ema")


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load a state dict from ``.safetensors`` or a torch pickle (weights only), unwrapped."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path), device="cpu")
    else:
        state = load_torch(path)
    return unwrap_state_dict(state)


def header_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """A weights file's tensors as shapes only (meta tensors) read off a safetensors header, without
    loading (possibly 26 GB of) data; other formats are loaded (their shapes are inside the pickle)."""
    keys = read_keys(path)
    if keys is None:
        return read_state_dict(path)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return {key: torch.empty(handle.get_slice(key).get_shape(), device="meta") for key in keys}


def unwrap_state_dict(state: dict) -> dict[str, torch.Tensor]:
    """Strip common wrappers: ``{"model": sd}``, ``{"state_dict": sd}``, ``module.`` prefixes."""
    while isinstance(state, dict) and not any(isinstance(v, torch.Tensor) for v in state.values()):
        for key in WRAPPER_KEYS:
            if key in state and isinstance(state[key], dict):
                state = state[key]
                break
        else:
            raise CheckpointMismatch(f"no tensors found in checkpoint (top-level keys: {sorted(state)[:10]})")
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    for prefix in ("module.", "_orig_mod.", "encoder.", "visual.trunk."):
        if tensors and all(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix) :]: v for k, v in tensors.items()}
    return tensors


def check_fit(model: nn.Module, state: dict[str, torch.Tensor], *, ignore: tuple[str, ...] = ()) -> None:
    """Raise ``CheckpointMismatch`` naming every missing, unexpected or wrongly shaped key."""
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.startswith(ignore)]
    unexpected = [k for k in state if k not in own and not k.startswith(ignore)]
    wrong = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or wrong:
        parts = []
        for title, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong)):
            if keys:
                shown = ", ".join(keys[:12]) + (f", ... ({len(keys)} in all)" if len(keys) > 12 else "")
                parts.append(f"{title}: {shown}")
        raise CheckpointMismatch(
            "checkpoint does not fit the model (another architecture or size?)\n  " + "\n  ".join(parts)
        )


def load_strict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """``load_state_dict(strict=True)`` with a readable message when it does not fit."""
    check_fit(model, state)
    model.load_state_dict(state, strict=True)


def interpolate_pos_embed(pos_embed: torch.Tensor, new_grid: int, num_prefix_tokens: int = 1) -> torch.Tensor:
    """Resize a [1, prefix + g*g, D] position embedding to a new grid (bicubic), e.g. 224 -> 518.

    At the same grid size it returns the input unchanged, so loading never perturbs weights.
    """
    prefix, grid_tokens = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    old_grid = int(math.isqrt(grid_tokens.shape[1]))
    if old_grid * old_grid != grid_tokens.shape[1]:
        raise ValueError(f"position embedding has {grid_tokens.shape[1]} patch tokens: not a square grid")
    if old_grid == new_grid:
        return pos_embed
    dim = grid_tokens.shape[-1]
    grid = grid_tokens.reshape(1, old_grid, old_grid, dim).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(new_grid, new_grid), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, dim).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)


def load_encoder_weights(model: nn.Module, source: str | Path | dict[str, torch.Tensor]) -> list[str]:
    """Load encoder weights from a file or dict into a timm ViT; returns keys left at init.

    A classifier ``head`` or ``fc_norm`` that the checkpoint lacks (or has for another class
    count) is left at init, since pretrained encoders have none; everything else must fit.
    Position embeddings are interpolated when the model runs at another resolution.
    """
    state = read_state_dict(source) if not isinstance(source, dict) else dict(source)
    state = encoder_from_any(state)
    own = model.state_dict()
    if "pos_embed" in state and "pos_embed" in own and state["pos_embed"].shape != own["pos_embed"].shape:
        prefix = getattr(model, "num_prefix_tokens", 1)
        new_grid = int(math.isqrt(own["pos_embed"].shape[1] - prefix))
        state["pos_embed"] = interpolate_pos_embed(state["pos_embed"], new_grid, prefix)
    optional = ("head.", "fc_norm.")
    for key in [k for k in state if k.startswith(optional)]:
        if key not in own or own[key].shape != state[key].shape:
            del state[key]
    check_fit(model, state, ignore=optional)
    left = [k for k in own if k not in state]
    model.load_state_dict(state, strict=False)
    return left

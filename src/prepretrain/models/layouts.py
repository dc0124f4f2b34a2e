"""Recognising the checkpoint layouts users bring, and renaming them into prepretrain's.

prepretrain's image encoders are timm ``VisionTransformer`` state dicts; its CLIP text tower
uses torchtext >= 0.13 RoBERTa names (see :mod:`prepretrain.models.text`). Files arrive in
other layouts too:

``timm``         a timm ViT encoder or classifier (also MAE encoder-only, or MAE finetuned
                 with ``fc_norm``): ``cls_token``, ``pos_embed`` [1, 1+N, D],
                 ``patch_embed.proj.*``, ``blocks.{i}.*``, ``norm.*`` / ``fc_norm.*``, ``head.*``.
``mae_full``     timm encoder keys plus the MAE decoder (``decoder_*``, ``mask_token``).
``maws_clip``    a MAWS CLIP model: ``vision_encoder.*`` (timm) and ``text_encoder.*`` (torchtext).
``swag``         SWAG's own files (facebookresearch/SWAG ``models/vision_transformer.py``):
                 ``class_token``, ``conv_proj.*``, ``encoder.pos_embedding`` [1+N, 1, D]
                 (sequence first), ``encoder.layers.layer_{i}.{ln_1, self_attention.*, ln_2,
                 mlp.linear_1, mlp.linear_2}``, ``encoder.ln.*``, ``head.layers.head.*``.
``torchvision``  torchvision's ``VisionTransformer``: as SWAG but ``encoder.pos_embedding``
                 [1, 1+N, D], ``encoder.layers.encoder_layer_{i}``, ``mlp.0`` / ``mlp.3`` (before
                 torchvision's MLP refactor: ``mlp.linear_1`` / ``mlp.linear_2``), ``heads.head.*``.

The three ViT variants compute the same function: pre-norm blocks, LayerNorm eps 1e-6, exact
GELU, a packed q;k;v input projection with bias (``nn.MultiheadAttention``'s ``in_proj`` rows
are in the same order as timm's ``qkv``), class-token pooling. Converting between them is
therefore pure renaming plus, for SWAG, moving the sequence axis of the position embedding.
Converted tensors are the input tensors themselves (no copy, bit-exact); only a position
embedding that has to be permuted is materialised anew.
"""

from __future__ import annotations

import math
import re

import torch


class CheckpointMismatch(ValueError):
    """A checkpoint's keys or shapes do not fit the model or layout; the message lists them."""

__all__ = [
    "LAYOUTS",
    "CheckpointMismatch",
    "encoder_from_any",
    "TORCHTEXT_OLD_TO_NEW",
    "cast_floating",
    "detect_layout",
    "image_size_of",
    "swag_to_timm",
    "timm_to_torchvision",
    "upgrade_torchtext_names",
]

LAYOUTS = ("timm", "mae_full", "maws_clip", "swag", "torchvision", "unknown")

# Per-block names: torchvision/SWAG block-relative name -> timm block-relative name.
# ``mlp.linear_1`` / ``mlp.linear_2`` are SWAG's names and torchvision's before its MLP
# refactor (torchvision's ``MLPBlock._load_from_state_dict`` maps ``linear_{i+1}`` -> ``{3*i}``).
_BLOCK_TO_TIMM = {
    "ln_1.weight": "norm1.weight",
    "ln_1.bias": "norm1.bias",
    "self_attention.in_proj_weight": "attn.qkv.weight",
    "self_attention.in_proj_bias": "attn.qkv.bias",
    "self_attention.out_proj.weight": "attn.proj.weight",
    "self_attention.out_proj.bias": "attn.proj.bias",
    "ln_2.weight": "norm2.weight",
    "ln_2.bias": "norm2.bias",
    "mlp.0.weight": "mlp.fc1.weight",
    "mlp.0.bias": "mlp.fc1.bias",
    "mlp.3.weight": "mlp.fc2.weight",
    "mlp.3.bias": "mlp.fc2.bias",
    "mlp.linear_1.weight": "mlp.fc1.weight",
    "mlp.linear_1.bias": "mlp.fc1.bias",
    "mlp.linear_2.weight": "mlp.fc2.weight",
    "mlp.linear_2.bias": "mlp.fc2.bias",
}

# timm block-relative name -> torchvision's current name (the inverse, without the legacy MLP names).
_BLOCK_TO_TORCHVISION = {timm: tv for tv, timm in _BLOCK_TO_TIMM.items() if not tv.startswith("mlp.linear_")}

# Non-block tensors: torchvision/SWAG -> timm (the position embedding is handled separately).
_TOP_TO_TIMM = {
    "class_token": "cls_token",
    "conv_proj.weight": "patch_embed.proj.weight",
    "conv_proj.bias": "patch_embed.proj.bias",
    "encoder.ln.weight": "norm.weight",
    "encoder.ln.bias": "norm.bias",
    "heads.head.weight": "head.weight",  # torchvision
    "heads.head.bias": "head.bias",
    "head.layers.head.weight": "head.weight",  # SWAG
    "head.layers.head.bias": "head.bias",
}

_TOP_TO_TORCHVISION = {
    "cls_token": "class_token",
    "patch_embed.proj.weight": "conv_proj.weight",
    "patch_embed.proj.bias": "conv_proj.bias",
    "norm.weight": "encoder.ln.weight",
    "norm.bias": "encoder.ln.bias",
    "head.weight": "heads.head.weight",
    "head.bias": "heads.head.bias",
}

_PRE_LOGITS = ("heads.pre_logits.", "head.layers.pre_logits.")

_TV_BLOCK = re.compile(r"^encoder\.layers\.(?:encoder_layer_|layer_)(\d+)\.(.+)$")
_TIMM_BLOCK = re.compile(r"^blocks\.(\d+)\.(.+)$")

# Old (torchtext <= 0.12, own MultiheadSelfAttention/ResidualMLP modules, layers in a ModuleList
# at ``transformer.layers.{i}``) -> new (torchtext >= 0.13, ``torch.nn.TransformerEncoder`` at
# ``transformer.layers`` whose blocks sit at ``transformer.layers.layers.{i}``). The table follows
# ``TransformerEncoder._load_from_state_dict`` in pytorch/text ``torchtext/models/roberta/modules.py``
# (its ``better_to_old_names``, applied as ``layers.{i}.<old>`` -> ``layers.layers.{i}.<new>``).
TORCHTEXT_OLD_TO_NEW = {
    "attention.input_projection.weight": "self_attn.in_proj_weight",
    "attention.input_projection.bias": "self_attn.in_proj_bias",
    "attention.output_projection.weight": "self_attn.out_proj.weight",
    "attention.output_projection.bias": "self_attn.out_proj.bias",
    "residual_mlp.mlp.0.weight": "linear1.weight",
    "residual_mlp.mlp.0.bias": "linear1.bias",
    "residual_mlp.mlp.3.weight": "linear2.weight",
    "residual_mlp.mlp.3.bias": "linear2.bias",
    "attention_layer_norm.weight": "norm1.weight",
    "attention_layer_norm.bias": "norm1.bias",
    "final_layer_norm.weight": "norm2.weight",
    "final_layer_norm.bias": "norm2.bias",
}

_OLD_TEXT_KEY = re.compile(
    r"^(?P<stem>(?:.*\.)?)layers\.(?P<index>\d+)\.(?P<leaf>"
    + "|".join(re.escape(old) for old in TORCHTEXT_OLD_TO_NEW)
    + r")$"
)


def _has_prefix(state: dict[str, torch.Tensor], prefix: str) -> bool:
    return any(k.startswith(prefix) for k in state)


def detect_layout(state: dict[str, torch.Tensor]) -> str:
    """Name the layout of an (unwrapped) state dict: one of :data:`LAYOUTS`.

    ``timm`` covers encoders and classifiers (incl. MAE encoder-only and ``fc_norm`` finetunes);
    ``mae_full`` is a timm encoder plus the MAE decoder; ``maws_clip`` has both ``vision_encoder.``
    and ``text_encoder.`` keys; ``swag`` and ``torchvision`` are told apart by block names
    (``layer_{i}`` vs ``encoder_layer_{i}``), else by the position embedding's axis order.
    """
    if _has_prefix(state, "vision_encoder.") and _has_prefix(state, "text_encoder."):
        return "maws_clip"
    if _has_prefix(state, "conv_proj.") and "encoder.pos_embedding" in state:
        blocks = {k.split(".")[2] for k in state if k.startswith("encoder.layers.") and k.count(".") >= 3}
        if any(re.fullmatch(r"encoder_layer_\d+", b) for b in blocks):
            return "torchvision"
        if any(re.fullmatch(r"layer_\d+", b) for b in blocks):
            return "swag"
        pos = state["encoder.pos_embedding"]
        return "swag" if pos.ndim == 3 and pos.shape[1] == 1 and pos.shape[0] > 1 else "torchvision"
    if _has_prefix(state, "patch_embed.") and _has_prefix(state, "blocks."):
        if any(k.startswith("decoder_") or k == "mask_token" for k in state):
            return "mae_full"
        return "timm"
    return "unknown"


def swag_to_timm(state: dict[str, torch.Tensor], *, drop_head: bool = False) -> dict[str, torch.Tensor]:
    """A SWAG or torchvision ViT state dict renamed to timm's ``VisionTransformer`` layout.

    Exact: every tensor is carried over unchanged (``in_proj`` and ``qkv`` share the q;k;v row
    order); a sequence-first ``[1+N, 1, D]`` position embedding becomes ``[1, 1+N, D]``.
    ``drop_head`` leaves out the classifier (``head.*`` and any ``pre_logits``). Raises
    :class:`CheckpointMismatch` for tensors timm's plain ViT has no place for, such as the
    ``pre_logits`` representation layer or a convolutional stem.
    """
    out: dict[str, torch.Tensor] = {}
    taken: dict[str, str] = {}
    unmapped: list[str] = []
    pre_logits: list[str] = []
    for key, value in state.items():
        if key.startswith(_PRE_LOGITS):
            if not drop_head:
                pre_logits.append(key)
            continue
        if key == "encoder.pos_embedding":
            if value.ndim != 3:
                raise CheckpointMismatch(f"encoder.pos_embedding has shape {tuple(value.shape)}; expected 3 dims")
            if value.shape[1] == 1 and value.shape[0] != 1:  # SWAG: (seq, 1, dim)
                value = value.permute(1, 0, 2).contiguous()
            _put(out, "pos_embed", key, value, taken)
            continue
        if key in _TOP_TO_TIMM:
            new = _TOP_TO_TIMM[key]
            if drop_head and new.startswith("head."):
                continue
            _put(out, new, key, value, taken)
            continue
        match = _TV_BLOCK.match(key)
        if match and match.group(2) in _BLOCK_TO_TIMM:
            _put(out, f"blocks.{match.group(1)}.{_BLOCK_TO_TIMM[match.group(2)]}", key, value, taken)
            continue
        unmapped.append(key)
    if pre_logits:
        raise CheckpointMismatch(
            f"{', '.join(pre_logits)}: a pre-logits (representation) layer has no counterpart in timm's "
            "ViT without pre-logits; convert with drop_head=True to keep only the encoder"
        )
    if unmapped:
        raise CheckpointMismatch(f"no timm ViT counterpart for {len(unmapped)} tensors: {', '.join(unmapped[:10])}")
    return out


def timm_to_torchvision(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A timm ViT state dict renamed to torchvision's current ``VisionTransformer`` names.

    The inverse of :func:`swag_to_timm` for torchvision's layout (``[1, 1+N, D]`` position
    embedding, ``encoder_layer_{i}``, ``mlp.0`` / ``mlp.3``, ``heads.head``), so timm ->
    torchvision -> timm is bit-exact. Tensors torchvision's ViT has no place for (``fc_norm``,
    register tokens, layer scale, qk-norm, an MAE decoder) raise :class:`CheckpointMismatch`.
    """
    out: dict[str, torch.Tensor] = {}
    taken: dict[str, str] = {}
    unmapped: list[str] = []
    for key, value in state.items():
        if key == "pos_embed":
            _put(out, "encoder.pos_embedding", key, value, taken)
            continue
        if key in _TOP_TO_TORCHVISION:
            _put(out, _TOP_TO_TORCHVISION[key], key, value, taken)
            continue
        match = _TIMM_BLOCK.match(key)
        if match and match.group(2) in _BLOCK_TO_TORCHVISION:
            new = f"encoder.layers.encoder_layer_{match.group(1)}.{_BLOCK_TO_TORCHVISION[match.group(2)]}"
            _put(out, new, key, value, taken)
            continue
        unmapped.append(key)
    if unmapped:
        raise CheckpointMismatch(
            f"no torchvision ViT counterpart for {len(unmapped)} tensors: {', '.join(unmapped[:10])}"
        )
    return out


def _put(out: dict[str, torch.Tensor], new: str, old: str, value: torch.Tensor, taken: dict[str, str]) -> None:
    """Store ``value`` under ``new``; two source names landing on one target would lose a tensor."""
    if new in out:
        raise CheckpointMismatch(f"{taken[new]} and {old} both map to {new}")
    out[new] = value
    taken[new] = old


def upgrade_torchtext_names(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """Rename pre-0.13 torchtext RoBERTa block names to the current ones; everything else unchanged.

    ``{prefix}...layers.{i}.attention.input_projection.weight`` becomes
    ``{prefix}...layers.layers.{i}.self_attn.in_proj_weight`` and so on (:data:`TORCHTEXT_OLD_TO_NEW`).
    Only keys under ``prefix`` are considered (``"text_encoder."`` for a MAWS CLIP file; the
    default ``""`` looks everywhere). A state dict already in the new names comes back equal.
    Key order is kept; tensors are not copied.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        new_key = key
        if key.startswith(prefix):
            match = _OLD_TEXT_KEY.match(key[len(prefix) :])
            if match:
                new_leaf = TORCHTEXT_OLD_TO_NEW[match.group("leaf")]
                new_key = f"{prefix}{match.group('stem')}layers.layers.{match.group('index')}.{new_leaf}"
                if new_key in state:
                    raise CheckpointMismatch(f"both {key} (old torchtext name) and {new_key} (new name) are present")
        if new_key in out:
            raise CheckpointMismatch(f"two tensors map to {new_key}")
        out[new_key] = value
    return out


def cast_floating(state: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Floating-point tensors cast to ``dtype`` (e.g. an fp16/bf16 file for an fp32 model); others untouched."""
    return {k: v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in state.items()}


def image_size_of(state: dict[str, torch.Tensor], patch_size: int | None = None) -> int:
    """The square input resolution a timm-layout ``pos_embed`` was trained at: sqrt(N) * patch.

    N excludes the class (and register) tokens when their positions are stored in ``pos_embed``
    (timm's default; ``no_embed_class`` models store only the N patch positions). ``patch_size``
    defaults to the kernel size of ``patch_embed.proj.weight``.
    """
    if "pos_embed" not in state:
        raise CheckpointMismatch("no pos_embed in the state dict (is it a timm-layout ViT?)")
    pos = state["pos_embed"]
    if patch_size is None:
        if "patch_embed.proj.weight" not in state:
            raise CheckpointMismatch("patch_size not given and no patch_embed.proj.weight to read it from")
        patch_size = int(state["patch_embed.proj.weight"].shape[-1])
    length = int(pos.shape[-2]) if pos.ndim >= 2 else 0
    prefix = (1 if "cls_token" in state else 0) + (int(state["reg_token"].shape[1]) if "reg_token" in state else 0)
    for tokens in (length - prefix, length):
        side = math.isqrt(max(tokens, 0))
        if tokens > 0 and side * side == tokens:
            return side * int(patch_size)
    raise CheckpointMismatch(f"pos_embed of shape {tuple(pos.shape)} is not a square grid of patches")


def encoder_from_any(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The timm-ViT encoder (and head, if any) of any supported state dict: timm/MAWS/MAE (the
    decoder dropped), a MAWS-CLIP model's image tower, SWAG and torchvision files (renamed)."""
    if _has_prefix(state, "vision_encoder."):
        return {k[len("vision_encoder.") :]: v for k, v in state.items() if k.startswith("vision_encoder.")}
    if detect_layout(state) in ("swag", "torchvision"):
        return swag_to_timm(state)
    return {k: v for k, v in state.items() if not k.startswith(("decoder_", "mask_token"))}

"""The ViT family of the MAWS paper, built on timm's ``VisionTransformer``.

Why timm: its state-dict layout is the format the field shares (MAWS and MAE checkpoints, timm
hubs), so building on it makes every official encoder checkpoint load strictly. This module only
adds the registry of named shapes (MAWS, Singh et al. 2023, arXiv 2303.13496, its model table) and
small sizes for CPU work on 32-64 px images.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import Attention as TimmAttention
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ..config import ConfigError
from .layouts import CheckpointMismatch, image_size_of


@dataclass(frozen=True)
class ViTShape:
    """Everything that fixes a ViT's parameter shapes (plus the resolution it was made for)."""

    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_dim: int
    img_size: int = 224

    @property
    def mlp_ratio(self) -> float:
        return self.mlp_dim / self.embed_dim

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2


VIT_SHAPES: dict[str, ViTShape] = {
    # The paper's sizes (MAWS, Singh et al. 2023, arXiv 2303.13496; facebookresearch/maws maws/model_builder.py).
    "vit_b16": ViTShape(16, 768, 12, 12, 3072),
    "vit_l16": ViTShape(16, 1024, 24, 16, 4096),
    "vit_h14": ViTShape(14, 1280, 32, 16, 5120),
    "vit_2b14": ViTShape(14, 2560, 24, 32, 10240),
    "vit_6.5b14": ViTShape(14, 4096, 32, 32, 16384),
    # Small sizes at 224 px (DeiT shapes).
    "vit_ti16": ViTShape(16, 192, 12, 3, 768),
    "vit_s16": ViTShape(16, 384, 12, 6, 1536),
    # CPU sizes for 64 px (patch 8) and 32 px (patch 4) images.
    "vit_ti8": ViTShape(8, 192, 12, 3, 768, img_size=64),
    "vit_s8": ViTShape(8, 384, 12, 6, 1536, img_size=64),
    "vit_ti4": ViTShape(4, 192, 12, 3, 768, img_size=32),
    "vit_s4": ViTShape(4, 384, 12, 6, 1536, img_size=32),
    # The CPU demo encoder: shallow and narrow so a 2-core laptop trains it in minutes.
    "vit_micro4": ViTShape(4, 128, 6, 4, 512, img_size=32),
}

# Names users may also type (timm-like spellings).
ALIASES = {
    "vit_base_patch16": "vit_b16",
    "vit_large_patch16": "vit_l16",
    "vit_huge_patch14": "vit_h14",
    "vit_6p5b14": "vit_6.5b14",
}

# Which keys of ``create_vit``'s overrides change the parameter shapes.
_SHAPE_KEYS = {"patch_size", "embed_dim", "depth", "num_heads", "mlp_dim", "img_size"}


def resolve_name(name: str) -> str:
    key = ALIASES.get(name, name)
    if key not in VIT_SHAPES:
        raise ValueError(f"unknown model '{name}'; known: {', '.join(sorted(VIT_SHAPES))}")
    return key


def vit_shape(name: str, **overrides: Any) -> ViTShape:
    """The shape of a named model after overrides such as ``img_size=64`` or ``depth=4``."""
    shape = VIT_SHAPES[resolve_name(name)]
    shape_overrides = {k: v for k, v in overrides.items() if k in _SHAPE_KEYS and v is not None}
    if "embed_dim" in shape_overrides and "mlp_dim" not in shape_overrides:
        shape_overrides["mlp_dim"] = int(shape_overrides["embed_dim"] * shape.mlp_ratio)
    return replace(shape, **shape_overrides)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
           dropout_p: float = 0.0, is_causal: bool = False) -> torch.Tensor:
    """``F.scaled_dot_product_attention``, except that bf16/fp16 on the CPU runs in fp32: there the
    half-precision flash kernel is 1.4-3x slower than the fp32 one at ViT sequence lengths
    (measured on AVX512-BF16 cores: 50 tokens x 64 dims 19 vs 6 ms, 197 x 32 65 vs 44 ms, fwd+bwd
    at batch 8), while the matmuls around it gain from bf16. Same result up to rounding."""
    if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
        mask = attn_mask.float() if attn_mask is not None and attn_mask.is_floating_point() else attn_mask
        out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, dropout_p=dropout_p,
                                             is_causal=is_causal)
        return out.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal)


class Attention(TimmAttention):
    """timm's attention (same parameters and state dict) computed with :func:`attend`."""

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if not self.fused_attn or self.gate is not None:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        batch, tokens, _ = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        x = attend(q, k, v, attn_mask, self.attn_drop.p if self.training else 0.0, is_causal)
        x = x.transpose(1, 2).reshape(batch, tokens, self.attn_dim)
        return self.proj_drop(self.proj(self.norm(x)))


def with_timm_attention(model: nn.Module) -> nn.Module:
    """``model`` with timm's own attention forward in every block (the reference setup that
    ``prepretrain bench`` compares against); parameters and state dict are unchanged."""
    for module in model.modules():
        if isinstance(module, Attention):
            module.__class__ = TimmAttention
    return model


def create_vit(
    name: str,
    *,
    num_classes: int = 0,
    global_pool: str = "token",
    drop_path_rate: float = 0.0,
    device: str | torch.device | None = None,
    **overrides: Any,
) -> VisionTransformer:
    """Build a named ViT as a timm ``VisionTransformer``.

    Defaults follow MAWS: CLS pooling, no ``fc_norm``, no head (``num_classes=0``) so the
    state dict is exactly the released encoder's. ``global_pool="avg"`` gives the MAE-style
    finetuning model (average of patch tokens + ``fc_norm``). ``device="meta"`` builds the
    6.5B model without allocating memory. Shape overrides: ``img_size``, ``patch_size``,
    ``embed_dim``, ``depth``, ``num_heads``, ``mlp_dim``.
    """
    shape = vit_shape(name, **overrides)
    unknown = set(overrides) - _SHAPE_KEYS
    if unknown:
        raise TypeError(f"create_vit got unknown overrides: {sorted(unknown)}")
    kwargs = dict(
        img_size=shape.img_size,
        patch_size=shape.patch_size,
        embed_dim=shape.embed_dim,
        depth=shape.depth,
        num_heads=shape.num_heads,
        mlp_ratio=shape.mlp_ratio,
        qkv_bias=True,
        num_classes=num_classes,
        global_pool=global_pool,
        fc_norm=global_pool == "avg",
        class_token=True,
        drop_path_rate=drop_path_rate,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        act_layer=nn.GELU,
        attn_layer=Attention,
        dynamic_img_size=True,
    )
    with torch.device(device) if device is not None else nullcontext():
        model = VisionTransformer(**kwargs)
    model.prepretrain_name = resolve_name(name)  # type: ignore[attr-defined]
    model.prepretrain_shape = shape  # type: ignore[attr-defined]
    return model


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def shape_dict(name: str, **overrides: Any) -> dict[str, Any]:
    return asdict(vit_shape(name, **overrides))


def forward_flops(shape: ViTShape, tokens: int | None = None, img_size: int | None = None) -> float:
    """Forward FLOPs for one image: L * (24 N d^2 + 4 N^2 d) + patch embedding
    (per token and block, 2 FLOPs a multiply-add: qkv 3d^2 + proj d^2 + MLP 8d^2 = 12 d^2 multiply-adds,
    and 2 N d for the attention scores and the weighted sum).

    ``24 N d^2`` assumes an MLP ratio of 4; we count the MLP from its actual width.
    """
    size = img_size or shape.img_size
    patches = (size // shape.patch_size) ** 2
    n = tokens if tokens is not None else patches + 1
    d = shape.embed_dim
    per_block = 2 * n * (4 * d * d + 2 * d * shape.mlp_dim) + 4 * n * n * d
    patch_embed = 2 * patches * (shape.patch_size**2 * 3) * d
    return shape.depth * per_block + patch_embed


def check_model_and_size(model: str, image_size: int) -> str:
    """The registry name of ``model``; a ConfigError naming ``model`` or ``image_size`` when the
    architecture is unknown or the resolution is not a whole number of patches."""
    try:
        name = resolve_name(model)
    except ValueError as error:
        raise ConfigError("model", str(error)) from None
    patch = VIT_SHAPES[name].patch_size
    if image_size % patch:
        raise ConfigError("image_size", f"{image_size} is not a multiple of patch size {patch}")
    return name


def vision_name_from_state(vision: dict[str, torch.Tensor]) -> tuple[str, int, int]:
    """(registry name, depth, image size) of a timm ViT state dict, matched by its shapes."""
    patch = int(vision["patch_embed.proj.weight"].shape[-1])
    width = int(vision["patch_embed.proj.weight"].shape[0])
    depth = 1 + max(int(k.split(".")[1]) for k in vision if k.startswith("blocks."))
    mlp = int(vision["blocks.0.mlp.fc1.weight"].shape[0])
    matches = [n for n, s in VIT_SHAPES.items() if (s.patch_size, s.embed_dim, s.mlp_dim) == (patch, width, mlp)]
    if not matches:
        raise CheckpointMismatch(f"no registered ViT has patch {patch}, width {width}, MLP {mlp}")
    exact = [n for n in matches if VIT_SHAPES[n].depth == depth]
    return (exact or matches)[0], depth, image_size_of(vision, patch)

"""ViTDet: a plain, image-pretrained ViT as a detection backbone (Li et al., ECCV 2022).

Why this shape: the MAWS paper's detection results use ViTDet's backbone in (Cascade) Mask
R-CNN, so the pretrained encoder is reused as it is (no FPN inside the ViT, no hierarchical
stages). What changes relative to the classification encoder:

* the class token is dropped and the absolute position embedding (its patch part) is
  interpolated (bicubic) to the detection grid, e.g. 14x14 -> 64x64 for 1024 px at patch 16;
* most blocks attend within non-overlapping windows (``window_size`` tokens square; the token
  map is zero-padded to a multiple of the window, as ViTDet does), a few ("global blocks",
  by default four evenly spaced ones ending at the last block: 2, 5, 8, 11 for ViT-B) attend
  over the whole map, so cost grows linearly with the image area except in those few blocks;
* optional decomposed relative position biases (ViTDet's ``use_rel_pos``), zero-initialised so
  a pretrained model starts out computing exactly what it did;
* no final ``norm``: the last block's map feeds the simple feature pyramid, which builds
  strides 1/4, 1/8 (transposed convolutions), 1/16 (identity) and 1/32 (max-pool) of the
  image from the single 1/16 map, each followed by a 1x1 and a 3x3 convolution with channel
  LayerNorm, plus a stride-2 max-pool of the coarsest level (the "pool" level the RPN uses,
  as torchvision's FPN and detectron2's LastLevelMaxPool give).

One optional addition to ViTDet, ``feature_norm="batch"`` (off by default): a
BatchNorm without affine parameters between the last block and the pyramid, as MAE's linear
probe puts one before its classifier. Why: an MAE encoder's last-block map is large (std ~5
for the CPU demo's, ~0.6 for a random init) and dominated by a per-channel offset shared by all
tokens (about half its energy, against an eighth for a random init). A freshly initialised
pyramid (1x1 conv, then LayerNorm over the channels of each token) sees mostly that offset, and
in a short schedule the frozen MAE map gave almost no box AP (0.04, against 0.91 for a frozen
random map) until each channel was standardised (1.5); docs/detection.md has the measurements.
``"none"`` is ViTDet's original (the map goes to the pyramid as it is).

"1/16" is the patch stride: for a patch-4 CPU model the levels are 1, 1/2, 1/4, 1/8, 1/16.
The blocks keep the timm parameter names (``blocks.{i}.attn.qkv.weight``, ``patch_embed.*``,
``pos_embed``) so ``train.optim.layer_decay_scale`` gives ViTDet's layer-wise lr decay with no
name mapping, and a loaded encoder tensor can be compared one to one.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.models.vision_transformer import VisionTransformer
from torch import nn

FEATURE_NORMS = ("none", "batch")  # what sits between the last block and the pyramid (ViTDet: none)


def default_global_blocks(depth: int, count: int = 4) -> list[int]:
    """ViTDet's global-attention blocks: ``count`` evenly spaced, the last one last.

    depth 12 -> 2, 5, 8, 11 (ViT-B); 24 -> 5, 11, 17, 23 (ViT-L); 32 -> 7, 15, 23, 31 (ViT-H),
    which are ViTDet's published choices."""
    count = min(count, depth)
    return sorted({(k + 1) * depth // count - 1 for k in range(count)})


def parse_global_blocks(spec: str, depth: int) -> list[int]:
    """``auto`` (ViTDet's spacing), ``all``, ``none``, or comma-separated block indices."""
    text = str(spec).strip().lower()
    if text == "auto":
        return default_global_blocks(depth)
    if text == "all":
        return list(range(depth))
    if text in ("none", ""):
        return []
    try:
        blocks = sorted({int(part) for part in text.replace(";", ",").split(",") if part.strip()})
    except ValueError:
        raise ValueError(f"expected auto, all, none or block indices like 2,5,8,11; got '{spec}'") from None
    bad = [b for b in blocks if not 0 <= b < depth]
    if bad:
        raise ValueError(f"block indices {bad} are outside 0..{depth - 1} (the encoder has {depth} blocks)")
    return blocks


# ------------------------------------------------------------------------------ attention


def window_partition(x: torch.Tensor, window: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """(B, H, W, C) -> (B * windows, window * window, C), zero-padding H and W up to multiples of ``window``."""
    batch, height, width, channels = x.shape
    pad_h, pad_w = (window - height % window) % window, (window - width % window) % window
    if pad_h or pad_w:
        x = F.pad(x, (0, 0, 0, pad_w, 0, pad_h))
    padded_h, padded_w = height + pad_h, width + pad_w
    x = x.view(batch, padded_h // window, window, padded_w // window, window, channels)
    windows = x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, channels)
    return windows, (padded_h, padded_w)


def window_unpartition(windows: torch.Tensor, window: int, padded: tuple[int, int],
                       size: tuple[int, int]) -> torch.Tensor:
    """The inverse of :func:`window_partition`, cropping the padding away: (B, H, W, C)."""
    padded_h, padded_w = padded
    channels = windows.shape[-1]
    batch = windows.shape[0] // ((padded_h // window) * (padded_w // window))
    x = windows.view(batch, padded_h // window, padded_w // window, window, window, channels)
    x = x.permute(0, 1, 3, 2, 4, 5).reshape(batch, padded_h, padded_w, channels)
    return x[:, : size[0], : size[1]].contiguous()


def relative_positions(q_size: int, k_size: int, table: torch.Tensor) -> torch.Tensor:
    """Rows of a relative-position table for every (query, key) offset along one axis: (q, k, dim).

    The table (2 * size - 1 rows) is linearly resized when the map size differs from the one
    it was made for, as in ViTDet/MViTv2."""
    rows = int(2 * max(q_size, k_size) - 1)
    if table.shape[0] != rows:
        resized = F.interpolate(table.t().unsqueeze(0), size=rows, mode="linear", align_corners=False)
        table = resized.squeeze(0).t()
    q_coords = torch.arange(q_size, device=table.device)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size, device=table.device)[None, :] * max(q_size / k_size, 1.0)
    offsets = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return table[offsets.long()]


def decomposed_rel_pos_bias(q: torch.Tensor, table_h: torch.Tensor, table_w: torch.Tensor,
                            size: tuple[int, int]) -> torch.Tensor:
    """ViTDet's decomposed relative position bias for queries ``q`` (B, heads, H*W, dim): (B, heads, N, N)."""
    height, width = size
    rel_h = relative_positions(height, height, table_h)  # (H, H, dim)
    rel_w = relative_positions(width, width, table_w)
    batch, heads, _, dim = q.shape
    grid_q = q.reshape(batch, heads, height, width, dim)
    bias_h = torch.einsum("bnhwc,hkc->bnhwk", grid_q, rel_h)
    bias_w = torch.einsum("bnhwc,wkc->bnhwk", grid_q, rel_w)
    bias = bias_h[..., :, None] + bias_w[..., None, :]  # (B, heads, H, W, H, W)
    return bias.reshape(batch, heads, height * width, height * width)


class ViTDetBlock(nn.Module):
    """A timm ``Block`` (its own modules and weights, same names) run on a 2-D token map with
    window or global attention and, optionally, relative position biases."""

    def __init__(self, block: nn.Module, window_size: int, rel_pos_size: int | None = None):
        super().__init__()
        self.window_size = window_size  # 0 = global attention
        self.norm1, self.attn, self.ls1, self.drop_path1 = block.norm1, block.attn, block.ls1, block.drop_path1
        self.norm2, self.mlp, self.ls2, self.drop_path2 = block.norm2, block.mlp, block.ls2, block.drop_path2
        self.rel_pos_h: nn.Parameter | None = None
        self.rel_pos_w: nn.Parameter | None = None
        if rel_pos_size:
            head_dim = self.attn.head_dim
            self.rel_pos_h = nn.Parameter(torch.zeros(2 * rel_pos_size - 1, head_dim))
            self.rel_pos_w = nn.Parameter(torch.zeros(2 * rel_pos_size - 1, head_dim))

    def attention(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """Self-attention over each sequence of ``x`` (B, N, C) laid out as an ``size`` grid."""
        attn = self.attn
        batch, tokens, _ = x.shape
        qkv = attn.qkv(x).reshape(batch, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        bias = None
        if self.rel_pos_h is not None:
            bias = decomposed_rel_pos_bias(q, self.rel_pos_h, self.rel_pos_w, size).to(q.dtype)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias,
                                             dropout_p=attn.attn_drop.p if self.training else 0.0)
        out = out.transpose(1, 2).reshape(batch, tokens, -1)
        return attn.proj_drop(attn.proj(attn.norm(out)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: (B, H, W, C) -> (B, H, W, C)."""
        batch, height, width, channels = x.shape
        y = self.norm1(x)
        if self.window_size:
            windows, padded = window_partition(y, self.window_size)
            windows = self.attention(windows, (self.window_size, self.window_size))
            y = window_unpartition(windows, self.window_size, padded, (height, width))
        else:
            y = self.attention(y.reshape(batch, height * width, channels), (height, width))
            y = y.view(batch, height, width, channels)
        x = x + self.drop_path1(self.ls1(y))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


# ------------------------------------------------------------------------------- pyramid


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an (N, C, H, W) map (ViTDet's "LN" norm for convolutions)."""

    def __init__(self, num_channels: int, eps: float = 1e-6):
        super().__init__(num_channels, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _conv_ln(in_channels: int, out_channels: int, kernel: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel, padding=kernel // 2, bias=False),
                         LayerNorm2d(out_channels))


class SimpleFeaturePyramid(nn.Module):
    """ViTDet's simple feature pyramid: scales (4, 2, 1, 0.5) of one map, then 1x1 + 3x3 conv with LN."""

    def __init__(self, dim: int, out_channels: int = 256, scale_factors: tuple[float, ...] = (4.0, 2.0, 1.0, 0.5)):
        super().__init__()
        self.scale_factors = tuple(scale_factors)
        self.stages = nn.ModuleList()
        for scale in self.scale_factors:
            if scale == 4.0:
                layers: list[nn.Module] = [nn.ConvTranspose2d(dim, dim // 2, 2, stride=2), LayerNorm2d(dim // 2),
                                           nn.GELU(), nn.ConvTranspose2d(dim // 2, dim // 4, 2, stride=2)]
                width = dim // 4
            elif scale == 2.0:
                layers, width = [nn.ConvTranspose2d(dim, dim // 2, 2, stride=2)], dim // 2
            elif scale == 1.0:
                layers, width = [], dim
            elif scale == 0.5:
                layers, width = [nn.MaxPool2d(2, stride=2)], dim
            else:
                raise ValueError(f"scale factor {scale} is not one of ViTDet's 4, 2, 1, 0.5")
            layers += [_conv_ln(width, out_channels, 1), _conv_ln(out_channels, out_channels, 3)]
            self.stages.append(nn.Sequential(*layers))

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        """(B, C, H, W) -> {"0": 4x, "1": 2x, "2": 1x, "3": 0.5x, "pool": 0.25x} (torchvision FPN names)."""
        levels = OrderedDict((str(i), stage(x)) for i, stage in enumerate(self.stages))
        levels["pool"] = F.max_pool2d(levels[str(len(self.stages) - 1)], kernel_size=1, stride=2)
        return levels


# ------------------------------------------------------------------------------ backbone


class ViTDetBackbone(nn.Module):
    """A timm ``VisionTransformer`` (weights already loaded) as a multi-scale detection backbone.

    ``out_channels`` (256) and the level names ("0".."3", "pool") are what torchvision's
    ``MaskRCNN`` and ``MultiScaleRoIAlign`` expect from a backbone.
    """

    def __init__(self, encoder: VisionTransformer, window_size: int = 14, global_blocks: list[int] | None = None,
                 rel_pos: bool = False, out_channels: int = 256,
                 scale_factors: tuple[float, ...] = (4.0, 2.0, 1.0, 0.5), feature_norm: str = "none"):
        super().__init__()
        if feature_norm not in FEATURE_NORMS:
            raise ValueError(f"feature_norm must be one of {', '.join(FEATURE_NORMS)}; got '{feature_norm}'")
        depth = len(encoder.blocks)
        global_blocks = default_global_blocks(depth) if global_blocks is None else list(global_blocks)
        self.patch_size = int(encoder.patch_embed.patch_size[0])
        grid = encoder.patch_embed.grid_size
        self.patch_embed = encoder.patch_embed
        prefix = 0 if getattr(encoder, "no_embed_class", False) else getattr(encoder, "num_prefix_tokens", 1)
        patch_pos = encoder.pos_embed.detach()[:, prefix:]
        self.pos_embed = nn.Parameter(patch_pos.reshape(1, grid[0], grid[1], -1).clone())  # (1, H, W, C)
        self.norm_pre = encoder.norm_pre
        self.grad_checkpointing = False
        self.window_size = window_size
        self.global_blocks = sorted(global_blocks)
        self.blocks = nn.ModuleList()
        for index, block in enumerate(encoder.blocks):
            is_global = index in global_blocks
            rel_size = (max(grid) if is_global else window_size) if rel_pos else None
            self.blocks.append(ViTDetBlock(block, 0 if is_global else window_size, rel_size))
        self.embed_dim = int(encoder.embed_dim)
        self.out_channels = out_channels
        # "batch": standardise each channel of the last block's map before the (freshly initialised)
        # pyramid, as MAE's linear probe puts a BatchNorm without affine before its head. See the module doc.
        self.feature_norm = nn.BatchNorm2d(self.embed_dim, eps=1e-6, affine=False) if feature_norm == "batch" \
            else nn.Identity()
        self.pyramid = SimpleFeaturePyramid(self.embed_dim, out_channels, scale_factors)
        self.strides = [self.patch_size / s for s in scale_factors] + [self.patch_size / scale_factors[-1] * 2]

    def position_embedding(self, height: int, width: int) -> torch.Tensor:
        """The absolute position embedding for an (height, width) token map: (1, H, W, C)."""
        pos = self.pos_embed
        if pos.shape[1:3] == (height, width):
            return pos
        grid = F.interpolate(pos.permute(0, 3, 1, 2).float(), size=(height, width), mode="bicubic",
                             align_corners=False)
        return grid.permute(0, 2, 3, 1).to(pos.dtype)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The last block's token map (B, C, H/patch, W/patch): what the pyramid is built from."""
        x = self.patch_embed(images)  # (B, H, W, C): timm's dynamic-size patch embedding is NHWC
        if x.ndim == 3:  # a fixed-size patch embedding gives (B, N, C)
            side = images.shape[-2] // self.patch_size, images.shape[-1] // self.patch_size
            x = x.view(x.shape[0], side[0], side[1], -1)
        x = self.norm_pre(x + self.position_embedding(x.shape[1], x.shape[2]))
        for block in self.blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x.permute(0, 3, 1, 2)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass (ViTDet does for ViT-L/H at 1024 px)."""
        self.grad_checkpointing = enable

    def forward(self, images: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return self.pyramid(self.feature_norm(self.features(images)))


def anchor_sizes(strides: list[float], ratio: float = 8.0) -> tuple[tuple[int, ...], ...]:
    """One anchor size per level, ``ratio`` x its stride: (32, 64, 128, 256, 512) for strides 4..64
    (torchvision's and detectron2's FPN defaults), scaled down for small-patch CPU models."""
    return tuple((max(1, int(round(ratio * stride))),) for stride in strides)


def vitdet_flops(depth: int, dim: int, mlp_dim: int, grid: tuple[int, int], window_size: int,
                 global_blocks: list[int]) -> float:
    """Forward FLOPs of the ViT part (matmuls only): window blocks attend over window^2 tokens."""
    tokens = grid[0] * grid[1]
    total = 0.0
    for index in range(depth):
        attend = tokens if (index in global_blocks or not window_size) else window_size * window_size
        padded = tokens if index in global_blocks or not window_size else \
            math.ceil(grid[0] / window_size) * math.ceil(grid[1] / window_size) * window_size * window_size
        total += 2 * tokens * (4 * dim * dim + 2 * dim * mlp_dim) + 4 * padded * attend * dim
    return total

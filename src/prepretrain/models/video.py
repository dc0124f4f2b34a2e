"""A video ViT inflated from an image ViT: tubelet patches, separable space-time positions.

Why inflate rather than design a video architecture: the MAWS paper transfers its *image*
encoders to video (Kinetics-400, Something-Something v2), so the video model must start
from exactly the image model's function. :class:`VideoViT` takes over every module of a
timm ``VisionTransformer`` (blocks, norms, CLS token, head) and changes only the input side:

* **Tubelet embedding**: a ``Conv3d`` over ``tubelet_size`` frames x ``patch`` x ``patch``,
  inflated from the 2D patch embedding by *averaging* (I3D): each of the ``t`` temporal
  slices is ``W2d / t``. A static clip then gives ``sum_t W2d / t * x = W2d * x``: the image
  embedding, exactly. (Central-frame inflation is exact too, but ignores all but one frame of
  each tubelet at the start; averaging sees every frame from the first step.)
* **Separable space-time position embeddings**: the image ``pos_embed`` (spatial, with its
  CLS slot; interpolated to the grid by the resolver) plus a temporal embedding of one
  vector per tubelet slot, initialised to zero.
* **Relative position bias** (``rel_pos=True``, optional): per block and head, decomposed
  tables over the time, row and column offsets between tokens (``B_t[dt] + B_h[dh] +
  B_w[dw]``), added to the attention logits; zero-initialised, so inflation stays exact. This
  is a query-independent variant; the MViTv2-style query-dependent form the paper cites is not
  reproduced.

Why the static-clip property holds through the blocks: a static clip's patch tokens are the
image tokens repeated ``T'`` times with the same embeddings, and attention over keys that are
each repeated ``T'`` times equals attention over the unique keys (every softmax weight is
split evenly between identical copies). The CLS token is not repeated, so its key would lose
weight ``T'``-fold; the blocks therefore add ``log T'`` to the attention logits of the prefix
(CLS) key (a constant, :meth:`VideoViT.attention_bias`), which counts it ``T'`` times. Then the
CLS token and every patch token come out equal to the image model's, and so do ``token`` and
``avg`` pooling (``tests/test_video.py`` checks it to 1e-5). With one tubelet slot
(``num_frames == tubelet_size``, e.g. the single-frame baseline) there is no bias at all.

State dict names follow timm's (``patch_embed.proj.weight`` is 5-D, ``temporal.pos_embed``,
``blocks.i.*``), so ``train.optim.layer_id`` gives layer-wise lr decay unchanged (the temporal
embedding is mapped to depth 0 by :func:`video_layer_name`).
"""

from __future__ import annotations

import inspect
import math

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint


def inflate_patch_weight(weight: torch.Tensor, tubelet_size: int, motion_init: float = 0.0,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """A Conv2d weight (D, C, p, p) as a Conv3d weight (D, C, t, p, p) by average inflation (I3D).

    ``motion_init`` > 0 adds a random part that sums to zero over the ``t`` frames (std
    ``motion_init`` x the weight's std): a static clip still gives exactly the 2D embedding, but
    the filters see change between frames from the first step (see :class:`TubeletEmbed`)."""
    inflated = weight.unsqueeze(2).repeat(1, 1, tubelet_size, 1, 1) / tubelet_size
    if motion_init > 0 and tubelet_size > 1:
        noise = torch.randn(inflated.shape, generator=generator, dtype=torch.float32).to(inflated)
        noise = noise - noise.mean(dim=2, keepdim=True)
        inflated = inflated + noise * (motion_init * float(weight.float().std()))
    return inflated


class TubeletEmbed(nn.Module):
    """(B, C, T, H, W) clips -> (B, T', H', W', D) tokens with a Conv3d over tubelets.

    Why ``motion_init``: pure average inflation makes the whole model blind to the order of
    frames (each tubelet sees the sum of its frames; the temporal embedding starts at zero). On a
    task decided by the direction of motion that start is a saddle point: reversing time maps
    every class onto another, so the gradient toward any order-sensitive weight is zero on
    average and a from-scratch run sat at chance for hundreds of steps. A zero-sum temporal part
    (a small temporal-difference filter) breaks the symmetry without changing static content.
    """

    def __init__(self, proj2d: nn.Conv2d, tubelet_size: int, motion_init: float = 0.0,
                 generator: torch.Generator | None = None):
        super().__init__()
        patch = proj2d.kernel_size
        self.tubelet_size = tubelet_size
        self.patch_size = (int(patch[0]), int(patch[1]))
        self.proj = nn.Conv3d(proj2d.in_channels, proj2d.out_channels, kernel_size=(tubelet_size, *patch),
                              stride=(tubelet_size, *patch), bias=proj2d.bias is not None)
        with torch.no_grad():
            self.proj.weight.copy_(inflate_patch_weight(proj2d.weight.detach(), tubelet_size, motion_init, generator))
            if proj2d.bias is not None:
                self.proj.bias.copy_(proj2d.bias.detach())

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        return self.proj(clips).permute(0, 2, 3, 4, 1)


class TemporalEmbedding(nn.Module):
    """One learned vector per tubelet slot, added to every spatial position (zero at the start).

    A module of its own so the parameter is named ``temporal.pos_embed``: optimizers then treat
    it like the other position embeddings (no weight decay)."""

    def __init__(self, slots: int, dim: int):
        super().__init__()
        self.pos_embed = nn.Parameter(torch.zeros(1, slots, 1, dim))


class RelativePositionBias(nn.Module):
    """Decomposed space-time relative position bias of one attention block, per head.

    ``bias[h, i, j] = t[h, dt] + r[h, dh] + c[h, dw]`` for the offsets between patch tokens i and
    j; rows and columns of the prefix (CLS) token get none. Zero at the start."""

    def __init__(self, num_heads: int, grid: tuple[int, int, int], prefix: int = 1):
        super().__init__()
        slots, rows, cols = grid
        self.grid, self.prefix = grid, prefix
        self.rel_t = nn.Parameter(torch.zeros(num_heads, 2 * slots - 1))
        self.rel_h = nn.Parameter(torch.zeros(num_heads, 2 * rows - 1))
        self.rel_w = nn.Parameter(torch.zeros(num_heads, 2 * cols - 1))
        t, h, w = torch.meshgrid(torch.arange(slots), torch.arange(rows), torch.arange(cols), indexing="ij")
        for name, coord, size in (("index_t", t, slots), ("index_h", h, rows), ("index_w", w, cols)):
            flat = coord.reshape(-1)
            self.register_buffer(name, flat[:, None] - flat[None, :] + size - 1, persistent=False)

    def forward(self) -> torch.Tensor:
        patch = self.rel_t[:, self.index_t] + self.rel_h[:, self.index_h] + self.rel_w[:, self.index_w]
        return nn.functional.pad(patch, (self.prefix, 0, self.prefix, 0)).unsqueeze(0)  # (1, heads, N, N)


def _blocks_take_masks(block: nn.Module) -> bool:
    return "attn_mask" in inspect.signature(block.forward).parameters


class VideoViT(nn.Module):
    """A clip classifier made of an image ViT's modules (see the module docstring).

    ``forward`` takes normalised clips (B, C, T, H, W) with ``T = num_frames`` and ``H = W =
    image_size`` of the image model; ``forward_features`` returns the normed tokens, and
    ``forward_head(x, pre_logits=True)`` the pooled features.
    """

    def __init__(self, image: VisionTransformer, num_frames: int, tubelet_size: int = 1, rel_pos: bool = False,
                 motion_init: float = 0.0, generator: torch.Generator | None = None):
        super().__init__()
        if num_frames % tubelet_size:
            raise ValueError(f"num_frames {num_frames} is not a multiple of tubelet_size {tubelet_size}")
        if getattr(image, "reg_token", None) is not None or getattr(image, "no_embed_class", False):
            raise ValueError("VideoViT inflates ViTs with a CLS token and a pos_embed that covers it (MAWS, MAE)")
        if image.cls_token is None or image.pos_embed is None:
            raise ValueError("VideoViT needs an image ViT with a CLS token and absolute position embeddings")
        self.num_frames, self.tubelet_size = num_frames, tubelet_size
        self.num_prefix_tokens = image.num_prefix_tokens
        self.global_pool = image.global_pool
        self.embed_dim = image.embed_dim
        self.grid = tuple(int(g) for g in image.patch_embed.grid_size)
        self.patch_embed = TubeletEmbed(image.patch_embed.proj, tubelet_size, motion_init, generator)
        self.cls_token = image.cls_token
        self.pos_embed = image.pos_embed
        self.temporal = TemporalEmbedding(num_frames // tubelet_size, image.embed_dim)
        self.pos_drop, self.patch_drop, self.norm_pre = image.pos_drop, image.patch_drop, image.norm_pre
        self.blocks, self.norm = image.blocks, image.norm
        self.fc_norm, self.head_drop, self.head = image.fc_norm, image.head_drop, image.head
        if getattr(image, "attn_pool", None) is not None or self.global_pool not in ("token", "avg"):
            raise ValueError(f"VideoViT pools with global_pool token or avg, not {self.global_pool!r}")
        self.grad_checkpointing = False
        self.rel_pos: nn.ModuleList | None = None
        slots = num_frames // tubelet_size
        prefix_bias = torch.zeros(1, 1, 1, 1 + slots * self.grid[0] * self.grid[1])
        prefix_bias[..., : self.num_prefix_tokens] = math.log(slots)
        self.register_buffer("prefix_bias", prefix_bias, persistent=False)
        if (slots > 1 or rel_pos) and not _blocks_take_masks(self.blocks[0]):
            raise ValueError("VideoViT needs timm blocks that take attn_mask (timm >= 1.0.17); upgrade timm")
        if rel_pos:
            heads = self.blocks[0].attn.num_heads
            self.rel_pos = nn.ModuleList(RelativePositionBias(heads, (slots, *self.grid), self.num_prefix_tokens)
                                         for _ in self.blocks)

    @property
    def num_classes(self) -> int:
        return getattr(self.head, "out_features", 0)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def embed(self, clips: torch.Tensor) -> torch.Tensor:
        """Tokens (B, 1 + T'H'W', D) with space-time position embeddings added."""
        tokens = self.patch_embed(clips)  # (B, T', H', W', D)
        batch, slots, rows, cols, dim = tokens.shape
        if (rows, cols) != self.grid or slots != self.temporal.pos_embed.shape[1]:
            raise ValueError(f"clips of {clips.shape[2]} frames at {tuple(clips.shape[3:])} px give a "
                             f"{slots}x{rows}x{cols} token grid; this model was built for "
                             f"{self.temporal.pos_embed.shape[1]}x{self.grid[0]}x{self.grid[1]}")
        prefix = self.num_prefix_tokens
        spatial = self.pos_embed[:, prefix:].reshape(1, 1, rows * cols, dim)
        tokens = tokens.reshape(batch, slots, rows * cols, dim) + spatial + self.temporal.pos_embed
        cls = self.cls_token.expand(batch, -1, -1) + self.pos_embed[:, :prefix]
        return self.pos_drop(torch.cat([cls, tokens.reshape(batch, slots * rows * cols, dim)], dim=1))

    def attention_bias(self, index: int) -> torch.Tensor | None:
        """What block ``index`` adds to its attention logits: ``log T'`` on the CLS key (see the
        module docstring), plus the relative position bias when on; None when both are zero."""
        if self.rel_pos is not None:
            return self.rel_pos[index]() + self.prefix_bias
        return self.prefix_bias if self.temporal.pos_embed.shape[1] > 1 else None

    def forward_features(self, clips: torch.Tensor) -> torch.Tensor:
        x = self.norm_pre(self.patch_drop(self.embed(clips)))
        for index, block in enumerate(self.blocks):
            bias = self.attention_bias(index)
            kwargs = {"attn_mask": bias.to(x.dtype)} if bias is not None else {}
            if self.grad_checkpointing and self.training:
                x = checkpoint(lambda y, b=block, k=kwargs: b(y, **k), x, use_reentrant=False)
            else:
                x = block(x, **kwargs)
        return self.norm(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x[:, 0] if self.global_pool == "token" else x[:, self.num_prefix_tokens:].mean(dim=1)
        x = self.head_drop(self.fc_norm(x))
        return x if pre_logits else self.head(x)

    def forward(self, clips: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(clips))


def video_layer_name(name: str) -> str:
    """The timm-ViT name whose layer-wise lr decay a VideoViT parameter shares: the temporal
    embedding is an embedding (depth 0), a block's relative position tables belong to that block."""
    if name.startswith("temporal."):
        return "pos_embed"
    if name.startswith("rel_pos."):
        return "blocks." + name.split(".")[1] + ".rel_pos"
    return name


def video_forward_flops(embed_dim: int, depth: int, mlp_dim: int, tokens: int, patch_volume: int) -> float:
    """Forward FLOPs of one clip: ``depth * (2 N (4 d^2 + 2 d m) + 4 N^2 d)`` + the tubelet embedding."""
    per_block = 2 * tokens * (4 * embed_dim * embed_dim + 2 * embed_dim * mlp_dim) + 4 * tokens * tokens * embed_dim
    return depth * per_block + 2 * (tokens - 1) * patch_volume * 3 * embed_dim

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
* **Relative position** (``rel_pos=True``, optional): MViTv2's decomposed, query-dependent
  form, the one the paper cites: query i adds ``q_i . R_t[t_i - t_j] + q_i . R_h[h_i - h_j] +
  q_i . R_w[w_i - w_j]`` to its logit for key j, with per-block tables of ``2 * size - 1``
  head_dim vectors shared by the heads (``rel_pos.<block>.rel_t``/``rel_h``/``rel_w``),
  zero-initialised, so inflation stays exact (:class:`RelativePosition`). It is computed
  without any (N, N) tensor: appended to q and k as extra head-dim columns (the per-query terms
  and the keys' one-hot coordinates, :func:`relative_position_qkv`), so one fused attention
  call without a mask does it and memory stays linear in the number of tokens.

Why the static-clip property holds through the blocks: a static clip's patch tokens are the
image tokens repeated ``T'`` times with the same embeddings, and attention over keys that are
each repeated ``T'`` times equals attention over the unique keys (every softmax weight is
split evenly between identical copies). The CLS token is not repeated, so its key would lose
weight ``T'``-fold; the blocks therefore count it ``T'`` times, which is adding ``log T'`` to its
logits: :class:`VideoBlock` (timm's block, same modules and names, with its own attention
forward) appends ``T' - 1`` copies of the CLS key and value, so there is no mask either. Then
the CLS token and every patch token come out equal to the image model's, and so do ``token``
and ``avg`` pooling, with or without (zero-initialised) relative positions
(``tests/test_video.py``, ``tests/test_video_relpos.py`` check it to 1e-5). With one tubelet slot
and no relative positions (``num_frames == tubelet_size``, e.g. the single-frame baseline)
timm's blocks run unchanged.

State dict names follow timm's (``patch_embed.proj.weight`` is 5-D, ``temporal.pos_embed``,
``blocks.i.*``), so ``train.optim.layer_id`` gives layer-wise lr decay unchanged (the temporal
embedding is mapped to depth 0 by :func:`video_layer_name`, a block's relative position tables to
that block).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from timm.layers import Attention as TimmAttention
from timm.models.vision_transformer import Block, VisionTransformer
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


class RelativePosition(nn.Module):
    """MViTv2's decomposed, query-dependent relative position tables of one attention block.

    Query token i at (t_i, h_i, w_i) adds ``q_i . R_t[t_i - t_j] + q_i . R_h[h_i - h_j] + q_i .
    R_w[w_i - w_j]`` to its logit for key j, with ``q_i`` the (normed, unscaled) query of each head
    and ``rel_t``, ``rel_h``, ``rel_w`` tables of ``2 * size - 1`` head_dim vectors shared by the
    heads (row ``offset + size - 1`` for each offset), as in MViTv2 / PySlowFast
    (``cal_rel_pos_spatial``, ``cal_rel_pos_temporal``); rows and columns of the prefix (CLS)
    token get none. Zero at the start, so inflation stays exact. :func:`relative_position_qkv`
    applies them inside :class:`VideoBlock`.
    """

    def __init__(self, head_dim: int, grid: tuple[int, int, int]):
        super().__init__()
        slots, rows, cols = grid
        self.rel_t = nn.Parameter(torch.zeros(2 * slots - 1, head_dim))
        self.rel_h = nn.Parameter(torch.zeros(2 * rows - 1, head_dim))
        self.rel_w = nn.Parameter(torch.zeros(2 * cols - 1, head_dim))

    def forward(self) -> torch.Tensor:
        """The three tables stacked, ``(2T' - 1 + 2H' - 1 + 2W' - 1, head_dim)``: a new tensor from a
        module call, so FSDP gathers the tables when they are used (and may free them after)."""
        return torch.cat([self.rel_t, self.rel_h, self.rel_w])


def relative_index(grid: tuple[int, int, int], device: torch.device | None = None) -> torch.Tensor:
    """For every patch token (t, h, w) and every key coordinate s along each axis, the row of the
    stacked tables (:meth:`RelativePosition.forward`) it uses: ``(T'H'W', T' + H' + W')`` with
    ``[i, s] = t_i - s + T' - 1``, then ``2T' - 1 + h_i - s + H' - 1``, then likewise for w."""
    coords = torch.meshgrid(*(torch.arange(size, device=device) for size in grid), indexing="ij")
    columns, start = [], 0
    for coord, size in zip(coords, grid):
        columns.append(coord.reshape(-1, 1) - torch.arange(size, device=device) + size - 1 + start)
        start += 2 * size - 1
    return torch.cat(columns, dim=1)


@functools.lru_cache(maxsize=32)
def _position_codes(grid: tuple[int, int, int], prefix: int, head_dim: int, device: torch.device
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What :func:`relative_position_qkv` needs of the token grid alone, built once per grid and
    device instead of in every block of every step: the rows of the stacked tables per patch token
    and key coordinate (:func:`relative_index`), the patch tokens' positions, and the keys' one-hot
    coordinates (prefix rows zero) padded so head_dim + codes is a multiple of 8 (float32)."""
    with torch.inference_mode(False), torch.no_grad():  # plain tensors, whatever mode the first call ran in
        index = relative_index(grid, device)
        codes = index.shape[1]
        width = codes + (-(head_dim + codes)) % 8
        slots, rows, cols = grid
        patches = torch.arange(prefix, prefix + slots * rows * cols, device=device)[:, None]
        eyes = [torch.eye(size, device=device) for size in grid]
        key_codes = torch.cat([eyes[0][:, None, None].expand(slots, rows, cols, slots),
                               eyes[1][None, :, None].expand(slots, rows, cols, rows),
                               eyes[2][None, None, :].expand(slots, rows, cols, cols)], dim=-1)
        key_codes = F.pad(key_codes.reshape(slots * rows * cols, codes), (0, width - codes, prefix, 0))
    return index, patches, key_codes


def relative_position_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                          grid: tuple[int, int, int], prefix: int, tables: torch.Tensor,
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q', k', v' whose attention at scale 1 is the attention of q, k, v (B, heads, N, head_dim)
    at ``scale`` with the relative position terms of ``tables`` (:meth:`RelativePosition.forward`)
    added to the logits; its first head_dim output columns are the result.

    Why it is exact and needs no (N, N) tensor: the term depends on key j only through its
    coordinates, so with ``A_t[i, s] = q_i . R_t[t_i - s]`` (N x T', likewise A_h, A_w) it is
    ``A_t[i, t_j] + A_h[i, h_j] + A_w[i, w_j]``, the dot product of ``[A_t[i], A_h[i], A_w[i]]``
    with the one-hot codes of (t_j, h_j, w_j). So ``q' = [q * scale, A_t, A_h, A_w, 0]``, ``k' =
    [k, codes, 0]`` (zero rel parts on prefix rows) and ``v' = [v, 0]``, padded to a head dim that
    is a multiple of 8: one fused attention call (flash / memory-efficient, which want a single head
    dim for q, k and v, hence v's padding) without a mask, memory linear in N. The A's are one
    matmul of q with the stacked tables (N x (2T' + 2H' + 2W' - 3)) and an indexing, so backward
    keeps q once; ``q`` laid out as (B, N, heads, head_dim) makes that matmul copy-free.
    """
    batch, heads, tokens, dim = q.shape
    index, patches, key_codes = _position_codes(grid, prefix, dim, q.device)
    codes = index.shape[1]
    width = key_codes.shape[1]
    products = torch.matmul(q.transpose(1, 2), tables.t().to(q.dtype))  # (B, N, heads, rows of the tables)
    terms = products[:, patches, :, index].permute(2, 3, 0, 1)  # (B, heads, T'H'W', R); keeps no products
    terms = F.pad(terms, (0, width - codes, prefix, 0))
    key_codes = key_codes.to(k.dtype).expand(batch, heads, tokens, width)
    return torch.cat([q * scale, terms], dim=-1), torch.cat([k, key_codes], dim=-1), F.pad(v, (0, width))


def _attention_kernel(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float,
                      scale: float) -> torch.Tensor:
    """``scaled_dot_product_attention`` without a mask; bf16/fp16 on the CPU runs in fp32, for the
    reason :func:`prepretrain.models.vit.attend` gives (the CPU's half-precision flash kernel is
    slower than its fp32 one)."""
    if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
        out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), dropout_p=dropout_p, scale=scale)
        return out.to(q.dtype)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)


def _runs_own_attention(block: nn.Module) -> bool:
    """Whether :class:`VideoBlock` can take over ``block``: timm's pre-norm ``Block`` with timm's
    ``Attention`` (or a subclass such as :class:`prepretrain.models.vit.Attention`)."""
    return isinstance(block, Block) and isinstance(getattr(block, "attn", None), TimmAttention)


class VideoBlock(nn.Module):
    """A timm ``Block`` (its own modules and weights, same names) whose attention also counts the
    prefix key ``T'`` times and, given tables, adds the relative position terms.

    ``log T'`` on the prefix key's logits (module docstring) is the same as ``T'`` copies of that
    key and value, so the block appends ``T' - 1`` copies instead of a mask: the fused kernels run
    at the model's own head dim with ``T' - 1`` more keys (0.4% for 16 x 224 px ViT-B/16)."""

    def __init__(self, block: nn.Module, grid: tuple[int, int, int], prefix: int):
        super().__init__()
        self.norm1, self.attn, self.ls1, self.drop_path1 = block.norm1, block.attn, block.ls1, block.drop_path1
        self.norm2, self.mlp, self.ls2, self.drop_path2 = block.norm2, block.mlp, block.ls2, block.drop_path2
        self.grid, self.prefix = grid, prefix

    def attention(self, x: torch.Tensor, tables: torch.Tensor | None = None) -> torch.Tensor:
        """What timm's ``Attention`` computes on ``x`` (B, N, C), plus the above (``tables``: the
        block's :meth:`RelativePosition.forward`); one ``scaled_dot_product_attention`` call, no
        mask and no (N, N) tensor."""
        attn = self.attn
        batch, tokens, _ = x.shape
        gate = attn.gate(x).sigmoid() if getattr(attn, "gate", None) is not None else None
        qkv = attn.qkv(x).reshape(batch, tokens, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        # q on storage of its own, laid out (B, N, heads, head_dim) as timm's q is: k and v are
        # rebuilt below, so nothing kept for backward holds the whole qkv output, and the output
        # of the kernel (same layout) reshapes to (B, N, C) without a copy
        q = q.transpose(1, 2).contiguous().transpose(1, 2)
        head_dim, scale = q.shape[-1], attn.scale
        if tables is not None:
            q, k, v = relative_position_qkv(q, k, v, scale, self.grid, self.prefix, tables)
            scale = 1.0
        copies = self.grid[0] - 1
        if copies:
            k, v = (torch.cat([t[:, :, : self.prefix].repeat(1, 1, copies, 1), t], dim=2) for t in (k, v))
        out = _attention_kernel(q, k, v, attn.attn_drop.p if self.training else 0.0, scale)
        out = out[..., :head_dim].transpose(1, 2).reshape(batch, tokens, -1)
        out = getattr(attn, "norm", nn.Identity())(out)
        if gate is not None:
            out = out * gate
        return attn.proj_drop(attn.proj(out))

    def forward(self, x: torch.Tensor, tables: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.drop_path1(self.ls1(self.attention(self.norm1(x), tables)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


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
        slots = num_frames // tubelet_size
        self.rel_pos: nn.ModuleList | None = None
        if slots > 1 or rel_pos:  # else timm's blocks as they are: the single-frame baseline is the image model
            if not all(_runs_own_attention(block) for block in self.blocks):
                kinds = sorted({f"{type(b).__name__} with {type(getattr(b, 'attn', None)).__name__}"
                                for b in self.blocks})
                raise ValueError(f"VideoViT takes over timm's pre-norm Block with timm's Attention (for time "
                                 f"positions); this image model has {', '.join(kinds)}")
            self.blocks = nn.ModuleList(VideoBlock(block, (slots, *self.grid), self.num_prefix_tokens)
                                        for block in self.blocks)
        if rel_pos:
            attn = self.blocks[0].attn
            head_dim = attn.qkv.out_features // 3 // attn.num_heads
            self.rel_pos = nn.ModuleList(RelativePosition(head_dim, (slots, *self.grid)) for _ in self.blocks)

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

    def forward_features(self, clips: torch.Tensor) -> torch.Tensor:
        x = self.norm_pre(self.patch_drop(self.embed(clips)))
        for index, block in enumerate(self.blocks):
            tables = (self.rel_pos[index](),) if self.rel_pos is not None else ()
            if self.grad_checkpointing and self.training:
                x = checkpoint(block, x, *tables, use_reentrant=False)
            else:
                x = block(x, *tables)
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

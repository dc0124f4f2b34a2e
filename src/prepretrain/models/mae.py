"""Masked autoencoder with the reference semantics (facebookresearch/mae models_mae.py).

The module's attribute names are the official MAE "full" checkpoint's, so those files load
with a strict ``load_state_dict``; the encoder part is key-for-key a timm ViT, so
``encoder_state_dict()`` initialises WSP, probes and finetunes directly.
"""

from __future__ import annotations

from contextlib import nullcontext
from functools import partial
from typing import Any

import numpy as np
import torch
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint

from .vit import Attention, ViTShape, create_vit, forward_flops, resolve_name, vit_shape

DECODER_KEYS = ("decoder_", "mask_token")


def sincos_1d(embed_dim: int, positions: np.ndarray) -> np.ndarray:
    """Sin-cos embedding of 1-D positions: first half sin, second half cos, omega = 1/10000^(2i/D)."""
    if embed_dim % 2:
        raise ValueError(f"sin-cos embedding needs an even width, got {embed_dim}")
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    angles = np.einsum("m,d->md", positions.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)


def sincos_2d(embed_dim: int, grid_size: int, cls_token: bool = True) -> np.ndarray:
    """Fixed 2-D sin-cos position embedding, row-major over the patch grid.

    As in the reference, the first half of the channels encodes the column coordinate and the
    second half the row coordinate; the class-token slot is all zeros.
    """
    if embed_dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs a width divisible by 4, got {embed_dim}")
    rows, cols = np.meshgrid(np.arange(grid_size), np.arange(grid_size), indexing="ij")
    emb = np.concatenate([sincos_1d(embed_dim // 2, cols), sincos_1d(embed_dim // 2, rows)], axis=1)
    if cls_token:
        emb = np.concatenate([np.zeros((1, embed_dim)), emb], axis=0)
    return emb


def random_masking(
    x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample random masking by argsort of noise (smallest noise is kept).

    Returns the kept tokens, the mask (1 = removed, in the original order) and ``ids_restore``.
    """
    n, length, dim = x.shape
    keep = int(length * (1 - mask_ratio))
    if noise is None:
        noise = torch.rand(n, length, device=x.device)
    elif noise.shape != (n, length):
        raise ValueError(f"noise must have shape {(n, length)}, got {tuple(noise.shape)}")
    ids_shuffle = torch.argsort(noise.to(x.device), dim=1)
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :keep]
    kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, dim))
    mask = torch.ones(n, length, device=x.device)
    mask[:, :keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return kept, mask, ids_restore


class MaskedAutoencoder(nn.Module):
    """MAE with a ViT encoder and a lightweight ViT decoder that predicts pixels of masked patches."""

    def __init__(
        self,
        shape: ViTShape,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        norm_pix_loss: bool = True,
        in_chans: int = 3,
    ):
        super().__init__()
        self.shape = shape
        self.patch_size = shape.patch_size
        self.norm_pix_loss = norm_pix_loss
        self.grad_checkpointing = False
        dim = shape.embed_dim
        norm_layer = partial(nn.LayerNorm, eps=1e-6)

        self.patch_embed = PatchEmbed(shape.img_size, shape.patch_size, in_chans, dim)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, dim), requires_grad=False)
        self.blocks = nn.ModuleList(
            Block(dim, shape.num_heads, shape.mlp_ratio, qkv_bias=True, norm_layer=norm_layer, attn_layer=Attention)
            for _ in range(shape.depth)
        )
        self.norm = norm_layer(dim)

        self.decoder_embed = nn.Linear(dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(
            torch.zeros(1, num_patches + 1, decoder_embed_dim), requires_grad=False
        )
        self.decoder_blocks = nn.ModuleList(
            Block(decoder_embed_dim, decoder_num_heads, 4.0, qkv_bias=True, norm_layer=norm_layer,
                  attn_layer=Attention)
            for _ in range(decoder_depth)
        )
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, shape.patch_size**2 * in_chans, bias=True)
        if self.cls_token.device.type != "meta":
            self.initialize_weights()

    # ----------------------------------------------------------------------------- init
    def initialize_weights(self) -> None:
        """Reference initialisation: fixed sin-cos, xavier-uniform linears, N(0, 0.02) tokens."""
        grid = int(self.patch_embed.num_patches**0.5)
        self.pos_embed.data.copy_(torch.from_numpy(sincos_2d(self.pos_embed.shape[-1], grid)).float()[None])
        self.decoder_pos_embed.data.copy_(
            torch.from_numpy(sincos_2d(self.decoder_pos_embed.shape[-1], grid)).float()[None]
        )
        w = self.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(self._init_module)

    @staticmethod
    def _init_module(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------------ patches
    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) -> (N, L, p*p*3), each patch flattened as (row, col, channel)."""
        p = self.patch_size
        n, c, h, w = imgs.shape
        if h % p or w % p:
            raise ValueError(f"image size {(h, w)} is not a multiple of the patch size {p}")
        x = imgs.reshape(n, c, h // p, p, w // p, p)
        x = torch.einsum("nchpwq->nhwpqc", x)
        return x.reshape(n, (h // p) * (w // p), p * p * c)

    def unpatchify(self, x: torch.Tensor, channels: int = 3) -> torch.Tensor:
        """(N, L, p*p*3) -> (N, 3, H, W) for a square grid."""
        p = self.patch_size
        n, length, _ = x.shape
        side = int(length**0.5)
        x = x.reshape(n, side, side, p, p, channels)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(n, channels, side * p, side * p)

    def _run(self, blocks: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        for block in blocks:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x

    # ------------------------------------------------------------------------ forward
    def forward_encoder(
        self, imgs: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.patch_embed(imgs)
        x = x + self.pos_embed[:, 1:, :]
        x, mask, ids_restore = random_masking(x, mask_ratio, noise)
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        x = self._run(self.blocks, x)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        x = self.decoder_embed(latent)
        n, kept_plus_cls, dim = x.shape
        num_masked = ids_restore.shape[1] + 1 - kept_plus_cls
        tokens = torch.cat([x[:, 1:, :], self.mask_token.expand(n, num_masked, -1).to(x.dtype)], dim=1)
        tokens = torch.gather(tokens, 1, ids_restore.unsqueeze(-1).expand(-1, -1, dim))
        x = torch.cat([x[:, :1, :], tokens], dim=1) + self.decoder_pos_embed
        x = self._run(self.decoder_blocks, x)
        x = self.decoder_pred(self.decoder_norm(x))
        return x[:, 1:, :]

    def target(self, imgs: torch.Tensor) -> torch.Tensor:
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        return target

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error per patch, averaged over the removed patches only (in fp32)."""
        target = self.target(imgs.float())
        loss = ((pred.float() - target) ** 2).mean(dim=-1)
        return (loss * mask).sum() / mask.sum()

    def forward(
        self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns ``(loss, pred, mask)`` like the reference; ``noise`` (N, L) fixes the masking."""
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask

    # ------------------------------------------------------------------------ helpers
    @torch.no_grad()
    def reconstruct(
        self, imgs: torch.Tensor, mask_ratio: float = 0.75, noise: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        """Images for a reconstruction grid, in the input's (normalised) pixel space.

        With norm-pix targets the decoder predicts each patch normalised by its own mean and
        variance; we undo that with the original patch statistics, as is usual for viewing
        (the prediction cannot know them).
        """
        was_training = self.training
        self.eval()
        ctx = torch.autocast(imgs.device.type, enabled=False) if imgs.device.type != "meta" else nullcontext()
        with ctx:
            _, pred, mask = self(imgs.float(), mask_ratio, noise)
            pred = pred.float()
            if self.norm_pix_loss:
                patches = self.patchify(imgs.float())
                mean = patches.mean(dim=-1, keepdim=True)
                var = patches.var(dim=-1, keepdim=True)
                pred = pred * (var + 1.0e-6) ** 0.5 + mean
            patch_mask = mask.unsqueeze(-1).expand(-1, -1, pred.shape[-1])
            masked = self.unpatchify(self.patchify(imgs.float()) * (1 - patch_mask))
            recon = self.unpatchify(pred)
            pasted = self.unpatchify(self.patchify(imgs.float()) * (1 - patch_mask) + pred * patch_mask)
        self.train(was_training)
        return {"original": imgs.float(), "masked": masked, "reconstruction": recon, "pasted": pasted}

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The encoder's weights with timm ``VisionTransformer`` keys (decoder dropped)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith(DECODER_KEYS)}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable


def create_mae(
    name: str,
    *,
    decoder_embed_dim: int = 512,
    decoder_depth: int = 8,
    decoder_num_heads: int = 16,
    norm_pix_loss: bool = True,
    device: str | torch.device | None = None,
    **overrides: Any,
) -> MaskedAutoencoder:
    """Build the MAE for a named ViT (see ``prepretrain.models.vit.VIT_SHAPES``)."""
    shape = vit_shape(name, **overrides)
    with torch.device(device) if device is not None else nullcontext():
        model = MaskedAutoencoder(shape, decoder_embed_dim, decoder_depth, decoder_num_heads, norm_pix_loss)
    model.prepretrain_name = resolve_name(name)  # type: ignore[attr-defined]
    return model


def initialize_like_mae(encoder: VisionTransformer) -> VisionTransformer:
    """Give a timm ViT encoder the MAE reference's initialisation (what an MAE run's
    ``encoder.safetensors`` holds before its first step): fixed 2-D sin-cos position embedding,
    xavier-uniform patch projection (its bias at PyTorch's default) and linears with zero biases,
    unit LayerNorms, N(0, 0.02) class token. The control arm of the MAWS comparison: it separates what MAE *learns* from
    how MAE *initialises* (at small widths these weights are several times larger than timm's)."""
    grid = encoder.patch_embed.grid_size
    if grid[0] != grid[1]:
        raise ValueError(f"the MAE initialisation needs a square patch grid, got {tuple(grid)}")
    with torch.no_grad():
        table = torch.from_numpy(sincos_2d(encoder.embed_dim, grid[0], cls_token=encoder.cls_token is not None))
        encoder.pos_embed.copy_(table.float()[None, -encoder.pos_embed.shape[1]:])
        weight = encoder.patch_embed.proj.weight
        nn.init.xavier_uniform_(weight.view(weight.shape[0], -1))  # its bias keeps PyTorch's conv default, as in MAE
        if encoder.cls_token is not None:
            nn.init.normal_(encoder.cls_token, std=0.02)
        encoder.apply(MaskedAutoencoder._init_module)
    return encoder


def mae_init_encoder(name: str, seed: int, **overrides: Any) -> VisionTransformer:
    """A headless timm ViT ``name`` (shape ``overrides``) with the MAE initialisation, drawn from
    ``seed`` without touching the global random state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return initialize_like_mae(create_vit(name, **overrides))


def mae_forward_flops(
    shape: ViTShape, mask_ratio: float, decoder_embed_dim: int, decoder_depth: int, img_size: int | None = None
) -> float:
    """Forward FLOPs of one MAE sample: encoder on the kept tokens, decoder on all tokens."""

    size = img_size or shape.img_size
    patches = (size // shape.patch_size) ** 2
    kept = int(patches * (1 - mask_ratio)) + 1
    encoder = forward_flops(shape, tokens=kept, img_size=size)
    dec_shape = ViTShape(shape.patch_size, decoder_embed_dim, decoder_depth, 1, 4 * decoder_embed_dim, size)
    decoder = forward_flops(dec_shape, tokens=patches + 1, img_size=size) - 2 * patches * (
        shape.patch_size**2 * 3
    ) * decoder_embed_dim
    embed = 2 * kept * shape.embed_dim * decoder_embed_dim
    pred = 2 * patches * decoder_embed_dim * shape.patch_size**2 * 3
    return encoder + decoder + embed + pred

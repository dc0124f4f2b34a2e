"""Text towers for LiT: the XLM-R (RoBERTa) encoder of the MAWS CLIP models, and tiny ones.

Why this shape: MAWS CLIP checkpoints store their text tower as a torchtext ``RobertaModel``
(``RobertaEncoderConf`` + an identity head that returns token 0). To load them strictly, and
to export our own LiT models in the same layout, the modules here reproduce torchtext's
parameter names (as of torchtext 0.13+, where the layers are ``torch.nn.TransformerEncoder``)::

    encoder.transformer.token_embedding.weight                     [vocab, D]
    encoder.transformer.positional_embedding.embedding.weight      [max_positions, D]
    encoder.transformer.embedding_layer_norm.{weight,bias}         [D]
    encoder.transformer.layers.layers.{i}.self_attn.in_proj_weight [3D, D]  (q; k; v rows)
    encoder.transformer.layers.layers.{i}.self_attn.in_proj_bias   [3D]
    encoder.transformer.layers.layers.{i}.self_attn.out_proj.{weight,bias}
    encoder.transformer.layers.layers.{i}.linear1.{weight,bias}    [F, D], [F]
    encoder.transformer.layers.layers.{i}.linear2.{weight,bias}    [D, F], [D]
    encoder.transformer.layers.layers.{i}.norm1.{weight,bias}      (after attention)
    encoder.transformer.layers.layers.{i}.norm2.{weight,bias}      (after the MLP)

These names were checked against torchtext's ``models/roberta/{model,modules}.py`` and the
MAWS ``model_builder.py`` (``RobertaModel(conf, RobertaIdentityHead())``; the identity head
and ``encoder.project = nn.Identity()`` hold no parameters).

Semantics (fairseq/torchtext RoBERTa): token + learned position embeddings where positions
are ``cumsum(non-pad mask) * mask + padding_idx`` (first real token at 2, pads at 1), then
the embedding LayerNorm (post-norm models normalise embeddings first), dropout, then post-norm
blocks ``x = norm1(x + attn(x)); x = norm2(x + mlp(x))`` with exact GELU and LayerNorm eps
1e-5, attention masked at pad keys. The text feature is the output at token 0 (``<s>``).

Shapes: XLM-R Base 768-d, 12 layers, 12 heads, MLP 3072; Large 1024-d, 24 layers, 16 heads,
MLP 4096; vocab 250002, 514 positions. ``text_micro`` is the CPU tower (same code, byte vocab).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .tokenizers import PAD_ID


@dataclass(frozen=True)
class TextShape:
    """Everything that fixes a text tower's parameter shapes."""

    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    vocab_size: int = 250002
    max_positions: int = 514
    padding_idx: int = PAD_ID

    @property
    def max_tokens(self) -> int:
        """Longest input (BOS/EOS included) the position table can index."""
        return self.max_positions - self.padding_idx - 1


TEXT_SHAPES: dict[str, TextShape] = {
    "xlmr_base": TextShape(768, 12, 12, 3072),
    "xlmr_large": TextShape(1024, 24, 16, 4096),
    # CPU towers for the byte tokenizer (260 ids) and the synthetic captions.
    "text_micro": TextShape(128, 2, 4, 512, vocab_size=260, max_positions=130),
    "text_small": TextShape(256, 4, 4, 1024, vocab_size=260, max_positions=258),
}

_SHAPE_KEYS = {"width", "depth", "num_heads", "mlp_dim", "vocab_size", "max_positions", "padding_idx"}


def text_shape(name: str, **overrides: Any) -> TextShape:
    """The shape of a named tower after overrides such as ``depth=1`` or ``vocab_size=1000``."""
    if name not in TEXT_SHAPES:
        raise ValueError(f"unknown text tower '{name}'; known: {', '.join(sorted(TEXT_SHAPES))}")
    unknown = set(overrides) - _SHAPE_KEYS
    if unknown:
        raise TypeError(f"unknown text shape overrides: {sorted(unknown)}")
    shape = TEXT_SHAPES[name]
    values = {k: v for k, v in overrides.items() if v}
    if "width" in values and "mlp_dim" not in values:
        values["mlp_dim"] = 4 * values["width"]
    return replace(shape, **values)


def position_ids(tokens: torch.Tensor, padding_idx: int = PAD_ID) -> torch.Tensor:
    """fairseq positions: real tokens count from ``padding_idx + 1``, pads sit at ``padding_idx``."""
    real = tokens.ne(padding_idx).long()
    return torch.cumsum(real, dim=1) * real + padding_idx


class TextSelfAttention(nn.Module):
    """Multi-head self-attention with ``nn.MultiheadAttention``'s parameter names (packed q/k/v)."""

    def __init__(self, width: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        if width % num_heads:
            raise ValueError(f"num_heads {num_heads} must divide width {width}")
        self.num_heads = num_heads
        self.dropout = dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor, attend: torch.Tensor | None) -> torch.Tensor:
        """``attend``: (B, 1, 1, T) bool, True where a key may be attended (not padding)."""
        batch, length, width = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        q, k, v = qkv.view(batch, length, 3, self.num_heads, width // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attend, dropout_p=self.dropout if self.training else 0.0
        )
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, width))


class PostNormBlock(nn.Module):
    """RoBERTa block (``nn.TransformerEncoderLayer`` with ``norm_first=False``, GELU)."""

    def __init__(self, width: int, num_heads: int, mlp_dim: int, dropout: float = 0.0, eps: float = 1e-5):
        super().__init__()
        self.self_attn = TextSelfAttention(width, num_heads, dropout)
        self.linear1 = nn.Linear(width, mlp_dim)
        self.linear2 = nn.Linear(mlp_dim, width)
        self.norm1 = nn.LayerNorm(width, eps=eps)
        self.norm2 = nn.LayerNorm(width, eps=eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, attend: torch.Tensor | None) -> torch.Tensor:
        x = self.norm1(x + self.dropout(self.self_attn(x, attend)))
        hidden = self.dropout(F.gelu(self.linear1(x)))
        return self.norm2(x + self.dropout(self.linear2(hidden)))


class _BlockStack(nn.Module):
    """Holds the blocks as ``layers.{i}`` (torch's ``TransformerEncoder`` layout)."""

    def __init__(self, blocks: list[nn.Module]):
        super().__init__()
        self.layers = nn.ModuleList(blocks)


class _PositionTable(nn.Module):
    """Learned positions stored as ``embedding.weight`` (torchtext ``PositionalEmbedding``)."""

    def __init__(self, max_positions: int, width: int, padding_idx: int):
        super().__init__()
        self.embedding = nn.Embedding(max_positions, width, padding_idx=padding_idx)


class TextTransformer(nn.Module):
    """Embeddings + post-norm blocks; returns every token's output (B, T, D)."""

    def __init__(self, shape: TextShape, dropout: float = 0.0):
        super().__init__()
        self.shape = shape
        self.padding_idx = shape.padding_idx
        self.token_embedding = nn.Embedding(shape.vocab_size, shape.width, padding_idx=shape.padding_idx)
        self.layers = _BlockStack(
            [PostNormBlock(shape.width, shape.num_heads, shape.mlp_dim, dropout) for _ in range(shape.depth)]
        )
        self.positional_embedding = _PositionTable(shape.max_positions, shape.width, shape.padding_idx)
        self.embedding_layer_norm = nn.LayerNorm(shape.width)
        self.dropout = nn.Dropout(dropout)
        self.grad_checkpointing = False

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.shape[1] > self.shape.max_tokens:
            raise ValueError(
                f"texts of {tokens.shape[1]} tokens exceed the {self.shape.max_tokens} positions of this tower"
            )
        pad = tokens.eq(self.padding_idx)
        x = self.token_embedding(tokens) + self.positional_embedding.embedding(position_ids(tokens, self.padding_idx))
        x = self.dropout(self.embedding_layer_norm(x))
        # Always the mask (all True without padding: the same result): testing for padding first
        # would read a device value on the host and stall the training step.
        attend = (~pad)[:, None, None, :]
        for block in self.layers.layers:
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x = checkpoint(block, x, attend, use_reentrant=False)
            else:
                x = block(x, attend)
        return x


class _EncoderSlot(nn.Module):
    """The ``encoder`` level of torchtext's ``RobertaModel`` (it holds ``transformer``)."""

    def __init__(self, transformer: TextTransformer):
        super().__init__()
        self.transformer = transformer


class TextEncoder(nn.Module):
    """A RoBERTa text tower whose feature is the output at token 0; state dict = torchtext's."""

    def __init__(self, shape: TextShape, dropout: float = 0.0):
        super().__init__()
        self.shape = shape
        self.width = shape.width
        self.encoder = _EncoderSlot(TextTransformer(shape, dropout))
        init_text_weights(self)

    @property
    def transformer(self) -> TextTransformer:
        return self.encoder.transformer

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T) ids -> (B, D) features of token 0."""
        return self.transformer(tokens)[:, 0]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable


def init_text_weights(module: nn.Module, std: float = 0.02) -> None:
    """BERT/fairseq init: normal(0, 0.02) weights and embeddings, zero biases and pad rows.

    Every block gets its own draw (torch's ``TransformerEncoder`` would clone one layer).
    """
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            nn.init.normal_(sub.weight, std=std)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)
        elif isinstance(sub, nn.Embedding):
            nn.init.normal_(sub.weight, std=std)
            if sub.padding_idx is not None:
                with torch.no_grad():
                    sub.weight[sub.padding_idx].zero_()
        elif isinstance(sub, TextSelfAttention):
            nn.init.normal_(sub.in_proj_weight, std=std)
            nn.init.zeros_(sub.in_proj_bias)
        elif isinstance(sub, nn.LayerNorm):
            nn.init.ones_(sub.weight)
            nn.init.zeros_(sub.bias)


def create_text_encoder(
    name: str = "text_micro", *, dropout: float = 0.0, device: str | torch.device | None = None, **overrides: Any
) -> TextEncoder:
    """Build a named text tower; overrides: width, depth, num_heads, mlp_dim, vocab_size, max_positions."""
    shape = text_shape(name, **overrides)
    with torch.device(device) if device is not None else nullcontext():
        return TextEncoder(shape, dropout)


def infer_text_shape(state: dict[str, torch.Tensor], prefix: str = "") -> TextShape:
    """Read a tower's shape from its state dict (heads: XLM-R's 64-d heads, as Base/Large use).

    The head count is not stored in the weights; 64-wide heads give XLM-R Base 12 and Large 16.
    """
    base = prefix + "encoder.transformer."
    vocab, width = state[base + "token_embedding.weight"].shape
    max_positions = state[base + "positional_embedding.embedding.weight"].shape[0]
    depth = 1 + max(
        int(k[len(base + "layers.layers.") :].split(".")[0]) for k in state if k.startswith(base + "layers.layers.")
    )
    mlp_dim = state[base + "layers.layers.0.linear1.weight"].shape[0]
    return TextShape(int(width), depth, max(1, int(width) // 64), int(mlp_dim), int(vocab), int(max_positions))


def text_forward_flops(shape: TextShape, tokens: int) -> float:
    """Forward FLOPs for one text of ``tokens`` tokens (matmuls only, as for the ViT)."""
    d, n = shape.width, tokens
    per_block = 2 * n * (4 * d * d + 2 * d * shape.mlp_dim) + 4 * n * n * d
    return shape.depth * per_block

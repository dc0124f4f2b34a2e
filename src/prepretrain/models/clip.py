"""The LiT / MAWS-CLIP model: a (locked) timm ViT, a RoBERTa text tower, two projections.

Why this layout: MAWS's zero-shot checkpoints are plain state dicts with ``logit_scale``,
``vision_projection`` [vision width, embed], ``text_projection`` [text width, embed],
``vision_encoder.*`` (a timm ``VisionTransformer`` without head, CLS-pooled) and
``text_encoder.*`` (torchtext RoBERTa, see :mod:`prepretrain.models.text`). :class:`CLIPModel`
has exactly these names, so the official checkpoints load strictly and our LiT runs export
files in the same layout. Embeddings are ``feature @ projection`` (no bias), L2-normalised.

LiT ("locked-image tuning") keeps the image tower frozen: its parameters do not require
gradients and it always runs in eval mode, so its features for an un-augmented image never
change during training and can be computed once (:meth:`CLIPModel.forward` takes
``image_features`` instead of images for that cached path).

Loss: the symmetric CLIP loss ``(CE(s * I T^T, diag) + CE(s * T I^T, diag)) / 2`` with the
learnable temperature ``s = exp(logit_scale)`` (init 1/0.07, capped at 100). Across ranks each
rank gathers every rank's embeddings with ``torch.distributed.nn.functional.all_gather``
(whose backward sums the gradients of all ranks into the local shard) and computes the rows
of its own samples against all columns. The mean of the rank losses is then exactly the
single-process loss of the global batch, and the gradients after DDP's averaging are exactly
its gradients: the sum over ranks of the rank losses' gradients, divided by the world size.
"""

from __future__ import annotations

import json
import math
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError
from ..files import read_keys, save_safetensors
from .checkpoints import CheckpointMismatch, check_fit, load_encoder_weights, read_state_dict
from .layouts import cast_floating, upgrade_torchtext_names
from .openclip import is_open_clip_folder, is_openai_clip_state, looks_like_open_clip_state, read_open_clip
from .resolve import resolve_weights
from .text import TextEncoder, TextShape, create_text_encoder, infer_text_shape
from .tokenizers import Tokenizer, build_tokenizer, tokenizer_from_info
from .vit import create_vit, vision_name_from_state

LOGIT_SCALE_INIT = math.log(1 / 0.07)
LOGIT_SCALE_MAX = math.log(100.0)

# The released MAWS CLIP models (model_builder.py): vision tower, text tower, embed dim.
MAWS_CLIP_MODELS: dict[str, tuple[str, str, int]] = {
    "vit_b16_xlmr_b": ("vit_b16", "xlmr_base", 768),
    "vit_l16_xlmr_l": ("vit_l16", "xlmr_large", 1024),
    "vit_h14_xlmr_l": ("vit_h14", "xlmr_large", 1024),
    "vit_2b14_xlmr_l": ("vit_2b14", "xlmr_large", 2048),
}


class CLIPModel(nn.Module):
    """Image tower + text tower + projections + temperature, in the MAWS CLIP layout."""

    def __init__(self, vision_encoder: nn.Module, text_encoder: TextEncoder, embed_dim: int,
                 lock_vision: bool = True, lock_vision_projection: bool = False):
        super().__init__()
        vision_width = int(vision_encoder.embed_dim)
        self.vision_encoder = vision_encoder
        self.text_encoder = text_encoder
        self.logit_scale = nn.Parameter(torch.tensor(LOGIT_SCALE_INIT))
        self.vision_projection = nn.Parameter(torch.randn(vision_width, embed_dim) * vision_width**-0.5)
        self.text_projection = nn.Parameter(torch.randn(text_encoder.width, embed_dim) * text_encoder.width**-0.5)
        self.embed_dim = embed_dim
        self.lock_vision = lock_vision
        if lock_vision:
            self.vision_encoder.requires_grad_(False)
            self.vision_encoder.eval()
        if lock_vision_projection:
            self.vision_projection.requires_grad_(False)

    def train(self, mode: bool = True) -> CLIPModel:
        """A locked image tower stays in eval mode (no drop-path), so its features are fixed."""
        super().train(mode)
        if self.lock_vision:
            self.vision_encoder.eval()
        return self

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled (CLS) image-tower features before the projection; no graph when locked."""
        if self.lock_vision:
            with torch.no_grad():
                return self.vision_encoder(images)
        return self.vision_encoder(images)

    def project_images(self, features: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        x = features.to(self.vision_projection.dtype) @ self.vision_projection
        return F.normalize(x, dim=-1) if normalize else x

    def encode_images(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self.project_images(self.image_features(images), normalize)

    def encode_texts(self, tokens: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        x = self.text_encoder(tokens) @ self.text_projection
        return F.normalize(x, dim=-1) if normalize else x

    def temperature(self) -> torch.Tensor:
        """``exp(logit_scale)`` capped at 100 (as CLIP clamps it)."""
        return self.logit_scale.clamp(max=LOGIT_SCALE_MAX).exp()

    def forward(self, tokens: torch.Tensor, images: torch.Tensor | None = None,
                image_features: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normalised image and text embeddings and the temperature.

        Pass ``images``, or ``image_features`` already computed by the locked image tower.
        """
        if (images is None) == (image_features is None):
            raise ValueError("pass exactly one of images or image_features")
        if image_features is None:
            image_features = self.image_features(images)
        return self.project_images(image_features), self.encode_texts(tokens), self.temperature()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.text_encoder.set_grad_checkpointing(enable)
        if not self.lock_vision and hasattr(self.vision_encoder, "set_grad_checkpointing"):
            self.vision_encoder.set_grad_checkpointing(enable)


def build_clip(vision_model: str = "vit_micro4", text_model: str = "text_micro", *, embed_dim: int = 0,
               image_size: int = 0, vision_depth: int = 0, text_overrides: dict[str, Any] | None = None,
               text_dropout: float = 0.0, lock_vision: bool = True, lock_vision_projection: bool = False,
               device: str | torch.device | None = None) -> CLIPModel:
    """A CLIP/LiT model from registry names; ``embed_dim`` 0 = the text tower's width."""
    vit_overrides: dict[str, Any] = {}
    if image_size:
        vit_overrides["img_size"] = image_size
    if vision_depth:
        vit_overrides["depth"] = vision_depth
    with torch.device(device) if device is not None else nullcontext():
        vision = create_vit(vision_model, **vit_overrides)
        text = create_text_encoder(text_model, dropout=text_dropout, **(text_overrides or {}))
        return CLIPModel(vision, text, embed_dim or text.width, lock_vision, lock_vision_projection)


def build_maws_clip(name: str, device: str | torch.device | None = None) -> CLIPModel:
    """The architecture of a released MAWS CLIP model (e.g. ``vit_b16_xlmr_b``), random init."""
    if name not in MAWS_CLIP_MODELS:
        raise ValueError(f"unknown MAWS CLIP model {name!r}; known: {', '.join(MAWS_CLIP_MODELS)}")
    vision, text, embed = MAWS_CLIP_MODELS[name]
    return build_clip(vision, text, embed_dim=embed, device=device)


# ------------------------------------------------------------------------------ loss


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All ranks' rows concatenated in rank order; gradients flow back to each rank's shard."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    from torch.distributed.nn.functional import all_gather

    return torch.cat(all_gather(x.contiguous()), dim=0)


def clip_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, scale: torch.Tensor,
              gather: bool = True) -> torch.Tensor:
    """Symmetric contrastive loss of a batch whose i-th image and i-th text match.

    With several ranks (``gather``), this rank's rows are scored against all ranks' columns;
    the mean over ranks of the returned value equals the loss of the whole global batch.
    """
    return clip_loss_over_slots([image_emb], [text_emb], scale, live=0, gather=gather)


def clip_loss_over_slots(image_slots: list[torch.Tensor], text_slots: list[torch.Tensor], scale: torch.Tensor,
                         live: int, gather: bool = True) -> torch.Tensor:
    """The contrastive loss of a global batch made of several micro-batches ("slots") per rank,
    of which only slot ``live`` carries a graph (open_clip's ``--accum-freq`` technique).

    The global batch is every slot of every rank: this rank's rows (all its slots) are scored
    against all columns (every rank's slots). Calling this once per slot with that slot live
    and the others' embeddings computed without a graph, and summing the gradients, gives
    exactly the gradient of the one big batch: each embedding's gradient is taken once, and the
    temperature's once (it is detached except in the last slot). The returned value is the
    whole batch's loss (on this rank's rows) in every call. Slots of one rank may differ in size;
    under several ranks each slot must have the same size on every rank (the engine's batches).
    """
    images = [(x if j == live else x.detach()).float() for j, x in enumerate(image_slots)]
    texts = [(x if j == live else x.detach()).float() for j, x in enumerate(text_slots)]
    if live != len(image_slots) - 1:  # the temperature's gradient once: in the last slot, which DDP synchronises
        scale = scale.detach()
    columns_i = [gather_with_grad(x) if gather else x for x in images]
    columns_t = [gather_with_grad(x) if gather else x for x in texts]
    rank = dist.get_rank() if gather and dist.is_available() and dist.is_initialized() else 0
    targets, offset = [], 0  # column of each local row: slots in order, ranks in order within a slot
    for x, column in zip(images, columns_i):
        targets.append(torch.arange(x.shape[0], device=x.device) + offset + rank * x.shape[0])
        offset += column.shape[0]
    targets_all = torch.cat(targets)
    all_images, all_texts = torch.cat(columns_i), torch.cat(columns_t)
    image_logits = scale * torch.cat(images) @ all_texts.t()
    text_logits = scale * torch.cat(texts) @ all_images.t()
    return (F.cross_entropy(image_logits, targets_all) + F.cross_entropy(text_logits, targets_all)) / 2


def retrieval_accuracy(image_emb: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
    """Fraction of images whose own caption is the nearest of the batch (a training signal), as a
    0-d tensor on the embeddings' device (no host sync)."""
    scores = image_emb.float() @ text_emb.float().t()
    return (scores.argmax(dim=1) == torch.arange(len(scores), device=scores.device)).float().mean()


# ------------------------------------------------------------------------------ files

CLIP_FORMAT = "maws-clip"


def clip_metadata(model: CLIPModel, tokenizer_info: dict[str, Any], image_size: int,
                  vision_model: str) -> dict[str, str]:
    """Strings saved beside the weights: enough to rebuild the model and its tokenizer."""
    shape: TextShape = model.text_encoder.shape
    vision_shape = getattr(model.vision_encoder, "prepretrain_shape", None)
    return {
        "format": CLIP_FORMAT,
        "vision_model": vision_model,
        "vision_depth": str(vision_shape.depth if vision_shape else len(model.vision_encoder.blocks)),
        "image_size": str(image_size),
        "embed_dim": str(model.embed_dim),
        "text_shape": json.dumps(shape.__dict__),
        "tokenizer": json.dumps(tokenizer_info),
    }


def save_clip(model: CLIPModel, path: str | Path, tokenizer_info: dict[str, Any], image_size: int,
              vision_model: str) -> Path:
    """Write the whole model (safetensors, MAWS CLIP key names) + metadata, atomically.

    ``tokenizer_info`` is :meth:`Tokenizer.describe` output; a relative ``model_file`` in it is
    resolved against the file's directory when loading.
    """
    return save_safetensors(path, model.state_dict(), clip_metadata(model, tokenizer_info, image_size, vision_model))


def read_clip_state(path: str | Path) -> dict[str, torch.Tensor]:
    """A CLIP/LiT (or bare RoBERTa) state dict as every consumer reads it: older torchtext block names
    renamed to the current ones, fp16/bf16 cast to the fp32 model it loads into."""
    return clip_state_from(read_state_dict(path))


def clip_state_from(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """:func:`read_clip_state` of a state dict already read."""
    prefix = "text_encoder." if any(k.startswith("text_encoder.") for k in state) else ""
    return cast_floating(upgrade_torchtext_names(state, prefix=prefix), torch.float32)


def is_open_clip_source(spec: str | Path) -> bool:
    """An open_clip model folder (``open_clip_config.json``), or a safetensors file whose header has
    open_clip's names; told without loading weights (a pickle is told apart once it is read)."""
    path = Path(spec)
    if path.is_dir():
        return is_open_clip_folder(path)
    keys = read_keys(path) if path.is_file() else None
    return keys is not None and looks_like_open_clip_state(keys)


def read_open_clip_state(path: str | Path) -> dict[str, torch.Tensor]:
    """An open_clip weights file as read for an fp32 model (its names are converted afterwards)."""
    return cast_floating(read_state_dict(path), torch.float32)


def read_any_clip(spec: str | Path, open_clip_config: str | Path = "",
                  ) -> tuple[dict[str, torch.Tensor], Path, dict[str, Any] | None, dict[str, str]]:
    """(MAWS-CLIP-layout state dict, weights path, open_clip metadata or None, file metadata) of a
    run, a CLIP file or an open_clip folder or checkpoint file; every file is read once."""
    if is_open_clip_source(spec):
        state, found, path = read_open_clip(spec, read_open_clip_state, open_clip_config)
        return state, path, found, {}
    weights = resolve_weights(spec, "clip")
    raw = read_state_dict(weights.path)
    if is_openai_clip_state(list(raw)):
        raise CheckpointMismatch(f"{weights.path} is an OpenAI-layout CLIP model (a causal text transformer): "
                                 "prepretrain's CLIP model has a RoBERTa text tower; `prepretrain convert "
                                 "--to open_clip` makes it an open_clip folder")
    if looks_like_open_clip_state(list(raw)):  # a pickled open_clip checkpoint (training's epoch_N.pt)
        state, found, path = read_open_clip(weights.path, lambda _: cast_floating(raw, torch.float32),
                                            open_clip_config)
        return state, path, found, {}
    return clip_state_from(raw), weights.path, None, weights.metadata


def text_tower_state(path: str | Path, open_clip_config: str | Path = "") -> dict[str, torch.Tensor]:
    """The text tower's weights in a file (``lit text_init=``): a MAWS CLIP / LiT file (``text_encoder.*``),
    a bare RoBERTa state dict, or an open_clip folder or checkpoint file with a RoBERTa text tower
    (:mod:`prepretrain.models.openclip`; ``open_clip_config`` names its config when it is not beside
    the file), read like :func:`load_clip` reads them."""
    state = read_any_clip(path, open_clip_config)[0]
    if any(k.startswith("text_encoder.") for k in state):
        return {k[len("text_encoder.") :]: v for k, v in state.items() if k.startswith("text_encoder.")}
    if any(k.startswith("transformer.token_embedding") for k in state):  # RobertaEncoder without the wrapper
        return {f"encoder.{k}": v for k, v in state.items()}
    return state


def load_clip(spec: str | Path, tokenizer: str = "", device: str | torch.device = "cpu",
              open_clip_config: str | Path = "") -> tuple[CLIPModel, Tokenizer, dict[str, Any]]:
    """Load a LiT run directory, our ``clip.safetensors``, an official MAWS CLIP file, or an open_clip
    folder / checkpoint file with a timm ViT and a RoBERTa text tower (:mod:`prepretrain.models.openclip`).

    Returns (model in eval mode, tokenizer, info with ``image_size`` and ``vision_model``).
    Our files carry their architecture and tokenizer in metadata; for an official MAWS file
    the towers are read from the weights' shapes and ``tokenizer`` (the XLM-R SentencePiece
    ``.model``) is required. ``open_clip_config``: the ``open_clip_config.json`` of an open_clip
    checkpoint file that has none beside it. Loading is strict: every key must fit.
    """
    state, path, found, metadata = read_any_clip(spec, open_clip_config)
    base_dir = path.parent if found is None else found["base_dir"]
    if found is not None:
        metadata = {"format": CLIP_FORMAT, "text_shape": json.dumps(found["text_shape"].__dict__),
                    "image_size": str(found["image_size"]), "tokenizer": json.dumps(found["tokenizer"])}
        vision_state = {k[len("vision_encoder.") :]: v for k, v in state.items() if k.startswith("vision_encoder.")}
        if "patch_embed.proj.weight" not in vision_state or "blocks.0.mlp.fc1.weight" not in vision_state:
            raise CheckpointMismatch(f"{path}: the image tower (visual.trunk.*) is not a timm ViT, the only image "
                                     "tower prepretrain's CLIP model has")
        name, depth, _ = vision_name_from_state(vision_state)
        metadata.update(vision_model=found["vision_model"] or name, vision_depth=str(depth))
    if not any(k.startswith("text_encoder.") for k in state):
        raise CheckpointMismatch(f"{path} has no text_encoder.* weights: not a CLIP/LiT checkpoint")
    vision_state = {k[len("vision_encoder.") :]: v for k, v in state.items() if k.startswith("vision_encoder.")}
    if metadata.get("format") == CLIP_FORMAT:
        text_shape_ = TextShape(**json.loads(metadata["text_shape"]))
        vision_model = metadata["vision_model"]
        vision_depth = int(metadata["vision_depth"])
        image_size = int(metadata["image_size"])
        info_tokenizer = json.loads(metadata["tokenizer"])
    else:
        text_shape_ = infer_text_shape(state, prefix="text_encoder.")
        vision_model, vision_depth, image_size = vision_name_from_state(vision_state)
        info_tokenizer = None
    embed_dim = int(state["text_projection"].shape[1])
    with torch.device("meta"):  # no random init of billions of parameters that are overwritten anyway
        vision = create_vit(vision_model, img_size=image_size, depth=vision_depth)
        model = CLIPModel(vision, TextEncoder(text_shape_), embed_dim)
    check_fit(model, state)
    model.load_state_dict(state, strict=True, assign=True)
    model.vision_encoder.requires_grad_(False)
    if tokenizer:
        tok = build_tokenizer(tokenizer)
    elif info_tokenizer is not None:
        tok = tokenizer_from_info(info_tokenizer, base_dir=base_dir)
    else:
        raise ConfigError(  # a ValueError; the commands print it as one line naming the key
            "tokenizer",
            f"{path} is not a prepretrain LiT file: pass tokenizer=/path/to/xlmr.sentencepiece.bpe.model "
            "(the XLM-R SentencePiece model of the MAWS CLIP release; convert: --tokenizer)"
        )
    if tok.vocab_size > text_shape_.vocab_size:
        raise CheckpointMismatch(
            f"tokenizer has {tok.vocab_size} ids but the text tower only {text_shape_.vocab_size} embeddings"
        )
    model.to(device).eval()
    info = {"path": str(path), "image_size": image_size, "vision_model": vision_model}
    return model, tok, info


def init_vision_from(model: CLIPModel, source: str | Path) -> list[str]:
    """Load a pretrained image tower (MAE/WSP/MAWS/timm file) into a LiT model's vision encoder."""
    return load_encoder_weights(model.vision_encoder, source)

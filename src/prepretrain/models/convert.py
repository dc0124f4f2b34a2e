"""``prepretrain convert``: turn one checkpoint format into another, tensor for tensor.

Targets (``to=``):

* ``prepretrain``: the layout every prepretrain command reads, as safetensors with metadata
  (architecture, resolution, pooling, classes): a timm ViT state dict for encoders and
  classifiers (SWAG/torchvision files converted), the official MAE "full" names for an MAE with
  its decoder, the MAWS-CLIP names (current torchtext generation) for CLIP models;
* ``safetensors``: the same tensors under the same names, only the container changes (a pickle
  becomes a file that cannot run code);
* ``timm``: a folder in timm's hub layout, ``config.json`` + ``model.safetensors``, which plain
  timm loads with ``timm.create_model("local-dir:FOLDER", pretrained=True)`` (timm >= 1.0.20)
  and which uploads to a model hub as it is;
* ``torchvision``: torchvision ``VisionTransformer`` names (``.safetensors``, or a ``.pth``
  pickle of plain tensors when the destination ends so);
* ``open_clip``: for a CLIP model (a LiT run, a MAWS-CLIP file, an open_clip folder, an OpenAI-layout
  CLIP file), the folder
  ``open_clip.create_model_and_transforms("local-dir:FOLDER")`` reads: config, weights,
  tokenizer (:mod:`prepretrain.models.openclip` says what and why). A CLIP model read from an
  open_clip folder converts back with ``to=prepretrain`` (``clip.safetensors`` layout).

Every conversion copies tensors exactly: round trips are bit-exact (tested).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..files import read_keys, save_safetensors, save_torch, write_text
from .checkpoints import CheckpointMismatch, read_state_dict
from .clip import CLIPModel, clip_metadata, is_open_clip_source, load_clip, save_clip
from .layouts import detect_layout, encoder_from_any, image_size_of, timm_to_torchvision, upgrade_torchtext_names
from .openclip import (
    SENTENCEPIECE_FILE,
    is_openai_clip_state,
    looks_like_open_clip_state,
    write_open_clip_folder,
    write_openai_clip_folder,
)
from .resolve import Weights, resolve_weights
from .vit import VIT_SHAPES, resolve_name, vision_name_from_state

TARGETS = ("prepretrain", "safetensors", "timm", "torchvision", "open_clip")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# timm architectures whose defaults are the paper's shapes (others are described by model_args alone).
TIMM_NAMES = {"vit_b16": "vit_base_patch16_224", "vit_l16": "vit_large_patch16_224",
              "vit_h14": "vit_huge_patch14_224"}


def convert(source: str | Path, out: str | Path, to: str = "prepretrain", model: str = "",
            tokenizer: str = "", quick_gelu: bool = True, hub_repo: str = "") -> Path:
    """Convert ``source`` (a weights file, a run directory or a released name) into ``out``.

    ``tokenizer``: the XLM-R SentencePiece ``.model`` of an official MAWS-CLIP file (``to=open_clip``);
    ``quick_gelu``: the activation of an OpenAI-layout CLIP file (``to=open_clip``; OpenAI's own: True);
    ``hub_repo``: write the open_clip folder for that model-hub repository (``hf-hub:ORG/NAME``).
    """
    if to not in TARGETS:
        raise ValueError(f"to must be one of {', '.join(TARGETS)}; got '{to}'")
    if to == "open_clip":
        return export_open_clip(source, out, tokenizer, quick_gelu, hub_repo)
    if is_open_clip_source(source):
        if to != "prepretrain":
            raise CheckpointMismatch(f"{source} is an open_clip model: convert it with to=prepretrain (a CLIP file)")
        clip, tok, info = load_clip(source)
        return save_clip(clip, out, tok.describe(), info["image_size"], info["vision_model"])
    weights = resolve_weights(source)
    state = read_state_dict(weights.path)
    if is_openai_clip_state(list(state)):
        raise CheckpointMismatch(f"{source} is an OpenAI-layout CLIP model: convert it with --to open_clip "
                                 "(prepretrain's own CLIP model has a RoBERTa text tower)")
    if looks_like_open_clip_state(list(state)) and to == "prepretrain":  # a pickled open_clip checkpoint
        del state
        clip, tok, info = load_clip(source)
        return save_clip(clip, out, tok.describe(), info["image_size"], info["vision_model"])
    if to == "safetensors":
        return save_safetensors(out, state, weights.metadata)
    layout = detect_layout(state)
    if layout == "maws_clip":
        if to != "prepretrain":
            raise CheckpointMismatch(f"{source} is a CLIP model: convert its image tower by converting it to "
                                     "prepretrain first and loading it with `encoder=` (to=timm/torchvision take "
                                     "image encoders)")
        state = upgrade_torchtext_names(state, prefix="text_encoder.")
        return save_safetensors(out, state, weights.metadata)
    if layout == "mae_full" and to == "prepretrain":
        encoder = encoder_from_any(state)
        return save_safetensors(out, state, describe(encoder, weights, model, fmt="mae-full"))
    if layout == "unknown":
        raise CheckpointMismatch(f"{source}: not a ViT checkpoint layout prepretrain knows (timm/MAWS, MAE, "
                                 f"MAWS-CLIP, SWAG, torchvision); first keys: {sorted(state)[:8]}")
    encoder = encoder_from_any(state)
    info = describe(encoder, weights, model)
    if to == "prepretrain":
        return save_safetensors(out, encoder, info)
    if to == "torchvision":
        converted = timm_to_torchvision(encoder)
        out = Path(out)
        if out.suffix == ".safetensors":
            return save_safetensors(out, converted, info)
        return save_torch(out, converted)
    return export_timm_folder(encoder, info, out)


def describe(encoder: dict[str, torch.Tensor], weights: Weights, model: str = "", fmt: str = "timm-vit") -> dict:
    """The metadata of a timm-layout encoder: architecture, resolution, classes, pooling."""
    name = resolve_name(model or weights.model or vision_name_from_state(encoder)[0])
    depth = 1 + max(int(k.split(".")[1]) for k in encoder if k.startswith("blocks."))
    image_size = image_size_of(encoder)
    num_classes = int(encoder["head.weight"].shape[0]) if "head.weight" in encoder else 0
    pool = "avg" if "fc_norm.weight" in encoder else weights.metadata.get("global_pool", "token")
    info = {**weights.metadata, "model": name, "image_size": str(image_size), "num_classes": str(num_classes),
            "global_pool": pool, "format": fmt}
    if depth != VIT_SHAPES[name].depth:
        info["depth"] = str(depth)
    return info


def timm_config(info: dict[str, str], encoder: dict[str, torch.Tensor]) -> dict[str, Any]:
    """timm's hub ``config.json`` for the encoder: an architecture and the arguments that give its shapes."""
    name = info["model"]
    shape = VIT_SHAPES[name]
    width = int(encoder["patch_embed.proj.weight"].shape[0])
    depth = int(info.get("depth") or shape.depth)
    image_size, num_classes, pool = int(info["image_size"]), int(info["num_classes"]), info["global_pool"]
    mlp = int(encoder["blocks.0.mlp.fc1.weight"].shape[0])
    model_args = {
        "img_size": image_size, "patch_size": int(encoder["patch_embed.proj.weight"].shape[-1]), "embed_dim": width,
        "depth": depth, "num_heads": shape.num_heads, "mlp_ratio": mlp / width, "qkv_bias": True,
        "class_token": True, "global_pool": pool, "fc_norm": pool == "avg", "num_classes": num_classes,
    }
    return {
        "architecture": TIMM_NAMES.get(name, "vit_base_patch16_224"),
        "num_classes": num_classes,
        "num_features": width,
        "global_pool": pool,
        "model_args": model_args,
        "pretrained_cfg": {
            "input_size": [3, image_size, image_size], "fixed_input_size": True, "interpolation": "bicubic",
            "crop_pct": 1.0, "crop_mode": "center", "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD),
            "num_classes": num_classes, "first_conv": "patch_embed.proj", "classifier": "head",
            "tag": info.get("release", "prepretrain"),
        },
    }


def export_timm_folder(encoder: dict[str, torch.Tensor], info: dict[str, str], out: str | Path) -> Path:
    """``out/config.json`` + ``out/model.safetensors``: what ``timm.create_model("local-dir:out")`` reads."""
    out = Path(out)
    if out.suffix in (".safetensors", ".pt", ".pth", ".bin"):
        raise ValueError(f"to=timm writes a folder (config.json + model.safetensors); {out} looks like a file")
    save_safetensors(out / "model.safetensors", encoder)
    write_text(out / "config.json", json.dumps(timm_config(info, encoder), indent=2) + "\n")
    return out


# Registered timm names whose default model is the registry's architecture at 224 px (DeiT-Ti/S shapes too).
REGISTERED_TIMM_NAMES = {**TIMM_NAMES, "vit_ti16": "vit_tiny_patch16_224", "vit_s16": "vit_small_patch16_224"}


def registered_timm_name(vision: dict[str, torch.Tensor], vision_model: str, image_size: int) -> str:
    """timm's registered name whose default model has exactly these tensors' shapes (built on the meta
    device), or "" when none does (then the tower is described by a config file)."""
    import timm

    name = REGISTERED_TIMM_NAMES.get(vision_model, "")
    if not name or image_size != 224:
        return ""
    with torch.device("meta"):
        reference = timm.create_model(name, pretrained=False, num_classes=0)
    shapes = {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    return name if shapes == {k: tuple(v.shape) for k, v in vision.items()} else ""


def export_open_clip(source: str | Path, out: str | Path, tokenizer: str = "", quick_gelu: bool = True,
                     hub_repo: str = "") -> Path:
    """Write the open_clip folder of a CLIP model (``to=open_clip``), see :mod:`prepretrain.models.openclip`:
    a LiT run, a MAWS-CLIP file, or an OpenAI-layout CLIP file (``quick_gelu``: its activation)."""
    path = Path(source)
    if path.is_file():  # OpenAI's layout is told by its names: a safetensors header, else the pickle read
        keys = read_keys(path)
        state = read_state_dict(path) if keys is None else None
        if is_openai_clip_state(keys if keys is not None else list(state)):
            return write_openai_clip_folder(out, state if state is not None else read_state_dict(path), quick_gelu,
                                            hub_repo)
        del state  # a pickle is read again by load_clip (once more, for a one-off conversion)
    model, tok, info = load_clip(source, tokenizer=tokenizer)
    return write_clip_for_open_clip(model, tok, int(info["image_size"]), info["vision_model"], out, hub_repo)


def write_clip_for_open_clip(model: CLIPModel, tok, image_size: int, vision_model: str, out: str | Path,
                             hub_repo: str = "") -> Path:
    """The open_clip folder of a loaded :class:`CLIPModel` and its tokenizer."""
    state = model.state_dict()
    vision = {k[len("vision_encoder."):]: v for k, v in state.items() if k.startswith("vision_encoder.")}
    timm_name = registered_timm_name(vision, vision_model, image_size)
    tower_config = None
    if not timm_name:
        depth = 1 + max(int(k.split(".")[1]) for k in vision if k.startswith("blocks."))
        tower_info = {"model": vision_model, "image_size": str(image_size), "num_classes": "0",
                      "global_pool": "token", "depth": str(depth)}
        tower_config = timm_config(tower_info, vision)
    tokenizer_info = tok.describe()
    if tokenizer_info.get("kind") == "sentencepiece":
        tokenizer_info["model_file"] = SENTENCEPIECE_FILE  # the copy in the folder, found relative to it
    metadata = clip_metadata(model, tokenizer_info, image_size, vision_model)
    return write_open_clip_folder(out, state, model.text_encoder.shape, tok, embed_dim=model.embed_dim,
                                  image_size=image_size, timm_model_name=timm_name, timm_tower_config=tower_config,
                                  mean=IMAGENET_MEAN, std=IMAGENET_STD, prepretrain=metadata, hub_repo=hub_repo)

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
  pickle of plain tensors when the destination ends so).

Every conversion copies tensors exactly: round trips are bit-exact (tested).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..files import save_safetensors, save_torch, write_text
from .checkpoints import CheckpointMismatch, read_state_dict
from .layouts import detect_layout, encoder_from_any, image_size_of, timm_to_torchvision, upgrade_torchtext_names
from .resolve import Weights, resolve_weights
from .vit import VIT_SHAPES, resolve_name, vision_name_from_state

TARGETS = ("prepretrain", "safetensors", "timm", "torchvision")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# timm architectures whose defaults are the paper's shapes (others are described by model_args alone).
TIMM_NAMES = {"vit_b16": "vit_base_patch16_224", "vit_l16": "vit_large_patch16_224",
              "vit_h14": "vit_huge_patch14_224"}


def convert(source: str | Path, out: str | Path, to: str = "prepretrain", model: str = "") -> Path:
    """Convert ``source`` (a weights file, a run directory or a released name) into ``out``."""
    if to not in TARGETS:
        raise ValueError(f"to must be one of {', '.join(TARGETS)}; got '{to}'")
    weights = resolve_weights(source)
    state = read_state_dict(weights.path)
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

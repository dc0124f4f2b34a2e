"""The models of the MAWS recipe, timm-compatible.

The public face for notebooks and scripts::

    from prepretrain.models import create_vit, create_mae, load_encoder

    vit = create_vit("vit_b16")                       # timm VisionTransformer, CLS pooling, no head
    mae = create_mae("vit_b16")                       # encoder + 512 x 8 decoder, official MAE key names
    encoder = load_encoder("runs/wsp")                # any run directory or weights file, or "" (random)

Deeper modules: ``vit`` (family and registry), ``mae``, ``heads``, ``text`` and ``tokenizers``,
``clip`` (LiT), ``checkpoints`` (safe reading, strict fitting), ``resolve`` (the one resolver).
"""

from .checkpoints import CheckpointMismatch, read_state_dict
from .clip import load_clip
from .mae import MaskedAutoencoder, create_mae
from .resolve import Weights, load_encoder, resolve_weights
from .vit import VIT_SHAPES, create_vit

__all__ = [
    "VIT_SHAPES",
    "CheckpointMismatch",
    "MaskedAutoencoder",
    "Weights",
    "create_mae",
    "create_vit",
    "load_clip",
    "load_encoder",
    "read_state_dict",
    "resolve_weights",
]

"""The one resolver: "a run directory, a weights file or nothing" -> weights plus what they are.

Every consumer of pretrained weights goes through here: ``wsp init=``, ``lit encoder=``,
``encoder=`` of the probe, low-shot, kNN and finetune commands, ``zeroshot model=``, the
pipeline, and :func:`load_encoder` for notebooks. Users hand us three kinds of thing:

* a run directory of ``prepretrain mae|wsp|lit``: its exported ``encoder.safetensors`` (or, as
  a fallback, an MAE ``mae_full.safetensors``), its ``clip.safetensors`` (LiT), a WSP run's
  ``head.safetensors`` + ``vocab.json``; the architecture comes from the weights' metadata,
  with the run's ``config.yaml`` as the fallback;
* a weights file (timm, MAWS, MAE "full" or encoder-only, MAWS CLIP, ours): its safetensors
  metadata when it has some, else the caller's ``model=``; the depth is read off the block
  count, which cannot change what the weights mean;
* nothing (``""``): a seeded random init (timm's scheme), the baseline every gain is measured
  against; or ``mae-init``: a seeded random init with the MAE reference's scheme, the weights an
  MAE run starts from, which separates what MAE learns from how it initialises.

Metadata is read in one place (:func:`prepretrain.files.read_metadata`) and written by one
function (:func:`encoder_metadata`).
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from timm.models.vision_transformer import VisionTransformer

from ..config import ConfigError
from ..files import read_metadata, weights_sha256
from .checkpoints import header_tensors, load_encoder_weights, read_state_dict
from .layouts import CheckpointMismatch, encoder_from_any, image_size_of
from .mae import mae_init_encoder
from .vit import create_vit, resolve_name, vit_shape
from .zoo import is_release_name, locate

ENCODER_FILE, MAE_FULL_FILE, CLIP_FILE = "encoder.safetensors", "mae_full.safetensors", "clip.safetensors"
HEAD_FILE, VOCAB_FILE = "head.safetensors", "vocab.json"
MAE_INIT = "mae-init"  # encoder=/init= value: an untrained encoder with the MAE initialisation (seeded)
# Block keys of a timm encoder, bare or under the wrappers ``read_state_dict``/``encoder_from_any`` strip.
_BLOCK_KEY = re.compile(r"^(?:vision_encoder\.|module\.|_orig_mod\.|encoder\.|visual\.trunk\.)?blocks\.(\d+)\.")
_RUN_KEYS = ("model", "image_size")  # what a run's config.yaml tells about its weights


@dataclass(frozen=True)
class Weights:
    """A resolved weights file and what is known about it."""

    path: Path
    metadata: dict[str, str] = field(default_factory=dict)  # architecture, image_size, stage, ...
    run_dir: Path | None = None  # the run directory it came from, if any
    head: Path | None = None  # a WSP run's hashtag head
    vocab: Path | None = None  # ... and the vocabulary naming its rows

    @property
    def model(self) -> str:
        """Registry name of the (image) architecture, or "" when the file does not say."""
        return self.metadata.get("model") or self.metadata.get("vision_model") or ""

    @property
    def image_size(self) -> int:
        return int(self.metadata.get("image_size") or 0)


def resolve_weights(spec: str | Path, part: str = "encoder") -> Weights:
    """The weights ``spec`` names: a file as given, or the ``part`` of a run directory: ``encoder``
    (a timm ViT), ``clip`` (a LiT/MAWS-CLIP model) or ``mae`` (the full MAE with its decoder)."""
    if is_release_name(spec):
        entry, path = locate(str(spec))
        return Weights(path, {**entry.metadata(), **_non_empty(read_metadata(path))})
    path = Path(spec)
    if path.is_file():
        return Weights(path, _non_empty(read_metadata(path)))
    if not path.is_dir():
        raise FileNotFoundError(f"{spec}: no such run directory or weights file")
    names = {"encoder": (ENCODER_FILE, MAE_FULL_FILE, CLIP_FILE), "clip": (CLIP_FILE,), "mae": (MAE_FULL_FILE,)}[part]
    found = next((path / name for name in names if (path / name).is_file()), None)
    if found is None:
        present = sorted(p.name for p in path.iterdir())[:20]
        raise FileNotFoundError(
            f"{spec}: a run directory must contain {' or '.join(names)} (written when a mae, wsp or lit run "
            f"finishes); found {present}. Is the run finished? Or pass a weights file."
        )
    metadata = {k: str(v) for k, v in _run_config(path).items() if k in _RUN_KEYS and v not in (None, "")}
    metadata.update(_non_empty(read_metadata(found)))
    head, vocab = path / HEAD_FILE, path / VOCAB_FILE
    if head.is_file() and vocab.is_file():
        return Weights(found, metadata, path, head, vocab)
    return Weights(found, metadata, path)


def check_weights(key: str, spec: str) -> None:
    """A ConfigError naming ``key`` when ``spec`` is neither an existing path nor a released
    checkpoint on this machine: checked before any compute."""
    if not spec or spec == MAE_INIT:
        return
    if is_release_name(spec):
        try:
            locate(spec)
        except FileNotFoundError as error:
            raise ConfigError(key, str(error)) from None
    elif not Path(spec).exists():
        raise ConfigError(key, f"no such run directory, weights file or released name: {spec}")


def encoder_metadata(model: str, image_size: int, **extra: object) -> dict[str, str]:
    """Saved beside encoder weights so every later consumer rebuilds the same architecture."""
    return {"model": model, "image_size": str(image_size), "format": "timm-vit",
            **{key: str(value) for key, value in extra.items()}}


def _non_empty(metadata: dict[str, str]) -> dict[str, str]:
    return {k: v for k, v in metadata.items() if v}


def _run_config(run_dir: Path) -> dict:
    config = run_dir / "config.yaml"
    if not config.is_file():
        return {}
    loaded = yaml.safe_load(config.read_text())
    return loaded if isinstance(loaded, dict) else {}


# ------------------------------------------------------------------------------ encoders


@dataclass(frozen=True)
class EncoderSpec:
    """A resolved encoder: enough to rebuild it and to name it in caches and results."""

    model: str  # registry name (vit_micro4, vit_b16, ...)
    depth: int  # number of blocks actually present in the weights
    image_size: int  # resolution the encoder runs at (position embeddings interpolated to it)
    path: Path | None  # weights file; None = random init
    # sha256 of the weights' tensors (files.weights_sha256), or "<init>:<model>:<depth>:<seed>" (random, mae-init)
    identity: str
    seed: int = 0  # random-init seed (only used when path is None)
    init: str = "random"  # without a file: "random" (timm's initialisation) or "mae-init" (the MAE's)

    @property
    def description(self) -> str:
        if self.path is not None:
            return str(self.path)
        scheme = "MAE initialisation, untrained" if self.init == MAE_INIT else "random init"
        return f"{scheme} ({self.model}, seed {self.seed})"


def weights_identity(path: Path) -> str:
    """What names a weights file in caches and results: a hash of its tensors, not of its metadata
    (so re-exporting the same weights, whose header may list the metadata in another order, keeps
    the feature cache)."""
    return weights_sha256(path)


def count_blocks(keys: list[str]) -> int:
    """Depth of the encoder whose state-dict keys are ``keys`` (0 when none look like blocks)."""
    ids = {int(m.group(1)) for key in keys if (m := _BLOCK_KEY.match(key))}
    return max(ids) + 1 if ids else 0


def resolve_encoder(encoder: str | Path, model: str = "vit_micro4", image_size: int = 0, seed: int = 0) -> EncoderSpec:
    """Resolve ``encoder=`` (run dir, file, ``mae-init``, or empty for random init) into an :class:`EncoderSpec`.

    ``model`` is used when the weights carry no architecture metadata. ``image_size`` > 0
    overrides the encoder's own resolution (position embeddings are interpolated), 0 keeps it.
    """
    if not encoder or encoder == MAE_INIT:
        name = resolve_name(model)
        shape = vit_shape(name)
        size = image_size or shape.img_size
        init = MAE_INIT if encoder else "random"
        return EncoderSpec(name, shape.depth, size, None, f"{init}:{name}:{shape.depth}:{seed}", seed, init)
    weights = resolve_weights(encoder)
    name = resolve_name(weights.model or model)
    state = encoder_tensors(weights.path)
    depth = count_blocks(list(state)) or vit_shape(name).depth
    native = weights.image_size or native_image_size(state)
    size = image_size or native or vit_shape(name).img_size
    if image_size and native and image_size != native:
        print(f"[prepretrain] {encoder}: the weights were made for {native} px; running at image_size={image_size} "
              "with the position embedding interpolated", file=sys.stderr, flush=True)
    return EncoderSpec(name, depth, size, weights.path, weights_identity(weights.path), seed)


def encoder_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The timm-layout encoder tensors of a weights file (any supported layout); from a
    safetensors file as meta tensors read off its header, without loading data."""
    return encoder_from_any(header_tensors(path))


def native_image_size(state: dict[str, torch.Tensor]) -> int:
    """The resolution an encoder's position embedding was made for (0 when it does not say)."""
    try:
        return image_size_of(state)
    except CheckpointMismatch:
        return 0


def build_encoder(spec: EncoderSpec, *, num_classes: int = 0, global_pool: str = "token",
                  drop_path_rate: float = 0.0) -> VisionTransformer:
    """The timm ViT of ``spec`` with its weights loaded (pos-embed interpolated to ``image_size``).

    With ``global_pool="avg"`` timm replaces the final ``norm`` by a fresh ``fc_norm`` after
    pooling (the MAE finetuning model), so a checkpoint's ``norm`` is dropped rather than failing.
    """
    default_depth = vit_shape(spec.model).depth
    overrides = {"depth": spec.depth} if spec.depth != default_depth else {}
    if spec.path is None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.seed)
            model = create_vit(spec.model, num_classes=num_classes, global_pool=global_pool,
                               drop_path_rate=drop_path_rate, img_size=spec.image_size, **overrides)
        if spec.init != MAE_INIT:
            return model
        state = mae_init_state(spec.model, spec.seed, img_size=spec.image_size, **overrides)
    else:
        model = create_vit(spec.model, num_classes=num_classes, global_pool=global_pool,
                           drop_path_rate=drop_path_rate, img_size=spec.image_size, **overrides)
        state = encoder_from_any(read_state_dict(spec.path))
    own = model.state_dict()
    if not any(k.startswith("norm.") for k in own):
        state = {k: v for k, v in state.items() if not k.startswith("norm.")}
    load_encoder_weights(model, state)
    return model


def mae_init_state(model: str, seed: int, **overrides: object) -> dict[str, torch.Tensor]:
    """The encoder weights ``mae-init`` names: timm keys, the MAE initialisation drawn from ``seed``."""
    return mae_init_encoder(resolve_name(model), seed, **overrides).state_dict()


def load_encoder(source: str | Path = "", *, model: str = "vit_micro4", image_size: int = 0, num_classes: int = 0,
                 global_pool: str = "token", drop_path_rate: float = 0.0, seed: int = 0) -> VisionTransformer:
    """A timm ``VisionTransformer`` from any supported weights: a prepretrain run directory (MAE,
    WSP, LiT), a timm/MAWS/MAE/MAWS-CLIP file, ``""`` for a seeded random init, or ``"mae-init"``
    for a seeded untrained encoder with the MAE's initialisation.

    ``model`` names the architecture when the file does not; ``image_size`` > 0 runs it at
    another resolution (position embeddings interpolated); ``num_classes`` adds a fresh head.
    """
    spec = resolve_encoder(source, model, image_size, seed)
    return build_encoder(spec, num_classes=num_classes, global_pool=global_pool, drop_path_rate=drop_path_rate)

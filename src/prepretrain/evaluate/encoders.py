"""Which encoder to evaluate: a run directory, a raw weights file, or a random-init baseline.

Every transfer evaluation (probe, low-shot, kNN, finetune, and zero-shot on top) starts from
"some ViT encoder". Users hand us three kinds of thing, and we resolve all of them into one
:class:`EncoderSpec` (architecture, resolution, identity) so that the rest of the code never
cares where the weights came from:

* a run directory of ``prepretrain mae|wsp|lit``: ``encoder.safetensors`` whose safetensors
  metadata names ``model`` and ``image_size`` (``config.yaml`` is the fallback);
* a raw state-dict file (timm, MAWS, MAE "full", MAWS CLIP): the architecture comes from the
  file's metadata when it has some, else from the command's ``model=``; the depth is read off
  the block count, which cannot change what the weights mean (unlike the head count);
* nothing (``encoder=""``): a seeded random init, the baseline every gain is measured against.

The identity (a SHA-256 of the weights file, or the random-init recipe) keys the feature cache.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from timm.models.vision_transformer import VisionTransformer

from ..models.checkpoints import encoder_from_any, load_encoder, read_state_dict
from ..models.vit import create_vit, resolve_name, vit_shape

ENCODER_FILE = "encoder.safetensors"
# Block keys of a timm encoder, bare or under the wrappers ``read_state_dict``/``encoder_from_any`` strip.
_BLOCK_KEY = re.compile(r"^(?:vision_encoder\.|module\.|_orig_mod\.|encoder\.|visual\.trunk\.)?blocks\.(\d+)\.")


@dataclass(frozen=True)
class EncoderSpec:
    """A resolved encoder: enough to rebuild it and to name it in caches and results."""

    model: str  # registry name (vit_micro4, vit_b16, ...)
    depth: int  # number of blocks actually present in the weights
    image_size: int  # resolution the evaluation runs at (position embeddings interpolated to it)
    path: Path | None  # weights file; None = random init
    identity: str  # sha256 of the weights file, or "random:<model>:<depth>:<seed>"
    seed: int = 0  # random-init seed (only used when path is None)

    @property
    def description(self) -> str:
        return str(self.path) if self.path is not None else f"random init ({self.model}, seed {self.seed})"


def file_sha256(path: str | Path, chunk_bytes: int = 8 << 20) -> str:
    """Content hash of a weights file: the cache must notice retrained weights at the same path."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def safetensors_metadata(path: Path) -> dict[str, str]:
    """The string metadata stored in a safetensors header ({} for other formats)."""
    if path.suffix != ".safetensors":
        return {}
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


def _run_config(run_dir: Path) -> dict:
    config = run_dir / "config.yaml"
    if not config.is_file():
        return {}
    loaded = yaml.safe_load(config.read_text())
    return loaded if isinstance(loaded, dict) else {}


def weights_file(encoder: str | Path) -> tuple[Path, dict[str, str]]:
    """The weights file of ``encoder`` (a run dir or a file) and what is known about its architecture."""
    path = Path(encoder)
    if path.is_dir():
        weights = path / ENCODER_FILE
        if not weights.is_file():
            present = sorted(p.name for p in path.iterdir())[:20]
            raise FileNotFoundError(
                f"encoder={encoder}: a run directory must contain {ENCODER_FILE} (written by the mae, wsp and lit "
                f"commands); found {present}"
            )
        info = {k: str(v) for k, v in _run_config(path).items() if k in ("model", "image_size")}
        info.update({k: v for k, v in safetensors_metadata(weights).items() if v})
        return weights, info
    if path.is_file():
        return path, {k: v for k, v in safetensors_metadata(path).items() if v}
    raise FileNotFoundError(f"encoder={encoder}: no such run directory or weights file")


def count_blocks(keys: list[str]) -> int:
    """Depth of the encoder whose state-dict keys are ``keys`` (0 when none look like blocks)."""
    ids = {int(m.group(1)) for key in keys if (m := _BLOCK_KEY.match(key))}
    return max(ids) + 1 if ids else 0


def state_dict_keys(path: Path) -> list[str]:
    """Keys of a weights file; safetensors headers are read without loading a (possibly 26 GB) file."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            return list(handle.keys())
    return list(read_state_dict(path))


def resolve_encoder(encoder: str, model: str = "vit_micro4", image_size: int = 0, seed: int = 0) -> EncoderSpec:
    """Resolve ``encoder=`` (run dir, file, or empty for random init) into an :class:`EncoderSpec`.

    ``model`` is used when the weights carry no architecture metadata. ``image_size`` > 0
    overrides the encoder's own resolution (position embeddings are interpolated), 0 keeps it.
    """
    if not encoder:
        name = resolve_name(model)
        shape = vit_shape(name)
        size = image_size or shape.img_size
        return EncoderSpec(name, shape.depth, size, None, f"random:{name}:{shape.depth}:{seed}", seed)
    path, info = weights_file(encoder)
    name = resolve_name(info.get("model") or model)
    depth = count_blocks(state_dict_keys(path)) or vit_shape(name).depth
    size = image_size or int(info.get("image_size") or 0) or vit_shape(name).img_size
    return EncoderSpec(name, depth, size, path, file_sha256(path), seed)


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
            return create_vit(spec.model, num_classes=num_classes, global_pool=global_pool,
                              drop_path_rate=drop_path_rate, img_size=spec.image_size, **overrides)
    model = create_vit(spec.model, num_classes=num_classes, global_pool=global_pool,
                       drop_path_rate=drop_path_rate, img_size=spec.image_size, **overrides)
    state = encoder_from_any(read_state_dict(spec.path))
    own = model.state_dict()
    if not any(k.startswith("norm.") for k in own):
        state = {k: v for k, v in state.items() if not k.startswith("norm.")}
    load_encoder(model, state)
    return model

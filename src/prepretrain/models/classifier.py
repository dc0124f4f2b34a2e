"""A trained classifier and what its outputs are: weights, architecture, classes, evaluation transform.

``prepretrain classify model=...`` takes a finetune run directory, a released finetune
(``maws:vit_h14_ft_in1k``), or a classifier file in any layout prepretrain reads (timm/MAWS/MAE,
SWAG, torchvision). To score it on a labelled set whose classes are numbered differently (a
model trained on ``train/<wnid>/`` folders, evaluated on ImageNet-v2's ``0`` ... ``999``), each
output must be known by its **class id**. Where that comes from, in order:

* ``classes=FILE`` (one id per line, or ``imagenet1k``), when the user says;
* the weights' own metadata (``class_ids`` / ``class_names``, JSON lists): what a finetune run
  writes (:func:`classifier_metadata`);
* a released ImageNet-1k finetune: the 1000 ImageNet classes;
* a file without metadata with a 1000-way head: ImageNet-1k, said as an assumption in the results;
* otherwise the outputs are numbered ``0`` ... ``C-1``, which only a set labelled the same way fits.

The evaluation transform is the model's own, overridable with ``eval_crop=``: the metadata's
``eval_crop`` (a finetune run's setting); the MAWS release's (resize to a square, no crop); SWAG's
(crop fraction 1.0); the MAE reference's (0.875 up to 224 px, else 1.0); timm's 0.875 otherwise.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from timm.models.vision_transformer import VisionTransformer

from ..config import ConfigError
from ..files import read_metadata
from .checkpoints import header_tensors, load_encoder_weights, read_state_dict
from .layouts import CheckpointMismatch, detect_layout, encoder_from_any, image_size_of
from .resolve import count_blocks, resolve_weights
from .vit import create_vit, resolve_name, vision_name_from_state, vit_shape
from .zoo import is_release_name

CLASSIFIER_FILES = ("best.safetensors", "last.safetensors")  # a finetune run's exports, in order of preference
IMAGENET1K = "imagenet1k"


@dataclass(frozen=True)
class ClassifierSpec:
    """A resolved classifier: how to rebuild it, what its outputs are, how it sees images."""

    path: Path
    model: str
    depth: int
    image_size: int
    num_classes: int
    global_pool: str
    class_ids: tuple[str, ...]
    class_names: tuple[str, ...]
    classes_from: str  # where the class ids came from (reported in results.json)
    eval_crop: str  # auto | squash | a crop fraction (transforms.crop_eval_transform)
    eval_from: str  # where the transform came from


def classifier_metadata(class_ids: list[str], class_names: list[str] | None = None,
                        eval_crop: str = "auto") -> dict[str, str]:
    """What a classifier's weights file says about its outputs (merged into a stage's metadata)."""
    return {"class_ids": json.dumps([str(c) for c in class_ids]),
            "class_names": json.dumps([str(c) for c in (class_names or class_ids)]),
            "eval_crop": str(eval_crop)}


def imagenet_classes() -> tuple[tuple[str, ...], tuple[str, ...]]:
    from ..data.readers.releases import imagenet_names, imagenet_wnids

    return imagenet_wnids(), tuple(imagenet_names())


def read_class_ids(path: str) -> tuple[str, ...]:
    """Class ids from ``classes=``: ``imagenet1k`` or a file with one id per line (first word of a line)."""
    if path == IMAGENET1K:
        return imagenet_classes()[0]
    file = Path(path)
    if not file.is_file():
        raise ConfigError("classes", f"file not found: {path} (or imagenet1k)")
    ids = [line.split()[0].split(",")[0] for line in file.read_text(encoding="utf-8").splitlines()
           if line.strip() and not line.startswith("#")]
    if not ids:
        raise ConfigError("classes", f"{path}: no class ids in it")
    return tuple(ids)


def _classifier_file(model: str) -> tuple[Path, dict[str, str], str]:
    """(weights file, its metadata, the release name or "") of ``model=``."""
    path = Path(model)
    if not is_release_name(model) and path.is_dir():
        found = next((path / name for name in CLASSIFIER_FILES if (path / name).is_file()), None)
        if found is None:
            present = sorted(p.name for p in path.iterdir())[:12]
            raise ConfigError("model", f"{model}: not a finished finetune run (no {' or '.join(CLASSIFIER_FILES)}; "
                                       f"found {present}). A pretraining run has no classifier: finetune it first, "
                                       "or use probe/knn on its encoder")
        return found, read_metadata(found), ""
    if not is_release_name(model) and not path.is_file():
        raise ConfigError("model", f"no such finetune run, classifier file or released name: {model}")
    weights = resolve_weights(model)
    return weights.path, weights.metadata, weights.metadata.get("release", "")


def default_eval_crop(metadata: dict[str, str], release: str, layout: str, has_fc_norm: bool,
                      image_size: int) -> tuple[str, str]:
    """(eval_crop, where it came from) for a classifier without an explicit ``eval_crop=``."""
    if metadata.get("eval_crop"):
        return metadata["eval_crop"], "the weights' metadata"
    if release.startswith("maws:"):
        return "squash", "the MAWS release (resize to a square, no crop)"
    if layout == "swag":
        return "1.0", "SWAG's evaluation (resize the shorter side, center crop)"
    if has_fc_norm:
        crop = "0.875" if image_size <= 224 else "1.0"
        return crop, "the MAE reference's finetune evaluation (crop 0.875 up to 224 px, else 1.0)"
    return "0.875", "timm's default (crop 0.875)"


def resolve_classifier(model: str, arch: str = "", image_size: int = 0, classes: str = "",
                       eval_crop: str = "") -> ClassifierSpec:
    """Everything :func:`build_classifier` and ``classify`` need to know about ``model=``."""
    path, metadata, release = _classifier_file(model)
    if metadata.get("format") == "prepretrain-video-vit":
        raise ConfigError("model", f"{path} is a video classifier: it scores clips (prepretrain video evaluates it "
                                   "over temporal x spatial views), not images")
    raw = header_tensors(path)
    layout = detect_layout(raw)
    try:
        state = encoder_from_any(raw)
    except CheckpointMismatch as error:
        raise CheckpointMismatch(f"{path}: {error}") from None
    if "head.weight" not in state:
        raise ConfigError("model", f"{path} has no classification head (an encoder): finetune it first, or use "
                                   "probe/knn/lowshot to evaluate an encoder")
    num_classes = int(state["head.weight"].shape[0])
    name = resolve_name(arch or metadata.get("model") or vision_name_from_state(state)[0])
    depth = count_blocks(list(state)) or vit_shape(name).depth
    native = int(metadata.get("image_size") or 0) or image_size_of(state)
    size = image_size or native
    has_fc_norm = "fc_norm.weight" in state
    pool = "avg" if has_fc_norm else metadata.get("global_pool", "token")
    if classes:
        ids = read_class_ids(classes)
        names = imagenet_classes()[1] if classes == IMAGENET1K else ids
        origin = f"classes={classes}"
    elif metadata.get("class_ids"):
        ids = tuple(json.loads(metadata["class_ids"]))
        names = tuple(json.loads(metadata.get("class_names") or metadata["class_ids"]))
        origin = "the weights' metadata"
    elif release and num_classes == 1000:
        ids, names = imagenet_classes()
        origin = f"ImageNet-1k ({release})"
    elif num_classes == 1000:
        ids, names = imagenet_classes()
        origin = "ImageNet-1k, assumed: a 1000-way head and no class list in the file (classes=FILE to say otherwise)"
    else:
        ids = names = tuple(str(i) for i in range(num_classes))
        origin = "output numbers: the file names no classes (classes=FILE)"
    if len(ids) != num_classes:
        raise ConfigError("classes", f"{len(ids)} class ids for a {num_classes}-way head ({origin})")
    if eval_crop:
        crop, crop_from = eval_crop, "eval_crop="
    else:
        crop, crop_from = default_eval_crop(metadata, release, layout, has_fc_norm, size)
    return ClassifierSpec(path, name, depth, size, num_classes, pool, tuple(ids), tuple(names), origin, crop,
                          crop_from)


def build_classifier(spec: ClassifierSpec) -> VisionTransformer:
    """The timm ViT classifier of ``spec`` with every weight loaded (head included; the position
    embedding interpolated when it runs at another resolution)."""
    overrides = {"depth": spec.depth} if spec.depth != vit_shape(spec.model).depth else {}
    net = create_vit(spec.model, num_classes=spec.num_classes, global_pool=spec.global_pool,
                     img_size=spec.image_size, **overrides)
    left = load_encoder_weights(net, read_state_dict(spec.path))
    if left:
        raise CheckpointMismatch(f"{spec.path}: the classifier's {', '.join(left[:5])} are not in the file")
    return net.eval()


__all__ = ["ClassifierSpec", "build_classifier", "classifier_metadata", "resolve_classifier"]

"""Detection data: COCO/LVIS-format annotations, the synthetic COCO-format default, and LSJ.

Why real COCO JSON even for the default: the same reader, augmentation and pycocotools
evaluation then run on the synthetic set as on COCO or LVIS, so the default run exercises the
whole path a user's data takes. :func:`synthetic_coco` draws images of coloured rectangles,
ellipses and triangles (3 categories, 2-6 objects per image, later shapes occluding earlier
ones; each instance's mask is its *visible* part, its box that mask's extent) and writes them as
PNG files plus ``annotations/instances_{split}.json`` (RLE masks), deterministically from
``(seed, split, index)``; an existing complete set (its JSON is written last) is reused.

A dataset folder is ``annotations/instances_{train,val}.json`` + ``{train,val}/`` (or
``{train,val}2017/``) images; explicit annotation files and image folders work too. LVIS files
(``images[*].neg_category_ids`` / ``categories[*].frequency``) are read the same way (an LVIS
image without ``file_name`` is found by the last part of its ``coco_url``).

Masks: polygons, uncompressed and compressed RLE through ``pycocotools.mask``. Crowd
annotations (``iscrowd=1``) are kept apart as ignore regions (``crowd_boxes``), never as
training positives; pycocotools ignores them in evaluation.

Training samples go through large-scale jitter (ViTDet): resize so the image fits a square
of ``scale * image_size`` with ``scale ~ U(lsj_min, lsj_max)``, random crop to at most
``image_size`` square, pad to the square with the mean pixel, random horizontal flip; boxes
are recomputed from the cropped masks when masks are on (as ViTDet's ``recompute_boxes``).

Transport: the training loop's collate stacks tensors, and targets differ in length per
image, so a sample carries its targets as one compact JSON string (boxes, labels, crowd boxes,
masks as compressed RLE), which ``default_collate`` keeps as a list of strings; the stage
decodes them on the training device (:func:`decode_target`). The image is a uint8 square.
"""

from __future__ import annotations

import json
import random
import zlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from prepretrain import files
from prepretrain.data.records import BadSample
from prepretrain.data.synthetic.images import SHAPES, draw_object_scene

SYNTHETIC_CATEGORIES = ["rectangle", "ellipse", "triangle"]
# The synthetic set's two styles and their categories: flat shapes on a noisy ramp, or the
# embedded pretraining dataset's textured objects on its backgrounds (data.synthetic.images).
SYNTHETIC_STYLES = {"shapes": SYNTHETIC_CATEGORIES, "objects": SHAPES}
SYNTHETIC_VERSION = 1  # bump when the drawing changes, so cached sets are redrawn
MEAN_PIXEL = (124, 116, 104)  # ImageNet mean in 0-255: zero after normalisation, like ViTDet's padding


# ------------------------------------------------------------------------------ synthetic


def _draw_shape(kind: int, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One shape's full mask (size x size, bool) and its polygon/ellipse bounding params."""
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    width, height = rng.uniform(0.18, 0.45, 2) * size
    cx, cy = rng.uniform(0.1, 0.9, 2) * size
    x0, y0, x1, y1 = cx - width / 2, cy - height / 2, cx + width / 2, cy + height / 2
    if kind == 0:
        draw.rectangle([x0, y0, x1, y1], fill=1)
    elif kind == 1:
        draw.ellipse([x0, y0, x1, y1], fill=1)
    else:
        apex = rng.uniform(x0, x1)
        points = [(apex, y0), (x1, y1), (x0, y1)] if rng.random() < 0.5 else [(apex, y1), (x1, y0), (x0, y0)]
        draw.polygon(points, fill=1)
    return np.asarray(canvas, dtype=bool), np.array([x0, y0, x1, y1])


def draw_synthetic_image(seed: int, split: str, index: int, size: int,
                         style: str = "shapes") -> tuple[np.ndarray, list[dict[str, Any]]]:
    """(H x W x 3 uint8 image, instances with ``category`` and visible ``mask``), a pure function of its arguments."""
    stream = zlib.crc32(f"detect:{split}".encode())
    rng = np.random.default_rng([seed, stream, index])
    if style == "objects":
        image, shapes = draw_object_scene(rng, size, int(rng.integers(2, 7)))
        return image, _visible_instances(shapes)
    if style != "shapes":
        raise ValueError(f"synthetic style must be one of {', '.join(SYNTHETIC_STYLES)}; got '{style}'")
    base = rng.uniform(40, 215, 3)
    ramp = np.linspace(-1, 1, size)[None, :, None] * rng.uniform(-30, 30, 3)
    image = base + ramp + rng.normal(0, 12, (size, size, 3))
    shapes = []
    for _ in range(int(rng.integers(2, 7))):
        kind = int(rng.integers(len(SYNTHETIC_CATEGORIES)))
        mask, _ = _draw_shape(kind, size, rng)
        colour = rng.uniform(0, 255, 3)
        shade = colour + rng.normal(0, 8, (size, size, 3))
        image = np.where(mask[..., None], shade, image)
        shapes.append((kind, mask))
    return np.clip(image, 0, 255).astype(np.uint8), _visible_instances(shapes)


def _visible_instances(shapes: list[tuple[int, np.ndarray]]) -> list[dict[str, Any]]:
    """Instances from full masks in painting order: each keeps what later ones leave uncovered,
    and one mostly hidden (under a quarter visible, or under 12 pixels) is dropped."""
    if not shapes:
        return []
    instances, covered = [], np.zeros_like(shapes[0][1])
    for kind, mask in reversed(shapes):  # later shapes are on top
        visible = mask & ~covered
        covered |= mask
        if visible.sum() >= max(12, 0.25 * mask.sum()):
            instances.append({"category": kind, "mask": visible})
    return instances[::-1]


def _mask_box(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1 - xs.min()), float(ys.max() + 1 - ys.min())]


def synthetic_coco(root: str | Path, split: str, num_images: int, image_size: int, seed: int = 0,
                   style: str = "shapes") -> tuple[Path, Path]:
    """(annotation file, image folder) of the synthetic set in ``root``; drawn and written when missing."""
    from pycocotools import mask as mask_utils

    prefix = "synthetic" if style == "shapes" else f"synthetic-{style}"
    root = Path(root) / f"{prefix}-v{SYNTHETIC_VERSION}-s{seed}-{image_size}px"
    annotations = root / "annotations" / f"instances_{split}.json"
    images_dir = root / f"{split}-{num_images}"
    if annotations.is_file():
        try:
            existing = json.loads(annotations.read_text())
            if len(existing.get("images", [])) == num_images and existing.get("info", {}).get("folder") == \
                    images_dir.name and all((images_dir / im["file_name"]).is_file() for im in existing["images"]):
                return annotations, images_dir
        except (OSError, ValueError):
            pass  # damaged or from another size: draw it again
    images, annots = [], []
    for index in range(num_images):
        pixels, instances = draw_synthetic_image(seed, split, index, image_size, style)
        name = f"{index:06d}.png"
        with files.atomic_path(images_dir / name) as tmp:
            Image.fromarray(pixels).save(tmp, format="PNG")
        images.append({"id": index + 1, "file_name": name, "height": image_size, "width": image_size})
        for instance in instances:
            rle = mask_utils.encode(np.asfortranarray(instance["mask"].astype(np.uint8)))
            annots.append({
                "id": len(annots) + 1, "image_id": index + 1, "category_id": instance["category"] + 1,
                "bbox": _mask_box(instance["mask"]), "area": float(instance["mask"].sum()), "iscrowd": 0,
                "segmentation": {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")},
            })
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"}
                  for i, name in enumerate(SYNTHETIC_STYLES[style])]
    info = {"description": f"prepretrain synthetic {style}", "version": SYNTHETIC_VERSION, "seed": seed,
            "style": style, "folder": images_dir.name}
    files.write_json(annotations, {"info": info, "images": images, "annotations": annots, "categories": categories})
    return annotations, images_dir


# ------------------------------------------------------------------------------ annotations


def is_lvis(dataset: dict[str, Any]) -> bool:
    """An LVIS annotation file: federated image fields or category frequencies."""
    images, categories = dataset.get("images") or [], dataset.get("categories") or []
    return bool(images and "neg_category_ids" in images[0]) or bool(categories and "frequency" in categories[0])


def annotation_mask(segmentation: Any, height: int, width: int) -> np.ndarray:
    """A COCO segmentation (polygons, uncompressed or compressed RLE) as an (H, W) uint8 mask."""
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, list):
        polygons = [p for p in segmentation if len(p) >= 6]
        if not polygons:
            raise ValueError("no polygon with 3 or more points")
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, height, width))
    elif isinstance(segmentation, dict) and isinstance(segmentation.get("counts"), list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    elif isinstance(segmentation, dict):
        counts = segmentation["counts"]
        rle = {"size": segmentation["size"], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    else:
        raise ValueError(f"unknown segmentation type {type(segmentation).__name__}")
    mask = mask_utils.decode(rle)
    if mask.shape != (height, width):
        raise ValueError(f"mask is {mask.shape[0]}x{mask.shape[1]}, the image {height}x{width}")
    return mask


@dataclass
class DetectionSample:
    """One image and its annotations, before augmentation."""

    key: str
    image_id: int
    image: Image.Image
    annotations: list[dict[str, Any]]


class CocoDetectionSource:
    """Images and annotations of a COCO- or LVIS-format file: random access by index.

    ``train=True`` keeps only images with at least one non-crowd annotation (nothing to learn
    from the others; detectron2 filters them too). Labels are 1..K in category-id order (0 is
    background); :attr:`category_ids` maps them back for evaluation.
    """

    def __init__(self, annotations: str | Path, images: str | Path, *, train: bool = False):
        self.annotations_path, self.images_dir = Path(annotations), Path(images)
        with open(self.annotations_path, encoding="utf-8") as handle:
            dataset = json.load(handle)
        if not isinstance(dataset, dict) or "images" not in dataset or "categories" not in dataset:
            raise ValueError(f"{annotations}: not a COCO/LVIS instances file (no 'images' or 'categories')")
        self.lvis = is_lvis(dataset)
        self.category_ids = sorted(int(c["id"]) for c in dataset["categories"])
        self.category_names = {int(c["id"]): c.get("name", str(c["id"])) for c in dataset["categories"]}
        self.label_of = {cid: i + 1 for i, cid in enumerate(self.category_ids)}
        by_image: dict[int, list[dict[str, Any]]] = defaultdict(list)
        for annotation in dataset.get("annotations") or []:
            by_image[int(annotation["image_id"])].append(annotation)
        self.images = sorted(dataset["images"], key=lambda im: int(im["id"]))
        if train:
            self.images = [im for im in self.images if any(not a.get("iscrowd", 0) for a in by_image[int(im["id"])])]
        self.by_image = dict(by_image)

    @property
    def num_classes(self) -> int:
        return len(self.category_ids)

    def __len__(self) -> int:
        return len(self.images)

    def image_path(self, info: dict[str, Any]) -> Path:
        """The image file: ``file_name`` in the image folder; for LVIS (no file_name) the last part of
        ``coco_url``, in the image folder or in its sibling named by the URL (LVIS val draws on train2017 too)."""
        if info.get("file_name"):
            return self.images_dir / info["file_name"]
        parts = str(info.get("coco_url", "")).rstrip("/").split("/")
        here = self.images_dir / parts[-1]
        if here.is_file() or len(parts) < 2:
            return here
        sibling = self.images_dir.parent / parts[-2] / parts[-1]
        return sibling if sibling.is_file() else here

    def get(self, index: int) -> DetectionSample:
        info = self.images[index]
        path = self.image_path(info)
        try:
            with Image.open(path) as handle:
                image = handle.convert("RGB")
        except (OSError, ValueError) as error:
            raise BadSample(str(path), "unreadable_image", str(error)[:200]) from None
        return DetectionSample(str(path), int(info["id"]), image, self.by_image.get(int(info["id"]), []))


def _image_categories(source: CocoDetectionSource) -> list[set[int]]:
    """The (non-crowd, known) category ids each training image contains."""
    return [{int(a["category_id"]) for a in source.by_image.get(int(im["id"]), [])
             if not a.get("iscrowd", 0) and int(a["category_id"]) in source.label_of} for im in source.images]


def _images_with(categories: list[set[int]]) -> dict[int, int]:
    counts: dict[int, int] = defaultdict(int)
    for present in categories:
        for category in present:
            counts[category] += 1
    return counts


def category_image_counts(source: CocoDetectionSource) -> torch.Tensor:
    """How many training images contain each category, by label (index 0, the background, is 0):
    LVIS's ``image_count``, counted from the annotations so it holds for any COCO-format file."""
    counts = torch.zeros(source.num_classes + 1, dtype=torch.float64)
    for category, count in _images_with(_image_categories(source)).items():
        counts[source.label_of[category]] = count
    return counts


def repeat_factors(source: CocoDetectionSource, threshold: float) -> torch.Tensor:
    """LVIS repeat-factor sampling (Gupta et al., 2019): one repeat factor per training image.

    A category seen in a fraction ``f_c`` of the training images gets ``r_c = max(1, sqrt(t / f_c))``
    and an image the largest ``r_c`` of the categories it contains (1 when it contains none), so
    images of rare categories are drawn more often. As per-sample draw weights with an epoch of
    ``sum(r)`` samples, each image is drawn ``r`` times per epoch in expectation, which is what
    detectron2's ``RepeatFactorTrainingSampler`` gives with stochastic rounding. ``t`` is 0.001
    for LVIS; ``threshold <= 0`` gives all ones (no resampling). Crowd regions do not count."""
    categories = _image_categories(source)
    if threshold <= 0 or not categories:
        return torch.ones(len(categories), dtype=torch.float64)
    images_with = _images_with(categories)
    category_factor = {c: max(1.0, (threshold * len(categories) / count) ** 0.5) for c, count in images_with.items()}
    return torch.tensor([max((category_factor[c] for c in present), default=1.0) for present in categories],
                        dtype=torch.float64)


# ------------------------------------------------------------------------------- transforms


def _instances(sample: DetectionSample, label_of: dict[int, int], masks: bool) -> dict[str, Any]:
    """Boxes (x1y1x2y2), labels, crowd boxes and (optionally) masks of a sample at its own size."""
    width, height = sample.image.size
    boxes, labels, crowd, segments = [], [], [], []
    for annotation in sample.annotations:
        x, y, w, h = (float(v) for v in annotation["bbox"])
        if w <= 0 or h <= 0 or int(annotation["category_id"]) not in label_of:
            continue
        if annotation.get("iscrowd", 0):
            crowd.append([x, y, x + w, y + h])
            continue
        if masks:
            try:
                segments.append(annotation_mask(annotation["segmentation"], height, width))
            except (KeyError, ValueError, TypeError) as error:
                raise BadSample(sample.key, "bad_segmentation", f"annotation {annotation.get('id')}: {error}") from None
        boxes.append([x, y, x + w, y + h])
        labels.append(label_of[int(annotation["category_id"])])
    return {"boxes": np.array(boxes, dtype=np.float32).reshape(-1, 4), "labels": np.array(labels, dtype=np.int64),
            "crowd": np.array(crowd, dtype=np.float32).reshape(-1, 4),
            "masks": np.stack(segments) if segments else np.zeros((0, height, width), dtype=np.uint8)}


def _encode_masks(masks: np.ndarray) -> list[str]:
    from pycocotools import mask as mask_utils

    if len(masks) == 0:
        return []
    rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))
    return [rle["counts"].decode("ascii") for rle in rles]


class LargeScaleJitter:
    """ViTDet's training augmentation of a :class:`DetectionSample` -> ``{"image", "size", "target"}``.

    A class (not a closure) so loader workers can pickle it. Randomness comes from Python's
    ``random``, which the loader seeds per sample position (exact resume).
    """

    def __init__(self, image_size: int, label_of: dict[int, int], lsj_min: float = 0.1, lsj_max: float = 2.0,
                 flip: float = 0.5, masks: bool = True):
        self.image_size, self.label_of = image_size, label_of
        self.lsj_min, self.lsj_max, self.flip, self.masks = lsj_min, lsj_max, flip, masks

    def __call__(self, sample: DetectionSample) -> dict[str, Any]:
        size = self.image_size
        width, height = sample.image.size
        parts = _instances(sample, self.label_of, self.masks)
        scale = random.uniform(self.lsj_min, self.lsj_max)
        factor = min(scale * size / height, scale * size / width)
        new_w, new_h = max(1, round(width * factor)), max(1, round(height * factor))
        off_x, off_y = random.randint(0, max(0, new_w - size)), random.randint(0, max(0, new_h - size))
        crop_w, crop_h = min(size, new_w), min(size, new_h)
        flip = random.random() < self.flip
        image = sample.image.resize((new_w, new_h), Image.BILINEAR).crop((off_x, off_y, off_x + crop_w, off_y + crop_h))
        pixels = np.full((size, size, 3), MEAN_PIXEL, dtype=np.uint8)
        pixels[:crop_h, :crop_w] = np.asarray(image)[:, ::-1] if flip else np.asarray(image)

        def place(boxes: np.ndarray) -> np.ndarray:
            boxes = boxes * factor - np.array([off_x, off_y, off_x, off_y], dtype=np.float32)
            boxes = boxes.clip(0, [crop_w, crop_h, crop_w, crop_h]).astype(np.float32)
            if flip:
                boxes = np.stack([crop_w - boxes[:, 2], boxes[:, 1], crop_w - boxes[:, 0], boxes[:, 3]], 1)
            return boxes.reshape(-1, 4)

        boxes, labels, crowd = place(parts["boxes"]), parts["labels"], place(parts["crowd"])
        masks = np.zeros((0, crop_h, crop_w), dtype=np.uint8)
        if self.masks and len(parts["masks"]):
            scaled = F.interpolate(torch.from_numpy(parts["masks"])[None].float(), size=(new_h, new_w),
                                   mode="bilinear", align_corners=False)[0]
            masks = (scaled[:, off_y:off_y + crop_h, off_x:off_x + crop_w] >= 0.5).numpy().astype(np.uint8)
            if flip:
                masks = np.ascontiguousarray(masks[:, :, ::-1])
            boxes = np.array([_extent(m) for m in masks], dtype=np.float32).reshape(-1, 4)
        keep = ((boxes[:, 2] - boxes[:, 0]) >= 1) & ((boxes[:, 3] - boxes[:, 1]) >= 1)
        crowd = crowd[((crowd[:, 2] - crowd[:, 0]) > 0) & ((crowd[:, 3] - crowd[:, 1]) > 0)]
        target = {"boxes": boxes[keep].round(2).tolist(), "labels": labels[keep].tolist(),
                  "crowd": crowd.round(2).tolist(), "size": [crop_h, crop_w],
                  "masks": _encode_masks(masks[keep]) if self.masks else []}
        return {"image": torch.from_numpy(pixels).permute(2, 0, 1).contiguous(),
                "target": json.dumps(target, separators=(",", ":"))}


def _extent(mask: np.ndarray) -> list[float]:
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return [0.0, 0.0, 0.0, 0.0]
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]


def decode_target(text: str, device: torch.device | str = "cpu",
                  masks: bool = True) -> tuple[dict[str, torch.Tensor], tuple[int, int]]:
    """A training target (JSON from :class:`LargeScaleJitter`) as torchvision's target dict on
    ``device``, and the (height, width) of the image part of the padded square."""
    from pycocotools import mask as mask_utils

    target = json.loads(text)
    height, width = target["size"]
    decoded = {
        "boxes": torch.tensor(target["boxes"], dtype=torch.float32).reshape(-1, 4).to(device),
        "labels": torch.tensor(target["labels"], dtype=torch.int64).to(device),
        "crowd_boxes": torch.tensor(target["crowd"], dtype=torch.float32).reshape(-1, 4).to(device),
    }
    if masks:
        if target["masks"]:
            rles = [{"size": [height, width], "counts": c.encode("ascii")} for c in target["masks"]]
            stacked = torch.from_numpy(mask_utils.decode(rles)).permute(2, 0, 1).contiguous()
        else:
            stacked = torch.zeros((0, height, width), dtype=torch.uint8)
        decoded["masks"] = stacked.to(device)
    return decoded, (int(height), int(width))


def image_tensor(sample: DetectionSample) -> torch.Tensor:
    """A sample's image as a float (3, H, W) tensor in [0, 1] at its own size (evaluation input)."""
    return torch.from_numpy(np.array(sample.image, dtype=np.uint8)).permute(2, 0, 1).float().div_(255)


def mask_to_rle(mask: np.ndarray) -> dict[str, Any]:
    """A binary (H, W) mask as JSON-ready compressed RLE (COCO results format)."""
    from pycocotools import mask as mask_utils

    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}


def dataset_split_files(folder: str | Path, split: str) -> tuple[Path, Path]:
    """(annotation file, image folder) of ``split`` in a COCO-layout folder.

    Tries ``annotations/instances_{split}.json`` (and ``instances_{split}2017.json``, LVIS's
    ``lvis_v1_{split}.json``) with images in ``{split}/``, ``{split}2017/`` or ``images/{split}``."""
    root = Path(folder)
    folder_names = (f"instances_{split}.json", f"instances_{split}2017.json", f"lvis_v1_{split}.json")
    candidates = [root / "annotations" / name for name in folder_names] + [root / f"instances_{split}.json"]
    annotations = next((p for p in candidates if p.is_file()), None)
    if annotations is None:
        raise FileNotFoundError(f"{folder}: no annotations for split '{split}' (looked for "
                                f"{', '.join(str(p.relative_to(root)) for p in candidates)})")
    image_dirs = [root / split, root / f"{split}2017", root / "images" / split, root / "images" / f"{split}2017"]
    images = next((p for p in image_dirs if p.is_dir()), None)
    if images is None:
        raise FileNotFoundError(f"{folder}: no image folder for split '{split}' (looked for "
                                f"{', '.join(str(p.relative_to(root)) for p in image_dirs)})")
    return annotations, images


__all__ = [
    "CocoDetectionSource", "DetectionSample", "LargeScaleJitter", "annotation_mask", "dataset_split_files",
    "decode_target", "draw_synthetic_image", "image_tensor", "is_lvis", "mask_to_rle", "synthetic_coco",
]

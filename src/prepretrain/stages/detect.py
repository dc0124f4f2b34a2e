"""Object detection and instance segmentation transfer (``prepretrain detect``): ViTDet in Mask R-CNN.

What the stage builds (the loop is ``prepretrain.train.engine``): the pretrained encoder (any
``encoder=``: a mae/wsp/lit run dir, an MAE/MAWS/timm file, or random init) as a ViTDet
backbone (window attention with a few global blocks, interpolated absolute position
embeddings, optional relative position biases, the simple feature pyramid), inside
torchvision's Mask R-CNN with ViTDet-style heads; trained with large-scale jitter, layer-wise
lr decay and drop path; evaluated with pycocotools (COCO) or the LVIS API (LVIS files) for box
and mask AP in percent.

Data: ``data=synthetic`` (default) draws a small COCO-format set of coloured shapes into
``cache_dir`` (default ``<parent of out_dir>/detection_cache``) and reuses it afterwards;
``data=FOLDER`` reads ``annotations/instances_{train,val}.json`` with ``{train,val}/`` images;
``train_annotations``/``train_images``/``val_annotations``/``val_images`` name files directly.

Outputs in the run dir: ``detector.safetensors`` (the whole torchvision model's state dict,
with the settings to rebuild it as metadata), ``best.safetensors`` when evaluating during
training (selected on ``box_ap`` of the val split: detection sets have no separate test
labels), ``detections.json`` (the last evaluation's COCO-format results) and results.json
with ``box_ap``, ``box_ap50``, ``box_ap75``, ``mask_ap``, ``mask_ap50``, ``mask_ap75``.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..config import Choices, ConfigError, TrainConfig
from ..data.detection import (
    SYNTHETIC_STYLES,
    CocoDetectionSource,
    DetectionSample,
    LargeScaleJitter,
    category_image_counts,
    dataset_split_files,
    decode_target,
    image_tensor,
    mask_to_rle,
    repeat_factors,
    synthetic_coco,
)
from ..data.images.transforms import IMAGENET_MEAN, IMAGENET_STD
from ..data.loader import RecordDataset
from ..evaluate.detection import detection_metrics
from ..models.detector import FED_LOSS_POWER, build_detector
from ..models.resolve import EncoderSpec, build_encoder, check_weights, resolve_encoder
from ..models.vit import check_model_and_size, resolve_name, vit_shape
from ..models.vitdet import FEATURE_NORMS, ViTDetBackbone, parse_global_blocks, vitdet_flops
from ..train.engine import Stage, TrainData
from ..train.optim import layer_decay_scale, param_groups
from ..train.run import BEST_WEIGHTS, Run

SYNTHETIC_SEED = 0  # the synthetic set is fixed; ``seed`` varies the training only
DETECTOR_FILE = "detector.safetensors"


@dataclass
class DetectConfig(TrainConfig):
    """Detection recipe. Defaults are the CPU demo; configs/detect_*.yaml hold ViTDet's recipes."""

    stage_name = "detect"
    encoder: str = ""  # run dir or weights file; empty = random init (the baseline); mae-init: untrained MAE init
    model: str = "vit_micro4"  # architecture when the weights carry no metadata
    # data: "synthetic", or a COCO-layout folder; explicit files override the folder's
    train_annotations: str = ""
    train_images: str = ""
    val_annotations: str = ""
    val_images: str = ""
    lvis: str = "auto"  # auto (from the file's structure) | true | false: LVIS federated evaluation
    cache_dir: str = ""  # where data=synthetic is written; default <parent of out_dir>/detection_cache
    synthetic_val_images: int = 100  # size of the synthetic val split (num_images is the train split's)
    synthetic_style: str = "shapes"  # shapes: 3 flat shapes | objects: the pretraining set's 10 textured kinds
    eval_images: int = 0  # evaluate on the first N val images only; 0 = all
    image_size: int = 64  # square input side (ViTDet: 1024)
    num_images: int = 1000
    # backbone
    window_size: int = 8  # window attention side in tokens (ViTDet: 14 for 1024 px / patch 16); 0 = all global
    global_blocks: str = "auto"  # auto (4 evenly spaced, ViTDet's 2,5,8,11 for B) | all | none | "2,5,8,11"
    rel_pos: bool = False  # decomposed relative position biases (zero-init) in every block (ViTDet: on)
    layer_decay: float = 0.7  # ViTDet: 0.7 (B), 0.8 (L), 0.9 (H)
    drop_path: float = 0.1  # ViTDet: 0.1 (B), 0.4 (L), 0.5 (H)
    pyramid_channels: int = 64  # simple feature pyramid / head width (ViTDet: 256)
    pyramid_scales: tuple[float, ...] = (2.0, 1.0, 0.5)  # of the patch-stride map (ViTDet: 4, 2, 1, 0.5)
    feature_norm: str = "none"  # none (ViTDet) | batch: per-channel BatchNorm (no affine) before the pyramid
    # detector
    masks: bool = True  # Mask R-CNN (true) or Faster R-CNN (false)
    cascade: bool = False  # Cascade (Mask) R-CNN: three box stages at IoU 0.5/0.6/0.7 (MAWS and ViTDet's best: true)
    fed_loss: bool = False  # federated loss for the classifiers (ViTDet's LVIS recipe; needs cascade=true)
    box_head: str = "2fc"  # 4conv1fc (ViTDet: 4 convs with LayerNorm + 1 fc) | 2fc (torchvision's MLP)
    head_dim: int = 256  # box head fc width (ViTDet: 1024)
    box_batch_per_image: int = 64  # sampled proposals per image for the box head (ViTDet: 512)
    rpn_batch_per_image: int = 256
    rpn_pre_nms_topk: tuple[int, int] = (300, 300)  # proposals per level before NMS, (train, test); ViTDet (2000, 1000)
    rpn_post_nms_topk: tuple[int, int] = (150, 150)  # proposals per image after NMS, (train, test); ViTDet (1000, 1000)
    # LVIS repeat-factor sampling: images of rare categories are drawn more often (0 = off; LVIS: 0.001)
    repeat_factor_threshold: float = 0.0
    # augmentation: large-scale jitter
    lsj_min: float = 0.1
    lsj_max: float = 2.0
    flip: float = 0.5
    # evaluation
    eval_batch_size: int = 16
    score_threshold: float = 0.05
    detections_per_image: int = 100  # LVIS: 300
    # CPU-demo schedule (ViTDet: AdamW lr 1e-4 at batch 64, wd 0.1, 100 epochs COCO)
    batch_size: int = 8
    steps: int = 200
    lr: float = 4e-4
    warmup_steps: int = 20
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.999)
    ckpt_every: int = 100

    # Every numeric key this class defines, with its interval (config.check_bounds).
    bounds = {
        "synthetic_val_images": "> 0", "eval_images": ">= 0", "window_size": ">= 0", "layer_decay": "(0, 1]",
        "drop_path": "[0, 1)", "pyramid_channels": "> 0", "head_dim": "> 0", "box_batch_per_image": "> 0",
        "rpn_batch_per_image": "> 0", "repeat_factor_threshold": "[0, 1)", "lsj_min": "> 0", "lsj_max": "> 0",
        "flip": "[0, 1]", "eval_batch_size": "> 0", "score_threshold": "[0, 1)", "detections_per_image": "> 0",
    }
    choices = {
        "decode": Choices(("auto", "pil"), why="detection decodes and augments images (with their masks) with PIL"),
        "synthetic_style": SYNTHETIC_STYLES, "lvis": Choices(("auto", "true", "false"), any_case=True),
        "feature_norm": FEATURE_NORMS,
        "box_head": ("4conv1fc", "2fc"),
    }

    def validate(self) -> None:
        super().validate()
        check_model_and_size(self.model, self.image_size)
        try:
            parse_global_blocks(self.global_blocks, 10_000)
        except ValueError as error:
            raise ConfigError("global_blocks", str(error)) from None
        if self.lsj_min > self.lsj_max:
            raise ConfigError("lsj_min", f"need lsj_min <= lsj_max; got {self.lsj_min} and {self.lsj_max}")
        if not self.pyramid_scales or any(scale not in (4.0, 2.0, 1.0, 0.5) for scale in self.pyramid_scales) or \
                list(self.pyramid_scales) != sorted(set(self.pyramid_scales), reverse=True):
            raise ConfigError("pyramid_scales", f"a decreasing list from 4, 2, 1, 0.5 (ViTDet: all four); "
                                                f"got {list(self.pyramid_scales)}")
        for key in ("rpn_pre_nms_topk", "rpn_post_nms_topk"):
            if min(getattr(self, key)) <= 0:
                raise ConfigError(key, f"both values (train, test) must be > 0, got {list(getattr(self, key))}")
        if self.fed_loss and not self.cascade:
            raise ConfigError("fed_loss", "the federated loss is implemented for the cascade heads: "
                                          "add cascade=true (as ViTDet's LVIS recipe has)")
        check_weights("encoder", self.encoder)

    def check_data_paths(self) -> None:
        """ConfigErrors for data that is not there (checked when the stage starts, before any compute:
        a recipe file naming /data/coco still validates on a machine without it)."""
        if self.data != "synthetic" and not Path(self.data).is_dir() and not (
                self.train_annotations and self.val_annotations):
            raise ConfigError("data", f"'{self.data}' is neither 'synthetic' nor a folder; a folder holds "
                                      "annotations/instances_{train,val}.json and {train,val}/ images "
                                      "(or set train_annotations, train_images, val_annotations, val_images)")
        for split in ("train", "val"):
            annotations, images = getattr(self, f"{split}_annotations"), getattr(self, f"{split}_images")
            if annotations and not Path(annotations).is_file():
                raise ConfigError(f"{split}_annotations", f"no such file: {annotations}")
            if images and not Path(images).is_dir():
                raise ConfigError(f"{split}_images", f"no such folder: {images}")
            if annotations and not images and self.data == "synthetic":
                raise ConfigError(f"{split}_images", f"{split}_annotations is set: name the image folder too")

    def synthetic_root(self) -> Path:
        """Where the synthetic set lives: ``cache_dir``, else beside the run directory."""
        if self.cache_dir:
            return Path(self.cache_dir)
        parent = Path(self.out_dir).parent if self.out_dir else Path("runs")
        return parent / "detection_cache"


def split_files(cfg: DetectConfig, split: str) -> tuple[Path, Path]:
    """(annotation file, image folder) of ``split`` from the config: explicit files, synthetic or a folder."""
    annotations, images = getattr(cfg, f"{split}_annotations"), getattr(cfg, f"{split}_images")
    if annotations and images:
        return Path(annotations), Path(images)
    if cfg.data == "synthetic":
        count = cfg.num_images if split == "train" else cfg.synthetic_val_images
        found = synthetic_coco(cfg.synthetic_root(), split, count, cfg.image_size, SYNTHETIC_SEED, cfg.synthetic_style)
    else:
        try:
            found = dataset_split_files(cfg.data, split)
        except FileNotFoundError as error:
            raise ConfigError("data", str(error)) from None
    return Path(annotations) if annotations else found[0], Path(images) if images else found[1]


def _as_list(items: list[Any]) -> list[Any]:
    return items


class ImageOf:
    """Evaluation sample: the image at its own size plus its id (a class so workers can pickle it)."""

    def __call__(self, sample: DetectionSample) -> dict[str, Any]:
        return {"image": image_tensor(sample), "image_id": sample.image_id}


class DetectStage(Stage):
    """A pretrained (or random-init) ViT as a ViTDet backbone in Mask R-CNN, trained and evaluated."""

    name = "detect"
    select_on = "box_ap"
    cfg: DetectConfig

    def __init__(self, cfg: DetectConfig):
        super().__init__(cfg)
        cfg.check_data_paths()
        self.spec: EncoderSpec = resolve_encoder(cfg.encoder, cfg.model, cfg.image_size, cfg.seed)
        try:
            self.global_blocks = parse_global_blocks(cfg.global_blocks, self.spec.depth)
        except ValueError as error:
            raise ConfigError("global_blocks", str(error)) from None
        self.train_files = split_files(cfg, "train")
        self.val_files = split_files(cfg, "val")
        try:
            self.train_source = CocoDetectionSource(*self.train_files, train=True)
            self.val_source = CocoDetectionSource(*self.val_files)
        except (OSError, ValueError, KeyError) as error:
            raise ConfigError("data", f"cannot read the annotations: {error}") from None
        if self.train_source.category_ids != self.val_source.category_ids:
            raise ConfigError("val_annotations", "the train and val files list different categories")
        if len(self.train_source) == 0:
            raise ConfigError("data", f"{self.train_files[0]} has no image with a (non-crowd) annotation")
        lvis = str(cfg.lvis).lower()
        self.lvis = self.val_source.lvis if lvis == "auto" else lvis == "true"
        self.num_classes = self.train_source.num_classes

    # ------------------------------------------------------------------ what it trains
    def build_model(self, run: Run) -> nn.Module:
        cfg = self.cfg
        encoder = build_encoder(self.spec, drop_path_rate=cfg.drop_path)
        # The federated loss draws negative classes by (images that contain them) ** 0.5.
        fed_weights = (category_image_counts(self.train_source) ** FED_LOSS_POWER).float() if cfg.fed_loss else None
        backbone = ViTDetBackbone(encoder, cfg.window_size, self.global_blocks, cfg.rel_pos, cfg.pyramid_channels,
                                  tuple(cfg.pyramid_scales), cfg.feature_norm)
        return build_detector(
            backbone, self.num_classes, cfg.image_size, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD,
            masks=cfg.masks, box_head=cfg.box_head, head_dim=cfg.head_dim, cascade=cfg.cascade,
            fed_loss_weights=fed_weights,
            box_batch_per_image=cfg.box_batch_per_image, rpn_batch_per_image=cfg.rpn_batch_per_image,
            rpn_pre_nms_train=cfg.rpn_pre_nms_topk[0], rpn_pre_nms_test=cfg.rpn_pre_nms_topk[1],
            rpn_post_nms_train=cfg.rpn_post_nms_topk[0], rpn_post_nms_test=cfg.rpn_post_nms_topk[1],
            score_threshold=cfg.score_threshold, detections_per_image=cfg.detections_per_image,
        )

    def train_data(self, run: Run) -> TrainData:
        cfg = self.cfg
        augment = LargeScaleJitter(cfg.image_size, self.train_source.label_of, cfg.lsj_min, cfg.lsj_max, cfg.flip,
                                   cfg.masks)
        dataset = RecordDataset(self.train_source, augment)
        if cfg.repeat_factor_threshold <= 0:
            return TrainData(dataset, len(self.train_source))
        # Repeat factors as draw weights: an epoch of sum(r) draws takes each image r times in expectation.
        factors = repeat_factors(self.train_source, cfg.repeat_factor_threshold)
        run.print(f"repeat-factor sampling (t={cfg.repeat_factor_threshold}): {int((factors > 1).sum())} of "
                  f"{len(factors)} images repeated, epoch of {round(float(factors.sum()))} draws")
        return TrainData(dataset, len(self.train_source), weights=factors, epoch_size=round(float(factors.sum())))

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        """torchvision's loss dict summed; each part is logged. Targets arrive as JSON strings
        (see ``data.detection``) and images as padded uint8 squares: cut each to its content."""
        device = batch["image"].device
        images, targets = [], []
        for pixels, text in zip(batch["image"], batch["target"]):
            target, (height, width) = decode_target(text, device, self.cfg.masks)
            images.append(pixels[:, :height, :width].float().div(255))
            targets.append(target)
        losses = model(images, targets)
        total = sum(losses.values())
        return total, {name: value.detach() for name, value in losses.items()}

    def param_groups(self, model: nn.Module) -> list[dict]:
        depth = self.spec.depth

        def scale(name: str) -> float:
            if not name.startswith("backbone."):
                return 1.0  # RPN and RoI heads: full lr
            return layer_decay_scale(name.removeprefix("backbone."), depth, self.cfg.layer_decay)

        return param_groups(model, self.cfg.weight_decay, lr_scale=scale)

    def flops_per_sample(self) -> float:
        """Training FLOPs of the ViT part only (the heads are not counted): 3 x its forward."""
        shape = vit_shape(self.spec.model, depth=self.spec.depth)
        grid = (self.cfg.image_size // shape.patch_size,) * 2
        return 3 * vitdet_flops(shape.depth, shape.embed_dim, shape.mlp_dim, grid, self.cfg.window_size,
                                self.global_blocks)

    # --------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def detect(self, model: nn.Module, device: torch.device) -> list[dict[str, Any]]:
        """COCO-format results of ``model`` on the val images (boxes in original pixel coordinates)."""
        cfg, source = self.cfg, self.val_source
        dataset = RecordDataset(source, ImageOf())
        indices = range(min(len(source), cfg.eval_images) if cfg.eval_images else len(source))
        subset = torch.utils.data.Subset(dataset, list(indices))
        loader = DataLoader(subset, batch_size=cfg.eval_batch_size, num_workers=cfg.num_workers, collate_fn=_as_list)
        use_bf16 = device.type == "cuda" and cfg.precision in ("auto", "bf16")
        results: list[dict[str, Any]] = []
        for items in loader:
            items = [item for item in items if "_bad" not in item]
            if not items:
                continue
            with torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext():
                outputs = model([item["image"].to(device) for item in items])
            for item, output in zip(items, outputs):
                results.extend(self._to_coco(item["image_id"], output))
        return results

    def _to_coco(self, image_id: int, output: dict[str, torch.Tensor]) -> list[dict[str, Any]]:
        boxes = output["boxes"].float().cpu().numpy()
        scores = output["scores"].float().cpu().numpy()
        labels = output["labels"].cpu().numpy()
        masks = (output["masks"][:, 0] > 0.5).cpu().numpy() if "masks" in output else None
        found = []
        for i in range(len(boxes)):
            x1, y1, x2, y2 = (float(v) for v in boxes[i])
            result = {"image_id": image_id, "category_id": self.val_source.category_ids[int(labels[i]) - 1],
                      "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                      "score": round(float(scores[i]), 5)}
            if masks is not None:
                result["segmentation"] = mask_to_rle(masks[i])
            found.append(result)
        return found

    def evaluation_ground_truth(self) -> dict[str, Any] | Path:
        """The val annotations, restricted to the evaluated images when ``eval_images`` is set."""
        import json

        if not self.cfg.eval_images or self.cfg.eval_images >= len(self.val_source):
            return self.val_files[0]
        dataset = json.loads(Path(self.val_files[0]).read_text())
        keep = {int(im["id"]) for im in self.val_source.images[: self.cfg.eval_images]}
        dataset["images"] = [im for im in dataset["images"] if int(im["id"]) in keep]
        dataset["annotations"] = [a for a in dataset.get("annotations", []) if int(a["image_id"]) in keep]
        return dataset

    def evaluate(self, model: nn.Module, run: Run) -> dict[str, float]:
        """Box (and mask) AP on the val split with pycocotools, or the LVIS API for LVIS files."""
        with run.gathered(model):
            detections = self.detect(model, run.device)
        self._last_detections = detections
        metrics = detection_metrics(self.evaluation_ground_truth(), detections, masks=self.cfg.masks,
                                    lvis=self.lvis, max_detections=self.cfg.detections_per_image)
        metrics["detections"] = float(len(detections))
        # Undefined APs (e.g. no small objects in the val set) are left out; the headline keys always stay.
        headline = {f"{kind}_{key}" for kind in ("box", "mask") for key in ("ap", "ap50", "ap75")}
        return {k: v for k, v in metrics.items() if k in headline or not math.isnan(v)}

    def metadata(self) -> dict[str, str]:
        cfg = self.cfg
        return {"model": resolve_name(self.spec.model), "depth": str(self.spec.depth),
                "image_size": str(cfg.image_size), "num_classes": str(self.num_classes),
                "category_ids": ",".join(map(str, self.train_source.category_ids)), "window_size": str(cfg.window_size),
                "global_blocks": ",".join(map(str, self.global_blocks)), "rel_pos": str(cfg.rel_pos),
                "pyramid_channels": str(cfg.pyramid_channels),
                "pyramid_scales": ",".join(map(str, cfg.pyramid_scales)), "feature_norm": cfg.feature_norm,
                "masks": str(cfg.masks), "cascade": str(cfg.cascade), "fed_loss": str(cfg.fed_loss),
                "box_head": cfg.box_head, "head_dim": str(cfg.head_dim), "format": "torchvision-maskrcnn-vitdet"}

    def best_weights(self, model: nn.Module, run: Run) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        return run.full_state_dict(model), self.metadata()

    def finish(self, model: nn.Module, run: Run) -> dict[str, Any]:
        """Export the detector and the last evaluation's detections; report the AP (percent)."""
        weights = run.save_weights(DETECTOR_FILE, run.full_state_dict(model), self.metadata(), dtype=torch.float32)
        detections = getattr(self, "_last_detections", None)
        if detections is not None:
            run.write_json("detections.json", detections)
        results: dict[str, Any] = {
            "weights": str(weights), "encoder": self.spec.description, "num_classes": self.num_classes,
            "lvis": self.lvis, "val_annotations": str(self.val_files[0]),
            "val_images": min(len(self.val_source), self.cfg.eval_images or len(self.val_source)),
            "train_images": len(self.train_source),
        }
        best = run.best
        if best:
            results.update({"best": str(run.path(BEST_WEIGHTS)), "best_step": best["step"],
                            "best_box_ap": best.get("box_ap", math.nan)})
            if self.cfg.masks:
                results["best_mask_ap"] = best.get("mask_ap", math.nan)
        return results


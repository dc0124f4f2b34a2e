"""Full finetuning of a pretrained encoder on a labeled task (``prepretrain finetune``).

What the stage builds (the loop is ``prepretrain.train.engine``): a timm ViT classifier
initialised from any encoder (run dir, MAE/MAWS/timm/CLIP file, or random init), with the
MAE reference finetuning recipe (facebookresearch/mae FINETUNE.md, main_finetune.py): layer-wise lr decay, drop path,
RandAugment, random erasing, mixup + cutmix with label smoothing, and optionally a weight
EMA. Position embeddings are interpolated (bicubic) when finetuning at another resolution;
``global_pool=token`` pools the CLS token (MAWS finetunes), ``avg`` averages the patch
tokens into a fresh ``fc_norm`` (MAE finetunes).

Outputs in the run dir: ``last.safetensors`` and ``best.safetensors`` (timm classifier
state dicts with ``model``/``image_size``/``num_classes``/``global_pool`` metadata),
``ema.safetensors`` when the EMA is on, and top-1/top-5 on the test split in results.json.
"Best" is chosen on the ``val`` split, never on ``test`` (for image folders that have no
``test/``, ``val/`` is both; results.json then says ``best_selected_on_test: true``).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from timm.data import Mixup, create_transform
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from torch import nn

from ..config import Choices, ConfigError, TrainConfig
from ..data.images.transforms import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ZeroBitPosterize,
    crop_eval_transform,
    parse_crop_fraction,
)
from ..data.loader import RecordDataset, eval_loader
from ..data.readers.releases import display_names
from ..data.records import BadSample, Record
from ..evaluate.common import EvalData, open_eval_data
from ..evaluate.metrics import topk_accuracy
from ..models.classifier import classifier_metadata
from ..models.resolve import EncoderSpec, build_encoder, check_weights, resolve_encoder
from ..models.vit import check_model_and_size, forward_flops, resolve_name, vit_shape
from ..train.engine import Stage, TrainData
from ..train.optim import layer_decay_scale, param_groups
from ..train.run import BEST_WEIGHTS, Run


@dataclass
class FinetuneConfig(TrainConfig):
    """Finetuning recipe. Defaults are the CPU demo; configs/finetune_*.yaml hold the paper recipes."""

    stage_name = "finetune"
    encoder: str = ""  # run dir or weights file; empty = random init (the baseline); mae-init: untrained MAE init
    model: str = "vit_micro4"  # architecture when the weights carry no metadata
    task: str = "auto"  # coarse | fine (synthetic), label (image folders)
    global_pool: str = "token"  # token (MAWS: CLS) | avg (MAE: mean of patch tokens + fc_norm)
    layer_decay: float = 0.75  # lr scale decay^(num_layers + 1 - layer_id)
    drop_path: float = 0.1
    mixup: float = 0.8  # mixup alpha; 0 = off
    cutmix: float = 1.0  # cutmix alpha; 0 = off
    mixup_prob: float = 1.0  # probability of mixing a batch at all
    mixup_switch_prob: float = 0.5  # probability of cutmix instead of mixup when both are on
    label_smoothing: float = 0.1
    randaugment: str = "rand-m9-mstd0.5-inc1"  # timm RandAugment spec; "" = off
    random_erasing: float = 0.25  # probability (pixel mode)
    min_crop_scale: float = 0.08  # RandomResizedCrop scale lower bound
    ema_decay: float = 0.0  # weight EMA (timm ModelEmaV3, warmed up); 0 = off (the MAE reference has none)
    eval_batch_size: int = 256
    # evaluation crop: auto (today's: crop 0.875, images <= 64 px resized straight to size) | a crop fraction
    # in (0, 1] (resize to size / f, center-crop) | squash (resize to size x size, MAWS's released evaluation)
    eval_crop: str = "auto"
    # CPU-demo schedule (the reference: blr 5e-4 (B) / 1e-3 (L, H), batch 1024, 100 / 50 epochs, 5 warmup)
    blr: float = 2e-3
    epochs: float = 3.0
    warmup_epochs: float = 0.5
    min_lr: float = 1e-6
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.05

    # Every numeric key this class defines, with its interval (config.check_bounds).
    bounds = {
        "layer_decay": "(0, 1]", "drop_path": "[0, 1)", "mixup": ">= 0", "cutmix": ">= 0", "mixup_prob": "[0, 1]",
        "mixup_switch_prob": "[0, 1]", "label_smoothing": "[0, 1)", "random_erasing": "[0, 1]",
        "min_crop_scale": "(0, 1]", "ema_decay": "[0, 1)", "eval_batch_size": "> 0",
    }
    choices = {
        "decode": Choices(("auto", "pil"),
                          why="finetuning augments with timm's RandAugment, which works on PIL images"),
        "global_pool": ("token", "avg"),
    }

    def validate(self) -> None:
        super().validate()
        if str(self.eval_crop).strip().lower() not in ("auto", "squash"):
            try:
                parse_crop_fraction(str(self.eval_crop).strip())
            except ValueError as error:
                raise ConfigError("eval_crop", str(error)) from None
        if self.randaugment and not self.randaugment.startswith("rand"):
            raise ConfigError("randaugment", f"expected a timm RandAugment spec like 'rand-m9-mstd0.5-inc1', "
                                             f"got '{self.randaugment}'")
        check_model_and_size(self.model, self.image_size)
        if self.data == "synthetic" and self.task not in ("auto", "coarse", "fine"):
            raise ConfigError("task", f"the synthetic dataset has tasks coarse and fine; got '{self.task}'")
        check_weights("encoder", self.encoder)


# --------------------------------------------------------------------------------- model


class FinetuneModel(nn.Module):
    """The classifier and its optional weight EMA in one module, so training checkpoints hold both
    (resume then restores the EMA exactly) while the EMA copy gets no gradients or optimizer state."""

    def __init__(self, net: nn.Module, ema_decay: float = 0.0):
        super().__init__()
        self.net = net
        self.ema: ModelEmaV3 | None = None
        if ema_decay > 0:
            self.ema = ModelEmaV3(net, decay=ema_decay, use_warmup=True)
            for param in self.ema.parameters():
                param.requires_grad_(False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.net.set_grad_checkpointing(enable)



def classifier_weights(state: dict[str, torch.Tensor], ema: bool = False) -> dict[str, torch.Tensor]:
    """The timm classifier (or its EMA) out of a whole :class:`FinetuneModel` state dict."""
    prefix = "ema.module." if ema else "net."
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


@contextmanager
def numpy_seeded(seed: int) -> Iterator[None]:
    """Run a block with NumPy's global RNG seeded, then put the caller's NumPy state back."""
    saved = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(saved)


def allow_zero_bit_posterize(transform: Any) -> Any:
    """Keep RandAugment's strongest posterize working on current Pillow.

    timm's "increasing" posterize keeps ``4 - int(4 * m / 10)`` bits, i.e. 0 bits when a
    magnitude jittered by ``mstd`` reaches 10. Pillow used to return a black image for that
    (what the MAE reference runs saw); recent Pillow raises instead. This restores the black image.
    """
    for step in getattr(transform, "transforms", []):
        for op in getattr(step, "ops", []):
            if getattr(op, "name", "").startswith("Posterize"):
                op.aug_fn = ZeroBitPosterize(op.aug_fn)
    return transform


class FinetuneStage(Stage):
    """A pretrained (or random-init) ViT finetuned end to end on a labeled task."""

    name = "finetune"
    select_on = "val_top1"  # the loop keeps best.safetensors by validation top-1, never by test
    cfg: FinetuneConfig

    def __init__(self, cfg: FinetuneConfig):
        super().__init__(cfg)
        self.spec: EncoderSpec = resolve_encoder(cfg.encoder, cfg.model, cfg.image_size, cfg.seed)
        self.data: EvalData = open_eval_data(cfg.data, cfg.task, cfg.image_size, cfg.num_images)
        self.num_layers = self.spec.depth
        self.mixup = None
        if cfg.mixup > 0 or cfg.cutmix > 0:
            self.mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mixup_prob,
                               switch_prob=cfg.mixup_switch_prob, label_smoothing=cfg.label_smoothing,
                               num_classes=self.data.num_classes)
            self.criterion: nn.Module = SoftTargetCrossEntropy()
        elif cfg.label_smoothing > 0:
            self.criterion = LabelSmoothingCrossEntropy(cfg.label_smoothing)
        else:
            self.criterion = nn.CrossEntropyLoss()

    # ------------------------------------------------------------------ what it trains
    def build_model(self, run: Run) -> FinetuneModel:
        cfg = self.cfg
        net = build_encoder(self.spec, num_classes=self.data.num_classes, global_pool=cfg.global_pool,
                            drop_path_rate=cfg.drop_path)
        nn.init.trunc_normal_(net.head.weight, std=2e-5)  # MAE reference: a near-zero head
        nn.init.zeros_(net.head.bias)
        return FinetuneModel(net, cfg.ema_decay)

    def train_transform(self):
        """timm's ImageNet training transform: random-resized crop, flip, RandAugment, erasing."""
        cfg = self.cfg
        transform = create_transform(
            cfg.image_size, is_training=True, scale=(cfg.min_crop_scale, 1.0), interpolation="bicubic",
            auto_augment=cfg.randaugment or None, color_jitter=None, re_prob=cfg.random_erasing, re_mode="pixel",
            re_count=1, mean=IMAGENET_MEAN, std=IMAGENET_STD,
        )
        return allow_zero_bit_posterize(transform)

    def train_data(self, run: Run) -> TrainData:
        augment, task = self.train_transform(), self.data.task

        def transform(record: Record) -> dict[str, Any]:
            if task not in record.labels:
                raise BadSample(record.key, "missing_label", f"no '{task}' label")
            # timm's RandAugment picks its ops with NumPy's global RNG, which the loader does not
            # seed per sample: seed it from Python's (which it does) so augmentation is reproducible.
            with numpy_seeded(random.getrandbits(32)):
                image = augment(record.image)
            return {"image": image, "label": int(record.labels[task])}

        source = self.data.source("train")
        return TrainData(RecordDataset(source, transform), len(source))

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        images, labels = batch["image"], batch["label"]
        if self.mixup is None:
            return self.criterion(model(images), labels), {}
        if len(images) % 2:  # timm mixes pairs; drop the odd sample (only when a bad one was skipped)
            images, labels = images[:-1], labels[:-1]
        # timm's Mixup draws from NumPy's global RNG, which checkpoints do not hold: seed it from
        # torch's (which they do) so a resumed run mixes exactly as an uninterrupted one.
        with numpy_seeded(int(torch.randint(0, 2**31 - 1, (1,)))):
            images, targets = self.mixup(images, labels)
        return self.criterion(model(images), targets), {}

    def param_groups(self, model: nn.Module) -> list[dict]:
        def scale(name: str) -> float:
            return layer_decay_scale(name.removeprefix("net."), self.num_layers, self.cfg.layer_decay)

        return param_groups(model, self.cfg.weight_decay, lr_scale=scale)

    def after_step(self, model: nn.Module, step: int) -> None:
        if getattr(model, "ema", None) is not None:
            model.ema.update(model.net, step=step)

    def uses_after_step(self, model: nn.Module) -> bool:
        # The EMA is this hook's only work: without one the step needs no host read, unless a
        # subclass adds work of its own to the hook.
        return getattr(model, "ema", None) is not None or type(self).after_step is not FinetuneStage.after_step

    def flops_per_sample(self) -> float:
        shape = vit_shape(self.spec.model, depth=self.spec.depth, img_size=self.cfg.image_size)
        return 3 * forward_flops(shape)

    # --------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def _accuracy(self, net: nn.Module, role: str, device: torch.device) -> dict[str, float]:
        task, transform = self.data.task, crop_eval_transform(self.cfg.image_size, self.cfg.eval_crop)

        def to_tensors(record: Record) -> dict[str, Any]:
            return {"image": transform(record.image), "label": int(record.labels.get(task, -1))}

        dataset = RecordDataset(self.data.source(role), to_tensors)
        use_bf16 = device.type == "cuda" and self.cfg.precision in ("auto", "bf16")
        scores, labels = [], []
        for batch in eval_loader(dataset, self.cfg.eval_batch_size, self.cfg.num_workers):
            if "image" not in batch:
                continue
            keep = batch["label"] >= 0
            with torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext():
                logits = net(batch["image"][keep].to(device))
            scores.append(logits.float().cpu())
            labels.append(batch["label"][keep])
        return topk_accuracy(torch.cat(scores), torch.cat(labels))

    def evaluate(self, model: nn.Module, run: Run) -> dict[str, float]:
        """Top-1/top-5 on test (reported) and val (``val_top1``, for choosing the best checkpoint)."""
        device = run.device
        with run.gathered(model):  # the classifier and EMA are called directly, not through the root's forward
            metrics = self._accuracy(model.net, "test", device)
            val = metrics if self.data.selection_is_test else self._accuracy(model.net, "val", device)
            metrics["val_top1"] = val["top1"]
            if model.ema is not None:
                ema = self._accuracy(model.ema.module, "test", device)
                metrics.update({f"ema_{key}": value for key, value in ema.items()})
        return metrics

    def metadata(self) -> dict[str, str]:
        """What the exported classifier says about itself: architecture, and its outputs' class ids and
        names with the evaluation transform (``prepretrain classify`` aligns and sees images by them)."""
        cfg, data = self.cfg, self.data
        names = display_names(data.source("train"), data.task)
        return {"model": resolve_name(cfg.model), "image_size": str(cfg.image_size),
                "num_classes": str(data.num_classes), "global_pool": cfg.global_pool, "task": data.task,
                "format": "timm-vit-classifier", **classifier_metadata(data.class_names, names, cfg.eval_crop)}

    def best_weights(self, model: nn.Module, run: Run) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        return classifier_weights(run.full_state_dict(model)), self.metadata()

    def finish(self, model: nn.Module, run: Run) -> dict[str, Any]:
        """Export the last weights (and the EMA); report the best checkpoint's numbers."""
        state = run.full_state_dict(model)
        last = run.save_weights("last.safetensors", classifier_weights(state), self.metadata(), dtype=torch.float32)
        results: dict[str, Any] = {"last": str(last), "task": self.data.task,
                                   "num_classes": self.data.num_classes, "encoder": self.spec.description,
                                   "test_split": self.data.split_names["test"]}
        if model.ema is not None:
            ema = run.save_weights("ema.safetensors", classifier_weights(state, ema=True), self.metadata(),
                                   dtype=torch.float32)
            results["ema"] = str(ema)
        best = run.best
        if best:
            results.update({"best": str(run.path(BEST_WEIGHTS)), "best_step": best["step"],
                            "best_val_top1": best["val_top1"], "best_top1": best["top1"],
                            "best_top5": best.get("top5", math.nan),
                            "best_selected_on_test": self.data.selection_is_test})
        return results

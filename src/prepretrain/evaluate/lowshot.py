"""Low-shot transfer: K labeled images per class, several seeded splits, mean and std of top-1.

Protocol (MAWS, Singh et al. 2023, arXiv 2303.13496, low-shot transfer): K in {1, 5, 10} images per
class (at most K where a class has fewer), 5 random splits, the encoder frozen. Two classifiers on
top:

* ``method=linear``: L2-regularised logistic regression on the cached frozen features of the
  K-shot images (fixed penalty: with one image per class there is nothing to validate on
  without peeking at data the protocol does not grant);
* ``method=vpt``: visual prompt tuning, shallow variant (Jia et al. 2022), the paper's best
  low-shot protocol: learnable prompt tokens are inserted after the patch embedding (between
  the CLS token and the patch tokens), and only they and a linear head are trained.

Splits are drawn from the training split only and are a pure function of (labels, seed):
for each class a seeded permutation of its images, of which the first K are taken, so the
1-shot set of a seed is inside its 5-shot set, which is inside its 10-shot set.
"""

from __future__ import annotations

import math
import statistics
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError
from ..data.images.transforms import pretrain_transform
from ..data.loader import RecordDataset, SampleStream, eval_loader, train_loader
from ..data.records import MapSource, Record
from ..train.optim import lr_at
from .common import EvalConfig, EvalData, FrozenEncoder
from .features import LabeledFeatures, label_tasks, labeled_image_transform
from .linear import fit_logistic_regression
from .metrics import topk_accuracy


@dataclass
class LowShotConfig(EvalConfig):
    """Low-shot evaluation (``prepretrain lowshot``)."""

    stage_name = "lowshot"
    method: str = "linear"  # linear | vpt
    shots: tuple[int, ...] = (1, 5, 10)
    num_splits: int = 5
    l2: float = 0.1  # logistic-regression penalty of the linear classifier (mean CE + l2/2 |W|^2)
    max_iter: int = 1000
    # VPT-shallow
    vpt_prompts: int = 8
    vpt_steps: int = 100  # optimizer steps per (split, K)
    vpt_batch_size: int = 32
    vpt_lr: float = 0.1  # SGD with momentum 0.9, cosine schedule
    vpt_weight_decay: float = 1e-4
    vpt_min_crop_scale: float = 0.5  # RandomResizedCrop + flip on the few training images

    # Every numeric key this class defines, with its interval (config.check_bounds).
    bounds = {
        "num_splits": "> 0", "l2": ">= 0", "max_iter": "> 0", "vpt_prompts": "> 0", "vpt_steps": "> 0",
        "vpt_batch_size": "> 0", "vpt_lr": "> 0", "vpt_weight_decay": ">= 0", "vpt_min_crop_scale": "(0, 1]",
    }
    choices = {"method": ("linear", "vpt")}

    def validate(self) -> None:
        super().validate()
        if not self.shots or any(k <= 0 for k in self.shots):
            raise ConfigError("shots", f"needs positive shot counts, got {self.shots}")


def lowshot_indices(labels: torch.Tensor, shots: int, seed: int) -> torch.Tensor:
    """Rows of ``labels`` forming a K-shot split: at most ``shots`` per class, sorted.

    Each class's rows are permuted by a generator seeded with ``seed`` alone (classes in
    increasing order), so splits are reproducible and nested across K for one seed.
    """
    generator = torch.Generator().manual_seed(seed)
    labels = labels.cpu()
    chosen = []
    for label in torch.unique(labels).tolist():
        rows = torch.nonzero(labels == label).flatten()
        chosen.append(rows[torch.randperm(len(rows), generator=generator)][:shots])
    return torch.cat(chosen).sort().values


def split_seed(seed: int, split: int) -> int:
    """Seed of split ``split``: independent of K so that splits nest across shot counts."""
    return seed * 1000 + split


# ---------------------------------------------------------------------------------- VPT


class PromptedViT(nn.Module):
    """VPT-shallow around a frozen timm ViT: ``[CLS, prompts, patches]`` through the frozen blocks.

    Prompts get no position embedding (they have no position); the head reads the CLS token
    (``pool="token"``) or the mean of the patch tokens (``pool="avg"``, prompts excluded).
    """

    def __init__(self, encoder: nn.Module, num_classes: int, num_prompts: int, pool: str = "token"):
        super().__init__()
        self.encoder = encoder
        for param in self.encoder.parameters():
            param.requires_grad_(False)
        dim = encoder.embed_dim
        patch_h, patch_w = encoder.patch_embed.patch_size
        bound = math.sqrt(6.0 / float(3 * patch_h * patch_w + dim))  # VPT's uniform (Xavier-like) init
        self.prompts = nn.Parameter(torch.empty(1, num_prompts, dim).uniform_(-bound, bound))
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)
        self.pool = pool

    def train(self, mode: bool = True) -> PromptedViT:
        super().train(mode)
        self.encoder.eval()  # frozen: no dropout / drop path, whatever the mode
        return self

    def features(self, images: torch.Tensor) -> torch.Tensor:
        encoder = self.encoder
        x = encoder.patch_embed(images)
        x = encoder._pos_embed(x)  # CLS + position embeddings (interpolated when dynamic)
        x = encoder.norm_pre(encoder.patch_drop(x))
        prefix = encoder.num_prefix_tokens
        x = torch.cat([x[:, :prefix], self.prompts.expand(len(x), -1, -1).to(x.dtype), x[:, prefix:]], dim=1)
        x = encoder.norm(encoder.blocks(x))
        if self.pool == "token":
            return x[:, 0]
        return x[:, prefix + self.prompts.shape[1] :].mean(dim=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


class SubsetSource:
    """The records ``indices`` of ``source`` (a ``MapSource``): the K-shot training images."""

    def __init__(self, source: MapSource, indices: list[int]):
        self.source = source
        self.indices = list(indices)
        self.class_names = getattr(source, "class_names", {})

    def __len__(self) -> int:
        return len(self.indices)

    def get(self, index: int) -> Record:
        return self.source.get(self.indices[index])


class _TestBatches:
    """Test images and labels for repeated evaluation: kept in memory when small, else re-read."""

    def __init__(self, source: MapSource, task: str, image_size: int, batch_size: int, max_bytes: int = 1 << 30):
        tasks = label_tasks(source)
        self.column = tasks.index(task)
        self.dataset = RecordDataset(source, labeled_image_transform(image_size, tasks))
        self.batch_size = batch_size
        self.cached: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        if len(source) * 3 * image_size * image_size * 4 <= max_bytes:
            self.cached = list(self._read())

    def _read(self):
        for batch in eval_loader(self.dataset, batch_size=self.batch_size):
            if "image" in batch:
                labels = batch["labels"][:, self.column]
                keep = labels >= 0
                yield batch["image"][keep], labels[keep]

    def __iter__(self):
        return iter(self.cached) if self.cached is not None else self._read()


def train_vpt(encoder: FrozenEncoder, data: EvalData, rows: list[int], cfg: LowShotConfig, seed: int) -> PromptedViT:
    """Prompt-tune on the training images ``rows`` (source indices): SGD, momentum 0.9, cosine lr."""
    device = encoder.device
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = PromptedViT(encoder.model, data.num_classes, cfg.vpt_prompts, cfg.pool).to(device)
    augment = pretrain_transform(data.image_size, cfg.vpt_min_crop_scale)
    task = data.task

    def transform(record: Record) -> dict[str, Any]:
        return {"image": augment(record.image), "label": int(record.labels[task])}

    subset = SubsetSource(data.source("train"), rows)
    batch_size = min(cfg.vpt_batch_size, len(subset))
    stream = SampleStream(len(subset), batch_size, seed=seed)
    batches = iter(train_loader(RecordDataset(subset, transform), stream, cfg.num_workers))
    trained = [model.prompts, *model.head.parameters()]
    optimizer = torch.optim.SGD(trained, lr=cfg.vpt_lr, momentum=0.9, weight_decay=cfg.vpt_weight_decay)
    warmup = cfg.vpt_steps // 10
    model.train()
    for step in range(cfg.vpt_steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, cfg.vpt_steps, warmup, cfg.vpt_lr)
        batch = next(batches)
        if "image" not in batch:
            continue
        with _autocast(device, encoder.dtype):
            logits = model(batch["image"].to(device))
        loss = F.cross_entropy(logits.float(), batch["label"].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval()


def _autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


@torch.no_grad()
def _vpt_scores(model: PromptedViT, batches: _TestBatches, device: torch.device,
                dtype: torch.dtype | None) -> tuple[torch.Tensor, torch.Tensor]:
    scores, labels = [], []
    for images, batch_labels in batches:
        with _autocast(device, dtype):
            scores.append(model(images.to(device)).float().cpu())
        labels.append(batch_labels)
    return torch.cat(scores), torch.cat(labels)


# ------------------------------------------------------------------------------ evaluator


def _summary(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single split)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def evaluate_lowshot(encoder: FrozenEncoder, data: EvalData, cfg: LowShotConfig) -> dict[str, Any]:
    """Mean/std top-1 (%) over ``num_splits`` K-shot splits per K; the evaluator interface of ``lowshot``."""
    train: LabeledFeatures = encoder.features(data, "train").labeled(data.task, cfg.pool)
    results: dict[str, Any] = {"method": cfg.method, "pool": cfg.pool, "num_splits": cfg.num_splits,
                               "shots": list(cfg.shots)}
    test_features = test_batches = None
    if cfg.method == "linear":
        test_features = encoder.features(data, "test").labeled(data.task, cfg.pool)
        results["num_test"] = len(test_features)
    else:
        test_batches = _TestBatches(data.source("test"), data.task, data.image_size, encoder.batch_size)
    for shots in cfg.shots:
        accuracies, sizes = [], []
        for split in range(cfg.num_splits):
            seed = split_seed(cfg.seed, split)
            rows = lowshot_indices(train.y, shots, seed)
            sizes.append(len(rows))
            if cfg.method == "linear":
                chosen = train.subset(rows)
                classifier = fit_logistic_regression(chosen.x, chosen.y, data.num_classes, cfg.l2,
                                                     max_iter=cfg.max_iter)
                scores, labels = classifier.scores(test_features.x), test_features.y
            else:
                model = train_vpt(encoder, data, train.indices[rows].tolist(), cfg, seed)
                scores, labels = _vpt_scores(model, test_batches, encoder.device, encoder.dtype)
            accuracies.append(topk_accuracy(scores, labels, (1,))["top1"])
        mean, std = _summary(accuracies)
        results[f"{shots}shot_top1"] = mean
        results[f"{shots}shot_top1_std"] = std
        results[f"{shots}shot_top1_splits"] = accuracies
        results[f"{shots}shot_train_images"] = sizes[0]
    return results

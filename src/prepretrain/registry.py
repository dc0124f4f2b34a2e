"""The one registry of configured commands: training stages and evaluations.

The CLI builds its ``prepretrain <name>`` parsers from it and the pipeline runs its jobs
through it, so a new stage (video, detection) registers here once and both see it. Each entry
says which config class the command takes and what runs it (``cfg -> results``); argument
parsing stays in :mod:`prepretrain.cli`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .evaluate.classify import ClassifyConfig, run_classify
from .evaluate.runner import EVALUATIONS, run_evaluation
from .evaluate.zeroshot import ZeroShotConfig, run_zeroshot
from .plan import check_micro_batch_fits
from .stages.detect import DetectConfig, DetectStage
from .stages.finetune import FinetuneConfig, FinetuneStage
from .stages.lit import LiTConfig, LiTStage
from .stages.mae import MAEConfig, MAEStage
from .stages.video import VideoConfig, VideoStage
from .stages.wsp import WSPConfig, WSPStage
from .train.engine import Stage, train

TRAINING_EXAMPLES = """\
Examples:
  prepretrain {name}
  prepretrain {name} out_dir=runs/my_{name} seed=1 steps=200
  prepretrain {name} --config configs/{name}_vit_b16.yaml data=/path/to/images device=cuda
"""

EVALUATION_EXAMPLES = """\
encoder= takes a run directory (mae/wsp/lit: encoder.safetensors), a weights file (timm, MAWS,
MAE full, MAWS CLIP; add model=NAME when the file has no metadata), or nothing (random init).
Frozen features are cached (cache_dir, default <parent of out_dir>/feature_cache) and shared by
probe, lowshot and knn. Results: <out_dir>/results.json (accuracies in percent) + config.yaml.
Examples:
  prepretrain {name}
  prepretrain {name} encoder=runs/mae out_dir=runs/eval/{name}
  prepretrain {name} encoder=maws_vit_b16.pt model=vit_b16 data=/data/imagenet device=cuda
"""

ZEROSHOT_EXAMPLES = """\
Examples:
  prepretrain zeroshot model=runs/lit
  prepretrain zeroshot model=runs/lit task=fine
  prepretrain zeroshot model=runs/lit data=/data/pets split=test task=label classes=pets.txt templates=t.txt
  prepretrain zeroshot model=vit_b16_xlmr_b.pt tokenizer=xlmr.sentencepiece.bpe.model image_size=224 \\
      data=/data/imagenet split=val task=label classes=imagenet_classes.txt device=cuda
Class files: one class per line, synonyms separated by commas (or JSON). Templates: one per line with {}.
"""


CLASSIFY_EXAMPLES = """\
model= takes a finetune run, a classifier file (timm, MAWS, MAE, SWAG, torchvision; arch=NAME when it has
no metadata) or a released finetune; data= any labelled set (the benchmarks' release layouts included:
imagenet-val, imagenet-v2, objectnet, inaturalist, food101; see prepretrain data stats) or a folder to label.
Writes <out_dir>/results.json and predictions.csv.
Examples:
  prepretrain classify model=runs/finetune data=synthetic split=test
  prepretrain classify model=maws:vit_b16_ft_in1k data=/data/imagenet split=val real_labels=builtin
  prepretrain classify model=maws:vit_b16_ft_in1k data=/data/imagenetv2-matched-frequency-format-val
  prepretrain classify model=maws:vit_b16_ft_in1k data=/data/objectnet-1.0
  prepretrain classify model=runs/finetune data=/photos/unsorted
"""


@dataclass(frozen=True)
class Command:
    """A command configured by a dataclass (``--config FILE`` and ``key=value``)."""

    name: str
    help: str
    config: type
    run: Callable[[Any], dict[str, Any]]  # a validated config -> results
    kind: str  # "train" (a stage on the engine) | "evaluate" (a frozen model)
    examples: str = ""
    stage: type[Stage] | None = None  # the stage a "train" command runs (its FLOPs price the pipeline's plots)


def training(stage_cls: type[Stage]) -> Callable[[Any], dict[str, Any]]:
    """``cfg -> results`` of a stage: the one training loop over what the stage declares, after the
    planner's check that a micro-batch fits in the device's memory (refused before any compute)."""

    def run(cfg: Any) -> dict[str, Any]:
        check_micro_batch_fits(cfg, cfg.device, int(os.environ.get("WORLD_SIZE", "1")))
        return train(stage_cls(cfg))

    return run


def _stage(name: str, help_text: str, config: type, stage_cls: type[Stage]) -> Command:
    return Command(name, help_text, config, training(stage_cls), "train", TRAINING_EXAMPLES.format(name=name),
                   stage_cls)


def _evaluation(name: str, help_text: str) -> Command:
    return Command(name, help_text, EVALUATIONS[name][0], run_evaluation, "evaluate",
                   EVALUATION_EXAMPLES.format(name=name))


COMMANDS: dict[str, Command] = {
    command.name: command
    for command in (
        _stage("mae", "MAE pre-pretraining (masked autoencoder)", MAEConfig, MAEStage),
        _stage("wsp", "WSP: weakly supervised hashtag pretraining", WSPConfig, WSPStage),
        _stage("lit", "LiT: train a text tower against a locked image tower", LiTConfig, LiTStage),
        _stage("finetune", "full finetuning on a labeled task", FinetuneConfig, FinetuneStage),
        _stage("video", "video finetuning on clips (K400, SSv2): a video ViT inflated from the image encoder",
               VideoConfig, VideoStage),
        _stage("detect", "object detection and instance segmentation: ViTDet backbone in Mask R-CNN (COCO, LVIS)",
               DetectConfig, DetectStage),
        _evaluation("probe", "linear probe on frozen features (logistic regression, or the MAE BatchNorm+linear "
                             "head)"),
        _evaluation("lowshot", "low-shot transfer: K images per class, seeded splits (linear classifier or VPT "
                               "prompts)"),
        _evaluation("knn", "weighted kNN classifier on frozen features (cosine, k=20, T=0.07)"),
        Command("classify", "score a classifier on a labelled set (ImageNet val/v2/ReaL, ObjectNet, iNat, Food-101, "
                            "folders) or label a folder of images", ClassifyConfig, run_classify, "evaluate",
                CLASSIFY_EXAMPLES),
        Command("zeroshot", "zero-shot classification with a LiT/CLIP model (class names x synonyms x templates)",
                ZeroShotConfig, run_zeroshot, "evaluate", ZEROSHOT_EXAMPLES),
    )
}


def command(name: str) -> Command:
    if name not in COMMANDS:
        raise KeyError(f"no command named '{name}'; known: {', '.join(COMMANDS)}")
    return COMMANDS[name]

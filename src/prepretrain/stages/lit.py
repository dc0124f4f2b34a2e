"""LiT: train a text tower against a locked image tower (the loop is ``prepretrain.train.engine``).

What the stage builds: a :class:`~prepretrain.models.clip.CLIPModel` whose image tower comes
from ``encoder=`` (an MAE/WSP run directory, an encoder file, a MAWS or LiT checkpoint) and is
frozen; a text tower (``text_micro`` for CPU work, ``xlmr_base``/``xlmr_large`` as MAWS);
projections and temperature. Data: image-caption pairs (the synthetic captions by default;
any source whose records carry ``caption``). Loss: the symmetric CLIP loss over the global
batch (``batch_size``: every micro-batch on every rank), whatever the accumulation
(``Stage.whole_batch_loss``): with ``batch_size`` > ``micro_batch_size`` x ranks the loop
embeds the step's micro-batches without a graph, then recomputes one at a time with its graph
against all the others (open_clip's ``--accum-freq``): one text-tower forward more per sample.

The frozen tower is why LiT is cheap, and this stage takes the rest of the gain: without
augmentation an image's tower features never change, so with ``cache_features=auto`` they
are computed once (kept in ``feature_cache.safetensors`` in the run directory, reused on
resume) and training only runs the text tower and the projections. ``prepretrain bench lit``
measures the difference.

What to expect: zero-shot accuracy is bounded by what the locked tower's features separate.
On the synthetic data (10 coarse shapes, chance 10%), with this stage's defaults, measured on 2
CPU cores: a random tower (no ``encoder=``) gives 10.0% (its features are nearly constant);
the default MAE run's tower about 20%; the default WSP run initialised from it
(``prepretrain mae && prepretrain wsp init=runs/mae && prepretrain lit encoder=runs/wsp``)
42.6-45.6% over code revisions of 2026-11-26, against ~52% for a linear probe on the same
features; the MAE tower alone probes at 43.5%, random init at 24.9%.
``tests/test_demo_chain.py`` runs that chain with these defaults.

Evaluation: zero-shot top-1/top-5 on the validation split (synthetic: the coarse shape
categories with their synonyms; other data: ``zeroshot_classes=FILE``). ``finish`` writes
``clip.safetensors`` (MAWS CLIP key names + architecture/tokenizer metadata) so that
``prepretrain zeroshot model=RUN_DIR`` works.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config import Choices, ConfigError, TextSourceConfig
from ..data.images.pixels import train_pixels
from ..data.images.transforms import eval_transform
from ..data.loader import RecordDataset, eval_loader
from ..data.readers.open import open_stage_data
from ..data.records import BadSample, Record
from ..evaluate.zeroshot import (
    CLASS_SETS,
    TEMPLATE_SETS,
    ZeroShotScorer,
    article_fix_for,
    build_classifier,
    check_article_fix,
    check_names_file,
    default_templates,
    labelled_images,
    read_class_names,
    read_templates,
    source_classes,
)
from ..models.checkpoints import load_encoder_weights, load_strict, read_state_dict
from ..models.clip import (
    CLIPModel,
    build_clip,
    clip_loss_over_slots,
    retrieval_accuracy,
    save_clip,
    text_tower_state,
)
from ..models.layouts import encoder_from_any
from ..models.openclip import is_open_clip_folder
from ..models.resolve import check_weights, encoder_metadata, resolve_weights
from ..models.text import TEXT_SHAPES, text_forward_flops, text_shape
from ..models.tokenizers import SentencePieceTokenizer, Tokenizer, build_tokenizer
from ..models.vit import (
    VIT_SHAPES,
    check_model_and_size,
    forward_flops,
    resolve_name,
    vision_name_from_state,
    vit_shape,
)
from ..train.engine import Stage, TrainData
from ..train.frozen import FrozenInputs
from ..train.run import Run


def check_tower_names(model: str, text_model: str) -> None:
    """ConfigError naming ``model`` or ``text_model`` when either tower is unknown."""
    try:
        resolve_name(model)
    except ValueError as error:
        raise ConfigError("model", str(error)) from None
    if text_model not in TEXT_SHAPES:
        raise ConfigError("text_model", f"unknown text tower; known: {', '.join(sorted(TEXT_SHAPES))}")


_YES = ("yes", "true", "on", "1")  # YAML turns a bare `no` into false: accept both spellings
_NO = ("no", "false", "off", "0")


@dataclass
class LiTConfig(TextSourceConfig):
    """LiT recipe. Defaults are the CPU demo; configs/lit_*.yaml hold the paper-scale towers."""

    stage_name = "lit"
    encoder: str = ""  # image tower: run dir or file (MAE/WSP/MAWS/timm/LiT); empty = random init
    model: str = "vit_micro4"  # image tower architecture when no encoder file says otherwise
    vision_depth: int = 0  # 0 = the architecture's depth
    text_model: str = "text_micro"  # text_micro | text_small | xlmr_base | xlmr_large
    text_depth: int = 0  # overrides of the text tower's shape; 0 = the named shape
    text_width: int = 0
    text_heads: int = 0
    text_dropout: float = 0.0
    text_init: str = ""  # text tower from MAWS CLIP / LiT (text_encoder.*), RoBERTa (encoder.*), open_clip folder/file
    text_init_config: str = ""  # open_clip_config.json of an open_clip checkpoint file text_init= (default: beside it)
    tokenizer: str = "bytes"  # bytes | path to a SentencePiece .model (XLM-R for MAWS towers)
    max_text_tokens: int = 0  # tokens kept per caption before BOS/EOS; 0 = tokenizer default
    embed_dim: int = 0  # joint embedding size; 0 = the text tower's width
    lock_vision_projection: bool = False  # also freeze the image-side projection
    augment: bool = False  # random-resized crops + flips of the images (disables the cache)
    min_crop_scale: float = 0.5
    cache_features: str = "auto"  # auto (= when augment is off) | yes | no
    zeroshot_task: str = "coarse"  # label task scored at evaluation
    zeroshot_classes: str = ""  # class names file (or imagenet1k) for data without its own names
    zeroshot_templates: str = ""  # templates file, or prepretrain | openai80 (shipped); empty = prepretrain
    zeroshot_article_fix: str = "auto"  # "a {}" -> "an {}" before vowels: auto (= shipped set only) | true | false
    eval_images: int = 0  # validation images for zero-shot; 0 = the whole split
    # CPU-demo schedule, chosen with a shape-aware stand-in tower (tests/test_lit.py); paper scale:
    # configs/lit_*.yaml
    batch_size: int = 256
    epochs: float = 8.0
    blr: float = 2e-3
    warmup_epochs: float = 1.0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.98)

    # Every numeric key this class defines, with its interval (config.check_bounds).
    bounds = {
        "vision_depth": ">= 0", "text_depth": ">= 0", "text_width": ">= 0", "text_heads": ">= 0",
        "text_dropout": "[0, 1)", "max_text_tokens": ">= 0", "embed_dim": ">= 0", "min_crop_scale": "(0, 1]",
        "eval_images": ">= 0",
    }
    choices = {"cache_features": Choices(("auto", *_YES, *_NO), any_case=True)}

    def validate(self) -> None:
        super().validate()
        check_tower_names(self.model, self.text_model)
        if self.cache_features.lower() in _YES and self.augment:
            raise ConfigError("cache_features", "cached features need fixed images: set augment=false or "
                              "cache_features=no")
        if self.tokenizer not in ("bytes", "byte", "") and not Path(self.tokenizer).is_file():
            raise ConfigError("tokenizer", f"'bytes' or a SentencePiece .model file; not found: {self.tokenizer}")
        if self.text_model.startswith("xlmr") and self.tokenizer in ("bytes", "byte", ""):
            raise ConfigError("tokenizer", f"{self.text_model} needs the XLM-R SentencePiece model: "
                              "tokenizer=/path/to/xlmr.sentencepiece.bpe.model")
        shape = text_shape(self.text_model, depth=self.text_depth, width=self.text_width, num_heads=self.text_heads)
        if shape.width % shape.num_heads:
            raise ConfigError("text_heads", f"{shape.num_heads} heads do not divide width {shape.width}")
        if self.max_text_tokens and self.max_text_tokens + 2 > shape.max_tokens:
            raise ConfigError("max_text_tokens", f"{self.text_model} has positions for {shape.max_tokens - 2} "
                              "tokens plus BOS/EOS")
        if self.text_init and not Path(self.text_init).is_file() and not is_open_clip_folder(self.text_init):
            raise ConfigError("text_init", f"no such file or open_clip folder: {self.text_init}")
        if self.text_init_config and not Path(self.text_init_config).is_file():
            raise ConfigError("text_init_config", f"file not found: {self.text_init_config}")
        check_weights("encoder", self.encoder)
        check_names_file("zeroshot_classes", self.zeroshot_classes, CLASS_SETS)
        check_names_file("zeroshot_templates", self.zeroshot_templates, TEMPLATE_SETS)
        check_article_fix("zeroshot_article_fix", self.zeroshot_article_fix)
        if not self.encoder:
            check_model_and_size(self.model, self.image_size)

    @property
    def use_cache(self) -> bool:
        choice = self.cache_features.lower()
        return choice in _YES or (choice == "auto" and not self.augment)




def caption_pairs(transform, tokenizer: Tokenizer):
    """Record -> {image, tokens}; a record without a caption is a counted skip."""

    def apply(record: Record) -> dict[str, Any]:
        if not record.caption.strip():
            raise BadSample(record.key, "no_caption")
        return {"image": transform(record.image), "tokens": tokenizer(record.caption)[0]}

    return apply


def image_features(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """What the locked tower gives for a batch of images (cached once when images are fixed)."""
    return model.image_features(images)


class LiTStage(Stage):
    name = "lit"
    whole_batch_loss = True  # the contrastive batch must be the global batch
    cfg: LiTConfig

    def __init__(self, cfg: LiTConfig):
        super().__init__(cfg)
        self.tokenizer = build_tokenizer(cfg.tokenizer, cfg.max_text_tokens)
        self.vision_model = cfg.model
        self.image_tower = "random init"
        self.vision_depth = cfg.vision_depth
        self.frozen: FrozenInputs | None = None
        self._val_features: tuple[torch.Tensor, torch.Tensor] | None = None
        self._classifier_inputs: tuple[list[list[str]], list[str]] | None = None

    # ------------------------------------------------------------------ model
    def build_model(self, run: Run) -> CLIPModel:
        cfg = self.cfg
        vision_state = None
        vision_depth = cfg.vision_depth
        if cfg.encoder:
            weights = resolve_weights(cfg.encoder)
            vision_state = encoder_from_any(read_state_dict(weights.path))
            self.vision_model, depth, _ = vision_name_from_state(vision_state)
            if weights.model:
                self.vision_model = resolve_name(weights.model)
            vision_depth = depth if depth != VIT_SHAPES[self.vision_model].depth else 0
            self.image_tower = str(weights.path)
        text_overrides = {"vocab_size": self.tokenizer.vocab_size, "depth": cfg.text_depth,
                          "width": cfg.text_width, "num_heads": cfg.text_heads}
        model = build_clip(self.vision_model, cfg.text_model, embed_dim=cfg.embed_dim, image_size=cfg.image_size,
                           vision_depth=vision_depth, text_overrides=text_overrides, text_dropout=cfg.text_dropout,
                           lock_vision=True, lock_vision_projection=cfg.lock_vision_projection)
        if cfg.text_init:
            load_strict(model.text_encoder, text_tower_state(cfg.text_init, cfg.text_init_config))
            run.print(f"text tower initialised from {cfg.text_init}")
        if vision_state is not None:
            load_encoder_weights(model.vision_encoder, vision_state)
            run.print(f"image tower {self.vision_model} (depth {len(model.vision_encoder.blocks)}) "
                      f"from {self.image_tower}, locked")
        else:
            run.print(f"no encoder given: the image tower ({self.vision_model}) is RANDOMLY INITIALISED and locked; "
                      "pass encoder=RUN_DIR_OR_FILE (e.g. a WSP run) for meaningful zero-shot numbers")
        self.vision_depth = len(model.vision_encoder.blocks)
        return model

    # ------------------------------------------------------------------ data
    def train_data(self, run: Run) -> TrainData:
        cfg = self.cfg
        if cfg.augment:
            pixels = train_pixels(cfg.decode, cfg.data, cfg.image_size, cfg.min_crop_scale)
            source = open_stage_data(cfg, "train", pixels=pixels.pixels)
            dataset = RecordDataset(source, caption_pairs(pixels.sample, self.tokenizer), batch_transform=pixels.batch)
            return TrainData(dataset, len(source), device_transform=pixels.device)
        source = open_stage_data(cfg, "train")
        dataset = RecordDataset(source, caption_pairs(eval_transform(cfg.image_size, crop_fraction=1.0),
                                                      self.tokenizer))
        if not cfg.use_cache:
            return TrainData(dataset, len(source))
        # The loop runs the locked tower over the images once (or reads the run's cache back).
        self.frozen = FrozenInputs(dataset, image_features, key=self._cache_key())
        return TrainData(dataset, len(source), frozen=self.frozen)

    def _cache_key(self) -> str:
        cfg = self.cfg
        parts = [cfg.data, str(cfg.num_images), str(cfg.image_size), self.image_tower, self.vision_model,
                 json.dumps(self.tokenizer.describe(), sort_keys=True), str(cfg.vision_depth)]
        if self.image_tower != "random init":
            stat = Path(self.image_tower).stat()
            parts += [str(stat.st_size), str(stat.st_mtime_ns)]
        else:
            parts.append(f"seed={cfg.seed}")
        return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]

    # ------------------------------------------------------------------ loss
    def embed(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(image embeddings, text embeddings, temperature) of one micro-batch."""
        if "image_features" in batch:
            return model(batch["tokens"], image_features=batch["image_features"])
        return model(batch["tokens"], images=batch["image"])

    def loss_of_embeddings(self, embedded: list[Any], live: int) -> tuple[torch.Tensor, dict[str, float]]:
        """The CLIP loss over the global batch: every micro-batch of the step on every rank."""
        images, texts = [e[0] for e in embedded], [e[1] for e in embedded]
        scale = embedded[live][2]
        loss = clip_loss_over_slots(images, texts, scale, live)
        return loss, {"temperature": scale.detach(),
                      "batch_retrieval": retrieval_accuracy(torch.cat(images).detach(), torch.cat(texts).detach())}

    def flops_per_sample(self) -> float:
        """Text tower forward + backward (3x), plus the locked image tower's forward when not cached."""
        cfg = self.cfg
        shape = text_shape(cfg.text_model, vocab_size=self.tokenizer.vocab_size, depth=cfg.text_depth,
                           width=cfg.text_width, num_heads=cfg.text_heads)
        flops = 3 * text_forward_flops(shape, self.tokenizer.context_length)
        if not cfg.use_cache:
            vision = vit_shape(self.vision_model, img_size=cfg.image_size, depth=self.vision_depth or None)
            flops += forward_flops(vision)
        return flops

    # ------------------------------------------------------------------ evaluation
    def _zeroshot_inputs(self) -> tuple[list[list[str]], list[str]] | None:
        if self._classifier_inputs is None:
            cfg = self.cfg
            templates = read_templates(cfg.zeroshot_templates) if cfg.zeroshot_templates else default_templates()
            if cfg.zeroshot_classes:
                classes = read_class_names(cfg.zeroshot_classes, cfg.zeroshot_task)
            else:
                try:
                    source = open_stage_data(cfg, "val")
                    classes = source_classes(source, cfg.zeroshot_task)
                except (FileNotFoundError, KeyError, ValueError):
                    return None
            self._classifier_inputs = (classes, templates)
        return self._classifier_inputs

    def validation_features(self, model: CLIPModel, run: Run) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(locked-tower features, labels) of the validation images, computed once for all evaluations."""
        if self._val_features is None:
            cfg = self.cfg
            try:
                source = open_stage_data(cfg, "val")
            except (FileNotFoundError, KeyError, ValueError):
                return None
            dataset = RecordDataset(source, labelled_images(eval_transform(cfg.image_size, crop_fraction=1.0),
                                                             cfg.zeroshot_task))
            features, labels = [], []
            for batch in eval_loader(dataset, batch_size=256, num_workers=cfg.num_workers):
                if "image" not in batch:
                    continue
                with torch.no_grad(), run.gathered(model):
                    features.append(model.image_features(batch["image"].to(run.device)).float())
                labels.append(batch["label"].to(run.device))
                if cfg.eval_images and sum(len(x) for x in labels) >= cfg.eval_images:
                    break
            if not features:
                return None
            limit = cfg.eval_images or None
            self._val_features = (torch.cat(features)[:limit], torch.cat(labels)[:limit])
        return self._val_features

    def evaluate(self, model: nn.Module, run: Run) -> dict[str, float]:
        """Zero-shot top-1/top-5 (percent) on the validation split: the ``zeroshot`` command's
        evaluator, fed the cached locked-tower features projected by the current model."""
        inputs = self._zeroshot_inputs()
        val = self.validation_features(model, run) if inputs else None
        if inputs is None or val is None:
            return {}
        classes, templates = inputs
        features, labels = val
        with run.gathered(model):
            article_fix = article_fix_for(self.cfg.zeroshot_article_fix, self.cfg.zeroshot_templates)
            scorer = ZeroShotScorer(build_classifier(model, self.tokenizer, classes, templates, run.device,
                                                     article_fix=article_fix))
            with torch.no_grad():
                scorer.add(model.project_images(features), labels)
        scores = scorer.result()
        task = self.cfg.zeroshot_task
        return {f"zeroshot_{task}_top1": scores["top1"], f"zeroshot_{task}_top5": scores["top5"]}

    # ------------------------------------------------------------------ export
    def tokenizer_info(self, run_dir: Path) -> dict[str, Any]:
        """Tokenizer description with a SentencePiece model copied into the run directory."""
        info = self.tokenizer.describe()
        if isinstance(self.tokenizer, SentencePieceTokenizer):
            self.tokenizer.copy_model_to(run_dir, "tokenizer.model")
            info["model_file"] = "tokenizer.model"
        return info

    def finish(self, model: nn.Module, run: Run) -> dict[str, Any]:
        """Export the whole model (MAWS CLIP layout) + tokenizer so ``zeroshot model=RUN_DIR`` works."""
        info = self.tokenizer_info(run.dir)
        run.write_json("tokenizer.json", info)
        path = save_clip(model, run.path("clip.safetensors"), info, self.cfg.image_size, self.vision_model)
        # The locked tower as a plain encoder too: probe/lowshot/knn read encoder= from any run dir.
        metadata = encoder_metadata(self.vision_model, self.cfg.image_size, stage="lit",
                                    depth=len(model.vision_encoder.blocks))
        encoder = run.save_weights("encoder.safetensors", model.vision_encoder.state_dict(), metadata)
        return {"clip_model": str(path), "encoder": str(encoder),
                "vision_model": self.vision_model, "text_model": self.cfg.text_model,
                "image_tower": self.image_tower, "features_cached": self.cfg.use_cache,
                "cache_skipped": self.frozen.skipped if self.frozen is not None else {}}

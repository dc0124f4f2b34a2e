"""LiT: train a text tower against a locked image tower (the loop is ``prepretrain.train.engine``).

What the stage builds: a :class:`~prepretrain.models.clip.CLIPModel` whose image tower comes
from ``encoder=`` (an MAE/WSP run directory, an encoder file, a MAWS or LiT checkpoint) and is
frozen; a text tower (``text_micro`` for CPU work, ``xlmr_base``/``xlmr_large`` as MAWS);
projections and temperature. Data: image-caption pairs (the synthetic captions by default;
any source whose records carry ``caption``). Loss: the symmetric CLIP loss over the global
batch (``micro_batch_size`` x ranks; accumulation steps are separate contrastive batches).

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
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from ..config import ConfigError, TrainConfig
from ..data.loader import RecordDataset, eval_loader, open_data
from ..data.pixels import train_pixels
from ..data.records import BadSample, Record
from ..data.transforms import eval_transform
from ..models.checkpoints import encoder_from_any, load_encoder, load_strict, read_state_dict
from ..models.clip import CLIPModel, build_clip, clip_loss, retrieval_accuracy, save_clip
from ..models.clip import _vision_name_from_state as vision_name_from_state
from ..models.text import TEXT_SHAPES, text_forward_flops, text_shape
from ..models.tokenizers import SentencePieceTokenizer, Tokenizer, build_tokenizer
from ..models.vit import VIT_SHAPES, forward_flops, resolve_name, vit_shape
from ..train.distributed import gathered
from ..train.engine import Stage, TooManyBadSamples, TrainData, default_out_dir


def check_tower_names(model: str, text_model: str) -> None:
    """ConfigError naming ``model`` or ``text_model`` when either tower is unknown."""
    try:
        resolve_name(model)
    except ValueError as error:
        raise ConfigError("model", str(error)) from None
    if text_model not in TEXT_SHAPES:
        raise ConfigError("text_model", f"unknown text tower; known: {', '.join(sorted(TEXT_SHAPES))}")


@dataclass
class LiTConfig(TrainConfig):
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
    text_init: str = ""  # start the text tower from a file: MAWS CLIP / LiT (text_encoder.*) or RoBERTa (encoder.*)
    tokenizer: str = "bytes"  # bytes | path to a SentencePiece .model (XLM-R for MAWS towers)
    max_text_tokens: int = 0  # tokens kept per caption before BOS/EOS; 0 = tokenizer default
    embed_dim: int = 0  # joint embedding size; 0 = the text tower's width
    lock_vision_projection: bool = False  # also freeze the image-side projection
    augment: bool = False  # random-resized crops + flips of the images (disables the cache)
    min_crop_scale: float = 0.5
    cache_features: str = "auto"  # auto (= when augment is off) | yes | no
    zeroshot_task: str = "coarse"  # label task scored at evaluation
    zeroshot_classes: str = ""  # class names file for non-synthetic data
    zeroshot_templates: str = ""  # templates file; empty = the shipped ImageNet-style set
    eval_images: int = 0  # validation images for zero-shot; 0 = the whole split
    # CPU-demo schedule, chosen with a shape-aware stand-in tower (tests/test_lit.py); paper scale:
    # configs/lit_*.yaml
    batch_size: int = 256
    epochs: float = 8.0
    blr: float = 2e-3
    warmup_epochs: float = 1.0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.98)

    def validate(self) -> None:
        super().validate()
        check_tower_names(self.model, self.text_model)
        for key in ("vision_depth", "text_depth", "text_width", "text_heads", "max_text_tokens", "embed_dim",
                    "eval_images"):
            if getattr(self, key) < 0:
                raise ConfigError(key, f"must be >= 0, got {getattr(self, key)}")
        if not 0 <= self.text_dropout < 1:
            raise ConfigError("text_dropout", f"must be in [0, 1), got {self.text_dropout}")
        if not 0 < self.min_crop_scale <= 1:
            raise ConfigError("min_crop_scale", f"must be in (0, 1], got {self.min_crop_scale}")
        if self.cache_features.lower() not in ("auto", *_YES, *_NO):
            raise ConfigError("cache_features", f"must be auto, yes or no; got '{self.cache_features}'")
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
        if self.text_init and not Path(self.text_init).is_file():
            raise ConfigError("text_init", f"file not found: {self.text_init}")
        if self.encoder and not Path(self.encoder).exists():
            raise ConfigError("encoder", f"not found: {self.encoder}")
        for key in ("zeroshot_classes", "zeroshot_templates"):
            if getattr(self, key) and not Path(getattr(self, key)).is_file():
                raise ConfigError(key, f"file not found: {getattr(self, key)}")
        if self.encoder:
            return
        patch = vit_shape(self.model).patch_size
        if self.image_size % patch:
            raise ConfigError("image_size", f"{self.image_size} is not a multiple of patch size {patch}")

    @property
    def use_cache(self) -> bool:
        choice = self.cache_features.lower()
        return choice in _YES or (choice == "auto" and not self.augment)


_YES = ("yes", "true", "on", "1")  # YAML turns a bare `no` into false: accept both spellings
_NO = ("no", "false", "off", "0")


def resolve_encoder_file(spec: str | Path) -> Path:
    """A file as given, or the exported encoder of a run directory (MAE, WSP or LiT)."""
    path = Path(spec)
    if path.is_file():
        return path
    results = path / "results.json"
    if results.is_file():
        exported = json.loads(results.read_text())
        for key in ("encoder", "clip_model"):
            if exported.get(key) and Path(exported[key]).is_file():
                return Path(exported[key])
    for name in ("encoder.safetensors", "clip.safetensors"):
        if (path / name).is_file():
            return path / name
    raise FileNotFoundError(f"{path}: no encoder.safetensors or clip.safetensors: is it a finished run directory?")


def text_tower_state(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The text tower of a MAWS CLIP / LiT state dict (``text_encoder.*``), or a bare RoBERTa one."""
    if any(k.startswith("text_encoder.") for k in state):
        return {k[len("text_encoder.") :]: v for k, v in state.items() if k.startswith("text_encoder.")}
    if any(k.startswith("transformer.token_embedding") for k in state):  # RobertaEncoder without the wrapper
        return {f"encoder.{k}": v for k, v in state.items()}
    return state


def caption_pairs(transform, tokenizer: Tokenizer):
    """Record -> {image, tokens}; a record without a caption is a counted skip."""

    def apply(record: Record) -> dict[str, Any]:
        if not record.caption.strip():
            raise BadSample(record.key, "no_caption")
        return {"image": transform(record.image), "tokens": tokenizer(record.caption)[0]}

    return apply


class CachedPairs(Dataset):
    """Image-tower features and token ids held in memory; items are (index, aug seed) pairs."""

    def __init__(self, features: torch.Tensor, tokens: torch.Tensor):
        if len(features) != len(tokens):
            raise ValueError(f"{len(features)} feature rows but {len(tokens)} token rows")
        self.features = features
        self.tokens = tokens

    def __len__(self) -> int:
        return len(self.features)

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, torch.Tensor]:
        index = item[0] if isinstance(item, tuple) else item
        return {"image_features": self.features[index], "tokens": self.tokens[index]}


class LiTStage(Stage):
    name = "lit"
    cfg: LiTConfig

    def __init__(self, cfg: LiTConfig):
        super().__init__(cfg)
        self.tokenizer = build_tokenizer(cfg.tokenizer, cfg.max_text_tokens)
        self.vision_model = cfg.model
        self.image_tower = "random init"
        self.vision_depth = cfg.vision_depth
        self.cache_skipped: dict[str, int] = {}
        self._model: CLIPModel | None = None
        self._val_features: tuple[torch.Tensor, torch.Tensor] | None = None
        self._classifier_inputs: tuple[list[list[str]], list[str]] | None = None

    # ------------------------------------------------------------------ model
    def build_model(self) -> CLIPModel:
        cfg = self.cfg
        vision_state = None
        vision_depth = cfg.vision_depth
        if cfg.encoder:
            path = resolve_encoder_file(cfg.encoder)
            vision_state = encoder_from_any(read_state_dict(path))
            self.vision_model, depth, _ = vision_name_from_state(vision_state)
            named = _safetensors_metadata(path).get("model") or _safetensors_metadata(path).get("vision_model")
            if named:
                self.vision_model = resolve_name(named)
            vision_depth = depth if depth != VIT_SHAPES[self.vision_model].depth else 0
            self.image_tower = str(path)
        text_overrides = {"vocab_size": self.tokenizer.vocab_size, "depth": cfg.text_depth,
                          "width": cfg.text_width, "num_heads": cfg.text_heads}
        model = build_clip(self.vision_model, cfg.text_model, embed_dim=cfg.embed_dim, image_size=cfg.image_size,
                           vision_depth=vision_depth, text_overrides=text_overrides, text_dropout=cfg.text_dropout,
                           lock_vision=True, lock_vision_projection=cfg.lock_vision_projection)
        if cfg.text_init:
            load_strict(model.text_encoder, text_tower_state(read_state_dict(cfg.text_init)))
            self._log(f"text tower initialised from {cfg.text_init}")
        if vision_state is not None:
            load_encoder(model.vision_encoder, vision_state)
            self._log(f"image tower {self.vision_model} (depth {len(model.vision_encoder.blocks)}) "
                      f"from {self.image_tower}, locked")
        else:
            self._log(f"no encoder given: the image tower ({self.vision_model}) is RANDOMLY INITIALISED and locked; "
                      "pass encoder=RUN_DIR_OR_FILE (e.g. a WSP run) for meaningful zero-shot numbers")
        self.vision_depth = len(model.vision_encoder.blocks)
        self._model = model
        return model

    def _log(self, message: str) -> None:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
            print(f"[lit] {message}", flush=True)

    # ------------------------------------------------------------------ data
    def train_data(self) -> TrainData:
        cfg = self.cfg
        if cfg.augment:
            pixels = train_pixels(cfg.decode, cfg.data, cfg.image_size, cfg.min_crop_scale)
            source = open_data(cfg.data, split="train", image_size=cfg.image_size, num_images=cfg.num_images,
                               pixels=pixels.pixels)
            dataset = RecordDataset(source, caption_pairs(pixels.sample, self.tokenizer), batch_transform=pixels.batch)
            return TrainData(dataset, len(source), device_transform=pixels.device)
        source = open_data(cfg.data, split="train", image_size=cfg.image_size, num_images=cfg.num_images)
        dataset = RecordDataset(source, caption_pairs(eval_transform(cfg.image_size, crop_fraction=1.0),
                                                      self.tokenizer))
        if not cfg.use_cache:
            return TrainData(dataset, len(source))
        features, tokens = self._cached_features(dataset)
        return TrainData(CachedPairs(features, tokens), len(features))

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

    def _cached_features(self, dataset: RecordDataset) -> tuple[torch.Tensor, torch.Tensor]:
        """Image-tower features of every training image, computed once (or read back on resume)."""
        from safetensors import safe_open
        from safetensors.torch import save_file

        cfg = self.cfg
        assert self._model is not None, "build_model runs before train_data"
        run_dir = default_out_dir(cfg, self.name)
        cache_file = run_dir / "feature_cache.safetensors"
        key = self._cache_key()
        if cache_file.is_file():
            with safe_open(str(cache_file), framework="pt") as handle:
                meta = handle.metadata() or {}
                if meta.get("key") == key:
                    self.cache_skipped = json.loads(meta.get("skipped", "{}"))
                    self._log(f"image features read from {cache_file}")
                    return handle.get_tensor("features"), handle.get_tensor("tokens")
        model = self._model
        device = next(model.parameters()).device
        start = time.perf_counter()
        features, tokens, seen = [], [], 0
        skipped: dict[str, int] = {}
        for batch in eval_loader(dataset, batch_size=256, num_workers=cfg.num_workers):
            seen += batch["_seen"]
            for reason, _ in batch["_skipped"]:
                skipped[reason] = skipped.get(reason, 0) + 1
            if "image" not in batch:
                continue
            with torch.no_grad(), gathered(model):
                features.append(model.image_features(batch["image"].to(device)).float().cpu())
            tokens.append(batch["tokens"])
        bad = sum(skipped.values())
        if not features:
            raise TooManyBadSamples(f"no usable image-caption pairs in {cfg.data} (skipped: {skipped})")
        if seen and bad / seen > cfg.max_bad_fraction:
            raise TooManyBadSamples(f"{bad} of {seen} samples unusable ({skipped}) > max_bad_fraction "
                                    f"{cfg.max_bad_fraction:.1%}")
        self.cache_skipped = skipped
        all_features, all_tokens = torch.cat(features), torch.cat(tokens)
        self._log(f"cached image features of {len(all_features)} images in {time.perf_counter() - start:.1f}s"
                  + (f" (skipped {skipped})" if skipped else ""))
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            tmp = cache_file.with_suffix(".tmp")
            save_file({"features": all_features.contiguous(), "tokens": all_tokens.contiguous()}, str(tmp),
                      metadata={"key": key, "skipped": json.dumps(skipped)})
            tmp.replace(cache_file)
        return all_features, all_tokens

    # ------------------------------------------------------------------ loss
    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        if "image_features" in batch:
            image_emb, text_emb, scale = model(batch["tokens"], image_features=batch["image_features"])
        else:
            image_emb, text_emb, scale = model(batch["tokens"], images=batch["image"])
        loss = clip_loss(image_emb, text_emb, scale)
        return loss, {"temperature": float(scale.detach()),
                      "batch_retrieval": retrieval_accuracy(image_emb.detach(), text_emb.detach())}

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
        from ..evaluate.zeroshot import default_templates, read_class_names, read_templates, source_classes

        if self._classifier_inputs is None:
            cfg = self.cfg
            templates = read_templates(cfg.zeroshot_templates) if cfg.zeroshot_templates else default_templates()
            if cfg.zeroshot_classes:
                classes = read_class_names(cfg.zeroshot_classes, cfg.zeroshot_task)
            else:
                try:
                    source = open_data(cfg.data, split="val", image_size=cfg.image_size, num_images=cfg.num_images)
                    classes = source_classes(source, cfg.zeroshot_task)
                except (FileNotFoundError, KeyError, ValueError):
                    return None
            self._classifier_inputs = (classes, templates)
        return self._classifier_inputs

    def validation_features(self, model: CLIPModel, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(locked-tower features, labels) of the validation images, computed once for all evaluations."""
        from ..evaluate.zeroshot import labelled_images

        if self._val_features is None:
            cfg = self.cfg
            try:
                source = open_data(cfg.data, split="val", image_size=cfg.image_size, num_images=cfg.num_images)
            except (FileNotFoundError, KeyError, ValueError):
                return None
            dataset = RecordDataset(source, labelled_images(eval_transform(cfg.image_size, crop_fraction=1.0),
                                                             cfg.zeroshot_task))
            features, labels = [], []
            for batch in eval_loader(dataset, batch_size=256, num_workers=cfg.num_workers):
                if "image" not in batch:
                    continue
                with torch.no_grad(), gathered(model):
                    features.append(model.image_features(batch["image"].to(device)).float())
                labels.append(batch["label"].to(device))
                if cfg.eval_images and sum(len(x) for x in labels) >= cfg.eval_images:
                    break
            if not features:
                return None
            limit = cfg.eval_images or None
            self._val_features = (torch.cat(features)[:limit], torch.cat(labels)[:limit])
        return self._val_features

    def evaluate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        """Zero-shot top-1/top-5 (percent) on the validation split."""
        from ..evaluate.zeroshot import accuracy_counts, build_classifier

        inputs = self._zeroshot_inputs()
        val = self.validation_features(model, device) if inputs else None
        if inputs is None or val is None:
            return {}
        classes, templates = inputs
        features, labels = val
        with gathered(model):
            classifier = build_classifier(model, self.tokenizer, classes, templates, device)
            with torch.no_grad():
                logits = model.project_images(features).float() @ classifier.t()
        counts = accuracy_counts(logits, labels)
        task = self.cfg.zeroshot_task
        return {f"zeroshot_{task}_top1": 100.0 * counts[1] / len(labels),
                f"zeroshot_{task}_top5": 100.0 * counts[5] / len(labels)}

    # ------------------------------------------------------------------ export
    def tokenizer_info(self, run_dir: Path) -> dict[str, Any]:
        """Tokenizer description with a SentencePiece model copied into the run directory."""
        info = self.tokenizer.describe()
        if isinstance(self.tokenizer, SentencePieceTokenizer):
            self.tokenizer.copy_model_to(run_dir, "tokenizer.model")
            info["model_file"] = "tokenizer.model"
        return info

    def finish(self, model: nn.Module, run_dir: Path, device: torch.device) -> dict[str, Any]:
        """Export the whole model (MAWS CLIP layout) + tokenizer so ``zeroshot model=RUN_DIR`` works."""
        from safetensors.torch import save_file

        from .mae import encoder_metadata

        info = self.tokenizer_info(run_dir)
        (run_dir / "tokenizer.json").write_text(json.dumps(info, indent=2))
        path = save_clip(model, run_dir / "clip.safetensors", info, self.cfg.image_size, self.vision_model)
        # The locked tower as a plain encoder too: probe/lowshot/knn read encoder= from any run dir.
        encoder = {k: v.detach().cpu().contiguous() for k, v in model.vision_encoder.state_dict().items()}
        metadata = {**encoder_metadata(self.cfg), "model": self.vision_model, "stage": "lit",
                    "depth": str(len(model.vision_encoder.blocks))}
        save_file(encoder, str(run_dir / "encoder.safetensors"), metadata=metadata)
        return {"clip_model": str(path), "encoder": str(run_dir / "encoder.safetensors"),
                "vision_model": self.vision_model, "text_model": self.cfg.text_model,
                "image_tower": self.image_tower, "features_cached": self.cfg.use_cache,
                "cache_skipped": self.cache_skipped}


def _safetensors_metadata(path: Path) -> dict[str, str]:
    if path.suffix != ".safetensors":
        return {}
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})


# ---------------------------------------------------------------------- benchmark


@dataclass
class LiTBenchConfig:
    """``prepretrain bench lit``: LiT training steps per second, cached features vs images."""

    model: str = "vit_micro4"
    vision_depth: int = 0
    image_size: int = 32
    text_model: str = "text_micro"
    tokenizer: str = "bytes"
    max_text_tokens: int = 0
    batch_size: int = 128
    steps: int = 10
    warmup: int = 2
    device: str = "auto"
    precision: str = "auto"
    threads: int = 0  # CPU threads; 0 = torch default

    def validate(self) -> None:
        for key in ("batch_size", "steps"):
            if getattr(self, key) <= 0:
                raise ConfigError(key, f"must be > 0, got {getattr(self, key)}")
        check_tower_names(self.model, self.text_model)


def run_lit_benchmark(cfg: LiTBenchConfig) -> dict[str, Any]:
    """Time full optimizer steps both ways on random inputs already on the device.

    Uncached: the locked tower encodes the images every step; cached: the step starts from
    stored features. Both paths do identical text-tower work, so the ratio is what caching
    saves in the model step (decoding and augmenting images, also skipped, are not counted).
    """
    from ..train.distributed import pick_device
    from ..train.engine import pick_precision
    from ..train.optim import build_optimizer, param_groups

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    precision = pick_precision(cfg.precision, device)
    tokenizer = build_tokenizer(cfg.tokenizer, cfg.max_text_tokens)
    torch.manual_seed(0)
    # XLM-R towers keep their 250002-row embedding (its optimizer step is part of the cost).
    vocab_size = max(tokenizer.vocab_size, TEXT_SHAPES[cfg.text_model].vocab_size)
    model = build_clip(cfg.model, cfg.text_model, image_size=cfg.image_size, vision_depth=cfg.vision_depth,
                       text_overrides={"vocab_size": vocab_size}, device=device).train()
    optimizer = build_optimizer(param_groups(model, 0.05), 1e-4, (0.9, 0.98), device)
    images = torch.randn(cfg.batch_size, 3, cfg.image_size, cfg.image_size, device=device)
    tokens = torch.randint(4, min(tokenizer.vocab_size, 260), (cfg.batch_size, tokenizer.context_length),
                           device=device)
    with torch.no_grad(), precision.autocast(device):
        features = model.image_features(images).float()

    def step(cached: bool) -> None:
        with precision.autocast(device):
            if cached:
                out = model(tokens, image_features=features)
            else:
                out = model(tokens, images=images)
            loss = clip_loss(*out, gather=False)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def timed(cached: bool) -> float:
        for _ in range(cfg.warmup):
            step(cached)
        _sync(device)
        start = time.perf_counter()
        for _ in range(cfg.steps):
            step(cached)
        _sync(device)
        return cfg.steps / (time.perf_counter() - start)

    uncached = timed(False)
    cached = timed(True)
    shape = model.text_encoder.shape
    vision = vit_shape(cfg.model, img_size=cfg.image_size, depth=cfg.vision_depth or None)
    text_train = 3 * text_forward_flops(shape, tokenizer.context_length)
    return {
        "benchmark": "lit_feature_cache",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()}",
        "precision": cfg.precision if cfg.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32"),
        "image_tower": cfg.model, "image_size": cfg.image_size, "text_tower": cfg.text_model,
        "text_tokens": tokenizer.context_length, "batch_size": cfg.batch_size,
        "uncached_steps_per_s": round(uncached, 3), "cached_steps_per_s": round(cached, 3),
        "speedup": round(cached / uncached, 2),
        "flops_ratio": round((text_train + forward_flops(vision)) / text_train, 2),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def print_lit_benchmark(result: dict[str, Any]) -> None:
    """Side by side: steps/s with images through the locked tower, and from cached features."""
    print(f"{'path':<10} {'steps/s':>9} {'samples/s':>10}")
    for name in ("uncached", "cached"):
        rate = result[f"{name}_steps_per_s"]
        print(f"{name:<10} {rate:>9.2f} {rate * result['batch_size']:>10.1f}")
    print(f"speedup {result['speedup']:.2f}x (FLOPs ratio {result['flops_ratio']:.2f}x) on {result['device']}, "
          f"{result['image_tower']}@{result['image_size']} + {result['text_tower']} x {result['text_tokens']} tokens, "
          f"batch {result['batch_size']}")
    print(json.dumps(result))

"""WSP, weakly supervised hashtag pretraining: what the stage builds (the loop is the engine's).

The second stage of MAWS (MAWS, Singh et al. 2023, arXiv 2303.13496; its WSP is SWAG's, arXiv
2201.08371): a ViT, initialised from the MAE encoder (``init=``), learns to predict each image's
hashtags out of a vocabulary built from the training data, with tail tags resampled. Everything
about vocabularies, targets and resampling lives in :mod:`prepretrain.data.labels.hashtags`; the
head, losses and tag-prediction metrics in :mod:`prepretrain.models.heads`. Without hashtags,
``labels_from=`` derives each image's labels from Flickr tags, caption words or WordNet synsets
(:mod:`prepretrain.data.labels.weaklabels`), and everything downstream treats them as hashtags.

Data: a manifest, folder or the synthetic set is resampled by the loader's weighted draw
(per-image weights and tags held in memory, about 8 bytes per image plus 4 per tag: fine to
~10^8 images; beyond 2^24 the loader draws one block at a time). WebDataset shards, which have no
random access, are resampled in the stream instead: every sample appears a fixed number of
times per epoch (``RepeatFactors``: floor or ceil of its expected count, from the seed and its
key), expanded by the shard readers before their block shuffle (``ShardSource.repeats``), with
the same per-tag distribution in expectation, no size limit, and exact resume. The vocabulary,
weights, prior and copies per shard come from one annotation pass per dataset shared by the ranks
and cached beside the data (:mod:`prepretrain.data.labels.cache`; no image decoded).
A ``val`` split of shards (``data=DIR`` with ``train/`` and ``val/``) is evaluated on its first
``eval_images`` samples in shard order (whole evaluation batches: up to a batch more).

Run directory additions: ``vocab.json`` (written before the first step and reused on resume,
so the head's rows always have names), ``encoder.safetensors`` (timm keys, no head: every
consumer of MAE encoders takes a WSP run the same way), ``head.safetensors``
(``head.weight``/``head.bias``) and results with held-out precision@1/@5 and mAP next to the
most-frequent-tag baseline.

``init=`` accepts an MAE run directory (its ``encoder.safetensors``), a WSP run directory,
an MAE "full" checkpoint (decoder dropped; the fixed sin-cos ``pos_embed`` becomes the
learnable timm one), or a MAWS/MAE/timm encoder file; ``init=mae-init`` starts from the MAE's initialisation without
MAE training (the pipeline's control arm). A classifier head in the file is never
reused, except the head of a WSP run directory whose ``vocab.json`` is the same tag list as
this run's, which continues WSP where it stopped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..config import ConfigError, TextSourceConfig
from ..data.images.pixels import train_pixels
from ..data.images.transforms import decode_hint, eval_transform
from ..data.labels.cache import prepare_shards
from ..data.labels.hashtags import (
    EncodedTags,
    HashtagVocab,
    RepeatFactors,
    build_vocab,
    encode_images,
    pad_tags,
    sampling_weights,
    source_hashtags,
    tag_image_counts,
    target_prior,
)
from ..data.labels.vocab import tag_aliases
from ..data.labels.weaklabels import WeakLabeler, parse_labels_from
from ..data.loader import RecordDataset, eval_loader
from ..data.readers.open import open_stage_data
from ..data.records import BadSample, Record
from ..models.checkpoints import (
    CheckpointMismatch,
    load_encoder_weights,
    load_strict,
    read_state_dict,
)
from ..models.heads import (
    LOSSES,
    init_head,
    load_head,
    multi_hot,
    multilabel_loss,
    prior_bias,
    save_head,
    split_head,
    tag_prediction_metrics,
)
from ..models.layouts import encoder_from_any
from ..models.resolve import (
    ENCODER_FILE,
    HEAD_FILE,
    MAE_INIT,
    VOCAB_FILE,
    check_weights,
    encoder_metadata,
    mae_init_state,
    resolve_weights,
)
from ..models.vit import check_model_and_size, create_vit, forward_flops, vit_shape
from ..train.engine import Stage, TrainData
from ..train.run import Run

LABEL_SCRATCH = "label-scratch"  # label_cache=false: the labels of one preparation, removed after it

@dataclass
class WSPConfig(TextSourceConfig):
    """WSP recipe. Defaults are the CPU demo on the synthetic hashtags; configs/wsp_*.yaml hold
    the paper-scale recipes."""

    stage_name = "wsp"
    model: str = "vit_micro4"
    depth: int = 0  # blocks; 0 = the model's own depth (a smaller value makes tiny test models)
    drop_path: float = 0.0
    init: str = ""  # MAE/WSP run dir, MAE full checkpoint, MAWS/timm encoder file, mae-init; empty = from scratch
    # labels and vocabulary
    labels_from: str = "hashtags"  # hashtags | tags (Flickr) | caption (words) | synsets (WordNet), or a+b
    synset_table: str = ""  # labels_from=synsets: wnid<TAB>lemma, ... file; empty = timm's ImageNet-21k lemmas
    vocab: str = ""  # fixed vocabulary file (.json/.txt); empty = built from the training data
    vocab_size: int = 28_000  # top-K most frequent tags (the paper: ~28K)
    vocab_min_count: int = 2  # images a tag must appear in to enter the vocabulary
    tag_synonyms: str = "auto"  # auto (the source's own table, if any) | none | PATH (.json/.txt synonym groups)
    max_tags: int = 64  # known tags kept per image (the rarest when there are more)
    label_cache: bool = True  # shards: keep the labels beside the data for every rank and later run; false: not kept
    # targets, loss, resampling
    loss: str = "softmax"  # softmax (normalised multi-hot, the paper's) | sigmoid (per-tag BCE)
    resample_power: float = 0.5  # image weight from count ** -power; 0.5 = inverse square root, 0 = off
    resample_reduce: str = "max"  # max | mean over the image's tags
    epoch_size: int = 0  # samples per epoch; 0 = the number of training images
    head_bias: str = "prior"  # prior (log-prior of the resampled targets) | zero
    head_init_std: float = 0.0  # 0 = zero-initialised head weights
    min_crop_scale: float = 0.35
    # evaluation
    eval_images: int = 2000  # held-out images (the "val" split) for precision@k and mAP; 0 = all
    eval_batch_size: int = 256
    # CPU-demo schedule: lr 1e-3 at batch 64, ~310 steps (paper-scale settings in configs/wsp_*.yaml)
    batch_size: int = 64
    blr: float = 4e-3
    epochs: float = 5.0
    warmup_epochs: float = 0.25
    weight_decay: float = 0.05

    # Every numeric key this class defines, with its interval (config.check_bounds).
    bounds = {
        "depth": ">= 0", "drop_path": "[0, 1)", "vocab_size": "> 0", "vocab_min_count": ">= 1", "max_tags": "> 0",
        "resample_power": ">= 0", "epoch_size": ">= 0", "head_init_std": ">= 0", "min_crop_scale": "(0, 1]",
        "eval_images": ">= 0", "eval_batch_size": "> 0",
    }
    choices = {"loss": LOSSES, "resample_reduce": ("max", "mean"), "head_bias": ("prior", "zero")}

    def validate(self) -> None:
        super().validate()
        check_model_and_size(self.model, self.image_size)
        if self.tag_synonyms not in ("auto", "none") and not Path(self.tag_synonyms).is_file():
            raise ConfigError("tag_synonyms", f"must be auto, none or a file; not found: {self.tag_synonyms}")
        if self.vocab and not Path(self.vocab).is_file():
            raise ConfigError("vocab", f"vocabulary file not found: {self.vocab}")
        try:
            parse_labels_from(self.labels_from)
        except ValueError as error:
            raise ConfigError("labels_from", str(error)) from None
        if self.synset_table and not Path(self.synset_table).is_file():
            raise ConfigError("synset_table", f"synset table not found: {self.synset_table}")
        check_weights("init", self.init)


class HashtagTransform:
    """Record -> ``{"image", "tags"}`` (padded vocabulary indices of the record's ``labels``);
    a class, not a closure, so DataLoader workers can pickle it under any start method."""

    def __init__(self, vocab: HashtagVocab, image_transform: Any, max_tags: int,
                 labels: WeakLabeler | None = None):
        self.vocab = vocab
        self.image_transform = image_transform
        self.max_tags = max_tags
        self.labels = labels or WeakLabeler()

    def __call__(self, record: Record) -> dict[str, Any]:
        known = record.label_ids  # set by a shard reader that labelled the sample for its copies
        if known is None:
            known, _ = self.vocab.encode(self.labels(record))
        if not known:  # never drawn in training (weight 0); counted, not fed, in evaluation
            raise BadSample(record.key, "no_known_tag")
        return {"image": self.image_transform(record.image), "tags": pad_tags(known, self.max_tags)}


@dataclass
class HashtagData:
    """What the stage derives from the training split before building anything.

    Map-style sources (manifests, folders, the synthetic set) keep every image's encoded tags
    and a draw weight per image; shards keep per-tag arrays only and resample in the stream
    (``repeats``, set on the source)."""

    source: Any
    vocab: HashtagVocab
    tag_counts: np.ndarray  # training images per tag (the most-frequent-tag baseline ranks by it)
    prior: torch.Tensor  # best constant prediction under resampling (head bias init)
    stats: dict[str, int]  # images, images_without_known_tag, known/unknown_tag_occurrences, ..._truncated
    encoded: EncodedTags | None = None  # map-style sources: every image's known tags
    weights: torch.Tensor | None = None  # map-style sources: per image draw weight, float64
    repeats: RepeatFactors | None = None  # shards: copies of each sample per epoch
    positions: int = 0  # shards: samples of one epoch after resampling (the sum of the copies)


class FirstRecords:
    """The first ``count`` records of a map source (a fixed, reproducible evaluation subset)."""

    def __init__(self, source: Any, count: int):
        self.source = source
        self.count = min(count, len(source))

    def __len__(self) -> int:
        return self.count

    def get(self, index: int) -> Record:
        if not 0 <= index < self.count:
            raise IndexError(f"index {index} out of range for {self.count} records")
        return self.source.get(index)


class WSPStage(Stage):
    name = "wsp"
    cfg: WSPConfig

    def __init__(self, cfg: WSPConfig):
        super().__init__(cfg)
        self._data: HashtagData | None = None
        self.labels = WeakLabeler(cfg.labels_from, cfg.synset_table)
        self.pixels = train_pixels(cfg.decode, cfg.data, cfg.image_size, cfg.min_crop_scale)

    # ------------------------------------------------------------------ data preparation
    def _shape_overrides(self) -> dict[str, int]:
        overrides = {"img_size": self.cfg.image_size}
        if self.cfg.depth:
            overrides["depth"] = self.cfg.depth
        return overrides

    def _aliases(self, source: Any) -> dict[str, str]:
        """``tag_synonyms``: the source's own table (``auto``; a hashtag table, so captions and
        synsets do without it), none, or a file."""
        return tag_aliases(source, self.cfg.tag_synonyms, self.labels)

    def _given_vocab(self, run: Run, aliases: dict[str, str]) -> HashtagVocab | None:
        """Resume -> the run's own vocab.json; ``vocab=`` -> that file (with its own synonyms,
        else those of ``tag_synonyms`` that fit it); otherwise ``None`` (built from the data)."""
        cfg = self.cfg
        saved = run.path(VOCAB_FILE)
        if run.resuming and saved.is_file():
            return HashtagVocab.load(saved)
        if not cfg.vocab:
            return None
        vocab = HashtagVocab.load(cfg.vocab)
        built_from = vocab.info.get("labels_from")
        if built_from and built_from != self.labels.labels_from:
            raise ConfigError("labels_from", f"is {self.labels.labels_from}, but vocab={cfg.vocab} was built "
                                             f"from {built_from} labels")
        if not vocab.aliases and aliases:
            kept = {alias: tag for alias, tag in aliases.items() if tag in vocab.index and alias not in vocab.index}
            vocab = HashtagVocab(vocab.tags, vocab.counts, vocab.info, kept)
        return vocab

    def _choose_vocab(self, source: Any, run: Run) -> HashtagVocab:
        """A map-style source's vocabulary: the given one (:meth:`_given_vocab`), or one built from
        the training labels (shards build theirs from the label cache: :meth:`_prepare_stream`)."""
        cfg = self.cfg
        aliases = self._aliases(source)
        given = self._given_vocab(run, aliases)
        if given is not None:
            return given
        return build_vocab(source_hashtags(source, self.labels), min_count=cfg.vocab_min_count,
                           max_size=cfg.vocab_size, aliases=aliases)

    def prepare(self, run: Run) -> HashtagData:
        """Open the training split, fix the vocabulary and derive the resampling (done once;
        the same on every rank because it is deterministic).

        Map-style sources: every image's tags are encoded and weighted for the loader's
        weighted draw. Shards (no random access): each sample's copies per epoch come from
        :class:`~prepretrain.data.labels.hashtags.RepeatFactors`, set on the source so its readers
        expand the stream (see ``ShardSource.repeats``); see :meth:`_prepare_stream`."""
        if self._data is not None:
            return self._data
        cfg = self.cfg
        source = open_stage_data(cfg, "train", pixels=self.pixels.pixels,
                                 min_size_hint=decode_hint(cfg.image_size, cfg.min_crop_scale))
        if not hasattr(source, "get"):
            self._data = self._prepare_stream(source, run)
            return self._data
        vocab = self._choose_vocab(source, run)
        encoded = encode_images(vocab, source_hashtags(source, self.labels))
        if encoded.images_without_known_tag == len(encoded):
            raise ValueError(
                f"none of the {len(encoded)} training images has a tag in the {len(vocab)}-tag vocabulary"
            )
        tag_counts = tag_image_counts(encoded, len(vocab))
        weights = sampling_weights(encoded, tag_counts, power=cfg.resample_power, reduce=cfg.resample_reduce)
        prior = target_prior(encoded, weights, len(vocab), cfg.loss)
        stats = {**encoded.stats(), "images_with_tags_truncated": int((encoded.num_tags > cfg.max_tags).sum())}
        vocab.info = {**vocab.info, "data": cfg.data, "labels_from": self.labels.labels_from, **encoded.stats()}
        if run.is_main:
            vocab.save(run.path(VOCAB_FILE))
        self._data = HashtagData(source, vocab, tag_counts, prior, stats, encoded=encoded, weights=weights)
        return self._data

    def _stream_data(self, source: Any, run: Run, factors: RepeatFactors, tag_counts: np.ndarray,
                     prior: torch.Tensor, stats: dict[str, int], positions: int) -> HashtagData:
        """The shards' preparation, checked and recorded (vocab.json with its coverage)."""
        if positions == 0:
            raise ValueError(f"resampling {stats['images']} training images to an epoch of "
                             f"{self.cfg.epoch_size or stats['images']} drew none; raise epoch_size")
        vocab = factors.vocab
        coverage = {k: v for k, v in stats.items() if k != "images_with_tags_truncated"}
        vocab.info = {**vocab.info, "data": self.cfg.data, "labels_from": self.labels.labels_from, **coverage}
        if run.is_main:
            vocab.save(run.path(VOCAB_FILE))
        return HashtagData(source, vocab, tag_counts, prior, stats, repeats=factors, positions=positions)

    def _prepare_stream(self, source: Any, run: Run) -> HashtagData:
        """Shards: resampling as per-sample copies in the stream, from one annotation pass per
        dataset shared by the ranks (:func:`~prepretrain.data.labels.cache.prepare_shards`, through
        the run's collectives; no image is decoded, memory holds per-tag arrays and per-shard counts):
        the vocabulary (built from the cached label counts unless given or resumed), the images per
        tag, the sum of the draw weights, the resampled target prior, the coverage statistics and
        each shard's copies (its readers' sample positions, for resume), giving the samples of one
        resampled epoch (``epoch_size`` in expectation). ``label_cache=false``: the labels go to a
        scratch folder in the run directory, removed afterwards."""
        cfg = self.cfg
        aliases = self._aliases(source)
        given = self._given_vocab(run, aliases)
        prepared = prepare_shards(source, self.labels, aliases, vocab=given, min_count=cfg.vocab_min_count,
                                  max_size=cfg.vocab_size, power=cfg.resample_power, reduce=cfg.resample_reduce,
                                  loss=cfg.loss, epoch_size=cfg.epoch_size, seed=cfg.seed, max_tags=cfg.max_tags,
                                  comm=run.collectives, scratch=None if cfg.label_cache else run.path(LABEL_SCRATCH))
        epoch_size = cfg.epoch_size or prepared.stats["images"]
        factors = RepeatFactors(given if given is not None else prepared.vocab, prepared.tag_counts,
                                power=cfg.resample_power, reduce=cfg.resample_reduce,
                                scale=epoch_size / prepared.weight_sum, seed=cfg.seed, labels=self.labels)
        source.repeats = factors
        source.set_expanded_counts(prepared.positions)
        return self._stream_data(source, run, factors, prepared.tag_counts, prepared.prior, prepared.stats,
                                 sum(prepared.positions))

    # ------------------------------------------------------------------------------ model
    def build_model(self, run: Run) -> nn.Module:
        cfg = self.cfg
        data = self.prepare(run)
        model = create_vit(cfg.model, num_classes=len(data.vocab), drop_path_rate=cfg.drop_path,
                           **self._shape_overrides())
        bias = prior_bias(data.prior, cfg.loss) if cfg.head_bias == "prior" else None
        init_head(model.head, bias=bias, weight_std=cfg.head_init_std)
        if cfg.init:
            self.load_init(model, data.vocab)
        return model

    def load_init(self, model: nn.Module, vocab: HashtagVocab) -> list[str]:
        """Copy the encoder of ``init`` into ``model`` (exactly, pos-embed interpolated only when
        the resolution differs); returns the keys left at their fresh initialisation."""
        cfg = self.cfg
        if cfg.init == MAE_INIT:  # the control arm: MAE's initialisation, no MAE training
            return load_encoder_weights(model, mae_init_state(cfg.model, cfg.seed, **self._shape_overrides()))
        init = resolve_weights(cfg.init)
        state = encoder_from_any(read_state_dict(init.path))
        encoder_state, _ = split_head(state)  # a head trained for other classes is never reused
        encoder_state = {k: v for k, v in encoder_state.items() if not k.startswith("fc_norm.")}
        try:
            left = load_encoder_weights(model, encoder_state)
        except CheckpointMismatch as error:
            origin = f" (it was saved for model={init.model})" if init.model else ""
            depth = f" depth={cfg.depth}" if cfg.depth else ""
            message = f"init={cfg.init}{origin} does not fit model={cfg.model}{depth}: {error}"
            raise CheckpointMismatch(message) from None
        if init.head is not None and init.vocab is not None:
            init_vocab = HashtagVocab.load(init.vocab)
            head = load_head(init.head, num_classes=len(init_vocab))
            if init_vocab == vocab:
                load_strict(model.head, {k[len("head.") :]: v for k, v in head.items()})
                left = [k for k in left if not k.startswith("head.")]
        return left

    # ------------------------------------------------------------------------------- data
    def train_data(self, run: Run) -> TrainData:
        cfg = self.cfg
        data = self.prepare(run)
        transform = HashtagTransform(data.vocab, self.pixels.sample, cfg.max_tags, self.labels)
        dataset = RecordDataset(data.source, transform, batch_transform=self.pixels.batch)
        epoch_size = cfg.epoch_size or data.stats["images"]
        if data.weights is None:  # shards: the stream itself is resampled (ShardSource.repeats)
            return TrainData(dataset, data.positions, epoch_size=epoch_size, device_transform=self.pixels.device)
        return TrainData(dataset, len(data.source), weights=data.weights, epoch_size=epoch_size,
                         device_transform=self.pixels.device)

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        if "image" not in batch:  # every sample of this micro-batch was unreadable: a no-op step
            zero = sum(p.sum() for p in model.parameters()) * 0.0
            return zero, {}
        logits = model(batch["image"])
        return multilabel_loss(logits, batch["tags"], self.cfg.loss), {}

    def flops_per_sample(self) -> float:
        cfg = self.cfg
        shape = vit_shape(cfg.model, **self._shape_overrides())
        num_tags = len(self._data.vocab) if self._data is not None else cfg.vocab_size
        return 3 * (forward_flops(shape, img_size=cfg.image_size) + 2 * shape.embed_dim * num_tags)

    # ------------------------------------------------------------------------- evaluation
    def _val_source(self, train_source: Any) -> Any | None:
        """The held-out split: a map source, or shards other than the training shards (a
        directory of shards without split folders opens as the same shards for every split,
        which must never be evaluated as held-out data)."""
        cfg = self.cfg
        try:
            source = open_stage_data(cfg, "val")
        except (FileNotFoundError, KeyError, ValueError):
            return None
        if hasattr(source, "get"):
            return source if len(source) else None
        urls = getattr(source, "urls", None)
        if hasattr(source, "iter_outcomes") and urls and urls != getattr(train_source, "urls", None):
            return source
        return None

    def evaluate(self, model: nn.Module, run: Run) -> dict[str, float]:
        """Held-out tag prediction: precision@1/@5 and mAP beside the most-frequent-tag baseline;
        images without a known tag are skipped and counted."""
        cfg = self.cfg
        data = self.prepare(run)
        results: dict[str, float] = {
            "train_images_without_known_tag": data.stats["images_without_known_tag"],
            "train_unknown_tag_occurrences": data.stats["unknown_tag_occurrences"],
        }
        source = self._val_source(data.source)
        if source is None:
            return results
        streamed = not hasattr(source, "get")  # shards: the first eval_images samples in shard order
        if not streamed and cfg.eval_images and len(source) > cfg.eval_images:
            source = FirstRecords(source, cfg.eval_images)
        batch_size = min(cfg.eval_batch_size, cfg.eval_images) if streamed and cfg.eval_images else cfg.eval_batch_size
        transform = HashtagTransform(data.vocab, eval_transform(cfg.image_size), cfg.max_tags, self.labels)
        scores, targets = [], []
        skipped: dict[str, int] = {}
        seen = 0
        with torch.no_grad():
            for batch in eval_loader(RecordDataset(source, transform), batch_size=batch_size):
                if streamed and cfg.eval_images and seen >= cfg.eval_images:
                    break
                seen += batch.get("_seen", 0)
                for reason, _ in batch.pop("_skipped", []):
                    skipped[reason] = skipped.get(reason, 0) + 1
                if "image" not in batch:
                    continue
                logits = model(batch["image"].to(run.device)).float()
                # softmax: rank tags across images by log-probability, not by raw logit
                scores.append((logits.log_softmax(-1) if cfg.loss == "softmax" else logits).cpu())
                targets.append(multi_hot(batch["tags"], len(data.vocab)))
        results["val_images_without_known_tag"] = skipped.pop("no_known_tag", 0)
        results["val_images_unreadable"] = sum(skipped.values())
        if not scores:
            return results
        counts = torch.from_numpy(data.tag_counts).double()
        metrics = tag_prediction_metrics(torch.cat(scores), torch.cat(targets), counts, prefix="val_")
        results["val_images"] = sum(len(s) for s in scores)
        return {**results, **metrics}

    # ----------------------------------------------------------------------------- export
    def finish(self, model: nn.Module, run: Run) -> dict[str, Any]:
        """Export the encoder (timm keys, the format every later stage reads), the head and the
        vocabulary that names the head's rows."""
        cfg = self.cfg
        data = self.prepare(run)
        encoder, _ = split_head(model.state_dict())
        metadata = encoder_metadata(cfg.model, cfg.image_size, stage="wsp", depth=len(model.blocks),
                                    num_tags=len(data.vocab), loss=cfg.loss)
        run.save_weights(ENCODER_FILE, encoder, metadata)
        save_head(run.path(HEAD_FILE), model, metadata={"loss": cfg.loss, "model": cfg.model})
        data.vocab.save(run.path(VOCAB_FILE))
        stats = data.stats
        return {
            "encoder": str(run.path(ENCODER_FILE)),
            "head": str(run.path(HEAD_FILE)),
            "vocab": str(run.path(VOCAB_FILE)),
            "model": cfg.model,
            "vocab_size": len(data.vocab),
            "loss_type": cfg.loss,
            "train_images": stats["images"],
            "train_images_without_known_tag": stats["images_without_known_tag"],
            "train_unknown_tag_occurrences": stats["unknown_tag_occurrences"],
            "train_known_tag_occurrences": stats["known_tag_occurrences"],
            "train_images_with_tags_truncated": stats["images_with_tags_truncated"],
            **({"train_samples_per_epoch": data.positions} if data.repeats is not None else {}),
        }


def load_tagger(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, HashtagVocab]:
    """A finished WSP run as (timm ViT with its hashtag head, vocabulary): predict tags with
    ``vocab.tags[i] for i in model(images).topk(5).indices[0]``. A vocab.json that does not
    match the head raises ``prepretrain.data.labels.hashtags.VocabularyMismatch``."""
    weights = resolve_weights(run_dir)
    if weights.head is None or weights.vocab is None or weights.metadata.get("stage") != "wsp":
        raise ValueError(f"{run_dir} is not a finished WSP run (expected {ENCODER_FILE}, {HEAD_FILE}, {VOCAB_FILE})")
    vocab = HashtagVocab.load(weights.vocab)
    head = load_head(weights.head, num_classes=len(vocab))
    encoder_path, metadata = weights.path, weights.metadata
    overrides = {"img_size": int(metadata.get("image_size", 224))}
    if metadata.get("depth"):
        overrides["depth"] = int(metadata["depth"])
    model = create_vit(metadata["model"], num_classes=len(vocab), **overrides)
    load_strict(model, {**read_state_dict(encoder_path), **head})
    return model.to(device).eval(), vocab

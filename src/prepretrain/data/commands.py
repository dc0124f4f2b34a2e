"""The settings of the ``prepretrain data`` actions, as config classes like every other command's.

Each action (``synth``, ``stats``, ``vocab``, ``shards``, ``check``, ``rehearsal``) takes
``key=value`` overrides and ``--config FILE`` as the training commands do, and its old ``--flag
value`` spellings (``--num-images 4000`` is ``num_images=4000``; the positional ``SOURCE`` is
``source=``). The checks live here, declared once per key (:mod:`prepretrain.config`); what each
action runs is in :mod:`prepretrain.cli`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from prepretrain.config import ConfigError
from prepretrain.data.video.encode import CODECS as CLIP_CODECS

IMAGE_FORMATS = ("png", "jpg")


def key(default: Any, help: str) -> Any:
    """A key with the help ``--help`` shows beside its ``--flag`` spelling."""
    return field(default=default, metadata={"help": help})


def _require(cfg: object, *keys: str) -> None:
    for key in keys:
        if not getattr(cfg, key):
            raise ConfigError(key, f"required: {key}=VALUE (or --{key.replace('_', '-')} VALUE)")


@dataclass
class SynthDataConfig:
    """``data synth``: the embedded synthetic dataset (images + JSONL manifests) or, with ``video``,
    motion clips as video files in class folders."""

    out: str = key("", "output folder")
    num_images: int = key(0, "training images (0: 4000) or, with video, videos (0: 1200); val/test sized from it")
    image_size: int = key(0, "pixels (0: 32; 64 with video)")
    seed: int = 0
    format: str = key("", "png | jpg; with video the file types, comma-separated, used in turn: mp4, avi, webm, mkv")
    video: bool = False
    frames: int = key(16, "frames per clip (video)")
    fps: int = key(8, "frame rate written in the files (video)")

    bounds = {"num_images": ">= 0", "image_size": ">= 0", "seed": "any", "frames": "> 0", "fps": "> 0"}

    @property
    def clip_suffixes(self) -> tuple[str, ...]:
        return tuple(f".{name.strip().lstrip('.')}" for name in (self.format or "mp4").split(","))

    def validate(self) -> None:
        _require(self, "out")
        if self.video:
            unknown = [suffix for suffix in self.clip_suffixes if suffix not in CLIP_CODECS]
            if unknown:
                raise ConfigError("format", f"{', '.join(unknown)}: --video writes {', '.join(CLIP_CODECS)}")
        elif (self.format or "png") not in IMAGE_FORMATS:
            raise ConfigError("format", f"images are written as png or jpg; got '{self.format}'")


@dataclass
class StatsDataConfig:
    """``data stats``: statistics of any source (a video dataset's layout, classes and videos per split)."""

    source: str = ""
    split: str = "train"
    video: bool = key(False, "read source as a video dataset (found without it when a folder holds videos only)")
    video_dir: str = key("", "where a video dataset's list files find the videos")
    sample: int = key(200, "images decoded for size statistics")

    bounds = {"sample": ">= 0"}

    def validate(self) -> None:
        _require(self, "source")


@dataclass
class VocabDataConfig:
    """``data vocab``: label counts in one streaming pass, their coverage, and the vocabulary WSP reads."""

    source: str = ""
    out: str = key("", "vocabulary file (.json keeps synonyms; .txt: tag<TAB>count)")
    split: str = "train"
    size: int = key(28_000, "keep the most frequent labels (the paper: ~28K)")
    min_count: int = key(2, "images a label must appear in")
    synonyms: str = key("auto", "auto (the source's own table) | none | a synonym file")
    labels_from: str = key("hashtags", "hashtags | tags | caption | synsets, or several joined by '+' (as WSP's)")
    synset_table: str = key("", "wnid<TAB>lemma, ... file for labels_from=synsets (default: timm's IN-21k lemmas)")
    hashtag_field: str = key("hashtags", "field of shard .json / manifest rows with the tags")
    caption_field: str = key("caption", "field with the caption (shards without it: the .txt member)")
    metadata: str = key("", "a table joined to the images by key, as WSP's metadata=")
    metadata_key: str = key("", "the image field matched to the table's key")
    max_distinct: int = key(5_000_000, "distinct labels held in memory; past it the rarest half is pruned")

    bounds = {"size": ">= 1", "min_count": ">= 1", "max_distinct": "> 0"}

    def validate(self) -> None:
        _require(self, "source", "out")


@dataclass
class ShardsDataConfig:
    """``data shards``: a folder or manifest converted to WebDataset tar shards."""

    source: str = ""
    out: str = ""
    split: str = "train"
    samples_per_shard: int = 1000
    prefix: str = "shard"

    bounds = {"samples_per_shard": ">= 1"}

    def validate(self) -> None:
        _require(self, "source", "out")


@dataclass
class CheckDataConfig:
    """``data check``: every row of a manifest (or annotation of a source) validated without decoding."""

    source: str = ""
    split: str = "train"
    max_errors: int = key(20, "bad rows listed")

    bounds = {"max_errors": ">= 0"}

    def validate(self) -> None:
        _require(self, "source")


@dataclass
class RehearsalDataConfig:
    """``data rehearsal``: a small copy of the paper-scale data layout and a pipeline config that runs
    a paper pipeline config on it with only model size, budgets and hardware overridden."""

    out: str = key("", "output folder (data, pipeline.yaml, and runs/ when run)")
    pipeline: str = key("configs/pipeline_vit_b16.yaml", "the paper pipeline config")
    num_images: int = key(3000, "pretraining images")
    steps: int = key(20, "optimizer steps of every training stage")
    seed: int = 0

    bounds = {"num_images": "> 0", "steps": "> 0", "seed": "any"}

    def validate(self) -> None:
        _require(self, "out")


DATA_ACTIONS: dict[str, type] = {
    "synth": SynthDataConfig, "stats": StatsDataConfig, "vocab": VocabDataConfig, "shards": ShardsDataConfig,
    "check": CheckDataConfig, "rehearsal": RehearsalDataConfig,
}

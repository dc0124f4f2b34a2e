"""Typed configs: dataclass defaults, then a YAML file, then ``key=value`` overrides.

Every mistake (unknown key, wrong type, impossible value) raises ``ConfigError`` naming the
key before any compute starts, so a typo never costs a run.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import math
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import yaml


class ConfigError(ValueError):
    """A config mistake; the message starts with the offending key."""

    def __init__(self, key: str, message: str):
        super().__init__(f"config key '{key}': {message}")
        self.key = key


DECODE_MODES = ("auto", "pil", "tensor", "gpu")  # see prepretrain.data.images.pixels


def decode_problem(decode: str, data: str) -> str | None:
    """Why ``decode`` cannot be used with ``data``, or None."""
    if decode not in DECODE_MODES:
        return f"must be one of {', '.join(DECODE_MODES)}; got '{decode}'"
    if decode == "gpu" and data == "synthetic":
        return ("decode=gpu decodes image files on the device; the synthetic dataset is drawn in memory "
                "(use decode=tensor, or export it: prepretrain data synth --out DIR --format jpg)")
    return None


def check_out_dir(out_dir: str, key: str = "out_dir") -> None:
    """A ConfigError naming ``key`` when ``out_dir`` (or a folder above it) is an existing file."""
    if not out_dir:
        return
    path = Path(out_dir)
    for candidate in (path, *path.parents):
        if candidate.exists():
            if not candidate.is_dir():
                raise ConfigError(key, f"{candidate} is a file, not a folder: name a folder for the run's outputs")
            return


def resume_step(resume_from: str) -> int | None:
    """The step ``resume_from`` names (``step_N`` or ``N``), None for ``latest``, -1 when malformed."""
    text = str(resume_from).strip().lower()
    if text == "latest":
        return None
    text = text.removeprefix("step_")
    return int(text) if text.isdigit() else -1


@dataclass
class TrainConfig:
    """What every training stage shares: where, on what, how long, how to optimise."""

    # run
    out_dir: str = ""  # default: runs/<stage>
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp16 | fp32
    resume: bool = True  # continue from the newest checkpoint in out_dir when there is one
    # which checkpoint to resume from: latest, or step_N / N (e.g. before a divergence: the later
    # checkpoints are set aside as rewound-step_*, kept, never loaded again)
    resume_from: str = "latest"
    # data
    data: str = "synthetic"  # "synthetic" or a path: image folder, manifest (.jsonl/.csv), shards
    image_size: int = 32
    num_images: int = 4000  # size of the synthetic training split
    num_workers: int = 0
    decode: str = "auto"  # auto (= tensor) | pil | tensor | gpu: where training images are decoded and augmented
    max_bad_fraction: float = 0.05  # stop the run when more samples than this are unreadable
    # schedule
    batch_size: int = 128  # global batch per optimizer step (all ranks, all accumulation steps)
    micro_batch_size: int = 0  # per-rank batch per forward; 0 = batch_size / world size
    epochs: float = 1.0
    steps: int = 0  # optimizer steps; 0 = derived from epochs
    blr: float = 1.5e-4  # base lr for a batch of 256; lr = blr * batch_size / 256
    lr: float = 0.0  # absolute lr; overrides blr when > 0
    min_lr: float = 0.0
    # after warmup: cosine (half cycle down to min_lr) | step (x lr_decay_rate at each fraction of
    # the run in lr_decay_at: ViTDet's 0.889 and 0.963, i.e. epochs 88.9/100 and 96.3/100)
    lr_schedule: str = "cosine"
    lr_decay_at: tuple[float, ...] = (0.889, 0.963)
    lr_decay_rate: float = 0.1
    warmup_epochs: float = 0.0
    warmup_steps: int = -1  # -1 = derived from warmup_epochs
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    clip_grad: float = 0.0  # max gradient norm; 0 = off
    max_nonfinite: int = 5  # consecutive bad steps tolerated (non-finite or spiking losses: each is skipped)
    # a step whose loss is above spike_factor x the median of the last spike_window applied steps is a loss
    # spike: skipped like a non-finite one (0 = off); the guard starts once spike_window / 2 steps are in
    spike_factor: float = 10.0
    spike_window: int = 50  # also: good steps in a row after a bad one before checkpoints count as healthy again
    # outputs
    log_every: int = 10
    eval_every: int = 0  # 0 = only at the end
    ckpt_every: int = 100
    keep_last: int = 2
    progress: bool = True
    tensorboard: bool = True
    wandb: str = ""  # Weights & Biases project to log to; empty = off (needs: pip install 'prepretrain[wandb]')
    wandb_mode: str = "online"  # online | offline (kept on disk for `wandb sync`: no network needed)
    # scale
    strategy: str = "auto"  # auto | none | ddp | fsdp
    compile: bool = False
    grad_checkpointing: bool = False
    dist_timeout_s: float = 600.0  # collective timeout: a dead or stuck rank fails the job after this long

    # Every numeric key's interval (config.check_bounds, before validate); subclasses declare theirs.
    bounds: ClassVar[dict[str, str]] = {
        "seed": "any", "image_size": "> 0", "num_images": "> 0", "num_workers": ">= 0", "max_bad_fraction": "[0, 1]",
        "batch_size": "> 0", "micro_batch_size": ">= 0", "epochs": ">= 0", "steps": ">= 0", "blr": ">= 0",
        "lr": ">= 0", "min_lr": ">= 0", "lr_decay_rate": "(0, 1]", "warmup_epochs": ">= 0", "warmup_steps": ">= -1",
        "weight_decay": ">= 0", "clip_grad": ">= 0", "max_nonfinite": ">= 0", "log_every": "> 0",
        "spike_factor": ">= 0", "spike_window": ">= 1",
        "eval_every": ">= 0", "ckpt_every": "> 0", "keep_last": "> 0", "dist_timeout_s": "> 0",
    }
    # Every key with a fixed set of values (config.check_bounds, with the intervals); subclasses declare theirs.
    choices: ClassVar[dict[str, tuple[str, ...]]] = {
        "lr_schedule": ("cosine", "step"), "decode": DECODE_MODES, "precision": ("auto", "bf16", "fp16", "fp32"),
        "strategy": ("auto", "none", "ddp", "fsdp"), "wandb_mode": ("online", "offline"),
    }

    def validate(self) -> None:
        if any(not 0 < f < 1 for f in self.lr_decay_at) or list(self.lr_decay_at) != sorted(self.lr_decay_at):
            raise ConfigError("lr_decay_at", f"increasing fractions of the run in (0, 1); got {list(self.lr_decay_at)}")
        if self.epochs <= 0 and self.steps <= 0:
            raise ConfigError("epochs", "set epochs > 0 or steps > 0")
        problem = decode_problem(self.decode, self.data)
        if problem:
            raise ConfigError("decode", problem)
        check_out_dir(self.out_dir)
        if resume_step(self.resume_from) == -1:
            raise ConfigError("resume_from", f"latest or step_N (a checkpoint's step), not '{self.resume_from}'")
        if not self.resume and self.resume_from != "latest":
            raise ConfigError("resume_from", "resume=false starts over: it cannot also resume from a step")
        for i, beta in enumerate(self.betas):
            if not 0 <= beta < 1:
                raise ConfigError("betas", f"beta{i + 1} must be in [0, 1), got {beta}")
        if self.wandb and importlib.util.find_spec("wandb") is None:
            raise ConfigError("wandb", "logging to Weights & Biases needs the wandb package: "
                                       "pip install 'prepretrain[wandb]' (or leave wandb= empty)")
        if not (self.device in ("auto", "cpu", "cuda", "meta") or self.device.startswith("cuda:")):
            raise ConfigError("device", f"must be auto, cpu, cuda or cuda:N, got '{self.device}'")
        if self.micro_batch_size and self.batch_size % self.micro_batch_size:
            raise ConfigError(
                "micro_batch_size", f"{self.micro_batch_size} does not divide batch_size {self.batch_size}"
            )

    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr > 0 else self.blr * self.batch_size / 256


TEXT_SOURCE_KEYS = ("hashtag_field", "caption_field", "metadata", "metadata_key")


@dataclass
class TextSourceConfig(TrainConfig):
    """The stages that read each image's text (WSP: hashtags, tags, captions; LiT: captions) add
    where that text is: fields of shard ``.json`` members and manifest rows, or a table joined to
    the images by key. The stages that read pixels and labels only do not take these keys."""

    hashtag_field: str = "hashtags"  # field of shard .json members / manifest rows holding the hashtags
    caption_field: str = "caption"  # field holding the caption (shards fall back to their .txt member)
    metadata: str = ""  # a table joined to the images by key: YFCC100M TSV, caption TSV, parquet, JSONL/CSV
    metadata_key: str = ""  # the shard .json field matched to the table's key; empty = the image key / file stem

    def validate(self) -> None:
        super().validate()
        if self.metadata and not Path(self.metadata).is_file():
            raise ConfigError("metadata", f"metadata table not found: {self.metadata}")
        if self.metadata_key and not self.metadata:
            raise ConfigError("metadata_key", "names the image field matched to a metadata table: set metadata= too")


# Intervals a config value may have to lie in (``check_range``, ``bounds``), written as the error says them.
INTERVALS = {
    "[0, 1]": lambda v: 0 <= v <= 1,
    "(0, 1]": lambda v: 0 < v <= 1,
    "[0, 1)": lambda v: 0 <= v < 1,
    "(0, 1)": lambda v: 0 < v < 1,
    "[1, 100]": lambda v: 1 <= v <= 100,
    ">= 0": lambda v: v >= 0,
    "> 0": lambda v: v > 0,
    ">= 1": lambda v: v >= 1,
    ">= -1": lambda v: v >= -1,
    "any": lambda v: True,  # declared on purpose: every value means something (e.g. a seed)
}


def check_range(cfg: Any, interval: str, *keys: str) -> None:
    """ConfigError naming the first of ``keys`` whose value is outside ``interval`` (an ``INTERVALS`` key)."""
    inside = INTERVALS[interval]
    for key in keys:
        value = getattr(cfg, key)
        for item in value if isinstance(value, (tuple, list)) else (value,):  # a list key: every value
            if not inside(item):
                where = interval if interval[0] in "<>" else f"in {interval}"
                raise ConfigError(key, f"must be {where}, got {item}")


class Choices(tuple):
    """The values of a key, declared in a config's ``choices`` where a plain tuple does not say enough:
    ``any_case`` matches the value whatever its case (``lvis=True`` as ``true``); ``why`` ends the error
    (why a stage allows fewer values than the key it inherits)."""

    any_case: bool
    why: str

    def __new__(cls, values: tuple[str, ...], *, any_case: bool = False, why: str = "") -> Choices:
        choices = super().__new__(cls, values)
        choices.any_case, choices.why = any_case, why
        return choices


def _declared(cls: type, table: str) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        merged.update(klass.__dict__.get(table, {}))
    return merged


def declared_bounds(cls: type) -> dict[str, str]:
    """Every numeric key's interval, from the ``bounds`` each config class declares for the keys it
    defines (a subclass may redeclare a key it inherits); base classes first."""
    return _declared(cls, "bounds")


def declared_choices(cls: type) -> dict[str, tuple[str, ...]]:
    """Every fixed-choice key's values, from the ``choices`` each config class declares beside its
    ``bounds`` (a subclass may narrow a key it inherits, e.g. ``decode``); base classes first."""
    return _declared(cls, "choices")


def check_choice(cfg: Any, key: str, options: tuple[str, ...]) -> None:
    """ConfigError naming ``key`` when its value is not one of ``options``."""
    value = getattr(cfg, key)
    probe = str(value).lower() if getattr(options, "any_case", False) else value
    if probe not in options:
        why = getattr(options, "why", "")
        raise ConfigError(key, f"must be one of {', '.join(options)}; got '{value}'" + (f": {why}" if why else ""))


def check_bounds(cfg: Any) -> None:
    """The one check of declared values every config passes through (``build_config``,
    ``replace_config``): each key of ``bounds`` lies in its interval and each key of ``choices`` is one
    of its values, before the class's own cross-key ``validate``."""
    for key, interval in declared_bounds(type(cfg)).items():
        if interval not in INTERVALS:
            raise KeyError(f"{type(cfg).__name__}.bounds['{key}']: unknown interval {interval!r}")
        check_range(cfg, interval, key)
    for key, options in declared_choices(type(cfg)).items():
        check_choice(cfg, key, options)


C = TypeVar("C")


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Convert a YAML/CLI value to the field's type, or raise ConfigError naming the key."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        if isinstance(value, str) and value.lower() in ("none", "null") and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        errors = []
        for candidate in inner:
            try:
                return _coerce(key, value, candidate)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(key, f"cannot read {value!r} as {annotation}")
    if origin in (tuple, list):
        if isinstance(value, str):
            text = value.strip()
            if text[:1] + text[-1:] in ("[]", "()"):  # [a, b] or (a, b); "probe (coarse)" keeps its ")"
                text = text[1:-1]
            value = [v.strip() for v in text.split(",") if v.strip()] if text else []
        fixed = origin is tuple and args and args[-1] is not Ellipsis
        if not isinstance(value, (list, tuple)) and not fixed and isinstance(value, (int, float)):
            value = [value]  # one value of a list key (mae_steps: 200)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(key, f"expected a list, got {value!r}")
        if fixed:
            if len(value) != len(args):
                raise ConfigError(key, f"expected {len(args)} values, got {len(value)}: {value!r}")
            return tuple(_coerce(key, v, a) for v, a in zip(value, args))
        item = args[0] if args else str
        converted = [_coerce(key, v, item) for v in value]
        return tuple(converted) if origin is tuple else converted
    if origin is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise ConfigError(key, f"expected a mapping, got {value!r}")
        return dict(value)
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "no", "off", "0"):
            return False
        raise ConfigError(key, f"expected true/false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool):
            raise ConfigError(key, f"expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                number = float(value.replace("_", ""))
            except ValueError:
                number = None
            if number is not None and number.is_integer():
                return int(number)
        raise ConfigError(key, f"expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, bool):
            raise ConfigError(key, f"expected a number, got {value!r}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(key, f"expected a number, got {value!r}") from None
        if not math.isfinite(number):
            raise ConfigError(key, f"must be a finite number, got {value!r}")
        return number
    if annotation is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(key, f"expected a string, got {value!r}")
        return "" if value is None else str(value)
    return value


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def parse_overrides(items: list[str]) -> dict[str, str]:
    """``["seed=1", "out_dir=runs/x"]`` -> ``{"seed": "1", "out_dir": "runs/x"}``."""
    result = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(item, "overrides are written key=value")
        key, value = item.split("=", 1)
        result[key.strip()] = value
    return result


class _UniqueKeyLoader(yaml.SafeLoader):
    """A YAML loader that refuses a key given twice in one mapping (YAML itself keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(str(key), f"given twice (line {key_node.start_mark.line + 1}); keep one")
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: str | Path) -> Any:
    """A YAML config file; a missing file, a syntax error or a repeated key is a ConfigError naming it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(str(path), "config file not found")
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(str(path), f"not valid YAML{where}: {getattr(error, 'problem', None) or error}") from None


def build_config(
    cls: type[C], path: str | Path | None = None, overrides: dict[str, Any] | list[str] | None = None
) -> C:
    """Defaults of ``cls``, then the YAML file at ``path``, then ``overrides``; validated."""
    values: dict[str, Any] = {}
    if path:
        loaded = read_yaml(path) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(str(path), "a config file must be a mapping of key: value")
        stage = loaded.pop("stage", None)
        expected = getattr(cls, "stage_name", None)
        if stage is not None and expected is not None and stage != expected:
            raise ConfigError("stage", f"file {path} is a '{stage}' config, not '{expected}'")
        values.update(loaded)
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    values.update(overrides or {})
    types_ = _field_types(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in types_:
            close = difflib.get_close_matches(key, list(types_), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(key, f"unknown key for {cls.__name__}{hint}")
        kwargs[key] = _coerce(key, value, types_[key])
    cfg = cls(**kwargs)
    check_bounds(cfg)
    cfg.validate()  # type: ignore[attr-defined]
    return cfg


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A YAML-friendly dict (tuples become lists)."""

    def plain(value: Any) -> Any:
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return {f.name: plain(getattr(cfg, f.name)) for f in fields(cfg)}


def dump_config(cfg: Any) -> str:
    stage = getattr(cfg, "stage_name", None)
    body = config_to_dict(cfg)
    if stage:
        body = {"stage": stage, **body}
    return yaml.safe_dump(body, sort_keys=False)


def replace_config(cfg: C, **changes: Any) -> C:
    new = dataclasses.replace(cfg, **changes)
    check_bounds(new)
    new.validate()  # type: ignore[attr-defined]
    return new


__all__ = [
    "ConfigError",
    "Choices",
    "check_bounds",
    "check_choice",
    "check_out_dir",
    "declared_bounds",
    "declared_choices",
    "TEXT_SOURCE_KEYS",
    "TextSourceConfig",
    "TrainConfig",
    "build_config",
    "config_to_dict",
    "dump_config",
    "field",
    "parse_overrides",
    "replace_config",
]

"""Video finetuning of an image encoder on clips (``prepretrain video``): K400, SSv2, synthetic motion.

What the stage builds (the loop is ``prepretrain.train.engine``): a :class:`~prepretrain.models.
video.VideoViT` inflated from any encoder that ``encoder=`` accepts (run dir, MAE/MAWS/timm/CLIP
file, or random init): tubelet patches averaged from the 2D patch embedding, the image position
embedding plus a zero-initialised temporal one, the image model's blocks, optional relative
position bias. The recipe follows the MAE-ST / VideoMAE finetuning recipes (the MAWS paper gives
none): layer-wise lr decay, drop path, head dropout, mixup/cutmix on whole clips, label smoothing,
gradient clipping (the common ``clip_grad``); for training a random clip start, random-resized
crop, RandAugment with one draw per clip and random erasing with one box through every frame,
and repeated augmentation (``repeated_aug`` clips of each decoded video in the batch:
``batch_size`` counts videos); ``temporal_views`` x ``spatial_views`` evaluation with averaged
class probabilities.

The single-frame baseline (``single_frame_baseline=true``, the default): the same encoder
initialisation finetuned on single frames (``num_frames=1``: exactly the image model) with the
same data, steps and batch, tested on the video model's views, every frame of each classified and
the probabilities averaged (``eval_frames``): the same pixels, no use of time. It answers "does
the model use motion?", which a number on its own cannot. It is its own training run, in
``<out_dir>/single_frame`` (resumable on its own), started by :meth:`after_run` on every rank once
the video model is done, so one command yields ``top1`` and ``single_frame_top1`` under torchrun
too. Why there and not as a separate job: the registry runs one stage per command; calling the one
training loop again keeps every guarantee (resume, checkpoints, logs) without nesting two models
in one loop.

Evaluation: each rank tests its share of the videos and the hit counts are summed (every video
once, ``test_videos``); the ``eval_every`` evaluation is validation on one view per video
(selection), the multi-view test runs at the end (and on the best checkpoint when it is older).

Outputs in the run dir: ``last.safetensors`` and ``best.safetensors`` (VideoViT state dicts with
``model``/``image_size``/``num_frames``/``tubelet_size``/... metadata) and results.json with
``top1``/``top5`` (multi-view, test split), ``test_videos``, ``val_top1`` (one view),
``single_frame_top1``.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from ..config import Choices, ConfigError, TrainConfig, replace_config
from ..data.loader import RecordDataset, eval_loader
from ..data.video.clips import (
    PADDING_LABEL,
    SAMPLINGS,
    SHORT_VIDEO_POLICIES,
    EvalClips,
    TrainClip,
    VideoData,
    check_randaugment,
    mix_clips,
    open_video_data,
)
from ..evaluate.metrics import reported_ks, topk_hits
from ..models.classifier import classifier_metadata
from ..models.resolve import EncoderSpec, build_encoder, check_weights, resolve_encoder
from ..models.video import VideoViT, video_forward_flops, video_layer_name
from ..models.vit import check_model_and_size, resolve_name, vit_shape
from ..train.distributed import all_reduce_sum
from ..train.engine import Stage, TrainData, train
from ..train.optim import layer_decay_scale, param_groups
from ..train.run import BEST_WEIGHTS, Run

SINGLE_FRAME_DIR = "single_frame"


@dataclass
class VideoConfig(TrainConfig):
    """Video finetuning. Defaults are the CPU demo (synthetic motion); configs/video_*.yaml hold paper-scale recipes."""

    stage_name = "video"
    encoder: str = ""  # run directory or weights file; empty = random init; mae-init = the MAE's untrained init
    model: str = "vit_micro4"  # architecture when the weights carry no metadata
    task: str = "auto"  # direction | motion (synthetic), label (files)
    video_dir: str = ""  # where the video files of Kinetics/SSv2/manifest annotations live; default: data folder
    max_missing_fraction: float = 0.1  # refuse a split when more of its annotated videos than this have no file
    synthetic_length: int = 32  # frames of each synthetic video
    num_frames: int = 8  # frames per clip
    frame_stride: int = 2  # sampling rate: frames between two sampled frames (sampling=dense)
    # > 0: frame_stride counts frames at this rate, so a clip lasts frame_stride * num_frames / target_fps
    # seconds whatever the file's rate (PySlowFast's Kinetics: 30); 0: it counts the file's own frames
    target_fps: float = 0.0
    # dense: num_frames frames frame_stride apart (Kinetics recipes) | segment: one frame from each of
    # num_frames equal segments of the whole video (random in training, interleaved views at test; SSv2)
    sampling: str = "dense"
    tubelet_size: int = 2  # frames per spatio-temporal patch
    rel_pos: bool = False  # MViTv2 decomposed query-dependent relative position per block (zero-init)
    motion_init: float = 0.3  # zero-sum temporal part of the inflated tubelet filters (x the 2D weights' std); 0 = off
    temporal_views: int = 2  # evaluation: clips per video, evenly spread
    # frames per evaluation view; 0 = num_frames. A multiple of num_frames: the model classifies each
    # num_frames-long part and the probabilities are averaged (the single-frame baseline sets the video
    # model's num_frames, so it sees every frame of the video model's views)
    eval_frames: int = 0
    spatial_views: int = 1  # evaluation: crops per clip (1 center, 3 left/center/right)
    short_videos: str = "pad"  # pad (repeat the last frame) | skip (count as too_short)
    global_pool: str = "avg"  # avg (mean of patch tokens + fc_norm: MAE-ST, VideoMAE) | token (CLS)
    layer_decay: float = 1.0  # lr scale decay^(num_layers + 1 - layer_id); the demo's random init has nothing to keep
    drop_path: float = 0.0
    mixup: float = 0.0  # mixup alpha on clips; 0 = off
    cutmix: float = 0.0  # cutmix alpha (a box through every frame); 0 = off
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    label_smoothing: float = 0.1
    min_crop_scale: float = 0.5  # random-resized crop scale lower bound (one box for every frame of a clip)
    hflip: float = 0.0  # horizontal flip probability (0 for direction-sensitive tasks: synthetic, SSv2)
    # timm RandAugment spec, one draw per clip (the same ops on every frame), after the crop; "" = off
    randaugment: str = ""
    random_erasing: float = 0.0  # probability of erasing one box through every frame (per-pixel noise); 0 = off
    # clips per decoded video, each with its own start and augmentation; batch_size (and blr's 256) count
    # videos, so a step trains on batch_size * repeated_aug clips
    repeated_aug: int = 1
    head_dropout: float = 0.0  # dropout on the pooled features before the classifier (timm drop_rate)
    eval_batch_size: int = 64  # clips per forward in evaluation
    single_frame_baseline: bool = True  # also finetune the same init on single frames and report it
    # CPU-demo schedule: 16 px clips of 8 frames (4 x 4 patches x 4 tubelet slots = 65 tokens)
    image_size: int = 16
    num_images: int = 1200  # synthetic training videos (val/test: max(64, num_images // 5))
    batch_size: int = 32
    epochs: float = 0.0
    steps: int = 400
    blr: float = 1.6e-2  # lr 2e-3 at batch 32
    warmup_steps: int = 15
    min_lr: float = 1e-6
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.05
    log_every: int = 25
    ckpt_every: int = 50

    # Every numeric key this class defines, with its interval (config.check_bounds).
    bounds = {
        "max_missing_fraction": "[0, 1]", "synthetic_length": "> 0", "num_frames": "> 0", "frame_stride": "> 0",
        "target_fps": ">= 0", "tubelet_size": "> 0", "eval_frames": ">= 0", "motion_init": ">= 0",
        "temporal_views": "> 0", "spatial_views": "> 0",
        "layer_decay": "(0, 1]", "drop_path": "[0, 1)", "mixup": ">= 0", "cutmix": ">= 0", "mixup_prob": "[0, 1]",
        "mixup_switch_prob": "[0, 1]", "label_smoothing": "[0, 1)", "min_crop_scale": "(0, 1]", "hflip": "[0, 1]",
        "eval_batch_size": "> 0", "random_erasing": "[0, 1]", "repeated_aug": "> 0", "head_dropout": "[0, 1)",
    }
    choices = {
        "decode": Choices(("auto",), why="video clips are decoded with PyAV in the loader"),
        "global_pool": ("token", "avg"), "sampling": SAMPLINGS, "short_videos": SHORT_VIDEO_POLICIES,
    }

    def validate(self) -> None:
        super().validate()
        if self.num_frames % self.tubelet_size:
            raise ConfigError("tubelet_size", f"{self.tubelet_size} does not divide num_frames {self.num_frames} "
                                              "(num_frames=1 needs tubelet_size=1)")
        if self.randaugment:
            try:
                check_randaugment(self.randaugment)
            except ValueError as error:
                raise ConfigError("randaugment", str(error)) from None
        if self.eval_frames % self.num_frames:
            raise ConfigError("eval_frames", f"{self.eval_frames} is not a multiple of num_frames {self.num_frames}")
        check_model_and_size(self.model, self.image_size)
        if self.data == "synthetic" and self.task not in ("auto", "direction", "motion"):
            raise ConfigError("task", f"the synthetic video dataset has tasks direction and motion; got '{self.task}'")
        frames = max(self.num_frames, self.eval_frames)
        if self.data == "synthetic" and (frames - 1) * self.frame_stride + 1 > self.synthetic_length:
            raise ConfigError("frame_stride", f"a clip of {frames} frames {self.frame_stride} apart spans "
                                              f"more than the {self.synthetic_length} frames of a synthetic video")
        check_weights("encoder", self.encoder)


def average_views(logits: torch.Tensor) -> torch.Tensor:
    """``(videos, views, classes)`` logits -> each video's class probabilities averaged over its
    views, as the reference test loops do (SlowFast and MAE-ST sum the views' softmax outputs; the
    mean ranks the same). Averaging logits instead lets one confident view outvote the others."""
    return logits.softmax(dim=-1).mean(dim=1)


class VideoStage(Stage):
    """An image encoder inflated to a video ViT and finetuned end to end on clips."""

    name = "video"
    select_on = "val_top1"
    cfg: VideoConfig

    def __init__(self, cfg: VideoConfig):
        super().__init__(cfg)
        self.spec: EncoderSpec = resolve_encoder(cfg.encoder, cfg.model, cfg.image_size, cfg.seed)
        if self.spec.image_size != cfg.image_size:
            raise ConfigError("image_size", f"{cfg.image_size} px: the encoder runs at {self.spec.image_size}")
        self.data: VideoData = open_video_data(
            cfg.data, task=cfg.task, num_videos=cfg.num_images, seed=cfg.seed, image_size=cfg.image_size,
            length=cfg.synthetic_length, video_dir=cfg.video_dir, max_missing_fraction=cfg.max_missing_fraction)
        self.num_layers = self.spec.depth
        self.mixing = cfg.mixup > 0 or cfg.cutmix > 0
        self.criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)

    # ------------------------------------------------------------------ what it trains
    def build_model(self, run: Run) -> VideoViT:
        cfg = self.cfg
        image = build_encoder(self.spec, num_classes=self.data.num_classes, global_pool=cfg.global_pool,
                              drop_path_rate=cfg.drop_path)
        if self.spec.path is not None:  # trained features: MAE's finetuning recipe starts from a near-zero head
            nn.init.trunc_normal_(image.head.weight, std=2e-5)
            nn.init.zeros_(image.head.bias)
        # Untrained features (random or MAE init) keep timm's head (std 0.02): a near-zero head on them is
        # a saddle, the blocks get almost no gradient until the head grows and the head grows only along
        # features that already tell the classes. The demo sat at chance for 75 to 400+ steps depending
        # on the seed (top-1 28 to 91); with timm's head it leaves chance within about 100 steps.
        if cfg.head_dropout > 0:  # what timm's drop_rate builds (it drops nothing else in a ViT)
            image.head_drop = nn.Dropout(cfg.head_dropout)
        generator = torch.Generator().manual_seed(cfg.seed)
        return VideoViT(image, cfg.num_frames, cfg.tubelet_size, rel_pos=cfg.rel_pos, motion_init=cfg.motion_init,
                        generator=generator)

    def train_data(self, run: Run) -> TrainData:
        cfg = self.cfg
        transform = TrainClip(cfg.num_frames, cfg.frame_stride, cfg.image_size, min_scale=cfg.min_crop_scale,
                              hflip=cfg.hflip, short_videos=cfg.short_videos, sampling=cfg.sampling,
                              target_fps=cfg.target_fps, randaugment=cfg.randaugment,
                              random_erasing=cfg.random_erasing, repeats=cfg.repeated_aug)
        source = self.data.source("train")
        return TrainData(RecordDataset(source, transform), len(source))

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        clips, labels = batch["video"], batch["label"]
        if clips.dim() == 6:  # repeated augmentation: (videos, repeats, C, T, H, W) -> one clip per row
            labels = labels.repeat_interleave(clips.shape[1])
            clips = clips.flatten(0, 1)
        if not self.mixing:
            return self.criterion(model(clips), labels), {}
        cfg = self.cfg
        clips, targets = mix_clips(clips, labels, self.data.num_classes, mixup=cfg.mixup, cutmix=cfg.cutmix,
                                   prob=cfg.mixup_prob, switch_prob=cfg.mixup_switch_prob,
                                   label_smoothing=cfg.label_smoothing)
        logits = model(clips)
        return torch.sum(-targets * torch.log_softmax(logits.float(), dim=-1), dim=-1).mean(), {}

    def param_groups(self, model: nn.Module) -> list[dict]:
        """Layer-wise lr decay on timm names; relative position tables, like embeddings, get no weight decay."""

        def scale(name: str) -> float:
            return layer_decay_scale(video_layer_name(name), self.num_layers, self.cfg.layer_decay)

        groups = []
        for group in param_groups(model, self.cfg.weight_decay, lr_scale=scale):
            tables = [i for i, name in enumerate(group["names"]) if name.startswith("rel_pos.")]
            if group["weight_decay"] and tables:
                groups.append({**group, "params": [group["params"][i] for i in tables],
                               "names": [group["names"][i] for i in tables], "weight_decay": 0.0})
                keep = [i for i in range(len(group["names"])) if i not in tables]
                group = {**group, "params": [group["params"][i] for i in keep],
                         "names": [group["names"][i] for i in keep]}
            if group["params"]:
                groups.append(group)
        return groups

    def flops_per_sample(self) -> float:
        """Training FLOPs per sample, i.e. per video: ``repeated_aug`` clips."""
        cfg = self.cfg
        shape = vit_shape(self.spec.model, depth=self.spec.depth, img_size=cfg.image_size)
        tokens = 1 + (cfg.num_frames // cfg.tubelet_size) * (cfg.image_size // shape.patch_size) ** 2
        volume = cfg.tubelet_size * shape.patch_size**2
        return 3 * cfg.repeated_aug * video_forward_flops(shape.embed_dim, shape.depth, shape.mlp_dim, tokens, volume)

    # --------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def _accuracy(self, model: nn.Module, role: str, run: Run,
                  views: tuple[int, int] | None = None) -> dict[str, float]:
        """Top-1/top-5 (percent) of the views' averaged class probabilities over the videos of
        ``role`` (``views``: temporal x spatial, default the configured ones), and ``videos``, the
        number counted. Each rank reads its share (:class:`~prepretrain.data.video.clips.RefSource`) and
        the hit counts are summed across ranks, so every video is evaluated once."""
        cfg = self.cfg
        temporal, spatial = views or (cfg.temporal_views, cfg.spatial_views)
        frames = cfg.eval_frames or cfg.num_frames
        parts = frames // cfg.num_frames  # model inputs per view (the baseline: every frame of a view)
        transform = EvalClips(frames, cfg.frame_stride, cfg.image_size, temporal_views=temporal,
                              spatial_views=spatial, short_videos=cfg.short_videos, sampling=cfg.sampling,
                              target_fps=cfg.target_fps)
        dataset = RecordDataset(self.data.source(role, run.rank, run.world_size), transform)
        device = run.device
        use_bf16 = device.type == "cuda" and cfg.precision in ("auto", "bf16")
        ks = reported_ks(self.data.num_classes)
        counts = torch.zeros(len(ks) + 2, dtype=torch.float64)  # hits per k, videos counted, unreadable
        batch_size = max(1, cfg.eval_batch_size // (temporal * spatial * parts))
        for batch in eval_loader(dataset, batch_size, cfg.num_workers):
            counts[-1] += len(batch.get("_skipped", []))
            if "video" not in batch:  # nothing readable: still one forward, FSDP's gathers are collective
                clips = torch.zeros(1, 1, 3, frames, cfg.image_size, cfg.image_size)
                labels = torch.full((1,), PADDING_LABEL)
            else:
                clips, labels = batch["video"], batch["label"]  # (B, V, C, T, H, W)
            inputs = clips.flatten(0, 1)
            if parts > 1:  # (N, C, parts * num_frames, H, W) -> (N * parts, C, num_frames, H, W)
                inputs = inputs.unflatten(2, (parts, cfg.num_frames)).transpose(1, 2).flatten(0, 1)
            with torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext():
                logits = model(inputs.to(device))
            scores = average_views(logits.float().view(len(clips), -1, logits.shape[-1])).cpu()
            counted = labels != PADDING_LABEL
            hits = topk_hits(scores[counted], labels[counted], ks) if ks else {}
            counts[:len(ks)] += torch.tensor([float(hits[k]) for k in ks], dtype=torch.float64)
            counts[-2] += float(counted.sum())
        if run.world_size > 1:
            counts = all_reduce_sum(counts.to(device)).cpu()
        videos, skipped = int(counts[-2]), int(counts[-1])
        if not videos:
            raise RuntimeError(f"no readable video in the {role} split ({skipped} unreadable)")
        metrics = {f"top{k}": 100.0 * float(counts[i]) / videos for i, k in enumerate(ks)}
        metrics["videos"] = float(videos)
        if skipped:
            metrics["skipped"] = float(skipped)
        return metrics

    def _validation_top1(self, model: nn.Module, run: Run) -> float:
        """The selection metric: top-1 on val from one view per video (the middle clip, center crop)."""
        return self._accuracy(model, "val", run, views=(1, 1))["top1"]

    def evaluate(self, model: nn.Module, run: Run) -> dict[str, float]:
        """The end of the run: multi-view top-1/top-5 on test (reported; ``test_videos`` counted once
        across ranks) and the single-view ``val_top1`` it selects on."""
        metrics = self._accuracy(model, "test", run)
        metrics["test_videos"] = metrics.pop("videos")
        metrics["val_top1"] = self._validation_top1(model, run)
        return metrics

    def evaluate_during_training(self, model: nn.Module, run: Run) -> dict[str, float]:
        """Every ``eval_every`` steps: the single-view validation only (the multi-view test is for the end)."""
        return {"val_top1": self._validation_top1(model, run)}

    def metadata(self) -> dict[str, str]:
        cfg = self.cfg
        return {"model": resolve_name(cfg.model if not self.spec.path else self.spec.model),
                "image_size": str(cfg.image_size), "num_classes": str(self.data.num_classes),
                "global_pool": cfg.global_pool, "task": self.data.task, "num_frames": str(cfg.num_frames),
                "tubelet_size": str(cfg.tubelet_size), "frame_stride": str(cfg.frame_stride),
                "rel_pos": str(cfg.rel_pos).lower(), "depth": str(self.spec.depth), "format": "prepretrain-video-vit",
                **classifier_metadata(self.data.class_names)}

    def best_weights(self, model: nn.Module, run: Run) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        return run.full_state_dict(model), self.metadata()

    def single_frame_config(self, out_dir: str) -> VideoConfig:
        """The baseline's config: this one trained on single frames; evaluated on the video model's
        views, every frame of each classified and the probabilities averaged (``eval_frames``)."""
        cfg = self.cfg
        frames = cfg.eval_frames or cfg.num_frames
        # one frame is a clip's tokens / num_frames * tubelet_size: as many frames per forward as that many tokens
        batch = cfg.eval_batch_size * max(1, cfg.num_frames // cfg.tubelet_size)
        return replace_config(cfg, num_frames=1, tubelet_size=1, eval_frames=frames, eval_batch_size=batch,
                              rel_pos=False, single_frame_baseline=False, out_dir=out_dir)

    def test_best(self, run: Run) -> dict[str, Any]:
        """Multi-view test of the best checkpoint when it was chosen during training (its
        evaluation then had validation only); nothing when the final weights are the best."""
        best = run.best
        if not best or "top1" in best:
            return {}
        model = self.build_model(run)
        model.load_state_dict(load_file(str(run.path(BEST_WEIGHTS))))
        metrics = self._accuracy(model.to(run.device).eval(), "test", run)
        return {"best_top1": metrics["top1"], **({"best_top5": metrics["top5"]} if "top5" in metrics else {})}

    def after_run(self, results: dict[str, Any], run: Run) -> dict[str, Any]:
        """On every rank: the best checkpoint's test, then (by default) the single-frame baseline,
        a training run of its own in ``<out_dir>/single_frame`` (under torchrun on every rank)."""
        extra = self.test_best(run)
        cfg = self.cfg
        if cfg.single_frame_baseline and cfg.num_frames > 1:
            out = run.path(SINGLE_FRAME_DIR)
            run.print(f"single-frame baseline: the same initialisation finetuned on one frame per clip, in {out}")
            baseline = train(VideoStage(self.single_frame_config(str(out))))
            if run.is_main:
                extra.update({"single_frame_top1": baseline.get("top1"),
                              "single_frame_val_top1": baseline.get("val_top1"),
                              **({"single_frame_top5": baseline["top5"]} if "top5" in baseline else {}),
                              "single_frame_dir": str(out)})
        return extra

    def finish(self, model: nn.Module, run: Run) -> dict[str, Any]:
        """Export the last weights and report the best checkpoint (its test numbers, when chosen
        during training, and the single-frame baseline come from :meth:`after_run`)."""
        cfg = self.cfg
        last = run.save_weights("last.safetensors", run.full_state_dict(model), self.metadata(), dtype=torch.float32)
        results: dict[str, Any] = {
            "last": str(last), "task": self.data.task, "num_classes": self.data.num_classes,
            "encoder": self.spec.description, "test_split": self.data.split_names["test"],
            "num_frames": cfg.num_frames, "frame_stride": cfg.frame_stride, "tubelet_size": cfg.tubelet_size,
            "views": {"temporal": cfg.temporal_views, "spatial": cfg.spatial_views},
            "missing_videos": dict(self.data.missing),
        }
        best = run.best
        if best:
            results.update({"best": str(run.path(BEST_WEIGHTS)), "best_step": best["step"],
                            "best_val_top1": best["val_top1"], "best_selected_on_test": self.data.selection_is_test,
                            **{f"best_{k}": best[k] for k in ("top1", "top5") if k in best}})
        return results

"""Video finetuning of an image encoder on clips (``prepretrain video``): K400, SSv2, synthetic motion.

What the stage builds (the loop is ``prepretrain.train.engine``): a :class:`~prepretrain.models.
video.VideoViT` inflated from any encoder that ``encoder=`` accepts (run dir, MAE/MAWS/timm/CLIP
file, or random init): tubelet patches averaged from the 2D patch embedding, the image position
embedding plus a zero-initialised temporal one, the image model's blocks, optional relative
position bias. The recipe follows the MAE-ST / VideoMAE finetuning recipes (the MAWS paper gives
none): layer-wise lr decay, drop path, mixup/cutmix on whole clips, label smoothing; random clip
start and random-resized crop for training; ``temporal_views`` x ``spatial_views`` evaluation
with averaged logits.

The single-frame baseline (``single_frame_baseline=true``, the default): the same encoder
initialisation finetuned on single frames (``num_frames=1``: exactly the image model) with the
same data, steps and batch, evaluated on the same test videos from one frame each, the middle
frame. It answers "does the model use motion?", which a number on its own cannot. It is its own
training run, in ``<out_dir>/single_frame`` (resumable on its own), started by :meth:`finish` on
the writing process after the video model is done, so one command yields ``top1`` and
``single_frame_top1``. Why there and not as a separate job: the registry runs one stage per
command; calling the one training loop again from ``finish`` keeps every guarantee (resume,
checkpoints, logs) without nesting two models in one loop. Under several ranks ``finish`` runs
on rank 0 only, where a nested training run cannot join the others' collectives: the baseline is
then skipped with a note, and ``prepretrain video num_frames=1 tubelet_size=1 temporal_views=1``
(with the same settings) is the same run as its own job.

Outputs in the run dir: ``last.safetensors`` and ``best.safetensors`` (VideoViT state dicts with
``model``/``image_size``/``num_frames``/``tubelet_size``/... metadata) and results.json with
``top1``/``top5`` (multi-view, test split), ``val_top1``, ``single_frame_top1``.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import ConfigError, TrainConfig, replace_config
from ..data.loader import RecordDataset, eval_loader
from ..data.video import (
    SAMPLINGS,
    SHORT_VIDEO_POLICIES,
    EvalClips,
    TrainClip,
    VideoData,
    mix_clips,
    open_video_data,
)
from ..evaluate.metrics import topk_accuracy
from ..models.classifier import classifier_metadata
from ..models.resolve import EncoderSpec, build_encoder, check_weights, resolve_encoder
from ..models.video import VideoViT, video_forward_flops, video_layer_name
from ..models.vit import check_model_and_size, resolve_name, vit_shape
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
    rel_pos: bool = False  # decomposed relative position bias in every block (zero-initialised)
    motion_init: float = 0.3  # zero-sum temporal part of the inflated tubelet filters (x the 2D weights' std); 0 = off
    temporal_views: int = 2  # evaluation: clips per video, evenly spread
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
        "target_fps": ">= 0", "tubelet_size": "> 0", "motion_init": ">= 0", "temporal_views": "> 0",
        "spatial_views": "> 0",
        "layer_decay": "(0, 1]", "drop_path": "[0, 1]", "mixup": ">= 0", "cutmix": ">= 0", "mixup_prob": "[0, 1]",
        "mixup_switch_prob": "[0, 1]", "label_smoothing": "[0, 1)", "min_crop_scale": "(0, 1]", "hflip": "[0, 1]",
        "eval_batch_size": "> 0",
    }

    def validate(self) -> None:
        super().validate()
        if self.decode != "auto":
            raise ConfigError("decode", "video clips are decoded with PyAV in the loader: decode=auto")
        if self.global_pool not in ("token", "avg"):
            raise ConfigError("global_pool", f"must be token or avg; got '{self.global_pool}'")
        if self.num_frames % self.tubelet_size:
            raise ConfigError("tubelet_size", f"{self.tubelet_size} does not divide num_frames {self.num_frames} "
                                              "(num_frames=1 needs tubelet_size=1)")
        if self.sampling not in SAMPLINGS:
            raise ConfigError("sampling", f"must be one of {', '.join(SAMPLINGS)}; got '{self.sampling}'")
        if self.short_videos not in SHORT_VIDEO_POLICIES:
            raise ConfigError("short_videos", f"must be one of {', '.join(SHORT_VIDEO_POLICIES)}; "
                                              f"got '{self.short_videos}'")
        check_model_and_size(self.model, self.image_size)
        if self.data == "synthetic" and self.task not in ("auto", "direction", "motion"):
            raise ConfigError("task", f"the synthetic video dataset has tasks direction and motion; got '{self.task}'")
        if self.data == "synthetic" and (self.num_frames - 1) * self.frame_stride + 1 > self.synthetic_length:
            raise ConfigError("frame_stride", f"a clip of {self.num_frames} frames {self.frame_stride} apart spans "
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
        nn.init.trunc_normal_(image.head.weight, std=2e-5)  # MAE reference: a near-zero head
        nn.init.zeros_(image.head.bias)
        generator = torch.Generator().manual_seed(cfg.seed)
        return VideoViT(image, cfg.num_frames, cfg.tubelet_size, rel_pos=cfg.rel_pos, motion_init=cfg.motion_init,
                        generator=generator)

    def train_data(self, run: Run) -> TrainData:
        cfg = self.cfg
        transform = TrainClip(cfg.num_frames, cfg.frame_stride, cfg.image_size, min_scale=cfg.min_crop_scale,
                              hflip=cfg.hflip, short_videos=cfg.short_videos, sampling=cfg.sampling,
                              target_fps=cfg.target_fps)
        source = self.data.source("train")
        return TrainData(RecordDataset(source, transform), len(source))

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        clips, labels = batch["video"], batch["label"]
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
        cfg = self.cfg
        shape = vit_shape(self.spec.model, depth=self.spec.depth, img_size=cfg.image_size)
        tokens = 1 + (cfg.num_frames // cfg.tubelet_size) * (cfg.image_size // shape.patch_size) ** 2
        volume = cfg.tubelet_size * shape.patch_size**2
        return 3 * video_forward_flops(shape.embed_dim, shape.depth, shape.mlp_dim, tokens, volume)

    # --------------------------------------------------------------------- evaluation
    @property
    def views(self) -> int:
        return self.cfg.temporal_views * self.cfg.spatial_views

    @torch.no_grad()
    def _accuracy(self, model: nn.Module, role: str, device: torch.device) -> dict[str, float]:
        """Top-1/top-5 (percent) of the views' averaged class probabilities over the videos of ``role``."""
        cfg = self.cfg
        transform = EvalClips(cfg.num_frames, cfg.frame_stride, cfg.image_size, temporal_views=cfg.temporal_views,
                              spatial_views=cfg.spatial_views, short_videos=cfg.short_videos, sampling=cfg.sampling,
                              target_fps=cfg.target_fps)
        dataset = RecordDataset(self.data.source(role), transform)
        use_bf16 = device.type == "cuda" and cfg.precision in ("auto", "bf16")
        scores, labels, skipped = [], [], 0
        for batch in eval_loader(dataset, max(1, cfg.eval_batch_size // self.views), cfg.num_workers):
            skipped += len(batch.get("_skipped", []))
            if "video" not in batch:
                continue
            clips = batch["video"]  # (B, V, C, T, H, W)
            with torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else nullcontext():
                logits = model(clips.flatten(0, 1).to(device))
            scores.append(average_views(logits.float().view(len(clips), self.views, -1)).cpu())
            labels.append(batch["label"])
        if not scores:
            raise RuntimeError(f"no readable video in the {role} split ({skipped} unreadable)")
        metrics = topk_accuracy(torch.cat(scores), torch.cat(labels))
        if skipped:
            metrics["skipped"] = float(skipped)
        return metrics

    def evaluate(self, model: nn.Module, run: Run) -> dict[str, float]:
        """Multi-view top-1/top-5 on test (reported) and ``val_top1`` (selection)."""
        metrics = self._accuracy(model, "test", run.device)
        val = metrics if self.data.selection_is_test else self._accuracy(model, "val", run.device)
        metrics["val_top1"] = val["top1"]
        return metrics

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
        """The baseline's config: this one on single frames (the middle one in evaluation)."""
        return replace_config(self.cfg, num_frames=1, tubelet_size=1, temporal_views=1, rel_pos=False,
                              single_frame_baseline=False, out_dir=out_dir)

    def run_single_frame_baseline(self, run: Run) -> dict[str, Any]:
        if run.world_size > 1:
            note = ("skipped under several ranks (a nested run on rank 0 cannot join the others); run it as its own "
                    "job: prepretrain video num_frames=1 tubelet_size=1 temporal_views=1 with the same settings")
            run.print(f"single-frame baseline {note}")
            return {"single_frame_top1": None, "single_frame_note": note}
        out = run.path(SINGLE_FRAME_DIR)
        run.print(f"single-frame baseline: the same initialisation finetuned on one frame per clip, in {out}")
        baseline = train(VideoStage(self.single_frame_config(str(out))))
        return {"single_frame_top1": baseline.get("top1"), "single_frame_val_top1": baseline.get("val_top1"),
                **({"single_frame_top5": baseline["top5"]} if "top5" in baseline else {}),
                "single_frame_dir": str(out)}

    def finish(self, model: nn.Module, run: Run) -> dict[str, Any]:
        """Export the last weights, report the best checkpoint, then (by default) the single-frame baseline."""
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
                            "best_val_top1": best["val_top1"], "best_top1": best["top1"],
                            **({"best_top5": best["top5"]} if "top5" in best else {}),
                            "best_selected_on_test": self.data.selection_is_test})
        if cfg.single_frame_baseline and cfg.num_frames > 1:
            results.update(self.run_single_frame_baseline(run))
        return results

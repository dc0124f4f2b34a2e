"""``prepretrain bench``: each stage's training step beside a reference-style baseline, in one run.

For ``mae``, ``wsp``, ``finetune`` (and ``vit``), ``video`` and ``detect`` the same architecture
is timed two ways on random inputs already on the device, so the figures are the model step
alone (``bench data`` times the input pipeline; ``--end-to-end`` runs the real stage):

- ``prepretrain``: the step as the training engine runs it: ``precision`` (bf16 autocast on CUDA
  and on CPUs with bf16 instructions), fused AdamW, the on-device non-finite check that skips a
  bad step without a host sync (``found_inf``), ``torch.compile`` on CUDA.
- ``baseline``: the setup of the reference implementations (MAE's ``engine_pretrain.py``, DeiT,
  SWAG): the same timm blocks with timm's own attention forward, gather-based masking, fp16
  autocast with a loss scaler on CUDA (fp32 on CPU), ``torch.optim.AdamW`` with its default
  implementation, no compile, and ``loss.item()`` plus ``math.isfinite`` every step (a host sync).

``lit`` times the text tower's step from cached image features (``prepretrain lit``'s default)
against the baseline that runs the locked image tower every step.

FLOPs come from the analytic formulas of :func:`prepretrain.models.vit.forward_flops` and its MAE,
text, video and ViTDet counterparts (training = 3 x forward; the
detector counts its ViT only), so MFU is comparable with the paper's cost model.
"""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from prepretrain.config import Choices, ConfigError
from prepretrain.data.images.transforms import IMAGENET_MEAN, IMAGENET_STD
from prepretrain.models.clip import build_clip, clip_loss
from prepretrain.models.detector import build_detector
from prepretrain.models.heads import multilabel_loss
from prepretrain.models.mae import create_mae, mae_forward_flops
from prepretrain.models.text import TEXT_SHAPES, text_forward_flops
from prepretrain.models.tokenizers import build_tokenizer
from prepretrain.models.video import VideoViT, video_forward_flops
from prepretrain.models.vit import VIT_SHAPES, create_vit, forward_flops, resolve_name, vit_shape, with_timm_attention
from prepretrain.models.vitdet import ViTDetBackbone, parse_global_blocks, vitdet_flops
from prepretrain.plan import PlanConfig, plan_run
from prepretrain.stages.detect import DetectConfig
from prepretrain.stages.lit import check_tower_names
from prepretrain.stages.video import VideoConfig
from prepretrain.train.distributed import clip_grad_norm_, pick_device
from prepretrain.train.engine import Precision, nonfinite_count, pick_precision
from prepretrain.train.metrics import detect_peak_tflops
from prepretrain.train.optim import build_optimizer, param_groups, step_unless_flagged

STEP_TARGETS = ("mae", "wsp", "finetune", "vit", "video", "detect")


@dataclass
class BenchConfig:
    """``prepretrain bench TARGET key=value ...`` for the model-step targets."""

    target: str = "mae"  # mae | wsp | finetune | vit | video | detect (set by the command)
    model: str = "vit_b16"
    image_size: int = 0  # 0 = the model's own size
    batch_size: int = 0  # 0 = 256 on CUDA, 8 on CPU (detect: 16 / 2)
    precision: str = "auto"  # prepretrain's path: auto = bf16 on CUDA and on CPUs with bf16 instructions, else fp32
    baseline: bool = True  # also time the reference-style baseline
    device: str = "auto"
    steps: int = 0  # timed steps per round; 0 = 10 on CUDA, 3 on CPU
    warmup: int = -1  # untimed steps first; -1 = 3 on CUDA, 1 on CPU
    rounds: int = 1  # the paths alternate this many times; the median round is printed
    compile: str = "auto"  # torch.compile on the prepretrain path: auto = on CUDA (not detect) | true | false
    grad_checkpointing: bool = False
    clip_grad: float = 0.0  # the engine's clip_grad (MAE's recipe has none; WSP/finetune may)
    peak_tflops: float = 0.0  # 0 = detect from the device name
    threads: int = 0  # CPU threads; 0 = torch default
    # mae
    mask_ratio: float = 0.75
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    # wsp / finetune / vit: classes of the head; 0 = 28000 hashtags for wsp, 1000 otherwise
    num_classes: int = 0
    # video (defaults: prepretrain video's)
    num_frames: int = VideoConfig.num_frames
    tubelet_size: int = VideoConfig.tubelet_size
    # detect (defaults: prepretrain detect's; ViTDet: image_size=1024 window_size=14 pyramid_channels=256)
    window_size: int = DetectConfig.window_size
    global_blocks: str = DetectConfig.global_blocks
    pyramid_channels: int = DetectConfig.pyramid_channels
    objects_per_image: int = 4

    # Every numeric key this class defines, with its interval (config.check_bounds).
    bounds = {
        "image_size": ">= 0", "batch_size": ">= 0", "steps": ">= 0", "warmup": ">= -1", "rounds": "> 0",
        "clip_grad": ">= 0", "peak_tflops": ">= 0", "threads": ">= 0", "mask_ratio": "(0, 1)",
        "decoder_embed_dim": "> 0", "decoder_depth": "> 0", "decoder_num_heads": "> 0", "num_classes": ">= 0",
        "num_frames": "> 0", "tubelet_size": "> 0", "window_size": ">= 0", "pyramid_channels": "> 0",
        "objects_per_image": "> 0",
    }
    choices = {"target": STEP_TARGETS, "compile": Choices(("auto", "true", "false"), any_case=True),
               "precision": ("auto", "bf16", "fp16", "fp32")}

    def validate(self) -> None:
        try:
            resolve_name(self.model)
        except ValueError as error:
            raise ConfigError("model", str(error)) from None
        if self.target == "video" and self.num_frames % self.tubelet_size:
            raise ConfigError("tubelet_size", f"{self.tubelet_size} does not divide num_frames {self.num_frames}")
        if self.target == "detect":
            try:
                parse_global_blocks(self.global_blocks, vit_shape(self.model).depth)
            except ValueError as error:
                raise ConfigError("global_blocks", str(error)) from None


@dataclass
class StepCase:
    """What one target times: a model factory, a batch, the loss of (model, batch), FLOPs."""

    build: Callable[[], nn.Module]
    batch: Any
    loss: Callable[[nn.Module, Any], torch.Tensor]
    flops_per_sample: float  # training FLOPs (0 = not counted)
    batch_size: int
    describe: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------- the two paths
def fast_precision(name: str, device: torch.device) -> Precision:
    """prepretrain's choice: bf16 where the hardware has it (CUDA; CPUs with AVX512-BF16/AMX)."""
    if name == "auto" and device.type == "cpu":
        name = "bf16" if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported() \
            else "fp32"
    return pick_precision(name, device)


def prepretrain_step(model: nn.Module, case: StepCase, device: torch.device, precision: Precision,
                     compile_model: bool, clip_grad: float) -> Callable[[], None]:
    """The engine's step: autocast, fused AdamW that skips a non-finite step on the device, no
    host sync (see ``train.engine.Trainer._update``)."""
    optimizer = build_optimizer(param_groups(model, 0.05), 1e-4, (0.9, 0.95), device)
    called = torch.compile(model) if compile_model else model
    scaler = precision.scaler

    def step() -> None:
        with precision.autocast(device):
            loss = case.loss(called, case.batch)
        bad_loss = (~torch.isfinite(loss.detach().float())).float()
        (scaler.scale(loss) if scaler is not None else loss).backward()
        bad = bad_loss + nonfinite_count(model).to(device)
        if scaler is not None:
            scaler.unscale_(optimizer)
        if clip_grad > 0:
            clip_grad_norm_(list(model.parameters()), clip_grad)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            step_unless_flagged(optimizer, bad)
        optimizer.zero_grad(set_to_none=True)

    return step


def baseline_step(model: nn.Module, case: StepCase, device: torch.device, clip_grad: float) -> Callable[[], None]:
    """The reference implementations' step: fp16 + loss scaler on CUDA (fp32 on CPU), default
    AdamW, no compile, the loss read on the host every step."""
    optimizer = build_optimizer(param_groups(model, 0.05), 1e-4, (0.9, 0.95), device, fused=False)
    cuda = device.type == "cuda"
    scaler = torch.amp.GradScaler("cuda") if cuda else None

    def step() -> None:
        with torch.autocast("cuda", dtype=torch.float16) if cuda else nullcontext():
            loss = case.loss(model, case.batch)
        loss_value = loss.item()
        if not math.isfinite(loss_value):
            raise RuntimeError(f"loss is {loss_value}, stopping training")
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
        else:
            loss.backward()
        if clip_grad > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


# ------------------------------------------------------------------------------ targets
def _defaults(cfg: BenchConfig, device: torch.device) -> tuple[int, int, int, int]:
    cuda = device.type == "cuda"
    batch = cfg.batch_size or ((16 if cuda else 2) if cfg.target == "detect" else (256 if cuda else 8))
    steps = cfg.steps or (10 if cuda else 3)
    warmup = cfg.warmup if cfg.warmup >= 0 else (3 if cuda else 1)
    size = cfg.image_size or VIT_SHAPES[resolve_name(cfg.model)].img_size
    return batch, steps, warmup, size


def step_case(cfg: BenchConfig, device: torch.device) -> StepCase:
    """The model, the random batch and the loss of ``cfg.target``."""
    batch_size, _, _, size = _defaults(cfg, device)
    shape = vit_shape(cfg.model, img_size=size)
    images = torch.randn(batch_size, 3, size, size, device=device)
    target = cfg.target
    if target == "mae":
        def build() -> nn.Module:
            return create_mae(cfg.model, img_size=size, decoder_embed_dim=cfg.decoder_embed_dim,
                              decoder_depth=cfg.decoder_depth, decoder_num_heads=cfg.decoder_num_heads)

        flops = 3 * mae_forward_flops(shape, cfg.mask_ratio, cfg.decoder_embed_dim, cfg.decoder_depth)
        return StepCase(build, images, lambda model, x: model(x, mask_ratio=cfg.mask_ratio)[0], flops, batch_size,
                        {"mask_ratio": cfg.mask_ratio, "decoder": f"{cfg.decoder_depth}x{cfg.decoder_embed_dim}"})
    if target in ("wsp", "finetune", "vit"):
        classes = cfg.num_classes or (28000 if target == "wsp" else 1000)

        def build() -> nn.Module:
            return create_vit(cfg.model, img_size=size, num_classes=classes)

        flops = 3 * (forward_flops(shape) + 2 * shape.embed_dim * classes)
        if target == "wsp":  # up to 8 hashtags per image, -1 padded, the softmax multi-label loss
            tags = torch.randint(0, classes, (batch_size, 8), device=device)
            tags[:, 4:] = -1
            return StepCase(build, (images, tags), lambda model, b: multilabel_loss(model(b[0]).float(), b[1]),
                            flops, batch_size, {"classes": classes})
        labels = torch.randint(0, classes, (batch_size,), device=device)
        return StepCase(build, (images, labels),
                        lambda model, b: nn.functional.cross_entropy(model(b[0]).float(), b[1]), flops, batch_size,
                        {"classes": classes})
    if target == "video":
        clips = torch.randn(batch_size, 3, cfg.num_frames, size, size, device=device)
        labels = torch.randint(0, 400, (batch_size,), device=device)

        def build() -> nn.Module:
            return VideoViT(create_vit(cfg.model, img_size=size, num_classes=400), cfg.num_frames, cfg.tubelet_size)

        tokens = 1 + (cfg.num_frames // cfg.tubelet_size) * (size // shape.patch_size) ** 2
        flops = 3 * video_forward_flops(shape.embed_dim, shape.depth, shape.mlp_dim, tokens,
                                        cfg.tubelet_size * shape.patch_size**2)
        return StepCase(build, (clips, labels),
                        lambda model, b: nn.functional.cross_entropy(model(b[0]).float(), b[1]), flops, batch_size,
                        {"frames": cfg.num_frames, "tubelet": cfg.tubelet_size, "classes": 400})
    # detect: Mask R-CNN over the ViTDet backbone, on random images with random boxes and masks
    global_blocks = parse_global_blocks(cfg.global_blocks, shape.depth)
    defaults = DetectConfig()

    def build() -> nn.Module:
        backbone = ViTDetBackbone(create_vit(cfg.model, img_size=size), cfg.window_size, global_blocks,
                                  out_channels=cfg.pyramid_channels, scale_factors=tuple(defaults.pyramid_scales),
                                  feature_norm=defaults.feature_norm)
        return build_detector(backbone, 80, size, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD,
                              box_head=defaults.box_head, head_dim=defaults.head_dim,
                              box_batch_per_image=defaults.box_batch_per_image)

    generator = torch.Generator().manual_seed(0)
    targets = []
    for _ in range(batch_size):
        corner = torch.rand(cfg.objects_per_image, 2, generator=generator) * size * 0.6
        extent = (torch.rand(cfg.objects_per_image, 2, generator=generator) * 0.35 + 0.05) * size
        boxes = torch.cat([corner, corner + extent], dim=1)
        masks = torch.zeros(cfg.objects_per_image, size, size, dtype=torch.uint8)
        for m, (x0, y0, x1, y1) in enumerate(boxes.round().int().tolist()):
            masks[m, y0:y1, x0:x1] = 1
        targets.append({"boxes": boxes.to(device), "labels": torch.randint(1, 81, (cfg.objects_per_image,),
                                                                            generator=generator).to(device),
                        "masks": masks.to(device)})
    frames = [torch.rand(3, size, size, device=device) for _ in range(batch_size)]
    grid = (size // shape.patch_size,) * 2
    flops = 3 * vitdet_flops(shape.depth, shape.embed_dim, shape.mlp_dim, grid, cfg.window_size, global_blocks)
    return StepCase(build, (frames, targets), lambda model, b: sum(model(b[0], b[1]).values()), flops, batch_size,
                    {"window_size": cfg.window_size, "objects_per_image": cfg.objects_per_image,
                     "flops": "ViT only"})


def run_benchmark(cfg: BenchConfig) -> list[dict[str, Any]]:
    """Time the prepretrain path and (``baseline=true``) the baseline, alternating ``rounds``
    times; one result per path (the median round), the baseline's ratio included."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    batch_size, steps, warmup, size = _defaults(cfg, device)
    case = step_case(cfg, device)
    precision = fast_precision(cfg.precision, device)
    # auto: compile on CUDA, except the detector (torchvision's detection heads have data-dependent shapes)
    compile_model = (device.type == "cuda" and cfg.target != "detect") if str(cfg.compile).lower() == "auto" \
        else str(cfg.compile).lower() == "true"
    paths: dict[str, Callable[[], None]] = {}
    torch.manual_seed(0)
    ours = case.build().to(device).train()
    if cfg.grad_checkpointing and hasattr(ours, "set_grad_checkpointing"):
        ours.set_grad_checkpointing(True)
    paths["prepretrain"] = prepretrain_step(ours, case, device, precision, compile_model, cfg.clip_grad)
    if cfg.baseline:
        torch.manual_seed(0)
        reference = with_timm_attention(case.build()).to(device).train()
        if cfg.grad_checkpointing and hasattr(reference, "set_grad_checkpointing"):
            reference.set_grad_checkpointing(True)
        paths["baseline"] = baseline_step(reference, case, device, cfg.clip_grad)
    flops = case.flops_per_sample * (4 / 3 if cfg.grad_checkpointing else 1)
    timings = time_paths(paths, steps, warmup, cfg.rounds, device)
    peak = cfg.peak_tflops or detect_peak_tflops(device)
    common = {"target": cfg.target, "model": cfg.model, "image_size": size, "batch_size": batch_size,
              "device": device_name(device), "torch": torch.__version__, **case.describe,
              "train_gflops_per_sample": round(flops / 1e9, 3)}
    planned = planned_memory_gib(cfg, batch_size, size, precision) if device.type == "cuda" else None
    results = []
    for name, (seconds, memory) in timings.items():
        samples_per_s = batch_size * steps / seconds
        tflops = flops * samples_per_s / 1e12
        result = {**common, "path": name,
                  "precision": precision_name(precision) if name == "prepretrain" else
                  ("fp16+scaler" if device.type == "cuda" else "fp32"),
                  "compile": compile_model if name == "prepretrain" else False,
                  "samples_per_s": round(samples_per_s, 3), "step_ms": round(1000 * seconds / steps, 2),
                  "tflops": round(tflops, 4), "mfu": round(tflops / peak, 4) if peak and flops else None,
                  "max_memory_gib": memory}
        if name == "prepretrain" and planned is not None and memory:
            result["plan_memory_gib"] = round(planned, 2)  # prepretrain plan's estimate of the same step
            result["plan_error"] = round(planned / memory - 1, 3)
        results.append(result)
    if len(results) == 2:
        results[0]["vs_baseline"] = round(results[0]["samples_per_s"] / results[1]["samples_per_s"], 3)
        results[1]["vs_baseline"] = 1.0
    return results


def planned_memory_gib(cfg: BenchConfig, batch_size: int, size: int, precision: Precision) -> float | None:
    """``prepretrain plan``'s estimate of the peak memory of this step (no CUDA context reserve),
    for the targets it models; compare with the measured ``max_memory_gib``."""
    stage = {"mae": "mae", "wsp": "wsp", "finetune": "finetune", "vit": "finetune"}.get(cfg.target)
    if stage is None:
        return None
    plan = plan_run(PlanConfig(
        model=cfg.model, stage=stage, gpus=1, strategy="none", batch_size=batch_size, image_size=size,
        precision=precision_name(precision), grad_checkpointing=cfg.grad_checkpointing, reserved_gib=0.0,
        mask_ratio=cfg.mask_ratio, decoder_embed_dim=cfg.decoder_embed_dim, decoder_depth=cfg.decoder_depth,
        decoder_num_heads=cfg.decoder_num_heads,
        num_classes=cfg.num_classes or (28000 if cfg.target == "wsp" else 1000)))
    return plan["total_gib"]


def time_paths(paths: dict[str, Callable[[], None]], steps: int, warmup: int, rounds: int,
               device: torch.device) -> dict[str, tuple[float, float | None]]:
    """Seconds for ``steps`` steps of each path (median over rounds, paths alternating) and the
    peak device memory in GiB (CUDA only)."""
    seconds: dict[str, list[float]] = {name: [] for name in paths}
    memory: dict[str, float | None] = {name: None for name in paths}
    for _ in range(rounds):
        for name, step in paths.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            seconds[name].append(steps / steps_per_second(step, steps, warmup, device))
            if device.type == "cuda":
                memory[name] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return {name: (statistics.median(values), memory[name]) for name, values in seconds.items()}


def steps_per_second(step: Callable[[], None], steps: int, warmup: int, device: torch.device) -> float:
    """The one timed loop of the benchmarks: ``warmup`` untimed calls, then ``steps`` timed ones,
    with the device synchronised at both ends so queued GPU work is counted."""
    for _ in range(warmup):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return steps / (time.perf_counter() - start)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()}"


def precision_name(precision: Precision) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}[precision.dtype]


def print_step_results(results: list[dict[str, Any]]) -> None:
    """A table (path, samples/s, TFLOP/s, MFU, memory, ratio), then one JSON line per path."""
    first = results[0]
    print(f"{first['target']} {first['model']} @ {first['image_size']} px, batch {first['batch_size']}, "
          f"{first['device']}, torch {first['torch']}")
    print(f"{'path':<12} {'precision':<12} {'samples/s':>10} {'step ms':>9} {'TFLOP/s':>9} {'MFU':>7} "
          f"{'mem GiB':>8} {'vs baseline':>12}")
    for r in results:
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        memory = f"{r['max_memory_gib']:.2f}" if r["max_memory_gib"] is not None else "-"
        ratio = f"{r['vs_baseline']:.2f}x" if "vs_baseline" in r else "-"
        print(f"{r['path']:<12} {r['precision']:<12} {r['samples_per_s']:>10.2f} {r['step_ms']:>9.1f} "
              f"{r['tflops']:>9.3f} {mfu:>7} {memory:>8} {ratio:>12}")
    for r in results:
        print(json.dumps(r))


# ------------------------------------------------------------------------------- LiT


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

    # Every numeric key this class defines, with its interval (config.check_bounds).
    bounds = {
        "vision_depth": ">= 0", "image_size": "> 0", "max_text_tokens": ">= 0", "batch_size": "> 0", "steps": "> 0",
        "warmup": ">= 0", "threads": ">= 0",
    }

    def validate(self) -> None:
        check_tower_names(self.model, self.text_model)


def run_lit_benchmark(cfg: LiTBenchConfig) -> dict[str, Any]:
    """Time full optimizer steps both ways on random inputs already on the device.

    Uncached (the baseline): the locked tower encodes the images every step; cached: the step
    starts from stored features. Both paths do identical text-tower work, so the ratio is what
    caching saves in the model step (decoding and augmenting images, also skipped, are not counted).
    """
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

    uncached = steps_per_second(lambda: step(False), cfg.steps, cfg.warmup, device)
    cached = steps_per_second(lambda: step(True), cfg.steps, cfg.warmup, device)
    shape = model.text_encoder.shape
    vision = vit_shape(cfg.model, img_size=cfg.image_size, depth=cfg.vision_depth or None)
    text_train = 3 * text_forward_flops(shape, tokenizer.context_length)
    return {
        "benchmark": "lit_feature_cache",
        "device": device_name(device),
        "precision": precision_name(precision),
        "image_tower": cfg.model, "image_size": cfg.image_size, "text_tower": cfg.text_model,
        "text_tokens": tokenizer.context_length, "batch_size": cfg.batch_size,
        "uncached_steps_per_s": float(f"{uncached:.4g}"), "cached_steps_per_s": float(f"{cached:.4g}"),
        "speedup": round(cached / uncached, 2),
        "flops_ratio": round((text_train + forward_flops(vision)) / text_train, 2),
    }


def print_lit_benchmark(result: dict[str, Any]) -> None:
    """Side by side: steps/s with images through the locked tower (baseline), and from cached features."""
    print(f"{'path':<22} {'steps/s':>9} {'samples/s':>10}")
    for name, label in (("uncached", "baseline (uncached)"), ("cached", "prepretrain (cached)")):
        rate = result[f"{name}_steps_per_s"]
        print(f"{label:<22} {rate:>9.2f} {rate * result['batch_size']:>10.1f}")
    print(f"speedup {result['speedup']:.2f}x (FLOPs ratio {result['flops_ratio']:.2f}x) on {result['device']}, "
          f"{result['image_tower']}@{result['image_size']} + {result['text_tower']} x {result['text_tokens']} tokens, "
          f"batch {result['batch_size']}")
    print(json.dumps(result))


# ------------------------------------------------------------------------ end to end

# What the baseline changes in a stage's own config: the Pillow + torchvision input path, no
# compile, and the reference precision (fp16 with a loss scaler on CUDA, fp32 on CPU).
END_TO_END_STAGES = ("mae", "wsp", "finetune", "video", "detect", "lit")


class StageRunFailed(RuntimeError):
    """An ``--end-to-end`` run exited non-zero; ``code`` is its exit status."""

    def __init__(self, code: int, message: str):
        super().__init__(message)
        self.code = code


def baseline_overrides(stage: str, cuda: bool) -> list[str]:
    decode = [] if stage in ("video", "lit") else ["decode=pil"]
    return [*decode, "compile=false", f"precision={'fp16' if cuda else 'fp32'}"]


def run_end_to_end(stage: str, overrides: list[str], out_dir: str = "", baseline: bool = True,
                   python: str = sys.executable) -> list[dict[str, Any]]:
    """Run ``prepretrain STAGE overrides...`` (the real stage on its real data) and, with
    ``baseline``, the same with :func:`baseline_overrides`; figures from each run's metrics.jsonl
    (the median of the logged windows after the first, which holds start-up and compilation)."""
    if stage not in END_TO_END_STAGES:
        raise ConfigError("target", f"--end-to-end runs one of {', '.join(END_TO_END_STAGES)}")
    root = Path(out_dir) if out_dir else Path(tempfile.mkdtemp(prefix="prepretrain_bench_"))
    cuda = any(o == "device=cuda" for o in overrides) or (
        not any(o.startswith("device=") for o in overrides) and torch.cuda.is_available())
    runs = {"prepretrain": []}
    if baseline:
        runs["baseline"] = baseline_overrides(stage, cuda)
    results = []
    for name, extra in runs.items():
        run_dir = root / name
        command = [python, "-m", "prepretrain.cli", stage, *overrides, *extra, f"out_dir={run_dir}", "resume=false",
                   "progress=false"]
        print("$", " ".join(command[2:]), flush=True)
        run_dir.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(command, capture_output=True, text=True)
        (run_dir / "output.log").write_text(done.stdout + done.stderr)
        if done.returncode != 0:
            lines = (done.stdout + done.stderr).strip().splitlines()
            raise StageRunFailed(done.returncode, f"the {name} run of '{stage}' failed (exit {done.returncode}, "
                                                  f"output in {run_dir / 'output.log'}): {lines[-1] if lines else ''}")
        results.append({"target": stage, "path": name, "end_to_end": True, "out_dir": str(run_dir),
                        "overrides": " ".join([*overrides, *extra]), **logged_throughput(run_dir / "metrics.jsonl")})
    if len(results) == 2 and results[1]["samples_per_s"]:
        results[0]["vs_baseline"] = round(results[0]["samples_per_s"] / results[1]["samples_per_s"], 3)
        results[1]["vs_baseline"] = 1.0
    return results


def logged_throughput(metrics: Path) -> dict[str, Any]:
    """Median samples/s, TFLOP/s and MFU of the training records after the first."""
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    records = [r for r in records if "samples_per_s" in r]
    steady = records[1:] or records
    if not steady:
        raise RuntimeError(f"{metrics} holds no training records (set steps and log_every so that a few are logged)")

    def median(key: str) -> float | None:
        values = [r[key] for r in steady if r.get(key) is not None]
        return round(statistics.median(values), 4) if values else None

    return {"samples_per_s": median("samples_per_s"), "tflops": median("tflops"), "mfu": median("mfu"),
            "windows": len(steady), "final_loss": records[-1].get("loss") if records else None}


def print_end_to_end(results: list[dict[str, Any]]) -> None:
    print(f"{'path':<12} {'samples/s':>10} {'TFLOP/s':>9} {'MFU':>7} {'vs baseline':>12}  overrides")
    for r in results:
        mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
        tflops = f"{r['tflops']:.3f}" if r.get("tflops") is not None else "-"
        ratio = f"{r['vs_baseline']:.2f}x" if "vs_baseline" in r else "-"
        print(f"{r['path']:<12} {r['samples_per_s']:>10.2f} {tflops:>9} {mfu:>7} {ratio:>12}  {r['overrides']}")
    for r in results:
        print(json.dumps(r))

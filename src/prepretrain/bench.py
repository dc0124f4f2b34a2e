"""Throughput benchmarks that print figures: samples/s, achieved TFLOP/s and MFU; LiT cached vs not.

FLOPs come from the analytic formula of REFERENCE.md section 7 (training = 3 x forward), so
MFU figures are comparable with the paper's cost model. Inputs are random tensors already on
the device: this measures the model step, not the data pipeline (see ``bench data``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .config import ConfigError
from .models.clip import build_clip, clip_loss
from .models.mae import create_mae, mae_forward_flops
from .models.text import TEXT_SHAPES, text_forward_flops
from .models.tokenizers import build_tokenizer
from .models.vit import VIT_SHAPES, create_vit, forward_flops, resolve_name, vit_shape
from .stages.lit import check_tower_names
from .train.distributed import pick_device
from .train.engine import pick_precision
from .train.metrics import detect_peak_tflops
from .train.optim import build_optimizer, param_groups


@dataclass
class BenchConfig:
    model: str = "vit_b16"
    target: str = "mae"  # mae | vit (supervised ViT step, e.g. WSP/finetune)
    image_size: int = 0  # 0 = the model's own size
    batch_size: int = 32
    precision: str = "auto"
    device: str = "auto"
    steps: int = 10
    warmup: int = 3
    mask_ratio: float = 0.75
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    num_classes: int = 1000
    compile: bool = False
    grad_checkpointing: bool = False
    peak_tflops: float = 0.0  # 0 = detect from the device name
    threads: int = 0  # CPU threads; 0 = torch default

    def validate(self) -> None:
        if self.target not in ("mae", "vit"):
            raise ConfigError("target", "must be mae or vit")
        for key in ("batch_size", "steps"):
            if getattr(self, key) <= 0:
                raise ConfigError(key, "must be > 0")
        try:
            resolve_name(self.model)
        except ValueError as error:
            raise ConfigError("model", str(error)) from None


def run_benchmark(cfg: BenchConfig) -> dict:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = pick_device(cfg.device)
    precision = pick_precision(cfg.precision, device)
    size = cfg.image_size or VIT_SHAPES[resolve_name(cfg.model)].img_size
    torch.manual_seed(0)
    if cfg.target == "mae":
        model = create_mae(cfg.model, img_size=size, decoder_embed_dim=cfg.decoder_embed_dim,
                           decoder_depth=cfg.decoder_depth, decoder_num_heads=cfg.decoder_num_heads)
        flops = 3 * mae_forward_flops(model.shape, cfg.mask_ratio, cfg.decoder_embed_dim, cfg.decoder_depth)
    else:
        model = create_vit(cfg.model, img_size=size, num_classes=cfg.num_classes)
        flops = 3 * forward_flops(model.prepretrain_shape) + 3 * 2 * model.embed_dim * cfg.num_classes
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
        flops *= 4 / 3
    model.to(device).train()
    optimizer = build_optimizer(param_groups(model, 0.05), 1e-4, (0.9, 0.95), device)
    step_fn = torch.compile(model) if cfg.compile else model
    images = torch.randn(cfg.batch_size, 3, size, size, device=device)
    labels = torch.randint(0, cfg.num_classes, (cfg.batch_size,), device=device)

    def step() -> None:
        with precision.autocast(device):
            if cfg.target == "mae":
                loss = step_fn(images, mask_ratio=cfg.mask_ratio)[0]
            else:
                loss = torch.nn.functional.cross_entropy(step_fn(images).float(), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    elapsed = cfg.steps / steps_per_second(step, cfg.steps, cfg.warmup, device)
    samples_per_s = cfg.batch_size * cfg.steps / elapsed
    tflops = flops * samples_per_s / 1e12
    peak = cfg.peak_tflops or detect_peak_tflops(device)
    result = {
        "target": cfg.target, "model": cfg.model, "image_size": size, "batch_size": cfg.batch_size,
        "precision": cfg.precision if cfg.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()}",
        "compile": cfg.compile, "grad_checkpointing": cfg.grad_checkpointing,
        "train_gflops_per_sample": round(flops / 1e9, 2),
        "samples_per_s": round(samples_per_s, 2), "step_ms": round(1000 * elapsed / cfg.steps, 1),
        "tflops": round(tflops, 3), "mfu": round(tflops / peak, 4) if peak else None,
    }
    if device.type == "cuda":
        result["max_memory_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return result


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


def print_result(result: dict) -> None:
    print(json.dumps(result))


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
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()}",
        "precision": cfg.precision if cfg.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32"),
        "image_tower": cfg.model, "image_size": cfg.image_size, "text_tower": cfg.text_model,
        "text_tokens": tokenizer.context_length, "batch_size": cfg.batch_size,
        "uncached_steps_per_s": float(f"{uncached:.4g}"), "cached_steps_per_s": float(f"{cached:.4g}"),
        "speedup": round(cached / uncached, 2),
        "flops_ratio": round((text_train + forward_flops(vision)) / text_train, 2),
    }


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

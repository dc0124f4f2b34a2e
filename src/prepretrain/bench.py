"""Throughput benchmarks that print figures: samples/s, achieved TFLOP/s and MFU.

FLOPs come from the analytic formula of REFERENCE.md section 7 (training = 3 x forward), so
MFU figures are comparable with the paper's cost model. Inputs are random tensors already on
the device: this measures the model step, not the data pipeline (see ``bench data``).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass

import torch

from .config import ConfigError
from .models.mae import create_mae, mae_forward_flops
from .models.vit import VIT_SHAPES, create_vit, forward_flops, resolve_name
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

    for _ in range(cfg.warmup):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(cfg.steps):
        step()
    _sync(device)
    elapsed = time.perf_counter() - start
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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def print_result(result: dict) -> None:
    print(json.dumps(result))

"""The one training loop every stage uses.

A stage (``prepretrain.stages``) only declares what it trains: the model, the data, the loss
and what to evaluate and export. This loop owns *how*: devices and precision, distributed
wrapping, the optimizer and schedule, accumulation, clipping, the non-finite guard, logging,
checkpoints and exact resume.
"""

from __future__ import annotations

import json
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from ..config import TrainConfig, dump_config
from ..data.loader import SampleStream, train_loader
from ..data.records import SkipCounter
from .checkpoint import Checkpointer, load_training_state, save_training_state
from .distributed import (
    DistInfo,
    all_reduce_sum,
    barrier,
    clip_grad_norm_,
    consolidated_model,
    init_distributed,
    is_distributed,
    report_failure,
    resolve_strategy,
    sync_replicated_grads,
    wrap_model,
)
from .metrics import MetricsLogger, detect_peak_tflops, plot_curves
from .optim import build_optimizer, lr_at, param_groups, set_lr


class NonFiniteLoss(RuntimeError):
    """Too many consecutive non-finite losses: the run stops instead of saving NaN weights."""


class TooManyBadSamples(RuntimeError):
    """More of the data is unreadable than ``max_bad_fraction`` allows."""


@dataclass
class TrainData:
    """What a stage hands the loop: a dataset of transformed samples and how to sample it."""

    dataset: Dataset
    num_samples: int
    weights: torch.Tensor | None = None  # per-sample draw weights (WSP resampling)
    epoch_size: int | None = None  # samples per epoch when drawing with weights
    # Runs on each collated micro-batch on the training device before the loss, as
    # ``device_transform(batch, device, seed=, position=)`` (``data.pixels.DeviceAugment``: decode=gpu).
    device_transform: Callable[..., dict[str, Any]] | None = None


class Stage(ABC):
    """Base class of the training stages: override what the stage builds, nothing else."""

    name = "stage"

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg

    @abstractmethod
    def build_model(self) -> nn.Module:
        """Declared by each stage."""

    @abstractmethod
    def train_data(self) -> TrainData:
        """Declared by each stage."""

    @abstractmethod
    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        """Declared by each stage."""

    def param_groups(self, model: nn.Module) -> list[dict]:
        return param_groups(model, self.cfg.weight_decay)

    def evaluate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        return {}

    def finish(self, model: nn.Module, run_dir: Path, device: torch.device) -> dict[str, Any]:
        """Export weights and pictures; returns results to merge into results.json."""
        return {}

    def flops_per_sample(self) -> float:
        """Training FLOPs per sample (forward x 3), for TFLOP/s and MFU; 0 when unknown."""
        return 0.0

    def after_step(self, model: nn.Module, step: int) -> None:  # noqa: B027 - an optional hook
        """Called after each optimizer step that was taken (``step`` = steps done), e.g. to update a weight EMA."""


@dataclass
class Precision:
    dtype: torch.dtype | None  # autocast dtype, None = fp32
    scaler: torch.amp.GradScaler | None = None

    def autocast(self, device: torch.device):
        if self.dtype is None:
            return nullcontext()
        return torch.autocast(device.type, dtype=self.dtype)


def pick_precision(name: str, device: torch.device) -> Precision:
    if name == "auto":
        name = "bf16" if device.type == "cuda" else "fp32"
    if name == "bf16":
        return Precision(torch.bfloat16)
    if name == "fp16":
        if device.type != "cuda":
            raise ValueError("precision=fp16 needs CUDA (use bf16 or fp32 on CPU)")
        return Precision(torch.float16, torch.amp.GradScaler("cuda"))
    return Precision(None)


@dataclass
class RunStats:
    skips: SkipCounter = field(default_factory=SkipCounter)
    nonfinite_streak: int = 0
    nonfinite_total: int = 0


def default_out_dir(cfg: TrainConfig, stage_name: str) -> Path:
    return Path(cfg.out_dir or f"runs/{stage_name}")


def schedule_lengths(cfg: TrainConfig, epoch_size: int) -> tuple[int, int]:
    """(total optimizer steps, warmup steps) from steps/epochs and warmup settings."""
    steps = cfg.steps or max(1, math.ceil(cfg.epochs * epoch_size / cfg.batch_size))
    if cfg.warmup_steps >= 0:
        warmup = cfg.warmup_steps
    else:
        warmup = round(cfg.warmup_epochs * epoch_size / cfg.batch_size)
    return steps, min(warmup, steps)


def train(stage: Stage) -> dict[str, Any]:
    """Run (or resume) ``stage`` to the end; returns the results written to results.json.

    Under torchrun an exception on any rank is printed with the rank number and tears the
    process group down, so the other ranks fail promptly instead of hanging in a collective.
    """
    cfg = stage.cfg
    info, device = init_distributed(cfg.device, cfg.dist_timeout_s, cfg.strategy)
    try:
        return _train(stage, info, device)
    except BaseException as error:
        if info.enabled or is_distributed():
            report_failure(info, error)
        raise


def _train(stage: Stage, info: DistInfo, device: torch.device) -> dict[str, Any]:
    cfg = stage.cfg
    run_dir = default_out_dir(cfg, stage.name)
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(dump_config(cfg))
    barrier()
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    precision = pick_precision(cfg.precision, device)

    micro = cfg.micro_batch_size or cfg.batch_size // info.world_size
    if micro <= 0 or cfg.batch_size % (micro * info.world_size):
        raise ValueError(
            f"batch_size {cfg.batch_size} must be a multiple of micro_batch_size {micro} x {info.world_size} ranks"
        )
    accum = cfg.batch_size // (micro * info.world_size)

    model = stage.build_model().to(device)
    if cfg.grad_checkpointing and hasattr(model, "set_grad_checkpointing"):
        model.set_grad_checkpointing(True)
    strategy = resolve_strategy(cfg.strategy, info, device, sum(p.numel() for p in model.parameters()))
    if strategy == "fsdp" and precision.scaler is not None:
        raise ValueError("precision=fp16 is not supported with strategy=fsdp; use precision=bf16")
    # FSDP2 shards `model` in place (and replaces its parameters: build the optimizer after this);
    # DDP wraps it. `model` stays the module whose state dict is the checkpoint.
    trained = wrap_model(model, strategy, info, device, param_dtype=precision.dtype if strategy == "fsdp" else None,
                         compile_blocks=cfg.compile and strategy == "fsdp")
    if cfg.compile and strategy != "fsdp":
        trained = torch.compile(trained)
    if info.enabled:
        torch.manual_seed(cfg.seed + info.rank)  # per-rank streams (drop-path); per-sample draws come from the loader
    data = stage.train_data()
    epoch_size = data.epoch_size or data.num_samples
    total_steps, warmup_steps = schedule_lengths(cfg, epoch_size)
    optimizer = build_optimizer(stage.param_groups(model), cfg.peak_lr, cfg.betas, device)

    checkpointer = Checkpointer(run_dir, cfg.keep_last)
    start_step = 0
    latest = checkpointer.latest() if cfg.resume else None
    if latest is not None:
        restored = load_training_state(latest, model, optimizer, rank=info.rank, world_size=info.world_size,
                                       distributed=is_distributed(), seed=cfg.seed)
        if precision.scaler is not None and restored["scaler"]:
            precision.scaler.load_state_dict(restored["scaler"])
        start_step = restored["step"]
        if info.is_main:
            print(f"[{stage.name}] resuming from {latest} at step {start_step}/{total_steps}", flush=True)

    logger = MetricsLogger(run_dir, enabled=info.is_main, tensorboard=cfg.tensorboard)
    logger.truncate_after(start_step)
    stream = SampleStream(
        data.num_samples, micro, seed=cfg.seed, rank=info.rank, world_size=info.world_size,
        start_position=start_step * cfg.batch_size, weights=data.weights, epoch_size=data.epoch_size,
    )
    loader = iter(train_loader(data.dataset, stream, cfg.num_workers, pin_memory=device.type == "cuda"))
    stats = RunStats()
    flops = stage.flops_per_sample()
    peak = detect_peak_tflops(device)
    progress = _progress(cfg, info.is_main, start_step, total_steps, stage.name)
    window_samples, window_start = 0, time.perf_counter()
    last_loss = float("nan")

    for step in range(start_step, total_steps):
        lr = lr_at(step, total_steps, warmup_steps, cfg.peak_lr, cfg.min_lr)
        set_lr(optimizer, lr)
        step_loss = torch.zeros((), device=device)
        step_metrics: dict[str, float] = {}
        finite = True
        for micro_step in range(accum):
            batch = next(loader)
            if data.device_transform is not None:
                position = step * cfg.batch_size + (micro_step * info.world_size + info.rank) * micro
                batch = data.device_transform(batch, device, seed=cfg.seed, position=position)
            _count_skips(stats.skips, batch, cfg.max_bad_fraction, info.rank)
            batch = {
                k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()
            }
            sync = nullcontext()
            if micro_step < accum - 1 and hasattr(trained, "no_sync"):
                sync = trained.no_sync()
            with sync, precision.autocast(device):
                loss, metrics = stage.loss(trained, batch)
            finite = finite and bool(torch.isfinite(loss.detach()))
            scaled = loss / accum
            if precision.scaler is not None:
                scaled = precision.scaler.scale(scaled)
            scaled.backward()
            step_loss += loss.detach() / accum
            for key, value in metrics.items():
                step_metrics[key] = step_metrics.get(key, 0.0) + float(value) / accum
            window_samples += batch.get("_seen", micro)
        sync_replicated_grads(model)
        finite_flag = all_reduce_sum(torch.tensor(0.0 if finite else 1.0, device=device))
        grad_norm = None
        if finite_flag.item() == 0:
            if precision.scaler is not None:
                precision.scaler.unscale_(optimizer)
            if cfg.clip_grad > 0:
                grad_norm = clip_grad_norm_(list(model.parameters()), cfg.clip_grad)
            if precision.scaler is not None:
                precision.scaler.step(optimizer)
                precision.scaler.update()
            else:
                optimizer.step()
            stage.after_step(model, step + 1)
            stats.nonfinite_streak = 0
        else:
            stats.nonfinite_streak += 1
            stats.nonfinite_total += 1
            if info.is_main:
                print(f"[{stage.name}] step {step}: non-finite loss, step skipped "
                      f"({stats.nonfinite_streak} in a row)", flush=True)
            if stats.nonfinite_streak > cfg.max_nonfinite:
                raise NonFiniteLoss(
                    f"{stats.nonfinite_streak} consecutive non-finite losses at step {step}; stopping without "
                    "saving. Try precision=bf16 (fp16 overflows), a lower lr/blr, or clip_grad=1.0."
                )
        optimizer.zero_grad(set_to_none=True)
        loss_value = all_reduce_sum(step_loss.clone()).item() / info.world_size
        last_loss = loss_value
        done = step + 1
        progress.update(1)

        if done % cfg.log_every == 0 or done == total_steps or done == start_step + 1:
            elapsed = max(time.perf_counter() - window_start, 1e-9)
            samples_per_s = window_samples * info.world_size / elapsed
            record = {
                "loss": loss_value, "lr": lr, "samples_per_s": samples_per_s,
                "epoch": done * cfg.batch_size / epoch_size, **step_metrics,
            }
            if grad_norm is not None:
                record["grad_norm"] = float(grad_norm)
            if flops:
                record["tflops"] = flops * samples_per_s / 1e12 / max(info.world_size, 1)
                if peak:
                    record["mfu"] = record["tflops"] / peak
            if stats.skips.total_skipped:
                record["skipped"] = stats.skips.total_skipped
            logger.log(done, record)
            progress.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", sps=f"{samples_per_s:.0f}")
            window_samples, window_start = 0, time.perf_counter()

        if cfg.eval_every and done % cfg.eval_every == 0 and done != total_steps:
            _evaluate(stage, model, device, logger, done)

        if done % cfg.ckpt_every == 0 or done == total_steps:
            _save(checkpointer, info, model, optimizer, precision, done)

    progress.close()
    eval_metrics = _evaluate(stage, model, device, logger, total_steps)
    results: dict[str, Any] = {}
    export_model = consolidated_model(model, stage.build_model, info)  # collective under FSDP
    if info.is_main:
        export_device = device if export_model is model else torch.device("cpu")
        with torch.random.fork_rng(devices=[]):
            results = stage.finish(export_model, run_dir, export_device) or {}
        plot_curves(run_dir / "metrics.jsonl", run_dir / "loss_curve.png", ("loss", "lr"), title=stage.name)
        results = {
            "stage": stage.name,
            "steps": total_steps,
            "final_loss": last_loss,
            "samples_seen": total_steps * cfg.batch_size,
            "skipped": stats.skips.as_dict(),
            "nonfinite_steps": stats.nonfinite_total,
            **eval_metrics,
            **results,
        }
        (run_dir / "results.json").write_text(json.dumps(results, indent=2))
        if stats.skips.total_skipped:
            print(f"[{stage.name}] skipped {stats.skips.total_skipped} unreadable samples: "
                  f"{dict(stats.skips.skipped)}", flush=True)
    logger.close()
    barrier()
    return results


def _evaluate(stage: Stage, model: nn.Module, device: torch.device, logger: MetricsLogger, step: int) -> dict:
    """Evaluations run on the unwrapped model without touching the training RNG stream."""
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        was_training = model.training
        model.eval()
        metrics = stage.evaluate(model, device)
        model.train(was_training)
    if metrics:
        logger.log(step, metrics)
    return metrics


def _save(checkpointer: Checkpointer, info, model: nn.Module, optimizer, precision: Precision, step: int) -> None:
    """A file from one process; a sharded DCP folder, written by every rank, under a process group."""
    scaler_state = precision.scaler.state_dict() if precision.scaler is not None else {}
    distributed = is_distributed()
    if distributed or info.is_main:
        save_training_state(checkpointer, step, model, optimizer, scaler_state, rank=info.rank, distributed=distributed)
    barrier()


def _count_skips(skips: SkipCounter, batch: dict[str, Any], max_bad_fraction: float, rank: int = 0) -> None:
    from ..data.records import BadSample

    bad = batch.pop("_skipped", [])
    seen = batch.get("_seen", 0)
    for reason, key in bad:
        skips.skip(BadSample(key, reason))
    skips.seen += seen - len(bad)
    if seen and len(bad) == seen:
        # Nothing to compute a loss on. Under several ranks this error ends the whole job
        # (train() tears the process group down) rather than leaving the others in a collective.
        examples = ", ".join(f"{r}: {k}" for r, k in bad[:5])
        raise TooManyBadSamples(f"rank {rank}: all {seen} samples of a micro-batch were unreadable ({examples})")
    if skips.seen >= 50 and skips.bad_fraction > max_bad_fraction:
        examples = ", ".join(f"{r}: {k}" for r, k in list(skips.examples.items())[:5])
        raise TooManyBadSamples(
            f"{skips.total_skipped} of {skips.seen} samples unreadable ({skips.bad_fraction:.1%} > "
            f"max_bad_fraction {max_bad_fraction:.1%}); examples: {examples}"
        )


def _progress(cfg: TrainConfig, enabled: bool, start: int, total: int, name: str):
    if enabled and cfg.progress:
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=start, desc=name, unit="step", dynamic_ncols=True)

    class _Silent:
        def update(self, n: int) -> None: ...
        def set_postfix(self, **kw: Any) -> None: ...
        def close(self) -> None: ...

    return _Silent()

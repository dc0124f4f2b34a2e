"""The one training loop every stage uses.

A stage (``prepretrain.stages``) only declares what it trains: the model, the data, the loss
and what to evaluate and export. This loop owns *how*: devices and precision, distributed
wrapping, the optimizer and schedule, accumulation, clipping, the non-finite guard, logging,
checkpoints, the best checkpoint, and exact resume. It creates the :class:`~.run.Run` that
every hook receives, so stages never compute their run directory, rank or resume state.

:func:`train` reads top to bottom: ``Trainer.setup`` builds everything, each iteration is
``step``, ``settle`` when due, then ``log``, evaluations and checkpoints at their intervals, then
``finish``.

The step never waits for the device: the loss, the metrics and the per-step flags (non-finite
loss or gradients, stop requests) stay device tensors, a flagged step is skipped on the device by
the fused AdamW, and ``settle`` reads the flags of all steps since the last read in one sync
(before every log record, evaluation and checkpoint, and at least every ``SETTLE_EVERY`` steps).
"""

from __future__ import annotations

import math
import pickle
import signal
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from ..config import ConfigError, TrainConfig, dump_config, resume_step
from ..data.loader import SampleStream, train_loader
from ..data.records import BadSample, SkipCounter
from .checkpoint import (
    Checkpointer,
    CorruptCheckpoint,
    SuspectCheckpoint,
    checkpoint_step,
    load_training_state,
    rewind_advice,
    save_training_state,
)
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
from .frozen import FrozenInputs, compute_frozen_inputs
from .limits import NonFiniteLoss, TooManyBadSamples, check_bad_fraction
from .metrics import MetricsLogger, detect_peak_tflops, plot_metrics, progress_bar, read_metrics
from .optim import build_optimizer, lr_at, param_groups, set_lr, step_unless_flagged
from .run import Run


@dataclass
class TrainData:
    """What a stage hands the loop: a dataset of transformed samples and how to sample it."""

    dataset: Dataset
    num_samples: int
    weights: torch.Tensor | None = None  # per-sample draw weights (WSP resampling)
    epoch_size: int | None = None  # samples per epoch when drawing with weights
    # Runs on each collated micro-batch on the training device before the loss, as
    # ``device_transform(batch, device, seed=, position=)`` (``data.images.pixels.DeviceAugment``: decode=gpu).
    device_transform: Callable[..., dict[str, Any]] | None = None
    # Inputs that a frozen part of the model turns into features once, before the first step
    # (LiT's locked image tower): the loop computes or reloads them and trains from memory.
    frozen: FrozenInputs | None = None


class Stage(ABC):
    """Base class of the training stages: override what the stage builds, nothing else.

    Every hook that needs run context receives the :class:`Run` (directory, rank, resume
    state, device, atomic writers, loggers). ``select_on`` names an evaluation metric (higher
    is better) by which the loop keeps the best weights (``best_weights``) as ``best.safetensors``.
    """

    name = "stage"
    select_on: str = ""
    # True when the loss compares the samples of a step with each other (LiT's contrastive loss).
    # Such a stage implements ``embed`` and ``loss_of_embeddings`` instead of ``loss``: with
    # gradient accumulation the loop then embeds every micro-batch of the step without a graph,
    # and recomputes one micro-batch at a time with its graph, so the loss always spans the
    # global batch (open_clip's accum-freq) instead of shrinking to a micro-batch.
    whole_batch_loss: bool = False

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg

    @abstractmethod
    def build_model(self, run: Run) -> nn.Module:
        """The model to train (weights loaded from ``init``/``encoder`` files as configured)."""

    @abstractmethod
    def train_data(self, run: Run) -> TrainData:
        """The training samples and how to draw them."""

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        """(loss, metrics to log) of one micro-batch. Metrics may be floats or 0-d tensors; tensors
        (detached) keep the step free of host syncs: the loop reads them when it logs."""
        if not self.whole_batch_loss:
            raise TypeError(f"{type(self).__name__} must define loss()")
        return self.loss_of_embeddings([self.embed(model, batch)], live=0)

    def embed(self, model: nn.Module, batch: dict[str, Any]) -> Any:
        """Whole-batch stages: what one micro-batch contributes to the loss (e.g. its embeddings)."""
        raise TypeError(f"{type(self).__name__} declares whole_batch_loss but defines no embed()")

    def loss_of_embeddings(self, embedded: list[Any], live: int) -> tuple[torch.Tensor, dict[str, float]]:
        """Whole-batch stages: (loss of the whole step, metrics) from every micro-batch's
        ``embed`` output, of which only ``embedded[live]`` carries a graph. Summed over ``live``,
        the gradients must equal those of the loss of the whole batch (each part counted once)."""
        raise TypeError(f"{type(self).__name__} declares whole_batch_loss but defines no loss_of_embeddings()")

    def param_groups(self, model: nn.Module) -> list[dict]:
        return param_groups(model, self.cfg.weight_decay)

    def evaluate(self, model: nn.Module, run: Run) -> dict[str, float]:
        """Metrics of the model at the end of the run (and, unless :meth:`evaluate_during_training`
        says otherwise, every ``eval_every`` steps); called on every rank."""
        return {}

    def evaluate_during_training(self, model: nn.Module, run: Run) -> dict[str, float]:
        """The ``eval_every`` evaluation: by default the final one; a stage whose full evaluation is
        costly (video's multi-view test) returns just what it selects on (``select_on``)."""
        return self.evaluate(model, run)

    def after_run(self, results: dict[str, Any], run: Run) -> dict[str, Any]:
        """Called on every rank once the run is finished and results.json written (``results`` is
        empty off the writing rank): work that needs the finished run on every rank, such as a
        companion run (video's single-frame baseline) or testing the best checkpoint. Returns
        results to add to results.json (the writing rank adds them)."""
        return {}

    def best_weights(self, model: nn.Module, run: Run) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """(state dict, metadata) saved when ``select_on`` improves; called on every rank."""
        return run.full_state_dict(model), {}

    def finish(self, model: nn.Module, run: Run) -> dict[str, Any]:
        """Export weights and pictures (on the writing rank); returns results for results.json."""
        return {}

    def flops_per_sample(self) -> float:
        """Training FLOPs per sample (forward x 3), for TFLOP/s and MFU; 0 when unknown."""
        return 0.0

    def after_step(self, model: nn.Module, step: int) -> None:  # noqa: B027 - an optional hook
        """Called after each optimizer step that was taken (``step`` = steps done), e.g. to update a weight EMA."""

    def uses_after_step(self, model: nn.Module) -> bool:
        """Whether :meth:`after_step` does anything for ``model``. When it does, the host reads each
        step's verdict before going on (the hook must see applied steps only); by default, when a
        stage overrides the hook."""
        return type(self).after_step is not Stage.after_step


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
        trainer = Trainer.setup(stage, info, device)
        with StopSignals() as stop:
            for step in range(trainer.start_step, trainer.total_steps):
                outcome = trainer.step(step, stop)
                stop_now = trainer.settle() if trainer.settle_due(step + 1, outcome) else False
                trainer.log(step + 1, outcome)
                trainer.evaluate_and_save(step + 1)
                if stop_now and step + 1 < trainer.total_steps:  # at the last step: just finish
                    trainer.stop_for_signal(step + 1, stop.name)
        return trainer.finish()
    except Preempted:
        raise  # every rank stops at the same step boundary, after the same checkpoint
    except BaseException as error:
        if info.enabled or is_distributed():
            report_failure(info, error)
        raise


# The host reads the step flags (skipped steps, stop requests) at least this often; between
# reads the device runs ahead of the host (see Trainer.settle).
SETTLE_EVERY = 10


@dataclass
class StepOutcome:
    loss: torch.Tensor  # 0-d on the device: the step's mean loss over micro-batches and ranks
    lr: float
    metrics: dict[str, torch.Tensor | float]
    grad_norm: torch.Tensor | None
    stop: bool = False  # this (only) process received SIGTERM/SIGUSR1: settle, checkpoint and exit


class Preempted(RuntimeError):
    """The run was asked to stop (SIGTERM/SIGUSR1/SIGUSR2) and saved a checkpoint at a step boundary;
    ``signal_name`` says which signal (empty: one that reached another rank)."""

    def __init__(self, message: str, signal_name: str = "") -> None:
        super().__init__(message)
        self.signal_name = signal_name


class StopSignals:
    """While active, SIGTERM and SIGUSR1 (what SLURM and cloud preemption send) and SIGUSR2
    (submitit's notice before a job's time limit) only set a flag: the loop checkpoints at the next
    step boundary, on every rank, and exits cleanly."""

    SIGNALS = ("SIGTERM", "SIGUSR1", "SIGUSR2")

    def __init__(self) -> None:
        self.requested = False
        self.name = ""
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: Any) -> None:
        self.requested = True
        self.name = signal.Signals(signum).name

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                number = getattr(signal, name, None)
                if number is not None:
                    self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)


@dataclass
class Trainer:
    """Everything one training run holds between steps (built by :meth:`setup`)."""

    stage: Stage
    cfg: TrainConfig
    info: DistInfo
    run: Run
    model: nn.Module  # the module whose state dict is the checkpoint (sharded in place under FSDP)
    trained: nn.Module  # what the step calls: ``model``, DDP-wrapped or compiled
    precision: Precision
    data: TrainData
    optimizer: torch.optim.Optimizer
    loader: Any
    micro: int
    accum: int
    epoch_size: int
    total_steps: int
    warmup_steps: int
    start_step: int
    skips: SkipCounter = field(default_factory=SkipCounter)
    nonfinite_streak: int = 0
    nonfinite_total: int = 0
    spike_total: int = 0  # steps skipped as loss spikes (finite, but far above the recent median)
    pending_flags: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (step, flags) not yet read
    loss_history: torch.Tensor | None = None  # the losses of the last spike_window applied steps (on the device)
    steps_run: int = 0  # steps this run has run, resumes included (the spike guard waits for half a window)
    # Checkpoint health: a bad step opens an episode (the checkpoint before it is marked suspect; the ones
    # written while it is open are suspect); spike_window good steps in a row close it (marks cleared).
    episode_from: int = -1  # step of the open episode's first bad step; -1: none open
    good_since_bad: int = 0  # good steps in a row since the open episode's last bad step
    stop_agreed: bool = False  # some rank asked to stop (read from the flags)
    last_loss: torch.Tensor | float = float("nan")
    window_samples: int = 0
    window_start: float = field(default_factory=time.perf_counter)
    progress: Any = None
    flops: float = 0.0
    peak_tflops: float | None = None

    @classmethod
    def setup(cls, stage: Stage, info: DistInfo, device: torch.device) -> Trainer:
        """Run directory, model (wrapped for the strategy), data, optimizer, resumed state, loggers."""
        cfg = stage.cfg
        run = Run.of_stage(stage, device=device, rank=info.rank, world_size=info.world_size)
        if run.is_main:
            run.dir.mkdir(parents=True, exist_ok=True)
            for leftover in run.checkpointer.clean_temporaries():
                run.print(f"removed {leftover}, left by an interrupted write")
        run.write_text("config.yaml", dump_config(cfg))
        barrier()
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        precision = pick_precision(cfg.precision, device)
        micro = cfg.micro_batch_size or cfg.batch_size // info.world_size
        if micro <= 0 or cfg.batch_size % (micro * info.world_size):
            raise ValueError(
                f"batch_size {cfg.batch_size} must be a multiple of micro_batch_size {micro} x {info.world_size} ranks"
            )
        accum = cfg.batch_size // (micro * info.world_size)
        model = stage.build_model(run).to(device)
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
            torch.manual_seed(cfg.seed + info.rank)  # per-rank streams (drop-path); per-sample draws: the loader
        data = stage.train_data(run)
        if data.frozen is not None:
            data.dataset, data.num_samples = compute_frozen_inputs(run, model, data.frozen, cfg.num_workers,
                                                                   cfg.max_bad_fraction)
        epoch_size = data.epoch_size or data.num_samples
        total_steps, warmup_steps = schedule_lengths(cfg, epoch_size)
        optimizer = build_optimizer(stage.param_groups(model), cfg.peak_lr, cfg.betas, device)
        start_step, guard = cls._resume(run, model, optimizer, precision, cfg.seed, resume_step(cfg.resume_from))
        if start_step:
            run.print(f"resuming from {run.checkpointer.latest()} at step {start_step}/{total_steps}")
        run.logger = MetricsLogger(run.dir, enabled=run.is_main, tensorboard=cfg.tensorboard, wandb=cfg.wandb,
                                   wandb_mode=cfg.wandb_mode, run_name=run.dir.name, config=cfg)
        run.logger.truncate_after(start_step)
        run.best = run.read_best()
        run.forget_best()
        stream = SampleStream(
            data.num_samples, micro, seed=cfg.seed, rank=info.rank, world_size=info.world_size,
            start_position=start_step * cfg.batch_size, weights=data.weights, epoch_size=data.epoch_size,
        )
        loader = iter(train_loader(data.dataset, stream, cfg.num_workers, pin_memory=device.type == "cuda"))
        trainer = cls(stage, cfg, info, run, model, trained, precision, data, optimizer, loader, micro, accum,
                      epoch_size, total_steps, warmup_steps, start_step,
                      progress=progress_bar(run.is_main and cfg.progress, start_step, total_steps, stage.name),
                      flops=stage.flops_per_sample(), peak_tflops=detect_peak_tflops(device))
        trainer.restore_guard(guard)
        return trainer

    @staticmethod
    def _resume(run: Run, model: nn.Module, optimizer: torch.optim.Optimizer, precision: Precision,
                seed: int, from_step: int | None = None) -> tuple[int, dict[str, Any] | None]:
        """Restore model, optimizer, scaler and RNG from the newest good checkpoint (or the one at
        ``from_step``: the later ones are set aside as ``rewound-*``); returns its step (0: none) and
        the loss-spike guard saved with it. A damaged checkpoint is named, set aside, and the next
        older one is used; a suspect newest one (written while the run diverged) is resumed only
        when ``resume_from`` names it."""
        if not run.resuming:
            if from_step is not None:
                raise ConfigError("resume_from", f"no checkpoint in {run.checkpointer.dir} to resume from")
            return 0, None
        checkpointer = run.checkpointer
        newest = checkpointer.latest()
        if from_step is None and newest is not None and checkpointer.diverged(newest):
            raise SuspectCheckpoint(
                f"not resuming {newest}: it is suspect, {checkpointer.suspect_reason(newest)}; "
                f"{rewind_advice(checkpointer)}, or resume_from=step_{checkpoint_step(newest)} to go on from it anyway")
        if from_step is not None:
            steps = [checkpoint_step(path) for path in checkpointer.all()]
            if from_step not in steps:
                raise ConfigError("resume_from", f"no checkpoint at step {from_step} in {checkpointer.dir}; there are "
                                                 f"steps {', '.join(map(str, steps))}")
            barrier()
            if run.is_main:
                for path in checkpointer.all():
                    if checkpoint_step(path) > from_step:
                        aside = checkpointer.set_aside(path, prefix="rewound")
                        run.print(f"resume_from=step_{from_step}: {path.name} set aside as {aside.name}")
            barrier()
        for candidate in reversed(checkpointer.all()):
            try:
                # Checksums first: every rank reaches the same verdict, so all fall back together.
                checkpointer.verify(candidate, rank=run.rank, world_size=run.world_size, device=run.device)
            except CorruptCheckpoint as error:
                barrier()
                if run.is_main:
                    aside = checkpointer.set_aside(candidate)
                    run.print(f"{candidate} cannot be read ({str(error).splitlines()[0][:200]}); moved to "
                              f"{aside.name}, trying the previous checkpoint")
                barrier()
                continue
            try:
                restored = load_training_state(candidate, model, optimizer, rank=run.rank,
                                               world_size=run.world_size, distributed=is_distributed(), seed=seed)
            except (CorruptCheckpoint, RuntimeError, EOFError, OSError, KeyError, pickle.UnpicklingError) as error:
                if is_distributed():  # a rank's load failed where the others' may not have: no agreed fallback
                    raise CorruptCheckpoint(f"cannot resume from {candidate}: {error}") from None
                aside = checkpointer.set_aside(candidate)
                run.print(f"{candidate} cannot be read ({str(error).splitlines()[0][:200]}); moved to {aside.name}, "
                          "trying the previous checkpoint")
                continue
            if precision.scaler is not None and restored["scaler"]:
                precision.scaler.load_state_dict(restored["scaler"])
            return restored["step"], restored["guard"]
        raise CorruptCheckpoint(f"no readable checkpoint in {checkpointer.dir}: every one was damaged (set aside "
                                "as corrupt-*); pass resume=false to start over")

    # ------------------------------------------------------------------------------ a step
    def step(self, step: int, stop: StopSignals | None = None) -> StepOutcome:
        """One optimizer step: ``accum`` micro-batches forward/backward, then clip and update.

        Nothing here waits for the device: the loss, the metrics and the flags (non-finite loss or
        gradients, stop requests) stay tensors until :meth:`settle` reads them, and a step with a
        non-finite value is skipped on the device (see :meth:`_update`)."""
        cfg, device, precision = self.cfg, self.run.device, self.precision
        lr = lr_at(step, self.total_steps, self.warmup_steps, cfg.peak_lr, cfg.min_lr, schedule=cfg.lr_schedule,
                   decay_at=tuple(cfg.lr_decay_at), decay_rate=cfg.lr_decay_rate)
        set_lr(self.optimizer, lr)
        step_loss = torch.zeros((), device=device)
        nonfinite_loss = torch.zeros((), device=device)
        step_metrics: dict[str, torch.Tensor | float] = {}
        # A whole-batch loss over accumulated micro-batches: embed all of them first, no graph.
        whole = self.stage.whole_batch_loss and self.accum > 1
        batches = [self._next_batch(step, j) for j in range(self.accum)] if whole else []
        if whole:
            with torch.no_grad(), precision.autocast(device):
                embedded = [self.stage.embed(self.trained, batch) for batch in batches]
        for micro_step in range(self.accum):
            batch = batches[micro_step] if whole else self._next_batch(step, micro_step)
            sync = nullcontext()
            if micro_step < self.accum - 1 and hasattr(self.trained, "no_sync"):
                sync = self.trained.no_sync()
            with sync, precision.autocast(device):
                if whole:  # this micro-batch again, with its graph; the loss spans the whole step
                    live = [*embedded[:micro_step], self.stage.embed(self.trained, batch), *embedded[micro_step + 1:]]
                    loss, metrics = self.stage.loss_of_embeddings(live, micro_step)
                else:
                    loss, metrics = self.stage.loss(self.trained, batch)
            nonfinite_loss += (~torch.isfinite(loss.detach().float())).float()
            # Micro-batch losses are averaged; a whole-batch loss is the same value each time and
            # its per-slot gradients add up to the whole batch's.
            scaled = loss if whole else loss / self.accum
            if precision.scaler is not None:
                scaled = precision.scaler.scale(scaled)
            scaled.backward()
            step_loss += loss.detach().float() / self.accum
            for key, value in metrics.items():
                value = value.detach().float() if isinstance(value, torch.Tensor) else float(value)
                step_metrics[key] = step_metrics.get(key, 0.0) + value / self.accum
            self.window_samples += batch.get("_seen", self.micro)
        # Under several ranks a stop request counts once the all-reduced flags are read (settle).
        stop_requested = stop is not None and stop.requested
        grad_norm = self._update(step, nonfinite_loss, stop_requested, step_loss)
        self.optimizer.zero_grad(set_to_none=True)
        self.last_loss = all_reduce_sum(step_loss) / self.info.world_size
        return StepOutcome(self.last_loss, lr, step_metrics, grad_norm, stop_requested and self.info.world_size == 1)

    def _next_batch(self, step: int, micro_step: int) -> dict[str, Any]:
        batch = next(self.loader)
        if self.data.device_transform is not None:
            position = step * self.cfg.batch_size + (micro_step * self.info.world_size + self.info.rank) * self.micro
            batch = self.data.device_transform(batch, self.run.device, seed=self.cfg.seed, position=position)
        self._count_skips(batch)
        return {k: (v.to(self.run.device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
                for k, v in batch.items()}

    @cached_property
    def reads_flags_each_step(self) -> bool:
        """Whether the host must know each step's verdict before applying it: fp16's loss scaler
        (it syncs anyway), a stage hook that runs after applied steps only (an EMA), or an
        optimizer that cannot skip a step on the device. Decided once, at the first step."""
        return (self.precision.scaler is not None or self.stage.uses_after_step(self.model)
                or not all(group.get("fused") for group in self.optimizer.param_groups))

    def _update(self, step: int, nonfinite_loss: torch.Tensor, stop_requested: bool,
                step_loss: torch.Tensor | None = None) -> torch.Tensor | None:
        """Apply the step unless some rank's loss or gradients are non-finite or its loss spikes; one
        all-reduce carries those flags and the ranks' stop requests.

        The fused AdamW skips a flagged step on the device (its ``found_inf`` input, as under a
        loss scaler: weights, moments and step counts stay as they were), so the host need not
        wait; :meth:`settle` later counts the skipped steps in order and stops after too many."""
        sync_replicated_grads(self.model)
        device = self.run.device
        spike = self._loss_spike(step_loss) if step_loss is not None else torch.zeros((), device=device)
        flags = all_reduce_sum(torch.stack([
            nonfinite_loss, nonfinite_count(self.model).to(device),
            torch.full((), 1.0 if stop_requested else 0.0, device=device),  # a fill, not a host-to-device copy
            spike,
        ]))
        self._remember_loss(step_loss, flags)
        self.pending_flags.append((step, flags))
        if self.reads_flags_each_step:
            self.settle()
            if self.nonfinite_streak:  # this step was skipped
                return None
        scaler, grad_norm = self.precision.scaler, None
        if scaler is not None:
            scaler.unscale_(self.optimizer)
        if self.cfg.clip_grad > 0:
            grad_norm = clip_grad_norm_(list(self.model.parameters()), self.cfg.clip_grad)
        if scaler is not None:
            scaler.step(self.optimizer)
            scaler.update()
        elif self.reads_flags_each_step:
            self.optimizer.step()
        else:
            step_unless_flagged(self.optimizer, flags[0] + flags[1] + flags[3])
        if self.reads_flags_each_step:
            self.stage.after_step(self.model, step + 1)
        return grad_norm

    def _loss_spike(self, step_loss: torch.Tensor) -> torch.Tensor:
        """1 when this rank's loss is above ``spike_factor`` x the median of the recent applied steps'
        losses (computed on the device: no host sync), else 0; 0 until half a window is in."""
        cfg = self.cfg
        if self.loss_history is None:
            self.loss_history = torch.full((cfg.spike_window,), float("nan"), device=step_loss.device)
        self.steps_run += 1
        if cfg.spike_factor <= 0 or self.steps_run <= max(1, cfg.spike_window // 2):
            return torch.zeros((), device=step_loss.device)
        median = self.loss_history.nanmedian()
        return ((step_loss > cfg.spike_factor * median) & torch.isfinite(median)).float()

    def _remember_loss(self, step_loss: torch.Tensor | None, flags: torch.Tensor) -> None:
        """The loss joins the window only when its step is applied (a skipped spike never raises the median)."""
        if step_loss is None or self.loss_history is None:
            return
        slot = (self.steps_run - 1) % self.loss_history.numel()
        applied = (flags[0] + flags[1] + flags[3]) == 0
        self.loss_history[slot] = torch.where(applied, step_loss.detach().float(), self.loss_history[slot])

    def settle_due(self, done: int, outcome: StepOutcome) -> bool:
        """Whether the host reads the step flags after step ``done``: before anything that needs
        them (a log record, an evaluation, a checkpoint, the end, a stop), and at least every
        ``SETTLE_EVERY`` steps so that a stop request under several ranks waits no longer."""
        cfg = self.cfg
        return (outcome.stop or done % min(cfg.log_every, SETTLE_EVERY) == 0 or done == self.total_steps
                or done == self.start_step + 1 or (cfg.eval_every and done % cfg.eval_every == 0)
                or done % cfg.ckpt_every == 0)

    def settle(self) -> bool:
        """Read the pending step flags (one host sync): count skipped steps in step order, stop
        the run after more than ``max_nonfinite`` in a row; True when some rank asked to stop."""
        if self.pending_flags:
            values = torch.stack([flags for _, flags in self.pending_flags]).tolist()
            steps = [step for step, _ in self.pending_flags]
            self.pending_flags.clear()
            for step, (bad_loss, bad_grads, stop, spike) in zip(steps, values):
                self.stop_agreed = self.stop_agreed or stop > 0
                if not (bad_loss or bad_grads or spike):
                    self.nonfinite_streak = 0
                    self._good_step()
                    continue
                self._bad_step(step)
                self.nonfinite_streak += 1
                self.nonfinite_total += not spike or bool(bad_loss or bad_grads)
                self.spike_total += bool(spike) and not (bad_loss or bad_grads)
                what = ("non-finite loss" if bad_loss else "non-finite gradients" if bad_grads else
                        f"loss spike (above {self.cfg.spike_factor:g}x the median of the last steps)")
                self.run.print(f"step {step}: {what}, step skipped ({self.nonfinite_streak} in a row)")
                if self.nonfinite_streak > self.cfg.max_nonfinite:
                    if self.run.is_main:
                        self.run.checkpointer.mark_diverged()
                    raise NonFiniteLoss(
                        f"{self.nonfinite_streak} consecutive bad steps (last: {what}) at step {step}; stopping "
                        "without saving. Try precision=bf16 (fp16 overflows), a lower lr/blr, or clip_grad=1.0"
                        f"{self.rewind_hint()}."
                    )
        return self.stop_agreed

    # ------------------------------------------------------------------ checkpoint health
    def _bad_step(self, step: int) -> None:
        """A bad step (0-based ``step``): the newest checkpoint before it is suspect, and an episode is open."""
        self.good_since_bad = 0
        if self.episode_from < 0:
            self.episode_from = step
        if self.run.is_main:
            checkpointer = self.run.checkpointer
            before = [path for path in checkpointer.all() if checkpoint_step(path) <= step]
            if before:
                checkpointer.mark_suspect(before[-1], f"bad steps followed it (the first: step {step})")

    def _good_step(self) -> None:
        """A good step; ``spike_window`` of them in a row after a bad step close the episode: the run
        recovered, and the checkpoints marked during it are healthy again."""
        if self.episode_from < 0:
            return
        self.good_since_bad += 1
        if self.good_since_bad >= self.cfg.spike_window:
            self._close_episode()

    def _close_episode(self) -> None:
        if self.episode_from >= 0 and self.run.is_main:
            for path in self.run.checkpointer.suspects():
                self.run.checkpointer.clear_suspect(path)
        self.episode_from, self.good_since_bad = -1, 0

    def guard_state(self) -> dict[str, Any]:
        """What a checkpoint keeps of the loss-spike guard and the bad-step counts (this rank's)."""
        history = self.loss_history.detach().cpu().clone() if self.loss_history is not None else None
        return {"loss_history": history, "steps_run": self.steps_run, "streak": self.nonfinite_streak,
                "episode_from": self.episode_from, "good_since_bad": self.good_since_bad,
                "nonfinite_total": self.nonfinite_total, "spike_total": self.spike_total}

    def restore_guard(self, guard: dict[str, Any] | None) -> None:
        """Resume the guard where the checkpoint left it (an empty window when it holds none)."""
        if not guard:
            return
        history = guard.get("loss_history")
        if history is not None and history.numel() == self.cfg.spike_window:
            self.loss_history = history.to(self.run.device, torch.float32)
            self.steps_run = int(guard.get("steps_run", 0))
        self.nonfinite_streak = int(guard.get("streak", 0))
        self.episode_from = int(guard.get("episode_from", -1))
        self.good_since_bad = int(guard.get("good_since_bad", 0))
        self.nonfinite_total = int(guard.get("nonfinite_total", 0))
        self.spike_total = int(guard.get("spike_total", 0))

    def _count_skips(self, batch: dict[str, Any]) -> None:
        bad = batch.pop("_skipped", [])
        seen = batch.get("_seen", 0)
        for reason, key in bad:
            self.skips.skip(BadSample(key, reason))
        self.skips.seen += seen - len(bad)
        if seen and len(bad) == seen:
            # Nothing to compute a loss on. Under several ranks this error ends the whole job
            # (train() tears the process group down) rather than leaving the others in a collective.
            examples = ", ".join(f"{r}: {k}" for r, k in bad[:5])
            raise TooManyBadSamples(f"rank {self.info.rank}: all {seen} samples of a micro-batch were unreadable "
                                    f"({examples})")
        check_bad_fraction(self.skips, self.cfg.max_bad_fraction)

    # ------------------------------------------------------------------ logging, saving
    def log(self, done: int, outcome: StepOutcome) -> None:
        """Progress every step; a metrics record every ``log_every`` steps (and the first and last)."""
        cfg = self.cfg
        self.progress.update(1)
        if not (done % cfg.log_every == 0 or done == self.total_steps or done == self.start_step + 1):
            return
        elapsed = max(time.perf_counter() - self.window_start, 1e-9)
        samples_per_s = self.window_samples * self.info.world_size / elapsed
        # The flags were settled just before (settle_due), so these reads find the device done.
        record = {"loss": float(outcome.loss), "lr": outcome.lr, "samples_per_s": samples_per_s,
                  "epoch": done * cfg.batch_size / self.epoch_size,
                  **{key: float(value) for key, value in outcome.metrics.items()}}
        if outcome.grad_norm is not None and not self.nonfinite_streak:  # a skipped step has no norm
            record["grad_norm"] = float(outcome.grad_norm)
        if self.flops:
            record["tflops"] = self.flops * samples_per_s / 1e12 / max(self.info.world_size, 1)
            if self.peak_tflops:
                record["mfu"] = record["tflops"] / self.peak_tflops
        if self.skips.total_skipped:
            record["skipped"] = self.skips.total_skipped
        self.run.log(done, record)
        self.progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{outcome.lr:.2e}", sps=f"{samples_per_s:.0f}")
        self.window_samples, self.window_start = 0, time.perf_counter()

    def evaluate_and_save(self, done: int) -> None:
        cfg = self.cfg
        if cfg.eval_every and done % cfg.eval_every == 0 and done != self.total_steps:
            self.evaluate(done, final=False)
        if done % cfg.ckpt_every == 0 or done == self.total_steps:
            self.save(done)

    def evaluate(self, step: int, final: bool = True) -> dict[str, float]:
        """The stage's evaluation on the unwrapped model (``final``: the end-of-run one, else
        ``evaluate_during_training``), without touching the training RNG stream; keeps the best
        weights when the stage selects on a metric."""
        device = self.run.device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            was_training = self.model.training
            self.model.eval()
            evaluate = self.stage.evaluate if final else self.stage.evaluate_during_training
            metrics = evaluate(self.model, self.run)
            self.model.train(was_training)
        self.run.log(step, metrics)
        key = self.stage.select_on
        if key and key in metrics and (not self.run.best or metrics[key] > self.run.best[key]):
            # Every rank has the same metrics (the same images, or shares reduced across ranks), so all
            # take this branch (the gather is collective).
            state, metadata = self.stage.best_weights(self.model, self.run)
            self.run.best = {"step": step, **metrics}
            self.run.save_best(self.run.best, state, metadata)
        return metrics

    def save(self, step: int) -> None:
        """A file from one process; a sharded DCP folder, written by every rank, under a process group.
        Non-finite weights are never written (the last good checkpoint stays the newest)."""
        self.check_weights_finite(step)
        scaler = self.precision.scaler
        distributed = is_distributed()
        suspect = (f"written during bad steps (the first: step {self.episode_from})"
                   if self.episode_from >= 0 else "")
        if distributed or self.run.is_main:
            save_training_state(Checkpointer(self.run.dir, self.cfg.keep_last), step, self.model,
                                self.optimizer, scaler.state_dict() if scaler is not None else {},
                                rank=self.info.rank, distributed=distributed, guard=self.guard_state(),
                                suspect=suspect)
        barrier()

    def check_weights_finite(self, step: int) -> None:
        bad = all_reduce_sum(nonfinite_count(self.model, weights=True).to(self.run.device)).item()
        if bad:
            checkpointer = self.run.checkpointer
            newest = checkpointer.latest()
            if newest is not None and self.run.is_main:  # it led to these weights
                checkpointer.mark_suspect(newest, f"non-finite weights followed it (after step {step})")
                checkpointer.mark_diverged()
            barrier()
            raise NonFiniteLoss(
                f"non-finite weights after step {step}: not saved. Try precision=bf16, a lower lr/blr, or "
                f"clip_grad=1.0{self.rewind_hint()}."
            )

    def rewind_hint(self) -> str:
        """Where to go back to after a divergence: the last known good checkpoint, or how to start afresh."""
        return f"; {rewind_advice(self.run.checkpointer)}"

    def stop_for_signal(self, step: int, name: str) -> None:
        """Checkpoint at this step boundary (unless just done) and raise :class:`Preempted`."""
        if step % self.cfg.ckpt_every and step != self.total_steps:
            self.save(step)
        cause = name or "a signal to another rank"
        self.run.print(f"stopped by {cause} after step {step}; checkpoint saved. Run the same command again to resume.")
        self.progress.close()
        if self.run.logger is not None:
            self.run.logger.close()
        raise Preempted(f"stopped by {cause} after step {step}/{self.total_steps}; rerun to resume", name)

    def finish(self) -> dict[str, Any]:
        """Final evaluation, the stage's exports, loss curve and ``results.json``."""
        run, stage = self.run, self.stage
        self.progress.close()
        eval_metrics = self.evaluate(self.total_steps)
        self.check_weights_finite(self.total_steps)  # no export of non-finite weights
        self._close_episode()  # it ended without diverging: its checkpoints are not suspect
        results: dict[str, Any] = {}
        export_model = consolidated_model(self.model, lambda: stage.build_model(run), self.info)  # collective: FSDP
        if run.is_main:
            export_device = run.device if export_model is self.model else torch.device("cpu")
            with torch.random.fork_rng(devices=[]):
                results = stage.finish(export_model, _on_device(run, export_device)) or {}
            plot_metrics(run.path("metrics.jsonl"), run.path("loss_curve.png"), ("loss", "lr"), title=stage.name)
            final_loss = float(self.last_loss)
            if not isinstance(self.last_loss, torch.Tensor):  # resumed after the last step: none ran here
                logged = [r["loss"] for r in read_metrics(run.path("metrics.jsonl")) if "loss" in r]
                final_loss = float(logged[-1]) if logged else final_loss
            results = {
                "stage": stage.name, "steps": self.total_steps, "final_loss": final_loss,
                "samples_seen": self.total_steps * self.cfg.batch_size, "skipped": self.skips.as_dict(),
                "nonfinite_steps": self.nonfinite_total, "spike_steps": self.spike_total, **eval_metrics, **results,
            }
            run.write_json("results.json", results)
            if self.skips.total_skipped:
                run.print(f"skipped {self.skips.total_skipped} unreadable samples: {self.skips.describe()}")
        run.logger.close()
        barrier()
        extra = stage.after_run(results, run)
        if extra and run.is_main:
            results = {**results, **extra}
            run.write_json("results.json", results)
        barrier()
        return results


def _on_device(run: Run, device: torch.device) -> Run:
    """The run as seen by an export on ``device`` (the CPU copy of an FSDP model)."""
    if device == run.device:
        return run
    return Run(run.dir, device, run.rank, run.world_size, run.resuming, run.name, run.logger, best=run.best)


def nonfinite_count(model: nn.Module, weights: bool = False) -> torch.Tensor:
    """How many gradients (or, with ``weights``, parameters and buffers) hold a NaN or an inf, as
    a 0-d tensor on their device: one fused norm per tensor list, no host sync (under FSDP: this
    rank's shards; the caller all-reduces)."""
    if weights:
        tensors = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
    else:
        tensors = [p.grad for p in model.parameters() if p.grad is not None]
    tensors = [(t.to_local() if hasattr(t, "to_local") else t).detach() for t in tensors]
    if not tensors:
        return torch.zeros(())
    norms = torch.stack([n.float() for n in torch._foreach_norm(tensors)])  # NaN/inf in, NaN/inf out
    return (~torch.isfinite(norms)).sum().float()

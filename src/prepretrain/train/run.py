"""The run: one owner for a run directory, its rank, its resume state and its outputs.

The engine creates one :class:`Run` per training command and hands it to every hook of the
stage, so a stage never works out where it writes, whether it is resuming, or whether this
process is the one that writes. Every artefact goes through the run's atomic writers
(:mod:`prepretrain.files`): a crash mid-write leaves the previous file, never half of one.
The run also owns the loggers: ``metrics.jsonl``, TensorBoard and, when asked, Weights & Biases.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .. import files
from .checkpoint import Checkpointer
from .distributed import Collectives, gathered, is_sharded
from .metrics import MetricsLogger

BEST_FILE, BEST_WEIGHTS = "best.json", "best.safetensors"


@dataclass
class Run:
    """Where a run lives and who writes there.

    ``resuming`` is true when the run continues from a checkpoint in ``dir``; ``is_main`` is true
    on the one process that writes files (rank 0). Writers called on other ranks do nothing, so
    a stage calls them unconditionally.
    """

    dir: Path
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    rank: int = 0
    world_size: int = 1
    resuming: bool = False
    name: str = "run"
    logger: MetricsLogger | None = None
    best: dict[str, Any] = field(default_factory=dict)  # the best evaluation so far (``select_on``)

    @classmethod
    def open(cls, out_dir: str | Path, name: str, *, device: torch.device | None = None, rank: int = 0,
             world_size: int = 1, resume: bool = True) -> Run:
        """The run in ``out_dir``; it resumes when ``resume`` and a complete checkpoint is there."""
        directory = Path(out_dir)
        resuming = resume and Checkpointer(directory).latest() is not None
        return cls(directory, device or torch.device("cpu"), rank, world_size, resuming, name)

    @classmethod
    def of_stage(cls, stage: Any, *, device: torch.device | None = None, rank: int = 0, world_size: int = 1) -> Run:
        """The run of a stage's config: ``out_dir``, or ``runs/<stage name>`` when it is not set.

        The engine makes one per training command; a notebook or test calling a stage's hooks
        directly can make one the same way."""
        cfg = stage.cfg
        return cls.open(cfg.out_dir or f"runs/{stage.name}", stage.name, device=device, rank=rank,
                        world_size=world_size, resume=cfg.resume)

    # ------------------------------------------------------------------------- identity
    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def collectives(self) -> Collectives:
        """This run's processes, for data preparation shared across ranks (a barrier, an array sum)."""
        return Collectives(self.rank, self.world_size, self.device)

    @property
    def checkpointer(self) -> Checkpointer:
        return Checkpointer(self.dir)

    def path(self, name: str) -> Path:
        return self.dir / name

    def print(self, message: str) -> None:
        """A progress line from the writing process, tagged with the run's name."""
        if self.is_main:
            print(f"[{self.name}] {message}", flush=True)

    # -------------------------------------------------------------------------- writing
    def write_json(self, name: str, obj: Any) -> Path:
        path = self.path(name)
        if self.is_main:
            files.write_json(path, obj)
        return path

    def write_text(self, name: str, text: str) -> Path:
        path = self.path(name)
        if self.is_main:
            files.write_text(path, text)
        return path

    def save_weights(self, name: str, state: dict[str, torch.Tensor], metadata: dict[str, Any] | None = None,
                     dtype: torch.dtype | None = None) -> Path:
        """A safetensors file of ``state`` (with string ``metadata``) in the run directory."""
        path = self.path(name)
        if self.is_main:
            files.save_safetensors(path, state, metadata, dtype=dtype)
        return path

    def remove(self, *names: str) -> None:
        if self.is_main:
            for name in names:
                self.path(name).unlink(missing_ok=True)

    # ------------------------------------------------------------------ models and logs
    @contextmanager
    def gathered(self, model: nn.Module) -> Iterator[None]:
        """Inside, the model's own (root) parameters are whole even under FSDP, so submodules
        can be called directly; nothing happens for unsharded models."""
        with gathered(model):
            yield

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The whole state dict of ``model`` on CPU; a collective under FSDP (every rank calls it)."""
        if is_sharded(model):
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return {k: v.detach().cpu() for k, v in model.state_dict().items()}

    def log(self, step: int, values: dict[str, Any]) -> None:
        if self.logger is not None and values:
            self.logger.log(step, values)

    # ------------------------------------------------------------------ best checkpoint
    def read_best(self) -> dict[str, Any]:
        """The record of the best evaluation so far (``best.json``) of a resumed run; {} otherwise."""
        path = self.path(BEST_FILE)
        if self.resuming and path.is_file():
            return json.loads(path.read_text())
        return {}

    def forget_best(self) -> None:
        """A fresh run must not report an older run's best checkpoint."""
        if not self.resuming:
            self.remove(BEST_FILE, BEST_WEIGHTS)

    def save_best(self, record: dict[str, Any], state: dict[str, torch.Tensor], metadata: dict[str, Any]) -> None:
        self.save_weights(BEST_WEIGHTS, state, metadata, dtype=torch.float32)
        self.write_json(BEST_FILE, record)

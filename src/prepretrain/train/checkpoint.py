"""Atomic, rotating training checkpoints that restore a run exactly, on any number of ranks.

Two layouts live side by side in ``run_dir/checkpoints``:

- ``step_XXXXXXXX.pt``: one process. A plain ``torch.save`` of model, optimizer, scaler, RNG
  and step, read back with ``weights_only=True`` so a checkpoint cannot execute code.
- ``step_XXXXXXXX/``: several ranks (DDP or FSDP2). A ``torch.distributed.checkpoint`` (DCP)
  folder: every rank writes its own shards of the model and optimizer (never gathered on one
  rank, so a 6.5B model saves without 100 GB on rank 0), plus ``rng_rankNNNNN.pt`` per rank
  and ``meta.pt`` (step, world size, scaler). DCP re-shards on load, so a run saved on N ranks
  resumes on M ranks, and one process can read it too. ``checksums.json`` records each file's
  size and SHA-256 (as ``step_XXXXXXXX.pt.sha256`` does for a file), checked before loading.

Both are atomic: a file is written under a temporary name and renamed; a folder is written
as ``.step_XXXXXXXX.tmp`` and renamed once every rank has finished, ``meta.pt`` last, so a
crash mid-save leaves the previous checkpoint as the newest complete one. ``export_weights``
turns either layout into one safetensors file for sharing.

Health: a checkpoint is *suspect* when bad steps (non-finite, or loss spikes) followed it before the
next checkpoint, or when it was written while such an episode was open (the training loop decides,
``train/engine.py``). A suspect checkpoint carries a small JSON marker beside it
(``step_XXXXXXXX.pt.suspect.json`` or ``step_XXXXXXXX.suspect.json``, written atomically, before the
checkpoint itself); no marker means healthy. Rotation keeps the newest ``keep_last`` checkpoints *and*
the newest healthy one (the last known good), so a diverging run cannot rotate out the checkpoint
it can go back to; :func:`rewind_advice` is the one sentence that names it. When the run stops on
its bad steps, the markers say ``diverged`` and a plain rerun refuses to resume the newest one.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..files import file_sha256, load_torch, save_safetensors, save_torch, write_errors_as_os_errors, write_text
from ..models.checkpoints import CheckpointMismatch
from ..models.layouts import encoder_from_any

CHECKPOINT_PATTERN = re.compile(r"^step_(\d{8})\.pt$")
SHARDED_PATTERN = re.compile(r"^step_(\d{8})$")
SHARDED_META = "meta.pt"
FOLDER_CHECKSUMS = "checksums.json"  # a DCP folder's files: size and SHA-256 of each
SUSPECT_SUFFIX = ".suspect.json"  # beside a checkpoint: why it cannot be trusted to resume from
MODEL_KEY, OPTIMIZER_KEY = "model", "optimizer"


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_step(path: str | Path) -> int:
    """The optimizer step a checkpoint file or folder was taken after."""
    name = Path(path).name
    match = CHECKPOINT_PATTERN.match(name) or SHARDED_PATTERN.match(name)
    if not match:
        raise ValueError(f"{path} is not a checkpoint (expected step_XXXXXXXX.pt or a step_XXXXXXXX folder)")
    return int(match.group(1))


def is_sharded_checkpoint(path: str | Path) -> bool:
    return Path(path).is_dir()


class Checkpointer:
    """Keeps the newest ``keep_last`` checkpoints (files or DCP folders) in ``run_dir/checkpoints``."""

    def __init__(self, run_dir: str | Path, keep_last: int = 2):
        self.dir = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last

    def all(self) -> list[Path]:
        """Complete checkpoints, oldest first (a folder counts once its ``meta.pt`` exists)."""
        if not self.dir.is_dir():
            return []
        found = []
        for path in self.dir.iterdir():
            if CHECKPOINT_PATTERN.match(path.name) and path.is_file():
                found.append(path)
            elif SHARDED_PATTERN.match(path.name) and (path / SHARDED_META).is_file():
                found.append(path)
        return sorted(found, key=lambda p: (checkpoint_step(p), p.is_dir()))

    def latest(self) -> Path | None:
        found = self.all()
        return found[-1] if found else None

    # ------------------------------------------------------------------ health
    def suspect_reason(self, path: str | Path) -> str:
        """Why a checkpoint is suspect ("" when it is healthy: no marker beside it)."""
        marker = suspect_file(Path(path))
        if not marker.is_file():
            return ""
        try:
            return str(json.loads(marker.read_text()).get("reason", "")) or "marked suspect"
        except (ValueError, OSError):
            return "marked suspect"  # a marker that cannot be read still says: do not trust it

    def is_suspect(self, path: str | Path) -> bool:
        return suspect_file(Path(path)).is_file()

    def mark_suspect(self, path: str | Path, reason: str) -> None:
        """Mark a checkpoint suspect (atomically; idempotent: the first reason is kept)."""
        path = Path(path)
        if not self.is_suspect(path):
            write_text(suspect_file(path), json.dumps({"step": checkpoint_step(path), "reason": reason}) + "\n")

    def mark_diverged(self) -> None:
        """The run stopped on its bad steps: its suspect checkpoints say so, and a plain rerun will not
        resume them (a run stopped by a signal during bad steps, which may yet recover, resumes)."""
        for path in self.suspects():
            marker = suspect_file(path)
            try:
                record = json.loads(marker.read_text())
            except (ValueError, OSError):
                record = {"step": checkpoint_step(path), "reason": "marked suspect"}
            if not record.get("diverged"):
                write_text(marker, json.dumps({**record, "diverged": True}) + "\n")

    def diverged(self, path: str | Path) -> bool:
        """Whether a checkpoint is suspect and its run stopped on the bad steps that made it so."""
        marker = suspect_file(Path(path))
        if not marker.is_file():
            return False
        try:
            return bool(json.loads(marker.read_text()).get("diverged", False))
        except (ValueError, OSError):
            return True

    def clear_suspect(self, path: str | Path) -> None:
        suspect_file(Path(path)).unlink(missing_ok=True)

    def suspects(self) -> list[Path]:
        return [path for path in self.all() if self.is_suspect(path)]

    def last_known_good(self) -> Path | None:
        """The newest healthy checkpoint (none when every one is suspect)."""
        healthy = [path for path in self.all() if not self.is_suspect(path)]
        return healthy[-1] if healthy else None

    def _set_health(self, path: Path, suspect: str) -> None:
        """Before a checkpoint is published: its marker (suspect) or none (a step saved again)."""
        if suspect:
            write_text(suspect_file(path), json.dumps({"step": checkpoint_step(path), "reason": suspect}) + "\n")
        else:
            self.clear_suspect(path)

    def save(self, step: int, state: dict[str, Any], suspect: str = "") -> Path:
        """One-process checkpoint: ``state`` in one file, then its SHA-256 beside it. ``suspect``
        (why it cannot be trusted) is written first, so a crash never leaves it looking healthy."""
        path = self.dir / f"step_{step:08d}.pt"
        self.dir.mkdir(parents=True, exist_ok=True)
        self._set_health(path, suspect)
        save_torch(path, state)
        write_text(checksum_file(path), file_sha256(path) + "\n")
        self.rotate()
        return path

    def verify(self, path: str | Path, rank: int = 0, world_size: int = 1,
               device: torch.device | None = None) -> None:
        """Raise :class:`CorruptCheckpoint` when a file's bytes differ from the checksum saved with it.

        A DCP folder lists every file's size and SHA-256 in ``checksums.json``: every rank checks
        all sizes and hashes its share of the files (file i on rank i mod world size), and the
        ranks agree (one all-reduce) so that all of them raise, or none."""
        path = Path(path)
        if path.is_dir():
            self._verify_folder(path, rank, world_size, device)
            return
        recorded = checksum_file(path)
        if path.is_file() and recorded.is_file():
            expected = recorded.read_text().strip()
            if file_sha256(path) != expected:
                raise CorruptCheckpoint(f"{path}: its bytes do not match the checksum saved with it "
                                        f"({recorded.name}): damaged on disk or in transfer")

    def _verify_folder(self, path: Path, rank: int, world_size: int, device: torch.device | None) -> None:
        from .distributed import all_reduce_sum

        listed = path / FOLDER_CHECKSUMS
        problems: list[str] = []
        if listed.is_file():
            table = json.loads(listed.read_text())
            for number, (name, entry) in enumerate(sorted(table.items())):
                file = path / name
                if not file.is_file() or file.stat().st_size != entry["size"]:
                    problems.append(f"{name} is missing or has the wrong size")
                elif number % world_size == rank and file_sha256(file) != entry["sha256"]:
                    problems.append(f"{name}: its bytes do not match the checksum saved with it")
        elif (path / SHARDED_META).is_file() and any(path.glob("*.distcp")):
            pass  # written before checksums were recorded: loading will tell
        bad = all_reduce_sum(torch.tensor([float(len(problems))], device=device)).item()
        if bad:
            where = problems[0] if problems else "a file checked by another rank"
            raise CorruptCheckpoint(f"{path}: {where} (damaged on disk or in transfer)")

    def set_aside(self, path: str | Path, prefix: str = "corrupt") -> Path:
        """Rename a checkpoint out of the way (damaged, or after the step a run rewinds to): kept for
        inspection, never loaded again."""
        path = Path(path)
        target = path.with_name(f"{prefix}-{path.name}")
        os.replace(path, target)
        checksum_file(path).unlink(missing_ok=True)
        if suspect_file(path).is_file():  # kept with it: why it was suspect
            os.replace(suspect_file(path), suspect_file(target))
        return target

    def clean_temporaries(self) -> list[Path]:
        """Remove what interrupted writes left (``.step_*.tmp`` folders, ``.*.tmp<pid>`` files)."""
        removed = []
        for folder in (self.dir.parent, self.dir):
            if not folder.is_dir():
                continue
            for path in folder.iterdir():
                if path.name.startswith(".") and (".tmp" in path.name or ".old" in path.name):
                    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
                    removed.append(path)
        return removed

    def save_sharded(self, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                     meta: dict[str, Any], rank: int, guard: dict[str, Any] | None = None,
                     suspect: str = "") -> Path:
        """Collective: every rank writes its shards and RNG (with its ``guard``: the loop's per-rank
        loss-spike window); rank 0 then publishes the folder, its health marker first.

        ``meta`` (step, scaler, ...) is written by rank 0 as the completion marker.
        """
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict

        final = self.dir / f"step_{step:08d}"
        tmp = self.dir / f".step_{step:08d}.tmp"
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        model_state, optimizer_state = get_state_dict(model, optimizer)
        with write_errors_as_os_errors(tmp):
            dcp.save({MODEL_KEY: model_state, OPTIMIZER_KEY: optimizer_state}, checkpoint_id=str(tmp))
        save_torch(tmp / f"rng_rank{rank:05d}.pt", {**rng_state(), "guard": guard})
        dist.barrier()
        # Each rank hashes the files it wrote; rank 0 records them all (and DCP's metadata).
        mine = [f for f in tmp.iterdir() if f.name.startswith(f"__{rank}_") or f.name == f"rng_rank{rank:05d}.pt"]
        if rank == 0:
            mine += [f for f in tmp.iterdir() if f.name == ".metadata"]
        hashes: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(hashes, {f.name: {"size": f.stat().st_size, "sha256": file_sha256(f)} for f in mine})
        if rank == 0:
            table = {name: entry for part in hashes for name, entry in part.items()}
            write_text(tmp / FOLDER_CHECKSUMS, json.dumps(table, indent=1, sort_keys=True))
            save_torch(tmp / SHARDED_META,
                       {**meta, "step": step, "world_size": dist.get_world_size(), "format": "dcp"})
            self._set_health(final, suspect)
            _replace_dir(tmp, final)
            self.rotate()
        dist.barrier()
        return final

    def rotate(self) -> None:
        """Delete all but the newest ``keep_last`` checkpoints, never the last known good one."""
        good = self.last_known_good()
        for old in self.all()[: -self.keep_last]:
            if old == good:
                continue
            if old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
            else:
                old.unlink(missing_ok=True)
                checksum_file(old).unlink(missing_ok=True)
            suspect_file(old).unlink(missing_ok=True)

    def load(self, path: str | Path) -> dict[str, Any]:
        """The whole checkpoint in this process: a ``.pt`` file as saved, a DCP folder consolidated.

        A folder gives ``model`` (full tensors), ``step``, ``scaler``, ``world_size`` and rank 0's
        ``rng``; its optimizer shards are left on disk (``load_training_state`` reads them).
        """
        path = Path(path)
        if not path.is_dir():
            return load_torch(path)
        meta = load_torch(path / SHARDED_META)
        state = {**meta, MODEL_KEY: read_model_weights(path)}
        rank0 = path / "rng_rank00000.pt"
        if rank0.exists():
            state["rng"] = load_torch(rank0)
        return state


class CorruptCheckpoint(RuntimeError):
    """A checkpoint that cannot be trusted: truncated, or its bytes differ from its checksum."""


class SuspectCheckpoint(RuntimeError):
    """A plain rerun would resume a checkpoint written while the run diverged."""


def checksum_file(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def suspect_file(path: Path) -> Path:
    """The health marker beside a checkpoint (``step_XXXXXXXX.pt`` or a ``step_XXXXXXXX`` folder)."""
    return path.with_name(path.name + SUSPECT_SUFFIX)


def rewind_advice(checkpointer: Checkpointer) -> str:
    """Where to go back to after a divergence, in one sentence: the last known good checkpoint, or,
    when the run diverged before its first healthy checkpoint, how to start afresh."""
    good = checkpointer.last_known_good()
    if good is not None:
        step = checkpoint_step(good)
        later = [checkpoint_step(path) for path in checkpointer.all() if checkpoint_step(path) > step]
        after = f" (the later ones, steps {', '.join(map(str, later))}, are suspect)" if later else ""
        return (f"the last known good checkpoint is step {step}{after}: rerun with resume_from=step_{step} "
                "and a lower lr/blr")
    return (f"no healthy checkpoint: the run diverged before its first one; start afresh with a lower lr/blr "
            f"and a new out_dir= (or delete {checkpointer.dir})")


def _replace_dir(tmp: Path, final: Path) -> None:
    """Rename ``tmp`` to ``final``; an existing ``final`` (same step saved again) is moved aside first."""
    if final.exists():
        trash = final.with_name(f".{final.name}.old{os.getpid()}")
        os.replace(final, trash)
        os.replace(tmp, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, final)


def training_state(model: nn.Module, optimizer: torch.optim.Optimizer, scaler_state: dict, step: int,
                   guard: dict[str, Any] | None = None) -> dict:
    """What a one-process checkpoint file holds (plain state dicts; ``guard``: the loop's loss-spike
    window and bad-step counts, so a resume judges the next steps as the uninterrupted run would)."""
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler_state,
            "rng": rng_state(), "step": step, "guard": guard}


def save_training_state(checkpointer: Checkpointer, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                        scaler_state: dict, *, rank: int = 0, distributed: bool = False,
                        guard: dict[str, Any] | None = None, suspect: str = "") -> Path | None:
    """A file from one process, a DCP folder from a process group (every rank must call). ``suspect``
    (why, or "" when healthy) is recorded beside it before it is published."""
    if distributed:
        return checkpointer.save_sharded(step, model, optimizer, {"scaler": scaler_state}, rank, guard=guard,
                                         suspect=suspect)
    return checkpointer.save(step, training_state(model, optimizer, scaler_state, step, guard), suspect=suspect)


def load_training_state(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer, *,
                        rank: int = 0, world_size: int = 1, distributed: bool = False,
                        seed: int = 0) -> dict[str, Any]:
    """Restore model, optimizer and RNG from either layout into this run; returns step and scaler.

    Any layout loads into any rank count: a file is read whole on every rank and, under a
    process group, scattered into the (possibly sharded) model; a DCP folder is re-sharded by
    DCP. RNG streams are per rank, so they are restored exactly only when the rank count is
    unchanged; otherwise each rank starts a fresh stream seeded by ``(seed, step, rank)``
    (model, optimizer, schedule and data position are still exact).
    """
    path = Path(path)
    guard = None
    if path.is_dir():
        meta = _load_sharded(path, model, optimizer)
        rng_file = path / f"rng_rank{rank:05d}.pt"
        rng = (load_torch(rng_file)
               if rng_file.exists() and meta.get("world_size") == world_size else None)
        guard = rng.get("guard") if rng is not None else None
    else:
        state = load_torch(path)
        _load_full(state, model, optimizer, distributed)
        meta = {k: v for k, v in state.items() if k not in (MODEL_KEY, OPTIMIZER_KEY)}
        rng = state.get("rng") if world_size == 1 else None
        guard = state.get("guard") if world_size == 1 else None
    step = int(meta["step"])
    if rng is not None:
        set_rng_state(rng)
    else:
        reseed(seed, step, rank)
    # ``guard``: the loss-spike window of this rank (None: saved before it was kept, or another rank count)
    return {"step": step, "scaler": meta.get("scaler") or {}, "world_size": int(meta.get("world_size", 1)),
            "guard": guard}


def reseed(seed: int, step: int, rank: int) -> None:
    """A deterministic fresh RNG stream for ``(seed, step, rank)`` (resume on another rank count)."""
    value = (seed * 1_000_003 + step * 7919 + rank) % (2**63 - 1)
    torch.manual_seed(value)
    random.seed(value)


def _load_full(state: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer, distributed: bool) -> None:
    optimizer_state = state[OPTIMIZER_KEY]
    if not distributed:
        model.load_state_dict(state[MODEL_KEY])
        optimizer.load_state_dict(optimizer_state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(
        model, optimizer, model_state_dict=state[MODEL_KEY],
        optim_state_dict=optimizer_state_by_name(optimizer_state, optimizer, model),
        options=StateDictOptions(full_state_dict=True, strict=True),
    )


def _load_sharded(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optimizer_state = get_state_dict(model, optimizer)  # templates in this run's sharding
    state = {MODEL_KEY: model_state, OPTIMIZER_KEY: optimizer_state}
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message=".*single process.*")
        dcp.load(state, checkpoint_id=str(path))
    set_state_dict(model, optimizer, model_state_dict=state[MODEL_KEY], optim_state_dict=state[OPTIMIZER_KEY])
    return load_torch(path / SHARDED_META)


def optimizer_state_by_name(saved: dict[str, Any], optimizer: torch.optim.Optimizer,
                            model: nn.Module) -> dict[str, Any]:
    """A ``optimizer.state_dict()`` (parameters numbered) re-keyed by parameter name.

    ``set_state_dict`` needs names to place state into DDP or sharded FSDP parameters. The
    numbering follows the optimizer's parameter order, which the same stage rebuilds identically.
    """
    groups = saved["param_groups"]
    if groups and groups[0]["params"] and isinstance(groups[0]["params"][0], str):
        return saved  # already keyed by name
    names = {id(param): name for name, param in model.named_parameters()}
    current = [param for group in optimizer.param_groups for param in group["params"]]
    numbers = [number for group in groups for number in group["params"]]
    if len(numbers) != len(current):

        raise CheckpointMismatch(
            f"checkpoint optimizer has {len(numbers)} parameters, this run's has {len(current)}"
        )
    name_of = {number: names[id(param)] for number, param in zip(numbers, current)}
    return {
        "state": {name_of[number]: value for number, value in saved["state"].items()},
        "param_groups": [{**group, "params": [name_of[n] for n in group["params"]]} for group in groups],
    }


# ---------------------------------------------------------------------------- export
def read_model_weights(checkpoint: str | Path) -> dict[str, torch.Tensor]:
    """Full (consolidated) model weights from a checkpoint file or DCP folder, in one process.

    For a folder only the model's tensors are read (the optimizer's twice-as-large state stays
    on disk), using DCP's own metadata for names and shapes.
    """
    path = Path(checkpoint)
    if not path.is_dir():
        state = load_torch(path)
        return dict(state[MODEL_KEY])
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = FileSystemReader(str(path)).read_metadata()
    prefix = MODEL_KEY + "."
    weights = {
        key[len(prefix):]: torch.empty(entry.size, dtype=entry.properties.dtype)
        for key, entry in metadata.state_dict_metadata.items()
        if key.startswith(prefix) and isinstance(entry, TensorStorageMetadata)
    }
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*single process.*")
        dcp.load({MODEL_KEY: weights}, checkpoint_id=str(path))
    return weights


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint from a run folder, its ``checkpoints`` folder, or the checkpoint itself."""
    path = Path(path)
    if CHECKPOINT_PATTERN.match(path.name) or SHARDED_PATTERN.match(path.name):
        if not path.exists():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        return path
    run_dir = path.parent if path.name == "checkpoints" else path
    latest = Checkpointer(run_dir).latest()
    if latest is None:
        raise FileNotFoundError(f"no checkpoint in {path} (expected checkpoints/step_XXXXXXXX[.pt])")
    return latest


def export_weights(checkpoint: str | Path, out: str | Path, part: str = "model") -> Path:
    """One safetensors file of the consolidated weights; ``part=encoder`` drops an MAE's decoder.

    The encoder of an MAE is key-for-key a timm ViT, so the file loads into later stages and
    into timm; ``part=model`` keeps every key (for an MAE: the official "full" layout).
    """


    if part not in ("model", "encoder"):
        raise ValueError(f"part must be model or encoder, got '{part}'")
    source = resolve_checkpoint(checkpoint)
    weights = read_model_weights(source)
    if part == "encoder":
        weights = encoder_from_any(weights)
    return save_safetensors(out, weights, {"source": str(source), "step": str(checkpoint_step(source)),
                                            "part": part})

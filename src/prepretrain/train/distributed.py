"""torch.distributed set-up and model wrapping: one process, torchrun + DDP, or FSDP2.

Nothing here launches processes: ``torchrun`` does (one process per GPU, any number of
nodes). We read its environment, pick the backend (nccl on CUDA, gloo on CPU), set a
collective timeout so a dead rank ends the job instead of hanging it, and wrap the model as
the config asks:

- ``none``: a plain module (one process);
- ``ddp``: ``DistributedDataParallel``; every rank holds the whole model and optimizer;
- ``fsdp``: FSDP2 (``fully_shard``) on every member of a ``nn.ModuleList`` (the transformer
  blocks of the encoder, decoder or text tower), then on the root, so each rank holds
  ``1 / world_size`` of the parameters, gradients and optimizer state. With precision=bf16
  the blocks compute in bf16 while the sharded fp32 parameters stay the master copy and
  gradients are reduced in fp32;
- ``auto``: ``none`` for one process, else ``ddp`` when the model state fits comfortably on
  one device and ``fsdp`` when it does not.
"""

from __future__ import annotations

import atexit
import datetime
import os
import sys
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

STRATEGIES = ("auto", "none", "ddp", "fsdp")
# AdamW model state per parameter: fp32 weight + fp32 grad + two fp32 moments.
MODEL_STATE_BYTES_PER_PARAM = 16
# ``auto`` shards once the model state would take more than this share of one device.
AUTO_FSDP_MEMORY_SHARE = 0.5


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def pick_device(spec: str, local_rank: int = 0) -> torch.device:
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cuda":
        spec = f"cuda:{local_rank}"
    device = torch.device(spec)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def init_distributed(
    device_spec: str = "auto", timeout_s: float = 600.0, strategy: str = "auto"
) -> tuple[DistInfo, torch.device]:
    """Join the process group when launched by torchrun; otherwise a single process.

    ``strategy=ddp|fsdp`` in a single process also gets a (one-rank) group, so the same
    wrapping and sharded checkpoints can be exercised on one GPU. ``timeout_s`` bounds every
    collective: a rank that died or diverged makes the others fail after that long at most.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_spec, local_rank)
    wants_group = world_size > 1 or strategy in ("ddp", "fsdp")
    if wants_group and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        timeout = datetime.timedelta(seconds=timeout_s)
        kwargs: dict[str, Any] = {"backend": backend, "timeout": timeout}
        if device.type == "cuda":
            kwargs["device_id"] = device  # eager NCCL init: errors surface at start, abort works
        if "MASTER_ADDR" in os.environ:
            dist.init_process_group(**kwargs)
        else:  # plain `python -m ...` with strategy=ddp|fsdp: a one-rank group needs no network
            dist.init_process_group(store=dist.HashStore(), rank=0, world_size=1, **kwargs)
        atexit.register(_destroy_at_exit)
    return DistInfo(rank, world_size, local_rank), device


def _destroy_at_exit() -> None:
    """Leave the group at interpreter exit, every rank together: a rank that tears its gloo pairs
    down while a peer's are still live can kill that peer in C++ ("terminate called without an
    active exception", SIGABRT, seen once on a finished 2-rank CPU run), so they meet at a barrier
    first (bounded by the group's timeout; a failed rank has aborted the group before this)."""
    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        except Exception:  # noqa: BLE001 - leaving anyway: the barrier is only a courtesy to the peers
            pass
        dist.destroy_process_group()


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


class Collectives:
    """This process's place in the job and the two collectives data preparation uses (a barrier and an
    array sum through the run's device); on one process both are free. It fits
    :class:`prepretrain.data.labels.cache.Communicator`, so the data layer needs no torch.distributed."""

    def __init__(self, rank: int, world_size: int, device: torch.device):
        self.rank, self.world_size, self.device = rank, world_size, device

    def barrier(self) -> None:
        barrier()

    def sum(self, values: np.ndarray) -> np.ndarray:
        if self.world_size == 1:
            return values
        tensor = torch.from_numpy(np.ascontiguousarray(values)).to(self.device)
        return all_reduce_sum(tensor).cpu().numpy()


def is_distributed() -> bool:
    """True when a process group exists (checkpoints are then sharded, written by all ranks)."""
    return dist.is_available() and dist.is_initialized()


def resolve_strategy(strategy: str, info: DistInfo, device: torch.device, num_params: int) -> str:
    """The concrete strategy for ``auto``; rejects ``none`` under several ranks (they would diverge)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy '{strategy}'; choose one of {', '.join(STRATEGIES)}")
    if strategy == "none" and info.enabled:
        raise ValueError(
            f"strategy=none trains one process, but {info.world_size} ranks were launched; use ddp or fsdp"
        )
    if strategy != "auto":
        return strategy
    if not info.enabled:
        return "none"
    if device.type == "cuda":
        memory = torch.cuda.get_device_properties(device).total_memory
        if num_params * MODEL_STATE_BYTES_PER_PARAM > AUTO_FSDP_MEMORY_SHARE * memory:
            return "fsdp"
    return "ddp"


def wrap_model(
    model: nn.Module,
    strategy: str,
    info: DistInfo,
    device: torch.device,
    *,
    param_dtype: torch.dtype | None = None,
    compile_blocks: bool = False,
) -> nn.Module:
    """Returns the module the training step calls; FSDP2 shards ``model`` in place.

    ``param_dtype`` (FSDP only) is the dtype blocks compute in; ``compile_blocks`` compiles
    each block before sharding (FSDP's hooks then stay outside the compiled graphs, as
    torchtitan does). Optimizers must be built *after* this call: FSDP2 replaces parameters.
    """
    if strategy == "auto":
        strategy = "ddp" if info.enabled else "none"
    if strategy == "none":
        return model
    if not dist.is_initialized():
        raise RuntimeError(f"strategy={strategy} needs a process group: call init_distributed first")
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        # Bucket views: gradients live in the all-reduce buckets instead of a second copy.
        return DistributedDataParallel(model, device_ids=ids, gradient_as_bucket_view=True)
    if strategy == "fsdp":
        return shard_model(model, param_dtype=param_dtype, compile_blocks=compile_blocks)
    raise ValueError(f"unknown strategy '{strategy}'")


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules FSDP shards one by one: members of every ``nn.ModuleList`` not inside another unit.

    For ViTs these are ``blocks.i`` and ``decoder_blocks.i``; for text towers their layers. A
    unit's parameters are gathered just before it runs and freed after, so peak memory holds
    about two blocks (the running one and the prefetched next one) rather than the model.
    """
    units: list[nn.Module] = []
    unit_ids: set[int] = set()
    inside: set[int] = set()
    for module in model.modules():
        if id(module) in inside:
            continue
        if isinstance(module, nn.ModuleList):
            for child in module:
                if any(True for _ in child.parameters()) and id(child) not in unit_ids:
                    units.append(child)
                    unit_ids.add(id(child))
                    inside.update(id(m) for m in child.modules())
    return units


def shard_model(model: nn.Module, param_dtype: torch.dtype | None = None, compile_blocks: bool = False) -> nn.Module:
    """FSDP2 over the block units, then the root (the stem, norms, heads and tokens)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    # FSDP2 cannot shard 0-d parameters (CLIP's logit_scale, a scalar in the MAWS layout): they
    # stay whole on every rank and sync_replicated_grads averages their gradients.
    scalars = {p for p in model.parameters() if p.ndim == 0}
    for unit in shard_units(model):
        if compile_blocks:
            unit.compile()  # in place: parameter names (and so checkpoints) do not change
        fully_shard(unit, mp_policy=policy, reshard_after_forward=True,
                    ignored_params={p for p in unit.parameters() if p in scalars} or None)
    fully_shard(model, mp_policy=policy, ignored_params=scalars or None)
    model.replicated_params = [p for p in model.parameters() if p in scalars]  # type: ignore[attr-defined]
    return model


def sync_replicated_grads(model: nn.Module) -> None:
    """Average over ranks the gradients of parameters FSDP left unsharded (see ``shard_model``);
    a no-op for other models. Call after the last backward of a step, before clipping."""
    params = [p for p in getattr(model, "replicated_params", []) if p.requires_grad]
    if not params or not (dist.is_available() and dist.is_initialized()):
        return
    world = dist.get_world_size()
    for param in params:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        dist.all_reduce(param.grad, op=dist.ReduceOp.SUM)
        param.grad.div_(world)


@contextmanager
def gathered(model: nn.Module) -> Iterator[None]:
    """Inside: an FSDP2 root's own parameters are whole, so its submodules can be called
    directly (FSDP gathers them only in the root's ``forward``); the blocks gather themselves
    in their own forward hooks. Nothing happens for unsharded models."""
    if not is_sharded(model):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def clip_grad_norm_(parameters: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip the global gradient norm; a plain tensor under DDP and FSDP2 alike.

    With FSDP2 the gradients are DTensor shards: ``torch.nn.utils.clip_grad_norm_`` then
    computes the norm over all shards (a partial reduction) and returns a DTensor, which we
    turn into the plain full value so logging and comparisons see one number on every rank.
    """
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return torch.zeros(())
    sharded = [p for p in params if hasattr(p.grad, "full_tensor")]
    plain = [p for p in params if not hasattr(p.grad, "full_tensor")]
    if sharded and plain:  # FSDP with replicated scalars: torch cannot mix DTensor and Tensor norms
        sharded_norm = torch.nn.utils.get_total_norm([p.grad for p in sharded]).full_tensor()
        plain_norm = torch.nn.utils.get_total_norm([p.grad for p in plain])
        total = torch.linalg.vector_norm(torch.stack([sharded_norm.to(plain_norm.device), plain_norm]))
        # On the device, no host sync: the coefficient is 1 when the norm is within max_norm.
        coefficient = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        grads = [p.grad.to_local() if hasattr(p.grad, "to_local") else p.grad for p in params]
        torch._foreach_mul_(grads, coefficient.to(grads[0].device))
        return total
    total = torch.nn.utils.clip_grad_norm_(params, max_norm)
    full_tensor = getattr(total, "full_tensor", None)
    return full_tensor() if full_tensor is not None else total


def consolidated_model(model: nn.Module, build: Any, info: DistInfo) -> nn.Module | None:
    """An unsharded copy of an FSDP model on rank 0 (CPU), for exports; the model itself otherwise.

    Every rank must call this (gathering the full state is a collective); ranks other than 0
    get ``None`` under FSDP. ``build`` makes a fresh model of the same architecture.
    """
    if not is_sharded(model):
        return unwrap(model)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    state = get_model_state_dict(model, options=options)
    if not info.is_main:
        return None
    with torch.random.fork_rng(devices=[]):
        copy = build()
    copy.load_state_dict(state, strict=True)
    return copy.to("cpu")


def report_failure(info: DistInfo, error: BaseException) -> None:
    """Print the error with its rank, record it for torchrun's summary, then end our collectives.

    Aborting (NCCL) or destroying (gloo) the process group makes the peers' pending collectives
    fail instead of waiting for the timeout; torchrun then stops the remaining workers.
    """
    text = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    print(f"[prepretrain] rank {info.rank}/{info.world_size} failed: {type(error).__name__}: {error}\n{text}",
          file=sys.stderr, flush=True)
    if not (dist.is_available() and dist.is_initialized()):
        return
    if "TORCHELASTIC_ERROR_FILE" in os.environ and isinstance(error, Exception):
        try:
            from torch.distributed.elastic.multiprocessing.errors import ErrorHandler

            ErrorHandler().record_exception(error)
        except Exception:  # reporting must never hide the original error
            pass
    abort_process_group()


def abort_process_group() -> None:
    """Tear the default group down without waiting for peers (they may be stuck in a collective)."""
    try:
        if dist.get_backend() == "nccl":
            from torch.distributed.distributed_c10d import _abort_process_group

            _abort_process_group()
        else:
            dist.destroy_process_group()
    except Exception:
        try:
            dist.destroy_process_group()
        except Exception:  # already gone
            pass


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module under ``torch.compile`` and DDP wrappers (FSDP2 shards in place)."""
    inner = getattr(model, "_orig_mod", model)
    inner = getattr(inner, "module", inner)
    return getattr(inner, "_orig_mod", inner)

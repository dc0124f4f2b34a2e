"""``prepretrain plan``: will this run fit, and what will a step cost? Answered before any GPU is touched.

The model is built on the meta device (no memory), its parameters counted, and memory per
GPU estimated from first principles:

- model state (AdamW): fp32 parameters (they are the master copy; bf16 copies are transient),
  fp32 gradients and two fp32 moments: 4 + 4 + 8 bytes per trainable parameter, divided by the
  number of GPUs under FSDP;
- transient parameter copies: under FSDP the gathered bf16 root and two blocks (running and
  prefetched) plus their unsharded gradients; under DDP/none with bf16 autocast the cached
  bf16 copies of the weights (2 bytes per parameter);
- activations saved for backward, per block and sample (timm ``Block``, fused attention, no
  dropout; N tokens, width D, MLP width M, a heads, e bytes per activation element, r bytes per
  residual-stream element):

      bytes = N * (2 r D + 6 e D + 2 e M + 16 + 4 a)

  2 r D: inputs of the two LayerNorms (the residual stream); 6 e D: LayerNorm-1 output (qkv
  input), q, k, v, attention output (proj input), LayerNorm-2 output (fc1 input); 2 e M: fc1
  output (GELU input) and GELU output (fc2 input); 16 N: LayerNorm means and inverse stds (fp32);
  4 a N: the attention log-sum-exp (fp32). With bf16 autocast e = 2 and r = 4 (the residual
  stream stays fp32); with FSDP bf16 parameters r = 2 too; fp32 has e = r = 4. For ViT-B/16
  (N 197, D 768, M 3072) in bf16 that is 5.5 MB per image and block. The formula equals the
  tensors autograd saves for a timm block, byte for byte (tests/test_plan.py measures it).
  With activation checkpointing only each block's input (r N D) is kept and one block's
  activations are rebuilt at a time during backward. One more block's worth is added as
  backward workspace (activation gradients), plus the stem and head (images, patch tokens,
  logits);
- a fixed reserve (``reserved_gib``) for the CUDA context, NCCL buffers and allocator slack.

FLOPs per step = global batch x (3 x forward FLOPs, 4 x with activation checkpointing), with
the forward FLOPs of ``models.vit.forward_flops`` / ``models.mae.mae_forward_flops``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from .config import ConfigError, check_bounds
from .models.mae import create_mae, mae_forward_flops
from .models.vit import VIT_SHAPES, create_vit, forward_flops, resolve_name, vit_shape
from .train.distributed import AUTO_FSDP_MEMORY_SHARE, MODEL_STATE_BYTES_PER_PARAM

GIB = 2**30
STAGES = ("mae", "wsp", "finetune")
DEFAULT_CLASSES = {"wsp": 28_000, "finetune": 1000}  # IG-3B hashtag vocabulary ~28K; ImageNet-1k
ADAMW_STATE_BYTES = 8  # two fp32 moments per trainable parameter


@dataclass
class PlanConfig:
    """What a run's memory and cost depend on; the global batch follows the training configs."""

    model: str = "vit_b16"
    stage: str = "mae"  # mae | wsp | finetune
    gpus: int = 1
    strategy: str = "auto"  # auto | none | ddp | fsdp
    batch_size: int = 4096  # global batch per optimizer step
    micro_batch_size: int = 0  # per GPU per forward; 0 = batch_size / gpus (no accumulation)
    image_size: int = 0  # 0 = the model's own resolution
    precision: str = "bf16"  # bf16 | fp16 | fp32
    grad_checkpointing: bool = False
    gpu_memory_gib: float = 80.0
    reserved_gib: float = 3.0  # CUDA context, NCCL buffers, allocator fragmentation
    mask_ratio: float = 0.75
    decoder_embed_dim: int = 512
    decoder_depth: int = 8
    decoder_num_heads: int = 16
    num_classes: int = 0  # 0 = the stage's default (wsp 28000 hashtags, finetune 1000)
    peak_tflops: float = 989.0  # dense bf16 peak of one GPU (H100 SXM)
    assumed_mfu: float = 0.4  # for the step-time estimate

    # Every numeric key this class defines, with its interval (config.check_bounds).
    bounds = {
        "gpus": "> 0", "batch_size": "> 0", "micro_batch_size": ">= 0", "image_size": ">= 0", "gpu_memory_gib": "> 0",
        "reserved_gib": ">= 0", "mask_ratio": "(0, 1)", "decoder_embed_dim": "> 0", "decoder_depth": "> 0",
        "decoder_num_heads": "> 0", "num_classes": ">= 0", "peak_tflops": "> 0", "assumed_mfu": "(0, 1]",
    }
    choices = {"stage": STAGES, "strategy": ("auto", "none", "ddp", "fsdp"), "precision": ("bf16", "fp16", "fp32")}

    def validate(self) -> None:

        try:
            shape = VIT_SHAPES[resolve_name(self.model)]
        except ValueError as error:
            raise ConfigError("model", str(error)) from None
        if self.strategy == "none" and self.gpus > 1:
            raise ConfigError("strategy", "none trains one process; use ddp or fsdp with gpus > 1")
        micro = self.micro_batch_size or self.batch_size // self.gpus
        if micro <= 0 or self.batch_size % (micro * self.gpus):
            raise ConfigError("batch_size", f"{self.batch_size} is not a multiple of micro_batch_size {micro} x "
                                            f"{self.gpus} GPUs")
        if (self.image_size or shape.img_size) % shape.patch_size:
            raise ConfigError("image_size", f"must be a multiple of the patch size {shape.patch_size}")


def block_activation_bytes(tokens: int, dim: int, mlp_dim: int, heads: int, act_bytes: int,
                           residual_bytes: int) -> int:
    """Bytes one transformer block saves for backward per sample (formula in the module docstring)."""
    return tokens * (2 * residual_bytes * dim + 6 * act_bytes * dim + 2 * act_bytes * mlp_dim + 16 + 4 * heads)


def plan_config_from(cfg: Any) -> PlanConfig:
    """A plan for a stage config (MAEConfig, WSPConfig, ...): what the pipeline's dry run needs."""
    if isinstance(cfg, PlanConfig):
        return cfg
    import torch

    precision = getattr(cfg, "precision", "auto")
    if precision == "auto":
        on_gpu = getattr(cfg, "device", "auto") != "cpu" and torch.cuda.is_available()
        precision = "bf16" if on_gpu else "fp32"
    gpus = int(getattr(cfg, "gpus", 0) or os.environ.get("WORLD_SIZE", "1"))
    memory = 80.0
    if torch.cuda.is_available():
        memory = torch.cuda.get_device_properties(0).total_memory / GIB
    stage = getattr(cfg, "stage_name", "mae")
    values = {
        "model": getattr(cfg, "model", "vit_b16"),
        "stage": stage if stage in STAGES else "finetune",
        "gpus": gpus,
        "strategy": getattr(cfg, "strategy", "auto") if gpus > 1 else "none",
        "batch_size": cfg.batch_size,
        "micro_batch_size": getattr(cfg, "micro_batch_size", 0),
        "image_size": getattr(cfg, "image_size", 0),
        "precision": precision,
        "grad_checkpointing": getattr(cfg, "grad_checkpointing", False),
        "gpu_memory_gib": memory,
        "num_classes": getattr(cfg, "num_classes", 0) or 0,
    }
    for key in ("mask_ratio", "decoder_embed_dim", "decoder_depth", "decoder_num_heads"):
        if hasattr(cfg, key):
            values[key] = getattr(cfg, key)
    plan = PlanConfig(**values)
    check_bounds(plan)
    plan.validate()
    return plan


def _meta_model(cfg: PlanConfig, image_size: int):

    if cfg.stage == "mae":
        return create_mae(cfg.model, img_size=image_size, decoder_embed_dim=cfg.decoder_embed_dim,
                          decoder_depth=cfg.decoder_depth, decoder_num_heads=cfg.decoder_num_heads, device="meta")
    classes = cfg.num_classes or DEFAULT_CLASSES[cfg.stage]
    return create_vit(cfg.model, num_classes=classes, img_size=image_size, device="meta")


def _choose_strategy(cfg: PlanConfig, trainable: int) -> str:
    """As the engine's ``auto``: DDP while AdamW state takes at most half a GPU, else FSDP."""

    if cfg.strategy != "auto":
        return cfg.strategy
    if cfg.gpus == 1:
        return "none"
    model_state = trainable * MODEL_STATE_BYTES_PER_PARAM
    return "fsdp" if model_state > AUTO_FSDP_MEMORY_SHARE * cfg.gpu_memory_gib * GIB else "ddp"


def plan_run(cfg: Any) -> dict[str, Any]:
    """Memory per GPU (bytes and GiB), FLOPs per step and whether it fits; ``cfg``: PlanConfig or a stage config."""

    cfg = plan_config_from(cfg)
    shape = vit_shape(cfg.model)
    image_size = cfg.image_size or shape.img_size
    model = _meta_model(cfg, image_size)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    block_params = [sum(p.numel() for p in block.parameters()) for block in model.blocks]
    block_params += [sum(p.numel() for p in block.parameters()) for block in getattr(model, "decoder_blocks", [])]
    root_params = total - sum(block_params)
    largest_block = max(block_params)
    strategy = _choose_strategy(cfg, trainable)
    shards = cfg.gpus if strategy == "fsdp" else 1
    micro = cfg.micro_batch_size or cfg.batch_size // cfg.gpus
    accumulation = cfg.batch_size // (micro * cfg.gpus)
    half = cfg.precision in ("bf16", "fp16")
    act_bytes = 2 if half else 4
    residual_bytes = 2 if half and strategy == "fsdp" else 4

    # ---- model state
    memory: dict[str, float] = {
        "parameters": 4 * total / shards,
        "gradients": 4 * trainable / shards,
        "optimizer": ADAMW_STATE_BYTES * trainable / shards,
    }
    if strategy == "fsdp":
        # gathered root + running and prefetched block, and their unsharded grads (compute dtype + fp32 reduce copy)
        memory["gathered_parameters"] = act_bytes * (root_params + 2 * largest_block) + (act_bytes + 4) * (
            root_params + 2 * largest_block
        )
    elif half:
        memory["autocast_weight_copies"] = 2 * total

    # ---- activations per sample
    patches = (image_size // shape.patch_size) ** 2
    towers = []  # (tokens, dim, mlp_dim, heads, depth)
    if cfg.stage == "mae":
        kept = int(patches * (1 - cfg.mask_ratio)) + 1
        towers.append((kept, shape.embed_dim, shape.mlp_dim, shape.num_heads, shape.depth))
        towers.append((patches + 1, cfg.decoder_embed_dim, 4 * cfg.decoder_embed_dim, cfg.decoder_num_heads,
                       cfg.decoder_depth))
        pixels_out = patches * shape.patch_size**2 * 3
        head = pixels_out * (act_bytes + 4 + 4)  # prediction, its fp32 copy, the target
    else:
        towers.append((patches + 1, shape.embed_dim, shape.mlp_dim, shape.num_heads, shape.depth))
        head = (cfg.num_classes or DEFAULT_CLASSES[cfg.stage]) * (act_bytes + 4 + 4)  # logits, log-softmax, grad
    per_block = [block_activation_bytes(n, d, m, a, act_bytes, residual_bytes) for n, d, m, a, _ in towers]
    stored_blocks = sum(b * depth for b, (*_, depth) in zip(per_block, towers))
    block_inputs = sum(residual_bytes * n * d * depth for n, d, _, _, depth in towers)
    stem = 3 * image_size**2 * 4 + 3 * residual_bytes * patches * shape.embed_dim + head
    workspace = max(per_block)  # activation gradients of the block in backward
    if cfg.grad_checkpointing:
        activations_per_sample = block_inputs + max(per_block) + workspace + stem
    else:
        activations_per_sample = stored_blocks + workspace + stem
    memory["activations"] = activations_per_sample * micro
    memory["reserved"] = cfg.reserved_gib * GIB
    total_bytes = sum(memory.values())
    budget = cfg.gpu_memory_gib * GIB
    fixed = total_bytes - memory["activations"]
    largest_micro = max(0, int((budget - fixed) // activations_per_sample))

    # ---- FLOPs
    if cfg.stage == "mae":
        forward = mae_forward_flops(shape, cfg.mask_ratio, cfg.decoder_embed_dim, cfg.decoder_depth,
                                    img_size=image_size)
    else:
        forward = forward_flops(shape, img_size=image_size) + 2 * shape.embed_dim * (
            cfg.num_classes or DEFAULT_CLASSES[cfg.stage]
        )
    train_factor = 4 if cfg.grad_checkpointing else 3
    step_flops = train_factor * forward * cfg.batch_size
    seconds = step_flops / cfg.gpus / (cfg.peak_tflops * 1e12 * cfg.assumed_mfu)

    return {
        "model": cfg.model, "stage": cfg.stage, "image_size": image_size, "gpus": cfg.gpus, "strategy": strategy,
        "precision": cfg.precision, "grad_checkpointing": cfg.grad_checkpointing,
        "parameters": total, "trainable_parameters": trainable, "largest_block_parameters": largest_block,
        "batch_size": cfg.batch_size, "micro_batch_size": micro, "accumulation_steps": accumulation,
        "memory_bytes": memory, "memory_gib": {k: v / GIB for k, v in memory.items()},
        "activation_bytes_per_sample": activations_per_sample,
        "total_gib": total_bytes / GIB, "gpu_memory_gib": cfg.gpu_memory_gib, "fits": total_bytes <= budget,
        "largest_micro_batch_that_fits": largest_micro,
        "forward_flops_per_sample": forward, "train_flops_per_step": step_flops,
        "train_flops_per_step_per_gpu": step_flops / cfg.gpus,
        "seconds_per_step_at_assumed_mfu": seconds, "assumed_mfu": cfg.assumed_mfu, "peak_tflops": cfg.peak_tflops,
    }


def format_plan(plan: dict[str, Any]) -> str:
    """The plan as a short human-readable table and a verdict with what to change when it does not fit."""
    lines = [
        f"plan: {plan['stage']} {plan['model']} @{plan['image_size']}px on {plan['gpus']} GPU(s), "
        f"strategy={plan['strategy']}, precision={plan['precision']}, grad_checkpointing="
        f"{str(plan['grad_checkpointing']).lower()}",
        f"  parameters        {plan['parameters'] / 1e9:.3f} B ({plan['trainable_parameters'] / 1e9:.3f} B trainable)",
        f"  global batch      {plan['batch_size']} = {plan['gpus']} GPUs x micro-batch {plan['micro_batch_size']} "
        f"x {plan['accumulation_steps']} accumulation steps",
        "  memory per GPU (GiB)",
    ]
    for key, value in plan["memory_gib"].items():
        lines.append(f"    {key.replace('_', ' '):<26}{value:9.2f}")
    lines.append(f"    {'total':<26}{plan['total_gib']:9.2f}  of {plan['gpu_memory_gib']:.0f}")
    lines.append(
        f"  FLOPs per step    {plan['train_flops_per_step'] / 1e15:.3f} PFLOP "
        f"({plan['train_flops_per_step_per_gpu'] / 1e12:.1f} TFLOP per GPU); "
        f"~{plan['seconds_per_step_at_assumed_mfu']:.2f} s/step at {plan['assumed_mfu']:.0%} MFU of "
        f"{plan['peak_tflops']:.0f} TFLOP/s"
    )
    if plan["fits"]:
        lines.append(f"  fits: yes ({plan['total_gib']:.1f} of {plan['gpu_memory_gib']:.0f} GiB)")
    else:
        hints = []
        if plan["largest_micro_batch_that_fits"] > 0:
            hints.append(f"micro_batch_size<={plan['largest_micro_batch_that_fits']} (accumulation fills the batch)")
        if not plan["grad_checkpointing"]:
            hints.append("grad_checkpointing=true")
        if plan["strategy"] != "fsdp" and plan["gpus"] > 1:
            hints.append("strategy=fsdp")
        if plan["largest_micro_batch_that_fits"] == 0 and plan["strategy"] == "fsdp":
            hints.append("more GPUs (model state alone does not fit)")
        lines.append(f"  fits: NO ({plan['total_gib']:.1f} of {plan['gpu_memory_gib']:.0f} GiB); try "
                     + ", ".join(hints or ["a smaller model"]))
    return "\n".join(lines)

def planned_device(spec: Any) -> Any:
    """The device a config's ``device=`` (auto, cpu, cuda, cuda:N) will train on, without selecting it."""
    import torch

    if spec in ("auto", "cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        spec = f"cuda:{local}" if torch.cuda.is_available() else "cpu"
    return torch.device(spec)


def device_memory_bytes(device: Any) -> int:
    """What a training process on ``device`` can hold at most: the GPU's memory, or the machine's RAM
    (0: unknown). Selects no device (no CUDA context made)."""
    import torch

    device = planned_device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.get_device_properties(device).total_memory)
    if device.type == "cpu":
        try:
            return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
        except (ValueError, OSError, AttributeError):
            return 0
    return 0


# ------------------------------------------------------------------ LiT, video, detection
# A lower bound of what one training step holds, from the config alone (no model is built), for the
# stages ``plan_run`` does not model. Each part counts only tensors the step must keep (model state,
# what autograd saves, the contrastive loss's cache), never workspace or allocator slack, so the
# estimate stays below what the step really needs: ``check_micro_batch_fits`` refuses only a
# micro-batch that cannot fit, never one that does. Sources: the block formula above (timm
# ``Block``, measured in tests/test_plan.py); the contrastive loss over slots of ``models/clip.py``
# (open_clip's accum-freq cache: every micro-batch's embeddings, then one micro-batch's logits
# against the whole batch); ``models/video.py`` (tubelets: num_frames / tubelet_size x patches
# tokens); ``models/vitdet.py`` and torchvision's Mask R-CNN heads (a simple feature pyramid at
# strides 4-32, RoIAlign 7x7 box features and 14x14 mask features per sampled proposal, at most a
# quarter of them positive: ``positive_fraction`` 0.25).
ESTIMATED_STAGES = ("lit", "video", "detect")


def _tower_parameters(depth: int, dim: int, mlp_dim: int) -> int:
    """The weight matrices of ``depth`` transformer blocks (qkv, proj, fc1, fc2; no biases or norms)."""
    return depth * (4 * dim * dim + 2 * dim * mlp_dim)


def _blocks_bytes(tokens: int, dim: int, mlp_dim: int, heads: int, depth: int, act: int, residual: int,
                  checkpointing: bool) -> int:
    """Per sample: what ``depth`` blocks save for backward (with checkpointing: each block's input, and
    one block rebuilt at a time); gradients and workspace come on top of it in backward."""
    block = block_activation_bytes(tokens, dim, mlp_dim, heads, act, residual)
    return residual * tokens * dim * depth + block if checkpointing else block * depth


def stage_memory_bytes(cfg: Any, micro: int, batch_size: int, world_size: int = 1, *, image_size: int = 0,
                       num_frames: int = 0, half: bool = False) -> dict[str, float]:
    """Lower-bound bytes per device of one LiT, video or detection training step, by part.

    ``micro``: samples per forward; ``batch_size``: the global batch (LiT's loss spans it);
    ``image_size`` and ``num_frames`` override the config's (to search for values that fit)."""
    stage = cfg.stage_name
    act = 2 if half else 4
    residual = act  # fp32 residual under autocast would be more: a lower bound either way
    checkpointing = bool(getattr(cfg, "grad_checkpointing", False))
    size = image_size or cfg.image_size
    memory: dict[str, float] = {}
    if stage == "lit":
        from .models.text import text_shape
        from .models.tokenizers import BYTE_MAX_TOKENS, MAWS_MAX_TOKENS

        text = text_shape(cfg.text_model, depth=cfg.text_depth, width=cfg.text_width, num_heads=cfg.text_heads)
        byte_tokens = cfg.tokenizer in ("bytes", "byte", "")
        context = (cfg.max_text_tokens or (BYTE_MAX_TOKENS if byte_tokens else MAWS_MAX_TOKENS)) + 2
        vision = vit_shape(cfg.model, img_size=size, depth=cfg.vision_depth or None)
        embed = cfg.embed_dim or text.width
        projections = embed * (text.width + vision.embed_dim)
        trainable = _tower_parameters(text.depth, text.width, text.mlp_dim) + projections
        memory["model_state"] = 16 * trainable + 4 * _tower_parameters(vision.depth, vision.embed_dim, vision.mlp_dim)
        per_sample = _blocks_bytes(context, text.width, text.mlp_dim, text.num_heads, text.depth, act, residual,
                                   checkpointing)
        if not cfg.use_cache:  # the locked tower runs without a graph: only its input and token stream
            patches = (size // vision.patch_size) ** 2
            per_sample += 3 * size * size * 4 + 2 * residual * (patches + 1) * vision.embed_dim
        # The loss over the whole batch: image and text embeddings of all of it (fp32), and the live
        # micro-batch's logits against all of it in both directions (logits and log-softmax saved).
        memory["embedding_cache"] = batch_size * 2 * embed * 4
        per_sample += 2 * 2 * batch_size * 4
    elif stage == "video":
        shape = vit_shape(cfg.model, img_size=size)
        frames = num_frames or cfg.num_frames
        tokens = max(1, frames // cfg.tubelet_size) * (size // shape.patch_size) ** 2
        memory["model_state"] = 16 * _tower_parameters(shape.depth, shape.embed_dim, shape.mlp_dim)
        per_sample = (_blocks_bytes(tokens, shape.embed_dim, shape.mlp_dim, shape.num_heads, shape.depth, act,
                                    residual, checkpointing)
                      + 3 * frames * size * size * 4 + residual * tokens * shape.embed_dim)
    elif stage == "detect":
        shape = vit_shape(cfg.model, img_size=size)
        tokens = (size // shape.patch_size) ** 2
        channels = cfg.pyramid_channels
        memory["model_state"] = 16 * _tower_parameters(shape.depth, shape.embed_dim, shape.mlp_dim)
        pyramid = sum((size // stride) ** 2 for stride in (4, 8, 16, 32)) * channels * act
        stages = 3 if cfg.cascade else 1
        boxes = stages * cfg.box_batch_per_image * (7 * 7 * channels + 2 * cfg.head_dim) * act
        masks = (cfg.box_batch_per_image // 4) * 14 * 14 * channels * act if cfg.masks else 0
        per_sample = (_blocks_bytes(tokens, shape.embed_dim, shape.mlp_dim, shape.num_heads, shape.depth, act,
                                    residual, checkpointing)
                      + 3 * size * size * 4 + pyramid + boxes + masks)
    else:
        raise ValueError(f"no memory estimate for stage '{stage}'")
    memory["activations"] = per_sample * micro
    return memory


def _estimate_fits(cfg: Any, device: Any, world_size: int, budget: int) -> None:
    """The check of :func:`check_micro_batch_fits` for LiT, video and detection (lower-bound estimate)."""
    import torch

    precision = getattr(cfg, "precision", "auto")
    half = precision in ("bf16", "fp16") or (precision == "auto" and planned_device(device).type == "cuda"
                                            and torch.cuda.is_available())
    per_rank = cfg.batch_size // world_size
    micro = cfg.micro_batch_size or per_rank

    def total(micro_size: int, batch: int = cfg.batch_size, **size: int) -> float:
        return sum(stage_memory_bytes(cfg, micro_size, batch, world_size, half=half, **size).values())

    needed = total(micro)
    if needed <= budget:
        return
    where = f"more than the {budget / GIB:.1f} GiB of {device}"
    what = {"lit": "caption pairs", "video": "clips", "detect": "images"}[cfg.stage_name]
    head = f"a micro-batch of {micro} {what} needs at least {needed / GIB:.1f} GiB, {where}"
    key = "micro_batch_size" if getattr(cfg, "micro_batch_size", 0) else "batch_size"
    fitting = _largest(lambda m: total(m) <= budget, min(micro, per_rank))
    if fitting:
        divisor = max(d for d in range(1, fitting + 1) if per_rank % d == 0)
        raise ConfigError(key, f"{head}; about {fitting} fit: set micro_batch_size={divisor} (the global batch "
                               "stays batch_size through gradient accumulation) or a smaller batch_size")
    if cfg.stage_name == "lit":  # the whole-batch loss caches every sample of the step: a smaller batch
        set_micro = getattr(cfg, "micro_batch_size", 0)
        batch = _largest(lambda b: total(min(set_micro, b) if set_micro else b, b * world_size) <= budget,
                         cfg.batch_size // world_size)
        if batch:
            raise ConfigError("batch_size", f"{head} (the contrastive loss keeps every sample of the batch); "
                                            f"set batch_size={batch * world_size} or smaller")
    if cfg.stage_name == "video":
        frames = _largest(lambda f: total(1, num_frames=f) <= budget, cfg.num_frames)
        if frames:
            raise ConfigError("num_frames", f"{head}, even one clip does not fit; set num_frames={frames} or fewer")
    if cfg.stage_name in ("video", "detect"):
        patch = vit_shape(cfg.model).patch_size
        sides = _largest(lambda k: total(1, image_size=k * patch) <= budget, cfg.image_size // patch)
        if sides:
            raise ConfigError("image_size", f"{head}, even one does not fit; set image_size={sides * patch} or "
                                            "smaller")
    raise ConfigError("model", f"{head}, even one sample does not fit; choose a smaller model")


def _largest(fits: Any, upper: int) -> int:
    """The largest n in [1, upper] with ``fits(n)`` (fits is monotone: true up to some n), 0 when none."""
    if upper < 1 or not fits(1):
        return 0
    low, high = 1, upper
    while low < high:
        middle = (low + high + 1) // 2
        low, high = (middle, high) if fits(middle) else (low, middle - 1)
    return low


def check_micro_batch_fits(cfg: Any, device: Any, world_size: int = 1) -> None:
    """Refuse, before any compute, a stage config whose micro-batch cannot fit in the device's memory,
    naming the key and a value that fits. MAE, WSP and finetuning use the planner's estimate
    (:func:`plan_run`), which has to exceed the whole memory; LiT, video and detection a lower bound
    (:func:`stage_memory_bytes`). Either way a run that would fit is never refused."""
    stage = getattr(cfg, "stage_name", "")
    device = planned_device(device)
    budget = device_memory_bytes(device)
    if not budget:
        return
    if stage in ESTIMATED_STAGES:
        _estimate_fits(cfg, device, world_size, budget)
        return
    if stage not in STAGES:
        return
    import dataclasses

    base = plan_config_from(cfg)
    strategy = base.strategy if world_size > 1 else "none"
    plan = plan_run(dataclasses.replace(base, gpus=world_size, strategy=strategy, gpu_memory_gib=budget / GIB,
                                        reserved_gib=0.0))
    if plan["fits"]:
        return
    micro, largest = plan["micro_batch_size"], plan["largest_micro_batch_that_fits"]
    per_rank = cfg.batch_size // world_size
    suggestion = max((d for d in range(1, max(1, min(largest, per_rank)) + 1) if per_rank % d == 0), default=1)
    key = "micro_batch_size" if getattr(cfg, "micro_batch_size", 0) else "batch_size"
    raise ConfigError(key, f"a micro-batch of {micro} images needs about {plan['total_gib']:.1f} GiB (activations "
                           f"{plan['memory_gib']['activations']:.1f} GiB), more than the {budget / GIB:.1f} GiB of "
                           f"{device}; about {largest} fit: set micro_batch_size={suggestion} (the global batch "
                           "stays batch_size through gradient accumulation) or a smaller batch_size")


__all__ = ["PlanConfig", "block_activation_bytes", "check_micro_batch_fits", "format_plan", "plan_config_from",
           "plan_run", "stage_memory_bytes"]

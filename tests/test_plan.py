"""``prepretrain plan``: parameter counts on the meta device, the activation formula against what
autograd really saves, model-state bytes per strategy, FLOPs, and the fits / does-not-fit verdict."""

from __future__ import annotations

import pytest
import torch
from timm.models.vision_transformer import Block
from torch import nn

from prepretrain.cli import main
from prepretrain.config import ConfigError, build_config
from prepretrain.models.mae import create_mae, mae_forward_flops
from prepretrain.models.vit import forward_flops, vit_shape
from prepretrain.plan import PlanConfig, block_activation_bytes, plan_run
from prepretrain.stages.mae import MAEConfig


def plan(**values) -> dict:
    return plan_run(build_config(PlanConfig, None, {k: str(v) for k, v in values.items()}))


def saved_activation_bytes(block: nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct tensors autograd saves in a forward, parameters and weight casts excluded."""
    weights = [p for p in block.parameters()]
    weight_storages = {p.untyped_storage().data_ptr() for p in weights}
    weight_sizes = {p.numel() for p in weights if p.ndim > 1}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        is_weight_copy = tensor.dtype == torch.bfloat16 and tensor.numel() in weight_sizes
        if storage.data_ptr() not in weight_storages and not is_weight_copy:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        block(x)
    return sum(saved.values())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_block_activation_formula_equals_saved_tensors(precision: str) -> None:
    dim, mlp_dim, heads, tokens, batch = 64, 256, 4, 65, 3
    block = Block(dim, heads, mlp_dim / dim, qkv_bias=True, norm_layer=nn.LayerNorm)
    x = torch.randn(batch, tokens, dim, requires_grad=True)
    if precision == "bf16":
        with torch.autocast("cpu", dtype=torch.bfloat16):
            measured = saved_activation_bytes(block, x)
        expected = block_activation_bytes(tokens, dim, mlp_dim, heads, act_bytes=2, residual_bytes=4)
    else:
        measured = saved_activation_bytes(block, x)
        expected = block_activation_bytes(tokens, dim, mlp_dim, heads, act_bytes=4, residual_bytes=4)
    assert measured == batch * expected


def test_parameter_counts_come_from_the_meta_model() -> None:
    tiny = plan(model="vit_micro4", stage="mae", image_size=32, decoder_embed_dim=64, decoder_depth=2,
                decoder_num_heads=4, batch_size=8, precision="fp32")
    real = create_mae("vit_micro4", img_size=32, decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4)
    assert tiny["parameters"] == sum(p.numel() for p in real.parameters())
    assert tiny["trainable_parameters"] == sum(p.numel() for p in real.parameters() if p.requires_grad)
    big = plan(model="vit_6.5b14", stage="wsp", num_classes=1000, gpus=8, batch_size=64)
    head = 4096 * 1000 + 1000
    assert big["parameters"] - head == pytest.approx(6.44e9, rel=0.01)


def test_model_state_bytes_per_strategy() -> None:
    ddp = plan(model="vit_b16", stage="finetune", gpus=8, strategy="ddp", batch_size=64, precision="fp32")
    fsdp = plan(model="vit_b16", stage="finetune", gpus=8, strategy="fsdp", batch_size=64, precision="fp32")
    params, trainable = ddp["parameters"], ddp["trainable_parameters"]
    assert ddp["memory_bytes"]["parameters"] == 4 * params
    assert ddp["memory_bytes"]["gradients"] == 4 * trainable
    assert ddp["memory_bytes"]["optimizer"] == 8 * trainable
    for key in ("parameters", "gradients", "optimizer"):
        assert fsdp["memory_bytes"][key] == pytest.approx(ddp["memory_bytes"][key] / 8)
    bf16 = plan(model="vit_b16", stage="finetune", gpus=8, strategy="ddp", batch_size=64, precision="bf16")
    assert bf16["memory_bytes"]["autocast_weight_copies"] == 2 * params


def test_activations_scale_with_micro_batch_and_shrink_with_checkpointing() -> None:
    base = dict(model="vit_l16", stage="wsp", gpus=8, batch_size=512, strategy="ddp")
    full = plan(**base, micro_batch_size=32)
    half = plan(**base, micro_batch_size=16)
    assert full["memory_bytes"]["activations"] == 2 * half["memory_bytes"]["activations"]
    assert half["accumulation_steps"] == 4 and full["accumulation_steps"] == 2
    checkpointed = plan(**base, micro_batch_size=32, grad_checkpointing=True)
    shape = vit_shape("vit_l16")
    per_block = block_activation_bytes(197, shape.embed_dim, shape.mlp_dim, shape.num_heads, 2, 4)
    # without checkpointing all 24 blocks' activations are kept; with it only their inputs (fp32)
    saved = full["activation_bytes_per_sample"] - checkpointed["activation_bytes_per_sample"]
    assert saved == 24 * per_block - (24 * 4 * 197 * shape.embed_dim + per_block)


def test_flops_per_step_follow_the_cost_model() -> None:
    result = plan(model="vit_b16", stage="finetune", num_classes=1000, gpus=4, batch_size=256)
    forward = forward_flops(vit_shape("vit_b16")) + 2 * 768 * 1000
    assert result["train_flops_per_step"] == pytest.approx(3 * forward * 256)
    assert result["train_flops_per_step"] / 256 / 1e9 == pytest.approx(105, rel=0.05)  # MAWS paper's ViT-B/16 cost
    checkpointed = plan(model="vit_b16", stage="finetune", num_classes=1000, gpus=4, batch_size=256,
                        grad_checkpointing=True)
    assert checkpointed["train_flops_per_step"] == pytest.approx(4 * forward * 256)
    mae = plan(model="vit_l16", stage="mae", gpus=8, batch_size=4096)
    assert mae["forward_flops_per_sample"] == mae_forward_flops(vit_shape("vit_l16"), 0.75, 512, 8)


def test_six_billion_fits_eight_gpus_with_fsdp_not_with_ddp() -> None:
    common = dict(model="vit_6.5b14", stage="mae", gpus=8, batch_size=4096, micro_batch_size=16,
                  grad_checkpointing=True, gpu_memory_gib=80)
    sharded = plan(**common, strategy="fsdp")
    replicated = plan(**common, strategy="ddp")
    assert sharded["fits"] and not replicated["fits"]
    assert replicated["memory_gib"]["optimizer"] > 45  # 8 bytes x 6.5B parameters on every GPU
    assert plan(**{**common, "strategy": "auto"})["strategy"] == "fsdp"
    assert plan(model="vit_b16", gpus=8, batch_size=4096)["strategy"] == "ddp"
    # the suggested micro-batch is the largest that fits
    unsharded = plan(model="vit_h14", stage="wsp", gpus=8, batch_size=8192, strategy="fsdp")
    largest = unsharded["largest_micro_batch_that_fits"]
    assert not unsharded["fits"] and largest > 0
    assert plan(model="vit_h14", stage="wsp", gpus=8, batch_size=8 * largest, strategy="fsdp")["fits"]
    assert not plan(model="vit_h14", stage="wsp", gpus=8, batch_size=8 * (largest + 1), strategy="fsdp")["fits"]


def test_plan_of_a_stage_config_for_dry_runs() -> None:
    result = plan_run(build_config(MAEConfig, None, ["batch_size=64", "device=cpu"]))
    assert result["model"] == "vit_micro4" and result["image_size"] == 32 and result["precision"] == "fp32"
    assert result["stage"] == "mae" and result["gpus"] == 1 and result["strategy"] == "none"
    assert result["fits"]


def test_plan_command_prints_verdict_and_rejects_bad_keys(capsys: pytest.CaptureFixture) -> None:
    assert main(["plan", "model=vit_6.5b14", "gpus=8", "strategy=fsdp", "batch_size=4096",
                 "micro_batch_size=16", "grad_checkpointing=true"]) == 0
    out = capsys.readouterr().out
    assert "fits: yes" in out and "optimizer" in out and "PFLOP" in out
    assert main(["plan", "model=vit_6.5b14", "gpus=8", "strategy=ddp", "batch_size=4096"]) == 0
    assert "fits: NO" in capsys.readouterr().out
    assert main(["plan", "gpus=0"]) == 2
    assert "gpus" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="stage"):
        build_config(PlanConfig, None, ["stage=pretrain"])

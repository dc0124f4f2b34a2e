"""Layouts: detection, SWAG/torchvision <-> timm ViT, old torchtext names, casting, image size."""

from __future__ import annotations

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer as TimmViT
from torchvision.models.vision_transformer import VisionTransformer as TorchvisionViT

from prepretrain.models.checkpoints import CheckpointMismatch
from prepretrain.models.layouts import (
    cast_floating,
    detect_layout,
    image_size_of,
    swag_to_timm,
    timm_to_torchvision,
    upgrade_torchtext_names,
)
from prepretrain.models.text import TextEncoder, text_shape

DEPTH = 2


def _torchvision_vit(**kwargs) -> TorchvisionViT:
    torch.manual_seed(0)
    model = TorchvisionViT(
        image_size=32, patch_size=4, num_layers=DEPTH, num_heads=2, hidden_dim=64, mlp_dim=128, num_classes=10, **kwargs
    )
    # torchvision zero-initialises the head; give it values so the comparison covers it.
    with torch.no_grad():
        for p in model.heads.parameters():
            p.normal_(std=0.1)
    return model.eval()


def _timm_vit(**kwargs) -> TimmViT:
    args = dict(
        img_size=32, patch_size=4, embed_dim=64, depth=DEPTH, num_heads=2, mlp_ratio=2, num_classes=10, class_token=True
    )
    args.update(global_pool="token")
    args.update(kwargs)
    return TimmViT(**args).eval()


def _as_swag(tv_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SWAG's own names (facebookresearch/SWAG), written out from a torchvision state dict."""
    out = {}
    for key, value in tv_state.items():
        if key == "encoder.pos_embedding":
            out[key] = value[0].unsqueeze(1).clone()  # (1, S, D) -> (S, 1, D), sequence first
            continue
        new = key.replace("encoder.layers.encoder_layer_", "encoder.layers.layer_")
        new = new.replace(".mlp.0.", ".mlp.linear_1.").replace(".mlp.3.", ".mlp.linear_2.")
        new = new.replace("heads.head.", "head.layers.head.")
        out[new] = value
    return out


def _outputs_match(state: dict[str, torch.Tensor], reference: TorchvisionViT) -> None:
    timm_model = _timm_vit()
    timm_model.load_state_dict(state, strict=True)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(timm_model(x), reference(x), rtol=1e-5, atol=1e-5)


def test_timm_and_torchvision_vits_are_the_same_function():
    tv, timm_model = _torchvision_vit(), _timm_vit()
    assert tv.encoder.ln.eps == timm_model.norm.eps == 1e-6
    block = tv.encoder.layers[0]
    assert block.ln_1.eps == timm_model.blocks[0].norm1.eps == 1e-6
    assert isinstance(block.mlp[1], torch.nn.GELU) and block.mlp[1].approximate == "none"
    assert (
        isinstance(timm_model.blocks[0].mlp.act, torch.nn.GELU) and timm_model.blocks[0].mlp.act.approximate == "none"
    )


def test_torchvision_to_timm_matches_forward():
    tv = _torchvision_vit()
    state = tv.state_dict()
    assert detect_layout(state) == "torchvision"
    converted = swag_to_timm(state)
    assert set(converted) == set(_timm_vit().state_dict())
    _outputs_match(converted, tv)
    # Tensors are carried over as they are.
    assert (
        converted["blocks.1.attn.qkv.weight"] is state["encoder.layers.encoder_layer_1.self_attention.in_proj_weight"]
    )


def test_swag_to_timm_matches_forward():
    tv = _torchvision_vit()
    swag = _as_swag(tv.state_dict())
    assert swag["encoder.pos_embedding"].shape == (65, 1, 64)
    assert "encoder.layers.layer_0.mlp.linear_1.weight" in swag and "head.layers.head.weight" in swag
    assert detect_layout(swag) == "swag"
    converted = swag_to_timm(swag)
    assert converted["pos_embed"].shape == (1, 65, 64) and converted["pos_embed"].is_contiguous()
    assert torch.equal(converted["pos_embed"], tv.state_dict()["encoder.pos_embedding"])
    _outputs_match(converted, tv)


def test_old_torchvision_mlp_names():
    tv = _torchvision_vit()
    old = {
        k.replace(".mlp.0.", ".mlp.linear_1.").replace(".mlp.3.", ".mlp.linear_2."): v
        for k, v in tv.state_dict().items()
    }
    assert detect_layout(old) == "torchvision"
    _outputs_match(swag_to_timm(old), tv)


def test_pre_logits_is_refused_by_name():
    state = _torchvision_vit(representation_size=32).state_dict()
    with pytest.raises(CheckpointMismatch, match=r"heads\.pre_logits\.weight"):
        swag_to_timm(state)
    encoder = swag_to_timm(state, drop_head=True)
    assert not any(k.startswith("head") for k in encoder)
    _timm_vit(num_classes=0).load_state_dict(encoder, strict=True)


def test_unknown_and_colliding_names_are_refused():
    state = _torchvision_vit().state_dict()
    with pytest.raises(CheckpointMismatch, match="conv_proj.conv_1.weight"):
        swag_to_timm({**state, "conv_proj.conv_1.weight": torch.zeros(1)})
    doubled = {**state, "encoder.layers.encoder_layer_0.mlp.linear_1.weight": torch.zeros(1)}
    with pytest.raises(CheckpointMismatch, match="both map to"):
        swag_to_timm(doubled)
    timm_state = _timm_vit(global_pool="avg", fc_norm=True).state_dict()
    with pytest.raises(CheckpointMismatch, match="fc_norm"):
        timm_to_torchvision(timm_state)


def test_round_trips_are_bit_exact():
    torch.manual_seed(1)
    timm_state = _timm_vit().state_dict()
    tv_state = timm_to_torchvision(timm_state)
    assert detect_layout(tv_state) == "torchvision"
    # torchvision's own model takes it strictly and computes the same function.
    tv = _torchvision_vit()
    tv.load_state_dict(tv_state, strict=True)
    _outputs_match(timm_state, tv)
    back = swag_to_timm(tv_state)
    assert list(back) == list(timm_state)
    for key, value in timm_state.items():
        assert back[key].dtype == value.dtype and torch.equal(back[key], value), key
    # And the other way: torchvision -> timm -> torchvision.
    original = _torchvision_vit().state_dict()
    again = timm_to_torchvision(swag_to_timm(original))
    assert set(again) == set(original)
    assert all(torch.equal(again[k], v) for k, v in original.items())


def test_detect_layout():
    timm_state = _timm_vit().state_dict()
    assert detect_layout(timm_state) == "timm"
    encoder_only = {k: v for k, v in timm_state.items() if not k.startswith("head.")}
    assert detect_layout(encoder_only) == "timm"
    mae_finetuned = _timm_vit(global_pool="avg", fc_norm=True).state_dict()
    assert "fc_norm.weight" in mae_finetuned and detect_layout(mae_finetuned) == "timm"
    mae_full = {
        **encoder_only,
        "mask_token": torch.zeros(1, 1, 32),
        "decoder_embed.weight": torch.zeros(32, 64),
        "decoder_pos_embed": torch.zeros(1, 65, 32),
    }
    assert detect_layout(mae_full) == "mae_full"
    text = TextEncoder(text_shape("text_micro", depth=1)).state_dict()
    clip = {
        **{f"vision_encoder.{k}": v for k, v in encoder_only.items()},
        **{f"text_encoder.{k}": v for k, v in text.items()},
        "logit_scale": torch.zeros(()),
        "vision_projection": torch.zeros(64, 32),
        "text_projection": torch.zeros(128, 32),
    }
    assert detect_layout(clip) == "maws_clip"
    tv_state = _torchvision_vit().state_dict()
    assert detect_layout(tv_state) == "torchvision"
    assert detect_layout(_as_swag(tv_state)) == "swag"
    assert detect_layout(text) == "unknown"
    assert detect_layout({"weight": torch.zeros(2)}) == "unknown"
    assert detect_layout({}) == "unknown"


def _old_torchtext_names(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """Name a current-torchtext text tower as torchtext <= 0.12 did (own attention/MLP modules)."""
    new_to_old = {
        "self_attn.in_proj_weight": "attention.input_projection.weight",
        "self_attn.in_proj_bias": "attention.input_projection.bias",
        "self_attn.out_proj.weight": "attention.output_projection.weight",
        "self_attn.out_proj.bias": "attention.output_projection.bias",
        "linear1.weight": "residual_mlp.mlp.0.weight",
        "linear1.bias": "residual_mlp.mlp.0.bias",
        "linear2.weight": "residual_mlp.mlp.3.weight",
        "linear2.bias": "residual_mlp.mlp.3.bias",
        "norm1.weight": "attention_layer_norm.weight",
        "norm1.bias": "attention_layer_norm.bias",
        "norm2.weight": "final_layer_norm.weight",
        "norm2.bias": "final_layer_norm.bias",
    }
    base = prefix + "encoder.transformer.layers.layers."
    out = {}
    for key, value in state.items():
        if key.startswith(base):
            index, leaf = key[len(base) :].split(".", 1)
            key = f"{prefix}encoder.transformer.layers.{index}.{new_to_old[leaf]}"
        out[key] = value
    return out


def test_old_torchtext_names_are_upgraded():
    torch.manual_seed(2)
    shape = text_shape("text_micro")
    new = TextEncoder(shape).state_dict()
    old = _old_torchtext_names(new)
    assert "encoder.transformer.layers.1.attention.input_projection.weight" in old
    assert "encoder.transformer.layers.0.residual_mlp.mlp.3.bias" in old
    assert not any(".layers.layers." in k for k in old)
    upgraded = upgrade_torchtext_names(old)
    assert set(upgraded) == set(new)
    assert all(torch.equal(upgraded[k], v) for k, v in new.items())
    model = TextEncoder(shape)
    model.load_state_dict(upgraded, strict=True)
    tokens = torch.tensor([[0, 65, 66, 2, 1]])
    reference = TextEncoder(shape)
    reference.load_state_dict(new, strict=True)
    with torch.no_grad():
        assert torch.equal(model(tokens), reference(tokens))
    # Already new: passes through unchanged.
    same = upgrade_torchtext_names(new)
    assert list(same) == list(new) and all(same[k] is v for k, v in new.items())


def test_old_torchtext_names_inside_a_clip_state_dict():
    text = TextEncoder(text_shape("text_micro", depth=1)).state_dict()
    clip_new = {"vision_encoder.cls_token": torch.zeros(1, 1, 8), "logit_scale": torch.zeros(())}
    clip_new.update({f"text_encoder.{k}": v for k, v in text.items()})
    clip_old = _old_torchtext_names(clip_new, prefix="text_encoder.")
    assert "text_encoder.encoder.transformer.layers.0.final_layer_norm.weight" in clip_old
    upgraded = upgrade_torchtext_names(clip_old, prefix="text_encoder.")
    assert set(upgraded) == set(clip_new)
    assert all(upgraded[k] is v for k, v in clip_new.items())
    # Keys outside the prefix are left alone.
    outside = {"other.encoder.transformer.layers.0.final_layer_norm.weight": torch.zeros(2)}
    assert set(upgrade_torchtext_names(outside, prefix="text_encoder.")) == set(outside)
    # An old and a new name for the same tensor is ambiguous.
    both = {**clip_old, "text_encoder.encoder.transformer.layers.layers.0.norm2.weight": torch.zeros(128)}
    with pytest.raises(CheckpointMismatch, match="final_layer_norm"):
        upgrade_torchtext_names(both, prefix="text_encoder.")


def test_cast_floating():
    state = {
        "w": torch.randn(3, dtype=torch.float16),
        "b": torch.randn(3, dtype=torch.bfloat16),
        "f": torch.randn(3),
        "steps": torch.tensor([7], dtype=torch.int64),
        "mask": torch.tensor([True, False]),
    }
    out = cast_floating(state, torch.float32)
    assert {k: v.dtype for k, v in out.items()} == {
        "w": torch.float32,
        "b": torch.float32,
        "f": torch.float32,
        "steps": torch.int64,
        "mask": torch.bool,
    }
    assert torch.equal(out["w"], state["w"].float()) and torch.equal(out["b"], state["b"].float())
    assert out["steps"] is state["steps"] and out["mask"] is state["mask"]
    assert cast_floating(state, torch.bfloat16)["f"].dtype == torch.bfloat16


def test_image_size_of():
    state = _timm_vit().state_dict()  # 32 px, patch 4: 8x8 patches + the class token
    assert image_size_of(state, 4) == 32
    assert image_size_of(state) == 32  # patch size read from patch_embed
    big = {"pos_embed": torch.zeros(1, 1 + 32 * 32, 8), "cls_token": torch.zeros(1, 1, 8)}
    assert image_size_of(big, 16) == 512
    no_class = {"pos_embed": torch.zeros(1, 14 * 14, 8)}
    assert image_size_of(no_class, 16) == 224
    no_embed_class = {"pos_embed": torch.zeros(1, 14 * 14, 8), "cls_token": torch.zeros(1, 1, 8)}
    assert image_size_of(no_embed_class, 16) == 224
    registers = {
        "pos_embed": torch.zeros(1, 5 + 16, 8),
        "cls_token": torch.zeros(1, 1, 8),
        "reg_token": torch.zeros(1, 4, 8),
    }
    assert image_size_of(registers, 8) == 32
    with pytest.raises(CheckpointMismatch, match="square"):
        image_size_of({"pos_embed": torch.zeros(1, 1 + 14, 8), "cls_token": torch.zeros(1, 1, 8)}, 16)
    with pytest.raises(CheckpointMismatch, match="pos_embed"):
        image_size_of({"weight": torch.zeros(1)}, 16)

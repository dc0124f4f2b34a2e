import pytest
import timm
import torch

from prepretrain.models.checkpoints import CheckpointMismatch, interpolate_pos_embed, load_encoder_weights, load_strict
from prepretrain.models.vit import VIT_SHAPES, count_params, create_vit, forward_flops

# Parameter counts of the MAWS paper's model table (arXiv 2303.13496; millions).
PAPER_PARAMS = {"vit_b16": 86, "vit_l16": 304, "vit_h14": 632, "vit_2b14": 1890, "vit_6.5b14": 6440}
# Training GFLOPs per image (3 x forward_flops at 224 px, as the MAWS paper's cost model).
PAPER_TRAIN_GFLOPS = {"vit_b16": 105, "vit_l16": 369, "vit_h14": 1004}


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS))
def test_paper_sizes_param_counts_within_one_percent(name):
    model = create_vit(name, device="meta")
    millions = count_params(model) / 1e6
    assert abs(millions - PAPER_PARAMS[name]) / PAPER_PARAMS[name] < 0.01, millions
    assert all(p.device.type == "meta" for p in model.parameters())


@pytest.mark.parametrize("name", sorted(PAPER_TRAIN_GFLOPS))
def test_flops_formula_matches_reference(name):
    gflops = 3 * forward_flops(VIT_SHAPES[name]) / 1e9
    assert abs(gflops - PAPER_TRAIN_GFLOPS[name]) / PAPER_TRAIN_GFLOPS[name] < 0.01


@pytest.mark.parametrize(
    "name,timm_kwargs",
    [
        ("vit_b16", dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)),
        ("vit_l16", dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16)),
        ("vit_h14", dict(patch_size=14, embed_dim=1280, depth=32, num_heads=16)),
        ("vit_2b14", dict(patch_size=14, embed_dim=2560, depth=24, num_heads=32)),
    ],
)
def test_state_dict_keys_and_shapes_equal_timm(name, timm_kwargs):
    ours = create_vit(name, device="meta").state_dict()
    with torch.device("meta"):
        reference = timm.models.vision_transformer.VisionTransformer(num_classes=0, **timm_kwargs).state_dict()
    assert list(ours) == list(reference)
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in reference.items()}


def test_timm_checkpoint_loads_strictly_and_gives_same_features():
    reference = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0).eval()
    ours = create_vit("vit_ti16").eval()
    load_strict(ours, reference.state_dict())
    images = torch.randn(2, 3, 224, 224)
    torch.testing.assert_close(ours(images), reference(images))


def test_small_sizes_run_on_small_images():
    for name, size in (("vit_micro4", 32), ("vit_ti4", 32), ("vit_s8", 64)):
        model = create_vit(name, depth=1)
        assert model(torch.randn(2, 3, size, size)).shape == (2, model.embed_dim)


def test_checkpoint_of_another_architecture_lists_mismatched_keys():
    small = create_vit("vit_micro4", depth=2).state_dict()
    other = create_vit("vit_micro4", depth=3)
    with pytest.raises(CheckpointMismatch) as error:
        load_strict(other, small)
    assert "missing" in str(error.value) and "blocks.2.attn.qkv.weight" in str(error.value)
    wider = create_vit("vit_micro4", depth=2, embed_dim=64, num_heads=2)
    with pytest.raises(CheckpointMismatch, match="shape mismatch"):
        load_strict(wider, small)


def test_pos_embed_interpolation_is_identity_at_same_size_and_resizes():
    pos = torch.randn(1, 1 + 14 * 14, 32)
    assert interpolate_pos_embed(pos, 14) is pos
    bigger = interpolate_pos_embed(pos, 37)
    assert bigger.shape == (1, 1 + 37 * 37, 32)
    torch.testing.assert_close(bigger[:, :1], pos[:, :1])


def test_load_encoder_interpolates_and_leaves_head_at_init():
    source = create_vit("vit_micro4", depth=1).state_dict()
    target = create_vit("vit_micro4", depth=1, img_size=48, num_classes=5)
    left = load_encoder_weights(target, source)
    assert left == ["head.weight", "head.bias"]
    torch.testing.assert_close(target.state_dict()["blocks.0.attn.qkv.weight"], source["blocks.0.attn.qkv.weight"])
    assert target.pos_embed.shape == (1, 1 + 12 * 12, 128)


def test_attention_is_timms_with_fp32_attention_for_half_precision_on_cpu():
    """Our blocks' attention (fp32 SDPA for bf16 on the CPU, where it is faster) computes what
    timm's own forward computes: exactly in fp32, to bf16 rounding under autocast; same keys."""
    import copy

    from prepretrain.models.vit import Attention, with_timm_attention

    torch.manual_seed(0)
    ours = create_vit("vit_micro4", num_classes=5).eval()
    assert all(isinstance(block.attn, Attention) for block in ours.blocks)
    reference = with_timm_attention(copy.deepcopy(ours))
    assert not any(isinstance(block.attn, Attention) for block in reference.blocks)
    assert ours.state_dict().keys() == reference.state_dict().keys()
    images = torch.randn(2, 3, 32, 32)
    assert torch.equal(ours(images), reference(images))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(ours(images).float(), reference(images).float(), atol=2e-2, rtol=2e-2)

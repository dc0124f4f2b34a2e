"""MViTv2's decomposed, query-dependent relative position in the video ViT (``rel_pos=True``):
the augmented-attention trick against a direct reference, exact inflation, gradients, names."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from timm.models.vision_transformer import Block, ResPostBlock, VisionTransformer

from prepretrain.config import build_config
from prepretrain.models.video import VideoBlock, VideoViT, video_layer_name
from prepretrain.models.vit import create_vit
from prepretrain.stages.video import VideoConfig, VideoStage

GRID = (3, 4, 4)  # 6 frames, tubelet 2, 16 px at patch 4
TOKENS = 1 + 3 * 4 * 4
HEAD_DIM = 16


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_image(seed: int = 0, **kwargs) -> VisionTransformer:
    torch.manual_seed(seed)
    return create_vit("vit_micro4", img_size=16, embed_dim=32, depth=2, num_heads=2, num_classes=5, **kwargs).eval()


def tiny_video(rel_pos: bool = True, frames: int = 6, seed: int = 0, **kwargs) -> VideoViT:
    return VideoViT(tiny_image(seed, **kwargs), num_frames=frames, tubelet_size=2, rel_pos=rel_pos).eval()


def randomise_tables(video: VideoViT, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for table in video.rel_pos.parameters():
            table.copy_(torch.randn(table.shape, generator=generator) * 0.5)


def reference_attention(attn: torch.nn.Module, x: torch.Tensor, tables: tuple[torch.Tensor, ...] | None,
                        grid: tuple[int, int, int]) -> torch.Tensor:
    """Straight from the definition: full (N, N) logits ``q k^T * scale + q_i . (R_t[t_i - t_j] +
    R_h[h_i - h_j] + R_w[w_i - w_j])`` between patch tokens + ``log T'`` on the CLS key, softmax, @ v."""
    batch, tokens, channels = x.shape
    heads = attn.num_heads
    qkv = x @ attn.qkv.weight.T + attn.qkv.bias
    q, k, v = qkv.reshape(batch, tokens, 3, heads, -1).permute(2, 0, 3, 1, 4)
    dim = q.shape[-1]
    logits = torch.einsum("bnid,bnjd->bnij", q, k) / math.sqrt(dim)
    slots, rows, cols = grid
    if tables is not None:
        coords = [(t, h, w) for t in range(slots) for h in range(rows) for w in range(cols)]
        index_t = [[ti - tj + slots - 1 for tj, _, _ in coords] for ti, _, _ in coords]
        index_h = [[hi - hj + rows - 1 for _, hj, _ in coords] for _, hi, _ in coords]
        index_w = [[wi - wj + cols - 1 for _, _, wj in coords] for _, _, wi in coords]
        rel_t, rel_h, rel_w = tables
        pair = rel_t[torch.tensor(index_t)] + rel_h[torch.tensor(index_h)] + rel_w[torch.tensor(index_w)]
        rel = torch.einsum("bnid,ijd->bnij", q[:, :, 1:], pair)  # patch queries x patch keys only
        logits = logits + torch.nn.functional.pad(rel, (1, 0, 1, 0))
    logits[..., 0] = logits[..., 0] + math.log(slots)
    out = (logits.softmax(dim=-1) @ v).transpose(1, 2).reshape(batch, tokens, channels)
    return out @ attn.proj.weight.T + attn.proj.bias


def test_the_augmented_attention_equals_the_direct_reference_forward_and_backward():
    video = tiny_video(rel_pos=True)
    randomise_tables(video)
    block = video.blocks[1]
    torch.manual_seed(3)
    x = torch.randn(2, TOKENS, 32)
    table_params = list(video.rel_pos[1].parameters())
    out = block.attention(x, video.rel_pos[1]())
    grad = torch.randn_like(out)
    ours = torch.autograd.grad(out, table_params, grad)
    expected = reference_attention(block.attn, x, tuple(table_params), GRID)
    theirs = torch.autograd.grad(expected, table_params, grad)
    assert out.shape == (2, TOKENS, 32)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    for mine, reference in zip(ours, theirs):
        assert mine.abs().sum() > 0
        torch.testing.assert_close(mine, reference, atol=1e-5, rtol=1e-5)
    # with rel_pos off the same block counts the CLS key T' times (the log T' bias)
    plain = tiny_video(rel_pos=False)
    torch.testing.assert_close(plain.blocks[1].attention(x), reference_attention(plain.blocks[1].attn, x, None, GRID),
                               atol=1e-5, rtol=1e-5)


def _saved_shapes(model: VideoViT, clips: torch.Tensor) -> tuple[list[tuple[int, ...]], list[str]]:
    shapes: list[tuple[int, ...]] = []

    def pack(tensor):
        shapes.append(tuple(tensor.shape))
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = model(clips)
    kinds, stack, seen = [], [out.grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        kinds.append(node.name())
        stack.extend(next_node for next_node, _ in node.next_functions)
    return shapes, kinds


@pytest.mark.parametrize("rel_pos", [True, False])
def test_no_dense_bias_and_no_mask_so_the_fused_kernel_runs(rel_pos):
    """Nothing (N, N)-sized is kept for backward, and the attention is the fused (flash) kernel,
    which takes no additive mask with gradients; the old bias path saved (1, heads, N, N) tensors."""
    video = tiny_video(rel_pos=rel_pos).train()
    clips = torch.randn(2, 3, 6, 16, 16)
    shapes, kinds = _saved_shapes(video, clips)
    square = {TOKENS, TOKENS + GRID[0] - 1}
    assert shapes and not [s for s in shapes if len(s) >= 2 and s[-1] in square and s[-2] in square]
    assert sum("FlashAttention" in kind for kind in kinds) == 2, sorted(kinds)  # one per block


@pytest.mark.parametrize("rel_pos", [True, False])
def test_a_static_clip_gives_exactly_the_image_models_features(rel_pos):
    image = tiny_image(global_pool="avg")
    frames = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = image.forward_features(frames)
        expected_features = image.forward_head(expected, pre_logits=True)
    video = VideoViT(image, num_frames=6, tubelet_size=2, rel_pos=rel_pos).eval()
    with torch.no_grad():
        tokens = video.forward_features(frames.unsqueeze(2).repeat(1, 1, 6, 1, 1))
    torch.testing.assert_close(tokens[:, 0], expected[:, 0], atol=1e-5, rtol=0)
    for slot in range(GRID[0]):
        torch.testing.assert_close(tokens[:, 1 + 16 * slot:17 + 16 * slot], expected[:, 1:], atol=1e-5, rtol=0)
    torch.testing.assert_close(video.forward_head(tokens, pre_logits=True), expected_features, atol=1e-5, rtol=0)


def test_one_slot_without_rel_pos_keeps_timms_blocks():
    image = tiny_image()
    video = VideoViT(image, num_frames=2, tubelet_size=2)
    assert all(type(block) is Block for block in video.blocks) and video.rel_pos is None
    assert all(isinstance(block, VideoBlock) for block in VideoViT(tiny_image(), 2, 2, rel_pos=True).blocks)
    clip = torch.randn(2, 3, 2, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(video(clip), image(clip.mean(dim=2)), atol=1e-5, rtol=1e-5)


def test_gradients_reach_every_table_and_checkpointing_gives_the_same():
    """Zero-initialised tables still get a gradient (it is q . dlogits), in every block, and
    gradient checkpointing recomputes the same thing."""
    clips = torch.randn(2, 3, 6, 16, 16)
    grads = []
    for checkpointing in (False, True):
        video = tiny_video(rel_pos=True).train()
        video.set_grad_checkpointing(checkpointing)
        video.forward_features(clips).pow(2).mean().backward()
        grads.append({name: p.grad.clone() for name, p in video.named_parameters() if name.startswith("rel_pos.")})
    assert sorted(grads[0]) == sorted(f"rel_pos.{i}.rel_{axis}" for i in (0, 1) for axis in "thw")
    for name, grad in grads[0].items():
        assert grad.abs().sum() > 0, name
        torch.testing.assert_close(grads[1][name], grad, atol=1e-6, rtol=1e-5)


def test_bf16_autocast_matches_fp32():
    video = tiny_video(rel_pos=True)
    randomise_tables(video)
    clips = torch.randn(2, 3, 6, 16, 16)
    x = torch.randn(2, TOKENS, 32)
    with torch.no_grad():
        full, attention = video.forward_features(clips), video.blocks[0].attention(x, video.rel_pos[0]())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half, half_attention = video.forward_features(clips), video.blocks[0].attention(x, video.rel_pos[0]())
    assert half_attention.dtype == torch.bfloat16
    assert (half_attention.float() - attention).abs().max() < 0.05
    assert (half.float() - full).abs().max() < 0.1


def test_state_dict_names_shapes_round_trip_and_layer_groups(tmp_path):
    video = tiny_video(rel_pos=True)
    randomise_tables(video)
    state = video.state_dict()
    tables = {name: tuple(value.shape) for name, value in state.items() if name.startswith("rel_pos.")}
    assert tables == {f"rel_pos.{i}.rel_{axis}": (2 * size - 1, HEAD_DIM)
                      for i in (0, 1) for axis, size in zip("thw", GRID)}
    # the blocks keep timm's names: the video state dict is the image one + tubelet/temporal/tables
    image_names = set(tiny_image().state_dict())
    assert image_names - {"patch_embed.proj.weight"} <= set(state)
    assert set(state) - image_names == set(tables) | {"temporal.pos_embed"}
    assert video_layer_name("rel_pos.1.rel_t") == "blocks.1.rel_pos"
    save_file(state, str(tmp_path / "video.safetensors"))
    loaded = tiny_video(rel_pos=True, seed=5)
    loaded.load_state_dict(load_file(str(tmp_path / "video.safetensors")), strict=True)
    clips = torch.randn(1, 3, 6, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(clips), video(clips), atol=0, rtol=0)
    with pytest.raises(RuntimeError, match="rel_pos"):
        tiny_video(rel_pos=False).load_state_dict(state, strict=True)
    # the stage gives the tables no weight decay
    stage = VideoStage(build_config(VideoConfig, None, {"num_images": 8, "rel_pos": True, "weight_decay": 0.05,
                                                        "progress": False, "tensorboard": False}))
    groups = stage.param_groups(video)
    decay = {name: group["weight_decay"] for group in groups for name in group["names"]}
    assert {decay[name] for name in tables} == {0.0} and decay["blocks.0.attn.qkv.weight"] == 0.05


def test_image_models_it_cannot_take_over_get_a_clear_error():
    torch.manual_seed(0)
    post_norm = VisionTransformer(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=3,
                                  block_fn=ResPostBlock)
    with pytest.raises(ValueError, match="ResPostBlock"):
        VideoViT(post_norm, num_frames=4, tubelet_size=2)
    with pytest.raises(ValueError, match="ResPostBlock"):
        VideoViT(post_norm, num_frames=2, tubelet_size=2, rel_pos=True)
    VideoViT(post_norm, num_frames=2, tubelet_size=2)  # one slot, no rel_pos: timm's blocks run as they are

"""MAE against an independent, plain computation of the reference semantics."""

import numpy as np
import pytest
import torch

from prepretrain.models.checkpoints import load_strict
from prepretrain.models.mae import create_mae, random_masking, sincos_2d
from prepretrain.train.run import Run


def tiny_mae(**kw):
    args = dict(img_size=32, depth=2, decoder_embed_dim=64, decoder_depth=1, decoder_num_heads=4)
    args.update(kw)
    return create_mae("vit_micro4", **args)


def test_masking_keeps_smallest_noise_and_restores_order():
    n, length, dim = 3, 16, 5
    x = torch.randn(n, length, dim)
    noise = torch.rand(n, length)
    kept, mask, ids_restore = random_masking(x, 0.75, noise)
    assert kept.shape == (n, 4, dim)  # int(16 * 0.25)
    for i in range(n):
        order = sorted(range(length), key=lambda j: noise[i, j].item())
        expected_keep = order[:4]
        for slot, j in enumerate(expected_keep):
            torch.testing.assert_close(kept[i, slot], x[i, j])
        expected_mask = [0.0 if j in expected_keep else 1.0 for j in range(length)]
        assert mask[i].tolist() == expected_mask
        # ids_restore is the inverse permutation of the shuffle
        shuffle = torch.tensor(order)
        assert torch.equal(shuffle[ids_restore[i]], torch.arange(length))


def test_keep_count_is_int_of_l_times_one_minus_ratio():
    x = torch.randn(2, 196, 4)
    kept, mask, _ = random_masking(x, 0.75)
    assert kept.shape[1] == 49 and mask.sum(1).tolist() == [147.0, 147.0]


def plain_patchify(images, p):
    n, c, h, w = images.shape
    rows = []
    for i in range(h // p):
        for j in range(w // p):
            patch = images[:, :, i * p : (i + 1) * p, j * p : (j + 1) * p]  # n c p p
            rows.append(patch.permute(0, 2, 3, 1).reshape(n, -1))  # (row, col, channel)
    return torch.stack(rows, dim=1)


@pytest.mark.parametrize("norm_pix", [True, False])
def test_loss_equals_plain_computation_on_masked_patches_only(norm_pix):
    model = tiny_mae(norm_pix_loss=norm_pix).eval()
    images = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, 64)
    loss, pred, mask = model(images, 0.75, noise)
    target = plain_patchify(images, 4)
    if norm_pix:
        mean = target.mean(-1, keepdim=True)
        var = ((target - mean) ** 2).sum(-1, keepdim=True) / (target.shape[-1] - 1)  # unbiased
        target = (target - mean) / torch.sqrt(var + 1e-6)
    total, count = 0.0, 0
    for i in range(2):
        for j in range(64):
            if mask[i, j] == 1:
                total += ((pred[i, j] - target[i, j]) ** 2).mean()
                count += 1
    assert count == 2 * 48
    torch.testing.assert_close(loss, total / count)


def test_loss_ignores_visible_patch_predictions():
    model = tiny_mae().eval()
    images = torch.randn(1, 3, 32, 32)
    noise = torch.rand(1, 64)
    latent, mask, ids_restore = model.forward_encoder(images, 0.75, noise)
    pred = model.forward_decoder(latent, ids_restore)
    changed = pred.clone()
    changed[mask == 0] += 100.0  # visible patches: must not matter
    torch.testing.assert_close(model.forward_loss(images, pred, mask), model.forward_loss(images, changed, mask))


def test_noise_makes_masking_reproducible():
    model = tiny_mae().eval()
    images = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, 64)
    a = model(images, 0.75, noise)
    b = model(images, 0.75, noise)
    torch.testing.assert_close(a[0], b[0])
    assert torch.equal(a[2], b[2])


def test_patchify_roundtrip_and_order():
    model = tiny_mae()
    images = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model.patchify(images), plain_patchify(images, 4))
    torch.testing.assert_close(model.unpatchify(model.patchify(images)), images)


def test_sincos_position_embedding_formula():
    dim, grid = 16, 4
    emb = sincos_2d(dim, grid)
    assert emb.shape == (1 + grid * grid, dim) and np.all(emb[0] == 0)
    quarter = dim // 4
    omega = 1.0 / 10000 ** (np.arange(quarter) / quarter)
    row, col = 2, 3
    token = emb[1 + row * grid + col]
    np.testing.assert_allclose(token[:quarter], np.sin(col * omega))
    np.testing.assert_allclose(token[quarter : 2 * quarter], np.cos(col * omega))
    np.testing.assert_allclose(token[2 * quarter : 3 * quarter], np.sin(row * omega))
    np.testing.assert_allclose(token[3 * quarter :], np.cos(row * omega))


def test_fixed_position_embeddings_are_not_trained_and_init_follows_reference():
    model = tiny_mae()
    assert not model.pos_embed.requires_grad and not model.decoder_pos_embed.requires_grad
    torch.testing.assert_close(model.pos_embed[0].double(), torch.from_numpy(sincos_2d(128, 8)), atol=1e-6, rtol=0)
    for block in model.blocks:
        assert torch.all(block.norm1.weight == 1) and torch.all(block.attn.qkv.bias == 0)
    fan_in, fan_out = 128, 128 * 3
    bound = (6 / (fan_in + fan_out)) ** 0.5
    assert model.blocks[0].attn.qkv.weight.abs().max() <= bound
    assert 0.01 < model.cls_token.std() < 0.03


def official_mae_full_shapes(width=768, depth=12, patch=16, grid=14, dec_width=512, dec_depth=8):
    """Names and shapes of the official MAE 'full' checkpoint (mae_visualize_vit_base.pth)."""
    tokens = grid * grid + 1
    shapes = {"cls_token": (1, 1, width), "pos_embed": (1, tokens, width),
              "patch_embed.proj.weight": (width, 3, patch, patch), "patch_embed.proj.bias": (width,)}

    def block(prefix, d):
        return {f"{prefix}.norm1.weight": (d,), f"{prefix}.norm1.bias": (d,),
                f"{prefix}.attn.qkv.weight": (3 * d, d), f"{prefix}.attn.qkv.bias": (3 * d,),
                f"{prefix}.attn.proj.weight": (d, d), f"{prefix}.attn.proj.bias": (d,),
                f"{prefix}.norm2.weight": (d,), f"{prefix}.norm2.bias": (d,),
                f"{prefix}.mlp.fc1.weight": (4 * d, d), f"{prefix}.mlp.fc1.bias": (4 * d,),
                f"{prefix}.mlp.fc2.weight": (d, 4 * d), f"{prefix}.mlp.fc2.bias": (d,)}

    for i in range(depth):
        shapes.update(block(f"blocks.{i}", width))
    shapes.update({"norm.weight": (width,), "norm.bias": (width,), "mask_token": (1, 1, dec_width),
                   "decoder_pos_embed": (1, tokens, dec_width), "decoder_embed.weight": (dec_width, width),
                   "decoder_embed.bias": (dec_width,)})
    for i in range(dec_depth):
        shapes.update(block(f"decoder_blocks.{i}", dec_width))
    shapes.update({"decoder_norm.weight": (dec_width,), "decoder_norm.bias": (dec_width,),
                   "decoder_pred.weight": (patch * patch * 3, dec_width), "decoder_pred.bias": (patch * patch * 3,)})
    return shapes


def test_official_mae_full_checkpoint_layout_loads_strictly():
    model = create_mae("vit_b16", device="meta")
    official = {k: torch.empty(s, device="meta") for k, s in official_mae_full_shapes().items()}
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert ours == {k: tuple(v.shape) for k, v in official.items()}
    model.load_state_dict(official, strict=True, assign=True)


def test_small_official_layout_loads_and_encoder_part_is_timm_vit():
    from prepretrain.models.vit import create_vit

    model = tiny_mae()
    state = {k: torch.randn(s) for k, s in official_mae_full_shapes(128, 2, 4, 8, 64, 1).items()}
    load_strict(model, state)
    vit = create_vit("vit_micro4", img_size=32, depth=2)
    load_strict(vit, model.encoder_state_dict())


def test_reconstruct_returns_images_and_pastes_visible_patches():
    model = tiny_mae()
    images = torch.randn(2, 3, 32, 32)
    out = model.reconstruct(images, 0.75, torch.rand(2, 64))
    assert set(out) == {"original", "masked", "reconstruction", "pasted"}
    assert all(v.shape == images.shape for v in out.values())
    visible = (out["masked"] != 0)
    torch.testing.assert_close(out["pasted"][visible], images[visible])


def test_stage_masks_depend_on_the_sample_not_on_the_rank_layout(tmp_path):
    """Each sample carries its own mask noise, drawn under its seed like its crop: rank 1 of 2
    gets exactly the second half of what a single process gets for the same global batch."""
    from prepretrain.config import build_config
    from prepretrain.data.loader import SampleStream, train_loader
    from prepretrain.stages.mae import MAEConfig, MAEStage

    cfg = build_config(MAEConfig, None, ["num_images=64", f"out_dir={tmp_path}"])
    stage = MAEStage(cfg)
    data = stage.train_data(Run.of_stage(stage))
    single = next(iter(train_loader(data.dataset, SampleStream(64, 8, seed=3))))
    rank1 = next(iter(train_loader(data.dataset, SampleStream(64, 4, seed=3, rank=1, world_size=2))))
    assert single["noise"].shape == (8, 64)  # (32 / 4) ** 2 patches per sample
    assert torch.equal(single["noise"][4:], rank1["noise"])
    assert torch.equal(single["image"][4:], rank1["image"])
    assert not torch.equal(single["noise"][:4], rank1["noise"])


def test_mae_init_gives_a_timm_encoder_the_mae_reference_initialisation():
    """``mae-init`` (the pipeline's control arm) is the MAE's own initialisation, not timm's:
    the same fixed sin-cos table, zero biases, unit norms, and weights from the same xavier
    distribution as an MAE model's encoder, seeded and several times larger than timm's."""
    from prepretrain.models.mae import mae_init_encoder
    from prepretrain.models.resolve import load_encoder, mae_init_state, resolve_encoder

    torch.manual_seed(0)
    reference = create_mae("vit_micro4", decoder_embed_dim=64, decoder_depth=1).encoder_state_dict()
    ours = mae_init_state("vit_micro4", seed=1)
    timm_init = load_encoder("", seed=1).state_dict()
    assert ours.keys() == reference.keys()
    torch.testing.assert_close(ours["pos_embed"], reference["pos_embed"], rtol=0, atol=0)
    for key, value in reference.items():
        if key == "patch_embed.proj.bias":  # PyTorch's conv default in both: U(-1/sqrt(fan_in), ..)
            assert ours[key].abs().max() <= reference["patch_embed.proj.weight"][0].numel() ** -0.5
        elif key.endswith(".bias") or key.startswith("norm") or ".norm" in key:
            assert torch.equal(ours[key], value), key  # zeros and ones, exactly
        elif key == "cls_token":
            assert ours[key].std() == pytest.approx(0.02, rel=0.3) and ours[key].abs().max() < 0.1
        elif value.dim() >= 2 and key != "pos_embed":
            fan_out, fan_in = value.shape[0], value[0].numel()
            bound = (6 / (fan_in + fan_out)) ** 0.5
            assert ours[key].abs().max() <= bound, key
            assert ours[key].std() == pytest.approx(value.std().item(), rel=0.15), key
            if key.startswith("blocks."):
                assert ours[key].std() > 2 * timm_init[key].std(), key  # the scale difference the control isolates
    qkv = "blocks.0.attn.qkv.weight"
    assert torch.equal(mae_init_state("vit_micro4", seed=1)[qkv], ours[qkv])
    assert not torch.equal(mae_init_state("vit_micro4", seed=2)[qkv], ours[qkv])
    state = torch.get_rng_state()
    mae_init_encoder("vit_micro4", seed=5)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's random stream is untouched

    # every encoder= consumer gets it through the resolver, with its own cache identity
    spec = resolve_encoder("mae-init", "vit_micro4", seed=1)
    assert spec.path is None and spec.identity == "mae-init:vit_micro4:6:1" != resolve_encoder("", seed=1).identity
    built = load_encoder("mae-init", seed=1, num_classes=3).state_dict()
    assert all(torch.equal(built[key], value) for key, value in ours.items())
    at_64 = load_encoder("mae-init", seed=1, image_size=64).state_dict()  # any resolution: its own sin-cos grid
    torch.testing.assert_close(at_64["pos_embed"][0, 1:], torch.from_numpy(sincos_2d(128, 16, cls_token=False)).float())

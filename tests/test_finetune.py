"""Full finetuning stage: layer-wise lr decay, position-embedding interpolation, outputs, resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file

from prepretrain.cli import main
from prepretrain.config import ConfigError, build_config
from prepretrain.data.images.transforms import eval_transform
from prepretrain.data.synthetic.images import SyntheticSource
from prepretrain.models.vit import create_vit
from prepretrain.stages.finetune import FinetuneConfig, FinetuneStage
from prepretrain.stages.mae import MAEConfig, MAEStage
from prepretrain.train.engine import train
from prepretrain.train.optim import build_optimizer, layer_id, set_lr
from prepretrain.train.run import Run

TINY = dict(num_images=32, batch_size=16, progress=False, tensorboard=False, eval_batch_size=200)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def mae_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mae_run")
    cfg = build_config(MAEConfig, None, dict(out_dir=str(out), num_images=64, steps=2, batch_size=32,
                                             eval_images=8, progress=False, tensorboard=False))
    train(MAEStage(cfg))
    return out


def _stage(tmp_path: Path, **overrides) -> FinetuneStage:
    values = {**TINY, "out_dir": str(tmp_path / "run"), **overrides}
    return FinetuneStage(build_config(FinetuneConfig, None, values))


def _built(stage: FinetuneStage):
    return stage.build_model(Run.of_stage(stage))


def test_layer_decay_gives_each_block_its_learning_rate(tmp_path):
    stage = _stage(tmp_path, layer_decay=0.5, ema_decay=0.99, weight_decay=0.05)
    torch.manual_seed(0)
    model = stage.build_model(Run.of_stage(stage))
    groups = stage.param_groups(model)
    optimizer = build_optimizer(groups, 1.0, (0.9, 0.999), torch.device("cpu"))
    set_lr(optimizer, 2.0)
    lr_of, decay_of = {}, {}
    for group, built in zip(groups, optimizer.param_groups):
        for name in group["names"]:
            lr_of[name], decay_of[name] = built["lr"], built["weight_decay"]
    depth = 6  # vit_micro4
    assert lr_of["net.patch_embed.proj.weight"] == pytest.approx(2.0 * 0.5**7)
    assert lr_of["net.cls_token"] == lr_of["net.pos_embed"] == pytest.approx(2.0 * 0.5**7)
    for block in range(depth):
        expected = 2.0 * 0.5 ** (depth - block)  # blocks.i is layer i + 1: decay^(L + 1 - (i + 1))
        assert lr_of[f"net.blocks.{block}.attn.qkv.weight"] == pytest.approx(expected)
        assert lr_of[f"net.blocks.{block}.norm1.bias"] == pytest.approx(expected)
    assert lr_of["net.head.weight"] == lr_of["net.norm.weight"] == pytest.approx(2.0)
    assert decay_of["net.head.weight"] == 0.05 and decay_of["net.blocks.0.attn.qkv.weight"] == 0.05
    assert decay_of["net.head.bias"] == decay_of["net.cls_token"] == decay_of["net.norm.weight"] == 0.0
    assert not any(name.startswith("ema.") for name in lr_of)  # the EMA copy is not optimised
    assert [layer_id(n, 12) for n in ("pos_embed", "blocks.11.mlp.fc1.weight", "fc_norm.bias")] == [0, 12, 13]


def test_pos_embed_is_kept_at_the_same_size_and_bicubic_at_another(tmp_path, mae_run):
    saved = load_file(str(mae_run / "encoder.safetensors"))["pos_embed"]  # (1, 1 + 8*8, 128)
    same = _built(_stage(tmp_path, encoder=str(mae_run)))
    assert torch.equal(same.net.pos_embed.detach(), saved)
    bigger = _built(_stage(tmp_path, encoder=str(mae_run), image_size=48, global_pool="avg"))
    grid = saved[:, 1:].reshape(1, 8, 8, -1).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(12, 12), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    torch.testing.assert_close(bigger.net.pos_embed[:, 1:].detach(), expected.reshape(1, 144, -1))
    assert torch.equal(bigger.net.pos_embed[:, :1].detach(), saved[:, :1])
    assert bigger(torch.randn(2, 3, 48, 48)).shape == (2, 10)


def test_finetune_command_exports_best_and_last_that_reproduce_the_reported_accuracy(tmp_path, mae_run):
    out = tmp_path / "ft"
    code = main(["finetune", f"encoder={mae_run}", f"out_dir={out}", "steps=4", "eval_every=2", "ema_decay=0.9",
                 "num_images=32", "batch_size=16", "progress=false", "tensorboard=false", "eval_batch_size=200"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert results["stage"] == "finetune" and results["steps"] == 4
    for key in ("top1", "top5", "val_top1", "ema_top1", "best_top1", "best_val_top1"):
        assert 0 <= results[key] <= 100
    assert results["best_step"] in (2, 4) and results["best_selected_on_test"] is False
    for name in ("best", "last", "ema"):
        path = out / f"{name}.safetensors"
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata()
        assert metadata["num_classes"] == "10" and metadata["global_pool"] == "token" and metadata["model"]
    # Independent check: the exported last weights, loaded strictly into a plain timm ViT,
    # give the top-1 that results.json reports on the 200 test images.
    model = create_vit("vit_micro4", num_classes=10)
    model.load_state_dict(load_file(str(out / "last.safetensors")), strict=True)
    model.eval()
    test = SyntheticSource(200, 32, split="test")
    transform = eval_transform(32)
    images = torch.stack([transform(test.get(i).image) for i in range(200)])
    labels = torch.tensor([test.get(i).labels["coarse"] for i in range(200)])
    with torch.no_grad():
        top1 = 100.0 * (model(images).argmax(1) == labels).float().mean().item()
    assert top1 == pytest.approx(results["top1"], abs=1e-3)


def test_mixup_is_seeded_from_torch_and_leaves_numpy_alone(tmp_path):
    stage = _stage(tmp_path)
    torch.manual_seed(0)
    model = stage.build_model(Run.of_stage(stage))
    batch = {"image": torch.randn(8, 3, 32, 32), "label": torch.arange(8) % 10}
    losses = []
    for numpy_seed in (1, 2):
        np.random.seed(numpy_seed)
        before = np.random.get_state()[1].copy()
        torch.manual_seed(5)
        losses.append(float(stage.loss(model, dict(batch))[0].detach()))
        assert np.array_equal(np.random.get_state()[1], before)
    assert losses[0] == losses[1]
    odd = {"image": torch.randn(7, 3, 32, 32), "label": torch.arange(7)}
    assert torch.isfinite(stage.loss(model, odd)[0])  # an odd batch (a skipped sample) still mixes


def test_bad_settings_fail_naming_the_key():
    with pytest.raises(ConfigError, match="'global_pool'"):
        build_config(FinetuneConfig, None, ["global_pool=max"])
    with pytest.raises(ConfigError, match="'layer_decay'"):
        build_config(FinetuneConfig, None, ["layer_decay=0"])
    with pytest.raises(ConfigError, match="'image_size'"):
        build_config(FinetuneConfig, None, ["image_size=30"])


@pytest.mark.slow
def test_interrupted_finetune_resumes_to_the_same_weights(tmp_path, mae_run):
    settings = dict(encoder=str(mae_run), steps=4, ckpt_every=2, ema_decay=0.9, num_images=32, batch_size=16,
                    progress=False, tensorboard=False, eval_batch_size=200)

    class Crash(RuntimeError):
        pass

    class CrashingStage(FinetuneStage):
        def after_step(self, model, step):
            super().after_step(model, step)
            if step == 3:
                raise Crash("simulated failure after step 3 (last checkpoint: step 2)")

    whole = tmp_path / "whole"
    train(FinetuneStage(build_config(FinetuneConfig, None, {**settings, "out_dir": str(whole)})))
    broken = tmp_path / "broken"
    cfg = build_config(FinetuneConfig, None, {**settings, "out_dir": str(broken)})
    with pytest.raises(Crash):
        train(CrashingStage(cfg))
    train(FinetuneStage(cfg))
    for name in ("last", "ema"):
        expected = load_file(str(whole / f"{name}.safetensors"))
        resumed = load_file(str(broken / f"{name}.safetensors"))
        for key, value in expected.items():
            assert torch.equal(value, resumed[key]), (name, key)


@pytest.mark.parametrize("path", sorted(Path(__file__).parents[1].glob("configs/finetune_*.yaml")))
def test_paper_recipes_parse(path, mae_run):
    cfg = build_config(FinetuneConfig, path, {"encoder": str(mae_run)})
    assert cfg.global_pool == "token" and cfg.batch_size == 1024 and cfg.image_size in (512, 518)
    assert cfg.mixup == 0.8 and cfg.cutmix == 1.0 and cfg.label_smoothing == 0.1 and cfg.random_erasing == 0.25
    assert cfg.layer_decay == (0.65 if cfg.model == "vit_b16" else 0.75)


def _non_square_image():
    from PIL import Image

    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, size=(60, 90, 3), dtype=np.uint8))  # 90 wide, 60 high


def test_eval_crop_choices_give_the_named_transforms():
    from torchvision import transforms as T

    from prepretrain.data.images.transforms import IMAGENET_MEAN, IMAGENET_STD, crop_eval_transform

    image, size = _non_square_image(), 48
    bicubic = T.InterpolationMode.BICUBIC
    tail = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    full = T.Compose([T.Resize(size, interpolation=bicubic), T.CenterCrop(size), *tail])(image)
    torch.testing.assert_close(crop_eval_transform(size, "1.0")(image), full, rtol=0, atol=0)
    squash = crop_eval_transform(size, "squash")(image)
    plain = T.Compose([T.Resize((size, size), interpolation=bicubic), *tail])(image)
    assert squash.shape == (3, size, size)
    torch.testing.assert_close(squash, plain, rtol=0, atol=0)
    assert not torch.equal(squash, full)  # a non-square image: squashing is not cropping
    half = T.Compose([T.Resize(96, interpolation=bicubic), T.CenterCrop(size), *tail])(image)
    torch.testing.assert_close(crop_eval_transform(size, "0.5")(image), half, rtol=0, atol=0)
    for large in (32, 224):  # auto = today's evaluation transform, small images included
        torch.testing.assert_close(crop_eval_transform(large, "auto")(image), eval_transform(large)(image))


def test_eval_crop_default_and_validation():
    assert FinetuneConfig().eval_crop == "auto"
    for good in ("auto", "squash", "0.875", "1"):
        build_config(FinetuneConfig, None, {"eval_crop": good})
    for bad in ("0", "1.5", "-0.2", "nan", "crop"):
        with pytest.raises(ConfigError, match="eval_crop"):
            build_config(FinetuneConfig, None, {"eval_crop": bad})


def test_finetune_evaluation_uses_the_eval_crop(monkeypatch):
    import prepretrain.stages.finetune as finetune

    asked = []
    real = finetune.crop_eval_transform
    monkeypatch.setattr(finetune, "crop_eval_transform", lambda size, crop: asked.append(crop) or real(size, crop))
    cfg = build_config(FinetuneConfig, None, {**TINY, "eval_crop": "squash", "device": "cpu"})
    stage = FinetuneStage(cfg)
    scores = stage._accuracy(lambda images: torch.zeros(len(images), 10), "val", torch.device("cpu"))
    assert asked == ["squash"] and scores

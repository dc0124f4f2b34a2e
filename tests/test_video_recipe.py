"""The video finetuning recipe items of MAE-ST / VideoMAE: RandAugment with one draw per clip,
random erasing with one box through every frame, repeated augmentation, head dropout."""

from __future__ import annotations

import json
import pickle
import random

import numpy as np
import pytest
import torch
from timm.data.random_erasing import RandomErasing

from prepretrain.config import ConfigError, build_config
from prepretrain.data.video.clips import SyntheticVideos, TrainClip, VideoRef, erase_clip
from prepretrain.stages.video import VideoConfig, VideoStage
from prepretrain.train.engine import train

SPEC = "rand-m9-n2-mstd0.5-inc1"
TINY = dict(num_images=16, steps=2, batch_size=8, num_frames=4, tubelet_size=2, frame_stride=2, synthetic_length=8,
            temporal_views=1, eval_batch_size=64, single_frame_baseline=False, progress=False, tensorboard=False,
            log_every=1)


pytestmark = pytest.mark.usefixtures("one_thread")


class _Frames:
    """A video source over fixed (T, H, W, 3) uint8 frames that counts its reads."""

    class_names = ["a", "b"]

    def __init__(self, frames: np.ndarray):
        self.frames, self.reads = frames, 0

    def read(self, index, pick, short_videos="pad", short_side=0):
        self.reads += 1
        last = len(self.frames) - 1
        return self.frames[[min(i, last) for i in pick(len(self.frames), 0.0)]]


def _static_clip(length: int = 8, size: int = 16) -> VideoRef:
    """One textured frame repeated: any per-frame difference after augmentation is the augmentation's."""
    frame = np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8)
    frame[: size // 2, : size // 2] = 255  # a bright corner, so geometric ops show
    return VideoRef(_Frames(np.repeat(frame[None], length, axis=0)), 0, "static", 1)


def _run(transform: TrainClip, ref: VideoRef, seed: int) -> torch.Tensor:
    random.seed(seed)
    torch.manual_seed(seed)
    return transform(ref)["video"]


def test_randaugment_gives_every_frame_of_a_clip_the_same_draw_and_each_clip_its_own():
    ref = _static_clip()
    plain = TrainClip(4, 1, 16, min_scale=1.0)
    augmented = TrainClip(4, 1, 16, min_scale=1.0, randaugment=SPEC)
    numpy_state = np.random.get_state()[1].copy()
    clips = [_run(augmented, ref, seed) for seed in range(8)]
    assert np.array_equal(np.random.get_state()[1], numpy_state)  # the caller's NumPy RNG is left as it was
    for clip in clips:  # (C, T, H, W): every frame got the same ops at the same magnitudes
        assert all(torch.equal(clip[:, t], clip[:, 0]) for t in range(1, clip.shape[1]))
    assert any(not torch.equal(clip, _run(plain, ref, seed)) for seed, clip in enumerate(clips))
    distinct = {clip.numpy().tobytes() for clip in clips}
    assert len(distinct) >= 4  # clips draw their own ops
    assert torch.equal(_run(augmented, ref, 3), clips[3])  # ... from the sample seed (exact resume)


def test_random_erasing_cuts_one_box_through_every_frame():
    ref = _static_clip()
    plain, erasing = TrainClip(4, 1, 16, min_scale=1.0), TrainClip(4, 1, 16, min_scale=1.0, random_erasing=1.0)
    for seed in range(4):
        before, after = _run(plain, ref, seed), _run(erasing, ref, seed)
        mask = (after != before).any(dim=0)  # (T, H, W)
        assert mask[0].any() and all(torch.equal(mask[t], mask[0]) for t in range(1, mask.shape[0]))
        rows, cols = mask[0].any(dim=1).nonzero(), mask[0].any(dim=0).nonzero()
        box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
        assert int(mask[0].sum()) == int(box) and 0.01 <= float(box) / 256 <= 0.4  # a rectangle, timm's areas
        assert not torch.equal(after[:, 0][:, mask[0]], after[:, 1][:, mask[0]])  # fresh noise in every frame
    assert TrainClip(4, 1, 16).eraser is None
    clip = torch.randn(3, 4, 16, 16)
    assert torch.equal(erase_clip(clip.clone(), RandomErasing(0.0, mode="pixel", device="cpu")), clip)


def test_recipe_transform_pickles_for_loader_workers():
    transform = TrainClip(4, 1, 16, min_scale=1.0, randaugment="rand-m10-n4-mstd0.5-inc1", random_erasing=0.5)
    copy = pickle.loads(pickle.dumps(transform))
    ref = _static_clip()
    assert torch.equal(_run(copy, ref, 5), _run(transform, ref, 5))


def test_repeated_augmentation_gives_several_clips_of_one_decoded_video():
    frames = SyntheticVideos(1, size=16, length=16).render(0)
    source = _Frames(frames)
    transform = TrainClip(4, 2, 16, min_scale=0.5, hflip=0.5, randaugment=SPEC, repeats=2)
    random.seed(0)
    torch.manual_seed(0)
    item = transform(VideoRef(source, 0, "v", 1))
    assert item["video"].shape == (2, 3, 4, 16, 16) and item["label"] == 1
    assert source.reads == 1  # both clips' frames come from one pass over the file
    assert not torch.equal(item["video"][0], item["video"][1])


def _stage(**overrides) -> VideoStage:
    return VideoStage(build_config(VideoConfig, None, {**TINY, **overrides}))


def test_the_loss_flattens_repeated_clips_and_repeats_their_labels():
    stage = _stage(repeated_aug=2, label_smoothing=0.0)
    model = stage.build_model(None).eval()
    seen = []
    model.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape))
    torch.manual_seed(0)
    clips, labels = torch.randn(3, 2, 3, 4, 16, 16), torch.tensor([0, 3, 1])
    loss, _ = stage.loss(model, {"video": clips, "label": labels})
    assert seen[-1] == (6, 3, 4, 16, 16)
    expected = torch.nn.functional.cross_entropy(model(clips.flatten(0, 1)), torch.tensor([0, 0, 3, 3, 1, 1]))
    assert torch.allclose(loss, expected)
    mixing = _stage(repeated_aug=2, mixup=0.8, cutmix=1.0)
    mixing.loss(model, {"video": clips, "label": labels})
    assert seen[-1] == (6, 3, 4, 16, 16)  # mixup/cutmix mix the flattened clips
    assert stage.flops_per_sample() == pytest.approx(2 * _stage().flops_per_sample())  # a sample is a video


def test_head_dropout_reaches_the_models_head_drop():
    assert _stage(head_dropout=0.3).build_model(None).head_drop.p == 0.3
    assert _stage().build_model(None).head_drop.p == 0.0


def test_recipe_keys_default_off_and_bad_values_fail_naming_the_key():
    cfg = VideoConfig()
    assert (cfg.randaugment, cfg.random_erasing, cfg.repeated_aug, cfg.head_dropout) == ("", 0.0, 1, 0.0)
    for spec in ("rand-m9-mstd", "rnd-m9", "rand-m7-x3", "rand-tfoo", "autoaug"):
        with pytest.raises(ConfigError, match="'randaugment'") as error:
            build_config(VideoConfig, None, [f"randaugment={spec}"])
        assert "\n" not in str(error.value) and spec in str(error.value)
    build_config(VideoConfig, None, ["randaugment=rand-m7-n4-mstd0.5-inc1"])
    for override, key in (("repeated_aug=0", "repeated_aug"), ("random_erasing=1.5", "random_erasing"),
                          ("head_dropout=1", "head_dropout")):
        with pytest.raises(ConfigError, match=f"'{key}'"):
            build_config(VideoConfig, None, [override])


def test_a_run_with_the_whole_recipe_counts_videos_per_step(tmp_path):
    out = tmp_path / "video"
    results = train(_stage(out_dir=str(out), repeated_aug=2, randaugment=SPEC, random_erasing=0.5,
                           head_dropout=0.3, clip_grad=5.0, mixup=0.8, cutmix=1.0))
    assert 0 <= results["top1"] <= 100
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [row for row in steps if "loss" in row]
    assert [row["epoch"] for row in losses] == [0.5, 1.0]  # batch_size=8 of 16 videos, 16 clips a step
    assert all(np.isfinite(row["loss"]) for row in losses)

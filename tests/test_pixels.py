"""decode=pil|tensor|gpu: the training stages' image paths give the same batches, skip bad files, resume."""

import io

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from prepretrain.config import ConfigError, build_config
from prepretrain.data.images.decode import EncodedImage
from prepretrain.data.images.pixels import DeviceAugment, train_pixels
from prepretrain.data.loader import SampleStream, train_loader
from prepretrain.data.synthetic.export import write_synthetic
from prepretrain.stages.finetune import FinetuneConfig
from prepretrain.stages.mae import MAEConfig, MAEStage
from prepretrain.stages.wsp import WSPConfig, WSPStage
from prepretrain.train.engine import train
from prepretrain.train.run import Run

COMMON = ["batch_size=8", "steps=3", "ckpt_every=100", "log_every=1", "eval_images=16", "progress=false",
          "tensorboard=false", "warmup_steps=1"]
TINY = [*COMMON, "decoder_embed_dim=32", "decoder_depth=1", "decoder_num_heads=2"]


@pytest.fixture(scope="module")
def jpeg_folder(tmp_path_factory):
    """The synthetic set as 64 px JPEGs (larger than the 32 px crops, so resizing really happens)."""
    root = tmp_path_factory.mktemp("jpegs")
    write_synthetic(root, num_images=48, image_size=64, splits=("train", "val"), sizes={"train": 48, "val": 16},
                    image_format="jpg")
    return root


def first_batches(cfg, stage_cls, count=2):
    """The first ``count`` micro-batches a stage trains on, after its device transform (CPU)."""
    stage = stage_cls(cfg)
    data = stage.train_data(Run.of_stage(stage))
    stream = SampleStream(data.num_samples, cfg.batch_size, seed=cfg.seed)
    loader = iter(train_loader(data.dataset, stream))
    batches = []
    for index in range(count):
        batch = next(loader)
        if data.device_transform is not None:
            batch = data.device_transform(batch, torch.device("cpu"), seed=cfg.seed, position=index * cfg.batch_size)
        batches.append(batch)
    return batches


def test_tensor_and_device_decoding_give_identical_batches(jpeg_folder, tmp_path):
    """decode=gpu (run on the CPU here) crops and flips each sample exactly as decode=tensor:
    same seeds, same decoder (libjpeg-turbo), same uint8 resize kernel -> equal tensors."""
    common = [*TINY, f"data={jpeg_folder / 'train.jsonl'}", f"out_dir={tmp_path}"]
    by_mode = {mode: first_batches(build_config(MAEConfig, None, [*common, f"decode={mode}"]), MAEStage)
               for mode in ("tensor", "gpu", "pil")}
    for tensor_batch, gpu_batch, pil_batch in zip(by_mode["tensor"], by_mode["gpu"], by_mode["pil"]):
        assert tensor_batch["image"].dtype == torch.float32 and tensor_batch["image"].shape == (8, 3, 32, 32)
        assert torch.equal(tensor_batch["image"], gpu_batch["image"])
        assert gpu_batch["_skipped"] == [] and gpu_batch["_seen"] == 8
        # The Pillow path draws its crops differently, but normalises to the same statistics.
        assert pil_batch["image"].shape == tensor_batch["image"].shape
        assert abs(pil_batch["image"].mean() - tensor_batch["image"].mean()) < 0.5
    assert not torch.equal(by_mode["tensor"][0]["image"], by_mode["tensor"][1]["image"])


def test_wsp_device_decoding_keeps_tags_with_their_images(jpeg_folder, tmp_path):
    common = [*COMMON, f"data={jpeg_folder / 'train.jsonl'}", f"out_dir={tmp_path}", "vocab_min_count=1"]
    tensor = first_batches(build_config(WSPConfig, None, [*common, "decode=tensor"]), WSPStage, count=1)[0]
    gpu = first_batches(build_config(WSPConfig, None, [*common, "decode=gpu"]), WSPStage, count=1)[0]
    assert torch.equal(tensor["image"], gpu["image"])
    assert torch.equal(tensor["tags"], gpu["tags"])


def _jpeg(colour: tuple[int, int, int], size: int = 48) -> bytes:
    """A JPEG of ``colour`` with mild noise, so most of the file is scan data."""
    noise = np.random.default_rng(sum(colour)).integers(-20, 21, (size, size, 3))
    pixels = np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def test_device_augment_drops_undecodable_files_and_keeps_rows_aligned():
    good = [_jpeg((255, 0, 0)), _jpeg((0, 255, 0)), _jpeg((0, 0, 255))]
    cut = good[1][: len(good[1]) * 3 // 4]  # header fine (passes the worker's check), scan data cut off
    batch = {
        "image": [EncodedImage(good[0], "red"), EncodedImage(cut, "cut"), EncodedImage(good[2], "blue")],
        "tags": torch.tensor([[0], [1], [2]]),
        "caption": ["r", "c", "b"],
        "_skipped": [("empty", "earlier")],
        "_seen": 4,
    }
    out = DeviceAugment(16, (0.5, 1.0))(batch, torch.device("cpu"), seed=0, position=0)
    assert out["image"].shape == (2, 3, 16, 16)
    assert out["tags"].tolist() == [[0], [2]]
    assert out["caption"] == ["r", "b"]
    assert out["_skipped"] == [("empty", "earlier"), ("truncated", "cut")]
    assert out["_seen"] == 4
    # Red stays red and blue stays blue: rows were not shuffled (normalised channel means).
    means = out["image"].mean(dim=(2, 3))
    assert means[0, 0] > means[0, 2] and means[1, 2] > means[1, 0]


def test_bytes_mode_checks_headers_in_the_worker(tmp_path):
    """Empty and non-image files fail where they are read, with their reason, not later on the device."""
    from prepretrain.data.images.decode import load_pixels
    from prepretrain.data.records import BadSample

    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_bytes(b"hello, not an image")
    (tmp_path / "ok.jpg").write_bytes(_jpeg((10, 20, 30)))
    for name, reason in (("empty.jpg", "empty"), ("text.jpg", "not_image")):
        with pytest.raises(BadSample) as error:
            load_pixels(tmp_path / name, name, pixels="bytes")
        assert error.value.reason == reason
    encoded = load_pixels(tmp_path / "ok.jpg", "ok", pixels="bytes")
    assert isinstance(encoded, EncodedImage) and encoded.key == "ok" and encoded == (tmp_path / "ok.jpg").read_bytes()


def test_decode_errors_name_the_key():
    with pytest.raises(ConfigError, match="decode"):
        build_config(MAEConfig, None, ["decode=nvjpeg"])
    with pytest.raises(ConfigError, match="decode.*synthetic"):
        build_config(MAEConfig, None, ["decode=gpu"])  # the default data is the in-memory synthetic set
    with pytest.raises(ConfigError, match="decode.*RandAugment"):
        build_config(FinetuneConfig, None, ["decode=tensor"])
    assert train_pixels("auto", "synthetic", 32, 0.2).mode == "tensor"


class Interrupted(Exception):
    pass


class StopsAtStep3(MAEStage):
    """Dies after its third optimizer step: the checkpoint of step 2 is on disk, step 3 is lost."""

    def after_step(self, model, step):
        if step == 3:
            raise Interrupted


@pytest.mark.parametrize("mode", ["tensor", "gpu"])
def test_mae_resumes_exactly_with_each_decode_mode(jpeg_folder, tmp_path, mode):
    common = [*TINY, f"data={jpeg_folder / 'train.jsonl'}", f"decode={mode}", "steps=4", "ckpt_every=2"]
    straight = train(MAEStage(build_config(MAEConfig, None, [*common, f"out_dir={tmp_path / 'straight'}"])))
    resumed_cfg = build_config(MAEConfig, None, [*common, f"out_dir={tmp_path / 'resumed'}"])
    with pytest.raises(Interrupted):
        train(StopsAtStep3(resumed_cfg))
    resumed = train(MAEStage(resumed_cfg))
    assert straight["skipped"]["skipped"] == {} and np.isfinite(straight["final_loss"])
    assert resumed["final_loss"] == straight["final_loss"]
    a = load_file(tmp_path / "straight" / "encoder.safetensors")
    b = load_file(tmp_path / "resumed" / "encoder.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

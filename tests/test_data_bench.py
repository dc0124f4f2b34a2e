"""Fast decoding and tensor augmentation (data/images/tensors.py, CPU code path) and ``prepretrain bench data``.

The GPU path runs the same functions on CUDA tensors; here they run on CPU and are checked
against independent computations: torchvision's crop sampling, Pillow's bicubic resize,
Pillow's decoder with EXIF handling, and the textbook normalisation.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from prepretrain.bench.data import BenchDataConfig, photo_like, run_data_benchmark
from prepretrain.cli import main
from prepretrain.config import ConfigError, build_config
from prepretrain.data.images.decode import load_image, load_tensor
from prepretrain.data.images.tensors import (
    BatchAugment,
    NormalizeImages,
    TensorRandomResizedCrop,
    crop_box_from_uniform,
    crop_boxes_from_uniform,
    decode_batch,
    normalize_uint8,
    resized_crop,
    sample_crop_boxes,
)
from prepretrain.data.images.transforms import IMAGENET_MEAN, IMAGENET_STD
from prepretrain.data.loader import RecordDataset, SampleStream, train_loader
from prepretrain.data.records import BadSample


def encode(image: Image.Image, format: str = "JPEG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def photo(width: int = 96, height: int = 72, seed: int = 0) -> Image.Image:
    return photo_like(width, height, np.random.default_rng(seed))


def as_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


# ---- crop boxes -------------------------------------------------------------------------
def test_crop_boxes_follow_torchvision_random_resized_crop() -> None:
    sizes = torch.tensor([[375, 500], [600, 800], [480, 480]]).repeat(1500, 1)
    boxes = sample_crop_boxes(sizes, (0.2, 1.0), (3 / 4, 4 / 3), torch.Generator().manual_seed(0)).double()
    top, left, height, width = boxes.unbind(1)
    heights, widths = sizes[:, 0].double(), sizes[:, 1].double()
    assert bool((top >= 0).all() and (left >= 0).all())
    assert bool((top + height <= heights).all() and (left + width <= widths).all())
    area = height * width / (heights * widths)
    assert float(area.min()) >= 0.2 - 0.01 and float(area.max()) <= 1.0
    torch.manual_seed(0)
    reference = []
    for h, w in sizes[:1500].tolist():
        _, _, crop_h, crop_w = T.RandomResizedCrop.get_params(torch.empty(3, h, w), (0.2, 1.0), (3 / 4, 4 / 3))
        reference.append((crop_h * crop_w / (h * w), math.log(crop_w / crop_h)))
    reference_area, reference_log_aspect = (torch.tensor(column, dtype=torch.float64) for column in zip(*reference))
    ours_area, ours_log_aspect = area[:1500], torch.log(width / height)[:1500]
    # same distribution: means and spreads agree to sampling error (1500 draws)
    assert abs(float(ours_area.mean() - reference_area.mean())) < 0.03
    assert abs(float(ours_area.std() - reference_area.std())) < 0.03
    assert abs(float(ours_log_aspect.mean() - reference_log_aspect.mean())) < 0.03
    assert abs(float(ours_log_aspect.std() - reference_log_aspect.std())) < 0.03


def test_crop_box_falls_back_to_a_centred_crop_with_clamped_ratio() -> None:
    never_fits = torch.ones(2, 10, 4, dtype=torch.float64)  # area 1 with the widest ratio never fits these
    sizes = torch.tensor([[10, 1000], [1000, 10]])
    boxes = crop_boxes_from_uniform(sizes, never_fits, (0.9, 1.0), (3 / 4, 4 / 3)).tolist()
    # wide image: full height, width = round(10 * 4/3) = 13, centred; tall: width 10, height round(10 / 0.75) = 13
    assert boxes == [[0, (1000 - 13) // 2, 10, 13], [(1000 - 13) // 2, 0, 13, 10]]


def test_scalar_and_batched_crop_boxes_agree_on_the_same_draws() -> None:
    generator = torch.Generator().manual_seed(3)
    sizes = torch.randint(16, 900, (400, 2), generator=generator)
    draws = torch.rand(400, 10, 4, generator=generator, dtype=torch.float64)
    batched = crop_boxes_from_uniform(sizes, draws, (0.08, 1.0), (3 / 4, 4 / 3)).tolist()
    scalar = [
        list(crop_box_from_uniform(h, w, rows, (0.08, 1.0), (3 / 4, 4 / 3)))
        for (h, w), rows in zip(sizes.tolist(), draws.tolist())
    ]
    assert batched == scalar


# ---- resize, flip, normalise -------------------------------------------------------------
@pytest.mark.parametrize("box", [(10, 20, 50, 70), (0, 0, 72, 96), (5, 7, 20, 25)])  # shrink, whole, enlarge
def test_resized_crop_matches_pillow_bicubic(box: tuple[int, int, int, int]) -> None:
    image = photo()
    top, left, height, width = box
    pillow = as_tensor(image.resize((32, 32), Image.Resampling.BICUBIC, box=(left, top, left + width, top + height)))
    ours = resized_crop(as_tensor(image), box, 32)
    assert ours.dtype == torch.uint8 and ours.shape == (3, 32, 32)
    difference = (ours.int() - pillow.int()).abs()
    assert int(difference.max()) <= 2 and float(difference.float().mean()) < 0.1
    float_kernel = resized_crop(as_tensor(image), box, 32, float_kernel=True)  # the CUDA code path
    assert float_kernel.dtype == torch.float32
    assert float((float_kernel - ours.float()).abs().max()) <= 1.5  # uint8 kernel: fixed-point weights
    torch.testing.assert_close(resized_crop(as_tensor(image), box, 32, flip=True), ours.flip(-1))


def test_normalize_matches_to_tensor_then_normalize() -> None:
    pixels = torch.randint(0, 256, (5, 3, 8, 8), dtype=torch.uint8)
    expected = torch.stack([T.Normalize(IMAGENET_MEAN, IMAGENET_STD)(image.float() / 255) for image in pixels])
    torch.testing.assert_close(normalize_uint8(pixels), expected, rtol=1e-5, atol=1e-5)
    batch = NormalizeImages()({"image": pixels, "label": torch.arange(5)})
    torch.testing.assert_close(batch["image"], expected, rtol=1e-5, atol=1e-5)
    assert pixels.dtype == torch.uint8  # the input is left alone


def test_tensor_random_resized_crop_is_seeded_and_matches_its_parts() -> None:
    image = photo(120, 90, seed=4)
    transform = TensorRandomResizedCrop(24, (0.2, 1.0))
    torch.manual_seed(11)
    out = transform(image)
    torch.manual_seed(11)
    draws = torch.rand(11, 4, dtype=torch.float64).tolist()
    box = crop_box_from_uniform(90, 120, draws[:10], (0.2, 1.0), (3 / 4, 4 / 3))
    expected = resized_crop(as_tensor(image), box, 24, flip=draws[10][0] < 0.5)
    assert torch.equal(out, expected)
    torch.manual_seed(11)
    assert torch.equal(transform(as_tensor(image)), out)  # a uint8 tensor gives the same crop as the PIL image


def test_tensor_path_through_the_loader_gives_normalised_float_batches(tmp_path: Path) -> None:
    for index in range(6):
        (tmp_path / f"{index}.jpg").write_bytes(encode(photo(seed=index), quality=90))
    from prepretrain.data.readers.folders import FolderSource

    source = FolderSource(tmp_path, pixels="tensor")
    assert source.get(0).image.dtype == torch.uint8 and source.get(0).image.shape == (3, 72, 96)
    crop = TensorRandomResizedCrop(16)
    dataset = RecordDataset(source, lambda record: {"image": crop(record.image)}, batch_transform=NormalizeImages())
    batch = next(iter(train_loader(dataset, SampleStream(6, 6, seed=2))))
    assert batch["image"].dtype == torch.float32 and batch["image"].shape == (6, 3, 16, 16)
    # the same as decoding with Pillow and cropping under each position's seed, normalised by hand
    pillow = FolderSource(tmp_path)
    expected = []
    for index, seed in next(iter(SampleStream(6, 6, seed=2))):
        torch.manual_seed(seed)
        pixels = crop(pillow.get(index).image).float() / 255
        expected.append(T.Normalize(IMAGENET_MEAN, IMAGENET_STD)(pixels))
    torch.testing.assert_close(batch["image"], torch.stack(expected), rtol=1e-5, atol=1e-5)


# ---- decoding ---------------------------------------------------------------------------
def exif_rotated(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(photo(48, 32, seed=orientation), quality=92, exif=exif)


def cases() -> dict[str, bytes]:
    good = photo(64, 48, seed=1)
    return {
        "plain": encode(good, quality=90),
        "grey": encode(good.convert("L"), quality=90),
        "cmyk": encode(good.convert("CMYK"), quality=90),
        "png": encode(good, "PNG"),
        "rotated6": exif_rotated(6),
        "rotated3": exif_rotated(3),
        "truncated": encode(good, quality=90)[:400],
        "text": b"not a picture at all" * 3,
        "empty": b"",
    }


def test_decode_batch_and_load_tensor_agree_with_pillow_on_pixels_and_reasons() -> None:
    data = cases()
    keys = list(data)
    images, bad = decode_batch([data[key] for key in keys], keys)
    reasons = dict((key, reason) for reason, key in bad)
    for key, image in zip(keys, images):
        try:
            expected = as_tensor(load_image(data[key], key))
        except BadSample as error:
            assert image is None and reasons[key] == error.reason, key
            with pytest.raises(BadSample) as caught:
                load_tensor(data[key], key)
            assert caught.value.reason == error.reason
            continue
        assert image is not None and image.dtype == torch.uint8, key
        assert torch.equal(image, expected), key  # the same libjpeg-turbo decode, same EXIF rotation
        assert torch.equal(load_tensor(data[key], key), expected), key
    assert set(reasons) == {"truncated", "text", "empty"}
    assert images[keys.index("rotated6")].shape == (3, 48, 32)  # stored 48 x 32, shown rotated


def test_truncated_jpeg_never_reaches_a_decoder_that_does_not_notice(monkeypatch) -> None:
    """nvJPEG returns a cut-off JPEG as an image with a grey tail; such files must go to Pillow."""
    import prepretrain.data.images.tensors as gpu

    handed_over = []

    def lenient_decoder(encoded, device="cpu"):  # what nvJPEG does: no error, some pixels
        handed_over.extend(encoded)
        return [torch.zeros(3, 48, 64, dtype=torch.uint8) for _ in encoded]

    monkeypatch.setattr(gpu, "decode_jpeg_tensors", lenient_decoder)
    data = cases()
    images, bad = gpu.decode_batch([data["plain"], data["truncated"]], ["plain", "truncated"])
    with pytest.raises(BadSample) as pillow:
        load_image(data["truncated"], "truncated")
    assert bad == [(pillow.value.reason, "truncated")] and images[1] is None
    assert handed_over == [data["plain"]]
    padded = data["plain"] + b"\x00" * 7  # zero padding after the end marker is still a complete file
    assert gpu.jpeg_looks_complete(padded) and not gpu.jpeg_looks_complete(data["truncated"])


def test_batch_augment_equals_its_parts_and_reports_bad_samples() -> None:
    data = cases()
    keys = list(data)
    augment = BatchAugment(20, (0.3, 1.0))
    batch = augment([data[key] for key in keys], keys, torch.Generator().manual_seed(5))
    good = [key for key in keys if key not in ("truncated", "text", "empty")]
    assert batch["_seen"] == len(keys) and batch["image"].shape == (len(good), 3, 20, 20)
    assert sorted(key for _, key in batch["_skipped"]) == ["empty", "text", "truncated"]
    generator = torch.Generator().manual_seed(5)
    pictures = [as_tensor(load_image(data[key], key)) for key in good]
    boxes = sample_crop_boxes([p.shape[-2:] for p in pictures], (0.3, 1.0), (3 / 4, 4 / 3), generator)
    flips = torch.rand(len(good), generator=generator) < 0.5
    expected = normalize_uint8(
        torch.stack([resized_crop(p, box, 20, flip=bool(f)) for p, box, f in zip(pictures, boxes.tolist(), flips)])
    )
    torch.testing.assert_close(batch["image"], expected)
    assert augment([data["text"]], ["text"]) == {"_skipped": [("not_image", "text")], "_seen": 1}


# ---- the benchmark command --------------------------------------------------------------
def test_photo_like_images_compress_like_photos() -> None:
    data = encode(photo(640, 480, seed=0), quality=90)
    bits_per_pixel = 8 * len(data) / (640 * 480)
    assert 1.0 < bits_per_pixel < 4.0  # noise would be ~8, a flat picture ~0.2


@pytest.mark.parametrize(
    ("override", "key"),
    [("min_scale=0", "min_scale"), ("max_width=10", "max_width"), ("paths=baseline,turbo", "paths"),
     ("quality=101", "quality"), ("device=cpu", "device"), ("threads=0", "threads")],
)
def test_bench_config_mistakes_name_the_key(override: str, key: str) -> None:
    with pytest.raises(ConfigError) as caught:
        build_config(BenchDataConfig, None, [override])
    assert caught.value.key == key


def test_bench_data_runs_every_cpu_path_on_generated_jpegs(tmp_path: Path, capsys) -> None:
    cfg = build_config(
        BenchDataConfig, None,
        ["num_images=6", "image_size=32", "min_width=64", "max_width=96", "batch_size=4", "repeats=2",
         f"json_out={tmp_path / 'bench.json'}"],
    )  # fmt: skip
    results = run_data_benchmark(cfg)
    expected_paths = ["baseline", "draft", "tensor", "batch_cpu"] + (["gpu"] if torch.cuda.is_available() else [])
    assert list(results["paths"]) == expected_paths
    assert results["images"] == 6 and results["paths"]["baseline"]["ratio"] == 1.0
    for name, figures in results["paths"].items():
        assert figures["samples_per_s"] > 0 and len(figures["all_runs"]) == 2, name
        baseline = results["paths"]["baseline"]["samples_per_s"]
        assert figures["ratio"] == pytest.approx(figures["samples_per_s"] / baseline, abs=0.01)
    assert json.loads((tmp_path / "bench.json").read_text())["paths"].keys() == results["paths"].keys()
    printed = capsys.readouterr().out
    assert "vs baseline" in printed and "batch_cpu" in printed


def test_bench_data_cli_reads_a_folder_and_rejects_bad_keys(tmp_path: Path, capsys) -> None:
    for index in range(3):
        (tmp_path / f"{index}.jpg").write_bytes(encode(photo(seed=index), quality=85))
    code = main(["bench", "data", f"images_dir={tmp_path}", "image_size=16", "batch_size=2", "repeats=1",
                 "paths=baseline,tensor"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "3 JPEGs" in printed and "tensor" in printed and "draft" not in printed
    assert main(["bench", "data", "num_image=3"]) == 2
    assert "num_image" in capsys.readouterr().err

"""Every kind of bad or unusual input is either converted to correct RGB or skipped with its reason."""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from prepretrain.data.images.decode import load_image, load_tensor, probe_image
from prepretrain.data.readers.folders import FolderSource, ManifestSource
from prepretrain.data.records import BadSample
from prepretrain.data.shards.reader import ShardSource
from prepretrain.data.shards.write import write_shards


def encode(image: Image.Image, format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **options)
    return buffer.getvalue()


def noise(width: int = 64, height: int = 48, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def corrupt_png() -> bytes:
    data = bytearray(encode(noise(), "PNG"))
    data[120:200] = bytes(range(80))  # inside the compressed IDAT stream
    return bytes(data)


def truncated_jpeg() -> bytes:
    data = encode(noise(), "JPEG", quality=90)
    return data[: len(data) // 2]


def jpeg_header_then_garbage() -> bytes:
    return b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4


# ---- inputs that must be skipped, with the reason that gets counted ----------------------
SKIPPED: dict[str, tuple[Callable[[], bytes], str]] = {
    "corrupt_bytes_png": (corrupt_png, "unreadable"),
    "corrupt_header_jpeg": (jpeg_header_then_garbage, "unreadable"),
    "truncated_jpeg": (truncated_jpeg, "truncated"),
    "zero_bytes": (lambda: b"", "empty"),
    "text_named_jpg": (lambda: b"this is a caption, not a picture\n" * 3, "not_image"),
}


@pytest.mark.parametrize("name", sorted(SKIPPED))
@pytest.mark.parametrize("as_file", [True, False])
def test_bad_image_is_skipped_with_reason(tmp_path: Path, name: str, as_file: bool) -> None:
    make, reason = SKIPPED[name]
    data = make()
    target: Path | bytes = data
    if as_file:
        target = tmp_path / f"{name}.jpg"
        target.write_bytes(data)
    with pytest.raises(BadSample) as caught:
        load_image(target, key=name)
    assert caught.value.reason == reason
    assert caught.value.key == name


@pytest.mark.parametrize("name", sorted(SKIPPED))
def test_tensor_decoding_skips_with_the_same_reason(name: str) -> None:
    make, reason = SKIPPED[name]
    with pytest.raises(BadSample) as caught:
        load_tensor(make(), key=name)  # torchvision's decoder first, Pillow names the reason
    assert (caught.value.reason, caught.value.key) == (reason, name)
    with pytest.raises(BadSample) as caught:
        probe_image(png_claiming_size(20_000, 20_000), "bomb")  # header checks before any GPU decode
    assert caught.value.reason == "too_large"


@pytest.mark.parametrize("orientation", range(1, 9))
def test_tensor_decoding_applies_every_exif_orientation_like_pillow(orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = encode(noise(40, 24, seed=orientation), "JPEG", quality=95, exif=exif.tobytes())
    expected = np.asarray(load_image(data, "pil"))
    assert probe_image(data, "x").upright_size == (expected.shape[1], expected.shape[0])
    tensor = load_tensor(data, "tensor")
    assert tensor.dtype == torch.uint8
    np.testing.assert_array_equal(tensor.permute(1, 2, 0).numpy(), expected)


def png_claiming_size(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims a huge size: what a decompression bomb looks like to Pillow."""
    data = bytearray(encode(Image.new("1", (1, 1)), "PNG"))
    header = struct.pack(">II", width, height)
    data[16:24] = header  # IHDR data starts at byte 16: width, height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # CRC over type + data
    return bytes(data)


def test_decompression_bomb_is_too_large_and_global_limit_untouched(tmp_path: Path) -> None:
    limit_before = Image.MAX_IMAGE_PIXELS
    data = encode(Image.new("RGB", (300, 200), "red"), "PNG")
    with pytest.raises(BadSample) as caught:
        load_image(data, "bomb", max_pixels=300 * 200 - 1)
    assert caught.value.reason == "too_large"
    assert load_image(data, "fits", max_pixels=300 * 200).size == (300, 200)
    # Pillow's own (global) guard is reported the same way, and never changed by us.
    huge_header = png_claiming_size(20_000, 20_000)  # 4e8 pixels claimed by a 70-byte file
    with pytest.raises(BadSample) as caught:
        load_image(huge_header, "pillow-bomb")
    assert caught.value.reason == "too_large"
    assert Image.MAX_IMAGE_PIXELS == limit_before


def test_missing_file_is_missing_file(tmp_path: Path) -> None:
    with pytest.raises(BadSample) as caught:
        load_image(tmp_path / "gone.png", "gone")
    assert caught.value.reason == "missing_file"


# ---- inputs that must come out as correct RGB --------------------------------------------
def rgb(data: bytes) -> np.ndarray:
    image = load_image(data, "x")
    assert image.mode == "RGB"
    return np.asarray(image).astype(int)


def test_cmyk_jpeg_becomes_rgb() -> None:
    cmyk = Image.new("CMYK", (32, 16), (0, 255, 255, 0))  # pure red in print colours
    out = rgb(encode(cmyk, "JPEG", quality=95))
    assert out.shape == (16, 32, 3)
    assert np.abs(out - [255, 0, 0]).max() <= 3


def test_grayscale_becomes_three_equal_channels() -> None:
    ramp = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (8, 1))
    out = rgb(encode(Image.fromarray(ramp, mode="L"), "PNG"))
    assert out.shape == (8, 64, 3)
    np.testing.assert_array_equal(out[..., 0], ramp)
    np.testing.assert_array_equal(out[..., 1], out[..., 2])


def test_sixteen_bit_png_is_scaled_not_clipped() -> None:
    values = np.array([[0, 257, 32896, 65535]], dtype=np.uint16)  # 0, 1, 128, 255 in 8 bits
    out = rgb(encode(Image.fromarray(values), "PNG"))
    np.testing.assert_array_equal(out[0, :, 0], [0, 1, 128, 255])
    np.testing.assert_array_equal(out[..., 0], out[..., 2])


def test_thirty_two_bit_integer_image_in_sixteen_bit_range() -> None:
    values = np.array([[0, 65535, 257 * 100]], dtype=np.int32)
    out = rgb(encode(Image.fromarray(values, mode="I"), "TIFF"))
    np.testing.assert_array_equal(out[0, :, 1], [0, 255, 100])


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_is_composited_on_white(mode: str) -> None:
    array = np.zeros((2, 3, 4), dtype=np.uint8)
    array[..., :3] = [200, 0, 0]  # a colour that is hidden where alpha is 0
    array[..., 3] = [[0, 255, 128], [0, 255, 128]]
    image = Image.fromarray(array, mode="RGBA")
    if mode == "LA":
        image = image.convert("LA")
    out = rgb(encode(image, "PNG"))
    shown = np.asarray(image.convert("RGBA").convert("RGB")).astype(int)[0, 1]  # the opaque pixel
    np.testing.assert_array_equal(out[0, 0], [255, 255, 255])  # transparent -> white, not the hidden colour
    np.testing.assert_array_equal(out[0, 1], shown)  # opaque -> unchanged
    expected_half = np.round(shown * 128 / 255 + 255 * (1 - 128 / 255))
    assert np.abs(out[0, 2] - expected_half).max() <= 1  # half transparent -> blended


def test_palette_with_transparency_uses_white_background() -> None:
    palette_image = Image.new("P", (4, 1))
    palette_image.putpalette([0, 0, 0, 0, 0, 255] + [0] * (254 * 3))
    palette_image.putdata([0, 1, 1, 0])
    for format in ("PNG", "GIF"):
        out = rgb(encode(palette_image, format, transparency=0))
        np.testing.assert_array_equal(out[0], [[255, 255, 255], [0, 0, 255], [0, 0, 255], [255, 255, 255]])
    opaque = rgb(encode(palette_image, "PNG"))
    np.testing.assert_array_equal(opaque[0, 0], [0, 0, 0])  # no transparency: palette colour kept


@pytest.mark.parametrize(
    ("orientation", "top", "bottom"),
    [(6, "red", "blue"), (8, "blue", "red")],  # 6: rotate 90 deg clockwise to view; 8: counter-clockwise
)
def test_exif_orientation_is_applied(orientation: int, top: str, bottom: str) -> None:
    stored = Image.new("RGB", (64, 32), "blue")
    stored.paste(Image.new("RGB", (32, 32), "red"), (0, 0))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = rgb(encode(stored, "JPEG", quality=95, exif=exif.tobytes()))
    assert out.shape == (64, 32, 3)  # width and height swapped: 32 wide, 64 tall
    colours = {"red": [255, 0, 0], "blue": [0, 0, 255]}
    assert np.abs(out[4:28].mean(axis=(0, 1)) - colours[top]).max() < 8
    assert np.abs(out[36:60].mean(axis=(0, 1)) - colours[bottom]).max() < 8


def test_draft_mode_decodes_a_smaller_jpeg_that_still_covers_the_hint() -> None:
    data = encode(noise(1024, 768), "JPEG", quality=90)
    full = load_image(data, "full")
    small = load_image(data, "small", min_size_hint=64)
    assert full.size == (1024, 768)
    assert 64 <= min(small.size) < 768
    assert small.size[0] / small.size[1] == pytest.approx(1024 / 768, rel=0.02)
    for hint in (100, 200, 384, 385, 700):
        assert min(load_image(data, "h", min_size_hint=hint).size) >= hint
    png = encode(noise(128, 96), "PNG")
    assert load_image(png, "png", min_size_hint=16).size == (128, 96)  # only JPEG has draft mode


# ---- sources: manifests and shards ------------------------------------------------------
def test_manifest_missing_file_is_skipped_at_read_time(tmp_path: Path) -> None:
    noise().save(tmp_path / "ok.png")
    (tmp_path / "m.jsonl").write_text('{"path": "ok.png"}\n{"path": "missing.png", "caption": "x"}\n')
    source = ManifestSource(tmp_path / "m.jsonl")  # construction does not stat files
    assert len(source) == 2
    assert source.get(0).image.size == (64, 48)
    with pytest.raises(BadSample) as caught:
        source.get(1)
    assert (caught.value.reason, caught.value.key) == ("missing_file", "missing.png")


@pytest.mark.parametrize("suffix", [".jsonl", ".csv"])
def test_non_utf8_caption_is_replaced_not_skipped(tmp_path: Path, suffix: str) -> None:
    noise().save(tmp_path / "ok.png")
    latin1 = "café #été".encode("latin-1")
    if suffix == ".jsonl":
        content = b'{"path": "ok.png", "caption": "' + latin1 + b'", "hashtags": ["#ok"]}\n'
    else:
        content = b"path,caption,hashtags\nok.png," + latin1 + b",#ok\n"
    (tmp_path / f"m{suffix}").write_bytes(content)
    record = ManifestSource(tmp_path / f"m{suffix}").get(0)
    assert record.caption == "caf\ufffd #\ufffdt\ufffd"
    assert record.hashtags == ["#ok"]
    assert record.image.mode == "RGB"


def test_folder_source_skips_bad_files_with_reasons(tmp_path: Path) -> None:
    noise().save(tmp_path / "good.png")
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("hello")
    (tmp_path / "cut.jpg").write_bytes(truncated_jpeg())
    source = FolderSource(tmp_path)
    reasons = {}
    for index in range(len(source)):
        try:
            source.get(index)
            reasons[index] = "ok"
        except BadSample as error:
            reasons[error.key] = error.reason
    assert reasons == {"cut.jpg": "truncated", "empty.jpg": "empty", 2: "ok", "text.jpg": "not_image"}


def make_shard(tmp_path: Path) -> Path:
    """A shard of 4 samples, written by hand so one member can be broken."""
    path = tmp_path / "hand-000000.tar"
    with tarfile.open(path, "w") as archive:
        for index in range(4):
            image = encode(noise(seed=index), "PNG") if index != 2 else b"\x89PNG\r\n\x1a\nnot really"
            meta = json.dumps({"key": f"k{index}", "labels": {"label": index}}).encode()
            for name, payload in ((f"{index:04d}.png", image), (f"{index:04d}.json", meta)):
                info = tarfile.TarInfo(name)
                info.size = len(payload)
                archive.addfile(info, io.BytesIO(payload))
        info = tarfile.TarInfo("0009.json")  # a sample whose image member is absent
        info.size = 2
        archive.addfile(info, io.BytesIO(b"{}"))
    return path


def test_shard_with_broken_member_skips_only_that_sample(tmp_path: Path) -> None:
    source = ShardSource(make_shard(tmp_path))
    records = list(source.iter_records(shuffle=False))
    assert [record.key for record in records] == ["k0", "k1", "k3"]
    assert [record.labels for record in records] == [{"label": 0}, {"label": 1}, {"label": 3}]
    np.testing.assert_array_equal(np.asarray(records[2].image), np.asarray(noise(seed=3)))
    assert dict(source.skips.skipped) == {"unreadable": 1, "missing_image": 1}
    assert source.skips.examples["unreadable"] == "k2"
    assert source.skips.seen == 5


@pytest.mark.parametrize("cut", ["mid_member", "mid_header", "at_block", "damaged_header"])
def test_damaged_tar_is_counted_not_fatal(tmp_path: Path, cut: str) -> None:
    images = [noise(seed=index) for index in range(6)]

    class Source:
        class_names: dict = {}

        def __len__(self) -> int:
            return len(images)

        def get(self, index: int):
            from prepretrain.data.records import Record

            return Record(image=images[index], key=f"img{index}")

    (shard,) = write_shards(Source(), tmp_path / "s", samples_per_shard=10, verbose=False)
    data = bytearray(shard.read_bytes())
    with tarfile.open(shard) as archive:
        members = archive.getmembers()
    third = members[4]  # members: json, png per sample; [4] is sample 2's json
    if cut == "mid_member":
        data = data[: third.offset_data + 10]
    elif cut == "mid_header":
        data = data[: third.offset + 100]
    elif cut == "at_block":
        data = data[: third.offset]  # a clean 512-byte boundary, no end-of-archive marker
    else:
        data[third.offset : third.offset + 64] = b"\x07" * 64  # tarfile would stop here silently
    shard.write_bytes(bytes(data))
    for with_index in (True, False):
        if not with_index:
            (tmp_path / "s" / "index.json").unlink()
        source = ShardSource(tmp_path / "s")
        keys = [record.key for record in source.iter_records()]
        assert keys == ["img0", "img1"]
        assert source.skips.skipped["broken_shard"] == 1, source.skips.as_dict()


def test_a_file_skipped_on_every_read_is_named_once_with_its_reads():
    """A broken video read every epoch is one file in the report, not one per read (two broken
    files read 79 times each were reported as 158 'unreadable' with one example before)."""
    from prepretrain.data.records import MAX_NAMED_FILES, BadSample, SkipCounter

    counter, other = SkipCounter(), SkipCounter()
    for _ in range(79):
        counter.skip(BadSample("train/a/broken.mp4", "unreadable"))
        other.skip(BadSample("train/b/cut.webm", "unreadable"))
    other.skip(BadSample("train/b/x.mp4", "too_short"))
    counter.merge(other)
    assert counter.skipped == {"unreadable": 158, "too_short": 1}
    assert counter.as_dict()["distinct_files"] == {"unreadable": 2, "too_short": 1}
    assert counter.as_dict()["files"]["unreadable"] == {"train/a/broken.mp4": 79, "train/b/cut.webm": 79}
    assert counter.describe() == ("unreadable: 158 samples from 2 files (train/a/broken.mp4 (79 reads), "
                                  "train/b/cut.webm (79 reads)); too_short: 1 samples from 1 files "
                                  "(train/b/x.mp4 (1 read))")
    many = SkipCounter()
    for index in range(MAX_NAMED_FILES + 5):
        many.skip(BadSample(f"img{index}.jpg", "truncated"))
    assert many.skipped["truncated"] == MAX_NAMED_FILES + 5 and len(many.files["truncated"]) == MAX_NAMED_FILES
    assert f"from {MAX_NAMED_FILES}+ files" in many.describe() and "... 995 more" in many.describe()

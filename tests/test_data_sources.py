"""Folder, image-folder, manifest and shard sources agree with each other and split correctly."""

from __future__ import annotations

import csv
import json
import re
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from prepretrain.data.describe import describe_source
from prepretrain.data.images.decode import image_files
from prepretrain.data.readers.folders import FolderSource, ImageFolderSource, ManifestSource
from prepretrain.data.readers.open import open_source
from prepretrain.data.records import BadSample
from prepretrain.data.shards.reader import INDEX_NAME, ShardSource
from prepretrain.data.shards.write import write_shards


def noise_image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


# Relative paths of the small dataset: nested folders, a dotted file name (WebDataset would
# split it at the first dot), and lossless non-PNG formats that shards re-encode as PNG.
FILES = [
    "a/000.png",
    "a/001.png",
    "a/b/002.png",
    "a/b/003.v2.png",
    "c/004.png",
    "c/005.bmp",
    "c/006.png",
    "c/d/e/007.png",
    "008.png",
    "009.tif",
    "010.png",
    "011.png",
    "012.png",
]


def annotations_for(index: int) -> dict:
    return {
        "hashtags": [f"#tag{index % 4}", "#all"] if index % 5 else [],
        "caption": f"picture number {index}" if index % 3 else "",
        "labels": {"coarse": index % 3, "fine": index % 7},
    }


@pytest.fixture()
def dataset(tmp_path: Path) -> Path:
    """13 images under ``tmp_path/images`` plus ``train.jsonl`` listing them with annotations."""
    rows = []
    for index, relative in enumerate(FILES):
        path = tmp_path / "images" / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        noise_image(24 + index, 16 + 2 * index, seed=index).save(path)
        rows.append({"path": f"images/{relative}", **annotations_for(index)})
    (tmp_path / "images" / "notes.txt").write_text("not an image")
    (tmp_path / "images" / ".hidden.png").write_bytes(b"garbage")
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return tmp_path


def pixels(image: Image.Image) -> np.ndarray:
    assert image.mode == "RGB"
    return np.asarray(image)


def test_folder_manifest_and_shards_yield_the_same_samples(dataset: Path, capsys) -> None:
    folder = FolderSource(dataset / "images")
    manifest = ManifestSource(dataset / "train.jsonl")
    assert len(folder) == len(manifest) == len(FILES)
    assert [folder.get(i).key for i in range(len(folder))] == sorted(FILES)
    assert folder.get(0).hashtags == [] and folder.get(0).labels == {} and folder.class_names == {}

    shards = write_shards(manifest, dataset / "shards", samples_per_shard=4)
    assert [path.name for path in shards] == [f"shard-{i:06d}.tar" for i in range(4)]
    assert "wrote 13 samples to 4 shards" in capsys.readouterr().out
    index = json.loads((dataset / "shards" / INDEX_NAME).read_text())
    assert [entry["count"] for entry in index["shards"]] == [4, 4, 4, 1]
    shard_source = ShardSource(dataset / "shards")
    assert len(shard_source) == len(FILES)
    from_shards = {record.key: record for record in shard_source.iter_records()}
    assert shard_source.skips.total_skipped == 0

    by_folder_key = {folder.get(i).key: folder.get(i) for i in range(len(folder))}
    for index, relative in enumerate(FILES):
        expected = annotations_for(index)
        from_manifest = manifest.get(index)
        assert from_manifest.key == f"images/{relative}"
        assert from_manifest.hashtags == expected["hashtags"]
        assert from_manifest.caption == expected["caption"]
        assert from_manifest.labels == expected["labels"]
        assert from_manifest.image.size == (24 + index, 16 + 2 * index)
        original = pixels(noise_image(24 + index, 16 + 2 * index, seed=index))
        np.testing.assert_array_equal(pixels(from_manifest.image), original)
        np.testing.assert_array_equal(pixels(by_folder_key[relative].image), original)
        shard_record = from_shards[from_manifest.key]
        np.testing.assert_array_equal(pixels(shard_record.image), original)
        assert (shard_record.hashtags, shard_record.caption, shard_record.labels) == (
            expected["hashtags"],
            expected["caption"],
            expected["labels"],
        )


def test_write_shards_keeps_png_bytes_and_reencodes_other_formats(dataset: Path) -> None:
    import tarfile

    manifest = ManifestSource(dataset / "train.jsonl")
    write_shards(manifest, dataset / "shards", samples_per_shard=100, verbose=False)
    with tarfile.open(dataset / "shards" / "shard-000000.tar") as archive:
        names = archive.getnames()
        first_png = archive.extractfile("000000000.png").read()
        meta = json.loads(archive.extractfile("000000003.json").read())
    assert first_png == (dataset / "images" / FILES[0]).read_bytes()  # copied byte for byte
    assert "000000005.png" in names and "000000009.png" in names  # BMP and TIFF re-encoded
    assert meta["key"] == "images/a/b/003.v2.png" and meta["index"] == 3
    with pytest.raises(FileExistsError):
        write_shards(manifest, dataset / "shards", samples_per_shard=5, verbose=False)
    shards = write_shards(manifest, dataset / "shards", samples_per_shard=5, overwrite=True, verbose=False)
    assert len(shards) == 3 and len(list((dataset / "shards").glob("*.tar"))) == 3


def test_image_files_recurses_skips_hidden_and_non_images(tmp_path: Path) -> None:
    for relative in ["z.JPG", "a/b/c.png", "a/.git/x.png", ".hidden.png", "a/readme.md", "m.WebP", "n.jpeg"]:
        path = tmp_path / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".md":
            path.write_text("x")
        else:
            noise_image(8, 8, 0).save(path, format="PNG")
    found = [path.relative_to(tmp_path).as_posix() for path in image_files(tmp_path)]
    assert found == ["a/b/c.png", "m.WebP", "n.jpeg", "z.JPG"]


def test_image_folder_labels_follow_sorted_class_directories(tmp_path: Path) -> None:
    layout = {"dog": ["1.png", "deep/2.png"], "cat": ["3.png"], "emu": ["4.jpg", "5.png"]}
    for class_name, names in layout.items():
        for name in names:
            path = tmp_path / class_name / name
            path.parent.mkdir(parents=True, exist_ok=True)
            noise_image(10, 10, len(name)).save(path)
    (tmp_path / ".cache").mkdir()
    source = open_source(tmp_path)
    assert isinstance(source, ImageFolderSource)
    assert source.class_names == {"label": ["cat", "dog", "emu"]}
    assert source.num_classes("label") == 3 and source.num_classes_by_task == {"label": 3}
    labels = {source.get(i).key: source.get(i).labels["label"] for i in range(len(source))}
    assert labels == {"cat/3.png": 0, "dog/1.png": 1, "dog/deep/2.png": 1, "emu/4.jpg": 2, "emu/5.png": 2}
    stats = describe_source(source)
    assert stats["count"] == 5
    assert stats["labels"]["label"]["counts"] == {"cat": 1, "dog": 2, "emu": 2}


def test_csv_manifest_parses_hashtags_labels_and_paths(dataset: Path) -> None:
    absolute = dataset / "images" / FILES[1]
    with open(dataset / "list.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "hashtags", "caption", "label", "label_fine", "source_url"])
        writer.writerow([f"images/{FILES[0]}", "#sun, #beach|sea  #sky", 'a "quoted", caption', "2", "", "http://x"])
        writer.writerow([str(absolute), "", "", "", "11", ""])
    source = ManifestSource(dataset / "list.csv")
    first, second = source.get(0), source.get(1)
    assert first.hashtags == ["#sun", "#beach", "sea", "#sky"]
    assert first.caption == 'a "quoted", caption'
    assert first.labels == {"label": 2}
    assert second.labels == {"fine": 11} and second.hashtags == [] and second.caption == ""
    np.testing.assert_array_equal(pixels(second.image), pixels(noise_image(25, 18, seed=1)))
    assert source.num_classes_by_task == {"label": 3, "fine": 12}
    with pytest.raises(KeyError, match="unknown label task 'coarse'"):
        source.num_classes("coarse")


def test_jsonl_manifest_reads_class_names_sidecar(dataset: Path) -> None:
    names = {"coarse": ["x", "y", "z"], "fine": [f"f{i}" for i in range(7)]}
    (dataset / "classes.json").write_text(json.dumps({"class_names": names, "other": 1}))
    source = open_source(dataset, split="train")
    assert isinstance(source, ManifestSource)
    assert source.class_names == names
    assert (source.num_classes("coarse"), source.num_classes("fine")) == (3, 7)
    write_shards(source, dataset / "s", samples_per_shard=5, verbose=False)
    shards = ShardSource(dataset / "s")
    assert shards.class_names == names and shards.num_classes("fine") == 7
    stats = describe_source(source, max_images=4)
    assert stats["labels"]["coarse"]["counts"] == {"x": 5, "y": 4, "z": 4}
    assert stats["hashtags"]["images_without"] == 3  # indices 0, 5, 10
    assert stats["hashtags"]["top"][0] == ["#all", 10]
    assert stats["caption"]["empty"] == 5  # indices 0, 3, 6, 9, 12
    assert stats["image_size"]["decoded"] == 4 and stats["skipped"]["seen"] == 4
    json.dumps(stats)  # serialisable for the CLI


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"path": "a.png", "caption": "ok"', "malformed JSON"),
        ('{"caption": "no path"}', "missing or empty 'path'"),
        ('{"path": "a.png", "labels": {"coarse": "three"}}', "non-negative integer"),
        ('["a.png"]', "expected a JSON object"),
    ],
)
def test_malformed_manifest_row_is_a_counted_bad_sample_and_check_names_the_line(tmp_path: Path,
                                                                                    line: str, message: str) -> None:
    """Opening reads no row (any size opens at once); a malformed row is a ``bad_row`` skip when
    drawn, and ``check()`` (``prepretrain data check``) names it by file and line."""
    manifest = tmp_path / "bad.jsonl"
    manifest.write_text('{"path": "x.png"}\n\n' + line + "\n")
    source = ManifestSource(manifest)
    assert len(source) == 2 and source.annotation(0).key == "x.png"
    with pytest.raises(BadSample, match=message) as caught:
        source.annotation(1)
    assert caught.value.reason == "bad_row"
    report = source.check()
    assert report["rows"] == 2 and report["bad_rows"] == 1
    assert re.match(rf".*bad\.jsonl:3: .*{message}", report["examples"][0])


def test_csv_manifest_non_integer_label_is_a_bad_row_named_by_line(tmp_path: Path) -> None:
    (tmp_path / "bad.csv").write_text("path,label\nx.png,1\ny.png,cat\n")
    source = ManifestSource(tmp_path / "bad.csv")
    assert source.annotation(0).labels == {"label": 1}
    with pytest.raises(BadSample, match="column 'label' must be an integer"):
        source.annotation(1)
    assert re.match(r".*bad\.csv:3: column 'label' must be an integer", source.check()["examples"][0])
    assert source.num_classes("label") == 2  # the readable rows' labels


def test_manifest_index_is_built_once_streaming_and_follows_edits(tmp_path: Path, monkeypatch) -> None:
    """The row index is a cache file named by the manifest's path, size and mtime: reopening maps
    it (no second pass), an edited manifest gets a new one; CRLF endings and a last line without
    a newline are read whole; rows across the streaming chunk boundary are found."""
    import prepretrain.data.readers.rowindex as rowindex

    monkeypatch.setenv("PREPRETRAIN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(rowindex, "CHUNK_BYTES", 7)  # every row crosses a chunk boundary
    manifest = tmp_path / "m.jsonl"
    rows = [{"path": f"{i}.png", "caption": "c" * i} for i in range(20)]
    manifest.write_bytes(b"# comment\r\n" + b"\r\n".join(json.dumps(r).encode() for r in rows) + b"\r\n\r\n" +
                         json.dumps({"path": "last.png"}).encode())
    source = ManifestSource(manifest)
    assert len(source) == 21
    assert [source.annotation(i).key for i in (0, 7, 19, 20)] == ["0.png", "7.png", "19.png", "last.png"]
    assert source.annotation(13).caption == "c" * 13
    built = list((tmp_path / "cache" / "rows").glob("*.offsets"))
    assert len(built) == 1

    def no_second_pass(*args, **kwargs):
        raise AssertionError("the index was rebuilt")

    monkeypatch.setattr(rowindex, "build_row_offsets", no_second_pass)
    assert len(ManifestSource(manifest)) == 21
    monkeypatch.undo()
    monkeypatch.setenv("PREPRETRAIN_CACHE", str(tmp_path / "cache"))
    manifest.write_text(json.dumps({"path": "only.png"}) + "\n")
    assert [ManifestSource(manifest).annotation(0).key] == ["only.png"]


def test_open_source_resolves_every_layout(dataset: Path) -> None:
    manifest = ManifestSource(dataset / "train.jsonl")
    write_shards(manifest, dataset / "shards", samples_per_shard=4, verbose=False)
    assert isinstance(open_source(dataset, split="train"), ManifestSource)
    assert isinstance(open_source(dataset / "train.jsonl"), ManifestSource)
    with pytest.raises(FileNotFoundError, match="no 'val' split"):
        open_source(dataset, split="val")
    assert isinstance(open_source(dataset / "images", split="train"), FolderSource)  # no splits there
    by_dir = open_source(dataset / "shards")
    by_file = open_source(dataset / "shards" / "shard-000001.tar")
    by_braces = open_source(str(dataset / "shards" / "shard-{000000..000002}.tar"))
    assert isinstance(by_dir, ShardSource) and len(by_dir) == 13
    assert isinstance(by_file, ShardSource) and len(by_file) == 4
    assert isinstance(by_braces, ShardSource) and len(by_braces) == 12
    assert isinstance(open_source(dataset / "images", kind="imagefolder"), ImageFolderSource)
    with pytest.raises(FileNotFoundError):
        open_source(dataset / "nowhere")


def reader_keys(source: ShardSource, **kwargs) -> list[str]:
    return [record.key for record in source.iter_records(**kwargs)]


@pytest.mark.parametrize("samples_per_shard", [2, 3, 10])  # 7, 5 and 2 shards for 4 readers
def test_shards_split_across_ranks_and_workers_exactly_once(dataset: Path, samples_per_shard: int) -> None:
    write_shards(ManifestSource(dataset / "train.jsonl"), dataset / "s", samples_per_shard=samples_per_shard)
    source = ShardSource(dataset / "s")
    everything = sorted(f"images/{relative}" for relative in FILES)
    orders = []
    for epoch in range(3):
        per_reader = [
            reader_keys(source, rank=rank, world_size=2, worker_id=worker, num_workers=2, epoch=epoch, seed=7)
            for rank in range(2)
            for worker in range(2)
        ]
        combined = [key for keys in per_reader for key in keys]
        assert sorted(combined) == everything  # every sample once: none lost, none duplicated
        assert all(per_reader), "every reader gets work"
        orders.append(combined)
        again = reader_keys(source, rank=1, world_size=2, worker_id=0, num_workers=2, epoch=epoch, seed=7)
        assert again == per_reader[2]  # deterministic per (seed, epoch)
    if samples_per_shard < 10:
        assert len({tuple(order) for order in orders}) > 1  # the shard order changes with the epoch
    assert source.skips.total_skipped == 0


@pytest.mark.parametrize("with_index", [True, False])
@pytest.mark.parametrize("samples_per_shard", [3, 10])
@pytest.mark.parametrize("shuffle_block", [0, 4])
def test_shard_skip_resumes_exactly(dataset: Path, with_index: bool, samples_per_shard: int,
                                    shuffle_block: int) -> None:
    write_shards(ManifestSource(dataset / "train.jsonl"), dataset / "s", samples_per_shard=samples_per_shard)
    if not with_index:
        (dataset / "s" / INDEX_NAME).unlink()
    source = ShardSource(dataset / "s")
    assert source.count_source == ("index" if with_index else "counted") and source.num_samples == 13
    for rank in range(2):
        for worker in range(2):
            split = dict(rank=rank, world_size=2, worker_id=worker, num_workers=2, epoch=1, seed=3)
            full = reader_keys(source, shuffle_block=shuffle_block, **split)
            assert source.reader_count(**split) == len(full)
            assert sorted(full) == sorted(reader_keys(source, **split))  # the block shuffle only reorders
            for skip in range(len(full) + 2):
                assert reader_keys(source, skip=skip, shuffle_block=shuffle_block, **split) == full[skip:]


def test_shuffle_block_mixes_samples_across_shard_boundaries(dataset: Path) -> None:
    write_shards(ManifestSource(dataset / "train.jsonl"), dataset / "s", samples_per_shard=3, verbose=False)
    source = ShardSource(dataset / "s")
    plain = reader_keys(source, epoch=0, seed=1)
    blocked = [reader_keys(source, epoch=epoch, seed=1, shuffle_block=6) for epoch in (0, 1)]
    assert sorted(blocked[0]) == sorted(plain) and blocked[0] != plain
    # each block of 6 holds the same samples as the unshuffled stream's block, permuted
    for start in range(0, len(plain), 6):
        assert sorted(blocked[0][start : start + 6]) == sorted(plain[start : start + 6])
    assert blocked[0] != blocked[1]


def test_write_shards_can_shuffle_the_sample_order(dataset: Path) -> None:
    manifest = ManifestSource(dataset / "train.jsonl")
    write_shards(manifest, dataset / "s", samples_per_shard=5, verbose=False, shuffle_seed=0)
    keys = reader_keys(ShardSource(dataset / "s"), shuffle=False)
    in_source_order = [manifest.get(index).key for index in range(len(manifest))]
    assert sorted(keys) == sorted(in_source_order) and keys != in_source_order
    write_shards(manifest, dataset / "t", samples_per_shard=5, verbose=False, shuffle_seed=0)
    assert reader_keys(ShardSource(dataset / "t"), shuffle=False) == keys  # seeded: reproducible


def test_shard_source_without_index_counts_its_samples(dataset: Path) -> None:
    write_shards(ManifestSource(dataset / "train.jsonl"), dataset / "s", samples_per_shard=5, verbose=False)
    (dataset / "s" / INDEX_NAME).unlink()
    source = ShardSource(dataset / "s")
    assert len(source) == 13 and source.count_source == "counted" and bool(source)
    assert Counter(len(reader_keys(source, shuffle=False)) for _ in range(2)) == Counter({13: 2})
    stats = describe_source(source, max_images=3)
    assert stats["count"] == 13 and stats["annotations"]["read"] == 13 and stats["image_size"]["decoded"] == 3

"""Shards in the layout img2dataset writes (LAION, DataComp, ...) train without `prepretrain data shards`.

img2dataset writes ``00000.tar``, ``00001.tar``, ... with members ``<key>.jpg``, ``<key>.txt``
(caption) and ``<key>.json`` (key, caption, url, width, height, status and user columns), and
beside each tar ``00000_stats.json`` (``successes``: samples in the tar) and ``00000.parquet``.
There is no ``index.json``: sample counts come from the stats files, or from the tar headers.
"""

from __future__ import annotations

import io
import json
import math
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from prepretrain.data.describe import describe_source
from prepretrain.data.readers.open import open_data, open_source
from prepretrain.data.records import Record
from prepretrain.data.shards.reader import ShardSource, UnknownSampleCount

TAGS = ["dog", "beach", "sunset", "cat", "snow", "city"]
WORDS = ["a dog on a beach", "a red sunset", "a cat in the snow", "the city at night"]


def _add(archive: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = 0
    archive.addfile(info, io.BytesIO(payload))


def _jpeg(index: int) -> bytes:
    colour = ((index * 37) % 256, (index * 91) % 256, (index * 53) % 256)
    buffer = io.BytesIO()
    Image.new("RGB", (40, 36), colour).save(buffer, format="JPEG", quality=80)
    return buffer.getvalue()


def expected_tags(index: int) -> list[str]:
    return [TAGS[index % len(TAGS)], TAGS[(index + 2) % len(TAGS)]]


def expected_caption(index: int) -> str:
    return f"{WORDS[index % len(WORDS)]} #{index}"


def write_img2dataset(out: Path, *, shards: tuple[int, ...] = (10, 10, 7), stats: bool = True) -> Path:
    """img2dataset-layout shards in ``out``; sample ``i`` of the whole set has key ``f"{i:09d}"``.

    Shard 0 keeps the caption in its ``.json`` too (img2dataset does when given a caption
    column); the others only in ``.txt``. Tags are a list in even samples and one
    separator-joined string in odd ones, under the user column ``tags``.
    """
    out.mkdir(parents=True, exist_ok=True)
    index = 0
    for shard, count in enumerate(shards):
        with tarfile.open(out / f"{shard:05d}.tar", "w", format=tarfile.USTAR_FORMAT) as archive:
            for _ in range(count):
                key = f"{shard:05d}{index:04d}"
                tags = expected_tags(index)
                meta = {
                    "url": f"https://example.com/images/{index}.jpg",
                    "key": key,
                    "status": "success",
                    "error_message": None,
                    "width": 40,
                    "height": 36,
                    "original_width": 400,
                    "original_height": 360,
                    "exif": None,
                    "sha256": f"{index:064x}",
                    "tags": tags if index % 2 == 0 else f"#{tags[0].upper()}, {tags[1]}",
                }
                if shard == 0:
                    meta["caption"] = expected_caption(index)
                _add(archive, f"{key}.jpg", _jpeg(index))
                _add(archive, f"{key}.txt", expected_caption(index).encode())
                _add(archive, f"{key}.json", json.dumps(meta, indent=4).encode())
                index += 1
        (out / f"{shard:05d}.parquet").write_bytes(b"PAR1 not read by prepretrain PAR1")
        if stats:
            body = {"count": count + 2, "successes": count, "failed_to_download": 2, "failed_to_resize": 0,
                    "duration": 1.5, "status_dict": {"success": count, "HTTP Error 404": 2}}
            (out / f"{shard:05d}_stats.json").write_text(json.dumps(body, indent=4))
    return out


def key_index(record: Record) -> int:
    return int(record.key[5:])


@pytest.mark.parametrize("stats", [True, False])
def test_length_and_where_it_came_from(tmp_path: Path, stats: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = write_img2dataset(tmp_path / "laion", stats=stats)
    source = open_source(folder)
    assert isinstance(source, ShardSource)
    if stats:  # the stats files are enough: no tar is opened to count
        monkeypatch.setattr(ShardSource, "_count_tar", lambda self, shard: pytest.fail("counted a tar"))
    else:  # counting reads the tar headers only: no member payload is extracted
        monkeypatch.setattr(tarfile.TarFile, "extractfile", lambda *a, **k: pytest.fail("read a payload"))
    assert len(source) == 27 and source.num_samples == 27
    assert source.count_source == ("img2dataset_stats" if stats else "counted")
    assert source.counts == [10, 10, 7]
    monkeypatch.undo()
    records = list(source.iter_records(shuffle=False))
    assert sorted(key_index(record) for record in records) == list(range(27))
    assert source.skips.total_skipped == 0 and source.skips.seen == 27
    for worker in range(2):  # the counts drive resume: a reader's count is what it reads
        split = dict(worker_id=worker, num_workers=2, epoch=1, seed=5)
        assert source.reader_count(**split) == len(list(source.iter_records(**split)))


def test_records_carry_caption_from_txt_and_tags_from_a_chosen_field(tmp_path: Path) -> None:
    folder = write_img2dataset(tmp_path / "laion", stats=False)
    tagged = open_data(str(folder), hashtag_field="tags")
    records = list(tagged.iter_records(shuffle=False))
    assert len(records) == 27
    for record in records:
        index = key_index(record)
        assert record.caption == expected_caption(index)  # shard 0 from .json, the rest from .txt
        raw = expected_tags(index)
        assert record.hashtags == (raw if index % 2 == 0 else [f"#{raw[0].upper()}", raw[1]])
        assert record.image.size == (40, 36) and record.labels == {}
    plain = open_data(str(folder))  # default field "hashtags": these shards have none
    assert all(record.hashtags == [] for record in plain.iter_records(shuffle=False))
    renamed = ShardSource(folder, caption_field="url")  # any JSON field can be the caption
    first = next(renamed.iter_records(shuffle=False))
    assert first.caption == f"https://example.com/images/{key_index(first)}.jpg"
    stats = describe_source(tagged, max_images=4)
    assert stats["count"] == 27 and stats["annotations"]["scope"] == "all"
    assert stats["hashtags"]["images_without"] == 0 and stats["caption"]["empty"] == 0


def test_a_field_of_the_wrong_type_is_a_counted_bad_sample(tmp_path: Path) -> None:
    folder = tmp_path / "odd"
    folder.mkdir()
    with tarfile.open(folder / "00000.tar", "w") as archive:
        for index, tags in enumerate([["a", "b"], 7, "c d"]):
            _add(archive, f"{index:09d}.jpg", _jpeg(index))
            _add(archive, f"{index:09d}.json", json.dumps({"key": str(index), "tags": tags}).encode())
    source = ShardSource(folder, hashtag_field="tags")
    assert [record.hashtags for record in source.iter_records()] == [["a", "b"], ["c", "d"]]
    assert dict(source.skips.skipped) == {"bad_json": 1}


def test_remote_shards_without_an_index_name_themselves_in_the_error(tmp_path: Path) -> None:
    folder = write_img2dataset(tmp_path / "laion")
    urls = [f"pipe:cat {folder / f'{shard:05d}.tar'}" for shard in range(3)]  # remote: stats are not looked for
    source = ShardSource(urls)
    assert source.num_samples is None and source.count_source is None and bool(source)
    with pytest.raises(UnknownSampleCount, match=r"prepretrain data shards") as error:
        len(source)
    assert isinstance(error.value, ValueError) and not isinstance(error.value, TypeError)
    assert "00000.tar" in str(error.value) and "index=" in str(error.value)
    assert len(list(source.iter_records(shuffle=False))) == 27  # streaming still works without a length

    index = tmp_path / "index.json"
    index.write_text(json.dumps({"shards": [{"name": f"{shard:05d}.tar", "count": n}
                                            for shard, n in enumerate((10, 10, 7))]}))
    indexed = ShardSource(urls, index=index)  # a given index names remote shards by file name
    assert len(indexed) == 27 and indexed.count_source == "index"
    with pytest.raises(FileNotFoundError):
        ShardSource(urls, index=tmp_path / "missing.json")


def test_index_json_wins_and_mixed_origins_are_reported(tmp_path: Path) -> None:
    folder = write_img2dataset(tmp_path / "laion")
    (folder / "00002_stats.json").unlink()
    assert ShardSource(folder).count_source == "img2dataset_stats+counted"
    (folder / "index.json").write_text(json.dumps({"shards": [{"name": "00000.tar", "count": 10}]}))
    mixed = ShardSource(folder)
    assert len(mixed) == 27 and mixed.count_source == "index+img2dataset_stats+counted"
    assert mixed.count_sources == ["index", "img2dataset_stats", "counted"]


def test_a_short_tar_is_reported_against_its_stats_file(tmp_path: Path) -> None:
    folder = write_img2dataset(tmp_path / "laion", shards=(10, 5))
    (folder / "00001_stats.json").write_text(json.dumps({"successes": 8}))  # 3 more than the tar holds
    source = ShardSource(folder)
    assert len(source) == 18
    outcomes = list(source.iter_records(shuffle=False))
    assert len(outcomes) == 15
    assert source.skips.skipped["lost_in_shard"] == 3 and source.skips.skipped["broken_shard"] == 1
    assert "00001_stats.json" in source.skips.examples["broken_shard"]


def _train_results(stage, out_dir: Path) -> dict:
    from prepretrain.train.engine import train

    results = train(stage)
    assert (out_dir / "results.json").is_file()
    saved = json.loads((out_dir / "results.json").read_text())
    assert math.isfinite(saved["final_loss"]) and saved["steps"] == 2
    return results


def test_mae_trains_on_img2dataset_shards(tmp_path: Path) -> None:
    from prepretrain.config import build_config
    from prepretrain.stages.mae import MAEConfig, MAEStage

    folder = write_img2dataset(tmp_path / "laion", stats=False)
    out = tmp_path / "mae"
    cfg = build_config(MAEConfig, None, {
        "data": str(folder), "out_dir": str(out), "steps": "2", "batch_size": "8", "image_size": "32",
        "progress": "false", "tensorboard": "false", "decoder_embed_dim": "32", "decoder_depth": "1",
        "decoder_num_heads": "2", "eval_images": "8",
    })  # fmt: skip
    _train_results(MAEStage(cfg), out)


def test_lit_trains_on_img2dataset_captions(tmp_path: Path) -> None:
    from prepretrain.config import build_config
    from prepretrain.stages.lit import LiTConfig, LiTStage

    folder = write_img2dataset(tmp_path / "laion")
    out = tmp_path / "lit"
    cfg = build_config(LiTConfig, None, {
        "data": str(folder), "out_dir": str(out), "steps": "2", "batch_size": "8", "image_size": "32",
        "vision_depth": "1", "text_depth": "1", "progress": "false", "tensorboard": "false", "warmup_steps": "0",
    })  # fmt: skip
    results = _train_results(LiTStage(cfg), out)
    assert results["features_cached"] is True

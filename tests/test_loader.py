"""train_loader / eval_loader: every sample once per epoch across ranks and workers, exact resume, counted skips.

Map-style sources go through ``SampleStream``; shards through ``ShardStream``. Each test
builds the loaders exactly as the engine does (``train_loader(dataset, stream, workers)``)
and compares what comes out against a plain computation of what should.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from prepretrain.data.images.decode import load_image
from prepretrain.data.loader import RecordDataset, SampleStream, eval_loader, sample_seed, train_loader
from prepretrain.data.readers.folders import FolderSource, ManifestSource
from prepretrain.data.readers.open import open_data
from prepretrain.data.records import BadSample, Record, SkipCounter
from prepretrain.data.shards.reader import INDEX_NAME, ShardSource
from prepretrain.data.shards.write import write_shards


class NumberedSource:
    """A map-style source of ``count`` tiny records whose key is the index (no decoding cost)."""

    def __init__(self, count: int):
        self.count = count
        self.image = Image.new("RGB", (4, 4))

    def __len__(self) -> int:
        return self.count

    def get(self, index: int) -> Record:
        return Record(image=self.image, key=f"{index:04d}", labels={"label": index})


def key_and_noise(record: Record) -> dict:
    """The sample's identity plus a draw from the seeded RNG: resume must reproduce both."""
    return {"key": record.key, "noise": torch.rand(())}


def take(loader, batches: int) -> list[dict]:
    iterator = iter(loader)
    return [next(iterator) for _ in range(batches)]


def keys_of(batches: list[dict]) -> list[str]:
    return [key for batch in batches for key in batch["key"]]


def noise_of(batches: list[dict]) -> torch.Tensor:
    return torch.cat([batch["noise"] for batch in batches])


# ---- map-style --------------------------------------------------------------------------
def test_map_style_two_ranks_two_workers_read_every_sample_once_per_epoch() -> None:
    count, micro, world = 48, 4, 2
    dataset = RecordDataset(NumberedSource(count), key_and_noise)
    per_epoch = count // (micro * world)  # micro-batches per rank per epoch
    seen: dict[int, list[str]] = {}
    for rank in range(world):
        stream = SampleStream(count, micro, seed=5, rank=rank, world_size=world)
        seen[rank] = keys_of(take(train_loader(dataset, stream, num_workers=2), 2 * per_epoch))
    reference = SampleStream(count, micro, seed=5)
    for epoch in range(2):
        window = slice(epoch * per_epoch * micro, (epoch + 1) * per_epoch * micro)
        union = seen[0][window] + seen[1][window]
        assert Counter(union) == Counter(f"{i:04d}" for i in range(count))  # each exactly once
        # rank r holds micro-batches r, r + 2, ... of the epoch's permutation
        order = [f"{int(i):04d}" for i in reference.order(epoch)]
        expected_rank0 = [key for b in range(0, per_epoch * world, world) for key in order[b * micro : (b + 1) * micro]]
        assert seen[0][window] == expected_rank0
    assert seen[0][: count // world] != seen[0][count // world :]  # the next epoch is a new permutation


@pytest.mark.parametrize("workers", [0, 2])
def test_map_style_resume_continues_the_uninterrupted_stream(workers: int) -> None:
    dataset = RecordDataset(NumberedSource(30), key_and_noise)
    micro, consumed, more = 4, 9, 7  # 9 batches = 36 samples: the resume point is inside epoch 2

    def loader(start: int):
        return train_loader(dataset, SampleStream(30, micro, seed=1, start_position=start), num_workers=workers)

    uninterrupted = take(loader(0), consumed + more)
    resumed = take(loader(consumed * micro), more)
    assert keys_of(uninterrupted[:consumed]) + keys_of(resumed) == keys_of(uninterrupted)
    torch.testing.assert_close(noise_of(resumed), noise_of(uninterrupted[consumed:]), rtol=0, atol=0)


# ---- shards -----------------------------------------------------------------------------
def write_numbered_shards(out: Path, count: int, per_shard: int) -> ShardSource:
    source = NumberedSource(count)
    write_shards(source, out, samples_per_shard=per_shard, verbose=False)
    return ShardSource(out)


def shard_loader(dataset, *, start=0, rank=0, world=1, workers=0, micro=3, seed=4, block=4, count=None):
    count = count if count is not None else len(dataset)  # shards without index.json have no len()
    stream = SampleStream(count, micro, seed=seed, rank=rank, world_size=world, start_position=start)
    return train_loader(dataset, stream, num_workers=workers, shuffle_block=block)


def test_shards_two_ranks_two_workers_read_every_sample_once_per_epoch(tmp_path: Path) -> None:
    # 8 shards of 6 for 2 ranks x 2 workers: every reader owns 2 shards = 12 samples per epoch.
    shards = write_numbered_shards(tmp_path / "s", count=48, per_shard=6)
    dataset = RecordDataset(shards, key_and_noise)
    micro, per_epoch = 3, 8  # per rank: 24 samples = 8 micro-batches per epoch
    by_rank = [keys_of(take(shard_loader(dataset, rank=r, world=2, workers=2, micro=micro), 2 * per_epoch))
               for r in range(2)]
    everything = Counter(f"{i:04d}" for i in range(48))
    epochs = []
    for epoch in range(2):
        window = slice(epoch * per_epoch * micro, (epoch + 1) * per_epoch * micro)
        union = by_rank[0][window] + by_rank[1][window]
        assert Counter(union) == everything
        epochs.append(union)
    assert epochs[0] != epochs[1]  # shard order and in-block order change with the epoch


@pytest.mark.parametrize(("world", "workers"), [(1, 0), (1, 2), (2, 2)])
@pytest.mark.parametrize("with_index", [True, False])
def test_shards_resume_continues_the_uninterrupted_stream(tmp_path: Path, world: int, workers: int,
                                                          with_index: bool) -> None:
    # 45 samples in 7 shards (the last holds 3): readers get unequal epochs, so resume
    # points fall inside and across each reader's epoch boundaries.
    write_numbered_shards(tmp_path / "s", count=45, per_shard=7)
    if not with_index:
        (tmp_path / "s" / INDEX_NAME).unlink()  # skipping must then count samples by reading the tars
    dataset = RecordDataset(ShardSource(tmp_path / "s"), key_and_noise)
    micro, total = 3, 40  # 40 micro-batches per rank: 120 (1 rank) or 240 (2 ranks) samples, 2.7-5.3 epochs
    split = dict(world=world, workers=workers, micro=micro, count=45)
    for rank in range(world):
        uninterrupted = take(shard_loader(dataset, rank=rank, **split), total)
        for consumed in (5, 17, 31):  # micro-batches per rank already trained on
            start = consumed * micro * world  # what the engine passes: step * global batch
            resumed = take(shard_loader(dataset, start=start, rank=rank, **split), total - consumed)
            assert keys_of(uninterrupted[:consumed]) + keys_of(resumed) == keys_of(uninterrupted)
            torch.testing.assert_close(noise_of(resumed), noise_of(uninterrupted[consumed:]), rtol=0, atol=0)


def test_shard_augmentation_seeds_follow_global_positions(tmp_path: Path) -> None:
    dataset = RecordDataset(write_numbered_shards(tmp_path / "s", 20, 5), key_and_noise)
    batches = take(shard_loader(dataset, rank=1, world=2, workers=0, micro=2, seed=9), 3)
    expected = []
    for rank_batch in range(3):
        first = rank_batch * 2 * 2 + 1 * 2  # k * world * micro + rank * micro
        for slot in range(2):
            torch.manual_seed(sample_seed(9, first + slot))
            expected.append(torch.rand(()))
    torch.testing.assert_close(noise_of(batches), torch.stack(expected), rtol=0, atol=0)


def test_weighted_resampling_is_refused_for_shards(tmp_path: Path) -> None:
    dataset = RecordDataset(write_numbered_shards(tmp_path / "s", 10, 5), key_and_noise)
    stream = SampleStream(10, 2, weights=torch.ones(10))
    with pytest.raises(ValueError, match="random access"):
        next(iter(train_loader(dataset, stream)))


def test_too_many_readers_for_the_samples_is_a_clear_error(tmp_path: Path) -> None:
    dataset = RecordDataset(write_numbered_shards(tmp_path / "s", 3, 3), key_and_noise)
    assert keys_of(take(shard_loader(dataset, rank=2, world=4, micro=1), 2)) == ["0002", "0002"]
    with pytest.raises(RuntimeError, match="too few"):
        take(shard_loader(dataset, rank=3, world=4, micro=1), 1)  # 3 samples, 4 ranks: rank 3 never gets one


def test_eval_loader_reads_shards_once_in_order(tmp_path: Path) -> None:
    dataset = RecordDataset(write_numbered_shards(tmp_path / "s", 23, 5), key_and_noise)
    in_order = keys_of(list(eval_loader(dataset, batch_size=4)))
    assert in_order == [f"{i:04d}" for i in range(23)]
    assert sorted(keys_of(list(eval_loader(dataset, batch_size=4, num_workers=2)))) == in_order


# ---- bad input through the training loader ----------------------------------------------
def jpeg(width: int, height: int, seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def image_to_tensor(record: Record) -> dict:
    return {"image": torch.from_numpy(np.array(record.image.resize((8, 8)))).permute(2, 0, 1)}


@pytest.mark.parametrize("as_shards", [False, True])
def test_corrupt_file_in_a_training_run_is_skipped_and_counted(tmp_path: Path, as_shards: bool) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    for index in range(12):
        data = jpeg(64, 48, index)
        if index == 7:
            data = data[: len(data) // 2]  # cut off mid-download
        (folder / f"{index:02d}.jpg").write_bytes(data)
    with pytest.raises(BadSample) as cut:
        load_image(folder / "07.jpg", "07.jpg")
    assert cut.value.reason in ("truncated", "unreadable")
    (folder / "notes.jpg").write_text("not a picture")
    source = FolderSource(folder)
    if as_shards:
        # write_shards would find and drop the bad files; copy them into the tar as they are
        import tarfile

        with tarfile.open(tmp_path / "s-000000.tar", "w") as archive:
            for index in range(len(source)):
                payload = source.path_of(index).read_bytes()
                info = tarfile.TarInfo(f"{index:04d}.jpg")
                info.size = len(payload)
                archive.addfile(info, io.BytesIO(payload))
                meta = json.dumps({"key": source.entry(index)[0].key}).encode()
                info = tarfile.TarInfo(f"{index:04d}.json")
                info.size = len(meta)
                archive.addfile(info, io.BytesIO(meta))
        (tmp_path / INDEX_NAME).write_text(json.dumps({"shards": [{"name": "s-000000.tar", "count": 13}]}))
        source = ShardSource(tmp_path / "s-000000.tar")
    dataset = RecordDataset(source, image_to_tensor)
    stream = SampleStream(len(dataset), 13, seed=0)  # one micro-batch = one epoch
    counter = SkipCounter()
    batches = take(train_loader(dataset, stream, num_workers=2 if not as_shards else 0), 2)
    for batch in batches:
        assert batch["_seen"] == 13 and batch["image"].shape == (11, 3, 8, 8)
        assert sorted(batch["_skipped"]) == [("not_image", "notes.jpg"), (cut.value.reason, "07.jpg")]
        for reason, key in batch["_skipped"]:  # how the engine counts them
            counter.skip(BadSample(key, reason))
        counter.seen += batch["_seen"] - len(batch["_skipped"])
    assert counter.seen == 26 and dict(counter.skipped) == {"not_image": 2, cut.value.reason: 2}


def test_cut_off_shard_reports_the_shard_and_each_lost_sample(tmp_path: Path) -> None:
    shards = write_numbered_shards(tmp_path / "s", count=12, per_shard=6)
    second = tmp_path / "s" / "shard-000001.tar"
    second.write_bytes(second.read_bytes()[:2048])  # keeps the first sample or so of 6
    dataset = RecordDataset(ShardSource(tmp_path / "s"), key_and_noise)
    stream = SampleStream(len(shards), 12, seed=0, shuffle=False)
    (batch,) = take(train_loader(dataset, stream), 1)
    reasons = Counter(reason for reason, _ in batch["_skipped"])
    kept = len(batch["key"])
    assert reasons["broken_shard"] == 1
    assert reasons["lost_in_shard"] == 12 - kept and 6 <= kept < 12  # every lost sample counted
    assert batch["_seen"] == 12  # the positions stay those of the index, so resume stays exact


# ---- decoding hints reach the sources ---------------------------------------------------
def test_min_size_hint_reaches_folder_manifest_and_shard_sources(tmp_path: Path) -> None:
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "big.jpg").write_bytes(jpeg(800, 600, 0))
    (tmp_path / "m.jsonl").write_text('{"path": "data/big.jpg"}\n')
    write_shards(ManifestSource(tmp_path / "m.jsonl"), tmp_path / "shards", verbose=False)
    for spec in (folder, tmp_path / "m.jsonl", tmp_path / "shards"):
        full = open_data(str(spec))
        hinted = open_data(str(spec), min_size_hint=140)
        sizes = []
        for source in (full, hinted):
            if hasattr(source, "get"):
                sizes.append(source.get(0).image.size)
            else:
                sizes.append(next(source.iter_records()).image.size)
        assert sizes == [(800, 600), (200, 150)], spec  # DCT scale 1/4: the largest whose side stays >= 140
        tensor = open_data(str(spec), min_size_hint=140, pixels="tensor")
        record = tensor.get(0) if hasattr(tensor, "get") else next(tensor.iter_records())
        assert record.image.dtype == torch.uint8 and tuple(record.image.shape) == (3, 150, 200)


def test_large_sources_are_shuffled_without_an_epoch_in_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    """Above LARGE_SOURCE the order is a keyed permutation computed per position (O(1) memory)
    and weighted draws come one block at a time: still one permutation per epoch, different
    between epochs, ranks splitting it exactly, resume exact, draws following the weights."""
    import prepretrain.data.loader as loader
    from prepretrain.data.loader import KeyedPermutation, SampleStream

    for n in (1, 2, 3, 17, 1000, 4097):
        assert sorted(KeyedPermutation(n, 5).at(i) for i in range(n)) == list(range(n))
    monkeypatch.setattr(loader, "LARGE_SOURCE", 100)
    monkeypatch.setattr(loader, "DRAW_BLOCK", 64)
    n = 1000

    def take(stream: SampleStream, batches: int) -> list[int]:
        out = []
        for _, batch in zip(range(batches), stream):
            out += [index for index, _ in batch]
        return out

    one = take(SampleStream(n, 10, seed=3), 200)  # two epochs
    assert sorted(one[:n]) == list(range(n)) == sorted(one[n:]) and one[:n] != one[n:]
    assert one[:n] != list(range(n))
    ranks = [take(SampleStream(n, 5, seed=3, rank=r, world_size=2), 100) for r in (0, 1)]
    assert sorted(ranks[0] + ranks[1]) == list(range(n))
    assert take(SampleStream(n, 10, seed=3, start_position=370), 5) == one[370:420]

    weights = torch.ones(n)
    weights[:10] = 100.0  # 10 heavy samples hold half the mass
    draws = take(SampleStream(n, 10, seed=1, weights=weights, epoch_size=4000), 400)
    assert len(draws) == 4000 and abs(sum(d < 10 for d in draws) / 4000 - 0.5) < 0.04
    assert take(SampleStream(n, 10, seed=1, weights=weights, epoch_size=4000, start_position=1234), 3) == \
        draws[1234:1264]

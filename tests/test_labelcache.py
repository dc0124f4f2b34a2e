"""WSP's preparation over shards from one shared annotation pass (data/labels/cache.py) equals the
annotation passes it replaces, and reads no annotation a second time."""

from __future__ import annotations

import os

import numpy as np
import pytest

from prepretrain.config import build_config
from prepretrain.data.labels.cache import LabelCache, shards_of_rank
from prepretrain.data.labels.weaklabels import WeakLabeler
from prepretrain.data.shards.reader import ShardSource
from prepretrain.data.shards.write import write_shards
from prepretrain.data.synthetic.images import SyntheticSource
from prepretrain.stages.wsp import WSPConfig, WSPStage
from prepretrain.train.run import Run


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    directory = tmp_path_factory.mktemp("labelcache") / "train"
    write_shards(SyntheticSource(240, image_size=16, seed=0), directory, samples_per_shard=50, verbose=False)
    return directory  # 5 shards, the last one short


def prepare(tmp_path, data, name, **values):
    cfg = build_config(WSPConfig, None, {"out_dir": str(tmp_path / name), "data": str(data), "depth": "1",
                                         "image_size": "32", "vocab_min_count": "2", "progress": "false",
                                         "tensorboard": "false", **values})
    stage = WSPStage(cfg)
    return stage, stage.prepare(Run.of_stage(stage))


@pytest.mark.parametrize("labels_from, reduce, loss, epoch_size", [
    ("hashtags", "max", "softmax", "0"),  # with a synonym table
    ("caption", "mean", "sigmoid", "500"),
])
def test_the_cached_preparation_equals_the_annotation_passes(tmp_path, shards, labels_from, reduce, loss, epoch_size):
    synonyms = tmp_path / "synonyms.json"
    synonyms.write_text('{"circle": ["round", "disc"], "square": ["box"]}')
    values = dict(labels_from=labels_from, resample_reduce=reduce, loss=loss, epoch_size=epoch_size, max_tags="3",
                  tag_synonyms=str(synonyms) if labels_from == "hashtags" else "auto")
    _, cached = prepare(tmp_path, shards, "cached", **values)
    _, direct = prepare(tmp_path, shards, "direct", label_cache="false", **values)
    assert cached.vocab.tags == direct.vocab.tags and cached.vocab.counts == direct.vocab.counts
    assert cached.vocab.aliases == direct.vocab.aliases and (labels_from == "caption") != bool(cached.vocab.aliases)
    np.testing.assert_array_equal(cached.tag_counts, direct.tag_counts)
    assert cached.stats == direct.stats and cached.stats["images_with_tags_truncated"] > 0
    np.testing.assert_allclose(cached.prior.numpy(), direct.prior.numpy(), rtol=1e-12, atol=1e-15)
    assert cached.positions == direct.positions  # the readers' sample positions: every copy counted alike
    recount = ShardSource(shards)
    recount.repeats = cached.repeats  # the shards read again, sample by sample, with the same rule
    assert recount.expanded_count() == cached.positions


def test_a_second_run_reads_no_annotation_and_ranks_share_the_pass(tmp_path, shards, monkeypatch):
    reads: list[int] = []
    original = ShardSource.shard_annotation_outcomes

    def counted(self, shard):
        reads.append(shard)
        return original(self, shard)

    monkeypatch.setattr(ShardSource, "shard_annotation_outcomes", counted)
    labels = WeakLabeler("synsets")
    cache = LabelCache(ShardSource(shards), labels)
    assert cache.folder.parent == shards / ".prepretrain-labels"  # beside the data, for every run on it
    rank1 = LabelCache(ShardSource(shards), labels)
    assert rank1.build(shards_of_rank(5, 1, 2)) == 2 and reads == [1, 3]  # what rank 1 of 2 reads
    _, first = prepare(tmp_path, shards, "one", labels_from="synsets")
    assert sorted(reads) == [0, 1, 2, 3, 4]  # rank 0 (here: the only process) read only the rest
    _, second = prepare(tmp_path, shards, "two", labels_from="synsets", seed="0")
    assert sorted(reads) == [0, 1, 2, 3, 4] and second.positions == first.positions
    _, other = prepare(tmp_path, shards, "three", labels_from="synsets", seed="1")  # other copies, same labels
    assert sorted(reads) == [0, 1, 2, 3, 4] and other.vocab.tags == first.vocab.tags

    # a changed shard gets a new cache; its siblings' files are named by their own content
    shard = sorted(shards.glob("*.tar"))[0]
    stat = shard.stat()
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    changed = LabelCache(ShardSource(shards), labels)
    assert changed.folder != cache.folder and changed.missing() == [0, 1, 2, 3, 4]
    assert changed.shard_path(1).name == cache.shard_path(1).name


def test_a_read_only_data_folder_caches_in_the_cache_root(tmp_path, shards, monkeypatch):
    monkeypatch.setenv("PREPRETRAIN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("prepretrain.data.labels.cache._writable", lambda folder: False)
    cache = LabelCache(ShardSource(shards), WeakLabeler("caption"))
    assert cache.folder.parent == tmp_path / "cache" / "labels"


def test_ranks_share_the_derivation_and_get_the_single_process_result(shards):
    """Two ranks (threads here, an all-reduce of arrays between them) each derive their share of
    the shards: counts, statistics, weight sum and copies equal one process's exactly."""
    import threading

    from prepretrain.data.labels.cache import build_cached_vocab, derive

    cache = LabelCache(ShardSource(shards), WeakLabeler("caption"))
    cache.build()
    vocab = build_cached_vocab(cache, min_count=2, max_size=1000)
    settings = dict(power=0.5, reduce="max", loss="softmax", epoch_size=0, seed=3, max_tags=2)
    alone = derive(cache, vocab, **settings)
    world, meeting = 2, threading.Barrier(2)
    slots, results = [None] * world, [None] * world

    def all_reduce(rank):
        def reduce(values):
            slots[rank] = values.copy()
            meeting.wait()
            total = slots[0] + slots[1]
            meeting.wait()
            return total
        return reduce

    def rank_main(rank):
        results[rank] = derive(cache, vocab, shards=shards_of_rank(5, rank, world), reduce_sum=all_reduce(rank),
                               **settings)

    threads = [threading.Thread(target=rank_main, args=(rank,)) for rank in range(world)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for shared in results:
        assert shared.positions == alone.positions and shared.stats == alone.stats
        assert shared.weight_sum == alone.weight_sum
        np.testing.assert_array_equal(shared.tag_counts, alone.tag_counts)
        np.testing.assert_allclose(shared.prior.numpy(), alone.prior.numpy(), rtol=1e-12)

"""WSP straight from WebDataset shards: tail resampling as per-sample copies in the stream.

Checks that the expanded stream has the per-tag distribution the map-style weighted draw
implies, that it is the same multiset of samples however the readers are laid out, that
positions skip exactly (resume), and that a WSP run on shards resumes to identical weights.
"""

from __future__ import annotations

import pickle
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from prepretrain.config import build_config
from prepretrain.data.labels.hashtags import (
    RepeatFactors,
    encode_images,
    sampling_weights,
    stream_statistics,
    target_prior,
    unit_hash,
)
from prepretrain.data.labels.vocab import build_vocab_streaming, iter_hashtags
from prepretrain.data.records import Annotation, BadSample
from prepretrain.data.shards.reader import INDEX_NAME, ShardProblem, ShardSource
from prepretrain.data.shards.write import write_shards
from prepretrain.data.synthetic.images import SyntheticSource
from prepretrain.stages.wsp import WSPConfig, WSPStage
from prepretrain.train.engine import train
from prepretrain.train.run import Run

IMAGES = 400
# Total variation between the stream's per-tag distribution (one epoch, 174 tags) and the one the
# map-style weights imply. Only the fractional parts of the repeat counts are random, so the stream
# is closer than the map path's own weighted draw of the same size: measured over seeds 0-7,
# stream 0.049-0.055 (epoch of 400) and 0.013-0.015 (1600); torch.multinomial 0.12-0.14 and 0.06-0.07.
TV_TOLERANCE = {IMAGES: 0.07, 4 * IMAGES: 0.03}


def make_shards(directory: Path, *, images: int = IMAGES, per_shard: int = 50, index: bool = True,
                image_size: int = 16) -> Path:
    write_shards(SyntheticSource(images, image_size=image_size, seed=0), directory, samples_per_shard=per_shard,
                 verbose=False)
    if not index:
        (directory / INDEX_NAME).unlink()
    return directory


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("shards") / "train")


def resampled_source(directory: Path, epoch_size: int = IMAGES, seed: int = 0, power: float = 0.5):
    """A shard source with RepeatFactors set, plus the map-style reference computed from the
    same images (vocabulary, encoded tags, per-image weights)."""
    source = ShardSource(directory)
    vocab = build_vocab_streaming(source, min_count=2)
    counts = np.asarray(vocab.counts)
    factors = RepeatFactors(vocab, counts, power=power, reduce="max", seed=seed)
    statistics = stream_statistics(factors, iter_hashtags(source), loss="softmax")
    factors.scale = epoch_size / statistics.weight_sum
    source.repeats = factors
    encoded = encode_images(vocab, iter_hashtags(source))
    weights = sampling_weights(encoded, counts, power=power, reduce="max")
    return source, vocab, encoded, weights, statistics


def reader_keys(source: ShardSource, world_size: int, num_workers: int, epoch: int = 0,
                shuffle_block: int = 16) -> list[list[str]]:
    """The keys every reader (rank-major) yields in one epoch, in order."""
    readers = []
    for rank in range(world_size):
        for worker in range(num_workers):
            outcomes = source.iter_outcomes(rank=rank, world_size=world_size, worker_id=worker,
                                            num_workers=num_workers, epoch=epoch, seed=0, shuffle_block=shuffle_block)
            readers.append([o.key for o in outcomes if not isinstance(o, BadSample)])
    return readers


def tag_distribution(vocab, tag_lists) -> np.ndarray:
    """Mean normalised multi-hot target (the softmax loss's target) over the given images."""
    mass = np.zeros(len(vocab))
    images = 0
    for tags in tag_lists:
        known, _ = vocab.encode(tags)
        if known:
            mass[known] += 1.0 / len(known)
            images += 1
    return mass / images


def test_repeat_factors_are_deterministic_picklable_and_follow_the_expected_count(shard_dir):
    source, vocab, encoded, weights, statistics = resampled_source(shard_dir)
    factors = source.repeats
    assert statistics.weight_sum == pytest.approx(float(weights.sum()), rel=1e-12)
    annotations = list(source.iter_annotations())
    copies = np.array([factors(a) for a in annotations])
    clone = pickle.loads(pickle.dumps(factors))
    assert [clone(a) for a in annotations] == copies.tolist()
    expected = weights.numpy() * IMAGES / float(weights.sum())  # the weighted draw's mean appearances
    assert np.all(copies == np.floor(expected) + (copies > np.floor(expected)))  # floor or ceil only
    assert np.all(copies[encoded.num_tags == 0] == 0)
    assert abs(copies.sum() - IMAGES) < 4 * np.sqrt(IMAGES)  # sum of Bernoulli fractions around E
    assert 0 <= unit_hash(0, "a") < 1 and unit_hash(0, "a") == unit_hash(0, "a") != unit_hash(1, "a")
    other_seed = RepeatFactors(vocab, np.asarray(vocab.counts), scale=factors.scale, seed=1)
    assert [other_seed(a) for a in annotations] != copies.tolist()  # the fractional draws follow the seed


@pytest.mark.parametrize("epoch_size", sorted(TV_TOLERANCE))
def test_stream_matches_the_weighted_draw_per_tag_and_boosts_the_tail(shard_dir, epoch_size):
    source, vocab, encoded, weights, statistics = resampled_source(shard_dir, epoch_size=epoch_size)
    target = target_prior(encoded, weights, len(vocab), "softmax").numpy()
    np.testing.assert_allclose(statistics.prior.numpy(), target, rtol=1e-9, atol=1e-12)
    tags_by_key = {a.key: a.hashtags for a in source.iter_annotations()}
    drawn = [key for keys in reader_keys(source, world_size=2, num_workers=2) for key in keys]
    assert len(drawn) == source.expanded_count()
    empirical = tag_distribution(vocab, (tags_by_key[key] for key in drawn))
    total_variation = 0.5 * np.abs(empirical - target).sum()
    uniform = tag_distribution(vocab, tags_by_key.values())  # without resampling: every image once
    draw = torch.multinomial(weights, epoch_size, replacement=True, generator=torch.Generator().manual_seed(0))
    annotations = list(source.iter_annotations())
    multinomial = tag_distribution(vocab, (annotations[i].hashtags for i in draw))
    print(f"TV(stream, target) = {total_variation:.4f} over {len(drawn)} samples; "
          f"TV(weighted draw, target) = {0.5 * np.abs(multinomial - target).sum():.4f}; "
          f"TV(no resampling, target) = {0.5 * np.abs(uniform - target).sum():.4f}")
    assert total_variation < TV_TOLERANCE[epoch_size]
    assert total_variation < 0.5 * np.abs(multinomial - target).sum()
    tail = np.asarray(vocab.counts) <= np.quantile(vocab.counts, 0.25)  # the rarest quarter of the tags
    head = np.asarray(vocab.counts) >= np.quantile(vocab.counts, 0.9)
    assert empirical[tail].sum() > 1.3 * uniform[tail].sum()  # measured: 1.44x (power 0.5, max)
    assert empirical[head].sum() < uniform[head].sum()


@pytest.mark.parametrize("index", [True, False])
def test_one_or_two_ranks_draw_the_same_multiset_and_every_epoch_the_same(tmp_path, index):
    directory = make_shards(tmp_path / "train", images=120, per_shard=20, index=index)
    source, *_ = resampled_source(directory, epoch_size=240)
    expected = Counter({a.key: source.repeats(a) for a in source.iter_annotations()})
    expected = +expected  # drop the samples with no copy
    for world_size, workers in ((1, 2), (2, 2), (1, 8)):  # 8 readers > 6 shards: samples dealt, not shards
        for epoch in (0, 1):
            readers = reader_keys(source, world_size, workers, epoch=epoch)
            assert Counter(key for keys in readers for key in keys) == expected
            counts = [source.reader_count(rank=r, world_size=world_size, worker_id=w, num_workers=workers,
                                          epoch=epoch) for r in range(world_size) for w in range(workers)]
            assert counts == [len(keys) for keys in readers]
    assert source.expanded_count() == sum(expected.values())


@pytest.mark.parametrize("world_size, workers", [(1, 2), (2, 4)])  # whole shards; samples dealt (8 > 6 shards)
def test_skipping_positions_lands_where_an_uninterrupted_reader_is(tmp_path, world_size, workers):
    directory = make_shards(tmp_path / "train", images=120, per_shard=20)
    source, *_ = resampled_source(directory, epoch_size=300)
    split = dict(rank=world_size - 1, world_size=world_size, worker_id=1, num_workers=workers, epoch=3, seed=0,
                 shuffle_block=8)
    full = [o.key for o in source.iter_outcomes(**split)]
    assert len(full) > 20
    fresh, _, _, _, _ = resampled_source(directory, epoch_size=300)  # no counts kept yet, as after a restart
    for skip in (0, 1, 7, 8, 9, 21, len(full) - 1, len(full)):
        resumed = [o.key for o in fresh.iter_outcomes(skip=skip, **split)]
        assert resumed == full[skip:], skip
    repeated = max(Counter(full).values())
    assert repeated > 1  # tail samples do appear more than once in a reader's epoch


def test_samples_lost_in_a_cut_off_shard_take_no_position(tmp_path):
    directory = make_shards(tmp_path / "train", images=40, per_shard=20)
    source, *_ = resampled_source(directory, epoch_size=80)
    whole = source.expanded_count()
    shard = directory / "shard-000001.tar"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 3])  # cut off: index.json lists 20 samples
    source = ShardSource(directory, repeats=source.repeats)
    outcomes = list(source.iter_outcomes(shuffle_block=8))
    assert sum(isinstance(o, ShardProblem) for o in outcomes) == 1
    positions = [o for o in outcomes if not isinstance(o, ShardProblem)]
    assert len(positions) == source.expanded_count() == source.reader_count() < whole
    assert not any(isinstance(o, BadSample) for o in positions)


def test_stage_prepares_shards_without_weights_or_a_size_cap(tmp_path, shard_dir):
    cfg = build_config(WSPConfig, None, {"out_dir": str(tmp_path / "run"), "data": str(shard_dir), "depth": "1",
                                         "image_size": "32", "vocab_min_count": "2", "epoch_size": "600",
                                         "progress": "false", "tensorboard": "false"})
    stage = WSPStage(cfg)
    run = Run.of_stage(stage)
    data = stage.train_data(run)
    prepared = stage.prepare(run)
    assert data.weights is None and data.epoch_size == 600
    assert data.num_samples == prepared.source.expanded_count() == prepared.positions
    assert abs(data.num_samples - 600) < 4 * np.sqrt(600)
    source, vocab, encoded, weights, _ = resampled_source(shard_dir, epoch_size=600)
    assert prepared.vocab == vocab and prepared.stats["images"] == IMAGES
    np.testing.assert_array_equal(prepared.tag_counts, np.asarray(vocab.counts))
    np.testing.assert_allclose(prepared.prior.numpy(), target_prior(encoded, weights, len(vocab), "softmax").numpy(),
                               rtol=1e-9, atol=1e-12)
    # the same copies as the reference (same seed): deterministic from (seed, key, tags)
    annotations = list(source.iter_annotations())
    assert [prepared.repeats(a) for a in annotations] == [source.repeats(a) for a in annotations]
    assert prepared.repeats(Annotation("k", ["#nosuchtag"])) == 0
    metrics = stage.evaluate(torch.nn.Identity(), run)  # no val split: the train-side statistics only
    assert metrics == {"train_images_without_known_tag": prepared.stats["images_without_known_tag"],
                       "train_unknown_tag_occurrences": prepared.stats["unknown_tag_occurrences"]}


def test_a_val_split_of_shards_is_evaluated_and_the_training_shards_never_are(tmp_path):
    make_shards(tmp_path / "data" / "train", images=60, per_shard=20)
    write_shards(SyntheticSource(40, image_size=16, seed=0, split="val"), tmp_path / "data" / "val",
                 samples_per_shard=20, verbose=False)
    values = {"out_dir": str(tmp_path / "run"), "data": str(tmp_path / "data"), "depth": "1", "image_size": "32",
              "vocab_min_count": "1", "eval_images": "16", "progress": "false", "tensorboard": "false"}
    stage = WSPStage(build_config(WSPConfig, None, values))
    run = Run.of_stage(stage)
    model = stage.build_model(run)
    metrics = stage.evaluate(model, run)
    assert metrics["val_images"] + metrics["val_images_without_known_tag"] == 16
    assert "val_precision_at_1" in metrics and "val_mAP" in metrics
    # the training shards alone: opening "val" gives the same shards, which are not held-out data
    values["data"], values["out_dir"] = str(tmp_path / "data" / "train"), str(tmp_path / "run2")
    stage = WSPStage(build_config(WSPConfig, None, values))
    run = Run.of_stage(stage)
    assert not any(key.startswith("val_") for key in stage.evaluate(stage.build_model(run), run))


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return {**load_file(str(run_dir / "encoder.safetensors")), **load_file(str(run_dir / "head.safetensors"))}


# epoch_size 12: the resumed run (at position 16) first skips a whole resampled epoch by its count
@pytest.mark.parametrize("index, epoch_size", [(True, 0), (False, 12)])
def test_wsp_run_on_shards_resumes_to_identical_weights(tmp_path, index, epoch_size):
    make_shards(tmp_path / "data" / "train", images=96, per_shard=16, index=index, image_size=32)

    def run(out_dir: Path) -> dict:
        cfg = build_config(WSPConfig, None, {
            "out_dir": str(out_dir), "data": str(tmp_path / "data"), "depth": "1", "batch_size": "8",
            "image_size": "32", "steps": "4", "ckpt_every": "2", "progress": "false", "tensorboard": "false",
            "eval_images": "16", "vocab_min_count": "1", "log_every": "1", "epoch_size": str(epoch_size),
        })
        return train(WSPStage(cfg))

    whole = tmp_path / "whole"
    results = run(whole)
    assert results["train_samples_per_epoch"] > 0 and "val_images" not in results
    resumed = tmp_path / "resumed"
    shutil.copytree(whole, resumed)
    for path in (resumed / "checkpoints").glob("step_00000004*"):
        path.unlink()
    for name in ("encoder.safetensors", "head.safetensors", "results.json"):
        (resumed / name).unlink()
    assert sorted(p.name for p in (resumed / "checkpoints").glob("step_*.pt")) == ["step_00000002.pt"]
    run(resumed)
    expected, got = final_weights(whole), final_weights(resumed)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[key], got[key]) for key in expected)

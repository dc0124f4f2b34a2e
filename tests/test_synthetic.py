"""The embedded synthetic dataset: deterministic, balanced, noisy like web data, learnable.

Every command defaults to this data, so these tests pin down what the later stages rely on:
identical records across processes, exact label balance, long-tailed noisy hashtags,
captions naming the class, files that round-trip, and a task that a cheap probe can learn
only partly (neither impossible nor trivial).
"""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from prepretrain.data.records import MapSource, Record
from prepretrain.data.synthetic.export import write_synthetic
from prepretrain.data.synthetic.images import (
    ATTRIBUTE_TAGS,
    COLOUR_NAMES,
    HASHTAG_VOCAB,
    SHAPES,
    TEXTURES,
    TYPICAL_COLOUR_PROB,
    TYPICAL_COLOURS,
    SyntheticSource,
    colour_only_accuracy,
    synthetic_split_sizes,
)


def _normalise(tag: str) -> str:
    return tag.lstrip("#").lower()


@pytest.fixture(scope="module")
def train_records() -> list[Record]:
    source = SyntheticSource(2000, image_size=32, seed=0, split="train")
    return [source.get(i) for i in range(len(source))]


def _same_record(a: Record, b: Record) -> bool:
    return (
        np.array_equal(np.asarray(a.image), np.asarray(b.image))
        and a.hashtags == b.hashtags
        and a.caption == b.caption
        and a.labels == b.labels
        and a.key == b.key
    )


def test_same_seed_and_index_give_identical_records_in_any_order():
    first = SyntheticSource(300, image_size=32, seed=7)
    second = SyntheticSource(300, image_size=32, seed=7)
    for index in (0, 1, 123, 299):
        assert _same_record(first.get(index), second.get(index))
    # Access order must not matter (workers read arbitrary indices).
    assert _same_record(first.get(5), second.get(5))
    assert _same_record(second.get(299), first.get(299))


def test_different_seeds_and_splits_give_different_images():
    images = {}
    for seed, split in [(0, "train"), (1, "train"), (0, "val"), (0, "test")]:
        source = SyntheticSource(50, image_size=32, seed=seed, split=split)
        images[(seed, split)] = np.stack([np.asarray(source.get(i).image) for i in range(20)])
    keys = list(images)
    for i, a in enumerate(keys):
        for b in keys[i + 1 :]:
            differing = np.mean([not np.array_equal(x, y) for x, y in zip(images[a], images[b])])
            assert differing == 1.0, (a, b)
    # ...and neighbouring indices within a split differ too.
    assert not np.array_equal(images[(0, "train")][0], images[(0, "train")][1])


@pytest.mark.parametrize("image_size", [32, 64])
def test_records_are_rgb_images_of_the_requested_size(image_size):
    source = SyntheticSource(20, image_size=image_size)
    assert isinstance(source, MapSource)
    assert len(source) == 20
    for index in range(5):
        record = source.get(index)
        assert isinstance(record.image, Image.Image)
        assert record.image.mode == "RGB"
        assert record.image.size == (image_size, image_size)
        pixels = np.asarray(record.image)
        assert pixels.dtype == np.uint8 and pixels.std() > 5  # not a blank canvas
        assert 0 <= record.labels["coarse"] < 10 and 0 <= record.labels["fine"] < 50
        assert record.key.endswith(f"{index:08d}")
        assert 1 <= len(record.hashtags) <= 10 and record.caption


def test_large_images_and_index_bounds():
    source = SyntheticSource(3, image_size=224)
    assert source.get(2).image.size == (224, 224)
    with pytest.raises(IndexError):
        source.get(3)
    with pytest.raises(IndexError):
        source.get(-1)
    with pytest.raises(ValueError):
        SyntheticSource(10, image_size=8)


def test_metadata_describes_the_labels():
    source = SyntheticSource(10)
    assert source.num_classes("coarse") == len(SHAPES) == 10
    assert source.num_classes("fine") == len(SHAPES) * len(TEXTURES) == 50
    with pytest.raises(KeyError):
        source.num_classes("label")
    assert source.class_names["coarse"] == SHAPES
    assert source.class_names["fine"][:2] == ["solid circle", "striped circle"]
    for task in ("coarse", "fine"):
        assert len(source.synonyms[task]) == source.num_classes(task)
        assert [names[0] for names in source.synonyms[task]] == source.class_names[task]
        assert all(len(names) >= 2 and len(set(names)) == len(names) for names in source.synonyms[task])
        assert len(set(source.class_names[task])) == source.num_classes(task)
    vocab = source.hashtag_vocab
    assert 250 <= len(vocab) <= 400 and len(set(vocab)) == len(vocab)
    assert all(tag == tag.lower() and not tag.startswith("#") and " " not in tag for tag in vocab)


def test_labels_are_balanced_and_consistent(train_records):
    coarse = Counter(r.labels["coarse"] for r in train_records)
    fine = Counter(r.labels["fine"] for r in train_records)
    # Blocks of 50 indices hold every fine class once: 2000 images -> exactly 40 per class.
    assert sorted(coarse) == list(range(10)) and set(coarse.values()) == {200}
    assert sorted(fine) == list(range(50)) and set(fine.values()) == {40}
    assert all(r.labels["fine"] // len(TEXTURES) == r.labels["coarse"] for r in train_records)
    # A prefix that is not a multiple of 50 is still roughly balanced.
    partial = Counter(r.labels["coarse"] for r in train_records[:137])
    assert max(partial.values()) - min(partial.values()) <= 6


def test_attributes_match_labels():
    source = SyntheticSource(100, seed=3)
    for index in range(0, 100, 7):
        attributes = source.attributes(index)
        labels = source.get(index).labels
        assert attributes["shape"] == labels["coarse"]
        assert attributes["shape"] * len(TEXTURES) + attributes["texture"] == labels["fine"]


def test_hashtags_are_long_tailed_and_in_the_vocabulary(train_records):
    counts = Counter(_normalise(tag) for r in train_records for tag in r.hashtags)
    assert set(counts) <= set(HASHTAG_VOCAB)
    assert len(counts) > 0.8 * len(HASHTAG_VOCAB)  # most of the vocabulary is used
    frequencies = np.array(sorted(counts.values(), reverse=True), dtype=float)
    median = np.median(frequencies)
    assert frequencies[0] > 20 * median
    # Count-vs-rank decreases over decades of rank, with a long tail of rare tags.
    assert frequencies[0] > frequencies[9] > frequencies[99] > frequencies[199]
    assert np.mean(frequencies < 0.005 * len(train_records)) > 0.3
    ranks = np.arange(1, len(frequencies) + 1)
    slope = np.polyfit(np.log(ranks[:150]), np.log(frequencies[:150]), 1)[0]
    assert slope < -0.5
    per_image = Counter(len(r.hashtags) for r in train_records)
    assert min(per_image) >= 1 and max(per_image) <= 10 and len(per_image) >= 6
    assert all(len(set(map(_normalise, r.hashtags))) == len(r.hashtags) for r in train_records)


def test_raw_hashtag_spelling_needs_normalisation(train_records):
    raw = [tag for r in train_records for tag in r.hashtags]
    with_hash = np.mean([tag.startswith("#") for tag in raw])
    has_upper = np.mean([tag != tag.lower() for tag in raw])
    assert 0.6 < with_hash < 0.95
    assert 0.05 < has_upper < 0.4


def test_true_tags_are_present_often_but_not_always(train_records):
    def present(attribute: str, value_of) -> float:
        groups = ATTRIBUTE_TAGS[attribute]
        hits = [bool(set(groups[value_of(r)]) & {_normalise(t) for t in r.hashtags}) for r in train_records]
        return float(np.mean(hits))

    shape_rate = present("shape", lambda r: r.labels["coarse"])
    texture_rate = present("texture", lambda r: r.labels["fine"] % len(TEXTURES))
    assert 0.4 < shape_rate < 0.9
    assert 0.1 < texture_rate < shape_rate  # some true attributes are rarer than others
    # The tags carry signal: a shape's own tags are far more common on it than on others.
    circle_tags = set(ATTRIBUTE_TAGS["shape"][0])
    on_circles = np.mean(
        [bool(circle_tags & {_normalise(t) for t in r.hashtags}) for r in train_records if r.labels["coarse"] == 0]
    )
    on_others = np.mean(
        [bool(circle_tags & {_normalise(t) for t in r.hashtags}) for r in train_records if r.labels["coarse"] != 0]
    )
    assert on_circles > 5 * on_others


def test_captions_name_the_class_and_vary(train_records):
    mentions = np.mean([SHAPES[r.labels["coarse"]] in r.caption for r in train_records])
    assert 0.75 < mentions < 1.0  # sometimes a synonym ("oval", "box") instead
    assert len({r.caption for r in train_records}) > 0.5 * len(train_records)
    starts = Counter(r.caption.split()[0] for r in train_records)
    assert len(starts) >= 4  # several templates


def test_split_sizes_convention():
    assert synthetic_split_sizes(4000) == {"train": 4000, "val": 800, "test": 800}
    assert synthetic_split_sizes(100) == {"train": 100, "val": 200, "test": 200}
    with pytest.raises(ValueError):
        synthetic_split_sizes(-1)


def test_write_synthetic_round_trips(tmp_path):
    sizes = {"train": 60, "val": 12, "test": 8}
    out = write_synthetic(tmp_path / "syn", image_size=32, seed=5, sizes=sizes)
    assert out == tmp_path / "syn"
    for split, count in sizes.items():
        lines = (out / f"{split}.jsonl").read_text().splitlines()
        assert len(lines) == count
        source = SyntheticSource(count, image_size=32, seed=5, split=split)
        for index, line in enumerate(lines):
            entry = json.loads(line)
            record = source.get(index)
            assert entry["path"] == f"{split}/images/{index:08d}.png"
            with Image.open(out / entry["path"]) as image:
                assert image.mode == "RGB"
                assert np.array_equal(np.asarray(image), np.asarray(record.image))  # PNG is lossless
            assert entry["hashtags"] == record.hashtags
            assert entry["caption"] == record.caption
            assert entry["labels"] == record.labels
    classes = json.loads((out / "classes.json").read_text())
    assert classes["class_names"] == source.class_names
    assert classes["synonyms"] == source.synonyms
    assert classes["hashtag_vocab"] == source.hashtag_vocab


def test_write_synthetic_jpeg(tmp_path):
    out = write_synthetic(tmp_path, num_images=5, image_size=64, splits=("train",), image_format="jpg")
    entry = json.loads((out / "train.jsonl").read_text().splitlines()[0])
    assert entry["path"].endswith(".jpg")
    with Image.open(out / entry["path"]) as image:
        assert image.format == "JPEG" and image.size == (64, 64)
    with pytest.raises(ValueError):
        write_synthetic(tmp_path / "bad", num_images=1, image_format="gif")


def _mask_spectrum_features(images: np.ndarray) -> np.ndarray:
    """Cheap colour- and translation-invariant shape features: the foreground (pixels far from
    the median border colour) and the magnitude of its 2-D Fourier transform."""
    border = np.concatenate([images[:, 0], images[:, -1], images[:, :, 0], images[:, :, -1]], axis=1)
    median = np.median(border, axis=1)[:, None, None]
    mask = (np.abs(images - median).sum(-1) > 0.25).astype(np.float32)
    mask -= mask.mean(axis=(1, 2), keepdims=True)
    spectrum = np.abs(np.fft.fft2(mask))[:, :12, :12]
    return np.log1p(spectrum.reshape(len(images), -1))


def _softmax_regression(features, labels, num_classes, steps=300, lr=0.5, weight_decay=1e-3):
    weights = np.zeros((features.shape[1], num_classes))
    bias = np.zeros(num_classes)
    targets = np.eye(num_classes)[labels]
    for _ in range(steps):
        logits = features @ weights + bias
        logits -= logits.max(axis=1, keepdims=True)
        probs = np.exp(logits)
        probs /= probs.sum(axis=1, keepdims=True)
        grad = (probs - targets) / len(features)
        weights -= lr * (features.T @ grad + weight_decay * weights)
        bias -= lr * grad.sum(axis=0)
    return weights, bias


def test_coarse_task_is_learnable_but_not_trivial(train_records):
    test_source = SyntheticSource(500, image_size=32, split="test")
    test_records = [test_source.get(i) for i in range(len(test_source))]

    def arrays(records):
        images = np.stack([np.asarray(r.image, dtype=np.float32) / 255.0 for r in records])
        return _mask_spectrum_features(images), np.array([r.labels["coarse"] for r in records])

    train_x, train_y = arrays(train_records)
    test_x, test_y = arrays(test_records)
    mean, std = train_x.mean(axis=0), train_x.std(axis=0) + 1e-6
    weights, bias = _softmax_regression((train_x - mean) / std, train_y, 10)
    accuracy = float(np.mean((((test_x - mean) / std) @ weights + bias).argmax(axis=1) == test_y))
    chance = 1.0 / 10
    assert 2 * chance < accuracy < 0.95, accuracy


def test_shapes_take_their_typical_colour_at_the_stated_rate():
    """The colour prior: P(typical colour | shape) = p + (1 - p) / 8, and the Bayes rate of
    predicting the shape from the colour alone matches :func:`colour_only_accuracy`."""
    source = SyntheticSource(3000, image_size=32, split="train")
    attributes = [source.attributes(i) for i in range(len(source))]
    typical = [COLOUR_NAMES.index(TYPICAL_COLOURS[a["shape"]]) for a in attributes]
    rate = np.mean([a["colour"] == t for a, t in zip(attributes, typical)])
    expected = TYPICAL_COLOUR_PROB + (1 - TYPICAL_COLOUR_PROB) / len(COLOUR_NAMES)
    assert abs(rate - expected) < 0.03, (rate, expected)
    counts = np.zeros((len(SHAPES), len(COLOUR_NAMES)))
    for a in attributes:
        counts[a["shape"], a["colour"]] += 1
    empirical_bayes = counts.max(axis=0).sum() / counts.sum()
    assert abs(empirical_bayes - colour_only_accuracy()) < 0.03, (empirical_bayes, colour_only_accuracy())
    assert 0.4 < colour_only_accuracy() < 0.6  # colour helps, shape is still needed for the rest

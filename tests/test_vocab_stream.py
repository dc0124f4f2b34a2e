"""Hashtag statistics and vocabularies in one streaming pass, without decoding an image.

``build_vocab_streaming(source)`` must give exactly what ``build_vocab(source_hashtags(source))``
gives for a source small enough to hold in memory, read annotations only (manifest rows, shard
``.json`` members, the synthetic generator without rendering) and keep at most ``max_distinct``
tags in memory, reporting when that made the counts approximate.
"""

from __future__ import annotations

import csv
import json
import tarfile
from collections import Counter
from pathlib import Path

import pytest

from prepretrain.data.labels import vocab as vocab_module
from prepretrain.data.labels.hashtags import HashtagVocab, build_vocab, source_hashtags, synonym_map
from prepretrain.data.labels.vocab import build_vocab_streaming, count_hashtags
from prepretrain.data.readers import folders as sources_module
from prepretrain.data.readers.folders import ManifestSource
from prepretrain.data.records import Annotation, BadSample, iter_annotations
from prepretrain.data.shards import samples as shards_module
from prepretrain.data.shards.reader import ShardSource
from prepretrain.data.shards.write import write_shards
from prepretrain.data.synthetic import images as synthetic_module
from prepretrain.data.synthetic.export import write_synthetic
from prepretrain.data.synthetic.images import ATTRIBUTE_TAGS, SyntheticSource

ALIASES = synonym_map([group for attribute in ATTRIBUTE_TAGS.values() for group in attribute])


def no_decoding(*args, **kwargs):
    raise AssertionError("an image was decoded")


def same_vocab(streamed: HashtagVocab, whole: HashtagVocab) -> None:
    assert streamed.tags == whole.tags
    assert streamed.counts == whole.counts
    assert streamed.aliases == whole.aliases
    assert streamed.info == whole.info


@pytest.fixture(scope="module")
def manifest_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic(tmp_path_factory.mktemp("synthetic"), image_size=16, splits=("train",), sizes={"train": 48})


@pytest.mark.parametrize(("min_count", "max_size", "aliases"), [(1, 28_000, None), (3, 12, ALIASES)])
def test_streaming_equals_build_vocab_on_the_synthetic_set(min_count, max_size, aliases, monkeypatch) -> None:
    source = SyntheticSource(300, image_size=16, seed=1)
    whole = build_vocab(source_hashtags(source), min_count=min_count, max_size=max_size, aliases=aliases)
    monkeypatch.setattr(synthetic_module, "_render", no_decoding)
    streamed = build_vocab_streaming(source, min_count=min_count, max_size=max_size, aliases=aliases)
    same_vocab(streamed, whole)
    if aliases:
        assert streamed.aliases and set(streamed.aliases.values()) <= set(streamed.tags)


def test_synthetic_annotation_is_the_record_without_pixels() -> None:
    source = SyntheticSource(40, image_size=16, seed=3, split="val")
    for index in range(40):
        record = source.get(index)
        assert source.annotation(index) == Annotation(record.key, record.hashtags, record.caption, record.labels)


def test_streaming_equals_build_vocab_on_a_manifest(manifest_dir: Path, monkeypatch) -> None:
    manifest = ManifestSource(manifest_dir / "train.jsonl")
    whole = build_vocab(source_hashtags(manifest), min_count=2, max_size=40, aliases=ALIASES)
    monkeypatch.setattr(sources_module, "load_pixels", no_decoding)
    with pytest.raises(AssertionError, match="decoded"):
        manifest.get(0)  # the guard works: reading a record would fail the test
    same_vocab(build_vocab_streaming(manifest, min_count=2, max_size=40, aliases=ALIASES), whole)

    counts, stats = count_hashtags(manifest, aliases=ALIASES)
    assert stats["images"] == 48 and stats["exact"] and stats["prunings"] == 0 and stats["unreadable"] == 0
    assert stats["tag_occurrences"] == sum(counts.values()) and stats["distinct_tags"] == len(counts)
    assert whole.counts == [counts[tag] for tag in whole.tags]


def test_tags_under_another_field_name(manifest_dir: Path, tmp_path: Path) -> None:
    original = ManifestSource(manifest_dir / "train.jsonl")
    whole = build_vocab(source_hashtags(original), min_count=2)
    rows = [json.loads(line) for line in (manifest_dir / "train.jsonl").read_text().splitlines()]
    renamed = tmp_path / "renamed.jsonl"
    with renamed.open("w") as lines:
        for row in rows:
            tags = row.pop("hashtags")
            row["labels_text"] = " | ".join(tags)  # one separator-joined string
            row["path"] = str(manifest_dir / row["path"])
            row["text"] = row.pop("caption")
            lines.write(json.dumps(row) + "\n")
    jsonl = ManifestSource(renamed, hashtag_field="labels_text", caption_field="text")
    assert jsonl.annotation(5).caption == original.annotation(5).caption
    same_vocab(build_vocab_streaming(jsonl, min_count=2), whole)
    assert all(tags == [] for tags in source_hashtags(ManifestSource(renamed)))  # default field: none there

    table = tmp_path / "renamed.csv"
    with table.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "tags", "caption"])
        for row in rows:
            writer.writerow([row["path"], row["labels_text"], row["text"]])
    same_vocab(build_vocab_streaming(ManifestSource(table, hashtag_field="tags"), min_count=2), whole)


def test_streaming_reads_only_annotation_members_of_shards(manifest_dir: Path, tmp_path: Path, monkeypatch) -> None:
    manifest = ManifestSource(manifest_dir / "train.jsonl")
    write_shards(manifest, tmp_path / "s", samples_per_shard=10, verbose=False)
    (tmp_path / "s" / "index.json").unlink()  # counts come from the tar headers then
    source = ShardSource(tmp_path / "s")
    whole = build_vocab(source_hashtags(manifest), min_count=2, aliases=ALIASES)
    extracted: list[str] = []
    real_extractfile = tarfile.TarFile.extractfile

    def recording_extractfile(self, member):
        extracted.append(member.name)
        return real_extractfile(self, member)

    monkeypatch.setattr(shards_module, "load_pixels", no_decoding)
    monkeypatch.setattr(tarfile.TarFile, "extractfile", recording_extractfile)
    same_vocab(build_vocab_streaming(source, min_count=2, aliases=ALIASES), whole)
    assert len(extracted) == 48 and all(name.endswith(".json") for name in extracted)
    assert source.skips.seen == 0  # statistics leave the source's own counter alone
    assert len(source) == 48 and source.count_source == "counted"


def test_unreadable_samples_count_as_images_without_tags(tmp_path: Path) -> None:
    class Flaky:
        def __len__(self) -> int:
            return 30

        def annotation(self, index: int) -> Annotation:
            if index % 7 == 3:
                raise BadSample(f"k{index}", "missing_file")
            return Annotation(f"k{index}", hashtags=["#Dog", "dog", "PUPPY"] if index % 2 else ["  "])

        def get(self, index: int):
            raise AssertionError("an image was decoded")

    source = Flaky()
    aliases = synonym_map([["dog", "puppy"]])
    same_vocab(build_vocab_streaming(source, aliases=aliases),
               build_vocab(source_hashtags(source), aliases=aliases))
    counts, stats = count_hashtags(source, aliases=aliases)
    assert counts == Counter({"dog": 13})  # once per image, synonyms merged, blank tags dropped
    assert stats["unreadable"] == 4 and stats["images_without_tags"] == 17 and stats["images"] == 30
    assert stats["skipped"] == {"missing_file": 4}
    assert [type(outcome).__name__ for outcome in iter_annotations(source, [2, 3])] == ["Annotation", "BadSample"]


class ZipfTags:
    """Every image: one head tag, one of 5 mid tags, one tag nobody else has."""

    def __init__(self, images: int):
        self.images = images

    def __len__(self) -> int:
        return self.images

    def annotation(self, index: int) -> Annotation:
        return Annotation(f"k{index}", hashtags=["head", f"mid{index % 5}", f"unique{index}"])

    def get(self, index: int):
        raise AssertionError("an image was decoded")


def test_pruning_bounds_memory_and_is_reported(monkeypatch) -> None:
    source = ZipfTags(400)
    sizes: list[int] = []
    real_prune = vocab_module.prune_rarest

    def recording_prune(counts):
        sizes.append(len(counts))
        return real_prune(counts)

    monkeypatch.setattr(vocab_module, "prune_rarest", recording_prune)
    counts, stats = count_hashtags(source, max_distinct=20)
    assert sizes and max(sizes) <= 20 + 3  # never more than max_distinct plus one image's tags
    assert stats["prunings"] == len(sizes) and not stats["exact"] and stats["distinct_tags"] == len(counts) <= 20
    assert stats["pruned_tags"] >= 400 - 20 and stats["count_error_bound"] == len(sizes)  # only count-1 tags dropped
    assert counts["head"] == 400 and all(counts[f"mid{m}"] == 80 for m in range(5))  # frequent tags stay exact
    assert stats["images"] == 400 and stats["tag_occurrences"] == 1200

    streamed = build_vocab_streaming(source, min_count=2, max_distinct=20)
    whole = build_vocab(source_hashtags(source), min_count=2)
    assert streamed.tags == whole.tags and streamed.counts == whole.counts
    assert streamed.info["approximate"] is True and streamed.info["prunings"] == stats["prunings"]
    assert streamed.info["count_error_bound"] == stats["count_error_bound"]
    exact = build_vocab_streaming(source, min_count=2, max_distinct=10_000)
    same_vocab(exact, whole)
    assert "approximate" not in exact.info


def test_bad_limits_fail_before_reading() -> None:
    class Unreadable:
        def __len__(self) -> int:
            raise AssertionError("read")

    for bad in ({"min_count": 0}, {"max_size": 0}):
        with pytest.raises(ValueError, match="must be >= 1"):
            build_vocab_streaming(Unreadable(), **bad)
    with pytest.raises(ValueError, match="max_distinct"):
        count_hashtags(Unreadable(), max_distinct=1)


def test_saved_streaming_vocab_loads_back(tmp_path: Path) -> None:
    vocab = build_vocab_streaming(SyntheticSource(100, image_size=16), min_count=2, aliases=ALIASES)
    same_vocab(HashtagVocab.load(vocab.save(tmp_path / "vocab.json")), vocab)


def test_data_vocab_command_writes_the_vocabulary_wsp_reads(tmp_path, capsys):
    from prepretrain.cli import main
    from prepretrain.data.labels.hashtags import HashtagVocab, build_vocab, source_hashtags
    from prepretrain.data.labels.vocab import tag_aliases
    from prepretrain.data.readers.open import open_data
    from prepretrain.data.synthetic.export import write_synthetic

    data = write_synthetic(tmp_path / "synth", num_images=120, image_size=16, seed=0)
    out = tmp_path / "vocab.json"
    assert main(["data", "vocab", str(data), "--out", str(out), "--min-count", "2"]) == 0
    assert "wrote" in capsys.readouterr().out
    written = HashtagVocab.load(out)
    source = open_data(str(data), split="train")
    expected = build_vocab(source_hashtags(source), min_count=2, max_size=28_000, aliases=tag_aliases(source, "auto"))
    assert written.tags == expected.tags and written.counts == expected.counts

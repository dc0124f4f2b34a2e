"""Weak labels from open data: Flickr tags, caption words, WordNet synsets (data/labels/weaklabels.py),
metadata tables joined by key (data/readers/metadata.py), and `prepretrain data vocab --labels-from`."""

import bz2
import json
import pickle

import pytest

from prepretrain.data.labels.hashtags import HashtagVocab, normalize_hashtag
from prepretrain.data.labels.weaklabels import (
    SynsetIndex,
    WeakLabeler,
    caption_words,
    flickr_tags,
    parse_labels_from,
    split_flickr_tags,
    synset_index,
    tokenize,
)
from prepretrain.data.readers.metadata import MetadataError, MetadataTable, detect_format, yfcc_text
from prepretrain.data.records import Annotation


def labels(kind, caption="", hashtags=()):
    return WeakLabeler(kind)(Annotation("k", list(hashtags), caption))


# -- Flickr tags ------------------------------------------------------------------------------

def test_flickr_tags_are_url_decoded_case_folded_and_machine_tags_dropped():
    raw = split_flickr_tags("new+york,Dog,caf%C3%A9,geo%3Alat%3D48.8583,upload:by=flickrmobile,c%2B%2B,,dog,%20")
    assert raw == ["new+york", "Dog", "caf%C3%A9", "geo%3Alat%3D48.8583", "upload:by=flickrmobile", "c%2B%2B", "dog",
                   "%20"]
    assert flickr_tags(raw) == ["new york", "dog", "café", "c++"]
    # as hashtags they are then normalised like any tag: a hashtag has no spaces
    assert [normalize_hashtag(tag) for tag in flickr_tags(raw)] == ["newyork", "dog", "café", "c++"]
    labeler = WeakLabeler("tags")
    assert labeler(Annotation("k", raw)) == ["new york", "dog", "café", "c++"]
    assert labeler.counts.machine_tags == 2


# -- caption words ---------------------------------------------------------------------------

def test_caption_words_drop_stop_words_and_numbers_and_lemmatise_plurals():
    assert tokenize("The dog's toys, 2 CATS & a Café-au-lait in 2019!") == [
        "the", "dog", "toys", "cats", "a", "café", "au", "lait", "in"]
    assert caption_words("Two dogs and three geese on the beaches; mice, berries, boxes") == [
        "dog", "goose", "beach", "mouse", "berry", "box"]
    assert caption_words("A photo of a dog, a DOG and dogs") == ["dog"]  # each word once; "photo" is boilerplate
    assert caption_words("it is what it is") == []


def test_non_latin_words_are_left_out_and_counted_latin_non_english_kept():
    labeler = WeakLabeler("caption")
    assert labeler(Annotation("k", [], "東京 の 猫 and a Katze in München")) == ["katze", "münchen"]
    assert labeler.counts.non_latin_words == 3


def test_empty_captions_give_no_label_and_are_counted():
    labeler = WeakLabeler("caption+synsets")
    assert labeler(Annotation("a", [], "")) == []
    assert labeler(Annotation("b", [], "   ")) == []
    assert labeler(Annotation("c", [], "of the")) == []  # not empty, but no word left: not counted as empty
    assert labeler.counts.empty_captions == 2 and labeler.counts.images == 3


# -- synsets ---------------------------------------------------------------------------------

def test_multi_word_lemmas_win_over_their_words_and_plurals_match():
    index = synset_index()
    assert index.find(tokenize("a hot dog")) == ["n07697537"]  # hotdog, hot dog, red hot
    assert index.find(tokenize("Two hot dogs")) == ["n07697537"]
    assert index.find(tokenize("my dogs")) == ["n02084071"]  # dog, domestic dog: not the andiron (3rd lemma)
    assert index.find(tokenize("a red car")) == ["n02958343", "n02959942", "n02960352"]  # 'red': no head lemma
    assert set(index.find(tokenize("a mouse"))) == {"n02330245", "n03793489"}  # rodent and device: both first


def test_a_synset_table_of_ones_own_makes_the_mapping_one_to_one(tmp_path):
    table = tmp_path / "lemmas.txt"
    table.write_text("n1\tdog, domestic dog\nn2\tfirefly, lightning bug\nn3\tbug\nn4\tdog, frump\n")
    index = SynsetIndex.read(table)
    assert index.find(tokenize("Lightning bugs near a dog and a bug")) == ["n2", "n1", "n4", "n3"]
    labeler = WeakLabeler("synsets", synset_table=str(table))
    assert labeler(Annotation("k", [], "lightning bugs")) == ["n2"]
    assert labeler.display_name("n2") == "firefly"
    bad = tmp_path / "bad.txt"
    bad.write_text("n1 dog\n")
    with pytest.raises(ValueError, match="bad.txt:1"):
        SynsetIndex.read(bad)


def test_labels_from_combines_kinds_and_the_labeler_pickles():
    assert parse_labels_from("caption+tags") == ("caption", "tags")
    with pytest.raises(ValueError, match="'words'.*hashtags, tags, caption, synsets"):
        parse_labels_from("caption+words")
    labeler = WeakLabeler("hashtags+caption")
    annotation = Annotation("k", ["#Beach"], "dogs on a beach")
    assert labeler(annotation) == ["#Beach", "dog", "beach"]
    assert pickle.loads(pickle.dumps(labeler))(annotation) == ["#Beach", "dog", "beach"]
    assert WeakLabeler()(annotation) == ["#Beach"]  # the default: hashtags as they are


# -- metadata tables -------------------------------------------------------------------------

def yfcc_line(line, photo, title, description, tags, marker="0", columns=25):
    """A YFCC100M metadata line: 25 columns (line number, photo id, hash, ...) or the first release's 23."""
    fields = [""] * columns
    if columns == 25:
        fields[0], fields[1], fields[24] = line, photo, marker
        fields[8], fields[9], fields[10] = title, description, tags
    else:
        fields[0], fields[6], fields[7], fields[8], fields[22] = photo, title, description, tags, marker
    return "\t".join(map(str, fields)) + "\n"


def test_yfcc_metadata_plain_and_bz2_25_and_23_columns(tmp_path, monkeypatch):
    monkeypatch.setenv("PREPRETRAIN_CACHE", str(tmp_path / "cache"))
    lines = (yfcc_line(0, 1001, "Eiffel+Tower", "At+night+%3Ca+href%3D%22http%3A%2F%2Fx.com%22%3Elink%3C%2Fa%3E",
                       "paris,eiffel+tower,geo%3Alat%3D48.8")
             + yfcc_line(1, 1002, "", "", "dog,beach") + yfcc_line(2, 1003, "a+video", "", "cat", marker="1"))
    plain = tmp_path / "yfcc100m_dataset"
    plain.write_text(lines)
    packed = tmp_path / "yfcc100m_dataset-0.bz2"
    packed.write_bytes(bz2.compress(lines.encode()))
    old = tmp_path / "old.tsv"
    old.write_text(yfcc_line(0, 2001, "Big+cat", "", "cat", columns=23))
    for path in (plain, packed):
        table = MetadataTable(path)
        assert (table.format, len(table), table.info["videos"]) == ("yfcc", 2, 1)
        assert table.lookup("1001") == (["paris", "eiffel+tower", "geo%3Alat%3D48.8"], "Eiffel Tower. At night link")
        assert table.lookup("1002") == (["dog", "beach"], "")
        assert table.lookup("1003") is None and table.lookup("9") is None
    assert MetadataTable(old).lookup("2001") == (["cat"], "Big cat")
    assert yfcc_text("a+%3Cb%3Ebold%3C%2Fb%3E+www.x.org+end") == "a bold end"


def test_caption_tsv_parquet_jsonl_and_csv_tables(tmp_path, monkeypatch):
    monkeypatch.setenv("PREPRETRAIN_CACHE", str(tmp_path / "cache"))
    cc3m = tmp_path / "cc3m.tsv"  # caption<TAB>url
    cc3m.write_text("a dog on a beach\thttp://x/1.jpg\ntwo cats\thttps://x/2.jpg\n")
    cc12m = tmp_path / "cc12m.tsv"  # url<TAB>caption
    cc12m.write_text("http://x/1.jpg\ta dog on a beach\nhttps://x/2.jpg\ttwo cats\n")
    for path in (cc3m, cc12m):
        table = MetadataTable(path)
        assert table.format == "caption-tsv"
        assert table.lookup("http://x/1.jpg") == ([], "a dog on a beach")
        assert table.lookup("https://x/2.jpg") == ([], "two cats")
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    parquet = tmp_path / "datacomp.parquet"
    pq.write_table(pyarrow.table({"uid": ["a1", "b2"], "url": ["u1", "u2"], "text": ["red car", None]}), parquet)
    table = MetadataTable(parquet)
    assert (table.lookup("a1"), table.lookup("b2"), table.lookup("u1")) == (([], "red car"), ([], ""), None)
    jsonl = tmp_path / "meta.jsonl"
    jsonl.write_text(json.dumps({"key": "7", "tags": ["#x", "y"], "caption": "c"}) + "\nnot json\n")
    table = MetadataTable(jsonl)
    assert (table.lookup("7"), table.info["bad_rows"]) == ((["#x", "y"], "c"), 1)
    csv_file = tmp_path / "meta.csv"
    csv_file.write_text("photo_id,user_tags\n5,\"a,b\"\n")
    assert MetadataTable(csv_file).lookup("5") == (["a", "b"], "")
    odd = tmp_path / "odd.tsv"
    odd.write_text("a\tb\tc\n")
    with pytest.raises(MetadataError, match="odd.tsv.*3 tab-separated columns"):
        detect_format(odd)


def test_a_join_that_matches_nothing_names_the_key_and_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("PREPRETRAIN_CACHE", str(tmp_path / "cache"))
    table_file = tmp_path / "meta.jsonl"
    table_file.write_text("".join(json.dumps({"uid": f"u{i}", "caption": "dog"}) + "\n" for i in range(3)))
    table = MetadataTable(table_file)
    joined = table.join(Annotation("shard-0/000001", ["#own"], "own"))
    assert (joined.hashtags, joined.caption, table.missing) == (["#own"], "own", 1)  # kept its own, counted
    assert table.join(Annotation("images/u2.jpg", [], "")).caption == "dog"  # by file name stem
    with pytest.raises(MetadataError, match=r"none of the first 1000 images.*'shard-0/000001'.*metadata_key="):
        fresh = MetadataTable(table_file)
        for _ in range(1000):
            fresh.join(Annotation("shard-0/000001", [], ""))
    by_field = MetadataTable(table_file, key_field="uid")
    assert by_field.join(Annotation("000", [], ""), {"uid": "u1"}).caption == "dog"
    assert pickle.loads(pickle.dumps(by_field)).lookup("u0") == ([], "dog")


def test_vocab_from_captions_is_the_training_vocab(tmp_path):
    """`data vocab --labels-from synsets` writes the vocabulary WSP builds with labels_from=synsets."""
    from prepretrain.cli import main
    from prepretrain.config import build_config
    from prepretrain.stages.wsp import WSPConfig, WSPStage
    from prepretrain.train.run import Run

    out = tmp_path / "vocab.json"
    assert main(["data", "vocab", "synthetic", "--out", str(out), "--labels-from", "synsets", "--size", "200"]) == 0
    written = HashtagVocab.load(out)
    assert written.info["labels_from"] == "synsets" and written.info["coverage"]["share_with_labels"] > 0.95
    cfg = build_config(WSPConfig, None, dict(out_dir=str(tmp_path / "run"), labels_from="synsets", vocab_size=200,
                                             progress="false", tensorboard="false"))
    stage = WSPStage(cfg)
    data = stage.prepare(Run.of_stage(stage))
    assert data.vocab.tags == written.tags and data.vocab.counts == written.counts
    # every label made the vocabulary, so the images WSP cannot draw are those the caption gave no synset
    assert written.info["coverage"]["share_of_occurrences_in_vocab"] == 1.0
    coverage = written.info["coverage"]
    assert data.stats["images_without_known_tag"] == coverage["images"] - coverage["images_with_labels"] > 0


# -- WSP end to end on open-data layouts -----------------------------------------------------

def wsp_twice_with_a_resume(tmp_path, name, **values):
    """Train 4 steps; then copy the run, drop its step-4 checkpoint and outputs, rerun: the
    resumed run must end with the same weights, bit for bit."""
    import shutil

    import torch
    from safetensors.torch import load_file

    from prepretrain.config import build_config
    from prepretrain.stages.wsp import WSPConfig, WSPStage
    from prepretrain.train.engine import train

    def run(out_dir):
        cfg = build_config(WSPConfig, None, {
            "out_dir": str(out_dir), "depth": "1", "batch_size": "8", "image_size": "32", "steps": "4",
            "ckpt_every": "2", "progress": "false", "tensorboard": "false", "vocab_min_count": "1",
            "log_every": "1", **values})
        return train(WSPStage(cfg))

    whole, resumed = tmp_path / f"{name}_whole", tmp_path / f"{name}_resumed"
    results = run(whole)
    shutil.copytree(whole, resumed)
    for path in (resumed / "checkpoints").glob("step_00000004*"):
        path.unlink()
    for output in ("encoder.safetensors", "head.safetensors", "results.json"):
        (resumed / output).unlink()
    run(resumed)
    for output in ("encoder.safetensors", "head.safetensors"):
        expected, got = load_file(str(whole / output)), load_file(str(resumed / output))
        assert all(torch.equal(expected[key], got[key]) for key in expected), output
    return results, HashtagVocab.load(whole / "vocab.json")


def test_wsp_trains_from_img2dataset_shards_with_captions_only(tmp_path, monkeypatch):
    from test_img2dataset import WORDS, write_img2dataset

    monkeypatch.setenv("PREPRETRAIN_CACHE", str(tmp_path / "cache"))
    folder = write_img2dataset(tmp_path / "cc12m", shards=(16, 16))  # captions in .txt (and .json in shard 0)
    results, vocab = wsp_twice_with_a_resume(tmp_path, "caption", data=str(folder), labels_from="caption")
    words = {word for caption in WORDS for word in caption_words(caption)}
    assert set(vocab.tags) == words and vocab.info["labels_from"] == "caption"
    assert results["train_images"] == 32 and results["train_images_without_known_tag"] == 0
    _, synsets = wsp_twice_with_a_resume(tmp_path, "synsets", data=str(folder), labels_from="synsets")
    assert {"n02084071", "n09217230"} <= set(synsets.tags)  # dog, beach


def test_wsp_trains_from_yfcc_metadata_joined_to_shards_by_photo_id(tmp_path, monkeypatch):
    """YFCC100M as people have it: the metadata TSV (bz2) and images downloaded into shards whose
    .json keeps the photo id (img2dataset's --save_additional_columns)."""
    import tarfile

    from test_img2dataset import _add, _jpeg

    monkeypatch.setenv("PREPRETRAIN_CACHE", str(tmp_path / "cache"))
    tags = ["dog,beach,geo%3Alat%3D1", "cat,snow", "new+york,city", "dog,snow"]
    titles = ["My+dogs", "Cats+in+snow", "NYC", "Snowy+dog"]
    lines = "".join(yfcc_line(i, 5000 + i, titles[i % 4], "", tags[i % 4]) for i in range(40))
    metadata = tmp_path / "yfcc100m_dataset-0.bz2"
    metadata.write_bytes(bz2.compress(lines.encode()))
    shards = tmp_path / "yfcc" / "train"
    shards.mkdir(parents=True)
    for shard in range(2):
        with tarfile.open(shards / f"{shard:05d}.tar", "w") as archive:
            for i in range(shard * 16, shard * 16 + 16):
                _add(archive, f"{i:09d}.jpg", _jpeg(i))
                _add(archive, f"{i:09d}.json", json.dumps({"key": f"{i:09d}", "photoid": 5000 + i}).encode())
    results, vocab = wsp_twice_with_a_resume(tmp_path, "yfcc", data=str(shards), metadata=str(metadata),
                                             metadata_key="photoid", labels_from="tags")
    assert set(vocab.tags) == {"dog", "beach", "cat", "snow", "newyork", "city"}  # the machine tag is not a label
    assert results["train_images"] == 32 and results["train_images_without_known_tag"] == 0
    _, words = wsp_twice_with_a_resume(tmp_path, "yfcc_words", data=str(shards), metadata=str(metadata),
                                       metadata_key="photoid", labels_from="caption")
    assert set(words.tags) == {"dog", "cat", "snow", "nyc", "snowy"}


def test_user_mistakes_are_one_line_with_their_exit_code(tmp_path, monkeypatch, capsys):
    from prepretrain.cli import main

    monkeypatch.setenv("PREPRETRAIN_CACHE", str(tmp_path / "cache"))
    table = tmp_path / "meta.jsonl"
    table.write_text("".join(json.dumps({"uid": f"u{i}", "caption": "dog"}) + "\n" for i in range(3)))
    out = f"out_dir={tmp_path / 'run'}"
    cases = [
        (["wsp", out, "labels_from=words"], 2, "'labels_from': unknown label kind 'words'"),
        (["data", "vocab", "synthetic", "--out", str(tmp_path / "w.json"), "--labels-from", "words"], 2,
         "'labels_from': unknown label kind 'words'"),
        (["wsp", out, "metadata=/nowhere.tsv"], 2, "'metadata': metadata table not found: /nowhere.tsv"),
        (["wsp", out, "metadata_key=uid"], 2, "'metadata_key': names the image field"),
        (["wsp", out, "labels_from=synsets", f"synset_table={tmp_path}/none.txt"], 2,
         "'synset_table': synset table not"),
        (["data", "vocab", "synthetic", "--out", str(tmp_path / "v.json"), "--metadata", str(table)], 3,
         "none of the first 1000 images was found in it by their key (or file name stem) "
         "(e.g. 'synthetic-s0/train/00000000'); set metadata_key="),
    ]
    captions = tmp_path / "captions.json"
    assert main(["data", "vocab", "synthetic", "--out", str(captions), "--labels-from", "caption"]) == 0
    capsys.readouterr()
    cases.append((["wsp", out, "labels_from=synsets", f"vocab={captions}"], 2,
                  "'labels_from': is synsets, but vocab=" + str(captions) + " was built from caption labels"))
    for argv, code, message in cases:
        assert main(argv) == code, argv
        err = capsys.readouterr().err.strip()
        assert message in err and "Traceback" not in err and len(err.splitlines()) == 1, err

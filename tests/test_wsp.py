"""WSP: vocabulary, resampling, losses and metrics against plain computations; MAE init; the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from prepretrain.cli import main
from prepretrain.config import ConfigError, build_config
from prepretrain.data.labels.hashtags import (
    EmptyVocabulary,
    HashtagVocab,
    VocabularyMismatch,
    build_vocab,
    encode_images,
    load_synonyms,
    normalize_hashtag,
    pad_tags,
    sampling_weights,
    synonym_map,
    tag_image_counts,
    target_prior,
)
from prepretrain.data.loader import SampleStream
from prepretrain.data.records import BadSample, Record
from prepretrain.models.checkpoints import CheckpointMismatch
from prepretrain.models.heads import (
    average_precision,
    init_head,
    multilabel_loss,
    precision_at_k,
    prior_bias,
)
from prepretrain.models.mae import create_mae, sincos_2d
from prepretrain.models.vit import create_vit
from prepretrain.stages.wsp import HashtagTransform, WSPConfig, WSPStage, load_tagger
from prepretrain.train.run import Run

# ------------------------------------------------------------------------- vocabulary


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("#Dog", "dog"),
        ("  DOG \t", "dog"),
        ("##dog", "dog"),
        ("＃ＤＯＧ", "dog"),  # full-width hash and letters (NFKC)
        ("ﬁsh", "fish"),  # ligature (NFKC)
        ("#New York", "newyork"),
        ("Straße", "strasse"),  # case folding, not just lower()
        ("#", ""),
        ("   ", ""),
    ],
)
def test_normalize_hashtag(raw, expected):
    assert normalize_hashtag(raw) == expected


IMAGES = [
    ["#Dog", "dog", "#beach"],  # dog counted once for this image
    ["DOG", "#Sun"],
    ["beach", "sun", "cat"],
    ["#dog", "cat"],
    ["rare"],
    [],
]


def test_build_vocab_counts_per_image_orders_by_count_then_name_and_applies_min_count_and_top_k():
    vocab = build_vocab(IMAGES, min_count=1, max_size=100)
    assert vocab.tags == ["dog", "beach", "cat", "sun", "rare"]  # 3, then three 2s alphabetically, then 1
    assert vocab.counts == [3, 2, 2, 2, 1]
    assert build_vocab(IMAGES, min_count=2).tags == ["dog", "beach", "cat", "sun"]
    top = build_vocab(IMAGES, min_count=1, max_size=2)
    assert top.tags == ["dog", "beach"] and top.info["dropped_rare_tags"] == 3
    with pytest.raises(EmptyVocabulary, match="min_count|>= 4"):
        build_vocab(IMAGES, min_count=4)
    with pytest.raises(EmptyVocabulary):
        build_vocab([[], ["#"]], min_count=1)


def test_encode_drops_and_counts_unknown_tags_and_tagless_images():
    vocab = build_vocab(IMAGES, min_count=2)  # dog beach cat sun
    known, unknown = vocab.encode(["#Cat", "zebra", "DOG", "dog", "#", "rare"])
    assert known == [0, 2] and unknown == 2  # '#' is empty, not unknown
    encoded = encode_images(vocab, IMAGES)
    assert encoded.stats() == {
        "images": 6, "images_without_known_tag": 2, "known_tag_occurrences": 9, "unknown_tag_occurrences": 1,
    }
    assert encoded.tags_of(2).tolist() == [1, 2, 3]
    assert tag_image_counts(encoded, len(vocab)).tolist() == [3, 2, 2, 2]


@pytest.mark.parametrize("suffix", [".json", ".txt"])
def test_vocab_save_and_reload(tmp_path, suffix):
    vocab = build_vocab(IMAGES, min_count=1)
    path = vocab.save(tmp_path / f"vocab{suffix}")
    again = HashtagVocab.load(path)
    assert again.tags == vocab.tags and again.counts == vocab.counts
    assert again.encode(["#SUN", "moon"]) == vocab.encode(["#SUN", "moon"])


def test_vocab_file_written_by_hand_is_normalised_and_checked(tmp_path):
    (tmp_path / "tags.txt").write_text("#Dog\nBeach\n\n")
    assert HashtagVocab.load(tmp_path / "tags.txt").tags == ["dog", "beach"]
    (tmp_path / "dupes.json").write_text(json.dumps(["#dog", "DOG"]))
    with pytest.raises(ValueError, match="duplicate"):
        HashtagVocab.load(tmp_path / "dupes.json")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(EmptyVocabulary):
        HashtagVocab.load(tmp_path / "empty.txt")


def test_synonyms_merge_tags_into_one_class_and_survive_save_and_reload(tmp_path):
    aliases = synonym_map([["dog", "#Puppy", "DOGGO"], ["sun", "sunny"]])
    assert aliases == {"puppy": "dog", "doggo": "dog", "sunny": "sun"}
    images = [["#puppy"], ["dog", "doggo"], ["sunny"], ["cat"]]
    vocab = build_vocab(images, min_count=1, aliases=aliases)
    assert vocab.tags == ["dog", "cat", "sun"] and vocab.counts == [2, 1, 1]  # dog+doggo in one image: once
    assert vocab.encode(["#Puppy", "sunny", "zebra"]) == ([0, 2], 1)
    again = HashtagVocab.load(vocab.save(tmp_path / "vocab.json"))
    assert again.aliases == vocab.aliases and again.encode(["DOGGO"]) == ([0], 0)
    with pytest.raises(ValueError, match="json"):
        vocab.save(tmp_path / "vocab.txt")
    with pytest.raises(ValueError, match="both"):
        synonym_map([["dog", "puppy"], ["cat", "puppy"]])


def test_synonym_tables_from_files(tmp_path):
    (tmp_path / "groups.json").write_text(json.dumps({"dog": ["puppy", "doggo"]}))
    (tmp_path / "pairs.json").write_text(json.dumps({"puppy": "dog", "doggo": "dog"}))
    (tmp_path / "groups.txt").write_text("dog puppy, doggo\n\n")
    expected = {"puppy": "dog", "doggo": "dog"}
    for name in ("groups.json", "pairs.json", "groups.txt"):
        assert load_synonyms(tmp_path / name) == expected


# ------------------------------------------------------------------------- resampling


def plain_weights(images, vocab, power, reduce):
    counts = {tag: 0 for tag in vocab.tags}
    for tags in images:
        for tag in {normalize_hashtag(t) for t in tags} & set(counts):
            counts[tag] += 1
    result = []
    for tags in images:
        known = {normalize_hashtag(t) for t in tags} & set(counts)
        values = [counts[t] ** -power for t in known]
        result.append(0.0 if not values else max(values) if reduce == "max" else sum(values) / len(values))
    return result


@pytest.mark.parametrize("reduce", ["max", "mean"])
@pytest.mark.parametrize("power", [0.5, 1.0, 0.0])
def test_sampling_weights_equal_plain_computation(power, reduce):
    vocab = build_vocab(IMAGES, min_count=2)
    encoded = encode_images(vocab, IMAGES)
    weights = sampling_weights(encoded, tag_image_counts(encoded, len(vocab)), power=power, reduce=reduce)
    expected = plain_weights(IMAGES, vocab, power, reduce)
    np.testing.assert_allclose(weights.numpy(), expected, rtol=1e-12)
    assert weights[4] == 0 and weights[5] == 0  # no known tag: never drawn


def zipf_images(num_images: int, num_tags: int, seed: int = 0) -> list[list[str]]:
    rng = np.random.default_rng(seed)
    probs = 1.0 / np.arange(1, num_tags + 1) ** 1.2
    probs /= probs.sum()
    return [[f"t{j}" for j in rng.choice(num_tags, size=rng.integers(1, 4), p=probs)] for _ in range(num_images)]


def test_sampling_frequencies_follow_inverse_sqrt_weights_chi_square():
    images = zipf_images(40, 15) + [["nothing_known"]]
    vocab = build_vocab(images[:-1], min_count=1)
    encoded = encode_images(vocab, images)
    weights = sampling_weights(encoded, tag_image_counts(encoded, len(vocab)), power=0.5)
    epoch_size, epochs = 5000, 8
    stream = SampleStream(len(images), 500, seed=3, weights=weights, epoch_size=epoch_size)
    draws = np.zeros(len(images))
    batches = iter(stream)
    for _ in range(epoch_size * epochs // 500):
        for index, _ in next(batches):
            draws[index] += 1
    assert draws[-1] == 0  # the tagless image is never drawn
    total = draws.sum()
    expected = weights.numpy() / weights.numpy().sum() * total
    used = expected > 0
    chi2 = float((((draws - expected) ** 2)[used] / expected[used]).sum())
    dof = int(used.sum()) - 1
    # 99.9% quantile of chi-square(dof) by the Wilson-Hilferty approximation
    z = 3.09
    critical = dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3
    assert chi2 < critical, (chi2, critical)
    # and resampling really flattens tag exposure: the rarest tag is seen relatively more often
    counts = tag_image_counts(encoded, len(vocab))
    exposure = np.zeros(len(vocab))
    for image, n in enumerate(draws):
        exposure[encoded.tags_of(image)] += n
    head, tail = int(np.argmax(counts)), int(np.argmin(counts))
    assert exposure[tail] / exposure[head] > 1.5 * counts[tail] / counts[head]


def test_weighted_stream_is_deterministic_and_shards_across_ranks_without_overlap():
    weights = torch.rand(50, dtype=torch.float64)
    single = SampleStream(50, 8, seed=5, weights=weights, epoch_size=64)
    ranks = [SampleStream(50, 4, seed=5, rank=r, world_size=2, weights=weights, epoch_size=64) for r in range(2)]
    one = iter(single)
    split = [iter(stream) for stream in ranks]
    for _ in range(20):  # crosses several epochs
        full = next(one)
        assert full == next(split[0]) + next(split[1])
    again = iter(SampleStream(50, 8, seed=5, weights=weights, epoch_size=64, start_position=16))
    resumed = iter(SampleStream(50, 8, seed=5, weights=weights, epoch_size=64))
    next(resumed), next(resumed)
    assert next(again) == next(resumed)


# ------------------------------------------------------------------------------ losses


def plain_softmax_loss(logits, tag_lists):
    total = 0.0
    for row, tags in zip(logits.tolist(), tag_lists):
        z = max(row)
        log_norm = z + math.log(sum(math.exp(v - z) for v in row))
        target = {t: 1.0 / len(set(tags)) for t in set(tags)}
        total += -sum(weight * (row[t] - log_norm) for t, weight in target.items())
    return total / len(tag_lists)


def plain_sigmoid_loss(logits, tag_lists):
    total = 0.0
    for row, tags in zip(logits.tolist(), tag_lists):
        for j, value in enumerate(row):
            p = 1 / (1 + math.exp(-value))
            total += -math.log(p) if j in tags else -math.log(1 - p)
    return total / len(tag_lists)


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_loss_equals_plain_computation(kind):
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 7, generator=generator) * 2
    tag_lists = [[0], [1, 5], [6, 2, 3], [4, 4]]  # a repeated tag counts once
    padded = torch.stack([pad_tags(tags, 4) for tags in tag_lists])
    loss = multilabel_loss(logits, padded, kind)
    plain = plain_softmax_loss if kind == "softmax" else plain_sigmoid_loss
    assert loss.item() == pytest.approx(plain(logits, tag_lists), rel=1e-5)


def test_pad_tags_keeps_the_rarest_when_truncating():
    assert pad_tags([3, 9], 4).tolist() == [3, 9, -1, -1]
    assert pad_tags([1, 2, 3, 4, 5], 3).tolist() == [3, 4, 5]


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_prior_bias_makes_initial_predictions_the_resampled_prior(kind):
    vocab = build_vocab(IMAGES, min_count=2)
    encoded = encode_images(vocab, IMAGES)
    weights = sampling_weights(encoded, tag_image_counts(encoded, len(vocab)))
    prior = target_prior(encoded, weights, len(vocab), kind)
    w = weights.numpy() / weights.numpy().sum()
    plain = np.zeros(len(vocab))
    for image in range(len(IMAGES)):
        tags = encoded.tags_of(image)
        for t in tags:
            plain[t] += w[image] / (len(tags) if kind == "softmax" else 1)
    np.testing.assert_allclose(prior.numpy(), plain, rtol=1e-12)
    head = torch.nn.Linear(8, len(vocab))
    init_head(head, bias=prior_bias(prior, kind))
    out = head(torch.randn(3, 8))
    probs = out.softmax(-1) if kind == "softmax" else out.sigmoid()
    torch.testing.assert_close(probs, prior.float().expand(3, -1), atol=1e-6, rtol=1e-5)
    assert torch.all(head.weight == 0)


# ----------------------------------------------------------------------------- metrics


def plain_average_precision(scores, positives):
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    hits, total = 0, 0.0
    for rank, i in enumerate(order, start=1):
        if positives[i]:
            hits += 1
            total += hits / rank
    return total / sum(positives)


def test_precision_at_k_and_average_precision_equal_plain_computation():
    generator = torch.Generator().manual_seed(2)
    scores = torch.randn(30, 6, generator=generator)
    targets = (torch.rand(30, 6, generator=generator) < 0.3).float()
    targets[:, 5] = 0
    ap = average_precision(scores, targets)
    for j in range(5):
        assert ap[j].item() == pytest.approx(plain_average_precision(scores[:, j].tolist(), targets[:, j].tolist()))
    assert math.isnan(ap[5].item())
    for k in (1, 3):
        top = scores.topk(k, dim=1).indices
        plain = sum(sum(targets[i, j].item() for j in top[i]) / k for i in range(30)) / 30
        assert precision_at_k(scores, targets, k) == pytest.approx(plain)


# ------------------------------------------------------------------------ stage & init


def tiny_config(tmp_path: Path, **overrides) -> WSPConfig:
    values = dict(out_dir=str(tmp_path / "wsp"), depth=2, num_images=200, batch_size=16, steps=2,
                  progress=False, tensorboard=False, eval_images=50, log_every=1)
    values.update(overrides)
    return build_config(WSPConfig, None, {k: str(v) for k, v in values.items()})


def make_mae_run(run_dir: Path, depth: int = 2) -> dict[str, torch.Tensor]:
    """A tiny MAE run directory laid out as the MAE stage exports it."""
    torch.manual_seed(7)
    mae = create_mae("vit_micro4", img_size=32, depth=depth, decoder_embed_dim=64, decoder_depth=1,
                     decoder_num_heads=4)
    with torch.no_grad():
        for name, param in mae.named_parameters():
            if name not in ("pos_embed", "decoder_pos_embed"):
                param.add_(torch.randn_like(param) * 0.1)  # "trained": not equal to any fresh init
    run_dir.mkdir(parents=True)
    full = {k: v.contiguous() for k, v in mae.state_dict().items()}
    save_file(full, str(run_dir / "mae_full.safetensors"))
    save_file({k: v.contiguous() for k, v in mae.encoder_state_dict().items()}, str(run_dir / "encoder.safetensors"),
              metadata={"model": "vit_micro4", "image_size": "32", "format": "timm-vit"})
    return mae.encoder_state_dict()


@pytest.mark.parametrize("layout", ["run_dir", "full_pickle", "encoder_file"])
def test_init_from_mae_copies_the_encoder_exactly(tmp_path, layout):
    run = tmp_path / "mae_run"
    encoder = make_mae_run(run)
    if layout == "run_dir":
        init = run
    elif layout == "full_pickle":  # the official MAE "full" .pth layout, wrapped in {"model": ...}
        init = tmp_path / "mae_full.pth"
        torch.save({"model": load_file(str(run / "mae_full.safetensors"))}, init)
    else:
        init = run / "encoder.safetensors"
    stage = WSPStage(tiny_config(tmp_path, init=init))
    model = stage.build_model(Run.of_stage(stage))
    state = model.state_dict()
    assert set(state) - set(encoder) == {"head.weight", "head.bias"}
    for key, value in encoder.items():
        assert torch.equal(state[key], value), key
    grid_tokens = torch.from_numpy(sincos_2d(128, 8)).float()[None]
    torch.testing.assert_close(state["pos_embed"], grid_tokens)  # the fixed sin-cos, now learnable
    assert model.pos_embed.requires_grad
    assert torch.all(state["head.weight"] == 0)


def test_init_of_another_architecture_fails_clearly(tmp_path):
    make_mae_run(tmp_path / "mae_run", depth=3)
    stage = WSPStage(tiny_config(tmp_path, init=tmp_path / "mae_run"))
    with pytest.raises(CheckpointMismatch, match=r"init=.*mae_run.*does not fit model=vit_micro4 depth=2"):
        stage.build_model(Run.of_stage(stage))


def test_config_mistakes_name_the_key(tmp_path):
    with pytest.raises(ConfigError, match="'loss'"):
        tiny_config(tmp_path, loss="hinge")
    with pytest.raises(ConfigError, match="'init'"):
        tiny_config(tmp_path, init=tmp_path / "missing")
    with pytest.raises(ConfigError, match="'resample_reduce'"):
        tiny_config(tmp_path, resample_reduce="min")


def test_empty_vocabulary_fails_clearly(tmp_path):
    stage = WSPStage(tiny_config(tmp_path, vocab_min_count=10_000))
    with pytest.raises(EmptyVocabulary, match="vocab_min_count"):
        stage.build_model(Run.of_stage(stage))


def test_images_without_known_tag_get_zero_weight_and_are_counted(tmp_path):
    (tmp_path / "vocab.txt").write_text("circle\nsquare\n")
    stage = WSPStage(tiny_config(tmp_path, vocab=tmp_path / "vocab.txt"))
    data = stage.train_data(Run.of_stage(stage))
    encoded = stage.prepare(Run.of_stage(stage)).encoded
    tagless = encoded.num_tags == 0
    assert 0 < tagless.sum() < len(encoded)
    assert torch.all(data.weights[torch.from_numpy(tagless)] == 0)
    assert torch.all(data.weights[torch.from_numpy(~tagless)] > 0)
    transform = HashtagTransform(stage.prepare(Run.of_stage(stage)).vocab, lambda image: image, 4)
    with pytest.raises(BadSample, match="no_known_tag"):
        transform(Record(image=None, key="k", hashtags=["#triangle"]))
    metrics = stage.evaluate(create_vit("vit_micro4", num_classes=2, img_size=32, depth=1), Run.of_stage(stage))
    assert metrics["train_images_without_known_tag"] == int(tagless.sum())
    assert metrics["val_images_without_known_tag"] > 0
    assert metrics["val_images"] + metrics["val_images_without_known_tag"] == 50


def test_cli_rejects_a_mistyped_key_before_any_compute(tmp_path, capsys):
    assert main(["wsp", f"out_dir={tmp_path / 'run'}", "los=sigmoid"]) == 2
    assert "'los'" in capsys.readouterr().err and not (tmp_path / "run").exists()


@pytest.mark.slow
def test_cli_evaluates_against_the_most_frequent_tag_baseline_and_exports_a_timm_encoder(tmp_path):
    """The CLI run directory later stages read, from a short run (depth 2, 20 steps). That the
    default WSP *learns* (held-out precision@1 well above the most-frequent-tag baseline) is
    asserted on the README's full default run in tests/test_demo_chain.py, which trains it anyway."""
    run = tmp_path / "wsp"
    code = main(["wsp", f"out_dir={run}", "depth=2", "steps=20", "warmup_steps=5", "lr=1e-3",
                 "progress=false", "tensorboard=false", "ckpt_every=1000"])
    assert code == 0
    results = json.loads((run / "results.json").read_text())
    assert results["val_images"] == 800 and results["val_images_without_known_tag"] == 0
    for metric in ("precision_at_1", "precision_at_5", "mAP"):
        assert 0 < results[f"val_{metric}"] <= 1 and 0 < results[f"val_baseline_{metric}"] <= 1
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("val_precision_at_1" in record for record in logged)
    assert [r["step"] for r in logged if "loss" in r][-1] == 20

    # encoder: plain timm keys and metadata; head + vocabulary complete it into a tagger
    vocab = HashtagVocab.load(run / "vocab.json")
    assert len(vocab) == results["vocab_size"] and "round" in vocab.aliases  # synthetic synonym groups
    encoder = load_file(str(run / "encoder.safetensors"))
    reference = create_vit("vit_micro4", img_size=32, depth=2)
    reference.load_state_dict(encoder, strict=True)
    head = load_file(str(run / "head.safetensors"))
    assert head["head.weight"].shape == (len(vocab), 128)
    model, loaded_vocab = load_tagger(run)
    assert loaded_vocab == vocab
    torch.testing.assert_close(model.state_dict()["blocks.1.mlp.fc2.weight"], encoder["blocks.1.mlp.fc2.weight"])

    # a WSP run as init continues with its head when the vocabulary is the same
    stage = WSPStage(tiny_config(tmp_path, init=run, num_images=4000, out_dir=tmp_path / "next"))
    continued = stage.build_model(Run.of_stage(stage)).state_dict()
    assert torch.equal(continued["head.weight"], head["head.weight"])
    assert torch.equal(continued["pos_embed"], encoder["pos_embed"])

    # a vocabulary file that does not belong to the head fails clearly
    body = json.loads((run / "vocab.json").read_text())
    body["tags"], body["counts"] = body["tags"][:-1], body["counts"][:-1]
    (run / "vocab.json").write_text(json.dumps(body))
    with pytest.raises(VocabularyMismatch, match="does not belong to this head"):
        load_tagger(run)


@pytest.mark.parametrize("path", sorted(Path(__file__).resolve().parents[1].glob("configs/wsp_*.yaml")))
def test_paper_recipes_parse(path, tmp_path):
    make_mae_run(tmp_path / "mae")
    cfg = build_config(WSPConfig, path, {"init": str(tmp_path / "mae")})
    assert path.stem == f"wsp_{cfg.model}" and cfg.out_dir == f"runs/wsp_{cfg.model}"
    assert cfg.image_size == 224 and cfg.epochs == 1 and cfg.vocab_size == 28000
    assert cfg.loss == "softmax" and cfg.resample_power == 0.5 and cfg.batch_size == 8192
    assert cfg.precision == "bf16" and cfg.peak_lr > 0


def test_resume_reuses_the_saved_vocabulary_even_if_the_settings_change(tmp_path):
    run = tmp_path / "run"
    common = [f"out_dir={run}", "depth=1", "num_images=100", "batch_size=8", "eval_images=20", "progress=false",
              "tensorboard=false", "ckpt_every=2"]
    assert main(["wsp", *common, "steps=2"]) == 0
    first = HashtagVocab.load(run / "vocab.json")
    # a different min count would build another vocabulary (and head); resuming must keep the saved one
    assert main(["wsp", *common, "steps=4", "vocab_min_count=1"]) == 0
    assert HashtagVocab.load(run / "vocab.json") == first
    assert json.loads((run / "results.json").read_text())["vocab_size"] == len(first)


def test_init_mae_init_starts_wsp_from_the_untrained_mae_encoder(tmp_path):
    """The pipeline's control arm: WSP from the MAE's initialisation with no MAE steps; the head
    keeps WSP's own initialisation."""
    from prepretrain.models.resolve import mae_init_state

    stage = WSPStage(tiny_config(tmp_path, init="mae-init", seed=3))
    model = stage.build_model(Run.of_stage(stage)).state_dict()
    expected = mae_init_state("vit_micro4", 3, img_size=32, depth=2)
    assert all(torch.equal(model[key], value) for key, value in expected.items())
    scratch = WSPStage(tiny_config(tmp_path, init="", seed=3, out_dir=tmp_path / "scratch"))
    fresh = scratch.build_model(Run.of_stage(scratch)).state_dict()
    assert all(torch.equal(model[key], fresh[key]) for key in ("head.weight", "head.bias"))
    assert not torch.equal(model["blocks.0.attn.qkv.weight"], fresh["blocks.0.attn.qkv.weight"])

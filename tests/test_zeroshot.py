"""Zero-shot classification: class-name and template files, the classifier, top-k, the command."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from prepretrain.config import ConfigError, build_config
from prepretrain.evaluate.metrics import topk_hits
from prepretrain.evaluate.zeroshot import (
    ZeroShotConfig,
    article_fix_for,
    build_classifier,
    check_article_fix,
    default_templates,
    fill_template,
    read_class_names,
    read_templates,
    run_zeroshot,
    source_classes,
)
from prepretrain.models.clip import build_clip, save_clip
from prepretrain.models.tokenizers import ByteTokenizer


def test_class_names_from_text_and_json(tmp_path):
    text = tmp_path / "classes.txt"
    text.write_text("# pets\ntabby cat, house cat\n\n golden retriever \nring, donut,hoop\n")
    assert read_class_names(text) == [["tabby cat", "house cat"], ["golden retriever"], ["ring", "donut", "hoop"]]

    flat = tmp_path / "flat.json"
    flat.write_text(json.dumps(["cat", "dog"]))
    assert read_class_names(flat) == [["cat"], ["dog"]]
    nested = tmp_path / "nested.json"
    nested.write_text(json.dumps([["cat", "kitty"], ["dog"]]))
    assert read_class_names(nested) == [["cat", "kitty"], ["dog"]]
    mapping = tmp_path / "mapping.json"
    mapping.write_text(json.dumps({"cat": ["kitty", "cat"], "dog": []}))
    assert read_class_names(mapping) == [["cat", "kitty"], ["dog"]]
    synth = tmp_path / "synth.json"  # the classes.json that `prepretrain data synth` writes
    synth.write_text(json.dumps({"class_names": {"coarse": ["circle"]}, "synonyms": {"coarse": [["circle", "disc"]]}}))
    assert read_class_names(synth, task="coarse") == [["circle", "disc"]]
    with pytest.raises(ValueError, match="task="):
        read_class_names(synth)


def test_templates_file_and_the_shipped_set(tmp_path):
    path = tmp_path / "templates.txt"
    path.write_text("# mine\na photo of a {}.\n\n{} in the wild\n")
    assert read_templates(path) == ["a photo of a {}.", "{} in the wild"]
    path.write_text("a photo of a thing\n")
    with pytest.raises(ValueError, match="exactly one"):
        read_templates(path)
    shipped = default_templates()
    assert 20 <= len(shipped) <= 80 and len(set(shipped)) == len(shipped)
    assert all(t.count("{}") == 1 for t in shipped)


def test_templates_use_an_before_vowels_when_asked():
    assert fill_template("a photo of a {}.", "oval", article_fix=True) == "a photo of an oval."
    assert fill_template("a photo of a {}.", "ring", article_fix=True) == "a photo of a ring."
    assert fill_template("A {} on a table", "egg", article_fix=True) == "An egg on a table"
    assert fill_template("the {}", "apple", article_fix=True) == "the apple"


def test_templates_are_filled_verbatim_by_default():
    assert fill_template("a photo of a {}.", "apple") == "a photo of a apple."
    assert fill_template("A {} on a table", "egg") == "A egg on a table"


def test_shipped_sets_by_name_openai80_and_imagenet1k(tmp_path):
    openai = read_templates("openai80")
    assert len(openai) == 80 == len(set(openai)) and openai[0] == "a bad photo of a {}."
    assert "a origami {}." in openai  # published verbatim, and used so
    assert article_fix_for("auto", "openai80") is False and article_fix_for("auto", "prepretrain") is True
    assert read_templates("prepretrain") == default_templates()
    names = read_class_names("imagenet1k")
    assert len(names) == 1000 and names[0] == ["tench"] and names[1] == ["goldfish"] and names[-1] == ["toilet paper"]
    cfg = build_config(ZeroShotConfig, None, {"model": str(_saved_model(tmp_path)), "classes": "imagenet1k",
                                              "templates": "openai80"})
    assert (cfg.classes, cfg.templates) == ("imagenet1k", "openai80")
    with pytest.raises(ConfigError, match="templates.*openai80"):
        build_config(ZeroShotConfig, None, {"model": str(_saved_model(tmp_path)), "templates": "openai81"})


def _saved_model(tmp_path):
    path = tmp_path / "clip.safetensors"
    if not path.exists():
        save_clip(_tiny_model(), path, ByteTokenizer(40).describe(), 32, "vit_micro4")
    return path


def test_wordnet_id_folders_get_words():
    """ImageNet folders are named by WordNet id: 1k ids get the shipped names first, then WordNet's
    lemmas as synonyms; 21k ids get the lemmas; an unknown id is named in the error."""

    class Folder:
        class_names = {"label": ["n01440764", "n15075141", "n00004475"]}

    classes = source_classes(Folder(), "label")
    assert classes[0][:2] == ["tench", "Tinca tinca"]
    assert classes[1][0] == "toilet paper" and "toilet tissue" in classes[1]
    assert classes[2][0] == "organism"  # an ImageNet-21k id
    Folder.class_names = {"label": ["n01440764", "n99999999"]}
    with pytest.raises(ValueError, match="n99999999"):
        source_classes(Folder(), "label")
    Folder.class_names = {"label": ["cat", "n01440764"]}  # not all ids: names as they are
    assert source_classes(Folder(), "label") == [["cat"], ["n01440764"]]


def test_article_fix_setting_auto_means_the_shipped_set_only():
    assert article_fix_for("auto", "") is True  # the shipped set is written with the fix in mind
    assert article_fix_for("auto", "my_templates.txt") is False
    assert article_fix_for("true", "my_templates.txt") is True
    assert article_fix_for("false", "") is False
    assert ZeroShotConfig().article_fix == "auto"
    check_article_fix("article_fix", "True")  # a YAML boolean read as a string
    with pytest.raises(ConfigError, match="article_fix"):
        check_article_fix("article_fix", "sometimes")


def test_user_templates_file_is_filled_exactly_unless_article_fix(tmp_path, monkeypatch):
    import prepretrain.evaluate.zeroshot as zeroshot

    templates = tmp_path / "templates.txt"
    templates.write_text("# mine\na photo of a {}.\n")
    seen: list[str] = []

    class Recorder:
        def __call__(self, prompts):
            seen.extend(prompts)
            return torch.zeros(len(prompts), 4, dtype=torch.long)

    class Model:
        def encode_texts(self, tokens, normalize=True):
            return torch.ones(len(tokens), 3)

    for setting, expected in (("auto", "a photo of a apple."), ("false", "a photo of a apple."),
                              ("true", "a photo of an apple.")):
        seen.clear()
        fix = zeroshot.article_fix_for(setting, str(templates))
        zeroshot.build_classifier(Model(), Recorder(), [["apple"]], zeroshot.read_templates(templates),
                                  article_fix=fix)
        assert seen == [expected]


def _tiny_model():
    torch.manual_seed(0)
    return build_clip("vit_micro4", "text_micro", vision_depth=1, embed_dim=16,
                      text_overrides={"depth": 1, "width": 32, "num_heads": 2}).eval()


def test_classifier_is_the_renormalised_mean_of_normalised_prompt_embeddings():
    model, tokenizer = _tiny_model(), ByteTokenizer(40)
    classes = [["ring", "donut"], ["oval"]]
    templates = ["a photo of a {}.", "{} drawn on paper", "a {}"]
    got = build_classifier(model, tokenizer, classes, templates, batch_size=2)
    assert got.shape == (2, 16)
    for row, synonyms in enumerate(classes):
        embeddings = []
        for name in synonyms:
            for template in templates:
                with torch.no_grad():
                    feature = model.text_encoder(tokenizer(fill_template(template, name))) @ model.text_projection
                embeddings.append(feature[0] / feature[0].norm())
        mean = torch.stack(embeddings).mean(0)
        torch.testing.assert_close(got[row], mean / mean.norm(), rtol=1e-5, atol=1e-6)


def test_topk_counts_and_cap():
    logits = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.1, 0.3], [0.2, 0.3, 0.5]])
    labels = torch.tensor([1, 2, 0])
    # top-1: row 0 only; top-2: rows 0, 1; top-5 is capped at 3 classes: all rows.
    assert topk_hits(logits, labels, (1, 2, 5)) == {1: 1, 2: 2, 5: 3}


def test_zeroshot_command_on_a_saved_model_matches_a_plain_computation(tmp_path):
    from prepretrain.data.images.transforms import eval_transform
    from prepretrain.data.synthetic.images import SyntheticSource

    model, tokenizer = _tiny_model(), ByteTokenizer(40)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save_clip(model, run_dir / "clip.safetensors", tokenizer.describe(), 32, "vit_micro4")
    classes = tmp_path / "shapes.txt"
    classes.write_text("\n".join(SyntheticSource(1).class_names["coarse"]) + "\n")
    templates = tmp_path / "t.txt"
    templates.write_text("a {}\na photo of a {}\n")
    overrides = {"model": str(run_dir), "classes": str(classes), "templates": str(templates), "max_images": "60",
                 "batch_size": "25", "num_images": "200"}
    results = run_zeroshot(build_config(ZeroShotConfig, None, overrides))
    saved = json.loads((run_dir / "zeroshot" / "results.json").read_text())
    assert saved["evaluation"] == "zeroshot" and saved["num_classes"] == 10 and saved["num_templates"] == 2
    assert saved["num_images"] == 75  # whole batches until max_images is reached

    source = SyntheticSource(200, image_size=32, split="val")
    transform = eval_transform(32, crop_fraction=1.0)
    images = torch.stack([transform(source.get(i).image) for i in range(75)])
    labels = torch.tensor([source.get(i).labels["coarse"] for i in range(75)])
    with torch.no_grad():
        names = source.class_names["coarse"]
        weights = []
        for name in names:
            prompts = [fill_template(t, name) for t in ("a {}", "a photo of a {}")]
            weights.append(F.normalize(model.encode_texts(tokenizer(prompts)).mean(0), dim=-1))
        scores = model.encode_images(images) @ torch.stack(weights).t()
    expected_top1 = 100.0 * float((scores.argmax(1) == labels).float().mean())
    expected_top5 = 100.0 * float((scores.topk(5, dim=1).indices == labels[:, None]).any(1).float().mean())
    assert results["top1"] == pytest.approx(expected_top1, abs=1e-4)
    assert results["top5"] == pytest.approx(expected_top5, abs=1e-4)


def test_zeroshot_config_errors_name_the_key(tmp_path):
    with pytest.raises(ConfigError) as error:
        build_config(ZeroShotConfig, None, {})
    assert error.value.key == "model"
    with pytest.raises(ConfigError) as error:
        build_config(ZeroShotConfig, None, {"model": str(tmp_path), "classes": str(tmp_path / "none.txt")})
    assert error.value.key == "classes"


def test_zeroshot_cli_prints_and_writes(tmp_path, capsys):
    from prepretrain.cli import main

    model = _tiny_model()
    path = tmp_path / "clip.safetensors"
    save_clip(model, path, ByteTokenizer(40).describe(), 32, "vit_micro4")
    templates = tmp_path / "t.txt"
    templates.write_text("a {}\n")
    code = main(["zeroshot", f"model={path}", "max_images=20", "batch_size=20", "num_images=200",
                 f"out_dir={tmp_path / 'zs'}", "task=fine", f"templates={templates}"])
    assert code == 0
    assert "top-1" in capsys.readouterr().out
    saved = json.loads((tmp_path / "zs" / "results.json").read_text())
    assert saved["task"] == "fine" and saved["num_classes"] == 50 and saved["num_templates"] == 1
    assert (tmp_path / "zs" / "config.yaml").is_file()

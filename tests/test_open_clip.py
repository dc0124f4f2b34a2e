"""open_clip folders (``prepretrain convert --to open_clip``) and CLIP_benchmark's result file.

Equivalence is checked against open_clip itself: the exported folder is loaded with
``open_clip.create_model_and_transforms("local-dir:...")`` and ``open_clip.get_tokenizer``, fed with
open_clip's own preprocessing and token ids, and compared with prepretrain's model on the same
images and texts. Tolerance: 1e-5 absolute on unit-norm embeddings and cosine logits (the two
compute the same function with other kernels: timm vs the same timm, SDPA vs Hugging Face's
attention; measured below 1e-6). Token ids and preprocessed pixels must be equal, and the round
trip prepretrain -> open_clip -> prepretrain bit-exact.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from prepretrain.config import ConfigError, build_config
from prepretrain.data.images.transforms import eval_transform
from prepretrain.data.synthetic.images import SyntheticSource
from prepretrain.evaluate.zeroshot import CLIP_BENCHMARK_FILE, ZeroShotConfig, build_classifier, run_zeroshot
from prepretrain.models.checkpoints import CheckpointMismatch
from prepretrain.models.clip import build_clip, load_clip, save_clip, text_tower_state
from prepretrain.models.convert import convert, registered_timm_name
from prepretrain.models.openclip import OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS, from_open_clip_state
from prepretrain.models.tokenizers import ByteTokenizer
from prepretrain.models.vit import create_vit

open_clip = pytest.importorskip("open_clip")  # the dev extra installs it; CI runs every test

TOLERANCE = 1e-5
TEXTS = ["a photo of a ring.", "a red circle on a blue square", "Ω unknown ünïcode 日本", "x" * 150]


def _perturbed(model):
    """Non-trivial weights everywhere (LayerNorm gains and biases too), so every tensor matters."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def _tiny_clip(vocab_size: int = 260):
    torch.manual_seed(0)
    model = build_clip("vit_micro4", "text_micro", vision_depth=2, embed_dim=16,
                       text_overrides={"depth": 2, "width": 32, "num_heads": 2, "vocab_size": vocab_size})
    return _perturbed(model)


@pytest.fixture(scope="module")
def lit_run(tmp_path_factory) -> Path:
    """A LiT run directory as the stage's ``finish`` leaves it (``clip.safetensors``, byte tokenizer)."""
    run = tmp_path_factory.mktemp("lit_run")
    save_clip(_tiny_clip(), run / "clip.safetensors", ByteTokenizer(60).describe(), 32, "vit_micro4")
    return run


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory) -> str:
    """A small SentencePiece BPE model standing in for XLM-R's (same fairseq id convention)."""
    import sentencepiece

    source = SyntheticSource(300, image_size=16, split="train")
    prefix = tmp_path_factory.mktemp("spm") / "tiny_spm"
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(source.get(i).caption for i in range(len(source))), model_prefix=str(prefix),
        vocab_size=120, model_type="bpe", character_coverage=1.0, minloglevel=2)
    return str(prefix) + ".model"


@pytest.fixture(scope="module")
def maws_file(tmp_path_factory, spm_model) -> Path:
    """A tiny model in the official MAWS-CLIP layout: a plain pickled state dict with the older
    torchtext block names, no metadata (the tokenizer comes separately, as in the release)."""
    import sentencepiece

    from prepretrain.models.layouts import TORCHTEXT_OLD_TO_NEW

    pieces = sentencepiece.SentencePieceProcessor(model_file=spm_model).get_piece_size()
    state = _tiny_clip(vocab_size=pieces + 2).state_dict()
    old = {}
    for key, value in state.items():
        for new_leaf, old_leaf in ((n, o) for o, n in TORCHTEXT_OLD_TO_NEW.items()):
            marker = ".layers.layers."
            if marker in key and key.endswith(new_leaf):
                stem, rest = key.split(marker)
                key = f"{stem}.layers.{rest.split('.')[0]}.{old_leaf}"
                break
        old[key] = value
    path = tmp_path_factory.mktemp("maws") / "vit_micro4_tiny_xlmr_maws_clip.pt"
    torch.save(old, path)
    return path


def _images(count: int = 5):
    from PIL import Image

    generator = torch.Generator().manual_seed(2)
    sizes = [(40, 52), (32, 32), (71, 45), (33, 90), (64, 64)]
    return [Image.fromarray((torch.rand(*sizes[i % 5], 3, generator=generator) * 255).byte().numpy())
            for i in range(count)]


def _compare_in_open_clip(source: Path, folder: Path, tokenizer: str = "", name: str = "",
                          images: int = 5) -> dict[str, float]:
    """Max abs differences between prepretrain's model and open_clip's model of ``folder`` (loaded
    as ``name``, by default ``local-dir:FOLDER``)."""
    ours, our_tokenizer, info = load_clip(source, tokenizer=tokenizer)
    theirs, _, preprocess = open_clip.create_model_and_transforms(name or f"local-dir:{folder}")
    their_tokenizer = open_clip.get_tokenizer(name or f"local-dir:{folder}")
    theirs.eval()
    images = _images(images)
    ours_pixels = torch.stack([eval_transform(info["image_size"], crop_fraction=1.0)(i) for i in images])
    their_pixels = torch.stack([preprocess(i) for i in images])
    assert torch.equal(ours_pixels, their_pixels)  # open_clip's preprocessing = `prepretrain zeroshot`'s
    assert torch.equal(our_tokenizer(TEXTS), their_tokenizer(TEXTS))  # same ids (cleaning changes none here)
    with torch.no_grad():
        ours_images, their_images = ours.encode_images(ours_pixels), theirs.encode_image(their_pixels, normalize=True)
        ours_texts = ours.encode_texts(our_tokenizer(TEXTS))
        their_texts = theirs.encode_text(their_tokenizer(TEXTS), normalize=True)
        classes = [["ring", "donut"], ["circle"], ["square"]]
        templates = ["a photo of a {}.", "a {}"]
        ours_classifier = build_classifier(ours, our_tokenizer, classes, templates)
        their_classifier = torch.stack([
            torch.nn.functional.normalize(
                theirs.encode_text(their_tokenizer([t.format(n) for n in names for t in templates]),
                                   normalize=True).mean(0), dim=-1)
            for names in classes])
        assert torch.equal(theirs.logit_scale.exp(), ours.temperature())
    return {
        "image": float((ours_images - their_images).abs().max()),
        "text": float((ours_texts - their_texts).abs().max()),
        "logits": float((ours_images @ ours_classifier.t() - their_images @ their_classifier.t()).abs().max()),
    }


def test_an_exported_lit_run_gives_the_same_embeddings_and_logits_in_open_clip(lit_run, tmp_path):
    folder = convert(lit_run, tmp_path / "lit_open_clip", to="open_clip")
    assert {p.name for p in folder.iterdir()} >= {OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS, "tokenizer.json",
                                                   "tokenizer_config.json", "hf_text", "timm_tower"}
    config = json.loads((folder / OPEN_CLIP_CONFIG).read_text())
    assert config["model_cfg"]["vision_cfg"]["timm_model_name"] == f"local-dir:{folder / 'timm_tower'}"
    assert config["preprocess_cfg"]["size"] == 32
    diffs = _compare_in_open_clip(lit_run, folder)
    assert max(diffs.values()) < TOLERANCE, diffs


def test_an_exported_maws_clip_layout_model_gives_the_same_results_in_open_clip(maws_file, spm_model, tmp_path):
    folder = convert(maws_file, tmp_path / "maws_open_clip", to="open_clip", tokenizer=spm_model)
    assert (folder / "sentencepiece.bpe.model").read_bytes() == Path(spm_model).read_bytes()
    assert json.loads((folder / "tokenizer_config.json").read_text())["tokenizer_class"] == "XLMRobertaTokenizer"
    diffs = _compare_in_open_clip(maws_file, folder, tokenizer=spm_model)
    assert max(diffs.values()) < TOLERANCE, diffs


def test_a_hub_folder_loads_with_hf_hub_from_a_hub_cache(tmp_path, monkeypatch):
    """``--hub-repo ORG/NAME``: nothing in the folder names a local path, so once uploaded open_clip loads
    it with ``hf-hub:ORG/NAME``. Checked offline: the folder is laid out as the hub client's cache of
    that repository and the client is set offline (so nothing can be downloaded)."""
    import shutil

    import huggingface_hub.constants

    torch.manual_seed(0)
    model = build_clip("vit_ti16", "text_micro", embed_dim=16, text_overrides={"depth": 1, "width": 32, "num_heads": 2})
    _perturbed(model.text_encoder)  # the ViT-Ti image tower keeps timm's init: the local-dir tests cover the numbers
    model.eval()
    (tmp_path / "run").mkdir()
    save_clip(model, tmp_path / "run" / "clip.safetensors", ByteTokenizer(40).describe(), 224, "vit_ti16")
    folder = convert(tmp_path / "run", tmp_path / "hub_folder", to="open_clip", hub_repo="someone/tiny-lit")
    config = json.loads((folder / OPEN_CLIP_CONFIG).read_text())["model_cfg"]
    assert config["vision_cfg"]["timm_model_name"] == "vit_tiny_patch16_224"
    assert config["text_cfg"]["hf_model_name"] == "someone/tiny-lit" and (folder / "config.json").is_file()
    repo = tmp_path / "cache" / "models--someone--tiny-lit"
    shutil.copytree(folder, repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    diffs = _compare_in_open_clip(tmp_path / "run", folder, name="hf-hub:someone/tiny-lit", images=2)
    assert max(diffs.values()) < TOLERANCE, diffs
    with pytest.raises(CheckpointMismatch, match="no registered timm name"):
        convert(_micro_run(tmp_path), tmp_path / "x", to="open_clip", hub_repo="someone/x")


def _micro_run(tmp_path: Path) -> Path:
    run = tmp_path / "micro_run"
    run.mkdir(exist_ok=True)
    save_clip(_tiny_clip(), run / "clip.safetensors", ByteTokenizer(60).describe(), 32, "vit_micro4")
    return run


def test_the_round_trip_through_open_clip_is_bit_exact(lit_run, maws_file, spm_model, tmp_path):
    for source, tokenizer in ((lit_run, ""), (maws_file, spm_model)):
        name = Path(source).stem
        folder = convert(source, tmp_path / f"{name}_oc", to="open_clip", tokenizer=tokenizer)
        back = convert(folder, tmp_path / f"{name}_back.safetensors", to="prepretrain")
        before, before_tokenizer, before_info = load_clip(source, tokenizer=tokenizer)
        for model in (load_clip(folder), load_clip(back)):
            after, after_tokenizer, after_info = model
            a, b = before.state_dict(), after.state_dict()
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
            assert torch.equal(before_tokenizer(TEXTS), after_tokenizer(TEXTS))
            assert after_tokenizer.describe()["kind"] == before_tokenizer.describe()["kind"]
            assert (after_info["image_size"], after_info["vision_model"]) == (32, "vit_micro4")


def test_zeroshot_on_the_folder_equals_zeroshot_on_the_run_and_writes_clip_benchmarks_file(lit_run, tmp_path):
    folder = convert(lit_run, tmp_path / "lit_open_clip", to="open_clip")
    (tmp_path / "templates.txt").write_text("a {}\na photo of a {}.\n")
    common = {"max_images": "30", "batch_size": "30", "num_images": "200", "templates": str(tmp_path / "templates.txt")}
    on_run = run_zeroshot(build_config(ZeroShotConfig, None, {**common, "model": str(lit_run),
                                                               "out_dir": str(tmp_path / "zs_run")}))
    on_folder = run_zeroshot(build_config(ZeroShotConfig, None, {**common, "model": str(folder),
                                                                  "out_dir": str(tmp_path / "zs_folder")}))
    for key in ("top1", "top5", "mean_per_class_top1", "num_images", "num_classes"):
        assert on_run[key] == on_folder[key], key
    for out, results, model in ((tmp_path / "zs_run", on_run, lit_run), (tmp_path / "zs_folder", on_folder, folder)):
        bench = json.loads((out / CLIP_BENCHMARK_FILE).read_text())
        assert set(bench) == {"dataset", "model", "pretrained", "task", "metrics", "language"}
        assert bench["task"] == "zeroshot_classification" and bench["model"] == str(model)
        assert bench["dataset"] == "synthetic" and Path(bench["pretrained"]).is_file()
        assert bench["metrics"]["acc1"] * 100 == pytest.approx(results["top1"], abs=1e-9)
        assert bench["metrics"]["acc5"] * 100 == pytest.approx(results["top5"], abs=1e-9)
        assert bench["metrics"]["mean_per_class_recall"] * 100 == pytest.approx(results["mean_per_class_top1"])
        assert (out / "results.json").is_file()


def test_clip_benchmark_metrics_follow_theirs_for_few_classes():
    from prepretrain.evaluate.zeroshot import clip_benchmark_result

    results = {"data": "d", "model": "w.safetensors", "top1": 50.0, "top5": 100.0, "mean_per_class_top1": 40.0,
               "num_classes": 3}
    bench = clip_benchmark_result(results, "runs/lit", 0.5)
    assert math.isnan(bench["metrics"]["acc5"])  # CLIP_benchmark reports NaN top-5 below 5 classes
    assert bench["metrics"]["acc1"] == 0.5 and bench["metrics"]["mean_per_class_recall"] == pytest.approx(0.4)


def test_lit_text_init_reads_an_open_clip_folder(lit_run, tmp_path):
    folder = convert(lit_run, tmp_path / "oc", to="open_clip")
    cfg = build_config(__import__("prepretrain.stages.lit", fromlist=["LiTConfig"]).LiTConfig, None,
                       {"text_init": str(folder)})
    assert cfg.text_init == str(folder)
    state = text_tower_state(folder)
    reference = load_clip(lit_run)[0].text_encoder.state_dict()
    assert state.keys() == reference.keys() and all(torch.equal(state[k], reference[k]) for k in state)
    with pytest.raises(ConfigError) as error:
        build_config(cfg.__class__, None, {"text_init": str(tmp_path / "missing")})
    assert error.value.key == "text_init"


def test_an_open_clip_training_checkpoint_reads_with_its_config_named_or_beside_it(lit_run, tmp_path):
    """open_clip's training checkpoints (``{"epoch", "name", "state_dict"}`` with ``module.`` names) have no
    config of their own: ``open_clip_config=`` (zeroshot) / ``text_init_config=`` (lit) name it."""
    from safetensors.torch import load_file

    from prepretrain.stages.lit import LiTConfig

    folder = convert(lit_run, tmp_path / "oc", to="open_clip")
    weights = {f"module.{k}": v for k, v in load_file(str(folder / OPEN_CLIP_WEIGHTS)).items()}
    (tmp_path / "logs").mkdir()
    checkpoint = tmp_path / "logs" / "epoch_3.pt"
    torch.save({"epoch": 3, "name": "lit", "state_dict": weights}, checkpoint)
    with pytest.raises(FileNotFoundError, match="open_clip_config=FILE"):
        load_clip(checkpoint)
    named = load_clip(checkpoint, open_clip_config=folder / OPEN_CLIP_CONFIG)[0].state_dict()
    reference = load_clip(lit_run)[0].state_dict()
    assert all(torch.equal(named[k], reference[k]) for k in reference)
    text = text_tower_state(checkpoint, folder / OPEN_CLIP_CONFIG)
    assert all(torch.equal(v, reference[f"text_encoder.{k}"]) for k, v in text.items())
    with pytest.raises(ConfigError) as error:
        build_config(LiTConfig, None, {"text_init": str(checkpoint), "text_init_config": str(tmp_path / "no.json")})
    assert error.value.key == "text_init_config"
    with pytest.raises(ConfigError) as error:
        build_config(ZeroShotConfig, None, {"model": str(checkpoint), "open_clip_config": str(tmp_path / "no.json")})
    assert error.value.key == "open_clip_config"
    (tmp_path / "logs" / OPEN_CLIP_CONFIG).write_text((folder / OPEN_CLIP_CONFIG).read_text())
    beside = load_clip(checkpoint)[0].state_dict()
    assert all(torch.equal(beside[k], reference[k]) for k in reference)
    back = load_clip(convert(checkpoint, tmp_path / "back.safetensors", to="prepretrain"))[0].state_dict()
    assert all(torch.equal(back[k], reference[k]) for k in reference)


def test_registered_timm_names_only_for_their_exact_shape():
    vit_b16 = {k: v for k, v in create_vit("vit_b16", device="meta").state_dict().items()}
    assert registered_timm_name(vit_b16, "vit_b16", 224) == "vit_base_patch16_224"
    assert registered_timm_name(vit_b16, "vit_b16", 384) == ""  # another resolution: a config file instead
    shallow = {k: v for k, v in create_vit("vit_b16", depth=2, device="meta").state_dict().items()}
    assert registered_timm_name(shallow, "vit_b16", 224) == ""
    micro = create_vit("vit_micro4", device="meta").state_dict()
    assert registered_timm_name(micro, "vit_micro4", 32) == ""

    import timm

    from prepretrain.models.openclip import openai_timm_tower

    for patch, width, depth, size in ((32, 768, 12, 224), (16, 768, 12, 224), (14, 1024, 24, 336)):
        shapes = {"patch": patch, "width": width, "depth": depth, "image_size": size, "mlp": 4 * width}
        for quick_gelu in (True, False):
            name, config = openai_timm_tower(shapes, quick_gelu)
            assert config is None and ("quickgelu" in name) == quick_gelu
            with torch.device("meta"):
                tower = timm.create_model(name, num_classes=0)
            assert (tower.patch_embed.proj.weight.shape, len(tower.blocks)) == ((width, 3, patch, patch), depth)
            assert tower.patch_embed.img_size == (size, size) and tower.patch_embed.proj.bias is None


def test_what_prepretrain_cannot_read_is_one_clear_error(lit_run, maws_file, tmp_path, capsys):
    from prepretrain.cli import main

    assert main(["convert", str(maws_file), str(tmp_path / "no_tokenizer"), "--to", "open_clip"]) == 2
    assert "config key 'tokenizer'" in capsys.readouterr().err  # an official file carries no tokenizer

    folder = convert(lit_run, tmp_path / "oc", to="open_clip")
    config = json.loads((folder / OPEN_CLIP_CONFIG).read_text())

    not_open_clip = tmp_path / "empty"
    not_open_clip.mkdir()
    (not_open_clip / "open_clip_model.safetensors").write_bytes((folder / OPEN_CLIP_WEIGHTS).read_bytes())
    with pytest.raises(FileNotFoundError, match="open_clip_config.json beside it"):
        load_clip(not_open_clip / "open_clip_model.safetensors")

    own_text = json.loads(json.dumps(config))
    own_text.pop("prepretrain")
    own_text["model_cfg"]["text_cfg"] = {"context_length": 77, "vocab_size": 49408, "width": 512}
    (folder / OPEN_CLIP_CONFIG).write_text(json.dumps(own_text))
    with pytest.raises(CheckpointMismatch, match="hf_model_name"):
        load_clip(folder)

    unknown_tower = json.loads(json.dumps(own_text))
    unknown_tower["model_cfg"]["text_cfg"] = {**config["model_cfg"]["text_cfg"], "hf_model_name": "bert-base-uncased"}
    (folder / OPEN_CLIP_CONFIG).write_text(json.dumps(unknown_tower))
    with pytest.raises(FileNotFoundError, match="hf_model_name 'bert-base-uncased'"):
        load_clip(folder)

    (folder / OPEN_CLIP_CONFIG).write_text("{not json")
    code = main(["zeroshot", f"model={folder}", "max_images=4", f"out_dir={tmp_path / 'zs'}"])
    assert code == 4

    with pytest.raises(CheckpointMismatch, match="not an open_clip model with a timm image tower"):
        from_open_clip_state({"visual.conv1.weight": torch.zeros(1), "token_embedding.weight": torch.zeros(1)})
    assert main(["convert", str(lit_run), str(tmp_path / "x.safetensors"), "--to", "open_clip"]) == 4


def test_clip_benchmarks_own_zero_shot_code_on_the_folder_scores_what_our_file_says(lit_run, tmp_path):
    """CLIP_benchmark's loader (``load_open_clip``), classifier (``zero_shot_classifier``) and logits
    (``run_classification``) on the exported folder and a local image folder give the acc1, acc5 and
    mean per-class recall that ``prepretrain zeroshot`` wrote in CLIP_benchmark's format. (Their own
    ``accuracy()`` is not called: with numpy >= 2.4 it raises, LAION-AI/CLIP_benchmark#147.)"""
    from clip_benchmark.metrics.zeroshot_classification import run_classification, zero_shot_classifier
    from clip_benchmark.models import load_clip as load_for_benchmark
    from sklearn.metrics import balanced_accuracy_score
    from torchvision.datasets import ImageFolder

    source = SyntheticSource(200, image_size=32, split="val")
    names = source.class_names["coarse"]
    for i in range(40):
        record = source.get(i)
        label = record.labels["coarse"]
        folder_of_class = tmp_path / "data" / "val" / f"{label:02d}_{names[label]}"
        folder_of_class.mkdir(parents=True, exist_ok=True)
        record.image.save(folder_of_class / f"{i:03d}.png")
    (tmp_path / "classes.txt").write_text("\n".join(names) + "\n")
    (tmp_path / "templates.txt").write_text("a {}\na photo of a {}.\n")
    folder = convert(lit_run, tmp_path / "oc", to="open_clip")
    run_zeroshot(build_config(ZeroShotConfig, None, {
        "model": str(folder), "data": str(tmp_path / "data" / "val"), "classes": str(tmp_path / "classes.txt"),
        "templates": str(tmp_path / "templates.txt"), "out_dir": str(tmp_path / "zs")}))
    ours = json.loads((tmp_path / "zs" / CLIP_BENCHMARK_FILE).read_text())["metrics"]

    model, transform, tokenizer = load_for_benchmark("open_clip", f"local-dir:{folder}", "", None, "cpu")
    model.eval()
    loader = torch.utils.data.DataLoader(ImageFolder(str(tmp_path / "data" / "val"), transform=transform),
                                         batch_size=16)
    classifier = zero_shot_classifier(model, tokenizer, names, ["a {c}", "a photo of a {c}."], "cpu", amp=False)
    logits, target = run_classification(model, classifier, loader, "cpu", amp=False)
    top5 = logits.topk(5, dim=1).indices
    assert ours["acc1"] == int((logits.argmax(1) == target).sum()) / len(target)  # their accuracy(): hits / n
    assert ours["acc5"] == int((top5 == target[:, None]).any(1).sum()) / len(target)
    assert ours["mean_per_class_recall"] == pytest.approx(balanced_accuracy_score(target, logits.argmax(1)))


def test_an_openai_layout_clip_file_becomes_a_timm_tower_folder_that_computes_the_same(tmp_path):
    """Reference: open_clip's own ``CLIP`` (native ViT and text transformer, OpenAI's state-dict names);
    the folder has a timm image tower and open_clip's text transformer and tokenizer."""
    from open_clip.model import CLIP

    torch.manual_seed(0)
    reference = CLIP(embed_dim=32, vision_cfg={"image_size": 32, "layers": 2, "width": 128, "patch_size": 8},
                     text_cfg={"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 2},
                     quick_gelu=True)
    _perturbed(reference)
    torch.save(reference.state_dict(), tmp_path / "openai_layout.pt")
    folder = convert(tmp_path / "openai_layout.pt", tmp_path / "oc", to="open_clip")
    config = json.loads((folder / OPEN_CLIP_CONFIG).read_text())
    assert config["model_cfg"]["quick_gelu"] and "hf_model_name" not in config["model_cfg"]["text_cfg"]
    exported, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
    assert type(exported.visual).__name__ == "TimmModel" and type(tokenizer).__name__ == "SimpleTokenizer"
    exported.eval()
    pixels = torch.stack([preprocess(image) for image in _images()])
    with torch.no_grad():
        image_diff = (exported.encode_image(pixels, normalize=True) - reference.encode_image(pixels, normalize=True))
        text_diff = (exported.encode_text(tokenizer(TEXTS), normalize=True)
                     - reference.encode_text(tokenizer(TEXTS), normalize=True))
    assert image_diff.abs().max() < TOLERANCE and text_diff.abs().max() < TOLERANCE
    with pytest.raises(CheckpointMismatch, match="own text transformer"):
        load_clip(folder)  # prepretrain's CLIP model has a RoBERTa text tower only
    with pytest.raises(CheckpointMismatch, match="--to open_clip"):
        convert(tmp_path / "openai_layout.pt", tmp_path / "x.safetensors", to="prepretrain")
    with pytest.raises(CheckpointMismatch, match="OpenAI-layout CLIP model"):
        load_clip(tmp_path / "openai_layout.pt")  # zeroshot model= on the file itself

"""Transfer evaluations on frozen encoders: probe, low-shot, kNN, their cache and their honesty."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from prepretrain.cli import main
from prepretrain.config import ConfigError, build_config
from prepretrain.data.synthetic.images import SyntheticSource
from prepretrain.evaluate import linear as linear_module
from prepretrain.evaluate.common import FrozenEncoder, open_eval_data
from prepretrain.evaluate.features import LabeledFeatures
from prepretrain.evaluate.knn import KNNConfig, knn_scores
from prepretrain.evaluate.linear import (
    LARS,
    ProbeConfig,
    evaluate_probe,
    fit_logistic_regression,
    holdout_split,
    train_mae_head,
)
from prepretrain.evaluate.lowshot import LowShotConfig, PromptedViT, evaluate_lowshot, lowshot_indices
from prepretrain.evaluate.runner import evaluate_encoder, run_evaluation
from prepretrain.models.resolve import build_encoder, resolve_encoder
from prepretrain.models.vit import create_vit
from prepretrain.stages.mae import MAEConfig, MAEStage
from prepretrain.train.engine import train

TINY = ["num_images=60", "progress=false", "batch_size=128"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def mae_run(tmp_path_factory) -> Path:
    """A real (very short) MAE run directory: encoder.safetensors with model/image_size metadata."""
    out = tmp_path_factory.mktemp("mae_run")
    cfg = build_config(MAEConfig, None, dict(out_dir=str(out), num_images=64, steps=2, batch_size=32,
                                             eval_images=8, progress=False, tensorboard=False))
    train(MAEStage(cfg))
    return out


@pytest.fixture(scope="module")
def timm_file(tmp_path_factory) -> Path:
    """A raw timm classifier state dict (depth 2, with a head) in a torch pickle, no metadata."""
    torch.manual_seed(3)
    model = create_vit("vit_micro4", depth=2, num_classes=7)
    path = tmp_path_factory.mktemp("timm") / "vit_micro4_depth2.pth"
    torch.save(model.state_dict(), path)
    return path


class CountingSource:
    """Wraps a source; counts reads and can be locked so that any read raises."""

    def __init__(self, source):
        self.source = source
        self.class_names = source.class_names
        self.reads = 0
        self.locked = False

    def __len__(self) -> int:
        return len(self.source)

    def get(self, index: int):
        if self.locked:
            raise AssertionError("the test split was read while it was locked")
        self.reads += 1
        return self.source.get(index)


# ------------------------------------------------------------------------- end to end


@pytest.mark.parametrize("kind", ["mae_run", "timm_file"])
def test_every_evaluation_writes_results_from_run_dir_and_raw_file(kind, request, tmp_path):
    encoder = request.getfixturevalue(kind)
    extra = ["model=vit_micro4"] if kind == "timm_file" else []
    commands = {
        "probe": ["l2_grid=0.01,1", "max_iter=50"],
        "knn": ["k=5"],
        "lowshot": ["shots=1,2", "num_splits=2", "max_iter=50"],
    }
    for name, options in commands.items():
        out = tmp_path / name
        code = main([name, f"encoder={encoder}", f"out_dir={out}", f"cache_dir={tmp_path / 'cache'}",
                     *TINY, *extra, *options])
        assert code == 0
        results = json.loads((out / "results.json").read_text())
        assert (out / "config.yaml").is_file()
        assert results["evaluation"] == name and results["num_classes"] == 10 and results["task"] == "coarse"
        assert results["depth"] == (6 if kind == "mae_run" else 2) and results["image_size"] == 32
        # The first evaluation computes the features, the other two read the shared cache.
        assert results["features_computed"] == (["train", "test"] if name == "probe" else [])
        accuracies = [v for k, v in results.items() if k in ("top1", "top5", "1shot_top1", "2shot_top1")]
        assert accuracies and all(0 <= value <= 100 for value in accuracies)
    lowshot = json.loads((tmp_path / "lowshot" / "results.json").read_text())
    assert lowshot["1shot_train_images"] == 10 and lowshot["2shot_train_images"] == 20
    assert len(lowshot["1shot_top1_splits"]) == 2


def test_evaluate_encoder_runs_several_evaluations_on_one_feature_pass(tmp_path, timm_file):
    results = evaluate_encoder(str(timm_file), tmp_path, evaluations=("knn", "probe"),
                               overrides={"num_images": 60, "progress": False, "cache": False},
                               per_evaluation={"probe": {"l2_grid": (0.1,), "max_iter": 20}})
    assert results["knn"]["features_computed"] == ["train", "test"] and results["probe"]["features_computed"] == []
    assert (tmp_path / "probe" / "results.json").is_file() and (tmp_path / "knn" / "config.yaml").is_file()
    assert results["probe"]["l2"] == 0.1


def test_unknown_key_and_bad_values_fail_naming_the_key():
    with pytest.raises(ConfigError, match="'l2_gird'"):
        build_config(ProbeConfig, None, ["l2_gird=1"])
    with pytest.raises(ConfigError, match="'method'"):
        build_config(LowShotConfig, None, ["method=full"])
    with pytest.raises(ConfigError, match="'encoder'"):
        build_config(ProbeConfig, None, ["encoder=/no/such/run"])
    assert main(["knn", "temperature=0"]) == 2


def _image_folder(root: Path, splits: dict[str, int], classes: tuple[str, ...] = ("ring", "square", "star")) -> Path:
    """``root/<split>/<class>/<i>.png`` from synthetic images (ImageFolder layout)."""
    source = SyntheticSource(200, 32, split="train")
    index = 0
    for split, per_class in splits.items():
        for name in classes:
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                source.get(index).image.save(root / split / name / f"{i}.png")
                index += 1
    return root


def test_image_folder_splits_are_used_and_checked(tmp_path, timm_file):
    root = _image_folder(tmp_path / "folder", {"train": 4, "val": 2})
    cfg = build_config(KNNConfig, None, dict(encoder=str(timm_file), data=str(root), k=3, cache=False,
                                             progress=False, out_dir=str(tmp_path / "knn")))
    results = run_evaluation(cfg)
    assert results["task"] == "label" and results["num_classes"] == 3 and results["test_split"] == "val"
    assert results["num_train"] == 12 and results["num_test"] == 6
    for name in ("ring", "square"):  # a test/ split takes over the reporting role...
        (root / "test" / name).mkdir(parents=True)
        (root / "val" / name / "0.png").rename(root / "test" / name / "0.png")
    # ...and while it lacks a class that train has, its labels still follow train's classes (by name).
    partial = open_eval_data(str(root))
    test = partial.source("test")
    for index in range(len(test)):
        record = test.get(index)
        assert partial.class_names[record.labels["label"]] == record.key.split("/")[0]
    (root / "test" / "circle").mkdir()  # a class train has no folder for: refused, naming it
    shutil.copy(root / "test" / "ring" / "0.png", root / "test" / "circle" / "0.png")
    with pytest.raises(ConfigError, match="circle"):
        open_eval_data(str(root))
    shutil.rmtree(root / "test" / "circle")
    (root / "test" / "star").mkdir()
    (root / "val" / "star" / "0.png").rename(root / "test" / "star" / "0.png")
    assert open_eval_data(str(root)).split_names == {"train": "train", "test": "test", "val": "val"}
    flat = _image_folder(tmp_path / "flat", {"cats": 2}, classes=("a",)).parent / "flat"
    with pytest.raises(ConfigError, match="'data'"):  # no split folders: refused, never evaluated on train
        open_eval_data(str(flat / "cats"))


# --------------------------------------------------------------------------------- cache


def test_features_are_cached_on_disk_and_keyed_by_the_weights(tmp_path, timm_file):
    spec = resolve_encoder(str(timm_file), "vit_micro4")
    data = open_eval_data("synthetic", "auto", spec.image_size, 40)
    counting = CountingSource(data.sources["train"])
    data.sources["train"] = counting
    first = FrozenEncoder(spec, cache_dir=tmp_path).features(data, "train")
    assert counting.reads == 40 and first.token.shape == (40, 128) and first.avg.shape == (40, 128)
    # Plain recomputation of the CLS feature of sample 5 agrees with the cache.
    model = build_encoder(spec).eval()
    image = data.sources["train"].source.get(5).image
    from prepretrain.data.images.transforms import eval_transform

    with torch.no_grad():
        tokens = model.forward_features(eval_transform(32)(image)[None])
    torch.testing.assert_close(first.token[5], tokens[0, 0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(first.avg[5], tokens[0, 1:].mean(0), atol=1e-5, rtol=1e-5)
    # A new encoder object on the same weights reads the file, not the images.
    again = FrozenEncoder(resolve_encoder(str(timm_file), "vit_micro4"), cache_dir=tmp_path).features(data, "train")
    assert counting.reads == 40 and torch.equal(again.token, first.token)
    assert torch.equal(again.labels["fine"], first.labels["fine"])
    # Other weights at the same path get another key.
    state = torch.load(timm_file, weights_only=True)
    state["norm.bias"] = state["norm.bias"] + 1
    other = tmp_path / "other.pth"
    torch.save(state, other)
    other_encoder = FrozenEncoder(resolve_encoder(str(other), "vit_micro4"), cache_dir=tmp_path)
    assert other_encoder.cache_key(data, "train") != FrozenEncoder(spec).cache_key(data, "train")


# ------------------------------------------------------------------------ linear probe


def _blobs(n: int, dim: int, classes: int, seed: int, spread: float = 1.0, sample_seed: int = 0):
    """Gaussian classes around centres fixed by ``seed``; ``sample_seed`` draws another sample."""
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(seed)) * 2
    labels = torch.arange(n) % classes
    noise = torch.randn(n, dim, generator=torch.Generator().manual_seed(1000 + sample_seed))
    return centres[labels] + spread * noise, labels


def test_logistic_regression_reaches_the_optimum_of_its_objective():
    x, y = _blobs(300, 6, 4, seed=0, spread=2.0)
    l2 = 0.05
    model = fit_logistic_regression(x, y, 4, l2, max_iter=500)
    # Independent check in NumPy (float64): the gradient of mean CE + l2/2 |W|^2 vanishes there.
    xs = ((x - x.mean(0)) / x.std(0, unbiased=False)).double().numpy()
    weight, bias = model.weight.double().numpy(), model.bias.double().numpy()
    logits = xs @ weight + bias
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    residual = probs - np.eye(4)[y.numpy()]
    assert np.abs(xs.T @ residual / len(xs) + l2 * weight).max() < 1e-4
    assert np.abs(residual.mean(0)).max() < 1e-4
    accuracy = (model.scores(x).argmax(1) == y).float().mean()
    assert accuracy > 0.8


def test_holdout_split_is_stratified_and_disjoint():
    labels = torch.tensor([0] * 10 + [1] * 5 + [2] * 1)
    fit, held = holdout_split(labels, 0.2, seed=0)
    assert set(fit.tolist()).isdisjoint(held.tolist()) and len(fit) + len(held) == 16
    assert labels[held].tolist().count(0) == 2 and labels[held].tolist().count(1) == 1
    assert 2 not in labels[held].tolist()  # a single example stays in the fitting part
    assert torch.equal(holdout_split(labels, 0.2, seed=0)[1], held)


def test_probe_regularisation_search_never_reads_the_test_split(tmp_path, timm_file, monkeypatch):
    cfg = build_config(ProbeConfig, None, dict(encoder=str(timm_file), num_images=60, cache=False,
                                               l2_grid=(1e-3, 1.0), max_iter=50, progress=False))
    encoder = FrozenEncoder(resolve_encoder(cfg.encoder, cfg.model), cache_dir=None)
    data = open_eval_data("synthetic", "auto", 32, 60)
    guarded = CountingSource(data.sources["test"])
    data.sources["test"] = guarded
    original = linear_module.select_l2
    searched = []

    def locked_search(train, *args, **kwargs):
        guarded.locked = True
        try:
            assert len(train) == 60  # the search sees the training split only
            searched.append(original(train, *args, **kwargs))
            return searched[-1]
        finally:
            guarded.locked = False

    monkeypatch.setattr(linear_module, "select_l2", locked_search)
    results = evaluate_probe(encoder, data, cfg)
    assert searched and guarded.reads == 200  # the test split was read, but only after the search
    assert results["l2"] == searched[0][0] and set(results["l2_search"]) == {"1", "0.001"}


def test_lars_step_matches_the_reference_formula():
    weight = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))  # |w| = 5
    bias = torch.nn.Parameter(torch.tensor([1.0]))
    optimizer = LARS([weight, bias], lr=0.5, weight_decay=0.1, momentum=0.9, trust_coefficient=0.01)
    weight.grad = torch.tensor([[1.0, 0.0]])
    bias.grad = torch.tensor([2.0])
    optimizer.step()
    update = np.array([1.0, 0.0]) + 0.1 * np.array([3.0, 4.0])
    update *= 0.01 * 5.0 / np.linalg.norm(update)
    np.testing.assert_allclose(weight.detach().numpy()[0], np.array([3.0, 4.0]) - 0.5 * update, rtol=1e-6)
    np.testing.assert_allclose(bias.item(), 1.0 - 0.5 * 2.0)  # vectors: no decay, no trust ratio


def test_mae_head_learns_separable_features():
    x, y = _blobs(400, 8, 4, seed=1, spread=0.5)
    train = LabeledFeatures(x * 30 + 7, y, torch.arange(400))  # badly scaled: the BatchNorm copes
    # LARS moves a weight by at most lr * trust * |w| per step: few steps need a large lr.
    head = train_mae_head(train, 4, epochs=20, batch_size=64, blr=16, warmup_epochs=2)
    test_x, test_y = _blobs(200, 8, 4, seed=1, spread=0.5, sample_seed=1)
    with torch.no_grad():
        accuracy = (head(test_x * 30 + 7).argmax(1) == test_y).float().mean()
    assert accuracy > 0.95


# ------------------------------------------------------------------------------- kNN


def test_knn_votes_match_a_plain_loop():
    generator = torch.Generator().manual_seed(0)
    train_x, test_x = torch.randn(50, 5, generator=generator), torch.randn(7, 5, generator=generator)
    train_y = torch.randint(0, 3, (50,), generator=generator)
    scores = knn_scores(train_x, train_y, test_x, 3, k=4, temperature=0.1, chunk_size=3)
    for row in range(7):
        query, keys = test_x[row].numpy(), train_x.numpy()
        sims = [float(np.dot(query, t) / np.linalg.norm(query) / np.linalg.norm(t)) for t in keys]
        order = np.argsort(sims)[::-1][:4]
        votes = np.zeros(3)
        for i in order:
            votes[train_y[i]] += np.exp(sims[i] / 0.1)
        np.testing.assert_allclose(scores[row].numpy(), votes, rtol=1e-4)


# --------------------------------------------------------------------------- low-shot


def test_lowshot_splits_are_deterministic_nested_capped_and_disjoint_from_test():
    labels = torch.tensor([0] * 12 + [1] * 12 + [2] * 2)
    one, five = lowshot_indices(labels, 1, seed=4), lowshot_indices(labels, 5, seed=4)
    assert torch.equal(five, lowshot_indices(labels, 5, seed=4))
    assert not torch.equal(five, lowshot_indices(labels, 5, seed=5))
    assert set(one.tolist()) <= set(five.tolist())
    assert [labels[five].tolist().count(c) for c in range(3)] == [5, 5, 2]  # at most K per class
    # On the real splits: chosen training images never appear in the test split (pixel hashes).
    train_source, test_source = SyntheticSource(200, 32, split="train"), SyntheticSource(200, 32, split="test")
    train_labels = torch.tensor([train_source.get(i).labels["coarse"] for i in range(200)])
    rows = lowshot_indices(train_labels, 10, seed=0)
    assert len(rows) == 100 and rows.max() < 200
    digest = lambda record: hashlib.sha256(record.image.tobytes()).hexdigest()  # noqa: E731
    test_hashes = {digest(test_source.get(i)) for i in range(200)}
    assert not {digest(train_source.get(int(i))) for i in rows} & test_hashes


def test_prompted_vit_inserts_prompts_after_the_cls_token():
    torch.manual_seed(0)
    encoder = create_vit("vit_micro4", depth=2).eval()
    images = torch.randn(3, 3, 32, 32)
    plain = PromptedViT(encoder, 5, num_prompts=0)
    with torch.no_grad():
        torch.testing.assert_close(plain.features(images), encoder.forward_features(images)[:, 0])
        prompted = PromptedViT(encoder, 5, num_prompts=3)
        tokens = encoder.patch_embed(images).flatten(1, 2) + encoder.pos_embed[:, 1:]
        cls = (encoder.cls_token + encoder.pos_embed[:, :1]).expand(3, -1, -1)
        sequence = torch.cat([cls, prompted.prompts.expand(3, -1, -1), tokens], dim=1)
        expected = encoder.norm(encoder.blocks(sequence))[:, 0]
        torch.testing.assert_close(prompted.features(images), expected)
    assert [name for name, p in prompted.named_parameters() if p.requires_grad] == [
        "prompts", "head.weight", "head.bias"]


def test_vpt_lowshot_trains_prompts_only(timm_file):
    cfg = build_config(LowShotConfig, None, dict(encoder=str(timm_file), method="vpt", shots=(2,), num_splits=1,
                                                 vpt_steps=3, vpt_batch_size=8, num_images=60, cache=False,
                                                 progress=False))
    encoder = FrozenEncoder(resolve_encoder(cfg.encoder, cfg.model))
    before = {k: v.clone() for k, v in encoder.model.state_dict().items()}
    data = open_eval_data("synthetic", "auto", 32, 60)
    results = evaluate_lowshot(encoder, data, cfg)
    assert results["2shot_train_images"] == 20 and 0 <= results["2shot_top1"] <= 100
    for key, value in encoder.model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_random_init_encoder_is_seeded(tmp_path):
    first = build_encoder(resolve_encoder("", "vit_micro4", seed=1))
    second = build_encoder(resolve_encoder("", "vit_micro4", seed=1))
    third = build_encoder(resolve_encoder("", "vit_micro4", seed=2))
    assert torch.equal(first.pos_embed, second.pos_embed) and not torch.equal(first.pos_embed, third.pos_embed)


def test_encoder_metadata_comes_from_safetensors(tmp_path):
    model = create_vit("vit_ti4", depth=1)
    path = tmp_path / "encoder.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata={"model": "vit_ti4", "image_size": "32"})
    spec = resolve_encoder(str(tmp_path), "vit_micro4")  # a run dir: metadata beats the default model
    assert (spec.model, spec.depth, spec.image_size) == ("vit_ti4", 1, 32)
    assert resolve_encoder(str(path), "vit_micro4", image_size=48).image_size == 48

"""``prepretrain classify``: a classifier scored on the benchmarks' layouts, by class id.

The numbers are checked against what they must equal: a finetune run's own validation top-1;
the predictions on a v2-style or Kaggle-style copy of the same images; ReaL and ObjectNet
accuracies recomputed from the per-image predictions (and ObjectNet's from the raw logits);
the released models' evaluation transforms rebuilt from their documented steps.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

from prepretrain.cli import main
from prepretrain.config import build_config
from prepretrain.data.images.transforms import IMAGENET_MEAN, IMAGENET_STD, crop_eval_transform
from prepretrain.data.readers.releases import imagenet_wnids
from prepretrain.evaluate.classify import ClassifyConfig, run_classify
from prepretrain.files import read_safetensors, save_safetensors, weights_sha256
from prepretrain.models.classifier import build_classifier, default_eval_crop, resolve_classifier
from prepretrain.models.vit import create_vit
from test_benchmarks import objectnet, write_image

WNIDS = imagenet_wnids()
CLASSES = (65, 970, 0)  # the ImageNet classes of the miniature validation sets


@pytest.fixture(scope="module")
def imagenet_model(tmp_path_factory) -> Path:
    """A vit_micro4 with a 1000-way head and no metadata (a plain timm file: ImageNet-1k assumed),
    nudged towards the classes of the miniature sets so its predictions hit and miss them."""
    torch.manual_seed(0)
    net = create_vit("vit_micro4", num_classes=1000)
    with torch.no_grad():
        net.head.bias.zero_()
        net.head.bias[list(CLASSES)] = 3.0
    path = tmp_path_factory.mktemp("model") / "in1k_micro.safetensors"
    save_safetensors(path, net.state_dict())
    return path


def classify(**keys) -> dict:
    cfg = build_config(ClassifyConfig, None, [f"{k}={v}" for k, v in {"progress": "false", "num_workers": 0,
                                                                       **keys}.items()])
    return run_classify(cfg)


def predictions(out_dir: str | Path) -> list[dict[str, str]]:
    with open(Path(out_dir) / "predictions.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def val_copies(root: Path) -> dict[str, Path]:
    """The same 9 images as wnid folders, as ImageNet-v2's numbered folders, and flat with the Kaggle CSV."""
    folders, v2, flat = root / "val_folders", root / "imagenetv2-matched-frequency-format-val", root / "flat" / "val"
    rows = ["ImageId,PredictionString"]
    number = 0
    for index in CLASSES:
        for _ in range(3):
            number += 1
            image = write_image(folders / WNIDS[index] / f"ILSVRC2012_val_{number:08d}.JPEG", seed=number,
                                size=(40, 36), fmt="JPEG")
            (v2 / str(index)).mkdir(parents=True, exist_ok=True)
            shutil.copy(image, v2 / str(index) / f"{number}.jpeg")
            flat.mkdir(parents=True, exist_ok=True)
            shutil.copy(image, flat / image.name)
            rows.insert(1, f"{image.stem},{WNIDS[index]} 1 2 3 4")  # newest first: out of order
    (root / "flat" / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    return {"folders": folders, "v2": v2, "flat": flat}


def image_number(path: str) -> int:
    name = Path(path).name
    return int(name.split("_")[-1].split(".")[0]) if name.startswith("ILSVRC") else int(name.split(".")[0])


def test_v2_and_kaggle_copies_give_exactly_the_predictions_of_the_original(tmp_path, imagenet_model):
    copies = val_copies(tmp_path)
    runs = {name: classify(model=imagenet_model, data=path, out_dir=tmp_path / "out" / name)
            for name, path in copies.items()}
    assert [runs[n]["format"] for n in ("folders", "v2", "flat")] == ["imagefolder", "imagenet-v2", "imagenet-val"]
    assert runs["v2"]["model_classes_from"].startswith("ImageNet-1k, assumed")
    by_image = {}
    for name in copies:
        rows = predictions(runs[name]["out_dir"])
        assert len(rows) == 9
        by_image[name] = {image_number(r["path"]): {k: v for k, v in r.items() if k != "path"} for r in rows}
    assert by_image["v2"] == by_image["folders"] == by_image["flat"]
    assert {r["target"] for r in by_image["v2"].values()} == {WNIDS[i] for i in CLASSES}
    hits = [r["top1"] == r["target"] for r in by_image["v2"].values()]
    assert 0 < sum(hits) < 9  # the model hits and misses: the equality above is not vacuous
    for name in copies:
        assert runs[name]["top1"] == pytest.approx(100 * sum(hits) / 9)
        assert runs[name]["num_images"] == 9 and runs[name]["num_classes"] in (3, 1000)


def test_real_top1_is_what_the_predictions_imply(tmp_path, imagenet_model):
    copies = val_copies(tmp_path)
    table = [[] for _ in range(9)]
    # Images 1, 8 and 9 keep ReaL's empty list (left out); the others have one or several valid classes.
    table[1], table[2], table[3] = [65, 970], [0], [970, 5, 65]
    table[4], table[5], table[6] = [65], [0, 970, 65], [1]
    real = tmp_path / "real.json"
    real.write_text(json.dumps(table))
    run = classify(model=imagenet_model, data=copies["flat"], real_labels=real, out_dir=tmp_path / "real")
    rows = predictions(run["out_dir"])
    scored = [r for r in rows if r["real"]]
    assert len(scored) == run["real_images"] == 6
    implied = 100 * sum(r["top1"] in r["real"].split() for r in scored) / len(scored)
    assert run["real_top1"] == pytest.approx(implied)
    for row in rows:
        expected = table[image_number(row["path"]) - 1]
        assert row["real"].split() == [WNIDS[i] for i in expected]


def test_objectnet_scores_each_class_by_the_max_logit_over_its_imagenet_classes(tmp_path, imagenet_model):
    root = objectnet(tmp_path)
    run = classify(model=imagenet_model, data=root, out_dir=tmp_path / "on")
    assert run["format"] == "objectnet" and run["restricted_to_set_classes"] is True
    assert run["num_images"] == 4 and run["left_out"] == {"class not in ImageNet-1k": 2}
    rows = predictions(run["out_dir"])
    # Recompute from the model's raw logits: crop the 2 px border, the model's transform, max over members.
    spec = resolve_classifier(str(imagenet_model))
    net = build_classifier(spec)
    transform = crop_eval_transform(spec.image_size, spec.eval_crop)
    members = {"alarm_clock": [409, 530], "chair": [423]}
    for row in rows:
        with Image.open(root / row["path"]) as image:
            image = image.convert("RGB")
            image = image.crop((2, 2, image.width - 2, image.height - 2))
        with torch.no_grad():
            logits = net(transform(image)[None])[0]
        scores = {name: float(logits[cols].max()) for name, cols in members.items()}
        assert row["top1"] == max(scores, key=scores.get)
        assert row["top1_name"] in ("Alarm clock", "Chair")
    implied = 100 * sum(r["top1"] == r["target"] for r in rows) / len(rows)
    assert run["top1"] == pytest.approx(implied)


def test_a_finetune_runs_own_top1_equals_classify_on_the_same_split(tmp_path):
    from prepretrain.registry import command

    finetune = command("finetune")
    cfg = build_config(finetune.config, None, [f"out_dir={tmp_path / 'ft'}", "epochs=0.5", "num_images=400",
                                               "eval_every=0", "progress=false"])
    results = finetune.run(cfg)
    _, metadata = read_safetensors(Path(results["best"]))
    assert len(json.loads(metadata["class_ids"])) == results["num_classes"] == 10
    val = classify(model=tmp_path / "ft", data="synthetic", split="val", num_images=400)
    test = classify(model=tmp_path / "ft", data="synthetic", split="test", num_images=400)
    assert val["model"].endswith("best.safetensors") and val["eval_transform_from"] == "the weights' metadata"
    assert val["top1"] == pytest.approx(results["best_val_top1"])
    assert test["top1"] == pytest.approx(results["best_top1"])
    assert test["top5"] == pytest.approx(results["best_top5"])


# ---------------------------------------------------------------------------- transforms


def documented(size: int, steps: list) -> T.Compose:
    return T.Compose([*steps, T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def test_released_models_see_images_through_their_documented_transforms(tmp_path, imagenet_model):
    rng = np.random.default_rng(1)
    image = Image.fromarray(rng.integers(0, 256, (300, 420, 3), dtype=np.uint8))
    bicubic = T.InterpolationMode.BICUBIC
    # MAWS IN-1k finetunes: Resize((res, res), bicubic), no crop (the release's eval script).
    spec = resolve_classifier(f"maws:vit_b16_ft_in1k@{imagenet_model}", arch="vit_micro4")
    assert (spec.eval_crop, spec.image_size, spec.classes_from) == ("squash", 512, "ImageNet-1k (maws:vit_b16_ft_in1k)")
    maws = documented(512, [T.Resize((512, 512), interpolation=bicubic)])
    assert torch.equal(crop_eval_transform(512, spec.eval_crop)(image), maws(image))
    # SWAG: resize the shorter side to res, center crop res (crop fraction 1.0).
    crop, _ = default_eval_crop({}, "", "swag", False, 384)
    swag = documented(384, [T.Resize(384, interpolation=bicubic), T.CenterCrop(384)])
    assert torch.equal(crop_eval_transform(384, crop)(image), swag(image))
    # MAE finetunes (fc_norm): 224/256 up to 224 px, 1.0 above.
    crop, _ = default_eval_crop({}, "", "timm", True, 224)
    mae = documented(224, [T.Resize(256, interpolation=bicubic), T.CenterCrop(224)])
    assert torch.equal(crop_eval_transform(224, crop)(image), mae(image))
    assert default_eval_crop({}, "", "timm", True, 448)[0] == "1.0"


# ---------------------------------------------------------------------------- failures and folders


def test_a_folder_without_labels_is_labelled(tmp_path, imagenet_model):
    for k in range(3):
        write_image(tmp_path / "photos" / "2024" / f"p{k}.png", seed=k, size=(50, 40))
    run = classify(model=imagenet_model, data=tmp_path / "photos", layout="folder", out_dir=tmp_path / "out")
    assert run["format"] == "folder" and "top1" not in run and run["num_images"] == 3
    rows = predictions(run["out_dir"])
    assert [r["target"] for r in rows] == ["", "", ""]
    for row in rows:
        scores = [float(row[f"top{k}_score"]) for k in range(1, 6)]
        assert row["top1"] in WNIDS and scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1 + 1e-5


def test_wrong_data_ends_in_one_line_with_its_exit_code(tmp_path, imagenet_model, capsys):
    # Classes the model does not have (a 3-way model on ImageNet classes).
    torch.manual_seed(0)
    small = create_vit("vit_micro4", num_classes=3)
    other = tmp_path / "pets.safetensors"
    save_safetensors(other, small.state_dict(), {"class_ids": json.dumps(["cat", "dog", "fox"])})
    copies = val_copies(tmp_path)
    assert main(["classify", f"model={other}", f"data={copies['v2']}", "progress=false"]) == 2
    message = capsys.readouterr().err.strip().splitlines()
    assert len(message) == 1 and "none of them is" in message[0] and WNIDS[0] in message[0]
    # An ObjectNet copy without its mappings.
    root = objectnet(tmp_path / "on", with_mappings=False)
    assert main(["classify", f"model={imagenet_model}", f"data={root}", "progress=false"]) == 3
    message = capsys.readouterr().err.strip().splitlines()
    assert len(message) == 1 and "mappings" in message[0]
    # A folder with no images at all; a model that is an encoder, not a classifier.
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    assert main(["classify", f"model={imagenet_model}", f"data={tmp_path / 'empty'}", "progress=false"]) == 2
    assert "no images" in capsys.readouterr().err
    encoder = tmp_path / "encoder.safetensors"
    save_safetensors(encoder, create_vit("vit_micro4").state_dict())
    assert main(["classify", f"model={encoder}", f"data={copies['v2']}", "progress=false"]) == 2
    assert "no classification head" in capsys.readouterr().err


def test_weights_identity_depends_on_tensors_not_metadata(tmp_path):
    state = {"a": torch.arange(6.0), "b": torch.ones(2, 3)}
    first, second = tmp_path / "one.safetensors", tmp_path / "two.safetensors"
    save_safetensors(first, state, {"model": "vit_micro4", "stage": "mae", "image_size": "32"})
    save_safetensors(second, state, {"image_size": "32", "model": "vit_micro4", "note": "re-exported"})
    assert first.read_bytes() != second.read_bytes()
    assert weights_sha256(first) == weights_sha256(second)
    save_safetensors(second, {**state, "b": torch.ones(2, 3) * 2}, {"model": "vit_micro4"})
    assert weights_sha256(first) != weights_sha256(second)


def test_a_torchvision_layout_classifier_scores_as_its_timm_original(tmp_path, imagenet_model):
    """The same weights in torchvision's names (heads.head, encoder.layers...) give the same predictions."""
    from prepretrain.files import read_safetensors
    from prepretrain.models.layouts import timm_to_torchvision

    state, _ = read_safetensors(imagenet_model)
    torchvision_file = tmp_path / "vit_torchvision.pth"
    torch.save(timm_to_torchvision(state), torchvision_file)
    copies = val_copies(tmp_path)
    ours = classify(model=imagenet_model, data=copies["v2"], out_dir=tmp_path / "timm")
    theirs = classify(model=torchvision_file, data=copies["v2"], arch="vit_micro4", out_dir=tmp_path / "tv")
    assert theirs["model_classes_from"].startswith("ImageNet-1k, assumed")
    assert [r["top1"] for r in predictions(theirs["out_dir"])] == [r["top1"] for r in predictions(ours["out_dir"])]
    assert theirs["top1"] == ours["top1"]


def test_a_model_covering_part_of_the_class_space_predicts_only_its_own_classes(tmp_path):
    """A 3-way model with ImageNet ids on a v2 copy (1000-class space, images of 3 classes): classes it
    has no output for never win, restricted or not, and both protocols agree on every image."""
    torch.manual_seed(1)
    net = create_vit("vit_micro4", num_classes=3)
    ids = [WNIDS[i] for i in CLASSES]
    model = tmp_path / "three.safetensors"
    save_safetensors(model, net.state_dict(), {"class_ids": json.dumps(ids)})
    copies = val_copies(tmp_path)
    free = classify(model=model, data=copies["v2"], out_dir=tmp_path / "free")
    restricted = classify(model=model, data=copies["v2"], restrict="true", out_dir=tmp_path / "restricted")
    assert restricted["restricted_to_set_classes"] is True and restricted["num_classes"] == 1000
    rows_free, rows_restricted = predictions(free["out_dir"]), predictions(restricted["out_dir"])
    assert {r["top1"] for r in rows_restricted} <= set(ids)
    assert [r["top1"] for r in rows_restricted] == [r["top1"] for r in rows_free]
    assert free["top1"] == restricted["top1"]

"""The benchmarks' release layouts, written in miniature and read back image by image.

Each test builds a tiny copy of a release's files (names, label files, mappings) as the
release ships them and asserts the label of every image, including the traps: ImageNet-v2's
numeric folders, an out-of-order Kaggle CSV, devkit ids that are not sorted-wnid order,
ReaL's empty and multi-label lists, ObjectNet's border, unmapped folders and many-to-one
classes, iNaturalist's JSON and Food-101's lists.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from prepretrain.cli import main
from prepretrain.config import ConfigError
from prepretrain.data.readers.folders import ImageFolderSource
from prepretrain.data.readers.open import open_data, open_source, source_format
from prepretrain.data.readers.releases import (
    DataLayoutError,
    ListedSource,
    RealLabels,
    detect_layout,
    imagenet_wnids,
)
from prepretrain.evaluate.common import open_eval_data

WNIDS = imagenet_wnids()


def write_image(path: Path, seed: int = 0, size: tuple[int, int] = (12, 10), fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path, format=fmt)
    return path


def labels_by_key(source) -> dict[str, str]:
    """key -> class id of every sample, read from the annotations (no pixels)."""
    ids = source.class_names["label"]
    return {source.annotation(i).key: ids[source.annotation(i).labels["label"]] for i in range(len(source))}


# ---------------------------------------------------------------------------- ImageNet-v2


def test_imagenet_v2_folders_are_class_indices_not_sorted_strings(tmp_path):
    root = tmp_path / "imagenetv2-matched-frequency-format-val"
    indices = [0, 1, 2, 10, 100, 999]
    for index in indices:
        write_image(root / str(index) / f"img{index}.jpeg", seed=index, fmt="JPEG")
    source = open_source(root, split="val")
    assert isinstance(source, ListedSource) and source_format(source) == "imagenet-v2"
    assert labels_by_key(source) == {f"{i}/img{i}.jpeg": WNIDS[i] for i in indices}
    # The trap: an image folder sorts "0", "1", "10", "100", "2", "999" as strings.
    # An ImageNet model reading that index would be told class 2 for the images of class 10.
    folder = ImageFolderSource(root)
    assert folder.annotation(2).key == "10/img10.jpeg" and folder.annotation(2).labels["label"] == 2


def test_numbered_folders_of_a_user_stay_an_image_folder(tmp_path):
    for index in (0, 1, 2):
        write_image(tmp_path / "mine" / str(index) / "a.png", seed=index)
    assert detect_layout(tmp_path / "mine") is None
    assert isinstance(open_source(tmp_path / "mine"), ImageFolderSource)
    assert source_format(open_source(tmp_path / "mine", kind="imagenet-v2")) == "imagenet-v2"


# ---------------------------------------------------------------------------- ImageNet val


def kaggle_imagenet(tmp_path: Path, truth: dict[int, str]) -> Path:
    """The Kaggle layout: ILSVRC/Data/CLS-LOC/{train,val} with LOC_val_solution.csv four levels up."""
    root = tmp_path / "imagenet-object-localization-challenge"
    val = root / "ILSVRC" / "Data" / "CLS-LOC" / "val"
    for number in truth:
        write_image(val / f"ILSVRC2012_val_{number:08d}.JPEG", seed=number, fmt="JPEG")
    rows = ["ImageId,PredictionString"]
    for number in sorted(truth, reverse=True):  # the release's rows are in no particular order
        rows.append(f"ILSVRC2012_val_{number:08d},{truth[number]} 10 12 200 220 {truth[number]} 1 2 30 40")
    (root / "LOC_val_solution.csv").write_text("\n".join(rows) + "\n")
    for wnid in sorted(set(truth.values())):
        write_image(root / "ILSVRC" / "Data" / "CLS-LOC" / "train" / wnid / f"{wnid}_1.JPEG", fmt="JPEG")
    return root / "ILSVRC" / "Data" / "CLS-LOC"


def test_flat_val_labelled_by_an_out_of_order_kaggle_csv(tmp_path):
    truth = {1: WNIDS[65], 2: WNIDS[970], 3: WNIDS[0], 7: WNIDS[65]}
    cls_loc = kaggle_imagenet(tmp_path, truth)
    source = open_source(cls_loc, split="val")
    assert source_format(source) == "imagenet-val"
    assert labels_by_key(source) == {f"ILSVRC2012_val_{n:08d}.JPEG": w for n, w in truth.items()}
    assert source.num_classes("label") == 1000  # the standard ImageNet-1k class space
    assert main(["data", "stats", str(cls_loc), "--split", "val", "--sample", "2"]) == 0


def test_train_folders_and_flat_val_share_one_class_index(tmp_path):
    truth = {1: WNIDS[65], 2: WNIDS[970], 3: WNIDS[0]}
    cls_loc = kaggle_imagenet(tmp_path, truth)
    data = open_eval_data(str(cls_loc), image_size=16)
    assert data.class_names == sorted(truth.values())
    val = data.source("val")
    for index in range(len(val)):
        record = val.get(index)
        number = int(record.key[len("ILSVRC2012_val_"):][:8])
        assert data.class_names[record.labels["label"]] == truth[number]


def test_val_class_missing_from_train_is_refused(tmp_path):
    cls_loc = kaggle_imagenet(tmp_path, {1: WNIDS[5], 2: WNIDS[6]})
    write_image(cls_loc / "val" / "ILSVRC2012_val_00000009.JPEG", fmt="JPEG")
    solution = cls_loc.parents[2] / "LOC_val_solution.csv"
    solution.write_text(solution.read_text() + f"ILSVRC2012_val_00000009,{WNIDS[7]} 1 1 2 2\n")
    with pytest.raises(ConfigError, match=WNIDS[7]):
        open_eval_data(str(cls_loc), image_size=16)


def devkit(tmp_path: Path, ids_for_images: list[int], with_text_map: bool) -> Path:
    """A flat val folder with the devkit's ground truth, whose ILSVRC2012_IDs are NOT sorted-wnid indices."""
    val = tmp_path / "val"
    for number in range(1, len(ids_for_images) + 1):
        write_image(val / f"ILSVRC2012_val_{number:08d}.JPEG", seed=number, fmt="JPEG")
    data = tmp_path / "ILSVRC2012_devkit_t12" / "data"
    data.mkdir(parents=True)
    (data / "ILSVRC2012_validation_ground_truth.txt").write_text("".join(f"{i}\n" for i in ids_for_images))
    # The devkit's own order: ID k is the k-th wnid of this (reversed) list, not of the sorted one.
    devkit_order = list(reversed(WNIDS))
    if with_text_map:
        (data / "map_clsloc.txt").write_text("".join(f"{w} {k} name_{k}\n" for k, w in enumerate(devkit_order, 1)))
    else:
        from scipy.io import savemat

        dtype = [("ILSVRC2012_ID", "O"), ("WNID", "O"), ("words", "O"), ("num_children", "O")]
        rows = [(k, w, f"words {k}", 0) for k, w in enumerate(devkit_order, 1)]
        rows += [(1001, "n00001740", "entity", 3)]  # an inner synset: not a class
        savemat(str(data / "meta.mat"), {"synsets": np.array(rows, dtype=dtype).reshape(-1, 1)})
    return val


@pytest.mark.parametrize("with_text_map", [False, True], ids=["meta.mat", "map_clsloc.txt"])
def test_devkit_ids_are_the_devkits_order_not_sorted_wnids(tmp_path, with_text_map):
    ids = [1, 490, 1000, 2]
    val = devkit(tmp_path, ids, with_text_map)
    source = open_source(val)
    assert source_format(source) == "imagenet-val"
    expected = {f"ILSVRC2012_val_{n:08d}.JPEG": WNIDS[1000 - i] for n, i in enumerate(ids, 1)}
    assert labels_by_key(source) == expected
    assert expected["ILSVRC2012_val_00000001.JPEG"] == WNIDS[999]  # ID 1 is not class 0


def test_flat_val_without_a_label_file_is_unlabelled_unless_the_layout_is_asked(tmp_path):
    write_image(tmp_path / "val" / "ILSVRC2012_val_00000001.JPEG", fmt="JPEG")
    assert source_format(open_source(tmp_path / "val")) == "folder"
    with pytest.raises(DataLayoutError, match="LOC_val_solution.csv"):
        open_source(tmp_path / "val", kind="imagenet-val")


def test_real_labels_follow_file_names_and_leave_out_empty_lists(tmp_path):
    real = tmp_path / "real.json"
    real.write_text(json.dumps([[], [970, 795], [230]]))
    labels = RealLabels(real)
    assert labels.of("val/ILSVRC2012_val_00000001.JPEG") is None
    assert labels.of("ILSVRC2012_val_00000002.JPEG") == [WNIDS[970], WNIDS[795]]
    assert labels.of("x/ILSVRC2012_val_00000003.png") == [WNIDS[230]]
    with pytest.raises(DataLayoutError, match="is image 4"):
        labels.of("ILSVRC2012_val_00000004.JPEG")
    with pytest.raises(DataLayoutError, match="cat.jpg"):
        labels.of("cat.jpg")
    builtin = RealLabels("builtin")
    assert len(builtin.table) == 50_000 and builtin.table[0] is None
    assert sum(row is None for row in builtin.table) == 3163  # timm's imagenet_real_labels.json: 3,163 empty lists


# ---------------------------------------------------------------------------- ObjectNet


def imagenet_2012_names() -> list[str]:
    """A stand-in for ``imagenet_to_label_2012_v2``: 1000 distinct names in an order of their own."""
    return [f"inet name {k}" for k in range(1000)]


def objectnet(tmp_path: Path, with_mappings: bool = True) -> Path:
    root = tmp_path / "objectnet-1.0"
    # Line k of imagenet_to_label_2012_v2 names 2012 id k; pytorch index p has 2012 id (p * 7) % 1000.
    names = imagenet_2012_names()
    pytorch_to_2012 = {str(p): (p * 7) % 1000 for p in range(1000)}
    name_of_index = {p: names[(p * 7) % 1000] for p in range(1000)}
    folders = {"alarm_clock": "Alarm clock", "chair": "Chair", "squeegee": "Squeegee"}
    to_imagenet = {"Alarm clock": f"{name_of_index[409]}; {name_of_index[530]}", "Chair": name_of_index[423]}
    if with_mappings:
        maps = root / "mappings"
        maps.mkdir(parents=True)
        (maps / "folder_to_objectnet_label.json").write_text(json.dumps(folders))
        (maps / "objectnet_to_imagenet_1k.json").write_text(json.dumps(to_imagenet))
        (maps / "pytorch_to_imagenet_2012_id.json").write_text(json.dumps(pytorch_to_2012))
        (maps / "imagenet_to_label_2012_v2").write_text("\n".join(names) + "\n")
    for folder in folders:
        for k in range(2):
            image = write_image(root / "images" / folder / f"{folder}{k}.png", seed=k, size=(14, 11))
            with Image.open(image) as loaded:
                pixels = np.array(loaded.convert("RGB"))
            red = (255, 0, 0)
            pixels[0, :], pixels[-1, :], pixels[:, 0], pixels[:, -1] = red, red, red, red
            Image.fromarray(pixels).save(image)
    return root


def test_objectnet_maps_folders_to_imagenet_classes_and_drops_the_rest(tmp_path):
    root = objectnet(tmp_path)
    source = open_source(root, split="val")
    assert source_format(source) == "objectnet"
    assert source.class_names["label"] == ["alarm_clock", "chair"]  # sorted folders that overlap ImageNet
    assert source.class_members["label"] == [[WNIDS[409], WNIDS[530]], [WNIDS[423]]]  # many-to-one
    assert source.synonyms["label"] == [["Alarm clock"], ["Chair"]]
    assert labels_by_key(source) == {f"images/{f}/{f}{k}.png": f for f in ("alarm_clock", "chair") for k in range(2)}
    assert source.left_out == {"class not in ImageNet-1k": 2}  # the squeegee images
    # The border: 14x11 -> 10x7 and the red frame gone.
    record = source.get(0)
    assert record.image.size == (10, 7)
    with Image.open(root / "images" / "alarm_clock" / "alarm_clock0.png") as original:
        inner = np.array(original.convert("RGB"))[2:-2, 2:-2]
    assert np.array_equal(np.array(record.image), inner)


def test_objectnet_without_its_mappings_says_what_is_missing(tmp_path, capsys):
    root = objectnet(tmp_path, with_mappings=False)
    with pytest.raises(DataLayoutError, match="mappings"):
        open_source(root)
    (root / "mappings").mkdir()
    with pytest.raises(DataLayoutError, match="folder_to_objectnet_label.json"):
        open_source(root)


# ---------------------------------------------------------------------------- iNaturalist, Food-101


def test_inaturalist_json_labels_by_category_and_splits_from_files(tmp_path):
    root = tmp_path / "inat2018"
    categories = [{"id": 3, "name": "Aaptos aaptos", "supercategory": "Animalia"},
                  {"id": 0, "name": "Zebra finch", "supercategory": "Aves"}]
    splits = {"train": [(10, "train_val2018/Aves/0/a.jpg", 0), (11, "train_val2018/Animalia/3/b.jpg", 3)],
              "val": [(20, "train_val2018/Animalia/3/c.jpg", 3), (21, "train_val2018/Aves/0/d.jpg", 0),
                      (22, "train_val2018/Aves/0/e.jpg", 0)]}
    for split, images in splits.items():
        content = {"info": {}, "categories": categories,
                   "images": [{"id": i, "file_name": f, "width": 12, "height": 10} for i, f, _ in images],
                   "annotations": [{"id": 100 + i, "image_id": i, "category_id": c} for i, _, c in images]}
        (root / f"{split}2018.json").parent.mkdir(parents=True, exist_ok=True)
        (root / f"{split}2018.json").write_text(json.dumps(content))
        for _, file, _ in images:
            write_image(root / file, fmt="JPEG")
    val = open_source(root, split="val")
    assert source_format(val) == "inaturalist"
    assert val.class_names["label"] == ["Zebra finch", "Aaptos aaptos"]  # by category id
    assert labels_by_key(val) == {"train_val2018/Animalia/3/c.jpg": "Aaptos aaptos",
                                  "train_val2018/Aves/0/d.jpg": "Zebra finch",
                                  "train_val2018/Aves/0/e.jpg": "Zebra finch"}
    data = open_eval_data(str(root), image_size=16)
    assert data.split_names == {"train": "train", "test": "val", "val": "val"} and len(data.source("train")) == 2


def test_food101_reads_its_meta_lists(tmp_path):
    root = tmp_path / "food-101"
    classes = ["apple_pie", "baby_back_ribs"]
    (root / "meta").mkdir(parents=True)
    (root / "meta" / "classes.txt").write_text("\n".join(classes) + "\n")
    (root / "meta" / "labels.txt").write_text("Apple pie\nBaby back ribs\n")
    (root / "meta" / "train.txt").write_text("apple_pie/1005649\nbaby_back_ribs/2\n")
    (root / "meta" / "test.txt").write_text("baby_back_ribs/7\napple_pie/3\n")
    for entry in ("apple_pie/1005649", "baby_back_ribs/2", "baby_back_ribs/7", "apple_pie/3"):
        write_image(root / "images" / f"{entry}.jpg", fmt="JPEG")
    test = open_source(tmp_path, split="val")  # the folder holding food-101/ works too; val reads test
    assert source_format(test) == "food101"
    assert labels_by_key(test) == {"images/baby_back_ribs/7.jpg": "baby_back_ribs",
                                   "images/apple_pie/3.jpg": "apple_pie"}
    assert test.synonyms["label"] == [["Apple pie"], ["Baby back ribs"]]
    assert labels_by_key(open_data(str(root), split="train")) == {
        "images/apple_pie/1005649.jpg": "apple_pie", "images/baby_back_ribs/2.jpg": "baby_back_ribs"}
    (root / "meta" / "test.txt").write_text("pizza/1\n")
    with pytest.raises(DataLayoutError, match="test.txt:1: class 'pizza'"):
        open_source(root, split="test")


def test_zero_shot_reads_each_layouts_class_names(tmp_path):
    from prepretrain.evaluate.zeroshot import source_classes

    v2 = tmp_path / "imagenetv2-top-images-format-val"
    write_image(v2 / "0" / "a.jpeg", fmt="JPEG")
    assert source_classes(open_source(v2), "label")[0][0] == "tench"  # WordNet ids -> names (1000 classes)
    assert source_classes(open_source(objectnet(tmp_path)), "label") == [["Alarm clock"], ["Chair"]]
    food = tmp_path / "food-101"
    (food / "meta").mkdir(parents=True)
    (food / "meta" / "classes.txt").write_text("apple_pie\n")
    (food / "meta" / "labels.txt").write_text("Apple pie\n")
    (food / "meta" / "test.txt").write_text("apple_pie/1\n")
    write_image(food / "images" / "apple_pie" / "1.jpg", fmt="JPEG")
    assert source_classes(open_source(food, split="test"), "label") == [["Apple pie"]]

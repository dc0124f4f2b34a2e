"""The paper's evaluation sets, read from the files their releases ship (no renaming needed).

Research groups keep ImageNet, ImageNet-v2, ObjectNet, iNaturalist and Food-101 in the layouts they
were released in (ImageNet: Kaggle's LOC_val_solution.csv or the ILSVRC2012 devkit, the class order
of timm/data/_info/imagenet_synsets.txt; ImageNet-v2: github modestyachts/ImageNetV2; ObjectNet
1.0's mappings/; iNaturalist: github visipedia/inat_comp; Food-101: its meta/ lists). Read as
generic image folders, several of them give wrong labels without any error: ImageNet-v2 names its
class folders ``0`` ... ``999`` (the class index), which sort as strings; the ImageNet validation
images usually sit in one flat folder labelled by a CSV or the devkit's own class numbering. This
module recognises each layout from what is on disk and reads it into a :class:`ListedSource`, whose
classes are named by a stable **class id** (the WordNet id for the ImageNet family, the folder name
for ObjectNet and Food-101, the species name for iNaturalist), so a classifier that remembers its
classes' ids can be scored on any of them (``prepretrain classify``,
:mod:`prepretrain.evaluate.classify`).

Layouts (the name ``prepretrain data stats`` prints; ``layout=NAME`` forces one; each is one
:class:`Layout` entry of :data:`RELEASES`, the table tried in order):

``imagenet-val``  ``ILSVRC2012_val_*.JPEG`` in one folder, labelled by Kaggle's
                  ``LOC_val_solution.csv`` or by the devkit's
                  ``ILSVRC2012_validation_ground_truth.txt`` (+ ``meta.mat`` or ``map_clsloc.txt``
                  to turn its ILSVRC2012_IDs into WordNet ids), found in the folder or above it.
``imagenet-v2``   class folders ``0`` ... ``999`` (the standard, sorted-wnid index), any variant.
``objectnet``     ``images/<folder>/*.png`` + ``mappings/``: the 113 classes that overlap
                  ImageNet-1k, each covering one or more ImageNet classes; a 2 px border cropped.
``inaturalist``   ``train2018.json`` / ``val2018.json`` (2017, 2019, 2021 too: ``train.json``,
                  ``val.json``, ``train_mini.json``), COCO-like, paths relative to the JSON.
``food101``       ``images/<class>/<id>.jpg`` with ``meta/classes.txt``, ``meta/labels.txt``,
                  ``meta/train.txt`` and ``meta/test.txt``.

ImageNet train (and a val regrouped into ``<wnid>/`` folders) is an ordinary image folder; its
WordNet-id folder names are its class ids already. The ImageNet-family sets all use the
standard 1000-class space (the sorted WordNet ids timm ships), so labels agree across them.
ReaL is a protocol over the ImageNet validation images, not a folder: :class:`RealLabels`.
"""

from __future__ import annotations

import csv
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from prepretrain.data.images.decode import DEFAULT_MAX_PIXELS, IMAGE_EXTENSIONS, image_files
from prepretrain.data.readers.folders import PackedStrings, _check_index, _FileSource
from prepretrain.data.records import Annotation, BadSample, Record

IMAGENET_VAL_FILE = re.compile(r"^ILSVRC2012_val_(\d{8})\.[A-Za-z]+$")
WORDNET_ID = re.compile(r"^n\d{8}$")
LOC_SOLUTION, LOC_SYNSETS = "LOC_val_solution.csv", "LOC_synset_mapping.txt"
DEVKIT_TRUTH = "ILSVRC2012_validation_ground_truth.txt"
DEVKIT_PLACES = (DEVKIT_TRUTH, f"data/{DEVKIT_TRUTH}", f"ILSVRC2012_devkit_t12/data/{DEVKIT_TRUTH}")
OBJECTNET_MAPPINGS = ("folder_to_objectnet_label.json", "objectnet_to_imagenet_1k.json",
                      "pytorch_to_imagenet_2012_id.json", "imagenet_to_label_2012_v2")
OBJECTNET_BORDER = 2  # ObjectNet images carry a 1 px red border: 2 px are cropped off each side
INAT_FILES = {"train": ("train{year}.json", "train.json", "train_mini.json"), "val": ("val{year}.json", "val.json"),
              "test": ("test{year}.json", "test.json")}
INAT_YEARS = ("2018", "2021", "2019", "2017")
LABEL = "label"  # the one label task of every layout here
ANCESTORS_SEARCHED = 4  # LOC_val_solution.csv sits 4 levels above Kaggle's ILSVRC/Data/CLS-LOC/val


class DataLayoutError(ValueError):
    """A dataset folder in a recognised release layout that is incomplete or inconsistent."""


# ------------------------------------------------------------------------------ ImageNet classes


@lru_cache(maxsize=1)
def imagenet_wnids() -> tuple[str, ...]:
    """The 1000 ImageNet-1k WordNet ids in standard (sorted) order: index i = class i of every
    PyTorch/timm ImageNet model (the list timm ships)."""
    from timm.data import ImageNetInfo

    wnids = tuple(ImageNetInfo("imagenet-1k").label_names())
    if len(wnids) != 1000 or list(wnids) != sorted(wnids):
        raise RuntimeError("timm's ImageNet-1k synset list is not the 1000 sorted WordNet ids")
    return wnids


@lru_cache(maxsize=1)
def imagenet_index() -> dict[str, int]:
    return {wnid: index for index, wnid in enumerate(imagenet_wnids())}


@lru_cache(maxsize=1)
def imagenet_names() -> tuple[str, ...]:
    """Display names of the 1000 classes (the cleaned names shipped for zero-shot), by index."""
    from importlib import resources

    text = resources.files("prepretrain").joinpath("assets", "imagenet1k_classes.txt").read_text(encoding="utf-8")
    names = tuple(line.split(",")[0].strip() for line in text.splitlines() if line.strip() and not line.startswith("#"))
    if len(names) != 1000:
        raise RuntimeError("assets/imagenet1k_classes.txt must list 1000 class names")
    return names


def display_names(source: Any, task: str) -> list[str]:
    """A readable name per class of ``task``: the set's own (first synonym), else ImageNet's name for a
    WordNet id, else the class id itself. (Zero-shot reads WordNet ids through its own richer table.)"""
    ids = [str(c) for c in source.class_names[task]]
    synonyms = (getattr(source, "synonyms", None) or {}).get(task) or []
    index, names = imagenet_index(), None
    out = []
    for i, class_id in enumerate(ids):
        if i < len(synonyms) and synonyms[i]:
            out.append(str(synonyms[i][0]))
        elif class_id in index:
            names = names or imagenet_names()
            out.append(names[index[class_id]])
        else:
            out.append(class_id)
    return out


# ------------------------------------------------------------------------------ the source


class ListedSource(_FileSource):
    """Images named by a list, one label each (``-1``: none), with classes named by their ids.

    What every release-layout reader builds. ``class_names[LABEL]`` are the class *ids*
    (WordNet ids, folder names; what classifiers are aligned by); ``synonyms[LABEL]`` their
    readable names (zero-shot prompts, reports) where the ids are not WordNet ids;
    ``class_members[LABEL][i]`` the ids of another label space that class ``i`` covers (ObjectNet:
    its ImageNet WordNet ids), absent when each class is itself. ``border`` pixels are cropped off
    every side when an image is read. ``left_out`` says which files on disk were not listed and
    why (``prepretrain classify`` reports it).
    """

    def __init__(self, root: str | os.PathLike, paths: Sequence[str], labels: Sequence[int], class_ids: Sequence[str],
                 *, layout: str, synonyms: Sequence[Sequence[str]] | None = None,
                 class_members: Sequence[Sequence[str]] | None = None, border: int = 0,
                 left_out: dict[str, int] | None = None, min_size_hint: int | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS, pixels: str = "pil"):
        super().__init__(min_size_hint=min_size_hint, max_pixels=max_pixels, pixels=pixels)
        if len(paths) != len(labels):
            raise ValueError("one label per listed image")
        if not paths:
            raise DataLayoutError(f"{root}: the {layout} layout lists no images here")
        self.root = Path(root)
        self.layout = layout
        self._paths = PackedStrings(paths)
        self._labels = np.asarray(labels, dtype=np.int32)
        self.class_names = {LABEL: [str(c) for c in class_ids]}
        self.num_classes_by_task = {LABEL: len(class_ids)}
        self.synonyms = {LABEL: [list(s) for s in synonyms]} if synonyms is not None else {}
        self.class_members = {LABEL: [list(m) for m in class_members]} if class_members is not None else {}
        self.border = border
        self.left_out = dict(left_out or {})

    def __len__(self) -> int:
        return len(self._paths)

    def entry(self, index: int) -> tuple[Annotation, Path]:
        index = _check_index(index, len(self))
        relative = self._paths.text(index)
        label = int(self._labels[index])
        return Annotation(key=relative, labels={LABEL: label} if label >= 0 else {}), self.root / relative

    def get(self, index: int) -> Record:
        record = super().get(index)
        if self.border:
            record.image = crop_border(record.image, self.border, record.key)
        return record

    __getitem__ = get

    def __repr__(self) -> str:
        return f"ListedSource({str(self.root)!r}, {self.layout}, {len(self)} samples)"


def crop_border(image: Any, border: int, key: str = "") -> Any:
    """``image`` without ``border`` pixels on each side (a PIL image or a ``(C, H, W)`` tensor)."""
    if hasattr(image, "crop"):
        width, height = image.size
        if width <= 2 * border or height <= 2 * border:
            raise BadSample(key, "too_small", f"{width}x{height} has no pixels left after a {border} px border")
        return image.crop((border, border, width - border, height - border))
    height, width = image.shape[-2:]
    if width <= 2 * border or height <= 2 * border:
        raise BadSample(key, "too_small", f"{width}x{height} has no pixels left after a {border} px border")
    return image[..., border:height - border, border:width - border]


def _is_image(name: str) -> bool:
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _subdirs(path: Path) -> list[str]:
    return sorted(entry.name for entry in os.scandir(path) if entry.is_dir() and not entry.name.startswith("."))


def _loose_images(path: Path, limit: int | None = None) -> list[str]:
    """Image files directly in ``path``, sorted; with ``limit``, the first ``limit`` found (a layout
    test on a folder of millions of images reads a few entries, not the whole listing)."""
    found = []
    with os.scandir(path) as entries:
        for entry in entries:
            if entry.is_file() and _is_image(entry.name):
                found.append(entry.name)
                if limit is not None and len(found) >= limit:
                    break
    return sorted(found)


def _find_upwards(start: Path, names: Sequence[str], levels: int = ANCESTORS_SEARCHED) -> Path | None:
    """The first of ``names`` (relative paths) found in ``start`` or one of its ``levels`` ancestors."""
    folder = start.resolve()
    for _ in range(levels + 1):
        for name in names:
            if (folder / name).is_file():
                return folder / name
        if folder.parent == folder:
            break
        folder = folder.parent
    return None


# ------------------------------------------------------------------------------ ImageNet val (flat)


def read_loc_solution(path: Path) -> dict[str, str]:
    """Kaggle's ``LOC_val_solution.csv``: image id (``ILSVRC2012_val_00000001``) -> WordNet id
    (the first word of ``PredictionString``; rows in any order)."""
    table: dict[str, str] = {}
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle)
        header = [cell.strip() for cell in next(reader, [])]
        if header[:2] != ["ImageId", "PredictionString"]:
            raise DataLayoutError(f"{path}: expected the header 'ImageId,PredictionString', got {','.join(header)}")
        for number, row in enumerate(reader, start=2):
            if not row or not any(cell.strip() for cell in row):
                continue
            words = row[1].split() if len(row) > 1 else []
            if not words or not WORDNET_ID.match(words[0]):
                raise DataLayoutError(f"{path}:{number}: the prediction string must start with a WordNet id")
            table[row[0].strip()] = words[0]
    return table




def devkit_id_to_wnid(folder: Path) -> dict[int, str]:
    """ILSVRC2012_ID -> WordNet id from the devkit beside the ground truth: ``map_clsloc.txt``
    (``wnid id name`` per line, as in the ILSVRC2015 devkit) or ``meta.mat`` (read with SciPy)."""
    text_map = folder / "map_clsloc.txt"
    if text_map.is_file():
        table = {}
        for number, line in enumerate(text_map.read_text(encoding="utf-8").splitlines(), start=1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) < 2 or not WORDNET_ID.match(parts[0]) or not parts[1].isdigit():
                raise DataLayoutError(f"{text_map}:{number}: expected 'wnid id name'")
            table[int(parts[1])] = parts[0]
        return table
    meta = folder / "meta.mat"
    if not meta.is_file():
        raise DataLayoutError(
            f"{folder / DEVKIT_TRUTH} numbers classes by the devkit's ILSVRC2012_ID, which needs meta.mat or "
            f"map_clsloc.txt beside it to become WordNet ids; neither is in {folder}")
    try:
        from scipy.io import loadmat
    except ImportError:
        raise DataLayoutError(f"{meta}: reading the devkit's meta.mat needs SciPy (pip install scipy); or put the "
                              f"Kaggle {LOC_SOLUTION} beside the images, or regroup val into <wnid>/ folders") from None
    synsets = loadmat(str(meta), squeeze_me=True)["synsets"]
    table = {}
    for row in np.atleast_1d(synsets):
        ilsvrc_id, wnid, children = int(row["ILSVRC2012_ID"]), str(row["WNID"]), int(row["num_children"])
        if children == 0:  # the 1000 leaf classes; the rest of the 1860 synsets are their ancestors
            table[ilsvrc_id] = wnid
    return table


def imagenet_val_labels(folder: Path, files: Sequence[str]) -> tuple[dict[str, str], str]:
    """WordNet id of each validation file name, from the label file found in or above ``folder``."""
    solution = _find_upwards(folder, [LOC_SOLUTION])
    if solution is not None:
        table = read_loc_solution(solution)
        return {name: table[Path(name).stem] for name in files if Path(name).stem in table}, str(solution)
    truth = _find_upwards(folder, DEVKIT_PLACES)
    if truth is None:
        raise DataLayoutError(
            f"{folder}: ImageNet validation images in one folder need their labels: {LOC_SOLUTION} (Kaggle) or "
            f"{DEVKIT_TRUTH} (+ meta.mat or map_clsloc.txt) in this folder or up to {ANCESTORS_SEARCHED} above it")
    ids = [line.strip() for line in truth.read_text(encoding="utf-8").splitlines() if line.strip()]
    to_wnid = devkit_id_to_wnid(truth.parent)
    labels = {}
    for name in files:
        number = int(IMAGENET_VAL_FILE.match(name).group(1))
        if number <= len(ids):
            ilsvrc_id = int(ids[number - 1])
            if ilsvrc_id not in to_wnid:
                raise DataLayoutError(f"{truth}:{number}: ILSVRC2012_ID {ilsvrc_id} is not one of the devkit's classes")
            labels[name] = to_wnid[ilsvrc_id]
    return labels, str(truth)


def looks_like_imagenet_val(path: Path) -> bool:
    """Mostly ``ILSVRC2012_val_*`` files, with a label file in reach (without one the folder is read
    as unlabelled images, e.g. for MAE; ``layout=imagenet-val`` then says which file is missing)."""
    images = _loose_images(path, limit=256)
    if not images or sum(bool(IMAGENET_VAL_FILE.match(n)) for n in images) < 0.9 * len(images):
        return False
    return _find_upwards(path, [LOC_SOLUTION, *DEVKIT_PLACES]) is not None


def open_imagenet_val(path: Path, split: str | None = None, **kwargs: Any) -> ListedSource:
    """Flat ImageNet validation images, labelled by the CSV or devkit file found (see module docstring)."""
    files = [name for name in _loose_images(path) if IMAGENET_VAL_FILE.match(name)]
    labels, origin = imagenet_val_labels(path, files)
    index = imagenet_index()
    unknown = sorted({wnid for wnid in labels.values() if wnid not in index})
    if unknown:
        raise DataLayoutError(f"{origin}: WordNet ids that are not ImageNet-1k classes: {', '.join(unknown[:5])}")
    listed = [name for name in files if name in labels]
    left_out = {"no label in " + Path(origin).name: len(files) - len(listed)} if len(listed) < len(files) else {}
    return ListedSource(path, listed, [index[labels[name]] for name in listed], imagenet_wnids(),
                        layout="imagenet-val", left_out=left_out, **kwargs)


# ------------------------------------------------------------------------------ ImageNet-v2


V2_NAME = re.compile(r"imagenet[-_]?v2", re.IGNORECASE)


def looks_like_imagenet_v2(path: Path) -> bool:
    """Class folders named by integers below 1000, and either all 1000 of them or a folder name that
    says ImageNet-v2 (a user's own numbered folders stay a plain image folder)."""
    names = _subdirs(path)
    if not names or not all(n.isdigit() and int(n) < 1000 for n in names) or _loose_images(path, limit=1):
        return False
    return len(names) == 1000 or bool(V2_NAME.search(path.resolve().name))


def open_imagenet_v2(path: Path, split: str | None = None, **kwargs: Any) -> ListedSource:
    """ImageNet-v2 (any of its three variants): folder ``k`` holds images of standard class ``k``."""
    paths, labels = [], []
    for name in _subdirs(path):
        if not (name.isdigit() and int(name) < 1000):
            raise DataLayoutError(f"{path / name}: ImageNet-v2 class folders are named 0 ... 999")
        for file in image_files(path / name):
            paths.append(file.relative_to(path).as_posix())
            labels.append(int(name))
    return ListedSource(path, paths, labels, imagenet_wnids(), layout="imagenet-v2", **kwargs)


# ------------------------------------------------------------------------------ ObjectNet


def objectnet_root(path: Path) -> Path | None:
    """The ObjectNet folder (holding ``images/``) when ``path`` is it, its ``images/``, or holds ``objectnet-1.0``."""
    for candidate in (path, path.parent if path.name == "images" else None, path / "objectnet-1.0"):
        if candidate is None or not (candidate / "images").is_dir():
            continue
        if (candidate / "mappings").is_dir() or "objectnet" in candidate.resolve().name.lower():
            return candidate
    return None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DataLayoutError(f"{path}: malformed JSON ({error.msg}, line {error.lineno})") from None


def objectnet_classes(mappings: Path) -> dict[str, tuple[str, list[str]]]:
    """Image folder -> (ObjectNet label, the ImageNet WordNet ids it covers), for the folders whose
    label overlaps ImageNet-1k (113 in ObjectNet 1.0)."""
    missing = [name for name in OBJECTNET_MAPPINGS if not (mappings / name).is_file()]
    if missing:
        raise DataLayoutError(f"{mappings}: ObjectNet's mappings are missing {', '.join(missing)}")
    folder_to_label = _read_json(mappings / "folder_to_objectnet_label.json")
    label_to_imagenet = _read_json(mappings / "objectnet_to_imagenet_1k.json")
    pytorch_to_2012 = _read_json(mappings / "pytorch_to_imagenet_2012_id.json")
    names_2012 = [line.strip() for line in (mappings / "imagenet_to_label_2012_v2").read_text(
        encoding="utf-8").splitlines() if line.strip()]
    # Line i of imagenet_to_label_2012_v2 names ImageNet 2012 id i; pytorch_to_imagenet_2012_id maps
    # the standard (sorted-wnid) index to that id. So name -> standard index -> WordNet id.
    by_2012 = {int(v): int(k) for k, v in pytorch_to_2012.items()}
    wnids = imagenet_wnids()
    name_to_wnid = {}
    for position, name in enumerate(names_2012):
        if position in by_2012:
            name_to_wnid[name] = wnids[by_2012[position]]
    classes = {}
    for folder, label in folder_to_label.items():
        if label not in label_to_imagenet:
            continue
        members = [part.strip() for part in str(label_to_imagenet[label]).split(";") if part.strip()]
        unknown = [m for m in members if m not in name_to_wnid]
        if unknown:
            raise DataLayoutError(f"{mappings / 'objectnet_to_imagenet_1k.json'}: {label!r} maps to ImageNet names not "
                                  f"in imagenet_to_label_2012_v2: {', '.join(unknown[:3])}")
        classes[folder] = (str(label), [name_to_wnid[m] for m in members])
    return classes


def open_objectnet(path: Path, split: str | None = None, **kwargs: Any) -> ListedSource:
    """ObjectNet 1.0: the images of the classes that overlap ImageNet-1k, a 2 px border cropped."""
    root = objectnet_root(path) or path
    mappings = root / "mappings"
    if not mappings.is_dir():
        raise DataLayoutError(f"{root}: ObjectNet needs its mappings/ folder ({', '.join(OBJECTNET_MAPPINGS)}) "
                              "beside images/")
    classes = objectnet_classes(mappings)
    folders = _subdirs(root / "images")
    kept = [f for f in folders if f in classes]
    if not kept:
        raise DataLayoutError(f"{root / 'images'}: none of its folders is an ObjectNet class that overlaps ImageNet "
                              f"(folders: {', '.join(folders[:5])})")
    paths, labels, dropped = [], [], 0
    for label, folder in enumerate(kept):
        for file in image_files(root / "images" / folder):
            paths.append(file.relative_to(root).as_posix())
            labels.append(label)
    for folder in folders:
        if folder not in classes:
            dropped += len(image_files(root / "images" / folder))
    left_out = {"class not in ImageNet-1k": dropped} if dropped else {}
    return ListedSource(root, paths, labels, kept, layout="objectnet",
                        synonyms=[[classes[f][0]] for f in kept], class_members=[classes[f][1] for f in kept],
                        border=OBJECTNET_BORDER, left_out=left_out, **kwargs)


# ------------------------------------------------------------------------------ iNaturalist


def inat_file(path: Path, split: str | None) -> Path | None:
    """The iNaturalist annotation file of ``split`` in ``path`` (``val2018.json``, ``val.json``, ...)."""
    role = {"validation": "val", "eval": "val", None: "val"}.get(split, split)
    for pattern in INAT_FILES.get(role, ()):
        for year in INAT_YEARS if "{year}" in pattern else ("",):
            candidate = path / pattern.format(year=year)
            if candidate.is_file():
                return candidate
    return None


def inat_splits(path: Path) -> list[str]:
    """The labelled splits (the competitions' test files carry no annotations; ``split=test`` still reads one)."""
    return [split for split in ("train", "val") if inat_file(path, split) is not None]


def _looks_like_inat(path: Path) -> bool:
    found = inat_file(path, "val") or inat_file(path, "train")
    if found is None:
        return False
    with open(found, encoding="utf-8") as handle:
        head = handle.read(4096)
    return '"images"' in head or '"info"' in head or '"categories"' in head


def open_inaturalist(path: Path, split: str | None, **kwargs: Any) -> ListedSource:
    """iNaturalist (2017-2021 schema): images, annotations (image -> category), categories; class ids
    are the category names (species, identical across years), in category-id order."""
    found = inat_file(path, split)
    if found is None:
        raise DataLayoutError(f"{path}: no iNaturalist annotation file for split {split!r} "
                              f"(looked for {', '.join(INAT_FILES.get(split or 'val', ('val.json',)))})")
    content = _read_json(found)
    if not isinstance(content, dict) or not {"images", "categories"} <= set(content):
        raise DataLayoutError(f"{found}: expected a COCO-like object with 'images', 'annotations' and 'categories'")
    categories = sorted(content["categories"], key=lambda c: int(c["id"]))
    names = [str(c.get("name", c["id"])) for c in categories]
    ids = names if len(set(names)) == len(names) else [str(c["id"]) for c in categories]
    position = {int(c["id"]): i for i, c in enumerate(categories)}
    label_of = {}
    for annotation in content.get("annotations") or []:
        label_of[int(annotation["image_id"])] = position[int(annotation["category_id"])]
    paths, labels = [], []
    for image in content["images"]:
        paths.append(str(image["file_name"]))
        labels.append(label_of.get(int(image["id"]), -1))
    synonyms = [[n, *([str(c["common_name"])] if c.get("common_name") else [])]
                for n, c in zip(names, categories, strict=True)]
    return ListedSource(found.parent, paths, labels, ids, layout="inaturalist", synonyms=synonyms, **kwargs)


# ------------------------------------------------------------------------------ Food-101


def food101_root(path: Path) -> Path | None:
    for candidate in (path, path / "food-101"):
        if (candidate / "meta" / "classes.txt").is_file() and (candidate / "images").is_dir():
            return candidate
    return None


def open_food101(path: Path, split: str | None, **kwargs: Any) -> ListedSource:
    """Food-101: ``meta/{train,test}.txt`` list ``class/id`` (``.jpg`` under ``images/``); the
    release has no val split, so ``val`` reads ``test`` (as the paper reports)."""
    root = food101_root(path) or path
    meta = root / "meta"
    classes = [line.strip() for line in (meta / "classes.txt").read_text(encoding="utf-8").splitlines() if line.strip()]
    labels_file = meta / "labels.txt"
    display = ([line.strip() for line in labels_file.read_text(encoding="utf-8").splitlines() if line.strip()]
               if labels_file.is_file() else [c.replace("_", " ") for c in classes])
    if len(display) != len(classes):
        raise DataLayoutError(f"{labels_file}: {len(display)} names for the {len(classes)} classes of classes.txt")
    name = {"train": "train", "val": "test", "validation": "test", "test": "test", None: "test"}.get(split)
    if name is None:
        raise DataLayoutError(f"{root}: Food-101 has splits train and test (val reads test); not {split!r}")
    listing = meta / f"{name}.txt"
    if not listing.is_file():
        raise DataLayoutError(f"{root}: {listing.name} is missing from meta/")
    index = {c: i for i, c in enumerate(classes)}
    paths, labels = [], []
    for number, line in enumerate(listing.read_text(encoding="utf-8").splitlines(), start=1):
        entry = line.strip()
        if not entry:
            continue
        cls = entry.split("/", 1)[0]
        if cls not in index:
            raise DataLayoutError(f"{listing}:{number}: class {cls!r} is not in classes.txt")
        paths.append(f"images/{entry}{'' if os.path.splitext(entry)[1] else '.jpg'}")
        labels.append(index[cls])
    return ListedSource(root, paths, labels, classes, layout="food101", synonyms=[[d] for d in display], **kwargs)


# ------------------------------------------------------------------------------ the table of layouts


@dataclass(frozen=True)
class Layout:
    """One release layout: its name (what ``data stats`` prints, what ``layout=NAME`` forces), how it
    is recognised from what is on disk, how it opens, and the splits it keeps in files (``None``: the
    folder is one split, chosen by the folder the user names). A new layout is one entry of
    :data:`RELEASES`."""

    name: str
    recognises: Callable[[Path], bool]
    open: Callable[..., ListedSource]  # (path, split, **kwargs: min_size_hint, max_pixels, pixels)
    splits: Callable[[Path], list[str]] | None = None


RELEASES: tuple[Layout, ...] = (  # in the order they are tried
    Layout("objectnet", lambda path: objectnet_root(path) is not None, open_objectnet),
    # Food-101 has no val split: what selects on val then says it selected on test.
    Layout("food101", lambda path: food101_root(path) is not None, open_food101, splits=lambda path: ["train", "test"]),
    Layout("inaturalist", _looks_like_inat, open_inaturalist, splits=inat_splits),
    Layout("imagenet-v2", looks_like_imagenet_v2, open_imagenet_v2),
    Layout("imagenet-val", looks_like_imagenet_val, open_imagenet_val),
)
LAYOUTS = tuple(layout.name for layout in RELEASES)


def _recognised(path: Path) -> Layout | None:
    if not path.is_dir():
        return None
    return next((layout for layout in RELEASES if layout.recognises(path)), None)


def detect_layout(path: Path, split: str | None = None) -> str | None:
    """The release layout ``path`` is in (one of :data:`LAYOUTS`), or None for a generic folder."""
    layout = _recognised(path)
    return None if layout is None else layout.name


def layout_splits(path: Path) -> list[str] | None:
    """Splits a layout that keeps them in files (iNaturalist, Food-101) offers; None for the others."""
    if not path.is_dir():
        return None
    for layout in RELEASES:
        if layout.splits is not None and layout.recognises(path):
            return layout.splits(path)
    return None


def open_layout(path: str | os.PathLike, layout: str, split: str | None = None, **kwargs: Any) -> ListedSource:
    """Read ``path`` as the release layout ``layout`` (kwargs: ``min_size_hint``, ``max_pixels``, ``pixels``)."""
    path = Path(path)
    chosen = next((entry for entry in RELEASES if entry.name == layout), None)
    if chosen is None:
        raise ValueError(f"unknown layout {layout!r}; choose from {', '.join(LAYOUTS)}")
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such dataset folder")
    return chosen.open(path, split, **kwargs)


# ------------------------------------------------------------------------------ one class space


def labels_present(source: Any, task: str) -> set[int]:
    """Class indices of ``task`` that some sample of ``source`` carries (annotations only, no pixels)."""
    stored = getattr(source, "_labels", None)
    if isinstance(stored, np.ndarray) and task in (getattr(source, "class_names", None) or {}):
        return {int(v) for v in np.unique(stored) if v >= 0}
    found = set()
    for index in range(len(source)):
        try:
            labels = source.annotation(index).labels if hasattr(source, "annotation") else source.get(index).labels
        except BadSample:
            continue
        if task in labels:
            found.add(int(labels[task]))
    return found


class AlignedSource:
    """``source`` with the labels of ``task`` renumbered into another list of class ids (by id), so two
    splits (ImageNet train folders and a flat val labelled in the standard 1000-class space) share
    one class index. Every other attribute is the wrapped source's."""

    _labels = None  # the wrapped source's stored labels are in its own numbering: read annotations instead

    def __init__(self, source: Any, task: str, class_ids: Sequence[str]):
        own = [str(c) for c in source.class_names[task]]
        target = {str(c): i for i, c in enumerate(class_ids)}
        missing = sorted(own[i] for i in labels_present(source, task) if own[i] not in target)
        if missing:
            raise DataLayoutError(f"{source!r} has images of {len(missing)} class(es) the other split lacks: "
                                  f"{', '.join(missing[:5])}")
        self.source = source
        self.task = task
        self._lookup = np.asarray([target.get(c, -1) for c in own], dtype=np.int64)
        self.class_names = {**source.class_names, task: [str(c) for c in class_ids]}
        self.num_classes_by_task = {**getattr(source, "num_classes_by_task", {}), task: len(class_ids)}
        synonyms = (getattr(source, "synonyms", None) or {}).get(task)
        self.synonyms = {}
        if synonyms:
            by_id = dict(zip(own, synonyms, strict=True))
            if all(c in by_id for c in self.class_names[task]):
                self.synonyms = {task: [by_id[c] for c in self.class_names[task]]}

    def _relabel(self, labels: dict[str, int]) -> dict[str, int]:
        if self.task not in labels:
            return labels
        return {**labels, self.task: int(self._lookup[labels[self.task]])}

    def __len__(self) -> int:
        return len(self.source)

    def get(self, index: int) -> Record:
        record = self.source.get(index)
        record.labels = self._relabel(record.labels)
        return record

    __getitem__ = get

    def annotation(self, index: int) -> Annotation:
        annotation = self.source.annotation(index)
        return Annotation(annotation.key, annotation.hashtags, annotation.caption, self._relabel(annotation.labels))

    def __getattr__(self, name: str) -> Any:
        if name == "source":
            raise AttributeError(name)
        return getattr(self.source, name)

    def __repr__(self) -> str:
        return repr(self.source)


def align_classes(source: Any, task: str, class_ids: Sequence[str]) -> Any:
    """``source`` itself when its classes of ``task`` are ``class_ids`` already, else an :class:`AlignedSource`."""
    if [str(c) for c in source.class_names[task]] == [str(c) for c in class_ids]:
        return source
    return AlignedSource(source, task, class_ids)


# ------------------------------------------------------------------------------ ReaL


class RealLabels:
    """ImageNet-ReaL's valid classes (WordNet ids) per validation image, looked up by file name.

    ``path``: a ``real.json`` (one list of standard class indices per validation image, in
    file-name order: entry 0 is ``ILSVRC2012_val_00000001``) or ``builtin`` (the copy timm
    ships). :meth:`of` returns None for an image ReaL leaves out (an empty list)."""

    def __init__(self, path: str | os.PathLike = "builtin"):
        if str(path) == "builtin":
            from importlib import resources

            text = resources.files("timm.data").joinpath("_info", "imagenet_real_labels.json").read_text()
            self.origin = "builtin (timm's imagenet_real_labels.json)"
        else:
            text = Path(path).read_text(encoding="utf-8")
            self.origin = str(path)
        try:
            table = json.loads(text)
        except json.JSONDecodeError as error:
            raise DataLayoutError(f"{self.origin}: malformed JSON ({error.msg})") from None
        if not isinstance(table, list) or not all(isinstance(row, list) for row in table):
            raise DataLayoutError(f"{self.origin}: expected a list of lists of class indices")
        wnids = imagenet_wnids()
        self.table = [[wnids[int(i)] for i in row] if row else None for row in table]

    def of(self, key: str) -> list[str] | None:
        name = Path(key).name
        match = IMAGENET_VAL_FILE.match(name)
        if match is None:
            raise DataLayoutError(f"ReaL labels follow ImageNet's validation file names (ILSVRC2012_val_00000001.JPEG"
                                  f", ...); {name} is not one")
        number = int(match.group(1))
        if not 1 <= number <= len(self.table):
            raise DataLayoutError(f"{self.origin} has {len(self.table)} entries; {name} is image {number}")
        return self.table[number - 1]


__all__ = ["AlignedSource", "DataLayoutError", "LAYOUTS", "ListedSource", "align_classes", "detect_layout",
           "imagenet_wnids", "layout_splits", "open_layout", "RealLabels"]

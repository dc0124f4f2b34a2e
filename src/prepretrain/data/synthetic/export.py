"""The embedded synthetic dataset written to disk: image files plus manifests, or the rehearsal layout.

The folder, manifest and shard readers and the ``data`` command need real files whose correct
annotations are known (:func:`write_synthetic`); a paper pipeline config can be rehearsed on CPU
on the paper's data layout, small (:func:`write_rehearsal_data`).
"""

from __future__ import annotations

import json
from pathlib import Path

from prepretrain.data.shards.write import write_shards
from prepretrain.data.synthetic.images import (
    CLASS_NAMES,
    HASHTAG_VOCAB,
    SYNONYMS,
    SyntheticSource,
    synthetic_split_sizes,
)
from prepretrain.files import atomic_path, write_text


def write_synthetic(
    out_dir: str | Path,
    num_images: int = 4000,
    image_size: int = 32,
    seed: int = 0,
    splits: tuple[str, ...] | list[str] = ("train", "val", "test"),
    sizes: dict[str, int] | None = None,
    image_format: str = "png",
) -> Path:
    """Export the synthetic dataset to files: ``<split>/images/00000000.<ext>`` plus one JSONL
    manifest per split (``<split>.jsonl``: path relative to ``out_dir``, hashtags, caption,
    labels) and ``classes.json`` (class names, synonyms, hashtag vocabulary).

    Why: the folder/manifest/shard readers and the ``data`` command need real files whose
    correct annotations are known. ``sizes`` overrides
    :func:`~prepretrain.data.synthetic.images.synthetic_split_sizes`.
    """
    fmt = image_format.lower().lstrip(".")
    if fmt == "jpeg":
        fmt = "jpg"
    if fmt not in ("png", "jpg"):
        raise ValueError(f"image_format must be 'png' or 'jpg', got {image_format!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    default_sizes = synthetic_split_sizes(num_images)
    sizes = dict(sizes or {})
    for split in splits:
        count = sizes.get(split, default_sizes.get(split, num_images))
        source = SyntheticSource(count, image_size=image_size, seed=seed, split=split)
        image_dir = out / split / "images"
        image_dir.mkdir(parents=True, exist_ok=True)
        manifest = out / f"{split}.jsonl"
        # Written under a temporary name: a manifest exists only once all its images do.
        with atomic_path(manifest) as temporary, open(temporary, "w", encoding="utf-8") as lines:
            for index in range(count):
                record = source.get(index)
                relative = f"{split}/images/{index:08d}.{fmt}"
                if fmt == "png":
                    record.image.save(out / relative, format="PNG", compress_level=1)
                else:
                    record.image.save(out / relative, format="JPEG", quality=95)
                entry = {
                    "path": relative,
                    "hashtags": record.hashtags,
                    "caption": record.caption,
                    "labels": record.labels,
                }
                lines.write(json.dumps(entry) + "\n")
    classes = {
        "class_names": CLASS_NAMES,
        "synonyms": SYNONYMS,
        "hashtag_vocab": HASHTAG_VOCAB,
        "image_size": image_size,
        "seed": seed,
    }
    write_text(out / "classes.json", json.dumps(classes, indent=1))  # ASCII: json.dumps escapes the rest
    return out





def write_rehearsal_data(out_dir: str | Path, num_images: int = 3000, image_size: int = 32, seed: int = 0,
                         samples_per_shard: int = 500) -> dict[str, str]:
    """The data layout of a paper-scale run, small: pretraining images with hashtags and captions
    as WebDataset shards (``pretrain/{train,val}/shard-NNNNNN.tar`` + ``index.json``, JPEG), and a labelled
    evaluation set as an image folder (``eval/{train,val,test}/<class name>/<n>.png``, the
    synthetic coarse classes, drawn with another seed than the pretraining images).

    Returns ``{"data": <shards folder>, "eval_data": <folder>}``: what a pipeline config
    points at. Why: a paper pipeline config can then run end to end on CPU with only model size
    and budgets overridden (``prepretrain data rehearsal``), before a cluster sees it.
    """
    out = Path(out_dir)
    for split, count in synthetic_split_sizes(num_images).items():
        if split != "test":  # train: what the stages learn from; val: WSP's held-out tag precision
            source = SyntheticSource(count, image_size=image_size, seed=seed, split=split)
            write_shards(source, out / "pretrain" / split, samples_per_shard=samples_per_shard, image_format="jpg",
                         overwrite=True, shuffle_seed=seed, verbose=False)
    eval_sizes = synthetic_split_sizes(max(200, num_images // 2))
    for split, count in eval_sizes.items():
        source = SyntheticSource(count, image_size=image_size, seed=seed + 1, split=split)
        names = source.class_names["coarse"]
        for index in range(count):
            record = source.get(index)
            folder = out / "eval" / split / names[int(record.labels["coarse"])]
            folder.mkdir(parents=True, exist_ok=True)
            with atomic_path(folder / f"{index:06d}.png") as tmp:
                record.image.save(tmp, format="PNG")
    return {"data": str(out / "pretrain"), "eval_data": str(out / "eval")}

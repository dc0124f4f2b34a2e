"""From a path (the CLI's ``data=PATH``) or ``synthetic`` to the reader that reads it.

:func:`open_source` recognises a release layout, shards, a manifest, a split folder, an image
folder or a plain folder; :func:`open_data` adds the embedded synthetic set and a joined
metadata table; :func:`open_stage_data` reads a training config's data keys;
:func:`source_format` names what was opened. The readers themselves never import this module.
"""


import functools
import os
from pathlib import Path
from typing import Any

from prepretrain.config import TEXT_SOURCE_KEYS
from prepretrain.data.images.decode import IMAGE_EXTENSIONS
from prepretrain.data.readers.folders import MANIFEST_SUFFIXES, FolderSource, ImageFolderSource, ManifestSource
from prepretrain.data.readers.metadata import join_metadata
from prepretrain.data.readers.releases import LAYOUTS, ListedSource, detect_layout, layout_splits, open_layout
from prepretrain.data.records import MapSource
from prepretrain.data.shards.reader import SHARD_SUFFIXES, ShardSource, expand_shard_spec
from prepretrain.data.synthetic.images import SyntheticSource, synthetic_split_sizes

# -- choosing a source from a path ----------------------------------------------------------

# Names a dataset directory uses for its splits; a directory that has some of them but not
# the requested one is an error, not a silent fallback to "all images" (a val split that is
# secretly the train set is the worst kind of evaluation bug).
SPLIT_NAMES = ("train", "val", "validation", "test", "eval", "dev")


def _has_image(directory: Path) -> bool:
    for _, subdirs, files in os.walk(directory):
        subdirs[:] = [name for name in subdirs if not name.startswith(".")]
        if any(not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS for name in files):
            return True
    return False


def _looks_like_image_folder(root: Path) -> bool:
    """All non-hidden children are directories holding images, and no image sits in ``root``."""
    children = [entry for entry in os.scandir(root) if not entry.name.startswith(".")]
    directories = [Path(entry.path) for entry in children if entry.is_dir()]
    loose_images = [
        entry for entry in children if entry.is_file() and os.path.splitext(entry.name)[1].lower() in IMAGE_EXTENSIONS
    ]
    return bool(directories) and not loose_images and all(_has_image(path) for path in directories)


def _shard_files(directory: Path) -> list[Path]:
    return sorted(path for path in directory.iterdir() if path.is_file() and path.name.lower().endswith(SHARD_SUFFIXES))


def open_source(
    spec: str | os.PathLike, *, split: str | None = None, kind: str | None = None,
    hashtag_field: str = "hashtags", caption_field: str = "caption", **kwargs: Any,
) -> FolderSource | ImageFolderSource | ManifestSource | ShardSource | ListedSource:
    """Pick and build a source from a path (the CLI's ``data=PATH``).

    Resolution, in order:

    - a directory in one of the benchmarks' release layouts (:mod:`prepretrain.data.readers.releases`:
      ImageNet's flat validation folder, ImageNet-v2, ObjectNet, iNaturalist, Food-101) -> a
      :class:`~prepretrain.data.readers.releases.ListedSource` that reads it as released;
    - a brace pattern (``shards-{000000..000009}.tar``), a ``.tar`` file, or a directory
      holding ``.tar`` files -> :class:`~prepretrain.data.shards.reader.ShardSource` (iterable);
    - a ``.jsonl``/``.ndjson``/``.csv``/``.tsv`` file -> :class:`~prepretrain.data.readers.folders.ManifestSource`;
    - a directory with ``<split>.jsonl`` (or ``.csv``) -> that manifest; with a ``<split>/``
      subdirectory -> resolved again inside it. If the directory has *other* splits but not
      the requested one, that is an error rather than a fallback to every image in it;
    - a directory whose immediate children are all directories with images ->
      :class:`~prepretrain.data.readers.folders.ImageFolderSource`;
    - any other directory -> :class:`~prepretrain.data.readers.folders.FolderSource`.

    ``kind`` (``"folder"``, ``"imagefolder"``, ``"manifest"``, ``"shards"``, or a release
    layout's name) overrides the guess for layouts that are ambiguous, e.g. ``photos/2023/...``
    is *not* a class per year. ``hashtag_field`` / ``caption_field`` name the annotation fields of shards (``.json``
    members, e.g. ``tags`` of img2dataset user columns) and manifests; folders have none, so
    they ignore them. Other keyword arguments (``min_size_hint``, ``max_pixels``, ``pixels``;
    ``index`` for shards) go to the source.
    The string ``"synthetic"`` is handled by :func:`open_data`, not here.
    """
    text = os.fspath(spec)
    fields = {"hashtag_field": hashtag_field, "caption_field": caption_field}
    builders = {
        "folder": FolderSource,
        "imagefolder": ImageFolderSource,
        "manifest": functools.partial(ManifestSource, **fields),
        "shards": functools.partial(ShardSource, **fields),
    }
    if kind is not None:
        if kind in LAYOUTS:
            return open_layout(text, kind, split, **kwargs)
        if kind not in builders:
            raise ValueError(f"unknown source kind {kind!r}; choose from {sorted(builders) + list(LAYOUTS)}")
        return builders[kind](text, **kwargs)
    if "{" in text and "}" in text:
        expanded = expand_shard_spec(text)
        return ShardSource(expanded, **fields, **kwargs)
    path = Path(text)
    if not path.exists():
        raise FileNotFoundError(f"data source not found: {text}")
    if path.is_file():
        name = path.name.lower()
        if name.endswith(SHARD_SUFFIXES):
            return ShardSource(text, **fields, **kwargs)
        if name.endswith(MANIFEST_SUFFIXES):
            return ManifestSource(path, **fields, **kwargs)
        raise ValueError(
            f"{text}: cannot tell what this file is; expected a manifest {MANIFEST_SUFFIXES} or shards {SHARD_SUFFIXES}"
        )
    layout = detect_layout(path, split)
    if layout is not None and (layout_splits(path) is not None or split is None or not (path / split).is_dir()):
        return open_layout(path, layout, split, **kwargs)
    if split is not None:
        for suffix in MANIFEST_SUFFIXES:
            manifest = path / f"{split}{suffix}"
            if manifest.is_file():
                return ManifestSource(manifest, **fields, **kwargs)
        if (path / split).is_dir():
            return open_source(path / split, **fields, **kwargs)
        present = sorted(
            {
                name
                for name in SPLIT_NAMES
                if (path / name).is_dir() or any((path / f"{name}{suffix}").is_file() for suffix in MANIFEST_SUFFIXES)
            }
        )
        if present:
            raise FileNotFoundError(f"{text} has splits {present} but no {split!r} split")
    if _shard_files(path):
        return ShardSource(text, **fields, **kwargs)
    if _looks_like_image_folder(path):
        return ImageFolderSource(path, **kwargs)
    return FolderSource(path, **kwargs)


def source_format(source: Any) -> str:
    """What a source is, in the words ``data stats`` and ``classify`` print: a release layout's name
    (``imagenet-v2``, ``objectnet``, ...) or ``imagefolder``, ``folder``, ``manifest``, ``shards``, ``synthetic``."""
    source = getattr(source, "source", source)  # an AlignedSource is its source renumbered
    kinds = ((ListedSource, None), (ImageFolderSource, "imagefolder"), (FolderSource, "folder"),
             (ManifestSource, "manifest"), (ShardSource, "shards"), (SyntheticSource, "synthetic"))
    for kind, name in kinds:
        if isinstance(source, kind):
            return name or source.layout
    return type(source).__name__


def open_data(spec: str, *, split: str = "train", image_size: int = 32, num_images: int = 4000, seed: int = 0,
              min_size_hint: int | None = None, pixels: str = "pil", hashtag_field: str = "hashtags",
              caption_field: str = "caption", metadata: str = "", metadata_key: str = "") -> MapSource | Any:
    """``synthetic`` -> the embedded dataset; anything else -> a folder, manifest or shards.

    ``min_size_hint`` (e.g. ``transforms.decode_hint(image_size, min_crop_scale)``) reaches
    every file-based source, which decodes JPEGs at the smallest DCT scale (1/2, 1/4, 1/8)
    whose shorter side still covers it. The synthetic set is drawn at ``image_size``.
    ``pixels="tensor"``: file sources return ``uint8`` ``(3, H, W)`` tensors in
    ``Record.image`` (``decode.load_tensor``, faster) for tensor transforms such as
    ``gpu.TensorRandomResizedCrop``; the synthetic set always returns PIL images, which
    those transforms also take. ``hashtag_field`` / ``caption_field``: the fields of shard
    ``.json`` members and manifest rows holding the hashtags and the caption (see
    :func:`open_source`); the synthetic set has its own. ``metadata``: a table joined to the
    images by key (``metadata_key``: the shard ``.json`` field that holds it), see
    :mod:`prepretrain.data.readers.metadata`.
    """
    if spec == "synthetic":
        sizes = synthetic_split_sizes(num_images)
        source = SyntheticSource(num_images=sizes[split], image_size=image_size, seed=seed, split=split)
    else:
        source = open_source(spec, split=split, min_size_hint=min_size_hint, pixels=pixels,
                             hashtag_field=hashtag_field, caption_field=caption_field)
    return join_metadata(source, metadata, metadata_key) if metadata else source


def open_stage_data(cfg: Any, split: str = "train", **kwargs: Any) -> MapSource | Any:
    """The ``split`` of a training config's data (``data``, ``image_size``, ``num_images``, and for
    the stages that read text, :data:`~prepretrain.config.TEXT_SOURCE_KEYS`: the annotation fields
    ``hashtag_field`` / ``caption_field`` and the joined ``metadata`` table); ``kwargs`` as
    :func:`open_data`'s."""
    text = {key: getattr(cfg, key) for key in TEXT_SOURCE_KEYS if hasattr(cfg, key)}
    return open_data(cfg.data, split=split, image_size=cfg.image_size, num_images=cfg.num_images, **text, **kwargs)

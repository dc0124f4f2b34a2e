"""Encoded motion clips on disk: ``prepretrain data synth --video``.

The embedded motion dataset (:class:`~.video.SyntheticVideos`) is drawn frame by frame in
memory; this writes a dataset of the same kind as real video files (PyAV), in the class-folder
layout ``root/{train,val,test}/<direction>/<name>.<ext>``, so the file path of ``prepretrain
video`` (container demuxing, codec decoding, frame rates, resizing at decode time) can be tried
end to end without downloading anything.

Each clip: a disc cut out of one photo slides right, left, down or up over another photo,
wrapping around the frame, from a uniformly random start at a random speed. The photos are
images of the embedded image dataset (:class:`~.synthetic.SyntheticSource`), scaled to the clip
size; appearance never depends on the class, so a single frame cannot tell the class and a
clip can. Lossy codecs blur the disc's edge a little, as real footage does.

The disc's photo is lightened and the background's darkened (as the embedded motion set's shapes
are brighter than their background), so the disc's edge has one sign of contrast. Measured on
2026-12-07 (docs/video.md): with discs of either contrast (two photos as they are) the default
``prepretrain video`` run (a random-init ``vit_micro4`` at 16 px) stayed at chance through its 400
steps, and through 120 to 360 steps in each variant tried (faster discs, ``motion_init`` 1 or 3, an
encoder from the MAE demo); on lightened discs it left chance by step 160 and reached top-1 99.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from prepretrain.data.synthetic.images import SyntheticSource
from prepretrain.data.video.clips import DIRECTION_STEPS, DIRECTIONS
from prepretrain.data.video.encode import encode_clip


def motion_clip(index: int, split: str, *, size: int = 64, frames: int = 16, seed: int = 0,
                speed: tuple[float, float] = (0.03, 0.06),
                photos: SyntheticSource | None = None) -> tuple[str, np.ndarray]:
    """(direction, frames (T, size, size, 3) uint8) of clip ``index`` of ``split``: a pure function of
    them. ``speed``: the range the disc's speed is drawn from, in frame sizes per frame."""
    rng = np.random.default_rng([seed, zlib.crc32(split.encode()), index])
    direction = DIRECTIONS[index % len(DIRECTIONS)]
    photos = photos or SyntheticSource(1000, image_size=32, seed=seed, split=split)
    background, texture = (np.asarray(photos.get(int(i)).image.convert("RGB").resize((size, size), Image.BILINEAR),
                                      np.float32) for i in rng.choice(len(photos), 2, replace=False))
    background = background * 0.6  # a darkened photo under a lightened one: see the module docstring
    texture = texture * 0.5 + 128
    radius = rng.uniform(0.15, 0.25) * size
    yy, xx = np.mgrid[0:size, 0:size]
    disc = np.hypot(yy - size / 2, xx - size / 2) <= radius  # centred; rolled into place per frame
    start = rng.integers(0, size, 2)
    step = np.array(DIRECTION_STEPS[direction], float) * rng.uniform(*speed) * size  # pixels per frame
    out = np.empty((frames, size, size, 3), np.uint8)
    for t in range(frames):
        shift = tuple(int(v) for v in np.round(start + step * t))
        mask = np.roll(disc, shift, axis=(0, 1))
        content = np.roll(texture, shift, axis=(0, 1))  # the disc's photo moves with it
        out[t] = np.where(mask[..., None], content, background).astype(np.uint8)
    return direction, out


def write_motion_clips(out: str | Path, *, num_videos: int = 1200, size: int = 64, frames: int = 16, fps: int = 8,
                       seed: int = 0, speed: tuple[float, float] = (0.03, 0.06),
                       suffixes: tuple[str, ...] = (".mp4",), held_out: int = 0) -> Path:
    """Write ``num_videos`` training clips and ``held_out`` each for val and test (default
    ``max(64, num_videos // 5)``, the sizes of the embedded motion dataset) under ``out``; clip
    ``i`` of a split uses the suffix ``suffixes[i % len(suffixes)]``. Returns ``out``."""
    root = Path(out)
    held_out = held_out or max(64, num_videos // 5)
    for split, count in (("train", num_videos), ("val", held_out), ("test", held_out)):
        photos = SyntheticSource(1000, image_size=32, seed=seed, split=split)
        for direction in DIRECTIONS:
            (root / split / direction).mkdir(parents=True, exist_ok=True)
        for index in range(count):
            direction, clip = motion_clip(index, split, size=size, frames=frames, seed=seed, speed=speed,
                                          photos=photos)
            encode_clip(root / split / direction / f"{index:06d}{suffixes[index % len(suffixes)]}", clip, fps)
    return root

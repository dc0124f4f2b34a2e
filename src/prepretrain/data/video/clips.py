"""Video data: sources of labeled videos, clip sampling, multi-view evaluation, mixing clips.

Why a module of its own: a video sample is not a decoded image but a *file plus a choice of
frames*. Decoding a whole 10 s Kinetics video to use 16 of its 300 frames would dominate the
run, so a source hands out a cheap reference (:class:`VideoRef`) and the stage's transform,
running in the loader under the per-sample seeds, asks it for exactly the frames it samples
(:meth:`VideoRef.frames`). A video that cannot be opened, holds no decodable frame or (with
``short_videos="skip"``) is too short raises :class:`~.records.BadSample` there, so the
training loop counts and skips it like an unreadable image.

Sources (:func:`open_video_data`):

* ``synthetic`` (the default): :class:`SyntheticVideos`, drawn in memory from a seed. Its
  classes are *motions*: a random shape drifts right, left, down or up (task ``direction``;
  task ``motion`` also tells slow from fast). Every start position is equally likely and the
  motion wraps around the frame, so any single frame has the same distribution in every class:
  one frame cannot solve it, a clip can.
* a folder of videos by class: ``root/<split>/<class>/<name>.mp4|webm|avi|mkv|mov``.
* Kinetics annotation CSVs as the dataset ships them (``label,youtube_id,time_start,time_end,
  split``; ``train.csv``, ``validate.csv``/``val.csv``, ``test.csv``) in the data folder; the
  file of a row is ``<youtube_id>_<time_start:06d>_<time_end:06d>.<ext>`` anywhere under
  ``video_dir`` (default: the data folder; flat or ``<split>/<label>/`` both work).
* Something-Something v2 as it ships: ``something-something-v2-{train,validation}.json``
  (lists of ``{"id", "label", "template", "placeholders"}``) and
  ``something-something-v2-labels.json`` (template name -> index); the file of an entry is
  ``<id>.webm`` under ``video_dir``. Its test split has no public labels, so the validation
  split is both selected on and reported (``selection_is_test``), as papers report SSv2.
  The ``labels/`` folder of the 20BN download (``labels.json``, ``train.json``,
  ``validation.json``) is read the same way.
* video lists as the reference repos write them: ``{train,val,test}.csv|txt`` with one
  ``path label`` per line, space separated and header-less (PySlowFast, VideoMAE, MMAction), a
  ``path,label`` CSV with or without its header, or ``.jsonl`` lines ``{"path": ..., "label": ...}``;
  a label is a class name or an integer index, a relative path is relative to the list's folder
  (or to ``video_dir`` when given).

Split roles: ``train`` trains, ``val`` selects the best checkpoint, ``test`` is reported; a
dataset without a test split reports on ``val`` and says so. Rows whose file is missing are
counted per split and dropped with a printed note; more than ``max_missing_fraction`` of a
split missing refuses to start (a wrong ``video_dir`` must not become a tiny dataset).

Clip sampling (``sampling=dense``, the Kinetics recipes) follows PySlowFast: ``num_frames``
frames ``frame_stride`` apart; training takes a random start, evaluation ``temporal_views``
starts spread evenly over the video, each with ``spatial_views`` crops (1: center; 3: both ends
and the center of the long side) after resizing the short side to ``image_size``; the stage
averages the views' logits.
Videos shorter than a clip are padded with their last frame (``short_videos="pad"``, as
PySlowFast clamps indices) or counted as ``too_short`` and skipped (``short_videos="skip"``).
``sampling=segment`` (the SSv2 recipes) takes one frame from each of ``num_frames`` equal segments
of the whole video instead (:func:`segment_indices`); ``frame_stride`` is then unused.

Training augmentation (:class:`TrainClip`) treats a clip as one image: one random-resized crop,
flip, RandAugment draw (:class:`ClipRandAugment`) and erasing box (:func:`erase_clip`) for all
its frames, as the MAE-ST and VideoMAE finetuning recipes do; repeated augmentation returns
several such clips of one video.
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
import re
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data.auto_augment import rand_augment_transform
from timm.data.random_erasing import RandomErasing

from prepretrain.config import ConfigError
from prepretrain.data.images.decode import IMAGE_EXTENSIONS
from prepretrain.data.images.transforms import ZeroBitPosterize
from prepretrain.data.records import BadSample

VIDEO_EXTENSIONS = (".mp4", ".webm", ".avi", ".mkv", ".mov", ".m4v")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SHORT_VIDEO_POLICIES = ("pad", "skip")
SEEK_AFTER_FRAMES = 64  # decode from the start up to here; seek to a later first frame
ROLES = ("train", "val", "test")

# (total frames, frames per second or 0 when unknown) -> the frame indices wanted (any order, repeats ok)
FramePicker = Callable[[int, float], Sequence[int]]


# ------------------------------------------------------------------------------ sources


class VideoSource(Protocol):
    """What every video source offers: labels and keys cheaply, frames on request."""

    class_names: list[str]

    def __len__(self) -> int: ...

    def label(self, index: int) -> int: ...

    def key(self, index: int) -> str: ...

    def read(self, index: int, pick: FramePicker, short_videos: str = "pad", short_side: int = 0) -> np.ndarray:
        """(len(pick(total, fps)), H, W, 3) uint8 frames of video ``index``, or raise BadSample;
        ``short_side > 0``: frames larger than that are scaled down to it while decoding."""
        ...


@dataclass
class VideoRef:
    """One video as the loader sees it: its key and label now, its frames when the transform asks."""

    source: Any
    index: int
    key: str
    label: int

    def frames(self, pick: FramePicker, short_videos: str = "pad", short_side: int = 0) -> np.ndarray:
        return self.source.read(self.index, pick, short_videos, short_side)


PADDING_LABEL = -1  # the label of an evaluation share's padding item: read like the others, counted nowhere


class RefSource:
    """A video source as a map-style record source (``get`` -> :class:`VideoRef`), so
    :class:`~.loader.RecordDataset` seeds, counts and batches videos like images.

    ``rank``/``world_size``: one rank's share for evaluation, videos ``rank, rank + world_size,
    ...``, padded to ``ceil(n / world_size)`` items with the last video labelled
    :data:`PADDING_LABEL`. Every rank then runs the same number of forward passes (FSDP's are
    collective) and each video is counted on exactly one rank."""

    def __init__(self, videos: Any, rank: int = 0, world_size: int = 1):
        self.videos = videos
        share = -(-len(videos) // world_size)
        self.indices = range(rank, share * world_size, world_size)

    def __len__(self) -> int:
        return len(self.indices)

    def get(self, item: int) -> VideoRef:
        index = self.indices[item]
        if index >= len(self.videos):
            last = len(self.videos) - 1
            return VideoRef(self.videos, last, self.videos.key(last), PADDING_LABEL)
        return VideoRef(self.videos, index, self.videos.key(index), self.videos.label(index))


# ---- synthetic


DIRECTIONS = ("right", "left", "down", "up")
DIRECTION_STEPS = {"right": (0, 1), "left": (0, -1), "down": (1, 0), "up": (-1, 0)}  # (rows, columns)
SPEEDS = ("slow", "fast")
_SPEED_PIXELS = {"slow": 1, "fast": 3}
SYNTHETIC_TASKS = ("direction", "motion")
_SHAPES = ("square", "disc", "cross", "triangle", "ring")


def synthetic_video_sizes(num_videos: int) -> dict[str, int]:
    """Train ``num_videos``; val and test ``max(64, num_videos // 5)`` each."""
    held_out = max(64, num_videos // 5)
    return {"train": num_videos, "val": held_out, "test": held_out}


def _shape_mask(kind: str, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    c = (size - 1) / 2
    r = np.hypot(yy - c, xx - c)
    if kind == "square":
        return np.ones((size, size), bool)
    if kind == "disc":
        return r <= size / 2
    if kind == "ring":
        return (r <= size / 2) & (r >= size / 4)
    if kind == "cross":
        third = max(1, size // 3)
        band = slice(third, size - third)
        mask = np.zeros((size, size), bool)
        mask[band, :] = True
        mask[:, band] = True
        return mask
    return np.abs(xx - c) <= yy / 2  # triangle, apex up


class SyntheticVideos:
    """Procedural clips whose label is a motion (see the module docstring).

    Every video is a pure function of ``(seed, split, index)``: a static textured background,
    one shape of random kind, colour and size (appearance never depends on the label), moving
    ``speed`` pixels per frame in the label's direction and wrapping around the frame, from a
    uniformly random start; half the videos also hold a static distractor shape; each frame
    gets a little independent noise. Labels come in seeded blocks, so classes are balanced.
    """

    def __init__(self, num_videos: int, split: str = "train", *, task: str = "direction", seed: int = 0,
                 size: int = 32, length: int = 32):
        if task not in SYNTHETIC_TASKS:
            raise ValueError(f"synthetic video tasks are {', '.join(SYNTHETIC_TASKS)}; got '{task}'")
        self.num_videos, self.split, self.task, self.seed = num_videos, split, task, seed
        self.size, self.length = size, length
        self.class_names = (list(DIRECTIONS) if task == "direction"
                            else [f"{speed} {direction}" for direction in DIRECTIONS for speed in SPEEDS])

    def __len__(self) -> int:
        return self.num_videos

    def _rng(self, index: int, stream: str) -> np.random.Generator:
        salt = zlib.crc32(f"{self.split}/{stream}".encode())
        return np.random.default_rng([self.seed, salt, index])

    def label(self, index: int) -> int:
        classes = len(self.class_names)
        block, offset = divmod(index, classes)
        return int(self._rng(block, "labels").permutation(classes)[offset])

    def key(self, index: int) -> str:
        return f"synthetic-video/{self.split}/{index}"

    def motion(self, index: int) -> tuple[str, int]:
        """(direction, pixels per frame) of video ``index``."""
        name = self.class_names[self.label(index)]
        if self.task == "direction":
            return name, int(self._rng(index, "speed").integers(1, 3))  # 1 or 2 px: a nuisance, not a class
        speed, direction = name.split(" ")
        return direction, _SPEED_PIXELS[speed]

    def _shape(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(mask on the whole frame at the origin, colour, start offset) of one shape."""
        n = self.size
        side = int(rng.integers(max(3, n // 5), max(4, n // 3) + 1))
        mask = np.zeros((n, n), bool)
        mask[:side, :side] = _shape_mask(_SHAPES[int(rng.integers(len(_SHAPES)))], side)
        colour = rng.uniform(0.6, 1.0, 3)  # always brighter than the background
        return mask, colour, rng.integers(0, n, 2)

    def render(self, index: int, frames: Sequence[int] | None = None) -> np.ndarray:
        """Frames ``frames`` (default all ``length``) of video ``index``, (T, size, size, 3) uint8;
        a frame is the same whichever others are drawn with it."""
        rng, n = self._rng(index, "appearance"), self.size
        base = rng.uniform(0.0, 0.35, 3)  # a dark background with a faint static texture ...
        coarse = rng.uniform(-0.05, 0.05, (4, 4, 3))
        texture = np.kron(coarse, np.ones((math.ceil(n / 4), math.ceil(n / 4), 1)))[:n, :n]
        background = np.clip(base + texture, 0, 1)
        layers = [self._shape(rng)]  # ... a bright moving shape, then maybe a static distractor
        if rng.random() < 0.5:
            layers.append(self._shape(rng))
        direction, speed = self.motion(index)
        step = np.array(DIRECTION_STEPS[direction]) * speed
        noise = np.random.default_rng([self.seed, zlib.crc32(f"{self.split}/noise".encode()), index])
        grain = noise.normal(0, 0.02, (self.length, n, n, 3))  # one stream, frame by frame: any subset agrees
        wanted = range(self.length) if frames is None else frames
        out = np.empty((len(wanted), n, n, 3), np.float32)
        for slot, t in enumerate(wanted):
            frame = background.copy()
            for number, (mask, colour, start) in enumerate(layers):
                shift = start + (step * t if number == 0 else 0)
                frame[np.roll(mask, tuple(int(v) for v in shift), axis=(0, 1))] = colour
            out[slot] = frame + grain[t]
        return (np.clip(out, 0, 1) * 255 + 0.5).astype(np.uint8)

    def read(self, index: int, pick: FramePicker, short_videos: str = "pad", short_side: int = 0) -> np.ndarray:
        wanted = list(pick(self.length, 0.0))  # drawn frame by frame: no frame rate; already small
        return self.render(index, [min(max(i, 0), self.length - 1) for i in wanted])


# ---- files


def frame_count(stream: Any, container: Any) -> int:
    """Frames of a video stream from its metadata (no decoding): the stream's count when the
    container records one (mp4, avi), else duration x frame rate (webm, mkv); 0 when unknown."""
    if stream.frames:
        return int(stream.frames)
    rate = stream.average_rate or stream.guessed_rate
    if not rate:
        return 0
    if stream.duration and stream.time_base:
        seconds = float(stream.duration * stream.time_base)
    elif container.duration:
        seconds = container.duration / 1_000_000
    else:
        return 0
    return max(0, int(round(seconds * float(rate))))


def _rgb(frame: Any, short_side: int) -> np.ndarray:
    """A decoded frame as (H, W, 3) uint8, scaled down (area averaging, in libswscale) so its short
    side is ``short_side`` when it is larger: only the pixels the clip keeps are ever held."""
    height, width = frame.height, frame.width
    if short_side > 0 and min(height, width) > short_side:
        scale = short_side / min(height, width)
        size = (max(short_side, round(width * scale)), max(short_side, round(height * scale)))
        return frame.reformat(width=size[0], height=size[1], format="rgb24", interpolation="AREA").to_ndarray()
    return frame.to_ndarray(format="rgb24")


def decode_frames(path: str | Path, pick: FramePicker, *, key: str = "", short_videos: str = "pad",
                  short_side: int = 0) -> np.ndarray:
    """The frames ``pick(total, fps)`` asks for, decoded with PyAV, as (N, H, W, 3) uint8; with
    ``short_side > 0`` larger frames are scaled down to that short side as they are decoded.

    Decodes from the start, or seeks to the keyframe before the first wanted frame when it is
    far in, and stops after the last wanted frame. Indices come from presentation times.
    Frames past the end of a short or truncated file repeat the last decodable frame
    (``short_videos="pad"``) or make the video a ``too_short`` BadSample (``"skip"``).
    """
    import av  # the video extra; imported here so image-only installs never need it

    key = key or str(path)
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError, UnicodeDecodeError) as error:
        detail = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
        raise BadSample(key, "unreadable", detail) from None
    with container:
        if not container.streams.video:
            raise BadSample(key, "unreadable", "no video stream")
        stream = container.streams.video[0]
        total = frame_count(stream, container)
        rate = float(stream.average_rate or stream.guessed_rate or 0) or None
        wanted = [int(i) for i in pick(max(total, 1), rate or 0.0)]
        needed = set(wanted)
        last_needed = max(wanted)
        time_base = float(stream.time_base) if stream.time_base else None
        origin = stream.start_time or 0
        got: dict[int, np.ndarray] = {}
        last_frame, last_number = None, -1
        first = min(wanted)
        if first > SEEK_AFTER_FRAMES and rate and time_base:
            try:
                container.seek(origin + int(first / rate / time_base), stream=stream, backward=True, any_frame=False)
            except av.error.FFmpegError:
                container.seek(0)
        try:
            for sequential, frame in enumerate(container.decode(stream)):
                if frame.pts is not None and rate and time_base:
                    number = int(round((frame.pts - origin) * time_base * rate))
                else:
                    number = sequential
                last_frame, last_number = frame, number
                if number in needed:
                    got[number] = _rgb(frame, short_side)
                if number >= last_needed:
                    break
        except (av.error.FFmpegError, OSError):
            pass  # a truncated or damaged tail: keep what decoded
        last = _rgb(last_frame, short_side) if last_frame is not None and needed - set(got) else None
    if last_frame is None:
        raise BadSample(key, "unreadable", "no decodable frame")
    missing = sorted(needed - set(got))
    if missing:
        if short_videos == "skip":
            raise BadSample(key, "too_short", f"decoding ended at frame {last_number}; the clip needs frame "
                                              f"{missing[-1]}")
        for index in missing:  # past the end: the last frame (PySlowFast clamps); a gap: the nearest decoded
            if index > last_number or not got:
                got[index] = last
            else:
                got[index] = got[min(got, key=lambda h: abs(h - index))]
    return np.stack([got[i] for i in wanted])


@dataclass
class FileVideos:
    """Video files with labels: the folder, Kinetics, SSv2 and simple manifest sources."""

    paths: list[Path]
    labels: list[int]
    class_names: list[str]
    missing: list[str] = field(default_factory=list)  # rows whose file was not found

    def __len__(self) -> int:
        return len(self.paths)

    def label(self, index: int) -> int:
        return self.labels[index]

    def key(self, index: int) -> str:
        return str(self.paths[index])

    def read(self, index: int, pick: FramePicker, short_videos: str = "pad", short_side: int = 0) -> np.ndarray:
        return decode_frames(self.paths[index], pick, key=self.key(index), short_videos=short_videos,
                             short_side=short_side)


def _files_by_stem(root: Path) -> dict[str, Path]:
    """Every video file under ``root`` by its name without extension (one walk, any layout)."""
    found: dict[str, Path] = {}
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        for name in sorted(names):
            stem, ext = os.path.splitext(name)
            if ext.lower() in VIDEO_EXTENSIONS and not name.startswith("."):
                found.setdefault(stem, Path(directory) / name)
    return found


def kinetics_file_stem(youtube_id: str, time_start: str | float, time_end: str | float) -> str:
    """``<youtube_id>_<start:06d>_<end:06d>``: how the Kinetics downloaders name a clip."""
    return f"{youtube_id}_{int(float(time_start)):06d}_{int(float(time_end)):06d}"


def read_kinetics_csv(path: Path) -> list[tuple[str, str]]:
    """(file stem, label name) of each row of a Kinetics annotation CSV."""
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    required = {"label", "youtube_id", "time_start", "time_end"}
    if rows and not required <= set(rows[0]):
        raise ConfigError("data", f"{path}: a Kinetics CSV needs columns {sorted(required)}; has {sorted(rows[0])}")
    return [(kinetics_file_stem(r["youtube_id"], r["time_start"], r["time_end"]), r["label"].strip()) for r in rows]


def ssv2_template_name(template: str) -> str:
    """SSv2's class name of a template: ``"Putting [something] on a surface"`` -> without brackets."""
    return template.replace("[", "").replace("]", "").strip()


def read_ssv2_json(path: Path, labels: dict[str, int]) -> list[tuple[str, int]]:
    """(video id, class index) of each entry of an SSv2 annotation JSON."""
    entries = json.loads(path.read_text(encoding="utf-8"))
    out = []
    for entry in entries:
        if "template" not in entry:
            raise ConfigError("data", f"{path}: entry {entry.get('id')} has no template (the test split has no "
                                      "public labels; use the validation split)")
        name = ssv2_template_name(entry["template"])
        if name not in labels:
            raise ConfigError("data", f"{path}: template '{name}' is not in the labels file")
        out.append((str(entry["id"]), labels[name]))
    return out


def read_simple_manifest(path: Path) -> list[tuple[str, str]]:
    """(path, label) rows of a video list in any of the formats the reference repos use:

    * a CSV with a header naming ``path`` and ``label`` columns;
    * a header-less list, one ``path label`` per line, space separated (PySlowFast's and
      VideoMAE's ``train.csv``, MMAction's ``*_list_videos.txt``) or ``path,label``; the label is
      the last field, so a path may hold spaces;
    * a JSONL of ``{"path", "label"}``.
    """
    if path.suffix == ".jsonl":
        rows = []
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                item = json.loads(line)
                if "path" not in item or "label" not in item:
                    raise ConfigError("data", f"{path}:{number}: each line needs \"path\" and \"label\"")
                rows.append((str(item["path"]), str(item["label"])))
        return rows
    lines = [(number, line.strip()) for number, line in
             enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1) if line.strip()]
    if not lines:
        raise ConfigError("data", f"{path}: the list is empty")
    first = [cell.strip().lower() for cell in lines[0][1].replace(",", " ").split()]
    if "path" in first and "label" in first:  # a header names the columns
        with open(path, newline="", encoding="utf-8-sig") as handle:
            delimiter = "," if "," in lines[0][1] else " "
            reader = csv.DictReader(handle, delimiter=delimiter, skipinitialspace=True)
            return [(row["path"].strip(), row["label"].strip()) for row in reader if row.get("path")]
    rows = []
    for number, line in lines:
        separator = "," if "," in line and not line.rsplit(",", 1)[1].strip().count(" ") else None
        parts = line.rsplit(separator, 1)
        if len(parts) != 2 or not parts[0].strip() or not parts[1].strip():
            raise ConfigError("data", f"{path}:{number}: expected 'path label' (or path,label), got {line[:80]!r}")
        rows.append((parts[0].strip(), parts[1].strip()))
    return rows


def _class_index(names: list[str]) -> Callable[[str, str], int]:
    lookup = {name: i for i, name in enumerate(names)}

    def index(label: str, where: str) -> int:
        if label in lookup:
            return lookup[label]
        if label.lstrip("-").isdigit() and 0 <= int(label) < len(names):
            return int(label)
        raise ConfigError("data", f"{where}: label '{label}' is not a class of the training split")

    return index


@dataclass
class VideoData:
    """A labeled video dataset by role (``train``, ``val``, ``test``)."""

    spec: str
    task: str
    class_names: list[str]
    split_names: dict[str, str]  # role -> split name on disk
    sources: dict[str, Any]
    missing: dict[str, int] = field(default_factory=dict)  # role -> rows without a file

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def selection_is_test(self) -> bool:
        return self.split_names["val"] == self.split_names["test"]

    def source(self, role: str, rank: int = 0, world_size: int = 1) -> RefSource:
        """The videos of ``role``; with ``world_size`` > 1 one rank's evaluation share (:class:`RefSource`)."""
        return RefSource(self.sources[role], rank, world_size)


def _first(directory: Path, names: Sequence[str]) -> Path | None:
    return next((directory / n for n in names if (directory / n).is_file()), None)


def _resolve_rows(rows: list[tuple[str, int]], locate: Callable[[str], Path | None],
                  class_names: list[str]) -> FileVideos:
    paths, labels, missing = [], [], []
    for name, label in rows:
        path = locate(name)
        if path is None:
            missing.append(name)
        else:
            paths.append(path)
            labels.append(label)
    return FileVideos(paths, labels, class_names, missing)


def _check_missing(sources: dict[str, FileVideos], split_names: dict[str, str], max_missing: float,
                   where: str) -> dict[str, int]:
    counts = {}
    for role, videos in sources.items():
        total = len(videos) + len(videos.missing)
        counts[role] = len(videos.missing)
        if not total:
            raise ConfigError("data", f"{where}: split '{split_names[role]}' has no videos")
        if not len(videos) or len(videos.missing) > max_missing * total:
            examples = ", ".join(videos.missing[:3])
            raise ConfigError("data", f"{where}: {len(videos.missing)} of {total} videos of split "
                                      f"'{split_names[role]}' are missing (e.g. {examples}); check video_dir= "
                                      f"(max_missing_fraction={max_missing})")
        if videos.missing:
            print(f"[video] {where}: {len(videos.missing)} of {total} videos of split '{split_names[role]}' not "
                  f"found, left out (e.g. {videos.missing[0]})", flush=True)
    return counts


def _roles(available: dict[str, Path], where: str) -> dict[str, str]:
    """role -> split name: test falls back to val (reported and selected on the same split)."""
    if "train" not in available or "val" not in available:
        raise ConfigError("data", f"{where}: needs a train and a val split; found {sorted(available) or 'none'}")
    return {"train": "train", "val": "val", "test": "test" if "test" in available else "val"}


def _open_folder(root: Path, max_missing: float) -> VideoData:
    aliases = {"train": ("train",), "val": ("val", "validation", "validate"), "test": ("test",)}
    found = {role: root / name for role, names in aliases.items() for name in names if (root / name).is_dir()}
    split_names = _roles(found, str(root))
    class_names = sorted(d.name for d in found["train"].iterdir() if d.is_dir() and not d.name.startswith("."))
    if not class_names:
        raise ConfigError("data", f"{found['train']}: expected one folder per class holding videos")
    index = _class_index(class_names)
    sources = {}
    for role in ROLES:
        split = found[split_names[role]]
        paths, labels = [], []
        for class_dir in sorted(d for d in split.iterdir() if d.is_dir() and not d.name.startswith(".")):
            label = index(class_dir.name, str(split))
            for path in sorted(class_dir.rglob("*")):
                if path.suffix.lower() in VIDEO_EXTENSIONS and not path.name.startswith("."):
                    paths.append(path)
                    labels.append(label)
        sources[role] = FileVideos(paths, labels, class_names)
    names = {role: found[split_names[role]].name for role in ROLES}
    return VideoData(str(root), "label", class_names, names, sources,
                     _check_missing(sources, names, max_missing, str(root)))


def _open_kinetics(root: Path, video_dir: Path, max_missing: float) -> VideoData:
    files = {"train": _first(root, ("train.csv",)), "val": _first(root, ("validate.csv", "val.csv")),
             "test": _first(root, ("test.csv",))}
    found = {role: path for role, path in files.items() if path is not None}
    split_names = _roles(found, str(root))
    rows = {role: read_kinetics_csv(found[split_names[role]]) for role in ROLES}
    class_names = sorted({label for _, label in rows["train"]})
    index = _class_index(class_names)
    by_stem = _files_by_stem(video_dir)
    sources = {role: _resolve_rows([(stem, index(label, str(found[split_names[role]]))) for stem, label in rows[role]],
                                   by_stem.get, class_names) for role in ROLES}
    names = {role: found[split_names[role]].stem for role in ROLES}
    return VideoData(str(root), "label", class_names, names, sources,
                     _check_missing(sources, names, max_missing, str(root)))


SSV2_PREFIX = "something-something-v2-"


def ssv2_files(root: Path) -> tuple[Path, dict[str, Path]] | None:
    """(labels file, split -> annotation file) of an SSv2 copy: the release's
    ``something-something-v2-*.json`` beside the videos, or the ``labels/`` folder
    (``labels.json``, ``train.json``, ``validation.json``) of the 20BN download; None otherwise."""
    for folder, prefix in ((root, SSV2_PREFIX), (root / "labels", "")):
        labels = folder / f"{prefix}labels.json"
        splits = {role: folder / f"{prefix}{name}.json" for role, name in (("train", "train"), ("val", "validation"))
                  if (folder / f"{prefix}{name}.json").is_file()}
        if labels.is_file() or (prefix and splits):
            return labels, splits
    return None


def _open_ssv2(root: Path, video_dir: Path, max_missing: float) -> VideoData:
    labels_file, found = ssv2_files(root) or (root / f"{SSV2_PREFIX}labels.json", {})
    if not labels_file.is_file():
        raise ConfigError("data", f"{root}: SSv2 needs {labels_file.name} beside the annotation files")
    labels = {name: int(value) for name, value in json.loads(labels_file.read_text(encoding="utf-8")).items()}
    class_names = [name for name, _ in sorted(labels.items(), key=lambda item: item[1])]
    split_names = _roles(found, str(root))
    by_stem = _files_by_stem(video_dir)
    sources = {role: _resolve_rows(read_ssv2_json(found[split_names[role]], labels), by_stem.get, class_names)
               for role in ROLES}
    names = {role: {"train": "train", "val": "validation"}[split_names[role]] for role in ROLES}
    return VideoData(str(root), "label", class_names, names, sources,
                     _check_missing(sources, names, max_missing, str(root)))


LIST_SUFFIXES = (".csv", ".jsonl", ".txt")


def _open_simple(root: Path, video_dir: Path | None, max_missing: float) -> VideoData:
    found: dict[str, Path] = {}
    for role, stems in (("train", ("train",)), ("val", ("val", "validation")), ("test", ("test",))):
        for stem in stems:
            path = _first(root, [f"{stem}{suffix}" for suffix in LIST_SUFFIXES])
            if path is not None and role not in found:
                found[role] = path
    split_names = _roles(found, str(root))
    rows = {role: read_simple_manifest(found[split_names[role]]) for role in ROLES}
    train_labels = {label for _, label in rows["train"]}
    numeric = all(label.lstrip("-").isdigit() for label in train_labels)
    class_names = ([str(i) for i in range(max(int(x) for x in train_labels) + 1)] if numeric
                   else sorted(train_labels))
    index = _class_index(class_names)
    base = video_dir or root

    def locate(name: str) -> Path | None:
        path = Path(name) if Path(name).is_absolute() else base / name
        return path if path.is_file() else None

    sources = {role: _resolve_rows([(p, index(label, str(found[split_names[role]]))) for p, label in rows[role]],
                                   locate, class_names) for role in ROLES}
    names = {role: found[split_names[role]].stem for role in ROLES}
    return VideoData(str(root), "label", class_names, names, sources,
                     _check_missing(sources, names, max_missing, str(root)))


def video_data_kind(root: Path) -> str:
    """Which layout a data folder holds: ``ssv2`` (the release's JSONs, or its ``labels/`` folder),
    ``kinetics`` (annotation CSVs), ``manifest`` (``{train,val,test}.csv|txt|jsonl`` lists, with or
    without a header) or ``folder`` (class folders per split). ``prepretrain data stats`` names it."""
    if ssv2_files(root) is not None:
        return "ssv2"
    train_csv = root / "train.csv"
    if train_csv.is_file():
        with open(train_csv, newline="", encoding="utf-8") as handle:
            header = next(csv.reader(handle), [])
        return "kinetics" if "youtube_id" in header else "manifest"
    if (root / "train.jsonl").is_file() or (root / "train.txt").is_file():
        return "manifest"
    return "folder"


def open_video_data(spec: str, *, task: str = "auto", num_videos: int = 1000, seed: int = 0, image_size: int = 32,
                    length: int = 32, video_dir: str = "", max_missing_fraction: float = 0.1) -> VideoData:
    """The labeled video dataset ``spec`` names (``synthetic`` or a folder; see the module docstring)."""
    if spec == "synthetic":
        task = "direction" if task == "auto" else task
        if task not in SYNTHETIC_TASKS:
            raise ConfigError("task", f"the synthetic video dataset has tasks {', '.join(SYNTHETIC_TASKS)}; "
                                      f"got '{task}'")
        sizes = synthetic_video_sizes(num_videos)
        sources = {role: SyntheticVideos(sizes[role], role, task=task, seed=seed, size=image_size, length=length)
                   for role in ROLES}
        return VideoData("synthetic", task, sources["train"].class_names, {r: r for r in ROLES}, sources)
    root = Path(spec)
    if not root.is_dir():
        raise ConfigError("data", f"{spec}: not a folder (video data is 'synthetic' or a folder: class folders per "
                                  "split, Kinetics CSVs, SSv2 JSONs or {train,val,test}.csv|jsonl manifests)")
    if task not in ("auto", "label"):
        raise ConfigError("task", f"video folders and manifests have one task, 'label'; got '{task}'")
    videos = Path(video_dir) if video_dir else root
    if video_dir and not videos.is_dir():
        raise ConfigError("video_dir", f"{video_dir}: no such folder")
    kind = video_data_kind(root)
    if kind == "ssv2":
        return _open_ssv2(root, videos, max_missing_fraction)
    if kind == "kinetics":
        return _open_kinetics(root, videos, max_missing_fraction)
    if kind == "manifest":
        return _open_simple(root, Path(video_dir) if video_dir else None, max_missing_fraction)
    return _open_folder(root, max_missing_fraction)


def is_video_dataset(root: Path, limit: int = 2000) -> bool:
    """Whether a folder holds a video dataset: an SSv2 or Kinetics layout, or (looking at the first
    ``limit`` files) video files and no images."""
    if not root.is_dir():
        return False
    kind = video_data_kind(root)
    if kind in ("ssv2", "kinetics"):
        return True
    if kind == "manifest":  # lists of paths: what the first rows point at
        listed = _first(root, ("train.csv", "train.txt", "train.jsonl"))
        with open(listed, encoding="utf-8", errors="replace") as handle:  # type: ignore[arg-type]
            head = "".join(handle.readline() for _ in range(3)).lower()
        return any(suffix in head for suffix in VIDEO_EXTENSIONS)
    videos = images = seen = 0
    for _, _, names in os.walk(root):
        for name in names:
            suffix = Path(name).suffix.lower()
            videos += suffix in VIDEO_EXTENSIONS
            images += suffix in IMAGE_EXTENSIONS
            seen += 1
        if seen >= limit:
            break
    return videos > 0 and images == 0


def describe_video_data(spec: str, video_dir: str = "") -> dict[str, Any]:
    """What ``prepretrain data stats`` prints for a video dataset: its layout (as read), classes,
    videos per role and split, and rows whose file is missing."""
    data = open_video_data(spec, video_dir=video_dir, max_missing_fraction=1.0)
    return {
        "format": "video", "layout": "synthetic" if spec == "synthetic" else video_data_kind(Path(spec)),
        "task": data.task, "classes": data.num_classes, "class_names": data.class_names[:20],
        "videos": {role: len(data.sources[role]) for role in ROLES}, "split_names": dict(data.split_names),
        "missing_files": dict(data.missing),
    }


# ----------------------------------------------------------------------------- sampling


def clip_indices(start: int, num_frames: int, stride: int) -> list[int]:
    return [start + i * stride for i in range(num_frames)]


SAMPLINGS = ("dense", "segment")


def segment_indices(total: int, num_frames: int, *, view: int | None = None, views: int = 1) -> list[int]:
    """Segment sampling (TSN; the SSv2 recipes of VideoMAE and MAE-ST): the whole video cut into
    ``num_frames`` equal segments, one frame from each, so a clip always spans the start and the
    end of the action. Training (``view=None``): a random frame per segment (Python's RNG, seeded
    per sample by the loader). Evaluation: view ``v`` of ``views`` takes the frame at
    ``(v + 0.5) / views`` of each segment, so the views interleave and one view is the middles."""
    total = max(total, 1)
    length = total / num_frames
    if view is None:
        return [min(total - 1, int(length * i + random.random() * length)) for i in range(num_frames)]
    return [min(total - 1, int(length * (i + (view + 0.5) / views))) for i in range(num_frames)]


def clip_span(num_frames: int, stride: int, fps: float = 0.0, target_fps: float = 0.0) -> float:
    """Frames of the file one dense clip covers: ``(num_frames - 1) * stride + 1`` when the stride
    counts the file's own frames (``target_fps=0``, or the frame rate is unknown); else the stride
    counts frames at ``target_fps``, so the clip lasts ``stride * num_frames / target_fps`` seconds
    whatever the file's rate (PySlowFast's ``clip_size = sampling_rate * num_frames / target_fps * fps``)."""
    if target_fps > 0 and fps > 0:
        return stride * num_frames * fps / target_fps
    return float((num_frames - 1) * stride + 1)


def dense_indices(start: float, num_frames: int, stride: int, fps: float = 0.0, target_fps: float = 0.0) -> list[int]:
    """A dense clip's frames from ``start``: every ``stride``-th frame, or with ``target_fps`` the
    ``num_frames`` frames spread evenly over :func:`clip_span` (PySlowFast's ``temporal_sampling``:
    ``linspace(start, start + span - 1, num_frames)`` truncated to integers)."""
    if target_fps > 0 and fps > 0:
        span = clip_span(num_frames, stride, fps, target_fps)
        return [int(i) for i in np.linspace(start, start + span - 1, num_frames)]
    return clip_indices(int(start), num_frames, stride)


def clip_starts(total: int, span: int, views: int) -> list[int]:
    """Starts of ``views`` clips of ``span`` frames spread evenly over ``total`` frames (the
    middle one when ``views == 1``); 0 when the video is shorter than a clip."""
    room = max(total - span, 0)
    if views == 1:
        return [room // 2]
    return [round(room * v / (views - 1)) for v in range(views)]


def _resize_short_side(frames: torch.Tensor, size: int) -> torch.Tensor:
    """(T, C, H, W) float frames with their short side resized to ``size`` (antialiased bilinear)."""
    height, width = frames.shape[-2:]
    scale = size / min(height, width)
    new = (max(size, round(height * scale)), max(size, round(width * scale)))
    if new == (height, width):
        return frames
    return F.interpolate(frames, size=new, mode="bilinear", align_corners=False, antialias=True)


def _normalise(frames: torch.Tensor) -> torch.Tensor:
    """(T, C, H, W) in [0, 1] -> normalised (C, T, H, W)."""
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return ((frames - mean) / std).permute(1, 0, 2, 3).contiguous()


def _to_float(frames: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2).float() / 255.0


def spatial_crops(frames: torch.Tensor, size: int, views: int) -> list[torch.Tensor]:
    """``views`` square crops of (T, C, H, W) frames whose short side is ``size``: the center
    (1 view) or evenly along the long side (3 views: both ends and the center, as PySlowFast)."""
    height, width = frames.shape[-2:]
    crops = []
    for view in range(views):
        fraction = 0.5 if views == 1 else view / (views - 1)
        top = round((height - size) * (fraction if height > width else 0.5))
        left = round((width - size) * (fraction if width >= height else 0.5))
        crops.append(frames[..., top:top + size, left:left + size])
    return crops


# ---- per-clip augmentation (the MAE-ST / VideoMAE finetuning recipes)

# what timm's rand_augment_transform parses after "rand": numeric sections and the transform sets it
# names (it falls back to the default set for any other name)
_RANDAUGMENT_SECTION = re.compile(r"(m|n|p|mstd|mmax|inc)\d+(\.\d+)?|t(weights|3aw|3a)")


def check_randaugment(spec: str) -> None:
    """Raise ValueError unless ``spec`` is a timm RandAugment spec (``rand-m7-n4-mstd0.5-inc1``).
    timm skips a section it cannot split into key and number (``mstd`` alone, ``m``), so a typo
    would silently change the recipe: every section is checked here."""
    sections = spec.split("-")
    bad = [s for s in sections[1:] if not _RANDAUGMENT_SECTION.fullmatch(s)]
    if sections[0] != "rand" or bad:
        raise ValueError(f"expected a timm RandAugment spec like 'rand-m7-n4-mstd0.5-inc1' (sections m, n, p, mstd, "
                         f"mmax, inc with a number, or tweights, t3a, t3aw); got '{spec}'")
    try:
        rand_augment_transform(spec, {})
    except (AssertionError, KeyError, ValueError) as error:
        raise ValueError(f"timm cannot build RandAugment '{spec}': {error or type(error).__name__}") from None


class ClipRandAugment:
    """timm RandAugment with one draw per clip: the same ops at the same magnitudes on every frame,
    as VideoMAE and MAE-ST augment a clip (their PySlowFast RandAugment takes a list of frames).

    timm's ``RandAugment`` picks its ops with NumPy's global RNG and each ``AugmentOp`` draws its
    probability, magnitude noise, sign and (random) interpolation from Python's ``random``, nothing
    else; so restoring both states before every frame gives every frame the first frame's draw.
    NumPy's RNG is not seeded per sample by the loader, so it is seeded from Python's (which is)
    for the call and the caller's NumPy state put back: augmentation follows the sample seed.
    Hyperparameters are timm's ``create_transform`` ones at the clip size (translate 0.45 x size,
    ImageNet-mean fill, bicubic).
    """

    def __init__(self, spec: str, image_size: int):
        check_randaugment(spec)
        hparams = {"translate_const": int(image_size * 0.45), "img_mean": tuple(round(255 * m) for m in IMAGENET_MEAN),
                   "interpolation": Image.Resampling.BICUBIC}
        self.spec, self.transform = spec, rand_augment_transform(spec, hparams)
        for op in self.transform.ops:
            if op.name.startswith("Posterize"):
                op.aug_fn = ZeroBitPosterize(op.aug_fn)

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        """(T, C, H, W) floats in [0, 1] -> the same shape, augmented (through uint8 PIL frames)."""
        pixels = (frames.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        caller_numpy = np.random.get_state()
        np.random.seed(random.getrandbits(32))
        python_draw, numpy_draw = random.getstate(), np.random.get_state()
        augmented = []
        try:
            for frame in pixels:
                random.setstate(python_draw)
                np.random.set_state(numpy_draw)
                augmented.append(np.asarray(self.transform(Image.fromarray(frame))))
        finally:
            np.random.set_state(caller_numpy)
        return _to_float(np.stack(augmented))


def erase_clip(clip: torch.Tensor, eraser: RandomErasing) -> torch.Tensor:
    """timm's random erasing with one box through every frame of a normalised (C, T, H, W) clip
    (VideoMAE's and MAE-ST's "cube" erasing). timm erases a 3-D tensor as one image of ``C * T``
    channels: one box, per-pixel normal noise in every channel of every frame."""
    channels, frames, height, width = clip.shape
    return eraser(clip.reshape(channels * frames, height, width)).view(channels, frames, height, width)


class TrainClip:
    """VideoRef -> ``{"video": (C, T, S, S), "label"}``: a random start, a random-resized crop
    (one box for every frame), an optional horizontal flip, optionally RandAugment (one draw per
    clip, :class:`ClipRandAugment`) and random erasing (one box through every frame, per-pixel
    noise in normalised space, timm's area 0.02-1/3 and aspect 0.3-3.3). Randomness: torch and
    Python RNGs, which the loader seeds per sample position (exact resume).

    ``repeats > 1`` (repeated augmentation, MAE-ST's ``repeat_aug`` / VideoMAE's ``num_sample``):
    ``"video"`` is ``(repeats, C, T, S, S)``, clips of the same video with their own start and
    augmentation each (as MAE-ST; VideoMAE re-augments the same frames), all their frames decoded
    in one pass over the file; the stage flattens them and repeats the label."""

    def __init__(self, num_frames: int, stride: int, image_size: int, *, min_scale: float = 0.08,
                 hflip: float = 0.0, short_videos: str = "pad", sampling: str = "dense", target_fps: float = 0.0,
                 randaugment: str = "", random_erasing: float = 0.0, repeats: int = 1):
        self.num_frames, self.stride, self.image_size = num_frames, stride, image_size
        self.min_scale, self.hflip, self.short_videos, self.sampling = min_scale, hflip, short_videos, sampling
        self.target_fps, self.repeats = target_fps, repeats
        self.randaugment = ClipRandAugment(randaugment, image_size) if randaugment else None
        self.eraser = (RandomErasing(random_erasing, mode="pixel", max_count=1, device="cpu")
                       if random_erasing > 0 else None)

    def pick(self, total: int, fps: float = 0.0) -> list[int]:
        if self.sampling == "segment":
            return segment_indices(total, self.num_frames)
        span = clip_span(self.num_frames, self.stride, fps, self.target_fps)
        if self.target_fps > 0 and fps > 0:
            return dense_indices(random.uniform(0, max(total - span, 0)), self.num_frames, self.stride, fps,
                                 self.target_fps)
        return clip_indices(random.randint(0, max(total - int(span), 0)), self.num_frames, self.stride)

    def pick_repeats(self, total: int, fps: float = 0.0) -> list[int]:
        """The frames of ``repeats`` clips, each drawn as :meth:`pick` draws one, one after the other."""
        return [i for _ in range(self.repeats) for i in self.pick(total, fps)]

    def augment(self, frames: torch.Tensor) -> torch.Tensor:
        """One clip's (T, C, H, W) frames in [0, 1] -> the normalised, augmented (C, T, S, S) clip."""
        height, width = frames.shape[-2:]
        area = height * width
        for _ in range(10):
            target = area * random.uniform(self.min_scale, 1.0)
            ratio = math.exp(random.uniform(math.log(3 / 4), math.log(4 / 3)))
            w, h = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
            if 0 < w <= width and 0 < h <= height:
                top, left = random.randint(0, height - h), random.randint(0, width - w)
                break
        else:
            h = w = min(height, width)
            top, left = (height - h) // 2, (width - w) // 2
        frames = frames[..., top:top + h, left:left + w]
        frames = F.interpolate(frames, size=(self.image_size, self.image_size), mode="bilinear",
                               align_corners=False, antialias=True)
        if self.hflip and random.random() < self.hflip:
            frames = frames.flip(-1)
        if self.randaugment is not None:  # at clip size: 16 frames of 224 px, not of the decoded frame
            frames = self.randaugment(frames)
        clip = _normalise(frames.clamp(0, 1))
        return erase_clip(clip, self.eraser) if self.eraser is not None else clip

    @property
    def decode_side(self) -> int:
        """The short side frames are scaled down to while decoding: the smallest at which even the
        smallest crop (area ``min_scale``, aspect 3/4) still spans ``image_size`` pixels, so no
        crop is upsampled from fewer pixels than the file has (224 px at ``min_scale`` 0.08:
        915 px, i.e. no scaling for most videos; the 16 px demo at 0.5: 27 px)."""
        return math.ceil(self.image_size / math.sqrt(self.min_scale * 3 / 4))

    def __call__(self, ref: VideoRef) -> dict[str, Any]:
        if self.repeats == 1:
            frames = ref.frames(self.pick, self.short_videos, self.decode_side)
            return {"video": self.augment(_to_float(frames)), "label": ref.label}
        frames = _to_float(ref.frames(self.pick_repeats, self.short_videos, self.decode_side))
        clips = [self.augment(frames[r * self.num_frames:(r + 1) * self.num_frames]) for r in range(self.repeats)]
        return {"video": torch.stack(clips), "label": ref.label}


class EvalClips:
    """VideoRef -> ``{"video": (V, C, T, S, S), "label"}`` with V = temporal x spatial views.

    ``middle_frame_only``: the single-frame baseline's view, one frame at the middle of the video."""

    def __init__(self, num_frames: int, stride: int, image_size: int, *, temporal_views: int = 1,
                 spatial_views: int = 1, short_videos: str = "pad", sampling: str = "dense", target_fps: float = 0.0):
        self.num_frames, self.stride, self.image_size = num_frames, stride, image_size
        self.temporal_views, self.spatial_views, self.short_videos = temporal_views, spatial_views, short_videos
        self.sampling, self.target_fps = sampling, target_fps

    def pick(self, total: int, fps: float = 0.0) -> list[int]:
        if self.sampling == "segment":
            return [i for view in range(self.temporal_views)
                    for i in segment_indices(total, self.num_frames, view=view, views=self.temporal_views)]
        span = math.ceil(clip_span(self.num_frames, self.stride, fps, self.target_fps))
        starts = clip_starts(total, span, self.temporal_views)
        return [i for start in starts
                for i in dense_indices(start, self.num_frames, self.stride, fps, self.target_fps)]

    def __call__(self, ref: VideoRef) -> dict[str, Any]:
        # decoded at the evaluation size: 80 frames of a 720p video are 0.9 GB as float at full size
        frames = _resize_short_side(_to_float(ref.frames(self.pick, self.short_videos, self.image_size)),
                                    self.image_size)
        views = []
        for t in range(self.temporal_views):
            clip = frames[t * self.num_frames:(t + 1) * self.num_frames]
            views += [_normalise(crop.clamp(0, 1)) for crop in spatial_crops(clip, self.image_size, self.spatial_views)]
        return {"video": torch.stack(views), "label": ref.label}


# ------------------------------------------------------------------------------- mixing


def mix_clips(clips: torch.Tensor, labels: torch.Tensor, num_classes: int, *, mixup: float = 0.8,
              cutmix: float = 1.0, prob: float = 1.0, switch_prob: float = 0.5,
              label_smoothing: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Mixup or CutMix of a batch of clips (B, C, T, H, W) with its flipped self, and soft targets.

    timm's ``Mixup`` cuts boxes out of dims -2/-1 but indexes ``x[:, :, y, x]``, i.e. time and
    height of a 5-D clip; here the box spans every frame (as in VideoMAE). Draws come from
    torch's RNG (checkpointed by the loop), not NumPy's. Targets are label-smoothed one-hots
    mixed with the same weight as the pixels (the box's true area for CutMix).
    """
    off = label_smoothing / num_classes
    one_hot = torch.full((len(labels), num_classes), off, device=clips.device)
    one_hot.scatter_(1, labels.view(-1, 1).long(), 1.0 - label_smoothing + off)
    use = (mixup > 0 or cutmix > 0) and float(torch.rand(())) < prob
    if not use:
        return clips, one_hot
    use_cutmix = cutmix > 0 and (mixup <= 0 or float(torch.rand(())) < switch_prob)
    alpha = cutmix if use_cutmix else mixup
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    flipped = clips.flip(0)
    if use_cutmix:
        height, width = clips.shape[-2:]
        cut = math.sqrt(1 - lam)
        ch, cw = int(height * cut), int(width * cut)
        cy, cx = int(torch.randint(0, height, ())), int(torch.randint(0, width, ()))
        y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, height)
        x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, width)
        clips = clips.clone()
        clips[..., y0:y1, x0:x1] = flipped[..., y0:y1, x0:x1]
        lam = 1 - (y1 - y0) * (x1 - x0) / (height * width)
    else:
        clips = clips * lam + flipped * (1 - lam)
    return clips, one_hot * lam + one_hot.flip(0) * (1 - lam)

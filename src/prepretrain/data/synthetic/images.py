"""The embedded synthetic dataset: the default data of every command.

Why it exists: a new user types ``prepretrain pipeline`` with no files and no internet and
must still see every stage learn something real. So the images are procedural but carry
structure at several scales (a textured main object, sometimes a smaller distractor, on a
textured background), the labels need that structure to be predicted, and the weak
annotations are noisy the way web data is:

* ``labels["coarse"]``: the main object's shape kind (10 classes, :data:`SHAPES`). As in
  photographs, category and colour go together (:data:`TYPICAL_COLOURS`, with probability
  :data:`TYPICAL_COLOUR_PROB`): features that only know colour reach about half the
  accuracy (:func:`colour_only_accuracy`, 52%), shape-aware features the rest. Without this
  a CPU-sized ViT learns nothing about the shapes in minutes (coarse probes stayed at
  10-15%), and every comparison the pipeline makes sat at chance.
* ``labels["fine"]``: shape x fill texture (50 classes, ``fine = coarse * 5 + texture``,
  names like ``"striped circle"``). Telling dots from a checker pattern on a 10-pixel
  object is much harder than telling a star from a ring, which is the point.
* ``hashtags``: about 300 canonical tags (:data:`HASHTAG_VOCAB`): informative ones with
  synonyms (``#circle``/``#round``), wrong ones and generic ones (``#instagood``) drawn
  from Zipf laws, true tags only kept with probability < 1, raw spelling varied in case and
  ``#`` prefix so that vocabulary normalisation has work to do.
* ``caption``: a templated English sentence that mentions some of the attributes.

Determinism: every record is a pure function of ``(seed, split, index)``; images are drawn
on the fly with local ``numpy.random.Generator`` objects (never global RNG state), so any
worker can produce any record and the same record is identical across runs and machines.
Different splits use different generator streams, so ``train``/``val``/``test`` are
disjoint draws from one distribution.

Class balance: labels are assigned in blocks of 50 consecutive indices, each block a
seeded permutation of the 50 fine classes, so any prefix of a multiple of 50 images is
exactly balanced over fine (hence coarse) classes; low-shot sampling relies on this.

Split sizes convention (:func:`synthetic_split_sizes`): ``num_images`` is the train size;
``val`` and ``test`` each get ``max(200, num_images // 5)`` images. Commands that need a
held-out set build ``SyntheticSource(n, split="val")`` with that size.

:func:`~prepretrain.data.synthetic.export.write_synthetic` exports the same records to an image folder
plus JSONL manifests, so the file-based sources can be exercised on data with known answers.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image

from prepretrain.data.records import Annotation, Record

# ----------------------------------------------------------------------------------------
# Attribute tables. Order matters: indices are labels.

SHAPES: list[str] = [
    "circle", "square", "triangle", "star", "ring",
    "cross", "hexagon", "ellipse", "heart", "crescent",
]  # fmt: skip
TEXTURES: list[str] = ["solid", "stripes", "dots", "checker", "gradient"]
TEXTURE_ADJECTIVES: list[str] = ["solid", "striped", "dotted", "checkered", "gradient"]
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.85, 0.12, 0.12),
    "orange": (0.95, 0.55, 0.10),
    "yellow": (0.95, 0.88, 0.15),
    "green": (0.15, 0.70, 0.20),
    "cyan": (0.10, 0.75, 0.80),
    "blue": (0.15, 0.30, 0.85),
    "purple": (0.55, 0.20, 0.75),
    "pink": (0.95, 0.45, 0.70),
}
COLOUR_NAMES: list[str] = list(COLOURS)
_COLOUR_TABLE = np.array(list(COLOURS.values()), dtype=np.float32)
BACKGROUNDS: list[str] = ["plain", "noise", "stripes", "gradient", "grid", "clouds"]
SIZES: list[str] = ["small", "medium", "large"]
POSITIONS: list[str] = [
    "top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right",
]  # fmt: skip
COUNTS: list[str] = ["single", "two"]

NUM_COARSE = len(SHAPES)
NUM_FINE = len(SHAPES) * len(TEXTURES)
_BLOCK = NUM_FINE  # labels are balanced within each block of this many indices

# Object radius as a fraction of the image side; buckets name the size for tags/captions.
_RADIUS_RANGE = (0.18, 0.38)
_SIZE_EDGES = (0.245, 0.315)
_MAX_TILT = math.radians(35.0)

# Categories and colour go together, as they do in photographs (hearts are red, moons
# yellow): the main object takes its shape's typical colour with this probability and a
# uniformly drawn colour otherwise. Colour alone then predicts the shape about half the
# time (:func:`colour_only_accuracy`), shape-aware features reach 100%: weak features
# (a few CPU minutes of pretraining) land clearly above chance and stronger ones keep room
# to improve, which is what a demo dataset for comparing pretraining recipes needs.
TYPICAL_COLOUR_PROB = 0.6
TYPICAL_COLOURS: list[str] = [
    "orange", "blue", "green", "yellow", "pink", "red", "cyan", "purple", "red", "yellow",
]  # fmt: skip  (per entry of SHAPES)

# ----------------------------------------------------------------------------------------
# Hashtags: canonical (normalised) spellings, first of each group is the preferred one.

_SHAPE_TAGS: list[list[str]] = [
    ["circle", "round", "circles", "disc"],
    ["square", "squares", "box"],
    ["triangle", "triangles", "triangular"],
    ["star", "stars", "starry"],
    ["ring", "rings", "donut", "hoop"],
    ["cross", "plus", "crosses"],
    ["hexagon", "hex", "hexagonal"],
    ["ellipse", "oval", "elliptical"],
    ["heart", "hearts", "valentine"],
    ["crescent", "moon", "crescentmoon"],
]
_COLOUR_TAGS: list[list[str]] = [
    ["red", "redcolor", "scarlet"],
    ["orange", "orangecolor", "tangerine"],
    ["yellow", "golden", "yellowcolor"],
    ["green", "emerald", "greencolor"],
    ["cyan", "teal", "turquoise"],
    ["blue", "azure", "bluecolor"],
    ["purple", "violet", "lilac"],
    ["pink", "rose", "pinkcolor"],
]
_TEXTURE_TAGS: list[list[str]] = [
    ["solid", "plain", "flatcolor"],
    ["stripes", "striped", "stripe"],
    ["dots", "polkadots", "dotted"],
    ["checkered", "checkerboard", "checks"],
    ["gradient", "ombre", "fade"],
]
_BACKGROUND_TAGS: list[list[str]] = [
    ["minimal", "minimalism", "simplebackground"],
    ["grain", "noise", "noisy"],
    ["lines", "stripedbackground", "linework"],
    ["gradientbackground", "backdrop", "colorfade"],
    ["grid", "gridlines", "graphpaper"],
    ["clouds", "cloudy", "bokeh"],
]
_SIZE_TAGS: list[list[str]] = [["small", "tiny", "mini"], ["medium", "midsize"], ["big", "large", "huge"]]
_POSITION_TAGS: list[list[str]] = [
    ["topleft", "upperleft"], ["top", "up"], ["topright", "upperright"],
    ["left", "leftside"], ["center", "centered", "middle"], ["right", "rightside"],
    ["bottomleft", "lowerleft"], ["bottom", "down"], ["bottomright", "lowerright"],
]  # fmt: skip
_COUNT_TAGS: list[list[str]] = [["single", "solo", "one"], ["two", "pair", "duo"]]

# (attribute, tag groups, base keep probability): informative attributes are kept with
# different probabilities so that some true attributes are much rarer than others.
_TAG_ATTRIBUTES: list[tuple[str, list[list[str]], float]] = [
    ("shape", _SHAPE_TAGS, 0.8),
    ("colour", _COLOUR_TAGS, 0.6),
    ("texture", _TEXTURE_TAGS, 0.45),
    ("background", _BACKGROUND_TAGS, 0.25),
    ("size", _SIZE_TAGS, 0.2),
    ("position", _POSITION_TAGS, 0.12),
    ("count", _COUNT_TAGS, 0.15),
]
# Public view for analyses and tests: attribute -> per-value tag groups (preferred first).
ATTRIBUTE_TAGS: dict[str, list[list[str]]] = {name: groups for name, groups, _ in _TAG_ATTRIBUTES}

_GENERIC_BASE = (
    "photooftheday instagood love picoftheday nofilter art beautiful happy follow like4like "
    "instadaily tbt fun style repost cute design summer weekend mood aesthetic photography "
    "inspiration artwork creative colorful vibes life goodvibes throwback friends family travel "
    "nature sunday monday weekendvibes trending explore viral igdaily follow4follow likeforlike "
    "instamood picture pic photo photographer illustration digitalart abstract pattern graphic "
    "shapes geometry color minimalart popart modernart"
).split()
_GENERIC_PREFIXES = ["insta", "daily", "my", "best", "pic", "photo", "art", "love", "happy", "good"]
_GENERIC_SUFFIXES = ["good", "daily", "life", "vibes", "mood", "gram", "shot", "day", "style", "lover", "oftheday"]


def _generic_tags() -> list[str]:
    """A few hundred uninformative tags, popular ones first (their Zipf rank is their index)."""
    tags = list(dict.fromkeys(_GENERIC_BASE))
    seen = set(tags)
    for prefix in _GENERIC_PREFIXES:
        for suffix in _GENERIC_SUFFIXES:
            tag = prefix + suffix
            if prefix != suffix and tag not in seen:
                tags.append(tag)
                seen.add(tag)
    return tags


GENERIC_TAGS: list[str] = _generic_tags()
INFORMATIVE_TAGS: list[str] = list(
    dict.fromkeys(tag for _, groups, _ in _TAG_ATTRIBUTES for group in groups for tag in group)
)
HASHTAG_VOCAB: list[str] = sorted(set(INFORMATIVE_TAGS) | set(GENERIC_TAGS))


def _zipf_cdf(n: int, exponent: float) -> np.ndarray:
    weights = 1.0 / np.arange(1, n + 1) ** exponent
    cdf = np.cumsum(weights)
    return cdf / cdf[-1]


_GENERIC_CDF = _zipf_cdf(len(GENERIC_TAGS), 1.1)
# Wrong tags: a fixed shuffled order of the informative tags so that some wrong tags are
# common confusions and most are rare.
_WRONG_ORDER: list[str] = [INFORMATIVE_TAGS[i] for i in np.random.default_rng(1234).permutation(len(INFORMATIVE_TAGS))]
_WRONG_CDF = _zipf_cdf(len(_WRONG_ORDER), 0.8)

# ----------------------------------------------------------------------------------------
# Class names and zero-shot synonyms.

_SHAPE_SYNONYMS: list[list[str]] = [
    ["circle", "round disc", "filled circle"],
    ["square", "box", "square shape"],
    ["triangle", "three-sided shape", "triangular shape"],
    ["star", "five-pointed star", "star shape"],
    ["ring", "donut", "hoop"],
    ["cross", "plus sign", "cross shape"],
    ["hexagon", "six-sided shape", "hexagonal shape"],
    ["ellipse", "oval", "elongated circle"],
    ["heart", "heart shape", "love heart"],
    ["crescent", "crescent moon", "moon shape"],
]
_TEXTURE_SYNONYMS: list[list[str]] = [
    ["solid", "plain", "single-colour"],
    ["striped", "stripy", "lined"],
    ["dotted", "polka-dot", "spotted"],
    ["checkered", "chequered", "checkerboard"],
    ["gradient", "shaded", "fading"],
]

CLASS_NAMES: dict[str, list[str]] = {
    "coarse": list(SHAPES),
    "fine": [f"{adj} {shape}" for shape in SHAPES for adj in TEXTURE_ADJECTIVES],
}
SYNONYMS: dict[str, list[list[str]]] = {
    "coarse": [list(names) for names in _SHAPE_SYNONYMS],
    "fine": [
        [f"{TEXTURE_ADJECTIVES[t]} {SHAPES[s]}"]
        + [f"{texture} {shape}" for texture, shape in zip(_TEXTURE_SYNONYMS[t][1:], _SHAPE_SYNONYMS[s][1:])]
        + [f"{SHAPES[s]} with a {TEXTURE_ADJECTIVES[t]} fill" if t != 0 else f"{SHAPES[s]} in one colour"]
        for s in range(len(SHAPES))
        for t in range(len(TEXTURES))
    ],
}


def colour_only_accuracy() -> float:
    """Best coarse accuracy of any classifier that sees only the main object's named colour
    (the Bayes rate under the colour prior): the bar between "learned colour" and "learned
    shape" on the synthetic coarse task."""
    joint = np.full((NUM_COARSE, len(COLOURS)), (1.0 - TYPICAL_COLOUR_PROB) / len(COLOURS))
    for shape, name in enumerate(TYPICAL_COLOURS):
        joint[shape, COLOUR_NAMES.index(name)] += TYPICAL_COLOUR_PROB
    return float(joint.max(axis=0).sum() / NUM_COARSE)


def synthetic_split_sizes(num_images: int) -> dict[str, int]:
    """Default sizes per split: ``num_images`` for train, ``max(200, num_images // 5)`` each
    for val and test, so that held-out estimates are never based on a handful of images."""
    if num_images < 0:
        raise ValueError(f"num_images must be >= 0, got {num_images}")
    held_out = max(200, num_images // 5)
    return {"train": num_images, "val": held_out, "test": held_out}


# ----------------------------------------------------------------------------------------
# Scene description and rendering.


@dataclass
class _Object:
    shape: int
    colour: int
    texture: int
    rgb: np.ndarray  # (3,) primary colour after jitter
    rgb2: np.ndarray  # (3,) secondary colour of the pattern
    cx: float  # centre, pixels
    cy: float
    radius: float  # pixels
    angle: float  # radians
    period: float  # pattern period, pixels


@dataclass
class _Scene:
    main: _Object
    distractor: _Object | None
    background: int
    bg_rgb: np.ndarray
    bg_rgb2: np.ndarray
    bg_angle: float
    bg_period: float
    size_bucket: int
    position: int


def _split_code(split: str) -> int:
    # zlib.crc32, not hash(): Python's str hash is salted per process.
    return zlib.crc32(split.encode("utf-8"))


def _jitter_colour(colour: int, u: np.ndarray) -> np.ndarray:
    """Named colour with per-channel jitter and a brightness change (3 uniforms in ``u``)."""
    base = _COLOUR_TABLE[colour]
    jitter = (u[:3] - 0.5) * 0.16
    brightness = 0.72 + 0.4 * u[3]
    return np.clip((base + jitter) * brightness, 0.0, 1.0).astype(np.float32)


def _pattern_colour(rgb: np.ndarray, u: float) -> np.ndarray:
    """Second pattern colour: a darker or lighter version of the first, with enough contrast."""
    luminance = float(rgb @ np.array([0.3, 0.59, 0.11], dtype=np.float32))
    darker = luminance > 0.55 or (luminance > 0.3 and u < 0.5)
    return (rgb * 0.3 if darker else rgb + (1.0 - rgb) * 0.7).astype(np.float32)


def _make_object(shape: int, texture: int, colour: int, radius: float, cx: float, cy: float, u: np.ndarray) -> _Object:
    rgb = _jitter_colour(colour, u[0:4])
    return _Object(
        shape=shape,
        colour=colour,
        texture=texture,
        rgb=rgb,
        rgb2=_pattern_colour(rgb, float(u[4])),
        cx=cx,
        cy=cy,
        radius=radius,
        # Objects, like photographed ones, have a canonical pose: tilted, rarely upside down.
        angle=(float(u[5]) - 0.5) * 2.0 * _MAX_TILT,
        period=max(4.0, radius * (0.45 + 0.2 * float(u[6]))),
    )


def _draw_scene(rng: np.random.Generator, coarse: int, texture: int, image_size: int) -> _Scene:
    """Draw every attribute of one image with a fixed number of draws from ``rng``."""
    u = rng.random(40)
    side = float(image_size)
    frac = _RADIUS_RANGE[0] + (_RADIUS_RANGE[1] - _RADIUS_RANGE[0]) * float(u[0])
    radius = frac * side
    size_bucket = int(frac > _SIZE_EDGES[0]) + int(frac > _SIZE_EDGES[1])
    # Centre-biased (triangular) placement, as photographers frame their subject.
    cx = radius + (side - 2 * radius) * 0.5 * float(u[1] + u[36])
    cy = radius + (side - 2 * radius) * 0.5 * float(u[2] + u[37])
    position = 3 * min(2, int(3 * cy / side)) + min(2, int(3 * cx / side))
    if u[38] < TYPICAL_COLOUR_PROB:
        colour = COLOUR_NAMES.index(TYPICAL_COLOURS[coarse])
    else:
        colour = int(u[3] * len(COLOURS))
    main = _make_object(coarse, texture, colour, radius, cx, cy, u[4:11])

    distractor = None
    if u[11] < 0.35:
        other = (coarse + 1 + int(u[12] * (NUM_COARSE - 1))) % NUM_COARSE
        d_radius = radius * (0.35 + 0.2 * float(u[13]))
        d_texture = 0 if u[14] < 0.6 else int(u[15] * len(TEXTURES))
        d_colour = int(u[16] * len(COLOURS))
        distractor = _make_object(
            other, d_texture, d_colour, d_radius,
            d_radius + (side - 2 * d_radius) * float(u[17]),
            d_radius + (side - 2 * d_radius) * float(u[18]),
            u[19:26],
        )  # fmt: skip

    background = int(u[26] * len(BACKGROUNDS))
    bg = (u[27:30] * 0.8 + 0.1).astype(np.float32)
    grey = bg.mean()
    bg = grey + (bg - grey) * (0.25 + 0.6 * float(u[30]))  # desaturate: objects stand out by colour
    if np.abs(bg - main.rgb).mean() < 0.22:  # keep the main object visible
        bg = (1.0 - bg).astype(np.float32)
    bg2 = np.clip(bg + (u[31:34] - 0.5) * 0.5, 0.0, 1.0).astype(np.float32)
    return _Scene(
        main=main,
        distractor=distractor,
        background=background,
        bg_rgb=bg.astype(np.float32),
        bg_rgb2=bg2,
        bg_angle=float(u[34]) * math.pi,
        bg_period=max(3.0, side * (0.08 + 0.12 * float(u[35]))),
        size_bucket=size_bucket,
        position=position,
    )


def _shape_distance(shape: int, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Approximate signed distance (negative inside) in object units; every shape fits in the
    unit disc so the bounding box of radius 1 contains it whatever the rotation."""
    if shape == 0:  # circle
        return np.sqrt(u * u + v * v) - 0.95
    if shape == 1:  # square
        return np.maximum(np.abs(u), np.abs(v)) - 0.68
    if shape == 2:  # triangle (circumradius 0.95), three half-planes
        d = np.maximum(-v, 0.866 * u + 0.5 * v)
        return np.maximum(d, -0.866 * u + 0.5 * v) - 0.475
    if shape == 3:  # five-pointed star in polar form
        r = np.sqrt(u * u + v * v)
        t = np.mod(np.arctan2(v, u) * (5.0 / (2.0 * math.pi)), 1.0)
        return (r - (0.38 + 0.57 * np.abs(2.0 * t - 1.0))) * 0.6
    if shape == 4:  # ring
        return np.abs(np.sqrt(u * u + v * v) - 0.72) - 0.23
    if shape == 5:  # cross: union of two bars
        au, av = np.abs(u), np.abs(v)
        return np.minimum(np.maximum(au - 0.92, av - 0.28), np.maximum(au - 0.28, av - 0.92))
    if shape == 6:  # hexagon (circumradius 0.95)
        d = np.maximum(np.abs(u), np.abs(0.5 * u + 0.866 * v))
        return np.maximum(d, np.abs(0.5 * u - 0.866 * v)) - 0.823
    if shape == 7:  # ellipse, aspect ~1.9
        return (np.sqrt(u * u * (1 / 0.9025) + v * v * 4.0) - 1.0) * 0.5
    if shape == 8:  # heart: a diamond plus two discs on its upper edges
        h, c = 0.8, 0.083
        vv = v - c
        diamond = (np.abs(u) + np.abs(vv) - h) * 0.7071
        lobe = np.sqrt((np.abs(u) - h / 2) ** 2 + (vv + h / 2) ** 2) - 0.7071 * h
        return np.minimum(diamond, lobe)
    # crescent: a disc minus an offset disc
    outer = np.sqrt(u * u + v * v) - 0.95
    inner = np.sqrt((u - 0.45) ** 2 + v * v) - 0.8
    return np.maximum(outer, -inner)


def _fill_pattern(texture: int, u: np.ndarray, v: np.ndarray, obj: _Object) -> np.ndarray | None:
    """Mixing weight of the second colour (0..1), in object coordinates so it rotates with it."""
    if texture == 0:
        return None
    scale = obj.radius / obj.period  # object units -> periods
    if texture == 1:  # stripes
        return np.clip(0.5 + 1.5 * np.sin((2.0 * math.pi * scale) * u), 0.0, 1.0)
    if texture == 2:  # dots on a square lattice, radius 0.3 period
        fu = u * scale
        fv = v * scale
        fu -= np.round(fu)
        fv -= np.round(fv)
        dist = np.sqrt(fu * fu + fv * fv) * obj.period
        return np.clip(0.3 * obj.period + 0.5 - dist, 0.0, 1.0)
    if texture == 3:  # checker, cells of half a period
        w = 2.0 * math.pi * scale  # sign flips every half period
        return np.clip(0.5 + 3.0 * np.sin(w * u) * np.sin(w * v), 0.0, 1.0)
    return np.clip((u + 0.95) * (1.0 / 1.9), 0.0, 1.0)  # linear gradient across the object


def _paint_object(canvas: np.ndarray, obj: _Object) -> np.ndarray:
    """Alpha-composite ``obj`` into ``canvas`` (H, W, 3 float32), touching only its bounding box;
    returns the object's coverage (H, W bool: alpha of at least one half)."""
    size = canvas.shape[0]
    coverage = np.zeros(canvas.shape[:2], dtype=bool)
    reach = obj.radius + 1.0
    x0, x1 = max(0, int(obj.cx - reach)), min(size, int(math.ceil(obj.cx + reach)))
    y0, y1 = max(0, int(obj.cy - reach)), min(size, int(math.ceil(obj.cy + reach)))
    if x0 >= x1 or y0 >= y1:
        return coverage
    inv = 1.0 / obj.radius
    xs = (np.arange(x0, x1, dtype=np.float32) + (0.5 - obj.cx)) * inv
    ys = (np.arange(y0, y1, dtype=np.float32) + (0.5 - obj.cy)) * inv
    cos, sin = math.cos(obj.angle), math.sin(obj.angle)
    u = xs[None, :] * cos + ys[:, None] * sin
    v = ys[:, None] * cos - xs[None, :] * sin
    alpha = np.clip(0.5 - _shape_distance(obj.shape, u, v) * obj.radius, 0.0, 1.0)[..., None]
    weight = _fill_pattern(obj.texture, u, v, obj)
    if weight is None:
        colour = obj.rgb
    else:
        colour = obj.rgb + (obj.rgb2 - obj.rgb) * weight[..., None]
    region = canvas[y0:y1, x0:x1]
    region += (colour - region) * alpha
    coverage[y0:y1, x0:x1] = alpha[..., 0] >= 0.5
    return coverage


class _Grids:
    """Per-image-size constants (pixel coordinates, upsampling matrices), built once."""

    def __init__(self, size: int):
        coords = np.arange(size, dtype=np.float32) + 0.5
        self.x = coords[None, :]
        self.y = coords[:, None]
        # Bilinear upsampling of a 5x5 random field to the image: a smooth "clouds" texture.
        knots = np.linspace(0.0, size, 5, dtype=np.float32)
        weights = np.clip(1.0 - np.abs(coords[:, None] - knots[None, :]) / (size / 4.0), 0.0, 1.0)
        self.upsample = (weights / weights.sum(axis=1, keepdims=True)).astype(np.float32)


def _paint_background(scene: _Scene, grids: _Grids, rng: np.random.Generator, size: int) -> np.ndarray:
    kind = scene.background
    c1, c2 = scene.bg_rgb, scene.bg_rgb2
    if kind == 0:  # plain
        canvas = np.empty((size, size, 3), dtype=np.float32)
        canvas[...] = c1
        return canvas
    if kind == 1:  # per-pixel grain
        sigma = 0.06 + 0.1 * rng.random()
        return c1 + rng.standard_normal((size, size, 1), dtype=np.float32) * sigma
    cos, sin = math.cos(scene.bg_angle), math.sin(scene.bg_angle)
    along = grids.x * cos + grids.y * sin  # (size, size)
    if kind == 2:  # stripes
        weight = np.clip(0.5 + 2.0 * np.sin(along * (2.0 * math.pi / scene.bg_period)), 0.0, 1.0)
    elif kind == 3:  # linear gradient from one corner side to the other
        extent = size * (abs(cos) + abs(sin))
        weight = 0.5 + (along - 0.5 * size * (cos + sin)) * (1.0 / extent)
    elif kind == 4:  # thin grid lines
        across = grids.y * cos - grids.x * sin
        gu = np.abs(np.mod(along / scene.bg_period, 1.0) - 0.5) * scene.bg_period
        gv = np.abs(np.mod(across / scene.bg_period, 1.0) - 0.5) * scene.bg_period
        weight = np.clip(np.maximum(gu, gv) - (scene.bg_period * 0.5 - 1.2), 0.0, 1.0)
    else:  # clouds: smooth low-frequency field
        field = rng.random((5, 5), dtype=np.float32)
        weight = grids.upsample @ field @ grids.upsample.T
    return c1 + (c2 - c1) * weight[..., None]


def _render(scene: _Scene, grids: _Grids, rng: np.random.Generator, size: int) -> np.ndarray:
    canvas = _paint_background(scene, grids, rng, size)
    if scene.distractor is not None:
        _paint_object(canvas, scene.distractor)  # below the main object: labels stay visible
    _paint_object(canvas, scene.main)
    return (np.clip(canvas, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def draw_object_scene(rng: np.random.Generator, size: int,
                      num_objects: int) -> tuple[np.ndarray, list[tuple[int, np.ndarray]]]:
    """Several objects of this dataset's kinds (its shapes, textures and colours, at the pixel size
    its 32 px images show them) on one of its backgrounds: the detection set's scenes.

    Returns the (size, size, 3) uint8 image and, in painting order (later ones on top), each
    object's shape index and full coverage mask (bool); occlusion is left to the caller.
    """
    u = rng.random(9)
    objects = []
    for _ in range(num_objects):
        v = rng.random(13)
        radius = (_RADIUS_RANGE[0] + (_RADIUS_RANGE[1] - _RADIUS_RANGE[0]) * float(v[0])) * 32.0 * (0.8 + 0.4 * v[1])
        radius = min(radius, 0.4 * size)
        cx = radius * 0.5 + (size - radius) * float(v[2])  # may be cut by the border, as in photographs
        cy = radius * 0.5 + (size - radius) * float(v[3])
        shape = int(v[4] * NUM_COARSE)
        typical = v[5] < TYPICAL_COLOUR_PROB
        colour = COLOUR_NAMES.index(TYPICAL_COLOURS[shape]) if typical else int(v[6] * len(COLOURS))
        objects.append(_make_object(shape, int(v[12] * len(TEXTURES)), colour, float(radius), float(cx), float(cy),
                                    v[6:13]))
    bg = (u[0:3] * 0.8 + 0.1).astype(np.float32)
    grey = bg.mean()
    bg = (grey + (bg - grey) * (0.25 + 0.6 * float(u[3]))).astype(np.float32)
    scene = _Scene(main=objects[0], distractor=None, background=int(u[4] * len(BACKGROUNDS)), bg_rgb=bg,
                   bg_rgb2=np.clip(bg + (u[5:8] - 0.5) * 0.5, 0.0, 1.0).astype(np.float32),
                   bg_angle=float(u[8]) * math.pi, bg_period=max(3.0, size * 0.1), size_bucket=0, position=0)
    canvas = _paint_background(scene, _Grids(size), rng, size)
    masks = [(obj.shape, _paint_object(canvas, obj)) for obj in objects]
    return (np.clip(canvas, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8), masks


# ----------------------------------------------------------------------------------------
# Weak annotations.


def _scene_attributes(scene: _Scene) -> dict[str, int]:
    return {
        "shape": scene.main.shape,
        "colour": scene.main.colour,
        "texture": scene.main.texture,
        "background": scene.background,
        "size": scene.size_bucket,
        "position": scene.position,
        "count": int(scene.distractor is not None),
    }


def _spell(tag: str, u_hash: float, u_case: float) -> str:
    """Raw spelling as people type it: mostly ``#lower``, sometimes no ``#``, Title or UPPER."""
    if u_case < 0.12:
        tag = tag.capitalize()
    elif u_case < 0.17:
        tag = tag.upper()
    return "#" + tag if u_hash < 0.8 else tag


def _hashtags(scene: _Scene, rng: np.random.Generator) -> list[str]:
    """Noisy tags: some true tags (per-attribute and per-value keep rates), a tag for the
    distractor, Zipf-distributed wrong and generic tags; 1..10 tags, raw spelling."""
    attributes = _scene_attributes(scene)
    u = rng.random(2 * len(_TAG_ATTRIBUTES) + 2)
    true_tags: list[str] = []
    for i, (name, groups, keep) in enumerate(_TAG_ATTRIBUTES):
        value = attributes[name]
        # Earlier values are tagged more often: true attributes have a long tail too.
        popularity = 1.0 - 0.6 * value / max(1, len(groups) - 1)
        if u[2 * i] < keep * popularity:
            group = groups[value]
            # Preferred spelling about 60% of the time, synonyms share the rest.
            pick = 0 if u[2 * i + 1] < 0.6 else 1 + int((u[2 * i + 1] - 0.6) / 0.4 * (len(group) - 1))
            true_tags.append(group[min(pick, len(group) - 1)])
    if scene.distractor is not None and u[-2] < 0.3:
        true_tags.append(_SHAPE_TAGS[scene.distractor.shape][0])
    n_wrong = int(rng.poisson(0.4))
    n_generic = int(rng.poisson(1.6))
    draws = rng.random(n_wrong + n_generic)
    wrong = [_WRONG_ORDER[int(i)] for i in np.searchsorted(_WRONG_CDF, draws[:n_wrong], side="right")]
    generic = [GENERIC_TAGS[int(i)] for i in np.searchsorted(_GENERIC_CDF, draws[n_wrong:], side="right")]
    tags = list(dict.fromkeys(true_tags + wrong))[:8]
    tags = list(dict.fromkeys(tags + generic))[:10]
    if not tags:
        tags = [GENERIC_TAGS[int(np.searchsorted(_GENERIC_CDF, u[-1], side="right"))]]
    order = rng.permutation(len(tags))
    spelling = rng.random(2 * len(tags))
    return [_spell(tags[j], spelling[2 * k], spelling[2 * k + 1]) for k, j in enumerate(order)]


_SIZE_WORDS = [["small", "tiny", "little"], ["medium-sized", "mid-sized"], ["large", "big"]]
_BACKGROUND_WORDS = [["plain"], ["grainy", "noisy"], ["striped"], ["gradient", "fading"], ["grid"], ["cloudy"]]
_POSITION_PHRASES = [
    "in the top left", "at the top", "in the top right", "on the left", "in the center",
    "on the right", "in the bottom left", "at the bottom", "in the bottom right",
]  # fmt: skip
_TEMPLATES = [
    "{a_obj} on {a_bg} background{pos}{second}",
    "a photo of {a_obj}{pos}",
    "{a_obj}{pos}{second}",
    "there is {a_obj}{pos}{second}",
    "{a_obj} against {a_bg} backdrop",
    "close-up of {a_obj}{second}",
    "an image showing {a_obj}{pos}, {bg} background",
    "{a_obj} drawn on {a_bg} background",
]


def _article(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _pick(options: list[str], u: float) -> str:
    return options[min(int(u * len(options)), len(options) - 1)]


def _colour_word(rgb: np.ndarray) -> str:
    """Name a background colour as a person would: grey levels or the nearest hue."""
    lo, hi = float(rgb.min()), float(rgb.max())
    if hi - lo < 0.12:
        return "white" if lo > 0.8 else "black" if hi < 0.2 else "grey"
    hue = COLOUR_NAMES[int(np.argmin(np.abs(_COLOUR_TABLE - rgb).sum(axis=1)))]
    return ("dark " if hi < 0.4 else "pale " if lo > 0.6 else "") + hue


def _caption(scene: _Scene, rng: np.random.Generator) -> str:
    u = rng.random(16)
    main = scene.main
    shape = SHAPES[main.shape] if u[0] < 0.85 else _pick(_SHAPE_SYNONYMS[main.shape][1:], u[1])
    words = []
    if u[2] < 0.5:
        words.append(_pick(_SIZE_WORDS[scene.size_bucket], u[3]))
    if u[4] < 0.75:
        words.append(COLOUR_NAMES[main.colour])
    if u[5] < 0.7 and not (main.texture == 0 and u[6] < 0.5):
        words.append(_pick(_TEXTURE_SYNONYMS[main.texture][:2], u[6]))
    obj = " ".join([*words, shape])
    bg = f"{_colour_word(scene.bg_rgb)} {_pick(_BACKGROUND_WORDS[scene.background], u[7])}"
    pos = " " + _POSITION_PHRASES[scene.position] if u[8] < 0.6 else ""
    second = ""
    if scene.distractor is not None and u[9] < 0.6:
        other = scene.distractor
        other_phrase = f"{COLOUR_NAMES[other.colour]} {SHAPES[other.shape]}"
        second = _pick([", next to a small ", " with a tiny ", " and a smaller "], u[10]) + other_phrase
    template = _pick(_TEMPLATES, u[11])
    return template.format(a_obj=_article(obj), a_bg=_article(bg), bg=bg, pos=pos, second=second)


# ----------------------------------------------------------------------------------------
# The source.


class SyntheticSource:
    """Procedural labeled images with hashtags and captions (a ``MapSource``).

    ``SyntheticSource(num_images, image_size, seed, split)``: record ``i`` is drawn from
    generators seeded by ``(seed, split, i)``, so it is the same in every process and run.
    """

    def __init__(self, num_images: int = 4000, image_size: int = 32, seed: int = 0, split: str = "train"):
        if num_images < 0:
            raise ValueError(f"num_images must be >= 0, got {num_images}")
        if image_size < 16:
            raise ValueError(f"image_size must be >= 16 to draw recognisable shapes, got {image_size}")
        if not split:
            raise ValueError("split must be a non-empty name such as 'train', 'val' or 'test'")
        self.num_images = int(num_images)
        self.image_size = int(image_size)
        self.seed = int(seed)
        self.split = split
        self._split_code = _split_code(split)
        self._grids = _Grids(self.image_size)
        self._blocks: dict[int, np.ndarray] = {}
        self.class_names: dict[str, list[str]] = {task: list(names) for task, names in CLASS_NAMES.items()}
        self.synonyms: dict[str, list[list[str]]] = {
            task: [list(names) for names in classes] for task, classes in SYNONYMS.items()
        }
        self.hashtag_vocab: list[str] = list(HASHTAG_VOCAB)

    def __len__(self) -> int:
        return self.num_images

    def num_classes(self, task: str) -> int:
        """Number of classes of ``task`` ("coarse": 10, "fine": 50)."""
        if task not in self.class_names:
            raise KeyError(f"unknown task {task!r}; the synthetic dataset has {sorted(self.class_names)}")
        return len(self.class_names[task])

    def _fine_label(self, index: int) -> int:
        block, offset = divmod(index, _BLOCK)
        perm = self._blocks.get(block)
        if perm is None:
            rng = np.random.default_rng([self.seed, self._split_code, 3, block])
            perm = rng.permutation(_BLOCK)
            if len(self._blocks) > 4096:  # bounded cache; recomputing is cheap
                self._blocks.clear()
            self._blocks[block] = perm
        return int(perm[offset])

    def _check(self, index: int) -> int:
        if not 0 <= index < self.num_images:
            raise IndexError(f"index {index} out of range for {self.num_images} synthetic images")
        return int(index)

    def _scene(self, index: int) -> tuple[_Scene, np.random.Generator]:
        fine = self._fine_label(index)
        rng = np.random.default_rng([self.seed, self._split_code, 1, index])
        return _draw_scene(rng, fine // len(TEXTURES), fine % len(TEXTURES), self.image_size), rng

    def attributes(self, index: int) -> dict[str, int]:
        """Ground-truth attribute indices of record ``index`` (shape, colour, texture,
        background, size, position, count), without rendering: for analyses and tests."""
        scene, _ = self._scene(self._check(index))
        return _scene_attributes(scene)

    def _annotation(self, index: int, scene: _Scene) -> Annotation:
        text_rng = np.random.default_rng([self.seed, self._split_code, 2, index])
        main = scene.main
        return Annotation(
            key=f"synthetic-s{self.seed}/{self.split}/{index:08d}",
            hashtags=_hashtags(scene, text_rng),
            caption=_caption(scene, text_rng),
            labels={"coarse": main.shape, "fine": main.shape * len(TEXTURES) + main.texture},
        )

    def annotation(self, index: int) -> Annotation:
        """Record ``index`` without its pixels (nothing is rendered): what statistics and
        hashtag vocabularies read, as for the file sources."""
        index = self._check(index)
        scene, _ = self._scene(index)
        return self._annotation(index, scene)

    def get(self, index: int) -> Record:
        """Render record ``index``; cheap enough to call from data-loader workers."""
        index = self._check(index)
        scene, rng = self._scene(index)
        pixels = _render(scene, self._grids, rng, self.image_size)
        return self._annotation(index, scene).record(Image.fromarray(pixels))  # (H, W, 3) uint8 -> RGB

    __getitem__ = get

"""Writing frames to a video file with PyAV: the one clip writer of the product, the tests and the benchmarks.

``prepretrain data synth --video`` (:mod:`~prepretrain.data.video.motionclips`), the video tests
and the decoding benchmarks all need real encoded files; one writer keeps their container
settings (time base, pixel format, VP8/VP9 speed options) the same.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from fractions import Fraction
from pathlib import Path

import numpy as np

# suffix -> the codec written for it by default (``data synth --video``'s choices)
CODECS = {".mp4": "mpeg4", ".avi": "mpeg4", ".webm": "libvpx", ".mkv": "mjpeg"}
REALTIME_CODECS = ("libvpx", "libvpx-vp9")  # libvpx's default deadline is minutes per clip on one core


def pixel_format(codec: str) -> str:
    """MJPEG stores full-range YUV (``yuvj420p``); the other codecs here store ``yuv420p``."""
    return "yuvj420p" if codec == "mjpeg" else "yuv420p"


def encode_clip(path: str | Path, frames: Iterable[np.ndarray], fps: int = 8, codec: str | None = None) -> None:
    """Write (H, W, 3) uint8 frames (an array (T, H, W, 3) or any iterable of frames) to ``path``,
    frame ``t`` at time ``t / fps``, with ``codec`` or the default codec of the file's suffix (:data:`CODECS`)."""
    import av  # the video extra; imported here so image-only installs never load it

    path = Path(path)
    codec = codec or CODECS[path.suffix]
    frames = iter(frames)
    first = next(frames)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width = first.shape[:2]
        stream.pix_fmt = pixel_format(codec)
        stream.time_base = Fraction(1, fps)
        if codec in REALTIME_CODECS:
            stream.options = {"deadline": "realtime", "cpu-used": "8"}
        for t, image in enumerate(itertools.chain([first], frames)):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
            frame.pts = t
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)

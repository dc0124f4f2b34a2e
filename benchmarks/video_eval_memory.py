"""Peak memory and time of the video evaluation transform on one 1280x720 file, with frames scaled
down while decoding (now) or decoded at full size and resized afterwards (before).

    python benchmarks/video_eval_memory.py --work /tmp/v720

Writes a 96-frame 720p mpeg4 file with PyAV, then runs `EvalClips(16, 4, 224, temporal_views=5,
spatial_views=3)` on it in a fresh process per mode and prints its peak RSS (`ru_maxrss`).
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def frames(count: int = 96, height: int = 720, width: int = 1280):
    """A 720p clip whose red channel ramps across the frame and drifts by one level a frame."""
    for index in range(count):
        image = np.zeros((height, width, 3), np.uint8)
        image[:, :, 0] = (np.arange(width) * 0.2 + index) % 255
        image[:, :, 1] = 100
        yield image


def write_video(path: Path) -> None:
    from prepretrain.data.video.encode import encode_clip

    encode_clip(path, frames(), fps=30, codec="mpeg4")


def measure(path: str, mode: str) -> None:
    import prepretrain.data.video.clips as video

    if mode == "full":
        original = video.decode_frames
        video.decode_frames = lambda *args, **kwargs: original(*args, **{**kwargs, "short_side": 0})
    source = video.RefSource(video.FileVideos([Path(path)], [0], ["x"]))
    clips = video.EvalClips(16, 4, 224, temporal_views=5, spatial_views=3)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    views = clips(source.get(0))["video"]
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"{mode}: views {tuple(views.shape)}, +{(peak - before) // 1024} MB peak, {seconds:.2f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", default="/tmp/v720")
    parser.add_argument("--measure", nargs=2, metavar=("FILE", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        measure(*args.measure)
        return
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    path = work / "v720.mp4"
    if not path.is_file():
        write_video(path)
    for mode in ("full", "scaled"):
        subprocess.run([sys.executable, __file__, "--measure", str(path), mode], check=True)


if __name__ == "__main__":
    main()

"""The default ``prepretrain video`` run on real encoded clips whose classes need motion.

Writes the motion clips of ``prepretrain data synth --video`` (a lightened photo disc sliding
right/left/down/up over a darkened photo; 64 px, 16 frames, mp4/avi/webm in turn, 1200 training
videos and 240 each for val and test), adds two broken files to the training split, runs the
default ``prepretrain video data=DIR`` (video model and single-frame baseline) and prints top-1,
the baseline's top-1, wall time and the unreadable files as results.json names them.

    OMP_NUM_THREADS=1 python benchmarks/video_motion_clips.py --out /tmp/motion_clips [--seed 0] [-- key=value ...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from prepretrain.data.video.motionclips import write_motion_clips


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="working folder (clips in OUT/clips, the run in OUT/run)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("overrides", nargs="*", help="more prepretrain video key=value settings")
    args = parser.parse_args()
    out = Path(args.out)
    clips = out / "clips"
    if not (clips / "test").is_dir():
        started = time.perf_counter()
        write_motion_clips(clips, suffixes=(".mp4", ".avi", ".webm"))
        print(f"wrote {sum(1 for _ in clips.rglob('*.*'))} clips in {time.perf_counter() - started:.1f} s")
    (clips / "train" / "right" / "broken_header.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 not a video")
    head = (clips / "train" / "up" / "000003.mp4").read_bytes()[:300]
    (clips / "train" / "up" / "broken_truncated.webm").write_bytes(head)
    run = out / f"run_seed{args.seed}"
    command = [sys.executable, "-m", "prepretrain.cli", "video", f"data={clips}", f"out_dir={run}",
               f"seed={args.seed}", "progress=false", *args.overrides]
    started = time.perf_counter()
    subprocess.run(command, check=True)
    wall = time.perf_counter() - started
    results = json.loads((run / "results.json").read_text())
    skipped = results.get("skipped", {})
    print(json.dumps({"top1": results["top1"], "single_frame_top1": results.get("single_frame_top1"),
                      "test_videos": results.get("test_videos"), "wall_s": round(wall, 1),
                      "unreadable_files": skipped.get("files"), "distinct_files": skipped.get("distinct_files")},
                     indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

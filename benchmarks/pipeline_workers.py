"""The default pipeline (`prepretrain pipeline`, the CPU demo) with `workers=auto` against `workers=1`,
side by side on this machine: wall time of each, their ratio, and how the per-job results compare.

Run on an otherwise idle machine; each arm starts in a fresh out_dir, so nothing is cached:

    python benchmarks/pipeline_workers.py --out /tmp/pipeline_workers
    python benchmarks/pipeline_workers.py --out /tmp/pw --arms auto,1 --extra seeds=0   # a shorter pair

workers=1 runs one job at a time with every core's torch threads (what `prepretrain pipeline` did
before jobs ran side by side); workers=auto runs one job per core with one thread each. The thread
counts differ, so the results are compared number by number (float sums in another order can
differ in the last bits and grow through training); `--check-bit-exact` adds a tiny pipeline run
with workers=1 threads=1 and workers=2 threads=1, whose results must be identical.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

TINY = ["seeds=0", "num_images=120", "mae_steps=3", "wsp_steps=4", "lit_steps=2", "finetune_steps=2",
        "eval_every=2", "batch_size=16", "evaluations=probe,knn,zeroshot", "tasks=coarse", "random_baseline=false"]


def run(out: Path, arguments: list[str]) -> float:
    """Wall seconds of one `prepretrain pipeline` in a fresh out_dir (its console output in out.log)."""
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(f"{out}.log", "w") as log:
        subprocess.run([sys.executable, "-m", "prepretrain.cli", "pipeline", f"out_dir={out}", *arguments],
                       check=True, stdout=log, stderr=subprocess.STDOUT)
    return time.perf_counter() - start


def numbers(results: dict) -> dict[str, float]:
    flat: dict[str, float] = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                if "second" not in key and key not in ("features_computed", "samples_per_s", "tflops"):
                    walk(f"{prefix}/{key}", inner)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[prefix] = float(value)

    walk("", results)
    return flat


def compare(a: Path, b: Path) -> str:
    """How far two runs' results agree: numbers and whole jobs identical, and the largest difference."""
    left, right = (json.loads((path / "results.json").read_text()) for path in (a, b))
    jobs = sorted(left.keys() & right.keys())
    same_numbers = total = 0
    exact_jobs = []
    worst = (0.0, "", 0.0, 0.0)
    for job in jobs:
        x, y = numbers(left[job]), numbers(right[job])
        keys = x.keys() & y.keys()
        total += len(keys)
        same = [key for key in keys if x[key] == y[key]]
        same_numbers += len(same)
        if len(same) == len(keys):
            exact_jobs.append(job)
        for key in keys:
            if abs(x[key] - y[key]) > worst[0]:
                worst = (abs(x[key] - y[key]), f"{job}{key}", x[key], y[key])
    text = (f"{same_numbers} of {total} numbers identical; {len(exact_jobs)} of {len(jobs)} jobs identical in "
            "every number")
    if worst[1]:
        text += f"; largest difference {worst[1]}: {worst[2]:.6g} vs {worst[3]:.6g}"
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="/tmp/pipeline_workers")
    parser.add_argument("--arms", default="auto,1", help="workers= of each arm, in the order they run")
    parser.add_argument("--extra", nargs="*", default=[], help="more pipeline keys for both arms (key=value)")
    parser.add_argument("--check-bit-exact", action="store_true")
    args = parser.parse_args()
    out = Path(args.out)
    print(f"machine: {os.cpu_count()} cores; pipeline keys: {' '.join(args.extra) or '(the defaults)'}", flush=True)
    walls: dict[str, float] = {}
    for arm in args.arms.split(","):
        walls[arm] = run(out / f"workers_{arm}", [f"workers={arm}", *args.extra])
        print(f"workers={arm}: {walls[arm]:.1f} s ({walls[arm] / 60:.2f} min)", flush=True)
    arms = list(walls)
    if len(arms) == 2:
        a, b = arms
        print(f"ratio workers={a} / workers={b}: {walls[a] / walls[b]:.3f}")
        print(f"results: {compare(out / f'workers_{a}', out / f'workers_{b}')}")
    if args.check_bit_exact:
        one = run(out / "tiny_w1_t1", [*TINY, "workers=1", "threads=1"])
        two = run(out / "tiny_w2_t1", [*TINY, "workers=2", "threads=1"])
        print(f"tiny pipeline, one thread per job: workers=1 {one:.1f} s, workers=2 {two:.1f} s; results: "
              f"{compare(out / 'tiny_w1_t1', out / 'tiny_w2_t1')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

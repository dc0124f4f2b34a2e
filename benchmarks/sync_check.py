"""Count the host syncs inside training steps on CUDA (run on a GPU machine; part of gpu_check.sh).

tests/test_engine.py checks on the CPU that a step reads no tensor value from Python; kernels
that size their output on the host (boolean-mask indexing, ``nonzero``, a blocking host-to-device
copy) sync inside C++ and only CUDA's sync debug mode sees them. This trains tiny MAE, WSP and
LiT runs on CUDA with ``torch.cuda.set_sync_debug_mode("warn")`` switched on inside
``Trainer.step`` (and off while the loader yields a batch) and prints every sync it reports.

    python benchmarks/sync_check.py --out /tmp/sync_check
"""

from __future__ import annotations

import argparse
import collections
import warnings

import torch

from prepretrain.config import build_config
from prepretrain.stages.lit import LiTConfig, LiTStage
from prepretrain.stages.mae import MAEConfig, MAEStage
from prepretrain.stages.wsp import WSPConfig, WSPStage
from prepretrain.train.engine import Trainer, train

COMMON = ["device=cuda", "precision=bf16", "steps=20", "log_every=10", "ckpt_every=100", "progress=false",
          "tensorboard=false", "resume=false"]
RUNS = {
    "mae": (MAEConfig, MAEStage, ["num_images=256", "batch_size=32", "eval_images=32"]),
    "wsp": (WSPConfig, WSPStage, ["num_images=256", "batch_size=32", "eval_images=32", "depth=2"]),
    "lit": (LiTConfig, LiTStage, ["num_images=256", "batch_size=32", "micro_batch_size=16", "eval_images=32"]),
}


def watch_steps() -> None:
    real_step, real_next = Trainer.step, Trainer._next_batch

    def step(self, *args, **kwargs):
        torch.cuda.set_sync_debug_mode("warn")
        try:
            return real_step(self, *args, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    def next_batch(self, *args):
        torch.cuda.set_sync_debug_mode("default")
        try:
            return real_next(self, *args)
        finally:
            torch.cuda.set_sync_debug_mode("warn")

    Trainer.step, Trainer._next_batch = step, next_batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="/tmp/sync_check")
    args = parser.parse_args()
    watch_steps()
    for name, (config, stage, extra) in RUNS.items():
        cfg = build_config(config, None, [*COMMON, *extra, f"out_dir={args.out}/{name}"])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train(stage(cfg))
        syncs = collections.Counter(f"{w.filename}:{w.lineno}: {str(w.message).splitlines()[0][:120]}"
                                    for w in caught if "synchroniz" in str(w.message).lower())
        print(f"{name}: {sum(syncs.values())} host syncs inside {cfg.steps} steps")
        for where, count in syncs.most_common(10):
            print(f"  {count:4d} x {where}")


if __name__ == "__main__":
    main()

"""Commands that are not training stages: data tools and benchmarks.

Each entry is ``{"help": str, "add_arguments": fn(parser), "run": fn(args) -> exit code}``.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from .config import build_config
from .evaluate.commands import EVAL_COMMANDS
from .evaluate.zeroshot import ZEROSHOT_COMMAND
from .plan import PLAN_COMMAND
from .train.checkpoint import EXPORT_COMMAND


def _data_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="action", required=True)
    synth = sub.add_parser("synth", help="write the embedded synthetic dataset to disk (images + JSONL manifests)")
    synth.add_argument("--out", required=True, help="output folder")
    synth.add_argument("--num-images", type=int, default=4000, help="training images (val/test sized from it)")
    synth.add_argument("--image-size", type=int, default=32)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--format", default="png", choices=["png", "jpg"])
    stats = sub.add_parser("stats", help="print statistics of any source (folder, manifest, shards, synthetic)")
    stats.add_argument("source")
    stats.add_argument("--split", default="train")
    stats.add_argument("--sample", type=int, default=200, help="images decoded for size statistics")
    shards = sub.add_parser("shards", help="convert a folder or manifest to WebDataset tar shards")
    shards.add_argument("source")
    shards.add_argument("--out", required=True)
    shards.add_argument("--split", default="train")
    shards.add_argument("--samples-per-shard", type=int, default=1000)
    shards.add_argument("--prefix", default="shard")


def _data_run(args: argparse.Namespace) -> int:
    if args.data_command == "synth":
        from .data.synthetic import write_synthetic

        out = write_synthetic(args.out, num_images=args.num_images, image_size=args.image_size, seed=args.seed,
                              image_format=args.format)
        print(f"wrote the synthetic dataset to {out}")
        return 0
    from .data.loader import open_data

    source = open_data(args.source, split=args.split)
    if args.data_command == "stats":
        from .data.sources import describe_source

        print(json.dumps(describe_source(source, sample=args.sample), indent=2))
        return 0
    from .data.shards import write_shards

    paths = write_shards(source, args.out, samples_per_shard=args.samples_per_shard, prefix=args.prefix)
    print(f"wrote {len(paths)} shards to {args.out}")
    return 0


def _bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("what", choices=["mae", "vit", "data", "lit"],
                        help="mae/vit: model step; data: decoding pipeline; lit: cached vs uncached LiT step")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    parser.epilog = (
        "Examples:\n  prepretrain bench mae model=vit_b16 batch_size=64 device=cuda precision=bf16\n"
        "  prepretrain bench mae model=vit_micro4 image_size=32 batch_size=64 device=cpu\n"
        "  prepretrain bench data\n"
    )


def _bench_run(args: argparse.Namespace) -> int:
    if args.what == "lit":
        from .stages.lit import LiTBenchConfig, print_lit_benchmark, run_lit_benchmark

        print_lit_benchmark(run_lit_benchmark(build_config(LiTBenchConfig, None, args.overrides)))
        return 0
    if args.what == "data":
        from .data.bench import BenchDataConfig, run_data_benchmark

        run_data_benchmark(build_config(BenchDataConfig, None, args.overrides))
        return 0
    from .bench import BenchConfig, print_result, run_benchmark

    cfg = build_config(BenchConfig, None, [*args.overrides, f"target={args.what}"])
    print_result(run_benchmark(cfg))
    return 0


COMMANDS: dict[str, dict[str, Any]] = {
    "data": {"help": "make, inspect and convert datasets", "add_arguments": _data_arguments, "run": _data_run},
    "bench": {"help": "throughput benchmarks (samples/s, TFLOP/s, MFU)", "add_arguments": _bench_arguments,
              "run": _bench_run},
    **EVAL_COMMANDS,  # probe, lowshot, knn
    "zeroshot": ZEROSHOT_COMMAND,
    "plan": PLAN_COMMAND,
    "export": EXPORT_COMMAND,
}


def _pipeline_arguments(parser: argparse.ArgumentParser) -> None:
    from .config import add_config_arguments

    add_config_arguments(parser, "YAML file of pipeline keys")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the plan (stages, FLOPs, memory per GPU, time on gpus=N) and exit")
    parser.epilog = (
        "Runs MAE; WSP from MAE; WSP from scratch (same budget); MAE alone; LiT on both WSP towers; and the\n"
        "transfer suite for every encoder, over seeds; then writes report.md and report.html in out_dir.\n"
        "Examples:\n  prepretrain pipeline\n  prepretrain pipeline seeds=0,1,2 out_dir=runs/pp3\n"
        "  prepretrain pipeline --dry-run --config configs/pipeline_vit_b16.yaml gpus=64\n"
    )


def _pipeline_run(args: argparse.Namespace) -> int:
    from .config import dump_config
    from .pipeline import PipelineConfig, dry_run, run_pipeline

    cfg = build_config(PipelineConfig, args.config, args.overrides)
    if args.print_config:
        print(dump_config(cfg), end="")
    elif args.dry_run:
        print(dry_run(cfg))
    else:
        run_pipeline(cfg)
    return 0


COMMANDS["pipeline"] = {"help": "MAE -> WSP -> transfer beside the baselines, over seeds, with a report",
                        "add_arguments": _pipeline_arguments, "run": _pipeline_run}

"""``prepretrain <command> [--config FILE] [key=value ...]``: parse, build the config, call.

The only module that parses arguments. Configured commands (training stages, evaluations)
come from :mod:`prepretrain.registry`; the tools (data, bench, plan, export, pipeline) are
declared below. With no arguments each training command runs the CPU demo on the embedded
synthetic dataset. Config mistakes exit with code 2 and a message naming the key, before any
compute.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import typing
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from .bench.data import BenchDataConfig, run_data_benchmark
from .bench.steps import (
    END_TO_END_STAGES,
    STEP_TARGETS,
    BenchConfig,
    LiTBenchConfig,
    StageRunFailed,
    print_end_to_end,
    print_lit_benchmark,
    print_step_results,
    run_benchmark,
    run_end_to_end,
    run_lit_benchmark,
)
from .config import ConfigError, build_config, dump_config, parse_overrides
from .data.commands import DATA_ACTIONS
from .data.describe import check_source, describe_source
from .data.labels.vocab import build_label_vocab, coverage_text, tag_aliases
from .data.labels.weaklabels import WeakLabeler
from .data.readers.open import open_data
from .data.shards.write import write_shards
from .data.synthetic.export import write_rehearsal_data, write_synthetic
from .data.video.clips import describe_video_data, is_video_dataset
from .data.video.motionclips import write_motion_clips
from .failures import DISK_ERRORS, EXIT_PREEMPTED, expected_failure  # noqa: F401 - DISK_ERRORS: public
from .files import write_text
from .models.convert import TARGETS, convert
from .pipeline import (
    JobsFailed,
    PipelineConfig,
    PipelineStopped,
    dry_run,
    pipeline_status,
    rehearsal_config,
    run_pipeline,
)
from .plan import PlanConfig, format_plan, plan_run
from .registry import COMMANDS, Command
from .train.checkpoint import checkpoint_step, export_weights, resolve_checkpoint

DEBUG_ENV = "PREPRETRAIN_DEBUG"  # =1: expected failures show their traceback too (as --debug)
@dataclass(frozen=True)
class Tool:
    """A command with its own arguments (not a config dataclass)."""

    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


def add_config_arguments(parser: argparse.ArgumentParser, config_help: str = "YAML file of key: value settings"
                         ) -> None:
    """The arguments every configured command shares: ``--config``, ``--print-config``, ``key=value``."""
    parser.add_argument("--config", help=f"{config_help} (applied before overrides)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", metavar="key=value")


# ------------------------------------------------------------------------ configured commands


def configured(command: Command) -> Tool:
    """A registry command as a CLI tool: build the config, run, print the results."""

    def add_arguments(parser: argparse.ArgumentParser) -> None:
        add_config_arguments(parser)
        keys = ", ".join(f.name for f in fields(command.config))
        parser.epilog = f"Overrides are key=value pairs applied after --config; see --print-config for every key.\n" \
                        f"{command.examples}\nKeys: {keys}\n"

    def run(args: argparse.Namespace) -> int:
        cfg = build_config(command.config, args.config, args.overrides)
        if args.print_config:
            print(dump_config(cfg), end="")
            return 0
        print_results(command.run(cfg) or {})
        return 0

    return Tool(command.help, add_arguments, run)


def print_results(results: dict[str, Any]) -> None:
    """The scalar results, one per line; where they were written last."""
    shown = {k: v for k, v in results.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
    width = max((len(k) for k in shown), default=0)
    for key, value in shown.items():
        print(f"  {key:<{width}}  {value:.4f}" if isinstance(value, float) else f"  {key:<{width}}  {value}")
    if results.get("evaluation") == "zeroshot":
        print(f"zero-shot {results['task']} on {results['data']}/{results['split']}: top-1 {results['top1']:.2f}%  "
              f"top-5 {results['top5']:.2f}%  ({results['num_images']} images, {results['num_classes']} classes, "
              f"{results['num_templates']} templates)")
    if results.get("out_dir"):
        print(f"wrote {results['out_dir']}/results.json")


# ------------------------------------------------------------------------------------ tools


DATA_HELP = {
    "synth": "write the embedded synthetic dataset to disk (images + JSONL manifests; with video=true, motion clips "
             "as video files in class folders)",
    "stats": "print statistics of any source (folder, manifest, shards, synthetic; a video dataset's layout, "
             "classes and videos per split)",
    "vocab": "count labels (hashtags, Flickr tags, caption words or WordNet synsets) in one streaming pass (no image "
             "decoded), print their coverage and write the vocabulary WSP reads with vocab=FILE",
    "shards": "convert a folder or manifest to WebDataset tar shards",
    "check": "validate every row of a manifest (or annotation of a source) without decoding images; bad rows are "
             "named by file:line (exit 3 if any)",
    "rehearsal": "write a small copy of the paper-scale data layout (pretraining shards with hashtags and captions, "
                 "a labelled evaluation folder) and a pipeline config that runs a paper pipeline config on it with "
                 "only model size, budgets and hardware overridden",
}


def _data_flags(parser: argparse.ArgumentParser, action: str) -> None:
    """The ``--flag value`` spelling of every key of a ``data`` action (``--num-images`` is
    ``num_images=``); a flag not given is absent, so it never overrides ``--config``."""
    hints = typing.get_type_hints(DATA_ACTIONS[action])
    for f in fields(DATA_ACTIONS[action]):
        flag = "--" + f.name.replace("_", "-")
        help = f.metadata.get("help", "") + (f" (default {f.default})" if f.default not in ("", False) else "")
        if hints[f.name] is bool:
            parser.add_argument(flag, dest=f.name, action="store_true", default=argparse.SUPPRESS, help=help)
        else:
            parser.add_argument(flag, dest=f.name, type=hints[f.name], default=argparse.SUPPRESS, metavar="VALUE",
                                help=help)


def _data_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="action", required=True)
    for action, config in DATA_ACTIONS.items():
        child = sub.add_parser(action, help=DATA_HELP[action], description=DATA_HELP[action],
                               formatter_class=argparse.RawDescriptionHelpFormatter)
        child.add_argument("--config", help="YAML file of key: value settings (applied before overrides)")
        child.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
        _data_flags(child, action)
        # REMAINDER: SOURCE, key=value pairs and flags in any order (split in _data_config)
        child.add_argument("words", nargs=argparse.REMAINDER, metavar="[SOURCE] key=value",
                           help="the source (for stats, vocab, shards, check) and key=value overrides")
        child.epilog = "Keys (key=value or --key-with-dashes VALUE): " + ", ".join(f.name for f in fields(config))


def _data_config(args: argparse.Namespace) -> Any:
    """The action's config: defaults, ``--config``, then flags and ``key=value`` words in the order given
    (a first word without ``=`` is the source)."""
    action = args.data_command
    config = DATA_ACTIONS[action]
    flags = argparse.ArgumentParser(prog=f"prepretrain data {action}", add_help=False)
    _data_flags(flags, action)
    parsed, words = flags.parse_known_args(args.words)
    keys = {f.name for f in fields(config)}
    overrides = {name: value for name, value in vars(args).items() if name in keys}
    overrides.update(vars(parsed))
    if words and "=" not in words[0] and not words[0].startswith("-") and "source" in keys:
        overrides["source"] = words.pop(0)
    unknown = [word for word in words if "=" not in word]
    if unknown:
        raise ConfigError(unknown[0], f"not a key=value pair or an option of prepretrain data {action}")
    overrides.update(parse_overrides(words))
    return build_config(config, args.config, overrides)


def _data_run(args: argparse.Namespace) -> int:
    cfg = _data_config(args)
    if args.print_config:
        print(dump_config(cfg), end="")
        return 0
    action = args.data_command
    if action == "synth" and cfg.video:
        out = write_motion_clips(cfg.out, num_videos=cfg.num_images or 1200, size=cfg.image_size or 64,
                                 frames=cfg.frames, fps=cfg.fps, seed=cfg.seed, suffixes=cfg.clip_suffixes)
        print(f"wrote the motion clips to {out} (prepretrain video data={out})")
        return 0
    if action == "synth":
        out = write_synthetic(cfg.out, num_images=cfg.num_images or 4000, image_size=cfg.image_size or 32,
                              seed=cfg.seed, image_format=cfg.format or "png")
        print(f"wrote the synthetic dataset to {out}")
        return 0
    if action == "rehearsal":
        return _rehearsal(cfg)
    if action == "vocab":
        try:
            labels = WeakLabeler(cfg.labels_from, cfg.synset_table)
        except ValueError as error:
            raise ConfigError("labels_from", str(error)) from None
        source = open_data(cfg.source, split=cfg.split, hashtag_field=cfg.hashtag_field,
                           caption_field=cfg.caption_field, metadata=cfg.metadata, metadata_key=cfg.metadata_key)
        vocab, coverage = build_label_vocab(source, labels, min_count=cfg.min_count, max_size=cfg.size,
                                            aliases=tag_aliases(source, cfg.synonyms, labels),
                                            max_distinct=cfg.max_distinct)
        path = vocab.save(cfg.out)
        print(f"wrote {len(vocab)} {labels.labels_from} labels to {path}")
        print(coverage_text(coverage))
        return 0
    if action == "stats" and (cfg.video or is_video_dataset(Path(cfg.source))):
        print(json.dumps(describe_video_data(cfg.source, cfg.video_dir), indent=2))
        return 0
    source = open_data(cfg.source, split=cfg.split)
    if action == "check":
        report = check_source(source, max_errors=cfg.max_errors)
        print(json.dumps(report, indent=2))
        return 3 if report["bad_rows"] else 0
    if action == "stats":
        print(json.dumps(describe_source(source, max_images=cfg.sample), indent=2))
        return 0
    paths = write_shards(source, cfg.out, samples_per_shard=cfg.samples_per_shard, prefix=cfg.prefix)
    print(f"wrote {len(paths)} shards to {cfg.out}")
    return 0


def _rehearsal(cfg: Any) -> int:
    out = Path(cfg.out)
    data = {"data": str(out / "data" / "pretrain"), "eval_data": str(out / "data" / "eval")}
    values = rehearsal_config(cfg.pipeline, data["data"], data["eval_data"], str(out / "runs"), steps=cfg.steps,
                              seeds=(cfg.seed,))  # a bad pipeline config stops here, before any file is written
    if write_rehearsal_data(out / "data", num_images=cfg.num_images, seed=cfg.seed) != data:
        raise RuntimeError("write_rehearsal_data wrote elsewhere than planned")
    config = out / "pipeline.yaml"
    write_text(config, f"# prepretrain data rehearsal of {cfg.pipeline}: the paper recipes with only the model size, "
                       "budgets and hardware\n# overridden (recipe_overrides); run it with the command below.\n"
                       + yaml.safe_dump(values, sort_keys=False))
    print(f"wrote {cfg.num_images} pretraining images as shards ({data['data']}), a labelled evaluation folder "
          f"({data['eval_data']}) and {config}\nrun it:\n  prepretrain pipeline --config {config}")
    return 0


def _bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("what", choices=[*STEP_TARGETS, "lit", "data"],
                        help="a stage's training step beside the reference-style baseline (mae, wsp, finetune, "
                             "vit, video, detect); lit: cached features vs the locked tower every step; "
                             "data: the input pipeline per core")
    # REMAINDER: the flags below may come before or after the key=value pairs (split in _bench_run)
    parser.add_argument("overrides", nargs=argparse.REMAINDER, metavar="key=value",
                        help="benchmark keys (README: Benchmarks); with --end-to-end, the stage's own keys")
    parser.add_argument("--end-to-end", action="store_true",
                        help="run the real stage (its data, loader and engine) twice: as configured and with the "
                             "baseline's decode=pil compile=false precision=fp16|fp32; figures from metrics.jsonl")
    parser.add_argument("--no-baseline", action="store_true", help="time the prepretrain path only")
    parser.add_argument("--out", default="", help="--end-to-end: where the two runs go (default: a temp folder)")
    parser.epilog = (
        "Examples:\n  prepretrain bench mae model=vit_b16 batch_size=256 device=cuda\n"
        "  prepretrain bench mae model=vit_s16 batch_size=8 device=cpu threads=2\n"
        "  prepretrain bench wsp model=vit_l16 num_classes=28000 device=cuda\n"
        "  prepretrain bench detect model=vit_b16 image_size=1024 window_size=14 pyramid_channels=256\n"
        "  prepretrain bench mae --end-to-end data=/data/shards/{000000..000099}.tar steps=60 log_every=10\n"
        "  prepretrain bench data\n  prepretrain bench lit\n"
    )


def _bench_flags(args: argparse.Namespace) -> None:
    """Move the bench flags that followed the key=value pairs out of ``args.overrides``."""
    rest, words = [], iter(args.overrides)
    for word in words:
        if word == "--end-to-end":
            args.end_to_end = True
        elif word == "--no-baseline":
            args.no_baseline = True
        elif word == "--out":
            args.out = next(words, "")
        elif word.startswith("--out="):
            args.out = word.split("=", 1)[1]
        elif word.startswith("-"):
            raise ConfigError(word, "unknown option of prepretrain bench (options: --end-to-end, --no-baseline, --out)")
        else:
            rest.append(word)
    args.overrides = rest


def _bench_run(args: argparse.Namespace) -> int:
    _bench_flags(args)
    if args.no_baseline and args.what in ("lit", "data"):
        raise ConfigError("--no-baseline", f"bench {args.what} always prints all of its paths")
    if args.end_to_end:
        if args.what not in END_TO_END_STAGES:
            raise ConfigError("target", f"--end-to-end runs one of {', '.join(END_TO_END_STAGES)}")
        try:
            print_end_to_end(run_end_to_end(args.what, args.overrides, args.out, baseline=not args.no_baseline))
        except StageRunFailed as error:
            print(f"prepretrain bench: {error}", file=sys.stderr)
            return error.code
    elif args.what == "lit":
        print_lit_benchmark(run_lit_benchmark(build_config(LiTBenchConfig, None, args.overrides)))
    elif args.what == "data":
        run_data_benchmark(build_config(BenchDataConfig, None, args.overrides))
    else:
        extra = ["baseline=false"] if args.no_baseline else []
        print_step_results(run_benchmark(build_config(BenchConfig, None, [*args.overrides, *extra,
                                                                     f"target={args.what}"])))
    return 0


def _plan_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print the plan as JSON")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    keys = ", ".join(f.name for f in fields(PlanConfig))
    parser.epilog = (
        "Examples:\n  prepretrain plan model=vit_6.5b14 gpus=8 strategy=fsdp batch_size=4096 micro_batch_size=16 "
        "grad_checkpointing=true\n  prepretrain plan model=vit_b16 stage=wsp gpus=8 batch_size=8192\n"
        f"\nKeys: {keys}\n"
    )


def _plan_run(args: argparse.Namespace) -> int:
    plan = plan_run(build_config(PlanConfig, None, args.overrides))
    print(json.dumps(plan, indent=2) if args.json else format_plan(plan))
    return 0


def _export_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoint", help="a run folder (newest checkpoint), step_XXXXXXXX.pt or a step_XXXXXXXX/ "
                                           "DCP folder")
    parser.add_argument("--out", help="output .safetensors (default: <run>/export_step_XXXXXXXX.safetensors)")
    parser.add_argument("--part", default="model", choices=["model", "encoder"],
                        help="model: every weight; encoder: the timm ViT part of an MAE")
    parser.epilog = (
        "Examples:\n  prepretrain export runs/mae\n"
        "  prepretrain export runs/mae/checkpoints/step_00001000 --part encoder --out mae_encoder.safetensors\n"
    )


def _export_run(args: argparse.Namespace) -> int:
    source = resolve_checkpoint(args.checkpoint)
    out = args.out or source.parent.parent / f"export_step_{checkpoint_step(source):08d}.safetensors"
    path = export_weights(source, out, args.part)
    print(f"wrote {path} from {source}")
    return 0


def _convert_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("source", help="a weights file (.safetensors/.pt/.pth), a run directory, or a released name "
                                       "such as maws:vit_h14 (see prepretrain.models.zoo)")
    parser.add_argument("out", help="the file (or, for --to timm, the folder) to write")
    parser.add_argument("--to", default="prepretrain", choices=TARGETS,
                        help="prepretrain: safetensors in prepretrain's layout with metadata (default); "
                             "safetensors: same names, safe container; timm: a timm hub folder; "
                             "torchvision: torchvision VisionTransformer names; open_clip: a CLIP model (LiT run, "
                             "MAWS-CLIP file) as the folder open_clip loads with local-dir:")
    parser.add_argument("--model", default="", help="architecture name when the file does not say (vit_b16, ...)")
    parser.add_argument("--tokenizer", default="", help="--to open_clip of an official MAWS-CLIP file: its XLM-R "
                                                        "SentencePiece .model (LiT runs carry their tokenizer)")
    parser.add_argument("--activation", default="quick_gelu", choices=("quick_gelu", "gelu"),
                        help="--to open_clip of an OpenAI-layout CLIP file: its towers' activation (OpenAI's released "
                             "models: quick_gelu, the default; the weights do not say)")
    parser.add_argument("--hub-repo", default="", metavar="ORG/NAME",
                        help="--to open_clip: write the folder for that model-hub repository, to upload and load with "
                             "hf-hub:ORG/NAME (needs an image tower timm has a registered name for); default: a "
                             "folder for local-dir: loading")
    parser.epilog = (
        "Examples:\n  prepretrain convert swag_vit_b16.pth vit_b16_swag.safetensors\n"
        "  prepretrain convert maws:vit_h14 exports/maws_vit_h14 --to timm\n"
        "  prepretrain convert runs/wsp/encoder.safetensors wsp_torchvision.pth --to torchvision\n"
        "  prepretrain convert runs/lit exports/lit_open_clip --to open_clip\n"
        "  prepretrain convert vit_b16_xlmr_b_maws_clip.pt exports/maws_clip_b16 --to open_clip "
        "--tokenizer xlmr.sentencepiece.bpe.model\n"
        "  prepretrain convert ViT-B-16.pt exports/openai_b16 --to open_clip            # an OpenAI-layout CLIP file\n"
        "Then in plain timm: timm.create_model('local-dir:exports/maws_vit_h14', pretrained=True)\n"
        "and in open_clip: open_clip.create_model_and_transforms('local-dir:exports/lit_open_clip'),\n"
        "open_clip.get_tokenizer('local-dir:exports/lit_open_clip'). An open_clip folder names its tower\n"
        "configs by absolute path: after moving it, convert again (--hub-repo ORG/NAME: a folder to upload\n"
        "to that hub repository and load with hf-hub:ORG/NAME).\n"
    )


def _convert_run(args: argparse.Namespace) -> int:
    path = convert(args.source, args.out, to=args.to, model=args.model, tokenizer=args.tokenizer,
                   quick_gelu=args.activation == "quick_gelu", hub_repo=args.hub_repo)
    print(f"wrote {path} from {args.source} ({args.to})")
    return 0


def _pipeline_arguments(parser: argparse.ArgumentParser) -> None:
    add_config_arguments(parser, "YAML file of pipeline keys")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the plan (stages, FLOPs, memory per GPU, time on gpus=N; with executor=slurm the "
                             "sbatch resources of every job, the critical path and the GPU-hours) and exit")
    parser.epilog = (
        "Runs MAE; WSP from MAE; the control: WSP from the untrained MAE initialisation (control_arms=true);\n"
        "WSP from scratch (same budget); LiT on every WSP tower; and the transfer suite for every encoder\n"
        "(MAE and the untrained MAE init alone included), over seeds; then report.md and report.html in\n"
        "out_dir, whose verdict reads the paired contrasts: MAE learning (MAE->WSP minus MAE init->WSP)\n"
        "and init scheme (MAE init->WSP minus WSP). eval_sets=NAME=PATH adds transfer sets (ImageNet, iNat,\n"
        "Food-101 layouts read as released); classify_sets=NAME=PATH[@SPLIT][+real] scores every finetuned\n"
        "model on benchmarks (ImageNet-v2, ReaL, ObjectNet) without more training.\n"
        "Every job runs as its own process: executor=local (default) runs jobs side by side as their\n"
        "dependencies finish (workers=auto: one per CPU core or GPU); executor=slurm queues the whole graph\n"
        "through submitit (pip install 'prepretrain[slurm]'), each job with its own resources.\n"
        "'prepretrain pipeline status out_dir=DIR' prints every job's state, SLURM id and log.\n"
        "Sweeps: several values of model, mae_steps (mae_epochs) or wsp_steps (wsp_epochs) run every\n"
        "combination (MAE budget 0 = the control arm) and the report draws the paper's Figs. 3-5; growing a\n"
        "sweep (values added after the first) runs only the new points' jobs.\n"
        "Examples:\n  prepretrain pipeline\n  prepretrain pipeline seeds=0,1,2,3 out_dir=runs/pp4 workers=2\n"
        "  prepretrain pipeline --config configs/sweep_demo.yaml\n"
        "  prepretrain pipeline mae_steps=200,0,600 wsp_steps=150,50 evaluations=probe seeds=0,1\n"
        "  prepretrain pipeline --dry-run --config configs/figure3_model_size.yaml\n"
        "  prepretrain pipeline status out_dir=runs/pp4\n"
        "  prepretrain pipeline --dry-run --config configs/pipeline_vit_b16.yaml gpus=64 executor=slurm\n"
        "  prepretrain pipeline --config configs/pipeline_vit_b16.yaml executor=slurm slurm_partition=gpu "
        "slurm_account=vision\n"
    )


def _pipeline_run(args: argparse.Namespace) -> int:
    overrides = list(args.overrides)
    status = bool(overrides) and overrides[0] == "status"
    if status:
        overrides = overrides[1:]
    cfg = build_config(PipelineConfig, args.config, overrides)
    if status:
        print(pipeline_status(cfg))
    elif args.print_config:
        print(dump_config(cfg), end="")
    elif args.dry_run:
        print(dry_run(cfg))
    else:
        try:
            run_pipeline(cfg)
        except JobsFailed as failed:  # every job that could run has run; the failed ones are named with their logs
            print(f"prepretrain pipeline: {failed}", file=sys.stderr)
            return EXIT_PREEMPTED if isinstance(failed, PipelineStopped) else 1
    return 0


def all_commands() -> dict[str, Tool]:
    """Every ``prepretrain`` command, in the order ``--help`` lists them."""
    tools = {name: configured(command) for name, command in COMMANDS.items()}
    tools.update({
        "pipeline": Tool("MAE -> WSP -> transfer beside the baselines, over seeds, with a report",
                         _pipeline_arguments, _pipeline_run),
        "data": Tool("make, inspect and convert datasets", _data_arguments, _data_run),
        "bench": Tool("throughput benchmarks (samples/s, TFLOP/s, MFU)", _bench_arguments, _bench_run),
        "plan": Tool("estimate memory per GPU and FLOPs per step of a run (meta device: no GPU needed)",
                     _plan_arguments, _plan_run),
        "export": Tool("consolidate a (sharded) training checkpoint into one safetensors file",
                       _export_arguments, _export_run),
        "convert": Tool("convert a checkpoint between layouts: prepretrain, safetensors, timm hub folder, torchvision, "
                        "open_clip folder",
                        _convert_arguments, _convert_run),
    })
    return tools


def build_parser(commands: dict[str, Tool]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prepretrain",
        description="MAE pre-pretraining -> weakly supervised pretraining -> transfer, for ViTs (MAWS).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--debug", action="store_true", help=f"show the traceback of any failure (or {DEBUG_ENV}=1)")
    sub = parser.add_subparsers(dest="command", metavar="command")
    for name, tool in commands.items():
        child = sub.add_parser(name, help=tool.help, description=tool.help,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
        tool.add_arguments(child)
        child.set_defaults(_run=tool.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(all_commands())
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 0
    try:
        return int(args._run(args) or 0)
    except ConfigError as error:
        print(f"prepretrain {args.command}: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # noqa: BLE001 - sorted into expected failures and bugs below
        failure = expected_failure(error)
        if failure is None or args.debug or os.environ.get(DEBUG_ENV):
            raise
        code, message = failure
        print(f"prepretrain {args.command}: {' '.join(message.split())}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())

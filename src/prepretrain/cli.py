"""``prepretrain <command> [--config FILE] [key=value ...]``: parse, build the config, call.

Each training command takes an optional YAML file and ``key=value`` overrides; with none it
runs the CPU demo on the embedded synthetic dataset. Config mistakes exit with code 2 and a
message naming the key, before any compute.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import fields
from typing import Any

from .config import ConfigError, build_config, dump_config

TRAINING_EPILOG = """\
Overrides are key=value pairs applied after --config; see --print-config for every key.
Examples:
  prepretrain {name}
  prepretrain {name} out_dir=runs/my_{name} seed=1 steps=200
  prepretrain {name} --config configs/{name}_vit_b16.yaml data=/path/to/images device=cuda
"""


def _training_command(name: str, config_cls: Callable[[], Any], stage_cls: Callable[[Any], Any],
                      description: str) -> dict[str, Any]:
    def run(args: argparse.Namespace) -> int:
        cfg = build_config(config_cls, args.config, args.overrides)
        if args.print_config:
            print(dump_config(cfg), end="")
            return 0
        from .train.engine import train

        results = train(stage_cls(cfg))
        if results:
            _print_results(results)
        return 0

    def add_arguments(parser: argparse.ArgumentParser) -> None:
        from prepretrain.config import add_config_arguments

        add_config_arguments(parser)
        keys = ", ".join(f.name for f in fields(config_cls))
        parser.epilog = TRAINING_EPILOG.format(name=name) + f"\nKeys: {keys}\n"

    return {"help": description, "run": run, "add_arguments": add_arguments}


def _print_results(results: dict[str, Any]) -> None:
    shown = {k: v for k, v in results.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
    width = max(len(k) for k in shown) if shown else 0
    for key, value in shown.items():
        text = f"{value:.4f}" if isinstance(value, float) else str(value)
        print(f"  {key:<{width}}  {text}")


def _commands() -> dict[str, dict[str, Any]]:
    from .stages.finetune import FinetuneConfig, FinetuneStage
    from .stages.lit import LiTConfig, LiTStage
    from .stages.mae import MAEConfig, MAEStage
    from .stages.wsp import WSPConfig, WSPStage

    commands = {
        "mae": _training_command("mae", MAEConfig, MAEStage, "MAE pre-pretraining (masked autoencoder)"),
        "finetune": _training_command("finetune", FinetuneConfig, FinetuneStage, "full finetuning on a labeled task"),
        "wsp": _training_command("wsp", WSPConfig, WSPStage, "WSP: weakly supervised hashtag pretraining"),
        "lit": _training_command("lit", LiTConfig, LiTStage, "LiT: train a text tower against a locked image tower"),
    }
    from . import commands as extra

    commands.update(extra.COMMANDS)
    return commands


def build_parser(commands: dict[str, dict[str, Any]]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prepretrain",
        description="MAE pre-pretraining -> weakly supervised pretraining -> transfer, for ViTs (MAWS).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", metavar="command")
    for name, spec in commands.items():
        child = sub.add_parser(name, help=spec["help"], description=spec["help"],
                               formatter_class=argparse.RawDescriptionHelpFormatter)
        spec["add_arguments"](child)
        child.set_defaults(_run=spec["run"])
    return parser


def main(argv: list[str] | None = None) -> int:
    commands = _commands()
    parser = build_parser(commands)
    args = parser.parse_args(argv)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 0
    try:
        return int(args._run(args) or 0)
    except ConfigError as error:
        print(f"prepretrain {args.command}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

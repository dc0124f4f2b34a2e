"""CLI entries ``prepretrain probe | lowshot | knn`` (registered in ``prepretrain.commands``)."""

from __future__ import annotations

import argparse
from dataclasses import fields
from typing import Any

from ..config import build_config, dump_config

EPILOG = """\
encoder= takes a run directory (mae/wsp/lit: encoder.safetensors), a weights file (timm, MAWS,
MAE full, MAWS CLIP; add model=NAME when the file has no metadata), or nothing (random init).
Frozen features are cached (cache_dir, default <parent of out_dir>/feature_cache) and shared by
probe, lowshot and knn. Results: <out_dir>/results.json (accuracies in percent) + config.yaml.
Examples:
  prepretrain {name}
  prepretrain {name} encoder=runs/mae out_dir=runs/eval/{name}
  prepretrain {name} encoder=maws_vit_b16.pt model=vit_b16 data=/data/imagenet device=cuda
"""

DESCRIPTIONS = {
    "probe": "linear probe on frozen features (logistic regression, or the MAE BatchNorm+linear head)",
    "lowshot": "low-shot transfer: K images per class, seeded splits (linear classifier or VPT prompts)",
    "knn": "weighted kNN classifier on frozen features (cosine, k=20, T=0.07)",
}


def evaluation_command(name: str) -> dict[str, Any]:
    """The ``{"help", "add_arguments", "run"}`` spec of one evaluation command."""

    def config_class():
        from .runner import EVALUATIONS

        return EVALUATIONS[name][0]

    def add_arguments(parser: argparse.ArgumentParser) -> None:
        from prepretrain.config import add_config_arguments

        add_config_arguments(parser)
        keys = ", ".join(f.name for f in fields(config_class()))
        parser.epilog = EPILOG.format(name=name) + f"\nKeys: {keys}\n"

    def run(args: argparse.Namespace) -> int:
        cfg = build_config(config_class(), args.config, args.overrides)
        if args.print_config:
            print(dump_config(cfg), end="")
            return 0
        from .runner import run_evaluation

        results = run_evaluation(cfg)
        shown = {k: v for k, v in results.items() if isinstance(v, (int, float, str)) and not isinstance(v, bool)}
        width = max(len(k) for k in shown)
        for key, value in shown.items():
            print(f"  {key:<{width}}  {value:.4f}" if isinstance(value, float) else f"  {key:<{width}}  {value}")
        print(f"wrote {cfg.run_dir() / 'results.json'}")
        return 0

    return {"help": DESCRIPTIONS[name], "add_arguments": add_arguments, "run": run}


EVAL_COMMANDS: dict[str, dict[str, Any]] = {name: evaluation_command(name) for name in DESCRIPTIONS}

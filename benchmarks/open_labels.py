"""WSP from open-data labels on the embedded dataset: hashtags vs caption words vs WordNet synsets.

Every arm is the default WSP run (`prepretrain wsp`, from scratch, the same images, budget and
seed); only `labels_from` differs. Each encoder is then scored by the default linear probe on the
coarse (shape) and fine (shape x texture) tasks, beside a random-init encoder. Precision@1 is on
held-out images in each arm's own label space, against that space's most-frequent-label baseline.

    OMP_NUM_THREADS=1 python benchmarks/open_labels.py --out runs/open_labels --seeds 0,1 --jobs 2

Prints one markdown table (mean and per-seed values) and writes results.json in --out. Runs that
finished are reused (each arm is an ordinary run directory).
"""

from __future__ import annotations

import argparse
import json
import statistics
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ARMS = ("hashtags", "caption", "synsets")
TASKS = ("coarse", "fine")


def train_arm(out: str, labels_from: str, seed: int) -> dict:
    import torch

    torch.set_num_threads(1)
    from prepretrain.config import build_config
    from prepretrain.stages.wsp import WSPConfig, WSPStage
    from prepretrain.train.engine import train

    run = Path(out) / f"wsp_{labels_from}_seed{seed}"
    if (run / "results.json").is_file():
        return json.loads((run / "results.json").read_text())
    cfg = build_config(WSPConfig, None, dict(out_dir=str(run), labels_from=labels_from, seed=seed,
                                             progress="false", tensorboard="false"))
    return train(WSPStage(cfg))


def probe(out: str, encoder: str, name: str, task: str, seed: int) -> float:
    import torch

    torch.set_num_threads(1)
    from prepretrain.config import build_config
    from prepretrain.evaluate.linear import ProbeConfig
    from prepretrain.evaluate.runner import run_evaluation

    where = Path(out) / f"probe_{name}_{task}_seed{seed}"
    if (where / "results.json").is_file():
        return json.loads((where / "results.json").read_text())["top1"]
    cfg = build_config(ProbeConfig, None, dict(encoder=encoder, task=task, seed=seed, out_dir=str(where),
                                               progress="false"))
    return run_evaluation(cfg)["top1"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/open_labels")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--jobs", type=int, default=2, help="processes (give each OMP_NUM_THREADS=1)")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    with ProcessPoolExecutor(args.jobs) as pool:
        trained = {(arm, seed): pool.submit(train_arm, args.out, arm, seed) for arm in ARMS for seed in seeds}
        wsp = {key: future.result() for key, future in trained.items()}
        encoders = {**{(arm, seed): str(Path(args.out) / f"wsp_{arm}_seed{seed}") for arm in ARMS for seed in seeds},
                    **{("random", seed): "" for seed in seeds}}
        probes = {(name, seed, task): pool.submit(probe, args.out, encoder, name, task, seed)
                  for (name, seed), encoder in encoders.items() for task in TASKS}
        top1 = {key: future.result() for key, future in probes.items()}
    rows = []
    table = ["| encoder | probe coarse | probe fine | P@1 (own labels) | baseline P@1 | vocabulary |",
             "|---|---|---|---|---|---|"]
    for name in (*ARMS, "random"):
        cells = []
        for task in TASKS:
            values = [top1[(name, seed, task)] for seed in seeds]
            cells.append(f"{statistics.mean(values):.1f} ({', '.join(f'{v:.1f}' for v in values)})")
        if name == "random":
            cells += ["-", "-", "-"]
        else:
            p1 = [100 * wsp[(name, seed)]["val_precision_at_1"] for seed in seeds]
            base = [100 * wsp[(name, seed)]["val_baseline_precision_at_1"] for seed in seeds]
            size = wsp[(name, seeds[0])]["vocab_size"]
            cells += [f"{statistics.mean(p1):.1f}", f"{statistics.mean(base):.1f}", str(size)]
        label = f"WSP from {name}" if name != "random" else "random init"
        table.append(f"| {label} | " + " | ".join(cells) + " |")
        rows.append({"encoder": name, "cells": cells})
    text = "\n".join(table)
    print(text)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "results.json").write_text(json.dumps(
        {"seeds": seeds, "probe_top1": {f"{n}/seed{s}/{t}": v for (n, s, t), v in top1.items()},
         "wsp": {f"{n}/seed{s}": r for (n, s), r in wsp.items()}, "table": text}, indent=1, default=str))


if __name__ == "__main__":
    main()

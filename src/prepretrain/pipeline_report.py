"""The pipeline's report: every task x encoder (mean ± std over seeds), WSP convergence with and
without MAE (paper Fig. 4), accuracy against training FLOPs (Fig. 5), reconstructions, the configs
and commands to reproduce, and a plain statement of whether MAE->WSP beat WSP here."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

from .config import dump_config
from .report import Block, format_mean_std, mean_std, plot_bars, plot_curves, table_block, write_report

LABELS = {"mae_wsp": "MAE→WSP", "wsp": "WSP", "mae": "MAE", "random": "random init"}
# The task stages' rows: pipeline kind -> (row name, results.json key), values in percent.
TASK_ROWS = {
    "video": [("video top-1", "top1"), ("video, single-frame baseline top-1", "single_frame_top1")],
    "detect": [("detection box AP", "box_ap"), ("detection mask AP", "mask_ap")],
}


def _rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def collect_table(cfg, results: dict[str, Any]) -> dict[str, dict[str, list[float]]]:
    """task name -> encoder label -> one accuracy (percent) per seed."""
    table: dict[str, dict[str, list[float]]] = {}

    def add(task: str, label: str, value: Any) -> None:
        if isinstance(value, (int, float)):
            table.setdefault(task, {}).setdefault(LABELS[label], []).append(float(value))

    for seed in cfg.seeds:
        s = f"seed{seed}"
        for label in LABELS:
            for task in cfg.tasks:
                frozen = results.get(f"{s}/eval/{label}/{task}") or {}
                add(f"linear probe ({task})", label, (frozen.get("probe") or {}).get("top1"))
                add(f"kNN ({task})", label, (frozen.get("knn") or {}).get("top1"))
                for shots in (1, 5, 10):
                    add(f"{shots}-shot ({task})", label, (frozen.get("lowshot") or {}).get(f"{shots}shot_top1"))
            zeroshot = results.get(f"{s}/eval/{label}/zeroshot") or {}
            add(f"zero-shot ({cfg.tasks[0]})", label, zeroshot.get("top1"))
            finetune = results.get(f"{s}/eval/{label}/finetune") or {}
            add(f"finetune ({cfg.tasks[0]})", label, finetune.get("best_top1", finetune.get("top1")))
            for kind, rows in TASK_ROWS.items():
                task_results = results.get(f"{s}/eval/{label}/{kind}") or {}
                for row, key in rows:
                    add(row, label, task_results.get(key))
        for label, run in (("mae_wsp", "wsp_mae"), ("wsp", "wsp")):
            wsp = results.get(f"{s}/{run}") or {}
            value = wsp.get("val_precision_at_1")
            add("WSP tag precision@1", label, 100 * value if isinstance(value, (int, float)) else None)
    return {task: row for task, row in table.items() if row}


def write_pipeline_report(cfg, jobs, results: dict[str, Any], flops_per_sample: dict[str, float]
                          ) -> tuple[Path, Path]:
    """report.md and report.html of a pipeline run; ``flops_per_sample`` maps a training job's
    name to its training FLOPs per sample (0 or absent: unknown, the FLOPs plot leaves it out)."""
    out = Path(cfg.out_dir)
    by_name = {job.name: job for job in jobs}
    table = collect_table(cfg, results)
    blocks: list[Block] = [Block("heading", "MAE pre-pretraining → WSP → transfer", level=1)]
    blocks.append(Block("paragraph", f"Data: `{cfg.data}`, model `{cfg.model}` at {cfg.image_size} px, "
                        f"seeds {list(cfg.seeds)}. Accuracies in percent, mean ± std over seeds."))

    # the verdict first: the question the experiment asks
    wins, diffs = 0, []
    for task, row in table.items():
        if "MAE→WSP" in row and "WSP" in row:
            a, _ = mean_std(row["MAE→WSP"])
            b, _ = mean_std(row["WSP"])
            diffs.append((task, a - b))
            wins += a > b
    if diffs:
        mean_diff = sum(d for _, d in diffs) / len(diffs)
        best = max(diffs, key=lambda x: x[1])
        worst = min(diffs, key=lambda x: x[1])
        outcome = "beat" if mean_diff > 0 else "did not beat"
        verdict = (f"**Here, MAE→WSP {outcome} WSP alone**: better on {wins} of {len(diffs)} tasks, by "
                   f"{mean_diff:+.2f} points on average (largest gain {best[1]:+.2f} on {best[0]}; "
                   f"worst {worst[1]:+.2f} on {worst[0]}). With {len(cfg.seeds)} seed(s), differences smaller "
                   "than the stds in the table are not evidence either way.")
    else:
        verdict = "No task has both MAE→WSP and WSP results, so no comparison can be made."
    blocks += [Block("heading", "Verdict"), Block("paragraph", verdict)]

    blocks.append(Block("heading", "Transfer results"))
    encoders = [e for e in LABELS.values() if any(e in row for row in table.values())]
    rows = [[task] + [format_mean_std(table[task].get(e, []), scale=1.0) for e in encoders] for task in table]
    blocks.append(table_block(["task"] + encoders, rows))
    if table:
        plot_bars({k: {e: [v / 100 for v in vals] for e, vals in row.items()} for k, row in table.items()},
                  out / "transfer.png", "transfer by encoder")
        blocks.append(Block("image", "Transfer accuracy by task and encoder", items=["transfer.png"]))

    # WSP convergence (Fig. 4) and accuracy vs FLOPs (Fig. 5)
    curves: dict[str, list[list[tuple[float, float]]]] = {"MAE→WSP": [], "WSP": []}
    flop_curves: dict[str, list[list[tuple[float, float]]]] = {"MAE→WSP": [], "WSP": []}
    for seed in cfg.seeds:
        s = f"seed{seed}"
        mae_flops = 0.0
        if f"{s}/mae" in by_name:
            per_sample = flops_per_sample.get(f"{s}/mae", 0.0)
            mae_samples = (results.get(f"{s}/mae") or {}).get("samples_seen", 0)
            mae_flops = per_sample * mae_samples
        for label, run in (("MAE→WSP", "wsp_mae"), ("WSP", "wsp")):
            rows_ = _rows(out / s / run / "metrics.jsonl")
            points = [(r["step"], 100 * r["val_precision_at_1"]) for r in rows_ if "val_precision_at_1" in r]
            curves[label].append(points)
            if f"{s}/{run}" in by_name:
                per_sample = flops_per_sample.get(f"{s}/{run}", 0.0)
                batch = (results.get(f"{s}/{run}") or {}).get("samples_seen", 0) / max(
                    1, (results.get(f"{s}/{run}") or {}).get("steps", 1))
                offset = mae_flops if label == "MAE→WSP" else 0.0
                if per_sample:
                    flop_curves[label].append([(offset + per_sample * batch * step, v) for step, v in points])
    if any(points for runs in curves.values() for points in runs):
        plot_curves(curves, out / "wsp_convergence.png", "WSP step", "held-out tag precision@1 (%)",
                    "WSP convergence with and without MAE init")
        blocks += [Block("heading", "WSP convergence (paper Fig. 4)"),
                   Block("image", "Held-out tag precision@1 during WSP", items=["wsp_convergence.png"])]
    if any(points for runs in flop_curves.values() for points in runs):
        plot_curves(flop_curves, out / "accuracy_vs_flops.png", "total training FLOPs (MAE + WSP)",
                    "held-out tag precision@1 (%)", "accuracy against training FLOPs")
        blocks += [Block("heading", "Accuracy against training FLOPs (paper Fig. 5)"),
                   Block("paragraph", "MAE→WSP curves start right of zero: they include the MAE stage's FLOPs."),
                   Block("image", "precision@1 against total FLOPs", items=["accuracy_vs_flops.png"])]

    recon = out / f"seed{cfg.seeds[0]}" / "mae" / "reconstructions.png"
    if recon.exists():
        shutil.copyfile(recon, out / "mae_reconstructions.png")
        blocks += [Block("heading", "MAE reconstructions"),
                   Block("image", "original / masked / reconstruction / reconstruction + visible",
                         items=["mae_reconstructions.png"])]

    blocks.append(Block("heading", "Reproduce"))
    command = "prepretrain pipeline --config " + str(out / "pipeline.yaml")
    blocks.append(Block("code", command))
    blocks.append(Block("paragraph", "The pipeline's resolved config:"))
    blocks.append(Block("code", dump_config(replace(cfg)).strip()))
    items = [f"`{job.name}` ({job.kind}): `{out / job.name / 'config.yaml'}`" for job in jobs if job.kind != "frozen"]
    blocks.append(Block("paragraph", "Each stage's resolved config is in its run directory; rerun one alone with "
                        "`prepretrain <kind> --config <that file>`."))
    blocks.append(Block("list", items=items))
    return write_report(out, blocks, "prepretrain pipeline report")

"""The pipeline's report: every task x encoder (mean ± std over seeds), WSP convergence with and
without MAE (paper Fig. 4), accuracy against training FLOPs (Fig. 5), reconstructions, the configs
and commands to reproduce, and a verdict read off paired contrasts: what MAE *learning* adds
(MAE->WSP minus WSP from the untrained MAE initialisation) and what the MAE *initialisation
scheme* adds (that control minus WSP from timm's initialisation), per task, over seeds."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

from .config import dump_config
from .report import Block, format_mean_std, mean_std, plot_bars, plot_curves, table_block, write_report

LABELS = {"mae_wsp": "MAE→WSP", "maeinit_wsp": "MAE init→WSP", "wsp": "WSP", "mae": "MAE",
          "mae_init": "MAE init (untrained)", "random": "random init"}
# The verdict's paired contrasts: name -> (arm, minus arm, what it measures).
CONTRASTS = {
    "MAE learning": ("MAE→WSP", "MAE init→WSP", "what MAE training adds beyond its initialisation"),
    "init scheme": ("MAE init→WSP", "WSP", "what the MAE's initialisation scheme alone adds over timm's"),
    "MAE→WSP − WSP": ("MAE→WSP", "WSP", "the raw gap, both effects together"),
}
# Two-sided 95% critical values of Student's t by degrees of freedom (seeds - 1).
T_95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        15: 2.131, 20: 2.086, 30: 2.042}
# The task stages' rows: pipeline kind -> (row name, results.json key), values in percent.
TASK_ROWS = {
    "video": [("video top-1", "top1"), ("video, single-frame baseline top-1", "single_frame_top1")],
    "detect": [("detection box AP", "box_ap"), ("detection mask AP", "mask_ap")],
}


WSP_RUNS = {"mae_wsp": "wsp_mae", "maeinit_wsp": "wsp_maeinit", "wsp": "wsp"}  # label -> WSP job of a seed


def eval_set_names(cfg) -> list[str]:
    """The names of the pipeline's ``eval_sets`` (validated by the pipeline)."""
    return [str(entry).partition("=")[0].strip() for entry in getattr(cfg, "eval_sets", ()) or ()]


def classify_set_names(cfg) -> list[tuple[str, bool]]:
    """(name, with ReaL) of each ``classify_sets`` entry (the pipeline validated them)."""
    sets = []
    for entry in getattr(cfg, "classify_sets", ()) or ():
        name, _, rest = str(entry).partition("=")
        sets.append((name.strip(), rest.endswith("+real")))
    return sets


def paired_contrast(row: dict[str, dict[int, float]], arm: str, minus: str) -> dict[str, Any] | None:
    """``arm`` minus ``minus`` on the seeds that have both: mean, std, seeds, and whether a paired
    t-test at 95% separates it from zero (it never does with one seed)."""
    if arm not in row or minus not in row:
        return None
    seeds = sorted(set(row[arm]) & set(row[minus]))
    if not seeds:
        return None
    diffs = [row[arm][seed] - row[minus][seed] for seed in seeds]
    mean, std = mean_std(diffs)
    n = len(diffs)
    separated = False
    if n > 1:  # the critical value of the nearest tabulated df at or below n - 1: never liberal
        critical = T_95[max(df for df in T_95 if df <= n - 1)]
        separated = (abs(mean) > critical * std / n**0.5) if std > 0 else mean != 0.0
    return {"mean": mean, "std": std, "seeds": n, "separated": separated}


def contrast_text(contrast: dict[str, Any] | None) -> str:
    if contrast is None:
        return "–"
    spread = f" ± {contrast['std']:.1f}" if contrast["seeds"] > 1 else ""
    mark = "" if contrast["separated"] else " (≈0)"
    return f"{contrast['mean']:+.1f}{spread}{mark}"


def verdict_blocks(cfg, by_seed: dict[str, dict[str, dict[int, float]]]) -> list[Block]:
    """The verdict: the contrasts per task, and sentences that claim no more than they show."""
    contrasts = {task: {name: paired_contrast(row, arm, minus) for name, (arm, minus, _) in CONTRASTS.items()}
                 for task, row in by_seed.items()}
    raw = [c["MAE→WSP − WSP"] for c in contrasts.values() if c["MAE→WSP − WSP"]]
    if not raw:
        return [Block("paragraph", "No task has both MAE→WSP and WSP results, so no comparison can be made.")]
    seeds = len(cfg.seeds)
    rule = ("A contrast counts as a gain or a loss only when a paired t-test over the seeds separates it from "
            "zero at 95%; otherwise it is marked ≈0, not distinguishable from zero" +
            (" (with one seed nothing can be separated: run more seeds)." if seeds < 2 else "."))
    sentences = []
    for name in ("MAE learning", "init scheme", "MAE→WSP − WSP"):
        arm, minus, meaning = CONTRASTS[name]
        found = [c[name] for c in contrasts.values() if c[name]]
        if not found:
            continue
        up = sum(c["separated"] and c["mean"] > 0 for c in found)
        down = sum(c["separated"] and c["mean"] < 0 for c in found)
        average = sum(c["mean"] for c in found) / len(found)
        sentences.append(f"**{name}** ({arm} − {minus}: {meaning}): a gain on {up} of {len(found)} tasks, a loss "
                         f"on {down}, not distinguishable from zero on {len(found) - up - down}; "
                         f"{average:+.2f} points on average over tasks.")
    if not any(c["MAE learning"] for c in contrasts.values()):
        sentences.append("Without the control arm (control_arms=false) the raw gap mixes what MAE learns with "
                         "how the MAE initialises its weights: it is not evidence that MAE training helped.")
    names = [name for name in CONTRASTS if any(c[name] for c in contrasts.values())]
    rows = [[task] + [contrast_text(c[name]) for name in names] for task, c in contrasts.items()]
    return [Block("paragraph", " ".join([f"Paired over {seeds} seed(s), in points of accuracy (mean ± std of "
                                         "the per-seed differences).", rule])),
            Block("list", items=sentences), table_block(["task", *names], rows)]


def _rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def collect_table(cfg, results: dict[str, Any]) -> dict[str, dict[str, list[float]]]:
    """task name -> encoder label -> one accuracy (percent) per seed that has it."""
    return {task: {label: list(values.values()) for label, values in row.items()}
            for task, row in collect_by_seed(cfg, results).items()}


def collect_by_seed(cfg, results: dict[str, Any]) -> dict[str, dict[str, dict[int, float]]]:
    """task name -> encoder label -> seed -> accuracy (percent)."""
    table: dict[str, dict[str, dict[int, float]]] = {}

    def add(task: str, label: str, value: Any) -> None:  # under the seed the loop below is at
        if isinstance(value, (int, float)):
            table.setdefault(task, {}).setdefault(LABELS[label], {})[seed] = float(value)

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
            for name, real in classify_set_names(cfg):  # the finetuned model on each benchmark, no more training
                scored = results.get(f"{s}/eval/{label}/classify_{name}") or {}
                add(f"{name} top-1 (finetuned)", label, scored.get("top1"))
                if real:
                    add(f"{name} ReaL top-1 (finetuned)", label, scored.get("real_top1"))
            for set_name in eval_set_names(cfg):  # more transfer sets: rows "NAME: protocol"
                where = f"{s}/eval/{label}/sets/{set_name}"
                frozen = results.get(f"{where}/label") or {}
                add(f"{set_name}: linear probe", label, (frozen.get("probe") or {}).get("top1"))
                add(f"{set_name}: kNN", label, (frozen.get("knn") or {}).get("top1"))
                for shots in (1, 5, 10):
                    add(f"{set_name}: {shots}-shot", label, (frozen.get("lowshot") or {}).get(f"{shots}shot_top1"))
                add(f"{set_name}: zero-shot", label, (results.get(f"{where}/zeroshot") or {}).get("top1"))
                finetune = results.get(f"{where}/finetune") or {}
                add(f"{set_name}: finetune", label, finetune.get("best_top1", finetune.get("top1")))
            for kind, rows in TASK_ROWS.items():
                task_results = results.get(f"{s}/eval/{label}/{kind}") or {}
                for row, key in rows:
                    add(row, label, task_results.get(key))
        for label, run in WSP_RUNS.items():
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
    by_seed = collect_by_seed(cfg, results)
    table = collect_table(cfg, results)
    blocks: list[Block] = [Block("heading", "MAE pre-pretraining → WSP → transfer", level=1)]
    blocks.append(Block("paragraph", f"Data: `{cfg.data}`, model `{cfg.model}` at {cfg.image_size} px, "
                        f"seeds {list(cfg.seeds)}. Accuracies in percent, mean ± std over seeds."))

    # the verdict first: the question the experiment asks, read off the paired contrasts
    blocks += [Block("heading", "Verdict"), *verdict_blocks(cfg, by_seed)]

    blocks.append(Block("heading", "Transfer results"))
    encoders = [e for e in LABELS.values() if any(e in row for row in table.values())]
    rows = [[task] + [format_mean_std(table[task].get(e, []), scale=1.0) for e in encoders] for task in table]
    blocks.append(table_block(["task"] + encoders, rows))
    if table:  # the paper's layout: one row per encoder, one column per benchmark and protocol
        blocks.append(Block("paragraph", "The same numbers in the paper's layout (one row per encoder):"))
        blocks.append(table_block(["encoder", *table], [
            [e] + [format_mean_std(table[task].get(e, []), scale=1.0) for task in table] for e in encoders]))
    if table:
        plot_bars({k: {e: [v / 100 for v in vals] for e, vals in row.items()} for k, row in table.items()},
                  out / "transfer.png", "transfer by encoder")
        blocks.append(Block("image", "Transfer accuracy by task and encoder", items=["transfer.png"]))

    # WSP convergence (Fig. 4) and accuracy vs FLOPs (Fig. 5)
    arms = {LABELS[label]: run for label, run in WSP_RUNS.items()}
    curves: dict[str, list[list[tuple[float, float]]]] = {label: [] for label in arms}
    flop_curves: dict[str, list[list[tuple[float, float]]]] = {label: [] for label in arms}
    for seed in cfg.seeds:
        s = f"seed{seed}"
        mae_flops = 0.0
        if f"{s}/mae" in by_name:
            per_sample = flops_per_sample.get(f"{s}/mae", 0.0)
            mae_samples = (results.get(f"{s}/mae") or {}).get("samples_seen", 0)
            mae_flops = per_sample * mae_samples
        for label, run in arms.items():
            if f"{s}/{run}" not in by_name:
                continue
            rows_ = _rows(out / s / run / "metrics.jsonl")
            points = [(r["step"], 100 * r["val_precision_at_1"]) for r in rows_ if "val_precision_at_1" in r]
            curves[label].append(points)
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

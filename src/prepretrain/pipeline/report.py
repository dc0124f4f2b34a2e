"""The pipeline's report: every task x encoder (mean ± std over seeds), WSP convergence with and
without MAE (paper Fig. 4), accuracy against training FLOPs (Fig. 5), reconstructions, the configs
and commands to reproduce, and a verdict read off paired contrasts: what MAE *learning* adds
(MAE->WSP minus WSP from the untrained MAE initialisation) and what the MAE *initialisation
scheme* adds (that control minus WSP from timm's initialisation), per task, over seeds; and the
schedule: which job ran when, and where. Every number is found through the job that made it (its
seed, arm, task and set: :class:`~prepretrain.pipeline.plan.Job`), never through its name."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..config import dump_config
from ..report import Block, format_mean_std, mean_std, plot_bars, plot_curves, table_block, write_report
from .progress import clock

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


def collect_table(cfg, jobs, results: dict[str, Any]) -> dict[str, dict[str, list[float]]]:
    """task name -> encoder label -> one accuracy (percent) per seed that has it."""
    return {task: {label: list(values.values()) for label, values in row.items()}
            for task, row in collect_by_seed(cfg, jobs, results).items()}


SHOTS = (1, 5, 10)


def collect_by_seed(cfg, jobs, results: dict[str, Any]) -> dict[str, dict[str, dict[int, float]]]:
    """task name -> encoder label -> seed -> accuracy (percent): each job's numbers under the rows
    its protocol, label task and set name, in the order protocols are listed (eval_data's rows
    first, per task; then each eval_sets entry; then the video/detection tasks; WSP last)."""
    table: dict[str, dict[str, dict[int, float]]] = {}
    ranks: dict[str, tuple] = {}
    tasks = list(cfg.tasks)
    sets = [str(entry).partition("=")[0].strip() for entry in getattr(cfg, "eval_sets", ()) or ()]
    benchmarks = [str(entry).partition("=")[0].strip() for entry in getattr(cfg, "classify_sets", ()) or ()]

    def add(row: str, rank: tuple, job, value: Any, scale: float = 1.0) -> None:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            table.setdefault(row, {}).setdefault(LABELS[job.arm], {})[job.seed] = scale * float(value)
            ranks.setdefault(row, rank)

    for job in jobs:
        result = results.get(job.name)
        if not isinstance(result, dict) or job.arm not in LABELS:
            continue
        named = job.eval_set if job.kind != "classify" else ""
        group = (1, sets.index(named)) if named in sets else (0, 0)
        prefix, suffix = (f"{named}: ", "") if named else ("", f" ({job.task})")
        task_rank = tasks.index(job.task) if job.task in tasks else 0
        if job.kind == "frozen":
            add(f"{prefix}linear probe{suffix}", (*group, task_rank, 0), job, (result.get("probe") or {}).get("top1"))
            add(f"{prefix}kNN{suffix}", (*group, task_rank, 1), job, (result.get("knn") or {}).get("top1"))
            for index, shots in enumerate(SHOTS):
                add(f"{prefix}{shots}-shot{suffix}", (*group, task_rank, 2 + index), job,
                    (result.get("lowshot") or {}).get(f"{shots}shot_top1"))
        elif job.kind == "zeroshot":
            add(f"{prefix}zero-shot{suffix}", (*group, len(tasks), 0), job, result.get("top1"))
        elif job.kind == "finetune":
            add(f"{prefix}finetune{suffix}", (*group, len(tasks), 1), job,
                result.get("best_top1", result.get("top1")))
        elif job.kind == "classify":  # a finetuned model on a benchmark, no more training
            rank = (0, 0, len(tasks), 2 + benchmarks.index(job.eval_set) if job.eval_set in benchmarks else 2)
            add(f"{job.eval_set} top-1 (finetuned)", (*rank, 0), job, result.get("top1"))
            add(f"{job.eval_set} ReaL top-1 (finetuned)", (*rank, 1), job, result.get("real_top1"))
        elif job.kind in TASK_ROWS:
            for index, (row, key) in enumerate(TASK_ROWS[job.kind]):
                add(row, (2, list(TASK_ROWS).index(job.kind), index), job, result.get(key))
        elif job.kind == "wsp":
            add("WSP tag precision@1", (3,), job, result.get("val_precision_at_1"), scale=100.0)
    return {row: table[row] for row in sorted(table, key=lambda row: ranks[row])}


def timeline_blocks(out: Path, timeline: list[dict[str, Any]]) -> list[Block]:
    """Which job ran when, and where (worker or SLURM job): a chart and the busiest jobs."""
    if not timeline:
        return []
    start = min(row["started"] for row in timeline)
    end = max(row["finished"] for row in timeline)
    lanes = sorted({row["worker"] or row["host"] or "?" for row in timeline})
    plot_timeline(timeline, lanes, start, out / "timeline.png")
    busy = sum(row["finished"] - row["started"] for row in timeline)
    longest = sorted(timeline, key=lambda row: row["started"] - row["finished"])[:10]
    rows = [[f"`{row['name']}`", row["kind"], row["worker"] or row["host"], clock(row["started"] - start),
             clock(row["finished"] - row["started"])] for row in longest]
    return [Block("heading", "Schedule"),
            Block("paragraph", f"{len(timeline)} jobs ran this time in {clock(end - start)} of wall time on "
                               f"{len(lanes)} worker(s) or SLURM job(s): {clock(busy)} of job time, "
                               f"{busy / max(end - start, 1e-9):.2f} jobs at a time on average. Jobs reused from "
                               "an earlier run are not shown."),
            Block("image", "Each job from its start to its end, one row per worker", items=["timeline.png"]),
            Block("paragraph", "The longest jobs:"),
            table_block(["job", "kind", "where", "started at", "took"], rows)]


def plot_timeline(timeline: list[dict[str, Any]], lanes: list[str], start: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = sorted({row["kind"] for row in timeline})
    colours = {kind: plt.get_cmap("tab10")(index % 10) for index, kind in enumerate(kinds)}
    figure, axes = plt.subplots(figsize=(10, 1.2 + 0.35 * min(len(lanes), 60)))
    for row in timeline:
        lane = lanes.index(row["worker"] or row["host"] or "?")
        axes.barh(lane, (row["finished"] - row["started"]) / 60, left=(row["started"] - start) / 60,
                  color=colours[row["kind"]], edgecolor="white", height=0.8)
    axes.set_yticks(range(len(lanes)), labels=lanes if len(lanes) <= 60 else [""] * len(lanes))
    axes.invert_yaxis()
    axes.set_xlabel("minutes from the first job's start")
    handles = [plt.Rectangle((0, 0), 1, 1, color=colours[kind]) for kind in kinds]
    axes.legend(handles, kinds, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def write_pipeline_report(cfg, jobs, results: dict[str, Any], flops_per_sample: dict[str, float],
                          timeline: list[dict[str, Any]] = (), missing: list[str] = (), sweep: list[Block] = (),
                          point: tuple[str, list] | None = None) -> tuple[Path, Path]:
    """report.md and report.html of a pipeline run; ``flops_per_sample`` maps a training job's
    name to its training FLOPs per sample (0 or absent: unknown, the FLOPs plot leaves it out);
    ``timeline``: when and where each job ran; ``missing``: jobs without results (failed, skipped);
    ``sweep``: the sweep's figures (:mod:`.figures`), after the transfer results; ``point``: in a
    sweep, (its label, its jobs): the grid point the verdict, tables and curves are for."""
    out = Path(cfg.out_dir)
    all_jobs = list(jobs)
    if point is not None:
        jobs = point[1]
    by_seed = collect_by_seed(cfg, jobs, results)
    table = collect_table(cfg, jobs, results)
    blocks: list[Block] = [Block("heading", "MAE pre-pretraining → WSP → transfer", level=1)]
    models = ", ".join(f"`{model}`" for model in cfg.model)
    blocks.append(Block("paragraph", f"Data: `{cfg.data}`, model {models} at {cfg.image_size} px, "
                        f"seeds {list(cfg.seeds)}. Accuracies in percent, mean ± std over seeds."))
    if point is not None:
        blocks.append(Block("paragraph", f"A sweep: the verdict, the tables and the WSP curves below are for the grid "
                            f"point {point[0]}; the section \"The sweep\" has every point."))
    if missing:
        blocks.append(Block("paragraph", f"**Incomplete**: {len(missing)} of {len(all_jobs)} jobs have no results "
                            "(failed, or skipped because a job they read failed); their numbers are left out:"))
        blocks.append(Block("list", items=[f"`{name}`" for name in missing]))

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
    blocks += list(sweep)

    # WSP convergence (Fig. 4) and accuracy vs FLOPs (Fig. 5): every WSP arm, per seed
    arms = [LABELS[arm] for arm in ("mae_wsp", "maeinit_wsp", "wsp")]
    curves: dict[str, list[list[tuple[float, float]]]] = {label: [] for label in arms}
    flop_curves: dict[str, list[list[tuple[float, float]]]] = {label: [] for label in arms}
    mae_flops = {job.seed: flops_per_sample.get(job.name, 0.0) * (results.get(job.name) or {}).get("samples_seen", 0)
                 for job in jobs if job.kind == "mae"}
    for job in (job for job in jobs if job.kind == "wsp" and job.arm in LABELS):
        label = LABELS[job.arm]
        rows_ = _rows(out / job.name / "metrics.jsonl")
        points = [(r["step"], 100 * r["val_precision_at_1"]) for r in rows_ if "val_precision_at_1" in r]
        curves[label].append(points)
        per_sample = flops_per_sample.get(job.name, 0.0)
        done = results.get(job.name) or {}
        batch = done.get("samples_seen", 0) / max(1, done.get("steps", 1))
        offset = mae_flops.get(job.seed, 0.0) if job.arm == "mae_wsp" else 0.0
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

    first_mae = next((job for job in jobs if job.kind == "mae"), None)
    recon = out / first_mae.name / "reconstructions.png" if first_mae else out / "-"
    if recon.exists():
        shutil.copyfile(recon, out / "mae_reconstructions.png")
        blocks += [Block("heading", "MAE reconstructions"),
                   Block("image", "original / masked / reconstruction / reconstruction + visible",
                         items=["mae_reconstructions.png"])]

    blocks += timeline_blocks(out, list(timeline))

    blocks.append(Block("heading", "Reproduce"))
    command = "prepretrain pipeline --config " + str(out / "pipeline.yaml")
    blocks.append(Block("code", command))
    blocks.append(Block("paragraph", "The pipeline's resolved config:"))
    blocks.append(Block("code", dump_config(replace(cfg)).strip()))
    items = [f"`{job.name}` ({job.kind}): `{out / job.name / 'config.yaml'}`" for job in all_jobs
             if job.kind != "frozen"]
    blocks.append(Block("paragraph", "Each stage's resolved config is in its run directory; rerun one alone with "
                        "`prepretrain <kind> --config <that file>`."))
    blocks.append(Block("list", items=items))
    return write_report(out, blocks, "prepretrain pipeline report")

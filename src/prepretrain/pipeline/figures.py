"""The sweep's figures: the MAWS paper's curves drawn from whatever a pipeline swept.

- transfer against model size (paper Fig. 3: MAE->WSP against WSP across sizes), when ``model``
  has several values;
- transfer against the MAE budget at a fixed WSP budget (Fig. 4: 0 = WSP from the untrained MAE
  initialisation), when the MAE budget has several values, and against the WSP budget per MAE
  budget, when the WSP budget has several;
- accuracy against total training FLOPs, MAE + WSP, from the planner (Fig. 5), whenever a budget
  is swept;
- the paired contrasts (MAE learning, init scheme) at every grid point.

Each figure has its numbers in a table below it, mean ± std over seeds. A grid point's value of an
arm is read from the jobs that arm depends on (:data:`~prepretrain.pipeline.plan.ARM_AXES`): the WSP
from scratch at one WSP budget stands at every MAE budget.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..report import Block, format_mean_std, plot_panels, table_block
from .config import GridPoint, PipelineConfig, grid_points
from .plan import Job
from .report import CONTRASTS, collect_by_seed, contrast_text, paired_contrast

ARMS = ("MAE→WSP", "MAE init→WSP", "WSP")
AXIS_NAMES = {"model": "model", "mae": "MAE budget", "wsp": "WSP budget"}

Table = dict[str, dict[str, dict[int, float]]]  # row -> encoder label -> seed -> accuracy (%)


def jobs_at(point: GridPoint, jobs: list[Job]) -> list[Job]:
    """The jobs whose grid values are the point's (a job records only the axes its arm depends on)."""
    values = point.axes("model", "mae", "wsp")
    return [job for job in jobs if all(values.get(axis) == value for axis, value in job.grid.items())]


def point_table(cfg: PipelineConfig, point: GridPoint, jobs: list[Job], results: dict[str, Any]) -> Table:
    """Every row of the point's results; at MAE budget 0 the MAE->WSP arm *is* WSP from the untrained
    MAE initialisation (and MAE is that untrained encoder), so their values stand in."""
    table = collect_by_seed(cfg, jobs_at(point, jobs), results)
    if not point.mae.trains:
        for row in table.values():
            if "MAE init→WSP" in row:
                row["MAE→WSP"] = dict(row["MAE init→WSP"])
            if "MAE init (untrained)" in row:
                row["MAE"] = dict(row["MAE init (untrained)"])
    return table


def varying(points: list[GridPoint]) -> list[str]:
    """The axes with more than one value in the grid."""
    return [axis for axis in ("model", "mae", "wsp") if len({point.axes(axis)[axis] for point in points}) > 1]


def point_label(point: GridPoint, axes: list[str]) -> str:
    values = point.axes(*axes)
    return ", ".join(f"{value}" if axis == "model" else f"{AXIS_NAMES[axis].split()[0]} {value}"
                     for axis, value in values.items()) or "the point"


def sweep_blocks(cfg: PipelineConfig, jobs: list[Job], results: dict[str, Any], training_flops: dict[str, float],
                 out: Path) -> list[Block]:
    """The sweep section of the report; nothing when the pipeline has one grid point."""
    points = grid_points(cfg)
    axes = varying(points)
    if not axes:
        return []
    tables = {point: point_table(cfg, point, jobs, results) for point in points}
    known = [row for table in tables.values() for row in table]
    known = list(dict.fromkeys(known))
    rows = [row for row in (cfg.figure_rows or known[:1]) if row in known]
    blocks = [Block("heading", "The sweep (paper Figs. 3-5)"),
              Block("paragraph", f"{len(points)} grid points ({', '.join(AXIS_NAMES[a] for a in axes)} swept), "
                                 f"{len(cfg.seeds)} seed(s) each. The figures draw "
                                 f"{', '.join(repr(row) for row in rows) or 'no row (no results yet)'}"
                                 " (figure_rows= picks others from the transfer table). At MAE budget 0 MAE→WSP is "
                                 "WSP from the untrained MAE initialisation, the control arm.")]
    missing = [row for row in cfg.figure_rows if row not in known]
    if missing:
        blocks.append(Block("paragraph", f"figure_rows not in the results: {missing}; the rows are: {known}"))
    if not rows:
        return blocks
    if "model" in axes:
        blocks += axis_figure(cfg, "model", points, tables, rows, out, "Transfer against model size (paper Fig. 3)",
                              "fig3_model_size.png")
    if "mae" in axes:
        blocks += axis_figure(cfg, "mae", points, tables, rows, out,
                              "Transfer against the MAE budget (paper Fig. 4)", "fig4_mae_budget.png")
    if "wsp" in axes:
        blocks += axis_figure(cfg, "wsp", points, tables, rows, out,
                              "Transfer against the WSP budget, per MAE budget (paper Fig. 4)", "fig4_wsp_budget.png")
    if "mae" in axes or "wsp" in axes:
        blocks += flops_figure(cfg, points, tables, jobs, rows, training_flops, out)
    blocks += contrast_blocks(points, tables, axes)
    return blocks


def axis_x(axis: str, point: GridPoint) -> float:
    """The point's position on a figure's x axis: parameters (millions) for the model, the budget's
    steps or epochs (0 = no MAE) for a budget."""
    if axis == "model":
        return parameters_millions(point.model)
    budget = point.mae if axis == "mae" else point.wsp
    return budget.value if budget.unit in ("steps", "epochs") else (0.0 if not budget.trains else 1.0)


def axis_title(axis: str, points: list[GridPoint]) -> str:
    if axis == "model":
        return "parameters (millions)"
    units = {(point.mae if axis == "mae" else point.wsp).unit for point in points} - {"none"}
    unit = "epochs" if "epochs" in units else ("steps" if "steps" in units else "(0 = none, 1 = the recipe's)")
    return f"{AXIS_NAMES[axis]}, {unit}"


def series_of(axis: str, points: list[GridPoint], axes: list[str]) -> dict[tuple, list[GridPoint]]:
    """The points of each line of an ``axis`` figure: one line per value of the other swept axes."""
    others = [a for a in axes if a != axis]
    lines: dict[tuple, list[GridPoint]] = {}
    for point in points:
        lines.setdefault(tuple(point.axes(*others).items()), []).append(point)
    return lines


def axis_figure(cfg: PipelineConfig, axis: str, points: list[GridPoint], tables: dict[GridPoint, Table],
                rows: list[str], out: Path, title: str, file: str) -> list[Block]:
    axes = varying(points)
    lines = series_of(axis, points, axes)
    panels: dict[str, dict[str, list[list[tuple[float, float]]]]] = {}
    header = ["row", AXIS_NAMES[axis]]
    body: list[list[str]] = []
    labels: list[str] = []
    for other, line_points in lines.items():
        suffix = ", ".join(str(value) if name == "model" else f"{AXIS_NAMES[name].split()[0]} {value}"
                           for name, value in other)
        for arm in ARMS:
            label = f"{arm}" + (f" ({suffix})" if suffix else "")
            if any(arm in tables[p].get(row, {}) for p in line_points for row in rows):
                labels.append(label)
    for row in rows:
        curves: dict[str, list[list[tuple[float, float]]]] = {}
        by_x: dict[str, dict[str, str]] = {}
        for other, line_points in lines.items():
            suffix = ", ".join(str(value) if name == "model" else f"{AXIS_NAMES[name].split()[0]} {value}"
                               for name, value in other)
            for arm in ARMS:
                label = f"{arm}" + (f" ({suffix})" if suffix else "")
                if label not in labels:
                    continue
                seeds: dict[int, list[tuple[float, float]]] = {}
                for point in line_points:
                    values = tables[point].get(row, {}).get(arm, {})
                    for seed, value in values.items():
                        seeds.setdefault(seed, []).append((axis_x(axis, point), value))
                    name = point.axes(axis)[axis]
                    by_x.setdefault(name, {})[label] = format_mean_std(list(values.values()), scale=1.0)
                curves[label] = list(seeds.values())
        panels[row] = curves
        body += [[row, name, *(cells.get(label, "–") for label in labels)] for name, cells in by_x.items()]
    plot_panels(panels, out / file, axis_title(axis, points), title, logx=axis == "model")
    return [Block("heading", title, level=3), Block("image", title, items=[file]),
            table_block(header + labels, body)]


def arm_flops(point: GridPoint, arm: str, jobs: list[Job], seed: int, training_flops: dict[str, float]) -> float:
    """Training FLOPs behind an arm at a point: its WSP, plus its MAE for MAE->WSP (the planner's count)."""
    here = [job for job in jobs_at(point, jobs) if job.seed == seed]
    wsp_arm = {"MAE→WSP": "mae_wsp" if point.mae.trains else "maeinit_wsp", "MAE init→WSP": "maeinit_wsp",
               "WSP": "wsp"}[arm]
    total = sum(training_flops.get(job.name, 0.0) for job in here if job.kind == "wsp" and job.arm == wsp_arm)
    if wsp_arm == "mae_wsp":
        total += sum(training_flops.get(job.name, 0.0) for job in here if job.kind == "mae")
    return total


def flops_figure(cfg: PipelineConfig, points: list[GridPoint], tables: dict[GridPoint, Table], jobs: list[Job],
                 rows: list[str], training_flops: dict[str, float], out: Path) -> list[Block]:
    """Accuracy against MAE + WSP training FLOPs: one line per arm (and model), a point per budget."""
    models = list(dict.fromkeys(point.model for point in points))
    panels: dict[str, dict[str, list[list[tuple[float, float]]]]] = {}
    body: list[list[str]] = []
    for row in rows:
        curves: dict[str, list[list[tuple[float, float]]]] = {}
        for model in models:
            for arm in ARMS:
                label = arm + (f" ({model})" if len(models) > 1 else "")
                seeds: dict[int, dict[float, float]] = {}
                cells: dict[float, tuple[str, list[float]]] = {}
                for point in (p for p in points if p.model == model):
                    for seed, value in tables[point].get(row, {}).get(arm, {}).items():
                        flops = arm_flops(point, arm, jobs, seed, training_flops)
                        if flops > 0:
                            seeds.setdefault(seed, {})[flops] = value  # a shared job stands at one x once
                            cells.setdefault(flops, (point_label(point, varying(points)), []))
                for flops, (where, _) in cells.items():
                    values = [seeds[seed][flops] for seed in seeds if flops in seeds[seed]]
                    body.append([row, label, where, f"{flops:.3g}", format_mean_std(values, scale=1.0)])
                if seeds:
                    curves[label] = [sorted(points_.items()) for points_ in seeds.values()]
        panels[row] = curves
    if not any(curves for curves in panels.values()):
        return []
    title = "Accuracy against training FLOPs (paper Fig. 5)"
    plot_panels(panels, out / "fig5_flops.png", "MAE + WSP training FLOPs (planner)", title, logx=True)
    return [Block("heading", title, level=3),
            Block("paragraph", "FLOPs are the planner's count of each training job (forward + backward per step x "
                               "steps); MAE→WSP includes its MAE stage, so its points sit to the right."),
            Block("image", title, items=["fig5_flops.png"]),
            table_block(["row", "arm", "grid point", "FLOPs", "accuracy"], body)]


def contrast_blocks(points: list[GridPoint], tables: dict[GridPoint, Table], axes: list[str]) -> list[Block]:
    """The paired contrasts per task at every grid point: where MAE learning starts to pay, if it does."""
    rows = list(dict.fromkeys(row for table in tables.values() for row in table))
    labels = [point_label(point, axes) for point in points]
    blocks = [Block("heading", "Paired contrasts at every grid point", level=3),
              Block("paragraph", "Mean ± std of the per-seed differences in points; ≈0: a paired t-test over the "
                                 "seeds does not separate it from zero at 95%. At MAE budget 0 MAE learning is 0 by "
                                 "construction.")]
    for name in ("MAE learning", "init scheme"):
        arm, minus, meaning = CONTRASTS[name]
        body = [[row, *(contrast_text(paired_contrast(tables[point].get(row, {}), arm, minus)) for point in points)]
                for row in rows]
        blocks += [Block("paragraph", f"**{name}** ({arm} − {minus}: {meaning}):"),
                   table_block(["row", *labels], body)]
    return blocks


_PARAMETERS: dict[str, float] = {}


def parameters_millions(model: str) -> float:
    """The encoder's parameters in millions (built on the meta device: no memory, no weights)."""
    if model not in _PARAMETERS:
        from ..models.vit import create_vit

        _PARAMETERS[model] = sum(p.numel() for p in create_vit(model, device="meta").parameters()) / 1e6
    return _PARAMETERS[model]

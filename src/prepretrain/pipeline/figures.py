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
from .plan import ARM_AXES, Job
from .report import CONTRASTS, collect_by_seed, contrast_text, paired_contrast

ARMS = ("MAE→WSP", "MAE init→WSP", "WSP")
ARM_RUNS = {"MAE→WSP": "mae_wsp", "MAE init→WSP": "maeinit_wsp", "WSP": "wsp"}
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
    for kind in ("model", "mae", "wsp", "flops"):
        if kind in axes or (kind == "flops" and {"mae", "wsp"} & set(axes)):
            blocks += figure_blocks(kind, points, tables, rows, out, jobs, training_flops)
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


def lines_of(along: str, arm: str, points: list[GridPoint], axes: list[str], control: bool) -> dict[str, list]:
    """The lines of one arm in a figure whose points run ``along`` an axis: one line per value of the
    other swept axes the arm depends on (the WSP from scratch does not depend on the MAE budget: one
    line per WSP budget). MAE->WSP at MAE budget 0 *is* the control arm, so it stays off a line along
    another axis when the control is drawn."""
    others = [axis for axis in axes if axis != along and axis in ARM_AXES[ARM_RUNS[arm]]]
    lines: dict[str, list[GridPoint]] = {}
    for point in points:
        if arm == "MAE→WSP" and along != "mae" and not point.mae.trains and control:
            continue
        lines.setdefault(point_label(point, others) if others else "", []).append(point)
    return lines


def figure_blocks(kind: str, points: list[GridPoint], tables: dict[GridPoint, Table], rows: list[str], out: Path,
                  jobs: list[Job] = (), training_flops: dict[str, float] | None = None) -> list[Block]:
    """One figure (a panel per row) and its table. ``kind``: an axis (model, mae, wsp) for transfer
    against it, or ``flops`` for accuracy against MAE + WSP training FLOPs along the swept budget."""
    axes = varying(points)
    along = kind if kind != "flops" else ("wsp" if "wsp" in axes else "mae")
    control = any("MAE init→WSP" in table.get(row, {}) for table in tables.values() for row in rows)
    panels: dict[str, dict[str, list[list[tuple[float, float]]]]] = {}
    cells: dict[tuple[str, str], dict[str, str]] = {}  # (row, x) -> line label -> mean ± std
    places: dict[tuple[str, str], str] = {}  # (row, x) -> the grid point it was read at (the FLOPs table)
    labels: list[str] = []
    for row in rows:
        curves: dict[str, list[list[tuple[float, float]]]] = {}
        for arm in ARMS:
            for suffix, line in lines_of(along, arm, points, axes, control).items():
                label = arm + (f" ({suffix})" if suffix else "")
                seeds: dict[int, dict[float, float]] = {}
                for point in line:
                    values = tables[point].get(row, {}).get(arm, {})
                    if kind == "flops":  # the same for every seed: the planner's count of the same configs
                        x = arm_flops(point, arm, jobs, min(values, default=0), training_flops or {})
                        if x <= 0:
                            continue  # not priced: off the figure
                    else:
                        x = axis_x(kind, point)
                    for seed, value in values.items():
                        seeds.setdefault(seed, {})[x] = value  # a job shared by several points: one x
                    if values:
                        x_name = point.axes(kind)[kind] if kind != "flops" else f"{x:.3g}"
                        cells.setdefault((row, x_name), {})[label] = format_mean_std(list(values.values()),
                                                                                     scale=1.0)
                        here = [a for a in axes if a in ARM_AXES[ARM_RUNS[arm]]]
                        places.setdefault((row, x_name), point_label(point, here))
                if seeds:
                    curves[label] = [sorted(run.items()) for run in seeds.values()]
                    if label not in labels:
                        labels.append(label)
        panels[row] = curves
    if not labels:
        return []
    title, file, xlabel = {
        "model": ("Transfer against model size (paper Fig. 3)", "fig3_model_size.png", axis_title("model", points)),
        "mae": ("Transfer against the MAE budget (paper Fig. 4)", "fig4_mae_budget.png", axis_title("mae", points)),
        "wsp": ("Transfer against the WSP budget, per MAE budget (paper Fig. 4)", "fig4_wsp_budget.png",
                axis_title("wsp", points)),
        "flops": ("Accuracy against training FLOPs (paper Fig. 5)", "fig5_flops.png",
                  "MAE + WSP training FLOPs (planner)"),
    }[kind]
    plot_panels(panels, out / file, xlabel, title, logx=kind in ("model", "flops"))
    blocks = [Block("heading", title, level=3)]
    if kind == "flops":
        blocks.append(Block("paragraph", "FLOPs are the planner's count of each training job (forward + backward per "
                                         "step x steps); MAE→WSP includes its MAE stage, so its points sit to the "
                                         f"right. A line runs along the {AXIS_NAMES[along]}."))
        header = ["row", "FLOPs", "grid point", *labels]
        body = [[row, x, places[(row, x)], *(line.get(label, "–") for label in labels)]
                for (row, x), line in sorted(cells.items(), key=lambda item: (rows.index(item[0][0]),
                                                                              float(item[0][1])))]
    else:
        header = ["row", AXIS_NAMES[kind], *labels]
        body = [[row, x, *(line.get(label, "–") for label in labels)] for (row, x), line in cells.items()]
    return [*blocks, Block("image", title, items=[file]), table_block(header, body)]


def arm_flops(point: GridPoint, arm: str, jobs: list[Job], seed: int, training_flops: dict[str, float]) -> float:
    """Training FLOPs behind an arm at a point: its WSP, plus its MAE for MAE->WSP (the planner's count)."""
    here = [job for job in jobs_at(point, jobs) if job.seed == seed]
    wsp_arm = {"MAE→WSP": "mae_wsp" if point.mae.trains else "maeinit_wsp", "MAE init→WSP": "maeinit_wsp",
               "WSP": "wsp"}[arm]
    total = sum(training_flops.get(job.name, 0.0) for job in here if job.kind == "wsp" and job.arm == wsp_arm)
    if wsp_arm == "mae_wsp":
        total += sum(training_flops.get(job.name, 0.0) for job in here if job.kind == "mae")
    return total


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

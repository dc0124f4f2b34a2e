"""Plots and Markdown/HTML reports: the one place that draws (run curves, pipeline figures).

A report is a list of blocks (heading, paragraph, table, image, code); the same blocks render to
``report.md`` and to a self-contained-looking ``report.html`` (images are files beside it), so
the two never disagree.
"""

from __future__ import annotations

import html
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .files import write_text


@dataclass
class Block:
    kind: str  # heading | paragraph | table | image | code | list
    text: str = ""
    level: int = 2
    rows: list[list[str]] = field(default_factory=list)
    header: list[str] = field(default_factory=list)
    items: list[str] = field(default_factory=list)


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def format_mean_std(values: Sequence[float], scale: float = 100.0, digits: int = 1) -> str:
    mean, std = mean_std(values)
    if math.isnan(mean):
        return "–"
    if len(values) > 1:
        return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}"
    return f"{mean * scale:.{digits}f}"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _draw_curves(ax, curves: dict[str, list[list[tuple[float, float]]]]) -> None:
    """One line per label (mean over runs at shared x), with a band of ± one std when several runs."""
    for label, runs in curves.items():
        runs = [r for r in runs if r]
        if not runs:
            continue
        xs = sorted({x for run in runs for x, _ in run})
        means, stds, shown = [], [], []
        for x in xs:
            ys = [y for run in runs for rx, y in run if rx == x]
            if len(ys) == len(runs):
                m, s = mean_std(ys)
                shown.append(x)
                means.append(m)
                stds.append(s)
        if not shown:
            continue
        line = ax.plot(shown, means, marker="o" if len(shown) < 50 else None, markersize=3, label=label or None)[0]
        if len(runs) > 1:
            ax.fill_between(shown, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                            alpha=0.2, color=line.get_color())


def plot_panels(panels: dict[str, dict[str, list[list[tuple[float, float]]]]], path: Path, xlabel: str,
                title: str = "", logx: bool = False) -> Path:
    """Side-by-side panels, one per y label, each with its labelled curves (see :func:`plot_curves`)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels) + 1, 4), squeeze=False)
    for ax, (ylabel, curves) in zip(axes[0], panels.items()):
        _draw_curves(ax, curves)
        if logx:
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        handles = ax.get_legend_handles_labels()[0]
        if handles:
            ax.legend(fontsize="small" if len(handles) > 4 else None)
    if title:
        (axes[0][0].set_title if len(panels) == 1 else fig.suptitle)(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_curves(curves: dict[str, list[list[tuple[float, float]]]], path: Path, xlabel: str, ylabel: str,
                title: str, logx: bool = False) -> Path:
    """One panel: a line per label (mean over seeds at shared x), ± one std band when several seeds."""
    return plot_panels({ylabel: curves}, path, xlabel, title, logx)


def plot_bars(table: dict[str, dict[str, list[float]]], path: Path, title: str, ylabel: str = "score (%)",
              columns: int = 4) -> Path:
    """Small multiples: one panel per task (its own y range), one bar per encoder (mean ± std over
    seeds, the value printed on the bar). The figure grows in rows as tasks are added, so it keeps
    the proportions of a page (a single row of grouped bars became an unreadable strip once there
    were a dozen tasks). Values are fractions (0.5 = 50%)."""
    plt = _pyplot()
    tasks = list(table)
    encoders = sorted({e for row in table.values() for e in row}, key=lambda e: list(ENCODER_ORDER).index(e)
                      if e in ENCODER_ORDER else 99)
    columns = max(1, min(columns, len(tasks)))
    rows = max(1, math.ceil(len(tasks) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(3.1 * columns, 2.5 * rows + 0.6), squeeze=False)
    colors = {encoder: f"C{i}" for i, encoder in enumerate(encoders)}
    for index, ax in enumerate(axes.flat):
        if index >= len(tasks):
            ax.axis("off")
            continue
        task = tasks[index]
        stats = [mean_std(table[task].get(encoder, [])) for encoder in encoders]
        means = [100 * m if not math.isnan(m) else 0.0 for m, _ in stats]
        errors = [100 * s if not math.isnan(s) else 0.0 for _, s in stats]
        ax.bar(range(len(encoders)), means, 0.75, yerr=errors, capsize=2,
               color=[colors[e] for e in encoders])
        for x, ((mean, _), height) in enumerate(zip(stats, means)):
            if not math.isnan(mean):
                ax.text(x, height, f"{height:.1f}", ha="center", va="bottom", fontsize=7)
        top = max([m + e for m, e in zip(means, errors)] + [1.0])
        ax.set_ylim(0, min(100.0, top * 1.2) if top <= 100 else top * 1.2)
        ax.set_title(task, fontsize=9)
        ax.set_xticks([])
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(axis="y", alpha=0.3)
        if index % columns == 0:
            ax.set_ylabel(ylabel, fontsize=8)
    handles = [plt.Rectangle((0, 0), 1, 1, color=colors[e]) for e in encoders]
    fig.legend(handles, encoders, loc="upper center", ncol=max(1, len(encoders)), fontsize=8, frameon=False)
    fig.suptitle(title, y=0.995, fontsize=10, x=0.01, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.45 / (2.5 * rows + 0.6)))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


ENCODER_ORDER = ("MAE→WSP", "MAE init→WSP", "WSP", "MAE", "MAE init (untrained)", "random init")


def render_markdown(blocks: list[Block]) -> str:
    out: list[str] = []
    for block in blocks:
        if block.kind == "heading":
            out.append(f"{'#' * block.level} {block.text}\n")
        elif block.kind == "paragraph":
            out.append(block.text + "\n")
        elif block.kind == "list":
            out.append("\n".join(f"- {item}" for item in block.items) + "\n")
        elif block.kind == "table":
            out.append("| " + " | ".join(block.header) + " |")
            out.append("|" + "---|" * len(block.header))
            out.extend("| " + " | ".join(row) + " |" for row in block.rows)
            out.append("")
        elif block.kind == "image":
            out.append(f"![{block.text}]({block.items[0]})\n")
        elif block.kind == "code":
            out.append(f"```\n{block.text}\n```\n")
    return "\n".join(out)


def render_html(blocks: list[Block], title: str) -> str:
    body: list[str] = []
    for block in blocks:
        if block.kind == "heading":
            body.append(f"<h{block.level}>{html.escape(block.text)}</h{block.level}>")
        elif block.kind == "paragraph":
            body.append(f"<p>{_inline(block.text)}</p>")
        elif block.kind == "list":
            body.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in block.items) + "</ul>")
        elif block.kind == "table":
            head = "".join(f"<th>{html.escape(h)}</th>" for h in block.header)
            rows = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in block.rows)
            body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{rows}</tbody></table>")
        elif block.kind == "image":
            body.append(f'<figure><img src="{html.escape(block.items[0])}" alt="{html.escape(block.text)}">'
                        f"<figcaption>{html.escape(block.text)}</figcaption></figure>")
        elif block.kind == "code":
            body.append(f"<pre><code>{html.escape(block.text)}</code></pre>")
    style = (
        "body{font-family:system-ui,sans-serif;max-width:980px;margin:2em auto;padding:0 1em;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
        "th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}img{max-width:100%}"
        "pre{background:#f6f6f6;padding:8px;overflow-x:auto}figure{margin:1em 0}figcaption{color:#666;font-size:90%}"
        ".verdict{font-size:110%;padding:8px;background:#eef6ee;border-left:4px solid #4a4}"
    )
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>\n")


def _inline(text: str) -> str:
    """Escape, then render **bold** and `code` spans."""
    escaped = html.escape(text)
    parts = escaped.split("**")
    escaped = "".join(f"<b>{p}</b>" if i % 2 else p for i, p in enumerate(parts))
    parts = escaped.split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def write_report(run_dir: Path, blocks: list[Block], title: str) -> tuple[Path, Path]:
    md = run_dir / "report.md"
    page = run_dir / "report.html"
    write_text(md, render_markdown(blocks))
    write_text(page, render_html(blocks, title))
    return md, page


def table_block(header: list[str], rows: list[list[Any]]) -> Block:
    return Block("table", header=header, rows=[[str(c) for c in row] for row in rows])

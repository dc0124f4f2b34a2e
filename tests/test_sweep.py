"""Sweeps: list-valued model and budget keys plan a grid of arms, each job once; the report draws the
paper's Figs. 3-5 from whatever was swept; growing a sweep reruns only the new point's jobs."""

import json
import re
from pathlib import Path

import pytest

from prepretrain.config import ConfigError, build_config
from prepretrain.pipeline import PipelineConfig, dry_run, plan_jobs, run_pipeline
from prepretrain.pipeline.config import grid_points
from prepretrain.pipeline.figures import jobs_at, point_label, point_table, sweep_blocks, varying
from prepretrain.report import write_report

ROOT = Path(__file__).resolve().parents[1]


def plan(**values):
    return plan_jobs(build_config(PipelineConfig, None, {"evaluations": "probe", "tasks": "coarse", **values}))


def test_a_grid_plans_every_point_and_each_shared_job_once(tmp_path):
    single = {job.name: job.key for job in plan(out_dir=str(tmp_path), seeds="0")}
    jobs = plan(out_dir=str(tmp_path), seeds="0", model="vit_micro4,vit_ti4", mae_steps="200,0,600",
                wsp_steps="150,50")
    names = [job.name for job in jobs]
    assert len(names) == len(set(names))
    # the first value of every axis keeps the layout (and the keys) of the pipeline without a sweep
    assert {name: key for name, key in ((j.name, j.key) for j in jobs) if name in single} == single
    # the WSP from scratch and the control read no MAE: one per (model, WSP budget), whatever the MAE budget
    assert sorted(n for n in names if n.endswith("/wsp") and "vit_ti4" not in n) == ["seed0/wsp", "wsp50/seed0/wsp"]
    assert sorted(n for n in names if n.endswith("/mae") and "vit_ti4" not in n) == ["mae600/seed0/mae", "seed0/mae"]
    assert "mae600/wsp50/seed0/wsp_mae" in names and "vit_ti4/mae600/wsp50/seed0/wsp_mae" in names
    assert not [n for n in names if "mae0" in n]  # MAE budget 0 *is* the control arm: no job of its own
    by_name = {job.name: job for job in jobs}
    assert by_name["mae600/wsp50/seed0/wsp_mae"].values["init"].endswith("mae600/seed0/mae")
    assert by_name["mae600/wsp50/seed0/wsp_mae"].values["steps"] == 50
    assert by_name["mae600/seed0/mae"].values["steps"] == 600
    assert by_name["vit_ti4/seed0/wsp"].values["model"] == "vit_ti4"
    assert by_name["vit_ti4/seed0/eval/random/coarse"].values["model"] == "vit_ti4"
    # at MAE budget 0 the grid point reads the control arm; it is planned even with control_arms=false
    without = plan(out_dir=str(tmp_path), seeds="0", mae_steps="200,0", control_arms="false")
    zero = [point for point in grid_points(build_config(PipelineConfig, None, {"mae_steps": "200,0"}))
            if not point.mae.trains][0]
    assert {job.arm for job in jobs_at(zero, without)} == {"maeinit_wsp", "wsp", "random"}
    # epochs as the budget: epochs=E and steps=0 for the stage
    epochs = {job.name: job for job in plan(out_dir=str(tmp_path), seeds="0", mae_epochs="1,0.5")}
    assert epochs["mae0.5ep/seed0/mae"].values["epochs"] == 0.5 and epochs["mae0.5ep/seed0/mae"].values["steps"] == 0


def test_sweep_mistakes_name_the_key(tmp_path):
    for values, key in [({"mae_steps": "200,200"}, "mae_steps"), ({"model": "vit_micro4,vit_micro4"}, "model"),
                        ({"wsp_steps": "0"}, "wsp_steps"), ({"mae_steps": "-1"}, "mae_steps"),
                        ({"wsp_epochs": "1,0"}, "wsp_epochs"), ({"model": "vit_micro4,vit_nope"}, "model")]:
        with pytest.raises(ConfigError, match=f"'{key}'"):
            plan(out_dir=str(tmp_path), **values)
    # a recipe sets its own budget: a steps sweep it would ignore is refused with the epochs key to use
    with pytest.raises(ConfigError, match="mae_epochs="):
        build_config(PipelineConfig, ROOT / "configs" / "pipeline_vit_b16.yaml", {"mae_steps": "100,200"})
    # "{model}" in a recipe path names a file per model; a missing one is named with its model
    with pytest.raises(ConfigError, match=r"mae_config.*mae_vit_s16\.yaml \(model vit_s16\)"):
        build_config(PipelineConfig, None, {"mae_config": str(ROOT / "configs" / "mae_{model}.yaml"),
                                            "model": "vit_b16,vit_s16"})


def fake_results(jobs) -> dict:
    """A linear probe score per frozen job, made from its grid values and seed: every number is known."""
    results = {}
    for job in jobs:
        if job.kind == "frozen":
            base = {"mae_wsp": 50, "maeinit_wsp": 40, "wsp": 30, "mae": 20, "mae_init": 10, "random": 5}[job.arm]
            mae = float(job.grid.get("mae", "0 steps").split()[0]) / 100 if job.arm in ("mae_wsp", "mae") else 0
            wsp = float(job.grid.get("wsp", "0 steps").split()[0]) / 50 if "wsp" in job.grid else 0
            size = 3 if job.grid["model"] == "vit_ti4" else 0
            results[job.name] = {"probe": {"top1": base + mae + wsp + size + job.seed}}
        elif job.kind in ("mae", "wsp"):
            results[job.name] = {"steps": job.values["steps"], "samples_seen": 16 * job.values["steps"]}
    return results


def test_the_report_draws_the_figures_with_their_numbers(tmp_path):
    cfg = build_config(PipelineConfig, None, {"out_dir": str(tmp_path), "seeds": "0,1", "evaluations": "probe",
                                              "tasks": "coarse", "model": "vit_micro4,vit_ti4",
                                              "mae_steps": "200,0,600", "wsp_steps": "150,50"})
    jobs = plan_jobs(cfg)
    results = fake_results(jobs)
    flops = {job.name: 1e12 * job.values["steps"] for job in jobs if job.kind in ("mae", "wsp")}
    blocks = sweep_blocks(cfg, jobs, results, flops, tmp_path)
    md, _ = write_report(tmp_path, blocks, "sweep")
    text = md.read_text()
    for figure in ("fig3_model_size.png", "fig4_mae_budget.png", "fig4_wsp_budget.png", "fig5_flops.png"):
        assert (tmp_path / figure).stat().st_size > 1000, figure
        assert figure in text
    # MAE->WSP at vit_ti4, MAE 600 steps, WSP 50 steps: 50 + 6 + 1 + 3, seeds +0/+1 -> 60.5 ± 0.7
    mae_budget = text.split("paper Fig. 4)", 1)[1]
    assert re.search(r"\| linear probe \(coarse\) \| 600 steps \| [^\n]*60\.5 ± 0\.7", mae_budget)
    # at MAE budget 0 the MAE->WSP arm is the control arm: 40 + 3 (WSP 150) + 0.5
    zero = [p for p in grid_points(cfg) if not p.mae.trains and p.model == "vit_micro4" and p.wsp.value == 150][0]
    table = point_table(cfg, zero, jobs, results)["linear probe (coarse)"]
    assert table["MAE→WSP"] == table["MAE init→WSP"] == {0: 43.0, 1: 44.0}
    # the FLOPs of MAE->WSP are its MAE's and its WSP's: 600 + 50 steps of 1e12 at (MAE 600, WSP 50)
    assert re.search(r"\| linear probe \(coarse\) \| 6\.5e\+14 \| vit_micro4, MAE 600 steps, WSP 50 steps \|"
                     r"[^\n]*57\.5 ± 0\.7", text)
    # the contrasts per point: MAE learning = 10 + mae/100 points, 0 at MAE budget 0
    contrasts = text.split("Paired contrasts at every grid point", 1)[1].split("**init scheme**")[0]
    row = next(line for line in contrasts.splitlines() if line.startswith("| linear probe (coarse)"))
    cells = [cell.strip() for cell in row.strip("|").split("|")][1:]
    assert cells[:6] == ["+12.0 ± 0.0", "+12.0 ± 0.0", "+0.0 ± 0.0 (≈0)", "+0.0 ± 0.0 (≈0)", "+16.0 ± 0.0",
                         "+16.0 ± 0.0"]


@pytest.mark.slow
def test_growing_a_sweep_reruns_only_the_new_points_jobs(tmp_path):
    tiny = {"out_dir": str(tmp_path), "seeds": "0", "num_images": 96, "mae_steps": "3", "wsp_steps": "4",
            "eval_every": 2, "batch_size": 16, "evaluations": "probe", "tasks": "coarse", "random_baseline": "false",
            "control_arms": "false", "workers": "2"}
    run_pipeline(build_config(PipelineConfig, None, tiny))
    before = {path: path.read_text() for path in tmp_path.rglob("pipeline_job.json")}
    grown = build_config(PipelineConfig, None, {**tiny, "mae_steps": "3,6"})
    results = run_pipeline(grown)
    after = {path: path.read_text() for path in tmp_path.rglob("pipeline_job.json")}
    assert {path: after[path] for path in before} == before  # no finished job ran again
    ran = sorted(str(path.parent.relative_to(tmp_path)) for path in set(after) - set(before))
    assert ran == ["mae6/seed0/eval/mae/coarse", "mae6/seed0/eval/mae_wsp/coarse", "mae6/seed0/mae",
                   "mae6/seed0/wsp_mae"]
    assert json.loads((tmp_path / "mae6/seed0/mae/pipeline_job.json").read_text())["results"]["steps"] == 6
    assert results["mae6/seed0/wsp_mae"]
    report = (tmp_path / "report.md").read_text()
    assert "The sweep (paper Figs. 3-5)" in report and (tmp_path / "fig4_mae_budget.png").exists()
    assert "grid point MAE 6 steps" in report  # the tables above the sweep are the last point's


def test_each_figure_recipe_dry_runs_with_its_grid():
    for path in sorted((ROOT / "configs").glob("figure*.yaml")):
        cfg = build_config(PipelineConfig, path)
        plan = dry_run(cfg)
        grid = plan.split("sweep grid: ", 1)[1].splitlines()
        points = grid_points(cfg)
        assert grid[0].startswith(f"{len(points)} points"), path.name
        axes = varying(points)
        new_hours = 0.0
        for point, line in zip(points, grid[2:2 + len(points)], strict=True):
            assert line.startswith(point_label(point, axes)), line
            assert int(line.split()[-4]) > 0  # the point's jobs
            new_hours += float(line.split()[-2].replace(",", ""))  # GPU-hours of the jobs it adds
        total = float(re.search(r"jobs: ([\d,]+) GPU-hours", plan).group(1).replace(",", ""))
        assert total > 0 and new_hours == pytest.approx(total, rel=0.01, abs=len(points))  # each job counted once
    assert len(list((ROOT / "configs").glob("figure*.yaml"))) >= 3

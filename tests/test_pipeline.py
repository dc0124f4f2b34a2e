"""The pipeline: jobs cached by config, same seed -> same numbers, report with plots, paper plans."""

import json
import re
import time
from pathlib import Path

import pytest
import torch

from prepretrain.config import ConfigError, build_config
from prepretrain.pipeline import PipelineConfig, dry_run, plan_jobs, run_pipeline

ROOT = Path(__file__).resolve().parents[1]
TINY = {"seeds": "0", "num_images": 120, "mae_steps": 3, "wsp_steps": 4, "lit_steps": 2, "finetune_steps": 2,
        "eval_every": 2, "batch_size": 16, "evaluations": "probe,knn,zeroshot", "tasks": "coarse",
        "random_baseline": "false"}


def numbers(results: dict) -> dict:
    """Every numeric result, flattened, without timings."""
    flat = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for key, inner in value.items():
                if "second" not in key and key not in ("features_computed",):
                    walk(f"{prefix}/{key}", inner)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            flat[prefix] = value

    walk("", results)
    return flat


def mini_food101(root: Path, per_class: tuple[int, int] = (6, 3)) -> Path:
    """A Food-101 copy in its release layout (meta/ lists, images/<class>/<id>.jpg), 3 classes."""
    from PIL import Image

    from prepretrain.data.synthetic import SyntheticSource

    classes, shapes = ["apple_pie", "bibimbap", "churros"], SyntheticSource(300, 32, split="train")
    of_class = {label: [i for i in range(len(shapes)) if shapes.get(i).labels["coarse"] == label] for label in range(3)}
    (root / "meta").mkdir(parents=True)
    (root / "meta" / "classes.txt").write_text("\n".join(classes) + "\n")
    (root / "meta" / "labels.txt").write_text("Apple pie\nBibimbap\nChurros\n")
    for split, count in zip(("train", "test"), per_class, strict=True):
        lines = []
        for label, name in enumerate(classes):  # one synthetic shape per class
            for k in range(count):
                image: Image.Image = shapes.get(of_class[label].pop()).image
                (root / "images" / name).mkdir(parents=True, exist_ok=True)
                image.save(root / "images" / name / f"{split}{k}.jpg")
                lines.append(f"{name}/{split}{k}")
        (root / "meta" / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.mark.slow
def test_tiny_pipeline_report_and_cache(tmp_path):
    tiny = TINY
    first = build_config(PipelineConfig, None, {**tiny, "out_dir": str(tmp_path / "a"), "workers": "2"})
    results = run_pipeline(first)
    out = tmp_path / "a"
    for name in ("report.md", "report.html", "results.json", "transfer.png", "wsp_convergence.png",
                 "accuracy_vs_flops.png", "mae_reconstructions.png"):
        assert (out / name).exists(), name
    report = (out / "report.md").read_text()
    assert "MAE→WSP" in report and "MAE init→WSP" in report and "MAE init (untrained)" in report
    verdict = report.split("## Verdict", 1)[1].split("\n## ", 1)[0]
    assert "**MAE learning** (MAE→WSP − MAE init→WSP" in verdict and "**init scheme**" in verdict
    assert "with one seed nothing can be separated" in verdict and "a gain on 0 of" in verdict  # one seed: all ≈0
    assert "linear probe (coarse)" in report and "zero-shot (coarse)" in report
    assert "prepretrain pipeline --config" in report

    # a rerun reuses every job
    start = time.perf_counter()
    again = run_pipeline(first)
    assert time.perf_counter() - start < 30
    assert numbers(again) == numbers(results)

    # the same numbers from another directory, one job at a time and on SLURM: tests/test_pipeline_jobs.py


def test_jobs_cover_the_experiment_and_keys_follow_dependencies(tmp_path):
    cfg = build_config(PipelineConfig, None, {"out_dir": str(tmp_path), "seeds": "0,1"})
    jobs = plan_jobs(cfg)
    names = [job.name for job in jobs]
    for seed in (0, 1):
        for name in ("mae", "wsp_mae", "wsp_maeinit", "wsp", "lit_mae_wsp", "lit_maeinit_wsp", "lit_wsp",
                     "eval/mae_wsp/coarse", "eval/maeinit_wsp/coarse", "eval/wsp/fine", "eval/mae/coarse",
                     "eval/mae_init/fine", "eval/random/coarse", "eval/mae_wsp/zeroshot", "eval/maeinit_wsp/zeroshot",
                     "eval/wsp/finetune", "eval/maeinit_wsp/finetune"):
            assert f"seed{seed}/{name}" in names
        assert f"seed{seed}/eval/mae_init/finetune" not in names
    by_name = {job.name: job for job in jobs}
    assert by_name["seed0/wsp_mae"].values["init"].endswith("seed0/mae")
    assert by_name["seed0/wsp_maeinit"].values["init"] == "mae-init" and not by_name["seed0/wsp_maeinit"].deps
    assert by_name["seed0/wsp"].values["init"] == ""
    assert by_name["seed0/eval/mae_init/coarse"].values["encoder"] == "mae-init"
    assert by_name["seed0/eval/random/coarse"].values["encoder"] == ""
    wsp_values = {name: {k: v for k, v in by_name[f"seed0/{name}"].values.items() if k not in ("init", "out_dir")}
                  for name in ("wsp_mae", "wsp_maeinit", "wsp")}
    assert wsp_values["wsp_mae"] == wsp_values["wsp_maeinit"] == wsp_values["wsp"]  # same budget, data, seed
    without = [job.name for job in plan_jobs(build_config(
        PipelineConfig, None, {"out_dir": str(tmp_path), "seeds": "0", "control_arms": "false"}))]
    assert not [name for name in without if "maeinit" in name or "mae_init" in name]
    # changing the MAE stage changes the key of everything that reads it, and nothing else
    changed = {job.name: job.key for job in plan_jobs(build_config(
        PipelineConfig, None, {"out_dir": str(tmp_path), "seeds": "0,1", "mae_steps": 7}))}
    assert changed["seed0/mae"] != by_name["seed0/mae"].key
    assert changed["seed0/wsp_mae"] != by_name["seed0/wsp_mae"].key
    assert changed["seed0/wsp"] == by_name["seed0/wsp"].key


@pytest.mark.parametrize("size", ["b16", "l16", "h14", "2b14", "6.5b14"])
def test_paper_scale_pipeline_configs_validate_and_dry_run(size):
    path = ROOT / "configs" / f"pipeline_vit_{size}.yaml"
    cfg = build_config(PipelineConfig, path)
    plan = dry_run(cfg)
    assert "total training" in plan and f"vit_{size}" in plan
    rows = [line for line in plan.splitlines() if line.startswith("seed0/") and "(inference)" not in line]
    assert rows and all(" True " in row for row in rows if " lit " not in row)  # every trained stage fits


def test_slurm_dry_run_sizes_every_job_and_prices_the_critical_path():
    """executor=slurm --dry-run: each job's sbatch resources (pretraining on gpus= as whole nodes,
    transfer trainings on transfer_gpus, evaluations on one GPU), the critical path, the GPU-hours."""
    cfg = build_config(PipelineConfig, ROOT / "configs" / "pipeline_vit_b16.yaml",
                       {"executor": "slurm", "gpus": 64, "transfer_gpus": 8, "slurm_partition": "gpu",
                        "slurm_extra": "mem=400G"})
    plan = dry_run(cfg)
    sbatch = plan.split("sbatch resources", 1)[1].split("\n\n", 1)[0]
    assert "--partition=gpu" in sbatch and "--mem=400G" in sbatch
    rows = {line.split()[0]: line.split()[1:] for line in sbatch.splitlines()[2:]}
    assert rows["seed0/mae"][:4] == ["8", "8", "8", "10"]  # 8 nodes x 8 GPUs, one task per GPU
    assert rows["seed0/eval/mae_wsp/finetune"][:3] == ["1", "8", "8"]  # transfer_gpus=8: one node
    assert rows["seed0/eval/mae/label"][:3] == ["1", "1", "1"]  # an evaluation: one GPU
    assert rows["seed0/wsp_mae"][-1] == "1" and rows["seed0/wsp"][-1] == "0"  # afterok on the MAE only
    path = re.search(r"critical path: ([\d.]+) hours, (.*)", plan)
    assert path and path.group(2).split(" -> ")[:2] == ["seed0/mae", "seed0/wsp_mae"]
    hours = {line.split()[0]: float(line.split()[-1]) for line in plan.splitlines()
             if line.startswith("seed0/") and len(line.split()) > 4 and "sbatch" not in line and ":" not in line}
    chain = [name for name in path.group(2).split(" -> ")]
    assert float(path.group(1)) == pytest.approx(sum(hours[name] for name in chain), rel=0.01)
    gpu_hours = float(re.search(r"([\d,]+) GPU-hours", plan).group(1).replace(",", ""))
    assert gpu_hours > 64 * (hours["seed0/mae"] + 3 * hours["seed0/wsp"])  # the pretraining stages alone


def test_every_paper_recipe_validates():
    from prepretrain.config import read_yaml
    from prepretrain.registry import command

    for path in sorted((ROOT / "configs").glob("*.yaml")):
        kind = read_yaml(path)["stage"]  # every recipe says which command reads it
        if kind == "pipeline":  # pipeline configs and sweeps: test_paper_scale_..., tests/test_sweep.py
            build_config(PipelineConfig, path)
            continue
        config_cls = command(kind).config
        try:
            build_config(config_cls, path)
        except ConfigError as error:  # files a recipe names (tokenizer, init, encoder) are absent here
            assert error.key in ("tokenizer", "encoder", "init"), (path, error)


def test_pipeline_config_mistakes_name_the_key():
    with pytest.raises(ConfigError, match="evaluations"):
        build_config(PipelineConfig, None, {"evaluations": "probe,magic"})
    with pytest.raises(ConfigError, match="mae_config"):
        build_config(PipelineConfig, None, {"mae_config": "/nope.yaml"})
    for key, value in (("executor", "pbs"), ("workers", "0"), ("workers", "many"), ("slurm_extra", "=x"),
                       ("threads", "-1"), ("slurm_time", "-5")):
        with pytest.raises(ConfigError, match=key):
            build_config(PipelineConfig, None, {key: value})
    with pytest.raises(ConfigError, match="gpus"):  # more GPUs than a node must be whole nodes
        dry_run(build_config(PipelineConfig, ROOT / "configs" / "pipeline_vit_b16.yaml", {"gpus": 12}))


def test_results_json_is_valid(tmp_path):
    cfg = build_config(PipelineConfig, None, {"out_dir": str(tmp_path)})
    assert json.loads(json.dumps([job.values for job in plan_jobs(cfg)]))


def test_per_stage_data_keys_reach_their_jobs(tmp_path):
    overrides = {**TINY, "out_dir": str(tmp_path), "mae_data": "/m", "wsp_data": "/w", "lit_data": "/l",
                 "eval_data": "/e", "evaluations": "probe,zeroshot,finetune"}
    jobs = plan_jobs(build_config(PipelineConfig, None, overrides))
    by_kind = {}
    for job in jobs:
        by_kind.setdefault(job.kind, set()).add(job.values["data"])
    assert by_kind == {"mae": {"/m"}, "wsp": {"/w"}, "lit": {"/l"}, "zeroshot": {"/e"}, "frozen": {"/e"},
                       "finetune": {"/e"}}
    default = plan_jobs(build_config(PipelineConfig, None, {**TINY, "out_dir": str(tmp_path), "data": "/d"}))
    assert {job.values["data"] for job in default} == {"/d"}
    only_mae = plan_jobs(build_config(PipelineConfig, None, {**TINY, "out_dir": str(tmp_path), "mae_data": "/m"}))
    assert {job.kind for job in only_mae if job.values["data"] == "/m"} == {"mae"}


def test_missing_eval_data_fails_before_any_job_runs(tmp_path):
    out = tmp_path / "out"
    cfg = build_config(PipelineConfig, None, {**TINY, "out_dir": str(out), "eval_data": str(tmp_path / "absent")})
    with pytest.raises(ConfigError, match="eval_data") as caught:
        run_pipeline(cfg)
    assert str(tmp_path / "absent") in str(caught.value)
    assert not out.exists()  # nothing written, no job directory made


def test_eval_folder_without_the_tasks_labels_fails_naming_eval_data(tmp_path):
    from PIL import Image

    folder = tmp_path / "labelled"
    for split in ("train", "val"):
        for name in ("ring", "star"):
            (folder / split / name).mkdir(parents=True)
            Image.new("RGB", (8, 8), (10, 20, 30)).save(folder / split / name / "0.png")
    cfg = build_config(PipelineConfig, None, {**TINY, "out_dir": str(tmp_path / "out"), "eval_data": str(folder)})
    with pytest.raises(ConfigError, match="eval_data.*coarse"):
        run_pipeline(cfg)
    assert not (tmp_path / "out").exists()
    labelled = build_config(PipelineConfig, None, {**TINY, "out_dir": str(tmp_path / "out"), "eval_data": str(folder),
                                                   "tasks": "label", "evaluations": "probe"})
    from prepretrain.pipeline import pre_flight

    checks = pre_flight(labelled)
    assert [(c.key, c.task, c.sizes, c.num_classes) for c in checks] == [
        ("data", "", {"train": 120}, 0), ("eval_data", "label", {"train": 2, "val": 2, "test": 2}, 2)]


def test_zeroshot_class_names_are_checked_before_any_job(tmp_path):
    """An ImageNet-style folder (WordNet-id class folders) needs no class file; a class file
    whose length does not match the classes stops the pipeline before any compute."""
    from PIL import Image

    from prepretrain.pipeline import pre_flight

    folder = tmp_path / "imagenet"
    for split in ("train", "val"):
        for wnid in ("n01440764", "n01443537"):
            (folder / split / wnid).mkdir(parents=True)
            Image.new("RGB", (8, 8), (10, 20, 30)).save(folder / split / wnid / "0.png")
    base = {**TINY, "out_dir": str(tmp_path / "out"), "eval_data": str(folder), "tasks": "label",
            "evaluations": "zeroshot", "zeroshot_templates": "openai80"}
    checks = pre_flight(build_config(PipelineConfig, None, base))
    assert checks[-1].zeroshot and checks[-1].num_classes == 2 and not checks[-1].error
    zeroshot = [job for job in plan_jobs(build_config(PipelineConfig, None, base)) if job.kind == "zeroshot"]
    assert zeroshot and all(job.values["templates"] == "openai80" for job in zeroshot)
    wrong = tmp_path / "three.txt"
    wrong.write_text("tench\ngoldfish\nshark\n")
    with pytest.raises(ConfigError, match="eval_data.*3 class names for the 2 classes"):
        run_pipeline(build_config(PipelineConfig, None, {**base, "zeroshot_classes": str(wrong)}))
    assert not (tmp_path / "out").exists()


def test_missing_stage_data_names_its_key(tmp_path):
    cfg = build_config(PipelineConfig, None, {**TINY, "out_dir": str(tmp_path / "out"),
                                              "wsp_data": str(tmp_path / "no_such_wsp")})
    with pytest.raises(ConfigError, match="wsp_data"):
        run_pipeline(cfg)
    assert not (tmp_path / "out").exists()


def test_dry_run_lists_the_data_sources_with_their_sizes(tmp_path):
    cfg = build_config(PipelineConfig, None, {**TINY, "out_dir": str(tmp_path), "tasks": "coarse,fine"})
    plan = dry_run(cfg)
    assert "data=synthetic: train 120" in plan
    assert re.search(r"data=synthetic task=coarse: train 120, val \d+, test \d+, 10 classes", plan)
    assert "data=synthetic task=fine: train 120" in plan
    missing = dry_run(build_config(PipelineConfig, None, {**TINY, "out_dir": str(tmp_path),
                                                          "eval_data": str(tmp_path / "gone")}))
    assert f"eval_data={tmp_path / 'gone'} task=coarse: NOT USABLE" in missing  # planned anyway


@pytest.mark.parametrize("count", [1, 5, 18])
def test_transfer_chart_keeps_page_proportions_as_tasks_grow(tmp_path, count):
    """One panel per task in rows of four: the figure gets taller, never a thin strip."""
    from PIL import Image

    from prepretrain.report import plot_bars

    table = {f"task {i}": {"MAE→WSP": [0.5, 0.6], "WSP": [0.4], "MAE": [0.3], "random init": [0.1]}
             for i in range(count)}
    path = plot_bars(table, tmp_path / "bars.png", "transfer")
    width, height = Image.open(path).size
    assert 0.4 <= width / height <= 2.5, (width, height)
    assert height >= 250 * -(-count // 4)  # every row of panels keeps its height


@pytest.mark.slow
def test_rehearsal_runs_a_paper_pipeline_config_end_to_end(tmp_path, monkeypatch):
    """`prepretrain data rehearsal` writes shards and a labelled folder and a pipeline config that
    keeps every recipe value but model size, budgets and hardware; the pipeline then runs all of it."""
    import yaml

    from prepretrain.cli import main

    monkeypatch.chdir(ROOT)  # the paper configs name their recipes from the repository root
    out = tmp_path / "rehearsal"
    assert main(["data", "rehearsal", "--out", str(out), "--num-images", "300", "--steps", "2"]) == 0
    assert sorted(p.name for p in (out / "data" / "pretrain").iterdir()) == ["train", "val"]
    assert (out / "data" / "eval" / "val" / "ring").is_dir()
    # + classify_sets: every finetuned model scored again, as is, on the eval folder's val split
    cfg = build_config(PipelineConfig, out / "pipeline.yaml", {"classify_sets": f"heldout={out / 'data' / 'eval'}@val"})
    assert cfg.mae_config.endswith("configs/mae_vit_b16.yaml") and "lit.micro_batch_size=8" in cfg.recipe_overrides
    results = run_pipeline(cfg)
    runs = out / "runs" / "seed0"
    stage = {name: yaml.safe_load((runs / name / "config.yaml").read_text())
             for name in ("mae", "wsp_mae", "lit_mae_wsp", "eval/wsp/finetune")}
    # the recipes as written ...
    assert stage["mae"]["mask_ratio"] == 0.75 and stage["mae"]["norm_pix_loss"] is True
    assert stage["wsp_mae"]["loss"] == "softmax" and stage["wsp_mae"]["resample_power"] == 0.5
    assert stage["lit_mae_wsp"]["text_dropout"] == 0.1 and stage["eval/wsp/finetune"]["layer_decay"] == 0.65
    # ... with the rehearsal's size, budget and hardware
    assert all(values["steps"] == 2 and values["device"] == "cpu" for values in stage.values())
    assert stage["lit_mae_wsp"]["batch_size"] == 32 and stage["lit_mae_wsp"]["micro_batch_size"] == 8
    assert stage["wsp_mae"]["init"] == str(runs / "mae")
    wsp = [json.loads(line) for line in (runs / "wsp_mae" / "metrics.jsonl").read_text().splitlines()]
    assert any("val_precision_at_1" in row for row in wsp)  # held out: the val shards
    report = (out / "runs" / "report.md").read_text()
    assert "finetune (label)" in report
    assert results["seed0/eval/mae_wsp/zeroshot"]["num_classes"] == 10
    # the finetune selects on val: classify's top-1 on val is the finetune's own validation top-1
    for label in ("mae_wsp", "wsp", "mae"):
        finetune = results[f"seed0/eval/{label}/finetune"]
        assert results[f"seed0/eval/{label}/classify_heldout"]["top1"] == pytest.approx(finetune["best_val_top1"])
    assert "heldout top-1 (finetuned)" in report and "| encoder | " in report  # the paper-layout table


@pytest.mark.slow
def test_task_stages_run_for_every_encoder_and_join_the_report(tmp_path):
    """evaluations=...,video: the video stage runs once per encoder (its recipe file, the pipeline's
    encoders), the single-frame baseline with it, and both appear in the report's table."""
    recipe = tmp_path / "video_tiny.yaml"
    recipe.write_text("stage: video\nnum_images: 32\nsteps: 2\nbatch_size: 8\neval_batch_size: 32\n"
                      "synthetic_length: 16\ntemporal_views: 1\nprogress: false\n")
    food = mini_food101(tmp_path / "food-101")  # + a transfer set in its release layout (eval_sets), own rows
    cfg = build_config(PipelineConfig, None, {**TINY, "out_dir": str(tmp_path / "out"), "evaluations": "probe,video",
                                              "video_config": str(recipe), "recipe_overrides": "video.steps=1",
                                              "eval_sets": f"food={food}"})
    jobs = [job for job in plan_jobs(cfg) if job.kind == "video"]
    assert [job.name for job in jobs] == [f"seed0/eval/{label}/video" for label in
                                          ("mae_wsp", "maeinit_wsp", "wsp", "mae", "mae_init")]
    assert jobs[0].values["encoder"].endswith("seed0/wsp_mae") and jobs[0].deps == ["seed0/wsp_mae"]
    assert jobs[-1].values["encoder"] == "mae-init" and jobs[-1].deps == []  # the control, untrained
    assert "video_data=synthetic (video): generated by the stage" in dry_run(cfg)
    results = run_pipeline(cfg)
    for label in ("mae", "mae_init"):
        video = results[f"seed0/eval/{label}/video"]
        assert video["steps"] == 1 and 0 <= video["top1"] <= 100 and 0 <= video["single_frame_top1"] <= 100
    report = (tmp_path / "out" / "report.md").read_text()
    assert "| video top-1 |" in report and "| video, single-frame baseline top-1 |" in report
    assert "| food: linear probe |" in report and "eval_sets[food]" in dry_run(cfg)
    food_probe = results["seed0/eval/mae_wsp/sets/food/label"]["probe"]
    assert food_probe["num_classes"] == 3 and food_probe["test_split"] == "test"


def test_verdict_reads_paired_contrasts_and_claims_only_what_the_seeds_separate():
    """MAE learning = MAE→WSP − MAE init→WSP and init scheme = MAE init→WSP − WSP, paired per seed;
    a contrast is a gain or a loss only when a paired t-test (95%) separates it from zero."""
    from types import SimpleNamespace

    from prepretrain.pipeline.report import paired_contrast, verdict_blocks

    # probe: MAE learning +2.5 (diffs 1, 2, 3, 4: t = 3.87 > 3.18); init scheme diffs 5, -4, 6, -3 (≈0)
    probe = {"MAE→WSP": {0: 51.0, 1: 52.0, 2: 53.0, 3: 54.0}, "MAE init→WSP": {0: 50.0, 1: 50.0, 2: 50.0, 3: 50.0},
             "WSP": {0: 45.0, 1: 54.0, 2: 44.0, 3: 53.0}}
    learning = paired_contrast(probe, "MAE→WSP", "MAE init→WSP")
    assert learning == {"mean": 2.5, "std": pytest.approx(1.2910, abs=1e-4), "seeds": 4, "separated": True}
    scheme = paired_contrast(probe, "MAE init→WSP", "WSP")
    assert scheme["mean"] == 1.0 and not scheme["separated"]
    # the same +2.5 over two seeds is not enough (t critical 12.7), and a seed missing in one arm is not paired
    two = {"MAE→WSP": {0: 51.0, 1: 54.0}, "MAE init→WSP": {0: 50.0, 1: 50.0, 2: 99.0}}
    assert paired_contrast(two, "MAE→WSP", "MAE init→WSP") == {"mean": 2.5, "std": pytest.approx(2.1213, abs=1e-4),
                                                                 "seeds": 2, "separated": False}
    assert paired_contrast(two, "MAE→WSP", "WSP") is None

    # finetune: MAE learning −3 in every seed (std 0: separated), init scheme +10 ± 1
    finetune = {"MAE→WSP": {s: 40.0 for s in range(4)}, "MAE init→WSP": {s: 43.0 for s in range(4)},
                "WSP": {0: 33.0, 1: 32.0, 2: 34.0, 3: 33.0}}
    blocks = verdict_blocks(SimpleNamespace(seeds=(0, 1, 2, 3)), {"probe": probe, "finetune": finetune})
    sentences = blocks[1].items
    assert sentences[0].startswith("**MAE learning** (MAE→WSP − MAE init→WSP")
    assert "a gain on 1 of 2 tasks, a loss on 1, not distinguishable from zero on 0; -0.25 points" in sentences[0]
    assert "**init scheme**" in sentences[1] and "a gain on 1 of 2 tasks, a loss on 0" in sentences[1]
    rows = {row[0]: row[1:] for row in blocks[2].rows}
    assert rows["probe"][:2] == ["+2.5 ± 1.3", "+1.0 ± 5.2 (≈0)"] and rows["finetune"][0] == "-3.0 ± 0.0"

    # without the control arm the raw gap is reported with the warning that it mixes both effects
    raw = verdict_blocks(SimpleNamespace(seeds=(0, 1, 2, 3)), {"probe": {k: probe[k] for k in ("MAE→WSP", "WSP")}})
    assert "it is not evidence that MAE training helped" in " ".join(raw[1].items)


def test_a_job_whose_inputs_changed_trains_afresh_instead_of_resuming_the_old_run(tmp_path, capsys):
    """A changed MAE changes the key of the WSP that reads it. Its directory still holds the old
    WSP's checkpoints; resuming from them (already at the last step) would report the old run
    as the new one. The old directory is set aside, not deleted, and the WSP trains again."""
    from safetensors.torch import load_file

    values = {**TINY, "out_dir": str(tmp_path), "evaluations": "probe", "control_arms": "false"}
    run_pipeline(build_config(PipelineConfig, None, values))
    first = load_file(str(tmp_path / "seed0/wsp_mae/encoder.safetensors"))
    old_key = json.loads((tmp_path / "seed0/wsp_mae/pipeline_job.json").read_text())["key"]
    assert (tmp_path / "seed0/wsp_mae/pipeline_job.started").read_text() == old_key

    capsys.readouterr()
    run_pipeline(build_config(PipelineConfig, None, {**values, "mae_steps": 5}))
    printed = capsys.readouterr().out + (tmp_path / "seed0/wsp_mae/pipeline_job.log").read_text()  # the job's own
    assert "resuming from" not in printed and "seed0/wsp_mae: its directory held a run of another" in printed
    rerun = json.loads((tmp_path / "seed0/wsp_mae/pipeline_job.json").read_text())
    assert rerun["key"] != old_key and rerun["results"]["steps"] == 4
    second = load_file(str(tmp_path / "seed0/wsp_mae/encoder.safetensors"))
    assert not torch.equal(first["blocks.0.attn.qkv.weight"], second["blocks.0.attn.qkv.weight"])
    kept = tmp_path / ".replaced" / f"seed0__wsp_mae-{old_key}"
    assert torch.equal(load_file(str(kept / "encoder.safetensors"))["blocks.0.attn.qkv.weight"],
                       first["blocks.0.attn.qkv.weight"])
    assert not (tmp_path / ".replaced" / f"seed0__wsp-{old_key}").exists()  # WSP from scratch: unchanged, cached


def test_classify_sets_are_jobs_after_each_finetune_and_malformed_entries_name_the_key(tmp_path):
    """``classify_sets``: each finetuned model scored on named benchmarks without more training (run end
    to end in the rehearsal test above)."""
    values = {**TINY, "evaluations": "finetune", "control_arms": "false", "out_dir": str(tmp_path),
              "classify_sets": "heldout=synthetic@test,in1k=/data/imagenet+real"}
    cfg = build_config(PipelineConfig, None, values)
    jobs = {job.name: job for job in plan_jobs(cfg)}
    scored = jobs["seed0/eval/mae_wsp/classify_heldout"]
    assert scored.kind == "classify" and scored.deps == ["seed0/eval/mae_wsp/finetune"]
    assert scored.values["split"] == "test" and scored.values["model"].endswith("seed0/eval/mae_wsp/finetune")
    real = jobs["seed0/eval/wsp/classify_in1k"].values
    assert (real["data"], real["split"], real["real_labels"]) == ("/data/imagenet", "val", "builtin")
    for bad in ("v2", "=x", "a=x@", "a/b=x", "a=x,a=y"):
        with pytest.raises(ConfigError, match="classify_sets"):
            build_config(PipelineConfig, None, {**values, "classify_sets": bad})
    with pytest.raises(ConfigError, match="add finetune"):
        build_config(PipelineConfig, None, {**values, "evaluations": "probe"})
    # eval_sets: more transfer sets, each with the transfer suite on its own label task
    named = build_config(PipelineConfig, None, {**values, "eval_sets": "inat=/data/inat2018",
                                                "evaluations": "probe,zeroshot,finetune"})
    named_jobs = {job.name: job for job in plan_jobs(named)}
    zeroshot = named_jobs["seed0/eval/mae_wsp/sets/inat/zeroshot"]
    assert zeroshot.values["data"] == "/data/inat2018" and zeroshot.deps == ["seed0/lit_mae_wsp"]
    assert zeroshot.values["split"] == "val" and "classes" not in zeroshot.values  # the set's own class names
    assert named_jobs["seed0/eval/mae/sets/inat/label"].values["task"] == "auto"
    inat = named_jobs["seed0/eval/wsp/sets/inat/finetune"]
    assert inat.values["data"] == "/data/inat2018" and inat.values["task"] == "auto" and inat.deps == ["seed0/wsp"]
    assert named_jobs["seed0/eval/wsp/finetune"].values["data"] == "synthetic"
    for bad in ("inat", "a b=x", "x=/a,x=/b"):
        with pytest.raises(ConfigError, match="eval_sets"):
            build_config(PipelineConfig, None, {**values, "eval_sets": bad})

"""``prepretrain bench``: every stage's step beside its baseline, CI-sized on the CPU.

Nothing here is timed against a threshold: the tests check that each command runs, prints its
figures for both paths, and that the figures are consistent with each other.
"""

import json

import pytest
import torch

from prepretrain.bench.steps import (
    BenchConfig,
    baseline_overrides,
    baseline_step,
    logged_throughput,
    prepretrain_step,
    run_benchmark,
    step_case,
)
from prepretrain.cli import main
from prepretrain.config import build_config
from prepretrain.train.engine import pick_precision

TINY = ["model=vit_micro4", "image_size=16", "batch_size=2", "steps=1", "warmup=0", "device=cpu", "threads=1",
        "decoder_embed_dim=32", "decoder_depth=1", "decoder_num_heads=2", "num_classes=10", "num_frames=2",
        "window_size=2", "pyramid_channels=16", "objects_per_image=2"]


@pytest.mark.parametrize("target", ["mae", "wsp", "finetune", "vit", "video", "detect"])
def test_each_target_prints_both_paths(target, capsys):
    assert main(["bench", target, *TINY]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"{target} vit_micro4 @ 16 px, batch 2, cpu x1")
    records = [json.loads(line) for line in lines if line.startswith("{")]
    ours, baseline = records
    assert (ours["path"], baseline["path"]) == ("prepretrain", "baseline")
    assert baseline["precision"] == "fp32" and baseline["compile"] is False
    for record in records:
        assert record["samples_per_s"] > 0 and record["train_gflops_per_sample"] > 0
        assert record["step_ms"] == pytest.approx(1000 * record["batch_size"] / record["samples_per_s"], rel=0.01)
    assert ours["vs_baseline"] == pytest.approx(ours["samples_per_s"] / baseline["samples_per_s"], rel=0.01)
    table = [line for line in lines if line.startswith(("prepretrain ", "baseline "))]
    assert len(table) == 2 and table[1].rstrip().endswith("1.00x")


def test_no_baseline_times_one_path(capsys):
    assert main(["bench", "mae", *TINY, "--no-baseline"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["path"] for r in records] == ["prepretrain"] and "vs_baseline" not in records[0]


def test_bad_keys_are_one_line_errors(capsys):
    assert main(["bench", "mae", "rounds=0"]) == 2
    assert main(["bench", "video", "num_frames=3", "tubelet_size=2"]) == 2
    assert main(["bench", "detect", "global_blocks=99"]) == 2
    assert main(["bench", "data", "--end-to-end"]) == 2
    assert main(["bench", "lit", "--no-baseline"]) == 2
    err = capsys.readouterr().err
    assert "rounds" in err and "tubelet_size" in err and "global_blocks" in err and "Traceback" not in err


@pytest.mark.parametrize("target", ["mae", "wsp"])
def test_both_paths_compute_the_same_step(target):
    """The two paths differ in how they run the step, not in what they compute: in fp32, one step
    of each from the same weights gives the same weights (the fused and default AdamW agree)."""
    cfg = build_config(BenchConfig, None, [*TINY, f"target={target}"])
    device = torch.device("cpu")
    case = step_case(cfg, device)
    torch.manual_seed(0)
    ours = case.build()
    torch.manual_seed(0)
    reference = case.build()
    torch.manual_seed(1)  # MAE draws its mask: the same draw for both
    prepretrain_step(ours, case, device, pick_precision("fp32", device), False, 1.0)()
    torch.manual_seed(1)
    baseline_step(reference, case, device, 1.0)()
    for (name, a), b in zip(ours.state_dict().items(), reference.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_prepretrain_step_skips_a_nonfinite_step_on_the_device():
    cfg = build_config(BenchConfig, None, [*TINY, "target=finetune"])
    device = torch.device("cpu")
    case = step_case(cfg, device)
    model = case.build()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    case.batch = (case.batch[0] * float("nan"), case.batch[1])
    prepretrain_step(model, case, device, pick_precision("fp32", device), False, 0.0)()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_run_benchmark_rounds_take_the_median():
    results = run_benchmark(build_config(BenchConfig, None, [*TINY, "target=vit", "rounds=3"]))
    assert len(results) == 2 and all(r["samples_per_s"] > 0 for r in results)


def test_end_to_end_runs_the_real_stage_twice(tmp_path, capsys):
    """``--end-to-end``: the stage as configured and with the baseline's overrides, figures read
    back from each run's metrics.jsonl."""
    code = main(["bench", "mae", "--end-to-end", "--out", str(tmp_path), "device=cpu", "num_images=64",
                 "batch_size=16", "steps=4", "log_every=1", "image_size=16", "decoder_embed_dim=32", "decoder_depth=1",
                 "decoder_num_heads=2", "eval_images=16", "tensorboard=false"])
    assert code == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    ours, baseline = records
    assert "decode=pil" in baseline["overrides"] and "precision=fp32" in baseline["overrides"]
    for record in records:
        assert record["end_to_end"] and record["windows"] == 3 and record["samples_per_s"] > 0
        assert (tmp_path / record["path"] / "results.json").exists()
    assert ours["vs_baseline"] == pytest.approx(ours["samples_per_s"] / baseline["samples_per_s"], rel=0.01)


def test_logged_throughput_skips_the_first_window(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    rows = [{"step": 1, "loss": 2.0, "samples_per_s": 1.0}, {"step": 2, "loss": 1.5, "samples_per_s": 10.0},
            {"step": 2, "val_loss": 1.0}, {"step": 3, "loss": 1.0, "samples_per_s": 30.0, "mfu": 0.2}]
    metrics.write_text("\n".join(map(json.dumps, rows)))
    figures = logged_throughput(metrics)
    assert figures["samples_per_s"] == 20.0 and figures["mfu"] == 0.2 and figures["windows"] == 2
    assert figures["final_loss"] == 1.0
    assert baseline_overrides("mae", cuda=True) == ["decode=pil", "compile=false", "precision=fp16"]


def test_end_to_end_failure_is_the_stages_own_message(tmp_path, capsys):
    code = main(["bench", "mae", "--end-to-end", "--out", str(tmp_path), f"data={tmp_path / 'nowhere'}",
                 "device=cpu"])
    err = capsys.readouterr().err
    assert code == 4 and "Traceback" not in err
    assert "the prepretrain run of 'mae' failed (exit 4" in err and "nowhere" in err
    assert (tmp_path / "prepretrain" / "output.log").exists()


def test_plan_estimate_is_offered_for_the_stages_plan_models():
    from prepretrain.bench.steps import fast_precision, planned_memory_gib

    bf16 = fast_precision("bf16", torch.device("cpu"))
    mae = planned_memory_gib(build_config(BenchConfig, None, ["target=mae", "model=vit_b16"]), 256, 224, bf16)
    wsp = planned_memory_gib(build_config(BenchConfig, None, ["target=wsp", "model=vit_b16"]), 256, 224, bf16)
    assert 10 < mae < wsp < 30  # GiB; the H200 measured 13.8 for this MAE step (BENCHMARKS.md)
    assert planned_memory_gib(build_config(BenchConfig, None, ["target=video"]), 8, 32, bf16) is None

"""Faults a long run meets, injected: preemption, damaged checkpoints and files, non-finite
gradients and weights, a full disk, bad configs. Each must end in a clear message and lose no
finished work; every resume is compared bit for bit with an uninterrupted run."""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest
import torch

from prepretrain.cli import main
from prepretrain.config import ConfigError, build_config
from prepretrain.stages.mae import MAEConfig, MAEStage
from prepretrain.train import checkpoint as ckpt
from prepretrain.train.engine import Preempted, train
from prepretrain.train.limits import NonFiniteLoss

TINY = {"num_images": "64", "batch_size": "16", "steps": "6", "ckpt_every": "2", "log_every": "1",
        "decoder_embed_dim": "32", "decoder_depth": "1", "decoder_num_heads": "2", "eval_images": "16",
        "progress": "false", "tensorboard": "false", "warmup_steps": "1", "keep_last": "3"}
TINY_ARGS = [f"{k}={v}" for k, v in TINY.items()]


class FaultyMAE(MAEStage):
    """The MAE stage with faults injected at chosen optimizer steps (1-based: after step k)."""

    sigterm_at: int = 0
    nan_grad_at: int = 0
    nan_weight_at: int = 0
    spikes_at: tuple[int, ...] = ()  # loss calls whose loss is 1000x (the loss guard's notion of a rise)
    nan_loss_from: int = 0  # from this loss call on, the loss is NaN (the divergence)

    def __init__(self, cfg: MAEConfig):
        super().__init__(cfg)
        self.calls = 0

    def loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        loss, metrics = super().loss(model, batch)
        self.calls += 1
        if self.calls == self.nan_grad_at:  # a finite loss whose gradient is NaN
            weight = next(p for p in model.parameters() if p.requires_grad)
            loss = loss + torch.sqrt(weight.abs().sum() * 0.0) * 0.0
        if self.calls in self.spikes_at:
            loss = loss * 1000.0
        if self.nan_loss_from and self.calls >= self.nan_loss_from:
            loss = loss * float("nan")
        return loss, metrics

    def after_step(self, model: torch.nn.Module, step: int) -> None:
        if step == self.sigterm_at:
            os.kill(os.getpid(), signal.SIGTERM)
        if step == self.nan_weight_at:
            with torch.no_grad():
                next(model.parameters()).fill_(float("nan"))


def make(out: Path, settings: dict[str, str] | None = None, **faults: Any) -> FaultyMAE:
    stage = FaultyMAE(build_config(MAEConfig, None, {**TINY, "out_dir": str(out), **(settings or {})}))
    for name, value in faults.items():
        setattr(stage, name, value)
    return stage


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return ckpt.Checkpointer(out).load(ckpt.Checkpointer(out).latest())["model"]


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[str, torch.Tensor]:
    out = tmp_path_factory.mktemp("straight") / "run"
    train(make(out))
    return final_weights(out)


def test_sigterm_checkpoints_at_the_step_boundary_and_the_rerun_ends_identically(tmp_path, uninterrupted):
    out = tmp_path / "run"
    with pytest.raises(Preempted, match="after step 3"):  # the signal came during step 3's bookkeeping
        train(make(out, sigterm_at=2))
    assert ckpt.checkpoint_step(ckpt.Checkpointer(out).latest()) == 3  # saved although ckpt_every is 2
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is put back
    train(make(out))
    assert_same(final_weights(out), uninterrupted)


@pytest.mark.parametrize("damage", ["truncate", "flip_bits", "empty"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, uninterrupted, damage, capsys):
    out = tmp_path / "run"
    with pytest.raises(Preempted):
        train(make(out, sigterm_at=2))
    newest = ckpt.Checkpointer(out).latest()
    data = newest.read_bytes()
    if damage == "truncate":
        newest.write_bytes(data[: len(data) // 2])
    elif damage == "flip_bits":
        middle = len(data) // 2
        newest.write_bytes(data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:])
    else:
        newest.write_bytes(b"")
    train(make(out))
    printed = capsys.readouterr().out
    assert "step_00000003.pt cannot be read" in printed and "trying the previous checkpoint" in printed
    assert (out / "checkpoints" / "corrupt-step_00000003.pt").is_file()
    assert_same(final_weights(out), uninterrupted)  # resumed from step 2: same end


def test_torn_metrics_line_and_stale_temporaries_do_not_block_the_rerun(tmp_path, uninterrupted, capsys):
    out = tmp_path / "run"
    with pytest.raises(Preempted):
        train(make(out, sigterm_at=3))
    with open(out / "metrics.jsonl", "a") as handle:
        handle.write('{"step": 5, "lo')  # a kill in the middle of a line
    (out / "checkpoints" / ".step_00000005.tmp").mkdir()
    (out / ".results.json.tmp4242").write_text("half")
    train(make(out))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert not list(out.glob(".*tmp*")) and not list((out / "checkpoints").glob(".*tmp*"))
    assert "left by an interrupted write" in capsys.readouterr().out
    assert_same(final_weights(out), uninterrupted)


def test_a_finite_loss_with_nan_gradients_skips_the_step(tmp_path):
    out = tmp_path / "run"
    results = train(make(out, nan_grad_at=3))
    assert results["nonfinite_steps"] == 1
    weights = final_weights(out)
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


def test_non_finite_weights_are_never_saved_and_the_last_good_checkpoint_stays(tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLoss, match="non-finite weights after step 4: not saved"):
        train(make(out, nan_weight_at=3))
    checkpointer = ckpt.Checkpointer(out)
    assert ckpt.checkpoint_step(checkpointer.latest()) == 2
    for path in checkpointer.all():
        state = checkpointer.load(path)["model"]
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    assert not (out / "encoder.safetensors").exists()


def test_cli_failures_are_one_line_with_their_exit_code(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    assert main(["mae", *TINY_ARGS, f"out_dir={out}", "steps=2"]) == 0
    good = ckpt.Checkpointer(out).latest()
    capsys.readouterr()

    def full_disk(obj, handle, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(handle))

    monkeypatch.setattr(torch, "save", full_disk)
    assert main(["mae", *TINY_ARGS, f"out_dir={out}", "steps=4"]) == 5
    error = capsys.readouterr().err
    assert "no space left on the device" in error and "Traceback" not in error and error.count("\n") == 1
    assert ckpt.Checkpointer(out).latest() == good and ckpt.Checkpointer(out).load(good)["step"] == 2
    monkeypatch.undo()

    # What a full disk really looks like from torch's zip writer (a RuntimeError), and from safetensors
    def zip_writer_fails(obj, handle, *args, **kwargs):
        handle.write(b"PK")
        raise RuntimeError("[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file "
                           "data/3: file write failed")

    monkeypatch.setattr(torch, "save", zip_writer_fails)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10 << 30, 10 << 30, 1 << 20))
    assert main(["mae", *TINY_ARGS, f"out_dir={out}", "steps=4"]) == 5
    error = capsys.readouterr().err
    assert "no space left on the device" in error and "Traceback" not in error and error.count("\n") == 1
    assert ckpt.Checkpointer(out).latest() == good and not list(out.glob("checkpoints/.*tmp*"))
    monkeypatch.undo()
    from prepretrain.files import as_os_error

    storage_full = as_os_error(Exception('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                                         'message: "No space left on device" })'), out / "encoder.safetensors")
    assert storage_full.errno == errno.ENOSPC
    assert as_os_error(RuntimeError("CUDA out of memory"), out / "x.pt") is None

    config = tmp_path / "twice.yaml"
    config.write_text("seed: 1\nsteps: 2\nseed: 3\n")
    assert main(["mae", "--config", str(config)]) == 2
    assert "given twice" in capsys.readouterr().err
    assert main(["mae", "blr=nan"]) == 2
    assert "finite" in capsys.readouterr().err


def test_config_values_must_be_finite():
    for key in ("blr", "lr", "clip_grad", "mask_ratio"):
        with pytest.raises(ConfigError) as error:
            build_config(MAEConfig, None, {key: "inf"})
        assert error.value.key == key


def test_all_damaged_checkpoints_stop_with_a_clear_message(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(Preempted):
        train(make(out, sigterm_at=2))
    for path in ckpt.Checkpointer(out).all():
        path.write_bytes(b"garbage")
    with pytest.raises(ckpt.CorruptCheckpoint, match="no readable checkpoint"):
        train(make(out))
    shutil.rmtree(out)


def test_a_diverged_run_resumes_from_a_named_earlier_checkpoint(tmp_path, capsys):
    """lr=1e6 diverges (exit 6, naming the last known good checkpoint); resume_from=step_N with a sane lr
    rewinds there, even to a suspect one it names: the later checkpoints are set aside as rewound-*, kept,
    and the run finishes."""
    out = tmp_path / "run"
    args = [*TINY_ARGS, f"out_dir={out}", "keep_last=10"]
    assert main(["mae", *args, "steps=4"]) == 0
    capsys.readouterr()
    assert main(["mae", *args, "steps=12", "lr=1e6"]) == 6
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "the last known good checkpoint is step 2 (the later ones, steps 4, " in error[0]
    assert "rerun with resume_from=step_2" in error[0]
    diverged = [ckpt.checkpoint_step(path) for path in ckpt.Checkpointer(out).all()]
    assert diverged[:2] == [2, 4] and len(diverged) > 2
    assert main(["mae", *args, "steps=12", "resume_from=step_3"]) == 2
    assert "no checkpoint at step 3" in capsys.readouterr().err
    assert main(["mae", *args, "steps=12", "resume_from=yesterday"]) == 2
    assert "'resume_from'" in capsys.readouterr().err
    assert main(["mae", *args, "steps=12", "lr=1e-4", "resume_from=step_4"]) == 0
    assert "resuming from" in capsys.readouterr().out
    rewound = sorted(path.name for path in (out / "checkpoints").glob("rewound-step_*.pt"))
    assert rewound == [f"rewound-step_{step:08d}.pt" for step in diverged if step > 4]
    assert [ckpt.checkpoint_step(path) for path in ckpt.Checkpointer(out).all()][-1] == 12
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 12 and math.isfinite(results["final_loss"])


def test_a_batch_that_cannot_fit_is_refused_before_compute(tmp_path, capsys):
    """batch_size=10^9 on a 64-image set: the planner's estimate exceeds the machine's memory, so the run
    stops at once, naming the key and a micro-batch that fits (before, it ran on for minutes)."""
    out = tmp_path / "run"
    assert main(["mae", *TINY_ARGS, f"out_dir={out}", "batch_size=1000000000"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "'batch_size'" in error[0] and "set micro_batch_size=" in error[0]
    assert not (out / "checkpoints").exists()
    assert main(["mae", *TINY_ARGS, f"out_dir={out}", "batch_size=1000000000", "micro_batch_size=1000000"]) == 2
    assert "'micro_batch_size'" in capsys.readouterr().err


def test_every_os_failure_a_user_can_cause_maps_to_one_line_and_exit_5(tmp_path):
    """The one place OS and I/O failures become messages (cli.expected_failure): each errno a user can
    cause at a path, and torch's own write failure converted on the way (files.as_os_error)."""
    from prepretrain.cli import DISK_ERRORS, expected_failure
    from prepretrain.files import as_os_error

    for number, words in DISK_ERRORS.items():
        code, message = expected_failure(OSError(number, os.strerror(number), str(tmp_path / "ckpt.pt")))
        assert code == 5 and message.startswith(words) and str(tmp_path / "ckpt.pt") in message
        assert "\n" not in message
    converted = as_os_error(RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed"),
                            tmp_path / "ckpt.pt")  # plenty of space here: an I/O error, not "no space"
    assert converted.errno == errno.EIO and expected_failure(converted)[0] == 5
    assert expected_failure(ValueError("a bug")) is None  # a bug keeps its traceback


def _advised_step(message: str) -> int:
    """The step the exit-6 advice says to resume from (resume_from=step_N)."""
    import re

    found = re.findall(r"resume_from=step_(\d+) and a lower lr", message)
    assert len(found) == 1, message
    return int(found[0])


def _count_saved_damage(out: Path, fault_counts, kept: list[int]) -> None:
    """Fault-injection counts: the checkpoints that should be there and are not, non-finite tensors saved."""
    checkpointer = ckpt.Checkpointer(out)
    saved = {ckpt.checkpoint_step(path) for path in checkpointer.all()}
    fault_counts["checkpoints_lost"] += len(set(kept) - saved)
    for path in checkpointer.all():
        state = checkpointer.load(path)["model"]
        fault_counts["nonfinite_saved"] += sum(1 for v in state.values()
                                               if v.is_floating_point() and not torch.isfinite(v).all())


def test_a_diverged_run_keeps_a_healthy_checkpoint_and_its_advice_finishes(tmp_path, capsys, fault_counts):
    """Issue 39's scenario as a user typed it: lr=1e6, ckpt_every=1, keep_last 2 (the default). Before, both
    checkpoints the message named were written during the streak of skipped steps (resuming one diverged again)
    and a plain rerun resumed them. Now the message names the last known good checkpoint, which rotation kept;
    a plain rerun refuses the suspect newest one with the same advice; following the advice finishes."""
    out = tmp_path / "run"
    args = ["mae", "num_images=64", "batch_size=8", "ckpt_every=1", "steps=20", f"out_dir={out}", "progress=false",
            "tensorboard=false", "eval_images=16", "decoder_embed_dim=32", "decoder_depth=1"]  # smaller: quicker
    assert main([*args, "lr=1e6"]) == 6
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "the last known good checkpoint is step " in error[0], error
    good = _advised_step(error[0])
    checkpointer = ckpt.Checkpointer(out)
    steps = [ckpt.checkpoint_step(path) for path in checkpointer.all()]
    assert good in steps and len(steps) == 3  # keep_last=2 newest, and the last known good one
    assert [ckpt.checkpoint_step(p) for p in checkpointer.suspects()] == [s for s in steps if s > good]
    assert checkpointer.last_known_good() == checkpointer.all()[0]
    fault_counts["faults_injected"] += 1
    _count_saved_damage(out, fault_counts, [good])

    assert main([*args, "lr=1e-4"]) == 6  # a plain rerun: refused, the same advice, nothing resumed or rotated
    refused = capsys.readouterr().err.strip().splitlines()
    assert len(refused) == 1 and "not resuming" in refused[0] and _advised_step(refused[0]) == good
    assert [ckpt.checkpoint_step(path) for path in checkpointer.all()] == steps
    fault_counts["faults_injected"] += 1

    assert main([*args, "lr=1e-4", f"resume_from=step_{good}"]) == 0
    assert f"resuming from {checkpointer.dir / f'step_{good:08d}.pt'}" in capsys.readouterr().out
    weights = checkpointer.load(checkpointer.latest())["model"]
    assert ckpt.checkpoint_step(checkpointer.latest()) == 20 and not checkpointer.suspects()
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
    results = json.loads((out / "results.json").read_text())
    assert results["steps"] == 20 and math.isfinite(results["final_loss"])
    _count_saved_damage(out, fault_counts, [19, 20])


def test_a_slow_divergence_keeps_the_checkpoint_from_before_the_rise(tmp_path, fault_counts):
    """The loss rises (spikes the guard skips, with applied steps between them that reset the streak) before
    the first non-finite loss: every checkpoint from the rise on is suspect, so keep_last=2 would have kept
    only those; the one from before the rise is kept and named, and resuming it with the fault gone finishes."""
    out = tmp_path / "run"
    settings = {"steps": "12", "ckpt_every": "1", "keep_last": "2", "spike_window": "4", "max_nonfinite": "3"}
    # loss calls (= steps, no accumulation) 5 and 7 spike, 9 on are NaN: steps 4 and 6 skipped, 8-11 the streak
    with pytest.raises(NonFiniteLoss, match="4 consecutive bad steps") as error:
        train(make(out, settings, spikes_at=(5, 7), nan_loss_from=9))
    checkpointer = ckpt.Checkpointer(out)
    steps = [ckpt.checkpoint_step(path) for path in checkpointer.all()]
    assert steps == [3, 10, 11]  # 4 is the last before the first bad step: bad steps followed it
    assert checkpointer.last_known_good().name == "step_00000003.pt"
    assert [p.name for p in checkpointer.suspects()] == ["step_00000010.pt", "step_00000011.pt"]
    assert "the last known good checkpoint is step 3 " in str(error.value) and _advised_step(str(error.value)) == 3
    fault_counts["faults_injected"] += 1
    _count_saved_damage(out, fault_counts, [3])
    results = train(make(out, {**settings, "resume_from": "step_3"}))
    assert results["steps"] == 12 and math.isfinite(results["final_loss"]) and not checkpointer.suspects()
    _count_saved_damage(out, fault_counts, [11, 12])


def test_a_resume_inside_the_spike_guards_window_is_bit_exact(tmp_path, monkeypatch, fault_counts):
    """The guard's window is saved in checkpoints: preempted after step 3 and resumed, a spike in step 5 is judged
    against the same window as in the uninterrupted run (skipped), so the weights end equal. With the guard
    restarting empty (as before), the resumed run is still inside its first half window and applies the spike."""
    settings = {"spike_window": "6"}  # 6 steps; the guard starts after 3
    straight = train(make(tmp_path / "straight", settings, spikes_at=(5,)))
    assert straight["spike_steps"] == 1
    expected = final_weights(tmp_path / "straight")

    with pytest.raises(Preempted, match="after step 3"):
        train(make(tmp_path / "resumed", settings, sigterm_at=2, spikes_at=(5,)))
    shutil.copytree(tmp_path / "resumed", tmp_path / "empty_guard")
    resumed = train(make(tmp_path / "resumed", settings, spikes_at=(2,)))  # loss calls count from the resume
    assert resumed["spike_steps"] == 1 and resumed["nonfinite_steps"] == 0
    assert_same(final_weights(tmp_path / "resumed"), expected)
    fault_counts["faults_injected"] += 1
    fault_counts["bit_exact"] += 1
    fault_counts["runs"] += 1

    from prepretrain.train.engine import Trainer

    monkeypatch.setattr(Trainer, "restore_guard", lambda self, guard: None)  # the guard as it was: empty
    train(make(tmp_path / "empty_guard", settings, spikes_at=(2,)))
    weights = final_weights(tmp_path / "empty_guard")
    assert not all(torch.equal(weights[k], expected[k]) for k in expected)


LOWER_BOUND_CASES = {  # tiny training configs of the stages the planner's lower bound covers
    "lit": {"num_images": "64", "batch_size": "16", "vision_depth": "1", "text_depth": "1"},
    "video": {"num_images": "16", "batch_size": "4", "single_frame_baseline": "false"},
    "detect": {"num_images": "8", "batch_size": "2", "synthetic_val_images": "4"},
}


def _stage_classes(name: str) -> tuple[type, type]:
    from prepretrain.stages.detect import DetectConfig, DetectStage
    from prepretrain.stages.lit import LiTConfig, LiTStage
    from prepretrain.stages.video import VideoConfig, VideoStage

    return {"lit": (LiTConfig, LiTStage), "video": (VideoConfig, VideoStage),
            "detect": (DetectConfig, DetectStage)}[name]


@pytest.mark.parametrize("name", list(LOWER_BOUND_CASES))
def test_lit_video_and_detection_refuse_a_micro_batch_that_cannot_fit(name, tmp_path, capsys):
    """batch_size=10^9: refused before any compute, in one line naming the key and a value that fits (by the
    same estimate: the value it names passes the check)."""
    import re

    from prepretrain.plan import check_micro_batch_fits

    out = tmp_path / name
    assert main([name, "batch_size=1000000000", f"out_dir={out}", "progress=false"]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "Traceback" not in error[0], error
    key = re.search(r"config key '(\w+)'", error[0]).group(1)
    suggested = re.search(rf"set {'micro_batch_size' if key == 'batch_size' and name != 'lit' else key}=(\d+)",
                          error[0])
    assert suggested, error[0]
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()
    config_cls, _ = _stage_classes(name)
    fixed_key = "micro_batch_size" if key == "batch_size" and name != "lit" else key
    check_micro_batch_fits(build_config(config_cls, None, {"batch_size": "1000000000", fixed_key: suggested.group(1)}),
                           "cpu")  # what it names fits


@pytest.mark.parametrize("name", list(LOWER_BOUND_CASES))
def test_the_lit_video_and_detection_estimates_never_refuse_what_fits(name, tmp_path):
    """The estimate is a lower bound: for a tiny real model it stays below the bytes autograd saves for one
    micro-batch (measured with saved_tensors_hooks, parameters excluded), so a micro-batch that fits is never
    refused; the defaults on this machine and the paper recipes on 80 GiB GPUs, at the GPU counts their
    comments give, pass."""
    import yaml

    from prepretrain.plan import GIB, check_micro_batch_fits, stage_memory_bytes
    from prepretrain.train.distributed import init_distributed
    from prepretrain.train.engine import Trainer

    config_cls, stage_cls = _stage_classes(name)
    cfg = build_config(config_cls, None, {**LOWER_BOUND_CASES[name], "out_dir": str(tmp_path / "run"),
                                          "progress": "false", "tensorboard": "false"})
    stage = stage_cls(cfg)
    info, device = init_distributed("cpu", 60, "auto")
    trainer = Trainer.setup(stage, info, device)
    batch = trainer._next_batch(0, 0)
    parameters = {p.data_ptr() for p in trainer.model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        if tensor.data_ptr() not in parameters:
            saved[tensor.data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        stage.loss(trainer.trained, batch)
    estimate = stage_memory_bytes(cfg, trainer.micro, cfg.batch_size)["activations"]
    assert 0.4 * sum(saved.values()) < estimate <= sum(saved.values())

    check_micro_batch_fits(build_config(config_cls, None, {}), "cpu")  # the defaults
    recipes = {"lit": ("lit_vit_h14.yaml", 128), "video": ("video_k400_vit_l16.yaml", 64),
               "detect": ("detect_coco_vit_l16.yaml", 64)}
    file, gpus = recipes[name]
    values = yaml.safe_load((Path(__file__).parents[1] / "configs" / file).read_text())
    values.pop("stage", None)
    recipe = config_cls(**values)  # as written (its encoder and tokenizer files are not here to validate)
    micro = recipe.micro_batch_size or recipe.batch_size // gpus
    need = sum(stage_memory_bytes(recipe, micro, recipe.batch_size, gpus, half=True).values())
    assert need < 80 * GIB


def test_a_run_that_diverges_before_its_first_healthy_checkpoint_says_how_to_start_afresh(tmp_path, capsys):
    """No warmup at lr=1e6: the first step already ruins the weights, so the only checkpoints are suspect. The
    message says there is no healthy one and how to start afresh in one line; a plain rerun says the same."""
    out = tmp_path / "run"
    args = ["mae", *TINY_ARGS, f"out_dir={out}", "steps=12", "ckpt_every=1", "warmup_steps=0", "lr=1e6"]
    assert main(args) == 6
    error = capsys.readouterr().err.strip().splitlines()
    advice = f"no healthy checkpoint: the run diverged before its first one; start afresh with a lower lr/blr " \
             f"and a new out_dir= (or delete {out / 'checkpoints'})"
    assert len(error) == 1 and advice in error[0], error
    checkpointer = ckpt.Checkpointer(out)
    assert checkpointer.all() and checkpointer.last_known_good() is None
    assert main(args) == 6
    refused = capsys.readouterr().err.strip().splitlines()
    assert len(refused) == 1 and "not resuming" in refused[0] and advice in refused[0]


def test_a_run_stopped_by_a_signal_during_bad_steps_resumes_with_a_plain_rerun(tmp_path, capsys, fault_counts):
    """Suspect is not diverged: preempted two steps after a skipped spike (its checkpoints suspect, the episode
    still open), the run has not diverged, so a plain rerun resumes it (a requeued job must not stop here); the
    guard's saved state carries the episode on, and the finished run clears the marks."""
    out = tmp_path / "run"
    settings = {"steps": "8", "spike_window": "4"}
    with pytest.raises(Preempted, match="after step 7"):
        train(make(out, settings, spikes_at=(5,), sigterm_at=6))
    checkpointer = ckpt.Checkpointer(out)
    assert [p.name for p in checkpointer.suspects()] == ["step_00000004.pt", "step_00000006.pt", "step_00000007.pt"]
    assert checkpointer.last_known_good().name == "step_00000002.pt"  # kept although keep_last is 3
    assert not checkpointer.diverged(checkpointer.latest())
    fault_counts["faults_injected"] += 1
    capsys.readouterr()
    results = train(make(out, settings))
    assert "resuming from" in capsys.readouterr().out and results["spike_steps"] == 1
    assert not checkpointer.suspects()
    _count_saved_damage(out, fault_counts, [6, 8])

"""Fault injection over every training stage and several seeds, with counts in the test output.

For MAE, WSP, LiT and finetuning, with seeds 0 and 1 (seed 1 in the slow set), one uninterrupted
run is the reference; then faults are injected and every run that survives must end bit for bit
where the reference ended:

- preemption: SIGTERM during a step -> a checkpoint at the next step boundary, ``Preempted``;
  the rerun resumes and ends identically;
- a damaged newest checkpoint (truncated, bits flipped, emptied: one per seed) after a
  preemption -> the rerun names it, sets it aside and resumes from the previous one, identically;
- a finite loss with NaN gradients -> the step is skipped and counted, nothing non-finite is
  ever written (checkpoints, exports);
- stale temporary files of an interrupted write -> removed on start;
- a loss spike (finite, 1000x the others) -> the step is skipped and counted as a spike (seed 0);
- a finished run rewound with ``resume_from=step_2`` -> the later checkpoints set aside, the rerun
  ends where the reference ended (seed 0).

The counts (faults injected, runs compared bit-exactly, checkpoints lost or corrupt, hangs, non-finite
tensors saved) are printed at the end of the pytest run (see ``conftest.pytest_terminal_summary``);
the two-rank gloo cases are in ``tests/test_distributed.py`` and add to the same counts.
"""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from prepretrain.config import build_config
from prepretrain.stages.finetune import FinetuneConfig, FinetuneStage
from prepretrain.stages.lit import LiTConfig, LiTStage
from prepretrain.stages.mae import MAEConfig, MAEStage
from prepretrain.stages.wsp import WSPConfig, WSPStage
from prepretrain.train import checkpoint as ckpt
from prepretrain.train.engine import Preempted, train

COMMON = {"num_images": 64, "batch_size": 16, "steps": 6, "ckpt_every": 2, "keep_last": 4, "log_every": 1,
          "progress": False, "tensorboard": False, "warmup_steps": 1, "dist_timeout_s": 60}
STAGES: dict[str, tuple[type, type, dict[str, Any]]] = {
    "mae": (MAEConfig, MAEStage, {"decoder_embed_dim": 32, "decoder_depth": 1, "decoder_num_heads": 2,
                                  "eval_images": 16}),
    "wsp": (WSPConfig, WSPStage, {"vocab_min_count": 1, "eval_images": 16}),
    "lit": (LiTConfig, LiTStage, {"vision_depth": 1, "text_depth": 1}),
    "finetune": (FinetuneConfig, FinetuneStage, {"eval_batch_size": 200}),
}
DAMAGES = ("truncate", "flip_bits", "empty")


def faulty(stage_cls: type) -> type:
    """``stage_cls`` with faults at chosen optimizer steps (``after step k``) or loss calls."""

    class Faulty(stage_cls):
        sigterm_at = 0
        nan_grad_at = 0
        spike_at = 0
        loss_calls = 0

        def loss(self, model: torch.nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
            loss, metrics = super().loss(model, batch)
            self.loss_calls += 1
            if self.loss_calls == self.nan_grad_at:  # finite value, NaN gradient (d sqrt(x)/dx at 0 is inf; x 0)
                weight = next(p for p in model.parameters() if p.requires_grad)
                loss = loss + torch.sqrt(weight.abs().sum() * 0.0) * 0.0
            if self.loss_calls == self.spike_at:  # finite, 1000x the others: a loss spike
                loss = loss * 1000.0
            return loss, metrics

        def after_step(self, model: torch.nn.Module, step: int) -> None:
            super().after_step(model, step)
            if step == self.sigterm_at:
                os.kill(os.getpid(), signal.SIGTERM)

    Faulty.__name__ = f"Faulty{stage_cls.__name__}"
    return Faulty


def make(name: str, out: Path, seed: int, settings: dict[str, Any] | None = None, **faults: int) -> Any:
    config_cls, stage_cls, extra = STAGES[name]
    values = {**COMMON, **extra, "seed": seed, "out_dir": str(out), **(settings or {})}
    stage = faulty(stage_cls)(build_config(config_cls, None, {k: str(v) for k, v in values.items()}))
    for key, value in faults.items():
        setattr(stage, key, value)
    return stage


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    checkpointer = ckpt.Checkpointer(out)
    return checkpointer.load(checkpointer.latest())["model"]


def bit_exact(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def non_finite_tensors(out: Path) -> int:
    """Floating tensors with a NaN/inf in every checkpoint and export of a run."""
    count = 0
    checkpointer = ckpt.Checkpointer(out)
    states = [checkpointer.load(path)["model"] for path in checkpointer.all()]
    states += [load_file(str(path)) for path in out.glob("*.safetensors")]
    for state in states:
        count += sum(1 for v in state.values() if v.is_floating_point() and not torch.isfinite(v).all())
    return count


def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif how == "flip_bits":
        middle = len(data) // 2
        path.write_bytes(data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:])
    else:
        path.write_bytes(b"")


@pytest.mark.parametrize("seed", [0, pytest.param(1, marks=pytest.mark.slow)])
@pytest.mark.parametrize("name", list(STAGES))
def test_faults_leave_every_stage_where_an_uninterrupted_run_ends(name, seed, tmp_path, fault_counts, capsys):
    reference = tmp_path / "reference"
    train(make(name, reference, seed))
    expected = final_weights(reference)
    fault_counts["runs"] += 1

    # preemption mid-run; the rerun resumes and ends identically
    run = tmp_path / "preempted"
    with pytest.raises(Preempted):
        train(make(name, run, seed, sigterm_at=2))
    fault_counts["faults_injected"] += 1
    (run / "checkpoints" / ".step_00000005.tmp").mkdir()  # a write cut short by a kill
    (run / f".results.json.tmp{os.getpid() + 1}").write_text("half")
    fault_counts["faults_injected"] += 1
    copy = tmp_path / "damaged"
    shutil.copytree(run, copy)
    train(make(name, run, seed))
    assert not list(run.glob(".*tmp*")) and not list((run / "checkpoints").glob(".*tmp*"))
    assert bit_exact(final_weights(run), expected)
    fault_counts["bit_exact"] += 1

    # the newest checkpoint damaged: named, set aside, the previous one resumes, identical end
    newest = ckpt.Checkpointer(copy).latest()
    how = DAMAGES[(seed + list(STAGES).index(name)) % len(DAMAGES)]
    damage(newest, how)
    fault_counts["faults_injected"] += 1
    capsys.readouterr()
    train(make(name, copy, seed))
    assert f"{newest.name} cannot be read" in capsys.readouterr().out
    assert (copy / "checkpoints" / f"corrupt-{newest.name}").is_file()
    assert bit_exact(final_weights(copy), expected)
    fault_counts["bit_exact"] += 1

    # NaN gradients with a finite loss: the step is skipped, nothing non-finite is saved
    nan = tmp_path / "nan"
    results = train(make(name, nan, seed, nan_grad_at=3))
    fault_counts["faults_injected"] += 1
    assert results["nonfinite_steps"] == 1
    # a loss spike (finite, 1000x): skipped like a non-finite step, nothing of it applied or saved;
    # a finished run rewound to step 2 (resume_from, as after a divergence) retrains to the reference's
    # end. Once per stage (seed 0): the mechanisms do not depend on the seed, and the suite's time is budgeted.
    outs = [reference, run, copy, nan]
    if seed == 0:
        spike = tmp_path / "spike"
        results = train(make(name, spike, seed, {"spike_window": 4}, spike_at=5))
        fault_counts["faults_injected"] += 1
        assert results["spike_steps"] == 1 and results["nonfinite_steps"] == 0
        rewound = tmp_path / "rewound"
        shutil.copytree(reference, rewound)
        train(make(name, rewound, seed, {"resume_from": "step_2"}))
        fault_counts["faults_injected"] += 1
        assert sorted(p.name for p in (rewound / "checkpoints").glob("rewound-*")) == [
            "rewound-step_00000004.pt", "rewound-step_00000006.pt"]
        assert bit_exact(final_weights(rewound), expected)
        fault_counts["bit_exact"] += 1
        outs += [spike, rewound]
    for out in outs:
        fault_counts["nonfinite_saved"] += non_finite_tensors(out)
        saved = {ckpt.checkpoint_step(path) for path in ckpt.Checkpointer(out).all()}
        fault_counts["checkpoints_lost"] += len({2, 4, 6} - saved)  # every ckpt_every step is still there
    assert fault_counts["nonfinite_saved"] == 0 and fault_counts["checkpoints_lost"] == 0


@pytest.mark.parametrize("name", ["mae", "wsp", "lit"])
def test_a_batch_larger_than_the_dataset_trains(name, tmp_path, fault_counts):
    """8 images, batches of 16: each batch wraps around the epoch instead of hanging."""
    config_cls, stage_cls, extra = STAGES[name]
    values = {**COMMON, **extra, "num_images": 8, "steps": 2, "out_dir": str(tmp_path / name)}
    results = train(stage_cls(build_config(config_cls, None, {k: str(v) for k, v in values.items()})))
    fault_counts["faults_injected"] += 1
    assert results["samples_seen"] == 32 and results["steps"] == 2

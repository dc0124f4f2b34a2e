"""Scale-out: DDP and FSDP2 reproduce one process, sharded checkpoints move between rank counts,
and a failing rank ends the job.

The multi-rank tests launch ``torchrun --standalone --nproc-per-node 2`` on this file (gloo on
CPU); the ``__main__`` block at the bottom is the worker. The MAE stage draws each sample's mask
noise from the sample's own seed, so the masks do not depend on how a global batch is split
across ranks: one process and two ranks must then compute the same losses.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from prepretrain.config import build_config
from prepretrain.models.mae import create_mae
from prepretrain.models.vit import create_vit
from prepretrain.stages.mae import MAEConfig, MAEStage
from prepretrain.train.checkpoint import Checkpointer, checkpoint_step, export_weights, read_model_weights
from prepretrain.train.distributed import DistInfo, resolve_strategy, shard_units
from prepretrain.train.engine import train

pytestmark = pytest.mark.xdist_group("processes")  # two-rank launches: one at a time (tests/conftest.py)

TORCHRUN = Path(sys.executable).with_name("torchrun")
FAIL_ENV = "PREPRETRAIN_TEST_FAIL_AT"  # "rank:loss_call": that rank raises on that call of loss()
SIGTERM_ENV = "PREPRETRAIN_TEST_SIGTERM_AT"
TIMEOUT_S = 60

# 4 optimizer steps of a global batch of 8 (4 per rank on two ranks), checkpoints at steps 2 and 4.
RUN_SETTINGS = {
    "steps": 4, "batch_size": 8, "num_images": 64, "eval_images": 8, "lr": 2e-3, "warmup_steps": 0,
    "clip_grad": 0.05, "log_every": 1, "ckpt_every": 2, "keep_last": 2, "progress": False, "tensorboard": False,
    "decoder_embed_dim": 32, "decoder_depth": 1, "decoder_num_heads": 2, "dist_timeout_s": TIMEOUT_S,
}


class SeededMaskMAE(MAEStage):
    """The MAE stage (whose mask noise is part of each sample, seeded like its augmentation)
    with a one-block encoder and an injectable failure."""

    loss_calls = 0

    def build_model(self, run) -> nn.Module:
        cfg = self.cfg
        return create_mae(cfg.model, img_size=cfg.image_size, depth=1, decoder_embed_dim=cfg.decoder_embed_dim,
                          decoder_depth=cfg.decoder_depth, decoder_num_heads=cfg.decoder_num_heads)

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, float]]:
        fail_at = os.environ.get(FAIL_ENV)
        if fail_at:
            rank, call = (int(part) for part in fail_at.split(":"))
            if int(os.environ.get("RANK", "0")) == rank and self.loss_calls == call:
                raise RuntimeError(f"injected failure on rank {rank} at loss call {call}")
        self.loss_calls += 1
        loss, _, _ = model(batch["image"], mask_ratio=self.cfg.mask_ratio, noise=batch["noise"])
        return loss, {}

    def after_step(self, model: nn.Module, step: int) -> None:
        stop_at = os.environ.get(SIGTERM_ENV)  # "rank:step": that rank alone is sent SIGTERM after that step
        if stop_at:
            rank, at = (int(part) for part in stop_at.split(":"))
            if int(os.environ.get("RANK", "0")) == rank and step == at:
                os.kill(os.getpid(), signal.SIGTERM)


def run_config(out_dir: Path, **extra: Any) -> MAEConfig:
    values = {**RUN_SETTINGS, **extra, "out_dir": str(out_dir)}
    return build_config(MAEConfig, None, [f"{key}={value}" for key, value in values.items()])


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


def launch(out_dir: Path, fail_at: str = "", sigterm_at: str = "", **extra: Any
           ) -> tuple[subprocess.CompletedProcess, float]:
    """torchrun with two gloo ranks on this file; returns the finished process and its wall time."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop(FAIL_ENV, None)
    env.pop(SIGTERM_ENV, None)
    if fail_at:
        env[FAIL_ENV] = fail_at
    if sigterm_at:
        env[SIGTERM_ENV] = sigterm_at
    overrides = json.dumps({**RUN_SETTINGS, **extra, "out_dir": str(out_dir)})
    command = [str(TORCHRUN), "--standalone", "--nproc-per-node", "2", __file__, overrides]
    started = time.monotonic()
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=4 * TIMEOUT_S)
    return result, time.monotonic() - started


def assert_launch_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"torchrun failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"


def assert_same_losses(got: dict[int, float], expected: dict[int, float], steps: list[int]) -> None:
    for step in steps:
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), f"step {step}: {got} vs {expected}"


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The one-process run every distributed run is compared with."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    train(SeededMaskMAE(run_config(run_dir, strategy="none")))
    return run_dir


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    run_dir = tmp_path_factory.mktemp("fsdp") / "run"
    result, _ = launch(run_dir, strategy="fsdp")
    assert_launch_ok(result)
    return run_dir


# ------------------------------------------------------------------------------ fast units
def test_shard_units_are_the_encoder_and_decoder_blocks() -> None:
    model = create_mae("vit_micro4", img_size=32, depth=3, decoder_embed_dim=32, decoder_depth=2,
                       decoder_num_heads=2, device="meta")
    units = shard_units(model)
    assert units == [*model.blocks, *model.decoder_blocks]


def test_auto_strategy_and_none_under_several_ranks() -> None:
    cpu = torch.device("cpu")
    assert resolve_strategy("auto", DistInfo(0, 1, 0), cpu, 10**9) == "none"
    assert resolve_strategy("auto", DistInfo(0, 2, 0), cpu, 10**6) == "ddp"
    assert resolve_strategy("fsdp", DistInfo(0, 1, 0), cpu, 10**6) == "fsdp"
    with pytest.raises(ValueError, match="strategy=none"):
        resolve_strategy("none", DistInfo(1, 2, 1), cpu, 10**6)


def test_checkpointer_sees_files_and_complete_folders_only_and_rotates(tmp_path: Path) -> None:
    checkpointer = Checkpointer(tmp_path, keep_last=2)
    checkpointer.save(1, {"step": 1})
    complete = checkpointer.dir / "step_00000002"
    complete.mkdir()
    torch.save({"step": 2}, complete / "meta.pt")
    (checkpointer.dir / "step_00000003").mkdir()  # shards written, meta.pt not yet: a crash mid-save
    (checkpointer.dir / ".step_00000004.tmp").mkdir()
    assert [p.name for p in checkpointer.all()] == ["step_00000001.pt", "step_00000002"]
    assert checkpointer.latest() == complete and checkpoint_step(complete) == 2
    checkpointer.save(5, {"step": 5})
    checkpointer.keep_last = 1
    checkpointer.rotate()
    assert [p.name for p in checkpointer.all()] == ["step_00000005.pt"]
    assert not complete.exists()


@pytest.mark.slow
def test_one_process_resume_is_bitwise_exact(reference_run: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "resumed"
    (run_dir / "checkpoints").mkdir(parents=True)
    shutil.copy(reference_run / "checkpoints" / "step_00000002.pt", run_dir / "checkpoints")
    train(SeededMaskMAE(run_config(run_dir, strategy="none")))
    resumed = torch.load(run_dir / "checkpoints" / "step_00000004.pt", weights_only=True)
    uninterrupted = torch.load(reference_run / "checkpoints" / "step_00000004.pt", weights_only=True)
    for key, value in uninterrupted["model"].items():
        assert torch.equal(resumed["model"][key], value), key
    for number, state in uninterrupted["optimizer"]["state"].items():
        assert torch.equal(resumed["optimizer"]["state"][number]["exp_avg_sq"], state["exp_avg_sq"])


# --------------------------------------------------------------------------- multi-rank
@pytest.mark.slow
def test_ddp_two_ranks_reproduce_one_process(reference_run: Path, tmp_path: Path) -> None:
    result, _ = launch(tmp_path / "ddp", strategy="ddp")
    assert_launch_ok(result)
    assert_same_losses(losses(tmp_path / "ddp"), losses(reference_run), [1, 2, 3, 4])
    reference = read_model_weights(reference_run / "checkpoints" / "step_00000004.pt")
    shared = read_model_weights(tmp_path / "ddp" / "checkpoints" / "step_00000004")
    assert shared.keys() == reference.keys()
    for key in reference:  # Adam turns float-rounding gradient differences into ~1e-6 weight differences
        torch.testing.assert_close(shared[key], reference[key], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_fsdp_two_ranks_reproduce_one_process_and_export_consolidates(
    reference_run: Path, fsdp_run: Path, tmp_path: Path
) -> None:
    assert_same_losses(losses(fsdp_run), losses(reference_run), [1, 2, 3, 4])
    shards = sorted(p.name for p in (fsdp_run / "checkpoints" / "step_00000004").glob("*.distcp"))
    assert len(shards) == 2  # each rank wrote its own shard
    # DCP folder -> one safetensors file equals what rank 0 exported after gathering the shards.
    from safetensors.torch import load_file

    exported = load_file(str(export_weights(fsdp_run, tmp_path / "model.safetensors")))
    finished = load_file(str(fsdp_run / "mae_full.safetensors"))
    assert exported.keys() == finished.keys()
    for key in finished:
        assert torch.equal(exported[key], finished[key]), key
    encoder = load_file(str(export_weights(fsdp_run, tmp_path / "encoder.safetensors", part="encoder")))
    assert encoder.keys() == load_file(str(fsdp_run / "encoder.safetensors")).keys()


@pytest.mark.slow
def test_a_damaged_shard_of_the_newest_folder_is_caught_and_both_ranks_fall_back(
        fsdp_run: Path, reference_run: Path, tmp_path: Path, fault_counts) -> None:
    """A DCP folder records every file's size and SHA-256 (checksums.json). One flipped byte in
    rank 1's shard of the newest checkpoint: the ranks agree it is damaged, set it aside together
    and resume from the previous one, ending with the uninterrupted losses."""
    run_dir = tmp_path / "run"
    shutil.copytree(fsdp_run, run_dir)
    newest = run_dir / "checkpoints" / "step_00000004"
    table = json.loads((newest / "checksums.json").read_text())
    assert {".metadata", "rng_rank00000.pt", "rng_rank00001.pt"} <= set(table)
    shard = sorted(newest.glob("__1_*.distcp"))[0]
    assert shard.name in table
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    fault_counts["faults_injected"] += 1
    result, _ = launch(run_dir, strategy="fsdp", steps=4)
    assert_launch_ok(result)
    assert f"{shard.name}: its bytes do not match" in result.stdout
    assert "trying the previous checkpoint" in result.stdout
    assert (run_dir / "checkpoints" / "corrupt-step_00000004").is_dir()
    assert_same_losses(losses(run_dir), losses(reference_run), [1, 2, 3, 4])
    fault_counts["same_losses"] += 1
    fault_counts["runs"] += 1


@pytest.mark.slow
def test_failing_rank_ends_job_and_two_rank_checkpoint_resumes_on_one(reference_run: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "crash"
    # Rank 1 raises in the third step (loss call 2 with one micro-batch per step), after the step-2 checkpoint.
    result, seconds = launch(run_dir, fail_at="1:2", strategy="fsdp")
    assert result.returncode != 0
    assert seconds < TIMEOUT_S, f"the job took {seconds:.0f}s to end (collective timeout {TIMEOUT_S}s)"
    assert "rank 1/2 failed: RuntimeError: injected failure on rank 1 at loss call 2" in result.stderr
    assert [p.name for p in Checkpointer(run_dir).all()] == ["step_00000002"]
    # Resume the two-rank (sharded) checkpoint in this single process: steps 3 and 4 as if never stopped.
    train(SeededMaskMAE(run_config(run_dir, strategy="none")))
    assert_same_losses(losses(run_dir), losses(reference_run), [1, 2, 3, 4])
    assert (run_dir / "checkpoints" / "step_00000004.pt").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["fsdp"])  # DDP takes the same all-reduce of stop requests
def test_sigterm_on_one_rank_checkpoints_every_rank_at_one_step_boundary(reference_run: Path, tmp_path: Path,
                                                                      strategy: str, fault_counts) -> None:
    """Preemption reaches one rank (rank 1, after step 1): the ranks' stop requests are all-reduced
    with the step's flags, so both checkpoint the same step and stop with ``Preempted`` (the CLI's
    exit code 75), and the rerun on two ranks ends with the uninterrupted losses."""
    run_dir = tmp_path / strategy
    try:
        result, _ = launch(run_dir, sigterm_at="1:1", strategy=strategy)
    except subprocess.TimeoutExpired:
        fault_counts["hangs"] += 1
        raise
    fault_counts["faults_injected"] += 1
    assert result.returncode != 0 and "stopped by SIGTERM after step 2" in result.stdout + result.stderr
    assert [checkpoint_step(p) for p in Checkpointer(run_dir).all()] == [2]
    for rank in (0, 1):  # the worker calls train() itself: Preempted reaches its top on both ranks
        assert re.search(rf"\[rank{rank}\]: prepretrain.train.engine.Preempted: stopped by .* after step 2/4",
                         result.stderr), result.stderr[-3000:]
    resumed, _ = launch(run_dir, strategy=strategy)
    assert_launch_ok(resumed)
    assert_same_losses(losses(run_dir), losses(reference_run), [1, 2, 3, 4])
    fault_counts["runs"] += 2
    fault_counts["same_losses"] += 1


def test_a_two_rank_divergence_keeps_its_last_known_good_folder(tmp_path: Path, fault_counts) -> None:
    """lr=1e6 on two ranks, a DCP folder every step: the ranks agree on the bad steps (all-reduced flags), rank 0
    marks the folders written during them suspect (step_N.suspect.json beside each) and rotation keeps the last
    known good one, which the message names. A plain rerun refuses the suspect newest folder; the named one
    resumes in one process with a sane lr and finishes with finite weights."""
    from prepretrain.train.checkpoint import SuspectCheckpoint

    run_dir = tmp_path / "diverged"
    result, _ = launch(run_dir, strategy="ddp", lr=1e6, steps=10, ckpt_every=1, clip_grad=0, warmup_steps=2)
    fault_counts["faults_injected"] += 1
    assert result.returncode != 0
    found = re.search(r"the last known good checkpoint is step (\d+) .*rerun with resume_from=step_(\d+)",
                      result.stderr)
    assert found and found.group(1) == found.group(2), result.stderr[-3000:]
    good = int(found.group(1))
    checkpointer = Checkpointer(run_dir)
    folders = checkpointer.all()
    assert all(path.is_dir() for path in folders) and len(folders) == 3  # keep_last 2 + the last known good
    assert checkpoint_step(checkpointer.last_known_good()) == good == checkpoint_step(folders[0])
    assert [p.name for p in checkpointer.suspects()] == [p.name for p in folders[1:]]
    assert (run_dir / "checkpoints" / f"{folders[-1].name}.suspect.json").is_file()
    fault_counts["checkpoints_lost"] += int(not (run_dir / "checkpoints" / f"step_{good:08d}").is_dir())
    with pytest.raises(SuspectCheckpoint, match=f"resume_from=step_{good} "):
        train(SeededMaskMAE(run_config(run_dir, strategy="none", steps=10)))
    fault_counts["faults_injected"] += 1
    results = train(SeededMaskMAE(run_config(run_dir, strategy="none", steps=10, resume_from=f"step_{good}")))
    assert results["steps"] == 10
    weights = read_model_weights(checkpointer.latest())
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


@pytest.mark.slow
def test_one_process_checkpoint_resumes_on_two_ranks(reference_run: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "grow"
    (run_dir / "checkpoints").mkdir(parents=True)
    shutil.copy(reference_run / "checkpoints" / "step_00000002.pt", run_dir / "checkpoints")
    first_two = [line for line in (reference_run / "metrics.jsonl").read_text().splitlines()
                 if json.loads(line)["step"] <= 2]
    (run_dir / "metrics.jsonl").write_text("\n".join(first_two) + "\n")
    result, _ = launch(run_dir, strategy="fsdp")
    assert_launch_ok(result)
    assert "resuming from" in result.stdout
    assert_same_losses(losses(run_dir), losses(reference_run), [3, 4])



def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_meet_at_a_c10d_rendezvous_on_localhost(reference_run: Path, tmp_path: Path) -> None:
    """The multi-node launch of docs/distributed.md, rehearsed on one machine: two torchrun
    launchers (``--nnodes 2``, one process each) meet at a c10d rendezvous and train as one job,
    with the one-process losses."""
    port, run_dir = free_port(), tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop(FAIL_ENV, None)
    overrides = json.dumps({**RUN_SETTINGS, "strategy": "ddp", "out_dir": str(run_dir)})
    launchers = [subprocess.Popen([str(TORCHRUN), "--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                                   "--rdzv-endpoint", f"localhost:{port}", "--rdzv-id", "rehearsal",
                                   "--max-restarts", "0", __file__, overrides],
                                  env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
    outputs = [launcher.communicate(timeout=4 * TIMEOUT_S) for launcher in launchers]
    for launcher, (out, err) in zip(launchers, outputs):
        assert launcher.returncode == 0, f"launcher failed:\n{out[-2000:]}\n{err[-4000:]}"
    assert_same_losses(losses(run_dir), losses(reference_run), [1, 2, 3, 4])
    assert json.loads((run_dir / "results.json").read_text())["steps"] == 4


def test_slurm_script_launches_torchrun_on_every_node(tmp_path: Path) -> None:
    """scripts/slurm_train.sh without Slurm: stand-in ``scontrol`` and ``srun`` record what the
    script asks for; the torchrun line must carry the allocation (nodes, GPUs per node, the first
    host as rendezvous, the job id) and pass the command through untouched."""
    script = Path(__file__).resolve().parents[1] / "scripts" / "slurm_train.sh"
    text = script.read_text()
    assert "#SBATCH --signal=TERM@" in text and "#SBATCH --ntasks-per-node=1" in text
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text("#!/bin/sh\nprintf 'gpu-node-07\\ngpu-node-08\\n'\n")
    (bin_dir / "srun").write_text(f"#!/bin/sh\nprintf '%s\\n' \"$@\" > {tmp_path / 'srun_args'}\n")
    for tool in ("scontrol", "srun"):
        (bin_dir / tool).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_NNODES": "2", "SLURM_JOB_ID": "4242",
           "SLURM_JOB_NODELIST": "gpu-node-[07-08]", "SLURM_GPUS_ON_NODE": "4", "SLURM_CPUS_PER_TASK": "32"}
    result = subprocess.run(["bash", str(script), "mae", "--config", "configs/mae_vit_b16.yaml", "out_dir=/shared/x"],
                            env=env, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    args = (tmp_path / "srun_args").read_text().splitlines()
    assert args[:2] == ["--kill-on-bad-exit=1", "torchrun"]
    assert {"--nnodes=2", "--nproc-per-node=4", "--rdzv-backend=c10d", "--rdzv-endpoint=gpu-node-07:29500",
            "--rdzv-id=4242", "--max-restarts=0"} <= set(args)
    assert args[-6:] == ["-m", "prepretrain.cli", "mae", "--config", "configs/mae_vit_b16.yaml", "out_dir=/shared/x"]
    assert "2 node(s) x 4 GPU(s), rendezvous gpu-node-07:29500" in result.stdout
    usage = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=30)
    assert usage.returncode == 2 and "usage:" in usage.stderr


def launch_cli(command: list[str]) -> subprocess.CompletedProcess:
    """``prepretrain <command>`` under torchrun with two gloo ranks."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([str(TORCHRUN), "--standalone", "--nproc-per-node", "2", "-m", "prepretrain.cli", *command],
                          env=env, capture_output=True, text=True, timeout=4 * TIMEOUT_S)


LIT_SETTINGS = ["num_images=200", "steps=4", "batch_size=32", "vision_depth=1", "text_depth=1", "progress=false",
                "tensorboard=false", "log_every=1", "warmup_steps=0", "lr=2e-3", "clip_grad=0.5"]


@pytest.mark.slow
@pytest.mark.parametrize("augment", ["false", "true"])
def test_lit_under_fsdp_on_two_ranks_reproduces_one_process(tmp_path: Path, augment: str) -> None:
    """FSDP2 cannot shard CLIP's scalar logit_scale: it stays replicated with averaged gradients,
    and the frozen-tower feature cache and the zero-shot evaluation gather the root's weights.
    Cached (augment=false) and through the image tower (augment=true): same losses, clipped
    gradient norms and zero-shot accuracy as one process."""
    from prepretrain.stages.lit import LiTConfig, LiTStage

    settings = [*LIT_SETTINGS, f"augment={augment}"]
    assert_launch_ok(launch_cli(["lit", *settings, "strategy=fsdp", f"out_dir={tmp_path / 'fsdp'}"]))
    single = train(LiTStage(build_config(LiTConfig, None, [*settings, "strategy=none",
                                                           f"out_dir={tmp_path / 'one'}"])))
    assert_same_losses(losses(tmp_path / "fsdp"), losses(tmp_path / "one"), [1, 2, 3, 4])
    rows = {name: [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("fsdp", "one")}
    norms = {name: [row["grad_norm"] for row in rows[name] if "grad_norm" in row] for name in rows}
    assert norms["fsdp"] == pytest.approx(norms["one"], rel=1e-4) and len(norms["one"]) == 4
    fsdp = json.loads((tmp_path / "fsdp" / "results.json").read_text())
    assert fsdp["zeroshot_coarse_top1"] == single["zeroshot_coarse_top1"]


@pytest.mark.slow
def test_lit_accumulating_on_two_ranks_trains_on_one_global_contrastive_batch(tmp_path: Path) -> None:
    """batch 32 = 2 ranks x 2 accumulated micro-batches of 8: every rank scores its rows against
    all 32 captions, so losses and gradient norms equal one process on batches of 32."""
    from prepretrain.stages.lit import LiTConfig, LiTStage

    settings = [*LIT_SETTINGS, "clip_grad=1e6"]  # no clipping; the norm is logged
    assert_launch_ok(launch_cli(["lit", *settings, "strategy=ddp", "micro_batch_size=8",
                                 f"out_dir={tmp_path / 'ddp'}"]))
    train(LiTStage(build_config(LiTConfig, None, [*settings, "strategy=none", f"out_dir={tmp_path / 'one'}"])))
    assert_same_losses(losses(tmp_path / "ddp"), losses(tmp_path / "one"), [1, 2, 3, 4])
    norms = {name: [json.loads(line).get("grad_norm") for line in (tmp_path / name / "metrics.jsonl").read_text()
                    .splitlines()] for name in ("ddp", "one")}
    norms = {name: [n for n in values if n is not None] for name, values in norms.items()}
    assert len(norms["one"]) == 4 and norms["ddp"] == pytest.approx(norms["one"], rel=1e-4)


@pytest.mark.slow
def test_finetune_under_fsdp_evaluates_and_exports(tmp_path: Path) -> None:
    """The classifier and its EMA are evaluated outside the root's forward: the gathered weights."""
    from safetensors.torch import load_file

    out = tmp_path / "fsdp"
    assert_launch_ok(launch_cli(["finetune", "num_images=200", "steps=3", "batch_size=32", "progress=false",
                                 "tensorboard=false", "ema_decay=0.9", "strategy=fsdp", f"out_dir={out}"]))
    results = json.loads((out / "results.json").read_text())
    assert 0 <= results["top1"] <= 100 and "ema_top1" in results
    weights = load_file(str(out / "last.safetensors"))
    model = create_vit("vit_micro4", num_classes=10)
    model.load_state_dict(weights)  # strict: the consolidated classifier, not shards


@pytest.mark.slow
def test_wsp_on_caption_shards_labels_each_shard_once_across_two_ranks(tmp_path: Path) -> None:
    """The label cache under two ranks: each rank labels its share of the shards, the derivation
    is summed across ranks, and the result equals one process's annotation passes."""
    from prepretrain.data.shards.write import write_shards
    from prepretrain.data.synthetic.images import SyntheticSource
    from prepretrain.stages.wsp import WSPConfig, WSPStage
    from prepretrain.train.run import Run

    data = tmp_path / "shards"
    write_shards(SyntheticSource(120, image_size=16, seed=0), data, samples_per_shard=30, verbose=False)
    settings = ["labels_from=caption", "depth=1", "image_size=32", "vocab_min_count=1", "batch_size=8"]
    out = tmp_path / "two"
    assert_launch_ok(launch_cli(["wsp", f"data={data}", f"out_dir={out}", "steps=2", "progress=false",
                                 "tensorboard=false", *settings]))
    assert len(list((data / ".prepretrain-labels").glob("*/*.npz"))) == 4  # every shard labelled once
    results = json.loads((out / "results.json").read_text())
    cfg = build_config(WSPConfig, None, [f"data={data}", f"out_dir={tmp_path / 'one'}", "label_cache=false",
                                         *settings])
    stage = WSPStage(cfg)
    alone = stage.prepare(Run.of_stage(stage))
    assert results["train_samples_per_epoch"] == alone.positions
    assert json.loads((out / "vocab.json").read_text())["tags"] == alone.vocab.tags


@pytest.mark.slow
def test_video_on_two_ranks_tests_each_video_once_and_trains_the_single_frame_baseline(tmp_path: Path) -> None:
    """Video evaluation is sharded: each rank reads its share of the 67 test videos (one share padded
    with a video counted nowhere, so FSDP's collective forwards stay in step) and the hit counts are
    summed; one process evaluating the exported weights gets the same top-1. The single-frame
    baseline trains on both ranks (it used to be skipped under torchrun)."""
    from safetensors.torch import load_file

    from prepretrain.stages.video import VideoConfig, VideoStage
    from prepretrain.train.run import Run

    settings = ["num_images=335", "steps=2", "batch_size=8", "num_frames=4", "tubelet_size=2", "frame_stride=2",
                "synthetic_length=8", "temporal_views=2", "progress=false", "tensorboard=false"]
    out = tmp_path / "two"
    assert_launch_ok(launch_cli(["video", f"out_dir={out}", "strategy=fsdp", *settings]))
    results = json.loads((out / "results.json").read_text())
    assert results["test_videos"] == 67  # max(64, 335 // 5), each counted once (twice would be 134)
    baseline = json.loads((out / "single_frame" / "results.json").read_text())
    assert baseline["test_videos"] == 67 and results["single_frame_top1"] == baseline["top1"]
    stage = VideoStage(build_config(VideoConfig, None, [*settings, f"out_dir={tmp_path / 'one'}"]))
    model = stage.build_model(Run.of_stage(stage))
    model.load_state_dict(load_file(str(out / "last.safetensors")))
    alone = stage._accuracy(model.eval(), "test", Run.of_stage(stage))
    assert alone["videos"] == 67 and alone["top1"] == results["top1"]


if __name__ == "__main__":  # torchrun worker: python test_distributed.py '<json of config values>'
    settings = json.loads(sys.argv[1])
    train(SeededMaskMAE(build_config(MAEConfig, None, [f"{k}={v}" for k, v in settings.items()])))

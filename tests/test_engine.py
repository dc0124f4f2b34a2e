"""The training loop: exact resume after SIGKILL, atomic checkpoints, the non-finite guard."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from prepretrain.config import ConfigError, build_config
from prepretrain.stages.mae import MAEConfig, MAEStage
from prepretrain.train import checkpoint as ckpt
from prepretrain.train.engine import NonFiniteLoss, train
from prepretrain.train.optim import decays, lr_at, param_groups

TINY = ["num_images=96", "batch_size=16", "steps=12", "ckpt_every=3", "log_every=1", "decoder_embed_dim=32",
        "decoder_depth=1", "decoder_num_heads=2", "eval_images=16", "progress=false", "tensorboard=false",
        "warmup_steps=2"]


def tiny_cfg(out_dir: Path, *extra: str) -> MAEConfig:
    return build_config(MAEConfig, None, [*TINY, f"out_dir={out_dir}", *extra])


def mae_command(out_dir: Path) -> list[str]:
    return [sys.executable, "-m", "prepretrain.cli", "mae", *TINY, f"out_dir={out_dir}"]


@pytest.mark.slow
def test_sigkill_then_rerun_ends_with_identical_weights(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    straight = tmp_path / "straight"
    subprocess.run(mae_command(straight), check=True, env=env, capture_output=True, timeout=600)

    resumed = tmp_path / "resumed"
    process = subprocess.Popen(mae_command(resumed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = resumed / "checkpoints" / "step_00000006.pt"
    deadline = time.time() + 300
    while not target.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert target.exists() and not (resumed / "results.json").exists(), "the run must be killed part-way"

    rerun = subprocess.run(mae_command(resumed), env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming from" in rerun.stdout
    a = load_file(straight / "mae_full.safetensors")
    b = load_file(resumed / "mae_full.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # metrics of the resumed run read like one run: each step once
    steps = [r["step"] for r in map(json.loads, (resumed / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 12


def test_run_directory_contents_and_loss_falls(tmp_path):
    results = train(MAEStage(tiny_cfg(tmp_path / "run", "steps=20", "blr=5e-3")))
    run = tmp_path / "run"
    for name in ("config.yaml", "metrics.jsonl", "results.json", "loss_curve.png", "reconstructions.png",
                 "encoder.safetensors", "mae_full.safetensors"):
        assert (run / name).exists(), name
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "loss" in r]
    assert {"step", "loss", "lr", "samples_per_s"} <= set(logged[0])
    assert logged[-1]["loss"] < logged[0]["loss"]
    assert results["steps"] == 20 and "val_loss" in results
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "step_00000018.pt", "step_00000018.pt.sha256", "step_00000020.pt", "step_00000020.pt.sha256"]


def test_mae_on_an_unlabeled_folder_with_no_validation_finishes(tmp_path):
    """eval_images=0 turns the validation loss off (it used to end a finished run in a traceback)."""
    from PIL import Image

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(8):
        Image.new("RGB", (40, 40), (30 * i, 100, 200 - 20 * i)).save(folder / f"{i}.png")
    results = train(MAEStage(tiny_cfg(tmp_path / "run", f"data={folder}", "eval_images=0", "steps=2",
                                      "batch_size=4")))
    assert results["steps"] == 2 and "val_loss" not in results
    assert (tmp_path / "run" / "encoder.safetensors").exists()
    # The same command again resumes after the last step: nothing runs, the final loss is the logged one.
    again = train(MAEStage(tiny_cfg(tmp_path / "run", f"data={folder}", "eval_images=0", "steps=2", "batch_size=4")))
    assert again["final_loss"] == pytest.approx(results["final_loss"], rel=1e-6)
    with pytest.raises(ConfigError, match="'eval_images'"):
        tiny_cfg(tmp_path / "bad", "eval_images=-1")


def test_crash_during_save_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    checkpointer = ckpt.Checkpointer(tmp_path, keep_last=2)
    checkpointer.save(1, {"x": torch.ones(2)})

    def broken_save(obj, handle):
        handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt.torch, "save", broken_save)
    with pytest.raises(OSError):
        checkpointer.save(2, {"x": torch.zeros(2)})
    assert checkpointer.latest().name == "step_00000001.pt"
    assert torch.equal(checkpointer.load(checkpointer.latest())["x"], torch.ones(2))
    assert sorted(p.name for p in checkpointer.dir.iterdir()) == ["step_00000001.pt", "step_00000001.pt.sha256"]


def test_keep_last_rotates(tmp_path):
    checkpointer = ckpt.Checkpointer(tmp_path, keep_last=2)
    for step in range(1, 5):
        checkpointer.save(step, {"step": step})
    assert [p.name for p in checkpointer.all()] == ["step_00000003.pt", "step_00000004.pt"]


class NaNStage(MAEStage):
    """Loss becomes non-finite after ``bad_from`` forward calls (and finite again after
    ``bad_until`` calls, when given)."""

    def __init__(self, cfg, bad_from, bad_until=None):
        super().__init__(cfg)
        self.calls = 0
        self.bad_from, self.bad_until = bad_from, bad_until

    def loss(self, model, batch):
        loss, metrics = super().loss(model, batch)
        self.calls += 1
        if self.calls > self.bad_from and (self.bad_until is None or self.calls <= self.bad_until):
            loss = loss * float("nan")
        return loss, metrics


class SpikeStage(MAEStage):
    """The loss is multiplied by ``factor`` on the forward calls in ``spiking`` (1-based)."""

    def __init__(self, cfg, spiking, factor=1000.0):
        super().__init__(cfg)
        self.calls, self.spiking, self.factor = 0, set(spiking), factor

    def loss(self, model, batch):
        loss, metrics = super().loss(model, batch)
        self.calls += 1
        return (loss * self.factor if self.calls in self.spiking else loss), metrics


def test_a_loss_spike_is_skipped_like_a_nonfinite_step(tmp_path):
    """A finite loss 1000x the recent median (step 6 of 8) is not applied: the optimizer's step
    count shows one step fewer; with spike_factor=0 the same spike is applied; a spike that persists
    stops the run like non-finite losses do."""
    cfg = tiny_cfg(tmp_path / "guarded", "steps=8", "spike_window=4", "ckpt_every=8", "log_every=2")
    results = train(SpikeStage(cfg, spiking={6}))
    assert results["spike_steps"] == 1 and results["nonfinite_steps"] == 0
    state = torch.load(tmp_path / "guarded" / "checkpoints" / "step_00000008.pt", weights_only=True)
    assert {float(s["step"]) for s in state["optimizer"]["state"].values()} == {7.0}
    off = tiny_cfg(tmp_path / "off", "steps=8", "spike_window=4", "spike_factor=0", "ckpt_every=8")
    results = train(SpikeStage(off, spiking={6}))
    assert results["spike_steps"] == 0
    state = torch.load(tmp_path / "off" / "checkpoints" / "step_00000008.pt", weights_only=True)
    assert {float(s["step"]) for s in state["optimizer"]["state"].values()} == {8.0}
    early = tiny_cfg(tmp_path / "early", "steps=8", "spike_window=4", "ckpt_every=8")
    assert train(SpikeStage(early, spiking={2}))["spike_steps"] == 0  # before half a window: no guard yet
    stuck = tiny_cfg(tmp_path / "stuck", "steps=10", "spike_window=4", "max_nonfinite=2", "ckpt_every=100")
    with pytest.raises(NonFiniteLoss, match=r"3 consecutive bad steps \(last: loss spike"):
        train(SpikeStage(stuck, spiking=set(range(5, 11))))


def test_nonfinite_losses_stop_the_run_without_saving_nan(tmp_path):
    cfg = tiny_cfg(tmp_path / "nan", "max_nonfinite=2", "ckpt_every=1")
    with pytest.raises(NonFiniteLoss, match="non-finite"):
        train(NaNStage(cfg, bad_from=2))
    saved = sorted((tmp_path / "nan" / "checkpoints").glob("*.pt"))
    assert saved[-1].name == "step_00000004.pt"  # steps 3 and 4 were skipped, step 5 stopped the run
    for value in torch.load(saved[-1], weights_only=True)["model"].values():
        assert torch.isfinite(value).all()


def test_skipped_nonfinite_step_leaves_weights_unchanged(tmp_path):
    cfg = tiny_cfg(tmp_path / "one", "steps=3", "ckpt_every=1", "keep_last=5")

    results = train(NaNStage(cfg, bad_from=2, bad_until=3))  # the third step's loss is NaN
    assert results["nonfinite_steps"] == 1
    files = sorted((tmp_path / "one" / "checkpoints").glob("*.pt"))
    two, three = (torch.load(f, weights_only=True)["model"] for f in files[1:3])
    assert all(torch.equal(two[k], three[k]) for k in two)


def test_weight_decay_groups_follow_reference():
    from prepretrain.models.mae import create_mae

    model = create_mae("vit_micro4", img_size=32, depth=1, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2)
    groups = param_groups(model, 0.05)
    no_decay = {n for g in groups if g["weight_decay"] == 0 for n in g["names"]}
    decay = {n for g in groups if g["weight_decay"] > 0 for n in g["names"]}
    assert {"cls_token", "mask_token", "blocks.0.norm1.weight", "blocks.0.attn.qkv.bias"} <= no_decay
    assert {"blocks.0.attn.qkv.weight", "patch_embed.proj.weight", "decoder_pred.weight"} <= decay
    assert "pos_embed" not in decay | no_decay  # fixed, not trained
    assert not decays("pos_embed", torch.zeros(1, 2, 3))


def test_lr_schedule_warmup_then_half_cosine():
    assert lr_at(0, 100, 10, 1.0) == 0.0
    assert lr_at(5, 100, 10, 1.0) == pytest.approx(0.5)
    assert lr_at(10, 100, 10, 1.0) == pytest.approx(1.0)
    assert lr_at(55, 100, 10, 1.0, 0.1) == pytest.approx(0.55)
    assert lr_at(100, 100, 10, 1.0, 0.1) == pytest.approx(0.1)
    # ViTDet's step schedule: x0.1 at 88.9% and at 96.3% of the run, after the warmup
    step = {"schedule": "step", "decay_at": (0.889, 0.963), "decay_rate": 0.1}
    assert [lr_at(s, 1000, 10, 1.0, **step) for s in (5, 10, 888, 889, 962, 963, 999)] == pytest.approx(
        [0.5, 1.0, 1.0, 0.1, 0.1, 0.01, 0.01])


def test_blr_scales_with_global_batch():
    assert build_config(MAEConfig, None, ["blr=1.5e-4", "batch_size=4096"]).peak_lr == pytest.approx(2.4e-3)
    assert build_config(MAEConfig, None, ["lr=0.01", "batch_size=4096"]).peak_lr == 0.01


class HostReads:
    """Counts reads of tensor values by the host (what waits for an accelerator) while active.

    Python-level reads only (``item``, ``tolist``, ``bool``, ``float``, ``int``): kernels that size
    their output on the host (boolean-mask indexing, ``nonzero``) sync inside C++ and are only
    visible on CUDA (``torch.cuda.set_sync_debug_mode``)."""

    METHODS = ("item", "tolist", "__bool__", "__float__", "__int__")

    def __init__(self, monkeypatch):
        self.active, self.where = False, []
        for name in self.METHODS:
            real = getattr(torch.Tensor, name)

            def counting(tensor, *args, _real=real, _name=name):
                if self.active:
                    self.where.append(_name)
                return _real(tensor, *args)

            monkeypatch.setattr(torch.Tensor, name, counting)


def count_host_reads_in_steps(monkeypatch, stage) -> tuple[dict, list[str], list[int]]:
    """Train ``stage``; returns its results, the host reads made inside steps (outside the
    loader) and how many steps' flags each settle read."""
    from prepretrain.train.engine import Trainer

    reads = HostReads(monkeypatch)
    real_step, real_next, real_settle = Trainer.step, Trainer._next_batch, Trainer.settle
    settles = []

    def step(self, *args, **kwargs):
        reads.active = True
        try:
            return real_step(self, *args, **kwargs)
        finally:
            reads.active = False

    def next_batch(self, *args):
        reads.active = False
        try:
            return real_next(self, *args)
        finally:
            reads.active = True

    def settle(self):
        settles.append(len(self.pending_flags))
        return real_settle(self)

    monkeypatch.setattr(Trainer, "step", step)
    monkeypatch.setattr(Trainer, "_next_batch", next_batch)
    monkeypatch.setattr(Trainer, "settle", settle)
    return train(stage), reads.where, settles


def test_a_training_step_never_waits_for_the_device(tmp_path, monkeypatch):
    """Between settles the step reads no tensor value on the host (the loader's own host-side
    work excepted), so an accelerator's queue never drains; the flags are read every few steps."""
    stage = MAEStage(tiny_cfg(tmp_path / "run", "log_every=5", "ckpt_every=6", "clip_grad=1.0"))
    results, reads, settles = count_host_reads_in_steps(monkeypatch, stage)
    assert results["steps"] == 12 and reads == []
    # settled after the first step, then at steps 5, 6, 10, 12: the flags of 12 steps read in 5 syncs
    assert settles == [1, 4, 1, 4, 2]


def test_the_whole_batch_lit_step_never_waits_for_the_device(tmp_path, monkeypatch):
    """LiT's contrastive step over two accumulated micro-batches (embed all, then recompute each
    with its graph), metrics included, reads nothing on the host either."""
    from prepretrain.stages.lit import LiTConfig, LiTStage

    values = dict(out_dir=tmp_path / "lit", num_images=200, vision_depth=1, text_depth=1, batch_size=50,
                  micro_batch_size=25, steps=8, warmup_steps=1, progress=False, tensorboard=False, log_every=4,
                  ckpt_every=100, eval_images=50)
    cfg = build_config(LiTConfig, None, {k: str(v) for k, v in values.items()})
    results, reads, settles = count_host_reads_in_steps(monkeypatch, LiTStage(cfg))
    assert results["steps"] == 8 and reads == []
    assert settles == [1, 3, 4]


def test_deferred_skips_are_counted_in_step_order_and_stop_the_run(tmp_path):
    """With the flags read only every few steps, a skipped step still leaves the weights and the
    optimizer's step count alone, and the run still stops at the first streak too long."""
    cfg = tiny_cfg(tmp_path / "one", "steps=6", "log_every=6", "ckpt_every=6")

    results = train(NaNStage(cfg, bad_from=2, bad_until=3))  # the third step's loss is NaN
    assert results["nonfinite_steps"] == 1 and torch.isfinite(torch.tensor(results["final_loss"]))
    state = torch.load(tmp_path / "one" / "checkpoints" / "step_00000006.pt", weights_only=True)
    assert {float(s["step"]) for s in state["optimizer"]["state"].values()} == {5.0}  # 6 steps, 1 skipped

    cfg = tiny_cfg(tmp_path / "nan", "max_nonfinite=2", "log_every=10", "ckpt_every=10")
    with pytest.raises(NonFiniteLoss, match=r"3 consecutive bad steps \(last: non-finite loss\) at step 4"):
        train(NaNStage(cfg, bad_from=2))
    assert not list((tmp_path / "nan" / "checkpoints").glob("*.pt"))


def test_the_wsp_step_never_waits_for_the_device(tmp_path, monkeypatch):
    """The multi-label hashtag loss (images without tags masked by where(), not by indexing)."""
    from prepretrain.stages.wsp import WSPConfig, WSPStage

    values = dict(out_dir=tmp_path / "wsp", depth=2, num_images=200, batch_size=16, steps=4, progress=False,
                  tensorboard=False, eval_images=50, log_every=4, ckpt_every=100)
    cfg = build_config(WSPConfig, None, {k: str(v) for k, v in values.items()})
    results, reads, settles = count_host_reads_in_steps(monkeypatch, WSPStage(cfg))
    assert results["steps"] == 4 and reads == []
    assert settles == [1, 3]


@pytest.mark.parametrize("ema_decay", [0.0, 0.99])
def test_the_finetune_step_waits_for_the_device_only_for_its_ema(tmp_path, monkeypatch, ema_decay):
    """Without an EMA, finetune's step makes no host read; with one, the verdict of each step is
    read before the EMA sees it (the EMA must follow applied steps only). Mixup is off here: it
    seeds NumPy from torch's CPU generator with int(), a host read of a CPU tensor (no device
    sync) that this counter cannot tell from one."""
    from prepretrain.stages.finetune import FinetuneConfig, FinetuneStage

    values = dict(out_dir=tmp_path / "ft", num_images=64, batch_size=16, steps=4, progress=False,
                  tensorboard=False, eval_batch_size=200, log_every=4, ckpt_every=100, ema_decay=ema_decay,
                  mixup=0, cutmix=0)
    cfg = build_config(FinetuneConfig, None, {k: str(v) for k, v in values.items()})
    results, reads, settles = count_host_reads_in_steps(monkeypatch, FinetuneStage(cfg))
    assert results["steps"] == 4
    if ema_decay:
        assert [n for n in settles if n] == [1, 1, 1, 1]  # each step read alone (timm's EMA reads the host too)
    else:
        assert reads == [] and settles == [1, 3]

"""The run contract: one owner for the run directory, rank, resume state, writers and loggers."""

from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from prepretrain import files
from prepretrain.config import ConfigError, build_config
from prepretrain.stages.mae import MAEConfig, MAEStage
from prepretrain.train.engine import train
from prepretrain.train.run import Run

TINY = {"num_images": "96", "batch_size": "16", "steps": "4", "ckpt_every": "2", "log_every": "1",
        "decoder_embed_dim": "32", "decoder_depth": "1", "decoder_num_heads": "2", "eval_images": "16",
        "progress": "false", "tensorboard": "false", "warmup_steps": "1"}


def test_atomic_write_leaves_the_old_file_when_the_write_fails(tmp_path):
    target = files.write_json(tmp_path / "results.json", {"a": 1})

    def broken(tmp: Path) -> None:
        tmp.write_text("half")
        raise OSError("No space left on device")

    with pytest.raises(OSError, match="No space"):
        files.atomic_write(target, broken)
    assert json.loads(target.read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]  # no temporary left behind


def test_safetensors_writer_and_the_one_metadata_reader(tmp_path):
    state = {"w": torch.arange(6.0).view(2, 3).t()}  # not contiguous
    path = files.save_safetensors(tmp_path / "w.safetensors", state, {"model": "vit_micro4", "depth": 2})
    assert files.read_metadata(path) == {"model": "vit_micro4", "depth": "2"}
    assert files.read_keys(path) == ["w"]
    assert torch.equal(load_file(path)["w"], state["w"])
    assert files.read_metadata(tmp_path / "missing.safetensors") == {}


def test_only_the_main_rank_writes(tmp_path):
    main = Run(tmp_path / "main")
    other = Run(tmp_path / "other", rank=1, world_size=2)
    for run in (main, other):
        run.write_json("results.json", {"x": 1})
        run.save_weights("w.safetensors", {"w": torch.ones(2)})
    assert (tmp_path / "main" / "results.json").is_file() and (tmp_path / "main" / "w.safetensors").is_file()
    assert not (tmp_path / "other").exists()


def test_run_of_a_stage_knows_its_directory_and_resume_state(tmp_path):
    stage = MAEStage(build_config(MAEConfig, None, {**TINY, "out_dir": str(tmp_path / "mae")}))
    fresh = Run.of_stage(stage)
    assert fresh.dir == tmp_path / "mae" and not fresh.resuming and fresh.is_main
    train(stage)
    assert Run.of_stage(stage).resuming  # a checkpoint is there now
    no_resume = MAEStage(build_config(MAEConfig, None, {**TINY, "out_dir": str(tmp_path / "mae"), "resume": "false"}))
    assert not Run.of_stage(no_resume).resuming
    default = MAEStage(build_config(MAEConfig, None, TINY))
    assert Run.of_stage(default).dir == Path("runs/mae")


class FakeWandbRun:
    def __init__(self, **kwargs):
        self.init = kwargs
        self.logged: list[tuple[int, dict]] = []
        self.finished = False

    def log(self, values, step):
        self.logged.append((step, dict(values)))

    def finish(self):
        self.finished = True


def test_wandb_receives_the_logged_metrics(tmp_path, monkeypatch):
    """W&B gets the same scalars and steps as metrics.jsonl, from one run started per run
    directory in the asked mode (a stand-in module records the calls; no network)."""
    runs: list[FakeWandbRun] = []
    fake = types.ModuleType("wandb")
    fake.__spec__ = types.SimpleNamespace(name="wandb")  # what the config check looks for

    def init(**kwargs):
        runs.append(FakeWandbRun(**kwargs))
        return runs[-1]

    fake.init = init
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: object() if name == "wandb" else None)
    out = tmp_path / "mae"
    train(MAEStage(build_config(MAEConfig, None, {**TINY, "out_dir": str(out), "wandb": "maws",
                                                  "wandb_mode": "offline"})))
    (run,) = runs
    assert run.init["project"] == "maws" and run.init["mode"] == "offline" and run.init["dir"] == str(out)
    assert run.init["config"]["steps"] == 4 and run.finished
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [step for step, _ in run.logged] == [line["step"] for line in lines]
    assert run.logged[0][1]["loss"] == pytest.approx(lines[0]["loss"])


def test_wandb_without_the_package_is_a_config_error_naming_the_key(monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    with pytest.raises(ConfigError) as error:
        build_config(MAEConfig, None, {"wandb": "maws"})
    assert error.value.key == "wandb"
    with pytest.raises(ConfigError) as error:
        build_config(MAEConfig, None, {"wandb_mode": "sometimes"})
    assert error.value.key == "wandb_mode"

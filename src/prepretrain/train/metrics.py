"""Run logging: metrics.jsonl (one object per logged step), TensorBoard, W&B, progress, MFU."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import Any

import torch

from ..config import ConfigError, config_to_dict
from ..files import write_text
from ..report import plot_panels

# Dense bf16 peak (TFLOP/s) of accelerators we can name; MFU uses the user's value if given.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "V100": 125.0}


def detect_peak_tflops(device: torch.device) -> float | None:
    """Peak dense bf16 TFLOP/s of the CUDA device, from its name; None when unknown (e.g. CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_TFLOPS.items():
        if key in name:
            return value
    return None


class MetricsLogger:
    """metrics.jsonl, TensorBoard and (optionally) Weights & Biases, written by rank 0 only;
    other ranks get a logger that does nothing.

    ``wandb`` is a project name (empty: off). It needs the ``wandb`` package (``pip install
    prepretrain[wandb]``); ``wandb_mode=offline`` keeps the run on disk (``wandb sync`` later),
    so it works without a network.
    """

    def __init__(self, run_dir: str | Path, enabled: bool = True, tensorboard: bool = True, wandb: str = "",
                 wandb_mode: str = "online", run_name: str = "", config: Any = None):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.writer = None
        self.wandb_run = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"))
            except ImportError:  # tensorboard is optional at run time
                self.writer = None
        if enabled and wandb:
            self.wandb_run = _start_wandb(wandb, wandb_mode, Path(run_dir), run_name, config)

    def truncate_after(self, step: int) -> None:
        """Drop lines logged after ``step`` (by a run that was killed before its next checkpoint)."""
        if not self.enabled or not self.path.exists():
            return
        kept = [json.dumps(row) for row in _rows(self.path.read_text()) if row.get("step", 0) <= step]
        write_text(self.path, "".join(line + "\n" for line in kept))

    def log(self, step: int, values: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: _plain(v) for k, v in values.items()}}
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        scalars = {k: v for k, v in record.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}
        if self.writer is not None:
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, step)
        if self.wandb_run is not None:
            self.wandb_run.log(scalars, step=step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


def _start_wandb(project: str, mode: str, run_dir: Path, run_name: str, config: Any) -> Any:
    try:
        import wandb
    except ImportError:
        raise ConfigError("wandb", "logging to Weights & Biases needs the wandb package: "
                                   "pip install 'prepretrain[wandb]' (or leave wandb= empty)") from None
    return wandb.init(project=project, name=run_name or None, dir=str(run_dir), mode=mode,
                      config=config_to_dict(config) if config is not None else None, resume="allow",
                      id=_wandb_id(run_dir))


def _wandb_id(run_dir: Path) -> str:
    """One W&B run per run directory, so a resumed run continues its curves."""
    return hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:16]


def progress_bar(enabled: bool, start: int, total: int, name: str) -> Any:
    """A tqdm bar from ``start`` to ``total`` steps, or an object that ignores updates."""
    if enabled:
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=start, desc=name, unit="step", dynamic_ncols=True)
    return _Silent()


class _Silent:
    def update(self, n: int) -> None: ...
    def set_postfix(self, **kw: Any) -> None: ...
    def close(self) -> None: ...


def _plain(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    return value


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    path = Path(path)
    if not path.exists():
        return []
    return _rows(path.read_text())


def _rows(text: str) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl; a line torn by a kill mid-write is dropped, not fatal."""
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def plot_metrics(metrics_path: str | Path, out_png: str | Path, keys: tuple[str, ...] = ("loss",),
                 title: str = "") -> Path | None:
    """The named metrics of a run against step, one panel per key (None when none was logged)."""
    rows = read_metrics(metrics_path)
    panels = {}
    for key in keys:
        points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        if points:
            panels[key] = {"": [points]}
    if not panels:
        return None
    return plot_panels(panels, Path(out_png), "step", title)

"""Run an evaluation end to end: resolve the encoder, open the data, evaluate, write results.

This is what the ``probe``, ``lowshot`` and ``knn`` commands call, and what the pipeline calls
for each encoder it compares. Every evaluator has the same signature,
``evaluator(encoder: FrozenEncoder, data: EvalData, cfg) -> dict``, and is registered in
:data:`EVALUATIONS` with its config class, so another evaluation (zero-shot) plugs in with
:func:`register_evaluation` and gets the same encoder resolution, splits, cache and outputs.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..config import build_config, dump_config
from ..files import write_text
from .common import EvalConfig, EvalData, FrozenEncoder, open_encoder, open_eval_data, write_results
from .knn import KNNConfig, evaluate_knn
from .linear import ProbeConfig, evaluate_probe
from .lowshot import LowShotConfig, evaluate_lowshot

Evaluator = Callable[[FrozenEncoder, EvalData, Any], dict[str, Any]]

EVALUATIONS: dict[str, tuple[type[EvalConfig], Evaluator]] = {
    "probe": (ProbeConfig, evaluate_probe),
    "lowshot": (LowShotConfig, evaluate_lowshot),
    "knn": (KNNConfig, evaluate_knn),
}


def register_evaluation(name: str, config_cls: type[EvalConfig], evaluator: Evaluator) -> None:
    """Add an evaluation (its config class must set ``stage_name = name``)."""
    if getattr(config_cls, "stage_name", None) != name:
        raise ValueError(f"{config_cls.__name__}.stage_name must be '{name}'")
    EVALUATIONS[name] = (config_cls, evaluator)


def run_evaluation(cfg: EvalConfig, encoder: FrozenEncoder | None = None) -> dict[str, Any]:
    """Evaluate ``cfg.encoder`` as ``cfg`` says; writes ``config.yaml`` and ``results.json`` to its out_dir.

    ``encoder`` lets a caller share one :class:`FrozenEncoder` (and its in-memory features)
    across evaluations of the same weights.
    """
    name = cfg.stage_name
    if name not in EVALUATIONS:
        raise KeyError(f"no evaluation named '{name}'; known: {sorted(EVALUATIONS)}")
    evaluator = EVALUATIONS[name][1]
    run_dir = cfg.run_dir()
    write_text(run_dir / "config.yaml", dump_config(cfg))
    encoder = encoder or open_encoder(cfg)
    data = open_eval_data(cfg.data, cfg.task, encoder.spec.image_size, cfg.num_images)
    already_computed = len(encoder.extracted)
    start = time.perf_counter()
    metrics = evaluator(encoder, data, cfg)
    spec = encoder.spec
    results = {
        "evaluation": name,
        "encoder": spec.description,
        "encoder_id": spec.identity,
        "model": spec.model,
        "depth": spec.depth,
        "image_size": spec.image_size,
        "data": cfg.data,
        "task": data.task,
        "num_classes": data.num_classes,
        "test_split": data.split_names["test"],
        **metrics,
        "skipped_images": dict(encoder.skipped),
        "features_computed": encoder.extracted[already_computed:],  # splits not read from the cache
        "seconds": time.perf_counter() - start,
    }
    write_results(run_dir, results)
    return {**results, "out_dir": str(run_dir)}


def evaluate_encoder(encoder: str, out_dir: str | Path, evaluations: tuple[str, ...] = ("probe", "knn", "lowshot"),
                     overrides: dict[str, Any] | None = None,
                     per_evaluation: dict[str, dict[str, Any]] | None = None) -> dict[str, dict[str, Any]]:
    """Every evaluation of one encoder, each in ``out_dir/<name>``, sharing one feature pass.

    ``overrides`` apply to all evaluations (shared keys such as ``data``, ``task``, ``device``);
    ``per_evaluation[name]`` holds keys of one evaluation (``method``, ``shots``...).
    """
    out_dir = Path(out_dir)
    results: dict[str, dict[str, Any]] = {}
    shared: dict[tuple, FrozenEncoder] = {}
    for name in evaluations:
        values = {"encoder": encoder, "out_dir": str(out_dir / name), "cache_dir": str(out_dir / "feature_cache"),
                  **(overrides or {}), **((per_evaluation or {}).get(name, {}))}
        cfg = build_config(EVALUATIONS[name][0], None, values)
        key = (cfg.encoder, cfg.model, cfg.image_size, cfg.seed, cfg.device, cfg.precision, cfg.cache_dir)
        if key not in shared:
            shared[key] = open_encoder(cfg)
        results[name] = run_evaluation(cfg, shared[key])
    return results

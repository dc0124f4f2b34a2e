"""The README's CPU demo chain learns what it should: mae -> wsp init=mae -> lit encoder=wsp,
every stage with its defaults but the MAE's, the probes' and LiT's dataset sizes (1200, 2000 and
2000 of 4000 images: the same epochs, schedule shape and protocol, fewer steps and features).

Why the shorter version still catches what this test is for (a default that stops the chain
learning): every other setting (models, mask ratio, learning rates, schedules, losses, data) is
the default, and WSP, whose tower decides the zero-shot number, runs exactly as the README's
command does. Measured 2026-12-07 with one thread per process and both cores busy, seed 0: probe
MAE 40.9 vs random 24.9 (seed 1: 42.1) on the default 4000 images, 39.5 vs 23.25 on 2000 (what the
test runs: 26 s less), zero-shot 36.0 (chance 10; a 2000-image WSP instead gave
28.9, so WSP keeps its default); WSP's held-out precision@1 43.6 against the most-frequent-tag
baseline's 29.6 (mAP 0.056 vs 0.021; a 2000-image WSP: 29.5 vs 28.5); about 7 minutes, the
longest test in the suite, hence the mark (slow tests start first). The README's full-size
commands measured probe 43.5 vs 24.9, zero-shot 42.6.

What the probe margin does not show: that MAE training learned anything. Most of it is the MAE's
initialisation scheme: in the pipeline's 4-seed run the *untrained* MAE initialisation already
probes 35.8 against random init's 26.0 (docs/experiment.md). The pipeline's paired contrasts are
where MAE learning is measured."""

import pytest

from prepretrain.config import build_config
from prepretrain.evaluate.linear import ProbeConfig
from prepretrain.evaluate.runner import run_evaluation
from prepretrain.stages.lit import LiTConfig, LiTStage
from prepretrain.stages.mae import MAEConfig, MAEStage
from prepretrain.stages.wsp import WSPConfig, WSPStage
from prepretrain.train.engine import train

QUIET = dict(progress="false", tensorboard="false")
MAE_IMAGES = 1200  # of the default 4000: the same 8 epochs and schedule, 30% of the steps
LIT_IMAGES = 2000  # of the default 4000: half the steps
PROBE_IMAGES = 2000  # of the default 4000: the default protocol on half the features (test set 400)


@pytest.mark.slow
def test_default_mae_beats_random_and_default_lit_zero_shot_is_far_above_chance(tmp_path):
    mae, wsp = tmp_path / "mae", tmp_path / "wsp"
    train(MAEStage(build_config(MAEConfig, None, dict(out_dir=str(mae), num_images=MAE_IMAGES, **QUIET))))
    probe = {}
    for name, encoder in (("mae", str(mae)), ("random", "")):
        cfg = build_config(ProbeConfig, None, dict(encoder=encoder, out_dir=str(tmp_path / f"probe_{name}"),
                                                   num_images=PROBE_IMAGES, progress="false"))
        probe[name] = run_evaluation(cfg)["top1"]
    assert probe["mae"] > probe["random"] + 8.0, probe

    tags = train(WSPStage(build_config(WSPConfig, None, dict(out_dir=str(wsp), init=str(mae), **QUIET))))
    # held-out tags: far above the constant most-frequent-tag predictor (measured 43.6 vs 29.6)
    assert tags["val_precision_at_1"] > tags["val_baseline_precision_at_1"] + 0.08, tags
    assert tags["val_mAP"] > 2 * tags["val_baseline_mAP"], tags
    lit = train(LiTStage(build_config(LiTConfig, None, dict(out_dir=str(tmp_path / "lit"), encoder=str(wsp),
                                                            num_images=LIT_IMAGES, **QUIET))))
    assert lit["image_tower"] == str(wsp / "encoder.safetensors")
    assert lit["zeroshot_coarse_top1"] > 30.0, lit["zeroshot_coarse_top1"]  # chance: 10

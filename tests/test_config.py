import subprocess
import sys

import pytest

from prepretrain.config import ConfigError, build_config, dump_config
from prepretrain.stages.mae import MAEConfig


def test_defaults_then_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("stage: mae\nseed: 3\nbatch_size: 64\nbetas: [0.9, 0.99]\n")
    cfg = build_config(MAEConfig, path, ["seed=5", "mask_ratio=0.6", "compile=true", "out_dir=runs/x"])
    assert (cfg.seed, cfg.batch_size, cfg.mask_ratio, cfg.compile, cfg.out_dir) == (5, 64, 0.6, True, "runs/x")
    assert cfg.betas == (0.9, 0.99)
    # the dump is itself a valid config that reproduces the same values
    again = tmp_path / "again.yaml"
    again.write_text(dump_config(cfg))
    assert build_config(MAEConfig, again) == cfg


@pytest.mark.parametrize(
    "override,key",
    [
        ("mask_rate=0.5", "mask_rate"),  # unknown key
        ("seed=abc", "seed"),  # wrong type
        ("batch_size=0", "batch_size"),  # impossible value
        ("mask_ratio=1.0", "mask_ratio"),
        ("mask_ratio=0", "mask_ratio"),
        ("precision=fp8", "precision"),
        ("model=vit_xx", "model"),
        ("betas=0.9", "betas"),
        ("compile=maybe", "compile"),
        ("image_size=30", "image_size"),  # not a multiple of the patch
        ("lr_schedule=linear", "lr_schedule"),
        ("lr_decay_at=0.9,0.5", "lr_decay_at"),
        ("lr_decay_rate=0", "lr_decay_rate"),
    ],
)
def test_mistakes_name_the_key(override, key):
    with pytest.raises(ConfigError) as error:
        build_config(MAEConfig, None, [override])
    assert error.value.key == key and f"'{key}'" in str(error.value)


def test_unknown_key_suggests_close_match():
    with pytest.raises(ConfigError, match="did you mean 'mask_ratio'"):
        build_config(MAEConfig, None, ["mask_ration=0.5"])


def test_config_file_of_another_stage_is_rejected(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("stage: wsp\nseed: 1\n")
    with pytest.raises(ConfigError, match="stage"):
        build_config(MAEConfig, path)


def test_cli_exits_2_naming_the_key_before_compute(tmp_path):
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-m", "prepretrain.cli", "mae", f"out_dir={out}", "batch_size=-4"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert "batch_size" in result.stderr
    assert not out.exists()  # nothing was computed or written


def test_print_config_shows_resolved_values():
    result = subprocess.run(
        [sys.executable, "-m", "prepretrain.cli", "mae", "--print-config", "seed=7"],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0
    assert "stage: mae" in result.stdout and "seed: 7" in result.stdout

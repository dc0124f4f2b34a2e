import subprocess
import sys
import types

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


def all_config_classes() -> list[type]:
    """Every config dataclass in the package (a class named *Config with a validate method)."""
    import dataclasses
    import importlib
    import inspect
    import pkgutil

    import prepretrain

    found = {}
    for module_info in pkgutil.walk_packages(prepretrain.__path__, "prepretrain."):
        module = importlib.import_module(module_info.name)
        for name, obj in inspect.getmembers(module, inspect.isclass):
            if (name.endswith("Config") and dataclasses.is_dataclass(obj) and hasattr(obj, "validate")
                    and obj.__module__.startswith("prepretrain")):
                found[f"{obj.__module__}.{name}"] = obj
    return list(found.values())


def test_every_numeric_key_of_every_config_declares_its_interval(capsys):
    import dataclasses
    import typing

    from prepretrain.config import INTERVALS, declared_bounds

    classes = all_config_classes()
    assert len(classes) >= 17
    missing, covered, keys = [], 0, set()
    for cls in classes:
        hints = typing.get_type_hints(cls)
        bounds = declared_bounds(cls)
        assert set(bounds.values()) <= set(INTERVALS), cls.__name__
        assert set(bounds) <= {f.name for f in dataclasses.fields(cls)}, f"{cls.__name__} declares unknown keys"
        for f in dataclasses.fields(cls):
            if hints[f.name] in (int, float):
                if f.name in bounds:
                    covered += 1
                    keys.add(f"{cls.__name__}.{f.name}")
                    assert INTERVALS[bounds[f.name]](f.default), f"{cls.__name__}.{f.name}: default outside"
                else:
                    missing.append(f"{cls.__name__}.{f.name}")
    with capsys.disabled():
        print(f"\n[config] {covered} numeric keys of {len(classes)} config classes declare their interval; "
              f"{len(missing)} do not")
    assert not missing, missing


@pytest.mark.parametrize("command, override, key", [
    ("mae", "warmup_steps=-5", "warmup_steps"), ("mae", "decoder_depth=-1", "decoder_depth"),
    ("probe", "k=0", None), ("knn", "k=0", "k"), ("wsp", "vocab_min_count=0", "vocab_min_count"),
    ("classify", "batch_size=0", "batch_size"),
])
def test_a_value_outside_its_declared_interval_names_the_key(command, override, key):
    from prepretrain.registry import COMMANDS

    overrides = [override] + (["model=x", "data=synthetic"] if command == "classify" else [])
    if key is None:  # not a key of that command at all
        with pytest.raises(ConfigError, match="unknown key"):
            build_config(COMMANDS[command].config, None, overrides)
        return
    with pytest.raises(ConfigError, match=f"'{key}'"):
        build_config(COMMANDS[command].config, None, overrides)


def test_out_dir_naming_a_file_is_a_config_error(tmp_path, capsys):
    from prepretrain.cli import main

    file = tmp_path / "results.txt"
    file.write_text("not a folder")
    assert main(["mae", f"out_dir={file}", "steps=1"]) == 2
    assert main(["mae", f"out_dir={file / 'run'}", "steps=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all("is a file, not a folder" in line for line in err)


def test_every_declared_choice_names_fields_and_holds_its_default():
    import dataclasses

    from prepretrain.config import check_choice, declared_choices

    declared = 0
    for cls in all_config_classes():
        choices = declared_choices(cls)
        assert set(choices) <= {f.name for f in dataclasses.fields(cls)}, f"{cls.__name__} declares unknown keys"
        defaults = {f.name: f.default for f in dataclasses.fields(cls)}
        for key, options in choices.items():
            declared += 1
            check_choice(types.SimpleNamespace(**{key: defaults[key]}), key, options)
    assert declared >= 30


@pytest.mark.parametrize("command", ["wsp", "finetune", "video", "detect"])
def test_drop_path_is_one_rule_for_every_stage(command):
    """1.0 would drop every residual branch: [0, 1) everywhere, checked from the one declaration."""
    from prepretrain.registry import COMMANDS

    build_config(COMMANDS[command].config, None, ["drop_path=0.99"])
    with pytest.raises(ConfigError, match="'drop_path': must be in \\[0, 1\\), got 1.0"):
        build_config(COMMANDS[command].config, None, ["drop_path=1"])


@pytest.mark.parametrize("command, override", [
    ("mae", "lr_schedule=linear"), ("mae", "precision=fp8"), ("wsp", "resample_reduce=sum"),
    ("finetune", "decode=gpu"), ("detect", "lvis=maybe"), ("lit", "cache_features=sometimes"),
])
def test_a_value_outside_its_declared_choices_names_the_key(command, override):
    from prepretrain.registry import COMMANDS

    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=f"'{key}': must be one of"):
        build_config(COMMANDS[command].config, None, [override])

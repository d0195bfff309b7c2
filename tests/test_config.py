"""The training config has one source of defaults, and every stage finds its paths the same way."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from training.cli import REPO_ROOT, StageError, repo_path, run_stage
from training.config import (
    RANGES,
    ConfigValueError,
    DataConfig,
    ModelConfig,
    TrainConfig,
    TrainerConfig,
    check_ranges,
)
from training.data import DataError
from training.train import CONFIG_DIR

DEFAULTS = dataclasses.asdict(TrainConfig())
# Hydra groups only: configs/serving/ holds TorchServe's files, which no dataclass describes.
GROUP_FILES = sorted(
    p for p in Path(CONFIG_DIR).glob("*/*.yaml") if p.parent.name in DEFAULTS or p.parent.name == "experiment"
)


def _restated(values: dict, defaults: dict, where: str) -> list[str]:
    found = []
    for key, value in values.items():
        if isinstance(value, dict):
            found += _restated(value, defaults[key], f"{where}{key}.")
        elif key in defaults and defaults[key] == value:
            found.append(f"{where}{key}={value!r}")
    return found


@pytest.mark.parametrize("path", GROUP_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_yaml_groups_hold_only_values_that_differ_from_the_dataclasses(path: Path) -> None:
    values = yaml.safe_load(path.read_text()) or {}
    group = path.parent.name
    if "@package _global_" in path.read_text():  # experiments nest their values under section names
        restated = _restated(values, DEFAULTS, "")
    else:
        restated = _restated(values, DEFAULTS[group], f"{group}.")
    assert not restated, f"{path} restates defaults from training/config.py: {restated}; delete them"


def test_train_yaml_holds_no_defaults_of_its_own() -> None:
    values = yaml.safe_load((Path(CONFIG_DIR) / "train.yaml").read_text())
    extra = set(values) - {"defaults", "hydra"}
    assert not extra, f"configs/train.yaml sets {extra}: defaults belong in training/config.py:TrainConfig"


def test_composed_defaults_are_the_dataclass_defaults() -> None:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train")
    assert OmegaConf.to_container(cfg) == DEFAULTS


def test_relative_config_paths_are_taken_from_the_repository_root(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert repo_path("data") == REPO_ROOT / "data"
    assert repo_path(tmp_path / "x") == tmp_path / "x"
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", return_hydra_config=True, overrides=["hydra.job.num=0"])
    run_dir = Path(OmegaConf.to_container(cfg.hydra.run, resolve=True)["dir"])
    assert run_dir.parent == REPO_ROOT / "outputs" / "train", run_dir


@pytest.mark.parametrize(("error", "code"), [(StageError("parity failed"), 1), (DataError("x.gz: bad"), 2)])
def test_stage_errors_are_one_line_with_the_conventional_exit_code(error, code, capsys) -> None:
    def fail() -> None:
        raise error

    assert run_stage("python -m training.x", fail) == code
    assert capsys.readouterr().err == f"python -m training.x: error: {error}\n"


def test_a_path_that_cannot_be_written_is_one_line_naming_it(tmp_path: Path, capsys) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert run_stage("python -m training.x", lambda: (blocker / "out").mkdir(parents=True)) == 2
    assert capsys.readouterr().err == (
        f"python -m training.x: error: {blocker / 'out'}: Not a directory; check the path (and free space), "
        "or give another\n"
    )


# Numbers whose valid values depend on something else: val_size on the data (training.data checks it),
# split_seed and seed take any integer.
UNRANGED = {"data.val_size", "data.split_seed"}


def test_every_number_in_the_config_has_a_range() -> None:
    numbers = {
        f"{section}.{f.name}"
        for section, schema in (("data", DataConfig), ("model", ModelConfig), ("trainer", TrainerConfig))
        for f in dataclasses.fields(schema)
        if f.type in ("int", "float")
    }
    assert numbers - UNRANGED == set(RANGES), "give each new number a Range in training/config.py:RANGES"


@pytest.mark.parametrize(
    "preset", ["", "experiment=accurate", "experiment=smoke", "experiment=tuned", "trainer=ddp"]
)
def test_the_defaults_and_every_preset_are_in_range(preset: str) -> None:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        check_ranges(compose("train", overrides=[preset] if preset else []))


def _outside(key: str) -> list[float]:
    allowed = RANGES[key]
    values = [allowed.low if allowed.low_open else allowed.low - 1]
    if allowed.high != float("inf"):
        values.append(allowed.high if allowed.high_open else allowed.high + 1)
    return values


@pytest.mark.parametrize("key", sorted(RANGES))
def test_a_value_out_of_range_is_a_usage_error_naming_the_key_its_range_and_default(key: str) -> None:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        for value in _outside(key):
            cfg = compose("train", overrides=[f"{key}={value:g}"])
            with pytest.raises(ConfigValueError) as err:
                check_ranges(cfg)
            default = OmegaConf.select(OmegaConf.structured(TrainConfig), key)
            assert f"{key}=" in str(err.value) and f"must be {RANGES[key]}; default {default})" in str(
                err.value
            )
            assert err.value.exit_code == 2


def test_train_refuses_out_of_range_values_before_it_writes_anything(compose_cfg, tmp_path: Path) -> None:
    from training.train import train

    cfg = compose_cfg("model.dropout=1", "trainer.lr=0", "logger=csv", f"data.root={tmp_path / 'data'}")
    with pytest.raises(ConfigValueError, match=r"model\.dropout=1\.0 .*trainer\.lr=0\.0 "):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists() and not (tmp_path / "data").exists()

"""training.train and configs/: composition, a smoke run's outputs, reproducibility, augmentation."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from training import train as train_module
from training.config import ConfigValueError
from training.loading import augment
from training.train import CONFIG_DIR, SettingsError, native_bf16, resolve_precision, train

EXPERIMENTS = sorted(p.stem for p in (Path(CONFIG_DIR) / "experiment").glob("*.yaml"))
SMOKE = ("experiment=smoke", "trainer.progress_bar=false")


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes(compose_cfg, experiment: str) -> None:
    cfg = compose_cfg(f"experiment={experiment}")
    assert cfg.trainer.max_epochs >= 1 and cfg.model.width >= 1


def test_typed_schema_rejects_a_wrong_type(compose_cfg) -> None:
    with pytest.raises(Exception, match="model.width"):
        compose_cfg("model.width=wide")


def test_overrides_apply(compose_cfg) -> None:
    cfg = compose_cfg("trainer.max_epochs=3", "model.width=48", "data.augment=true")
    assert (cfg.trainer.max_epochs, cfg.model.width, cfg.data.augment) == (3, 48, True)


def test_smoke_run_writes_checkpoint_metrics_config_and_wandb(compose_cfg, tiny_data_root, tmp_path) -> None:
    cfg = compose_cfg(*SMOKE, f"data.root={tiny_data_root}", "logger.wandb=true", "data.batch_size=16")
    run = tmp_path / "run"
    summary = train(cfg, run)
    assert (run / "checkpoints" / "best.ckpt").is_file()
    rows = list(csv.DictReader((run / "logs" / "metrics.csv").open()))
    assert any(r.get("val/acc") for r in rows), "metrics.csv has no validation accuracy"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["data"]["root"] == str(tiny_data_root) and saved["seed"] == cfg.seed
    offline_runs = list((run / "wandb").glob("offline-run-*"))
    assert offline_runs, "expected an offline W&B run directory"
    assert (tmp_path / "latest").resolve() == run.resolve()
    # The summary (and so the checkpoint export picks) is the best validation accuracy logged.
    logged = max(float(r["val/acc"]) for r in rows if r.get("val/acc"))
    assert summary["best_val_acc"] == pytest.approx(logged, abs=1e-6), (summary, logged)


def test_fast_dev_run_checks_the_code_path_and_points_nothing_at_its_run(
    compose_cfg, tiny_data_root, tmp_path
) -> None:
    """Lightning turns checkpoints and loggers off for fast_dev_run: no curves, no `latest`, no export."""
    cfg = compose_cfg(
        "trainer.fast_dev_run=true", "logger=csv", f"data.root={tiny_data_root}", "data.batch_size=16"
    )
    summary = train(cfg, tmp_path / "run")
    assert summary["epochs"] == 1 and (tmp_path / "run" / "summary.yaml").is_file()
    assert not (tmp_path / "run" / "history.csv").exists() and not (tmp_path / "latest").exists()
    with pytest.raises(ConfigValueError, match="saves no checkpoint, so export_dir has nothing to export"):
        train(compose_cfg("trainer.fast_dev_run=true", f"export_dir={tmp_path}/x"), tmp_path / "run2")
    assert not (tmp_path / "run2").exists()


def test_an_accelerator_whose_package_is_missing_is_a_settings_error(compose_cfg, tmp_path) -> None:
    cfg = compose_cfg("trainer.accelerator=tpu", "logger=csv", f"data.root={tmp_path / 'data'}")
    with pytest.raises(SettingsError, match=r"torch_xla.*trainer\.\* overrides") as err:
        train(cfg, tmp_path / "run")
    assert err.value.exit_code == 2


def test_a_run_prints_none_of_the_notices_a_user_cannot_act_on(
    compose_cfg, tiny_data_root, tmp_path, capfd, caplog, recwarn
) -> None:
    """Lightning's litlogger tip, W&B's `anonymous` deprecation, Lightning's non-empty log dir warning."""
    cfg = compose_cfg(*SMOKE, f"data.root={tiny_data_root}", "logger.wandb=true", "data.batch_size=16")
    run = tmp_path / "run"
    run.mkdir()
    (run / "train.log").write_text("Hydra writes its log here before training starts\n")
    with caplog.at_level("INFO"):
        train(cfg, run)
    printed = "".join(capfd.readouterr()) + caplog.text + "".join(str(w.message) for w in recwarn)
    for notice in ("litlogger", "anonymous setting", "exists and is not empty"):
        assert notice not in printed, f"the run printed {notice!r}"


def test_same_seed_same_validation_accuracy(compose_cfg, tiny_data_root, tmp_path) -> None:
    cfg = compose_cfg(*SMOKE, f"data.root={tiny_data_root}", "data.batch_size=16", "data.augment=true")
    a = train(cfg, tmp_path / "a")["best_val_acc"]
    b = train(cfg, tmp_path / "b")["best_val_acc"]
    assert a == b
    wa = torch.load(tmp_path / "a/checkpoints/best.ckpt", weights_only=False)["state_dict"]
    wb = torch.load(tmp_path / "b/checkpoints/best.ckpt", weights_only=False)["state_dict"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa), "same seed must give identical weights"


@pytest.mark.parametrize("native", [True, False])
def test_precision_auto_picks_bf16_only_where_the_hardware_has_it(monkeypatch, native: bool) -> None:
    monkeypatch.setattr(train_module, "native_bf16", lambda accelerator: native)
    assert resolve_precision("auto", "cpu") == ("bf16-mixed" if native else "32-true")
    # Explicit values are Lightning's to check, whatever the hardware.
    assert resolve_precision("32-true", "cpu") == "32-true"
    assert resolve_precision("bf16-mixed", "cpu") == "bf16-mixed"


def test_native_bf16_follows_the_cpu_flags(monkeypatch) -> None:
    for amx, avx512_bf16 in [(True, False), (False, True), (False, False)]:
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda a=amx: a)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda b=avx512_bf16: b)
        assert native_bf16("cpu") is (amx or avx512_bf16)
    # A torch without the private helpers counts as no bf16, not as a crash.
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    assert native_bf16("cpu") is False


def test_a_run_with_precision_auto_saves_what_it_chose(compose_cfg, tiny_data_root, tmp_path) -> None:
    cfg = compose_cfg(*SMOKE, f"data.root={tiny_data_root}", "data.batch_size=16", "trainer.precision=auto")
    train(cfg, tmp_path / "run")
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["trainer"]["precision"] == ("bf16-mixed" if native_bf16("cpu") else "32-true")
    assert cfg.trainer.precision == "auto", "the caller's config must not be changed"


def test_augment_keeps_shape_dtype_and_pixel_values() -> None:
    torch.manual_seed(0)
    x = torch.randint(0, 256, (16, 28, 28), dtype=torch.uint8)
    y = augment(x, max_shift=2)
    assert y.shape == x.shape and y.dtype == torch.uint8
    assert set(y.unique().tolist()) <= set(x.unique().tolist()) | {0}
    assert not torch.equal(x, y), "augmentation changed nothing"


def test_augment_without_shift_only_flips() -> None:
    x = torch.randint(0, 256, (32, 28, 28), dtype=torch.uint8)
    y = augment(x, max_shift=0)
    assert all(torch.equal(a, b) or torch.equal(a.flip(-1), b) for a, b in zip(x, y, strict=True))


def test_cli_run_with_overrides(tiny_data_root, tmp_path) -> None:
    """The real Hydra CLI: overrides apply and the run dir holds the resolved config."""
    root = tmp_path / "runs"
    proc = subprocess.run(
        [sys.executable, "-m", "training.train", *SMOKE, f"data.root={tiny_data_root}", f"run_root={root}",
         "trainer.max_epochs=2", "data.batch_size=16"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    saved = yaml.safe_load((root / "latest" / "config.yaml").read_text())
    assert saved["trainer"]["max_epochs"] == 2
    assert (root / "latest" / ".hydra" / "overrides.yaml").is_file()
    assert "next:       python -m training.export" in proc.stdout


def test_run_root_that_cannot_be_created_is_a_clear_error(tmp_path, capsys) -> None:
    # Hydra makes the run directory before the project's code runs; its traceback was the answer. The
    # callback configs/train.yaml wires in answers first (in-process: a CLI run costs ~15 s of imports).
    (tmp_path / "a-file").write_text("")
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[f"run_root={tmp_path}/a-file/runs"], return_hydra_config=True)
    callbacks = [instantiate(c) for c in cfg.hydra.callbacks.values()]
    with pytest.raises(SystemExit) as exited:
        for callback in callbacks:
            callback.on_run_start(config=cfg)
    assert exited.value.code == 2
    assert f"run_root={tmp_path}/a-file/runs: Not a directory" in capsys.readouterr().err


def test_cli_missing_data_is_a_clear_error(tmp_path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "training.train", *SMOKE, f"data.root={tmp_path}/d",
         f"data.source_dir={tmp_path}/none", f"run_root={tmp_path}/runs"],
        capture_output=True, text=True, timeout=300,
        env={"PATH": "/usr/bin:/bin", "FASHION_MNIST_DEBIAN_DIR": str(tmp_path / "nodeb")},
    )  # fmt: skip
    assert proc.returncode == 2
    assert "Fashion-MNIST not found" in proc.stderr and "Traceback" not in proc.stderr

"""training.tune: a tiny study completes, resumes in the same storage, prunes a bad trial, writes a preset."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from hydra import compose, initialize_config_dir

from training.config import CONFIG_DIR, ConfigValueError, register_configs
from training.tune import baseline, outside_space, tune

GOOD = {"trainer.lr": 3e-3, "model.width": 24, "model.depth": 1, "model.dropout": 0.1}
BAD = {**GOOD, "trainer.lr": 50.0}  # out of the search range on purpose: the loss diverges


@pytest.fixture
def base(tiny_data_root: Path) -> list[str]:
    return [
        "experiment=smoke", "model.width=16", f"data.root={tiny_data_root}", "data.val_size=60",
        "data.batch_size=64", "trainer.max_epochs=1", "trainer.progress_bar=false", "logger.wandb=true",
    ]  # fmt: skip


def test_study_completes_resumes_prunes_and_writes_a_preset(base, tmp_path) -> None:
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    common = {
        "storage": storage, "base": base, "trial_seconds": 120, "startup_trials": 2,
        "preset": tmp_path / "experiment" / "study_best.yaml", "reports": tmp_path / "reports",
        "run_root": tmp_path / "runs",
    }  # fmt: skip
    study = tune(3, enqueue=[GOOD, BAD], **common)  # trial 0 is the baseline: the config's own values
    assert study.trials[0].params["model.width"] == 16 and study.trials[0].user_attrs["baseline"]
    states = [t.state for t in study.trials]
    assert len(states) == 3 and states[:2] == [optuna.trial.TrialState.COMPLETE] * 2
    assert states[2] == optuna.trial.TrialState.PRUNED, "the diverging trial was not pruned"

    resumed = tune(2, **common)
    assert len(resumed.trials) == 5, "a rerun must add trials to the same stored study"
    assert len(optuna.load_study(study_name="fashion-mnist", storage=storage).trials) == 5

    for trial in resumed.trials:
        runs = list(
            (tmp_path / "runs" / "fashion-mnist" / f"trial-{trial.number}" / "wandb").glob("offline-run-*")
        )
        assert runs, f"trial {trial.number} has no offline W&B run"
    assert (tmp_path / "reports" / "optimization_history.png").stat().st_size > 0
    assert (tmp_path / "reports" / "param_importances.png").stat().st_size > 0

    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        # A name no preset in configs/ has: the repository's own config dir comes first on the search path.
        cfg = compose("train", overrides=[f"hydra.searchpath=[file://{tmp_path}]", "experiment=study_best"])
    best = resumed.best_trial.params
    assert cfg.model.width == best["model.width"] and cfg.trainer.lr == pytest.approx(best["trainer.lr"])


def test_a_base_override_out_of_range_stops_the_study_before_it_starts(base, tmp_path) -> None:
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    with pytest.raises(ConfigValueError, match=r"trainer\.max_epochs=0 \(must be >= 1"):
        tune(1, 60, storage=storage, base=[*base, "trainer.max_epochs=0"], run_root=tmp_path / "runs")
    assert not (tmp_path / "study.db").exists() and not (tmp_path / "runs").exists()


def test_a_baseline_outside_the_search_space_is_named_not_enqueued() -> None:
    values = baseline(["data.batch_size=16", "model.width=16"])
    assert outside_space(values) == ["data.batch_size=16"]
    assert outside_space(baseline([])) == [], "the hand-picked defaults must be a point of the search space"

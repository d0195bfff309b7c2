"""Hyperparameter search with Optuna over the Hydra training config; the best trial becomes a preset.

    python -m training.tune                                    # 20 trials, 120 s each, SQLite under outputs/
    python -m training.tune --trials 5                         # run again: adds 5 trials to the same study
    python -m training.tune --storage postgresql://u:p@db/optuna --study-name nightly
    python -m training.tune --trials 8 -- trainer.max_epochs=3 trainer.limit_train_batches=0.3

Each trial composes configs/train.yaml with the base overrides (after `--`) plus its sampled
values for the learning rate, width, depth, dropout, weight decay, batch size and augmentation,
trains for at most --trial-seconds of wall time and reports the validation accuracy after every
epoch. Trials that fall below the median of earlier trials at the same epoch are pruned. Trial 0
of a new study is the hand-picked config itself: the yardstick for the others.

Why MedianPruner: a study here has tens of trials of a few epochs each. Hyperband and successive
halving need many trials per bracket and several rungs before they pay off; the median rule prunes
from the first epoch once --startup-trials trials have finished, and its one knob is easy to reason about.

The study lives in --storage (any SQLAlchemy URL; default sqlite:///outputs/tune/<study>.db), so
a rerun resumes it. Outputs: each trial's run under outputs/tune/<study>/trial-<n>/ (with an
offline W&B run unless logger=csv), the best trial as configs/experiment/<--preset>.yaml
(`python -m training.train experiment=tuned`), and the optimisation history and parameter
importances as PNGs in reports/tuning/.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import optuna
import yaml
from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna_integration.pytorch_lightning import PyTorchLightningPruningCallback

from training.cli import StageError
from training.config import CONFIG_DIR, check_ranges, register_configs
from training.train import train

MONITOR = "val/acc"


# The search space, keyed by the Hydra override each value becomes.
SPACE: dict[str, BaseDistribution] = {
    "trainer.lr": FloatDistribution(3e-4, 1e-2, log=True),
    "model.width": CategoricalDistribution([16, 24, 32, 48]),
    "model.depth": IntDistribution(1, 3),
    "model.dropout": FloatDistribution(0.0, 0.5),
    # AdamW decouples decay from the gradient: a step shrinks the weights by lr x decay, so below ~1e-3
    # it barely regularises; 0.05 is what closed the accurate config's gap (docs/training.md).
    "trainer.weight_decay": FloatDistribution(1e-5, 0.1, log=True),
    "data.batch_size": CategoricalDistribution([64, 128, 256]),
    "data.augment": CategoricalDistribution([False, True]),
}


def sample(trial: optuna.Trial) -> dict[str, Any]:
    """One value per SPACE entry, suggested through the trial (so Optuna records and learns from it)."""
    values: dict[str, Any] = {}
    for key, dist in SPACE.items():
        if isinstance(dist, FloatDistribution):
            values[key] = trial.suggest_float(key, dist.low, dist.high, log=dist.log)
        elif isinstance(dist, IntDistribution):
            values[key] = trial.suggest_int(key, dist.low, dist.high)
        else:
            values[key] = trial.suggest_categorical(key, list(dist.choices))
    return values


def outside_space(values: dict[str, Any]) -> list[str]:
    """`key=value` for each value SPACE cannot represent (Optuna refuses to enqueue those)."""
    outside = []
    for key, value in values.items():
        dist = SPACE[key]
        if isinstance(dist, CategoricalDistribution):
            inside = value in dist.choices
        else:
            inside = dist.low <= value <= dist.high
        if not inside:
            outside.append(f"{key}={value}")
    return outside


def baseline(base: Sequence[str]) -> dict[str, Any]:
    """The hand-picked values (configs/ plus `base`) of the searched keys: a new study's first trial."""
    cfg = compose_trial(base, {})
    return {key: OmegaConf.select(cfg, key) for key in SPACE}


def compose_trial(base: Sequence[str], values: dict[str, Any]) -> DictConfig:
    register_configs()
    overrides = [*base, *(f"{key}={value}" for key, value in values.items())]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=overrides)


def objective(base: Sequence[str], run_root: Path, trial_seconds: float):
    """The function Optuna calls per trial: train, report each epoch, return the best val accuracy."""

    def run(trial: optuna.Trial) -> float:
        cfg = compose_trial(base, sample(trial))
        pruning = PyTorchLightningPruningCallback(trial, monitor=MONITOR)
        summary = train(cfg, run_root / f"trial-{trial.number}", [pruning], max_seconds=trial_seconds)
        trial.set_user_attr("train_seconds", summary["train_seconds"])
        return summary["best_val_acc"]

    return run


def write_preset(study: optuna.Study, path: Path, base: Sequence[str]) -> Path:
    """The best trial as a Hydra preset (`experiment=<name>`): its values that differ from configs/."""
    best = study.best_trial
    defaults = compose_trial((), {})
    nested: dict[str, dict[str, Any]] = {}
    for key, value in best.params.items():
        if OmegaConf.select(defaults, key) == value:
            continue  # a preset holds only what differs from configs/ (tests/test_config.py)
        group, name = key.split(".")
        nested.setdefault(group, {})[name] = value
    header = (
        "# @package _global_\n"
        f"# Best trial ({best.number}) of Optuna study {study.study_name!r}: val accuracy {best.value:.4f}.\n"
        f"# Written by `python -m training.tune`{' -- ' + ' '.join(base) if base else ''}; "
        "rerun it to update, or edit by hand.\n"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(header + yaml.safe_dump(nested, sort_keys=True))
    return path


def write_plots(study: optuna.Study, out_dir: Path) -> list[Path]:
    """Optimisation history and parameter importances (the latter needs two finished trials)."""
    import warnings

    import matplotlib

    matplotlib.use("Agg")  # headless
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as oplt

    # Optuna marks its matplotlib plots "experimental" on every call; nothing for a user to act on.
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)

    out_dir.mkdir(parents=True, exist_ok=True)
    plots = {"optimization_history.png": oplt.plot_optimization_history}
    finished = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if len(finished) >= 2:
        plots["param_importances.png"] = oplt.plot_param_importances
    written = []
    for name, plot in plots.items():
        ax = plot(study)
        ax.figure.tight_layout()
        ax.figure.savefig(out_dir / name, dpi=110)
        plt.close(ax.figure)
        written.append(out_dir / name)
    return written


def tune(
    trials: int,
    trial_seconds: float,
    storage: str | None = None,
    study_name: str = "fashion-mnist",
    base: Sequence[str] = (),
    startup_trials: int = 2,
    preset: Path = Path(CONFIG_DIR) / "experiment" / "tuned.yaml",
    reports: Path = Path("reports") / "tuning",
    run_root: Path = Path("outputs") / "tune",
    enqueue: Sequence[dict[str, Any]] = (),
) -> optuna.Study:
    """Run (or resume) the study; write the preset and the plots.

    A new study starts with the hand-picked config as trial 0, so every later trial is measured
    against the defaults under the same budget; `enqueue` adds fixed trials after it.
    """
    check_ranges(compose_trial(base, {}))  # a bad base override fails now, not in trial 0
    if storage is None:
        run_root.mkdir(parents=True, exist_ok=True)
        storage = f"sqlite:///{run_root / study_name}.db"
    study = optuna.create_study(
        study_name=study_name,
        storage=storage,
        direction="maximize",
        load_if_exists=True,  # a rerun resumes the study
        sampler=optuna.samplers.TPESampler(seed=len(optuna_trials(storage, study_name))),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=startup_trials, n_warmup_steps=0),
    )
    if not study.trials:
        values = baseline(base)
        if outside := outside_space(values):
            print(
                f"note: no baseline trial: {', '.join(outside)} is outside the search space", file=sys.stderr
            )
        else:
            study.enqueue_trial(values, user_attrs={"baseline": True})
    for params in enqueue:
        study.enqueue_trial(params)
    study.optimize(
        objective(base, run_root / study_name, trial_seconds),
        n_trials=trials,
        catch=(),  # a crash is a bug to see, not a trial to skip
    )
    if any(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials):
        write_preset(study, preset, base)
        write_plots(study, reports)
    return study


def optuna_trials(storage: str, study_name: str) -> list[optuna.trial.FrozenTrial]:
    """Trials already in the study (none if it does not exist yet)."""
    try:
        return optuna.load_study(study_name=study_name, storage=storage).trials
    except KeyError:
        return []


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--trials", type=int, default=20, help="trials to add to the study (default 20)")
    parser.add_argument("--trial-seconds", type=float, default=120.0, help="wall-time budget per trial")
    parser.add_argument("--storage", help="SQLAlchemy URL (default sqlite:///outputs/tune/<study>.db)")
    parser.add_argument("--study-name", default="fashion-mnist")
    parser.add_argument("--startup-trials", type=int, default=2, help="finished trials before pruning starts")
    parser.add_argument("--preset", default="tuned", help="name of the configs/experiment/ preset to write")
    parser.add_argument("overrides", nargs="*", help="base Hydra overrides for every trial (after --)")
    args = parser.parse_args(None if argv is None else list(argv))
    if args.trials < 1 or args.trial_seconds <= 0:
        parser.error("--trials must be >= 1 and --trial-seconds > 0")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    t0 = time.perf_counter()
    try:
        study = tune(
            args.trials,
            args.trial_seconds,
            args.storage,
            args.study_name,
            args.overrides,
            args.startup_trials,
            Path(CONFIG_DIR) / "experiment" / f"{args.preset}.yaml",
        )
    except (HydraException, OmegaConfBaseException) as exc:
        print(f"error: {exc}\nsee configs/ for the valid keys", file=sys.stderr)
        return 2
    except StageError as exc:  # missing or damaged data: exit 2 with the fix
        print(f"python -m training.tune: error: {exc}", file=sys.stderr)
        return exc.exit_code
    states = [t.state.name.lower() for t in study.trials]
    counts = ", ".join(f"{states.count(s)} {s}" for s in sorted(set(states)))
    print(f"study {study.study_name!r}: {len(states)} trials ({counts}) in {time.perf_counter() - t0:.0f}s")
    best = study.best_trial
    print(f"best: trial {best.number}, val accuracy {best.value:.4f}, {best.params}")
    print(
        f"preset: configs/experiment/{args.preset}.yaml  (python -m training.train experiment={args.preset})"
    )
    print("plots:  reports/tuning/")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Typed schema and defaults for the Hydra training config (configs/train.yaml composes onto it).

Every default lives here; the YAML groups in configs/ carry only values that differ from it. Hydra
validates every value against these dataclasses, so a typo such as `trainer.max_epoch=3` or
`model.width=wide` fails at start-up, not mid-run. Relative paths (`data.root`, `data.source_dir`,
`run_root`) are taken from the repository root (training.cli.repo_path).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from training.cli import EXIT_USAGE, REPO_ROOT, StageError, repo_path, run_stage

CONFIG_DIR = str(REPO_ROOT / "configs")


@dataclass
class DataConfig:
    root: str = "data"  # processed tensors live in <root>/processed
    source_dir: str | None = None  # raw IDX .gz files; None = Debian package, then download
    val_size: int = 5000
    split_seed: int = 0
    batch_size: int = 256
    eval_batch_size: int = 1024
    # DataLoader worker processes; 0 = batches are gathered and augmented in the training process.
    # scripts/bench_loading.py (docs/training.md, "Data loading"): 0 workers is the slowest by far, as the
    # training process's multi-threaded ops fight over the cores; one worker already delivers many times
    # the ~3,000 images/s the default model consumes on 2 cores in bf16, and a second was no faster.
    num_workers: int = 1
    persistent_workers: bool = True  # keep workers between epochs (only with num_workers > 0)
    prefetch_factor: int = 2  # batches each worker prepares ahead (only with num_workers > 0)
    augment: bool = False  # train-only: random horizontal flip + random shift
    max_shift: int = 2  # pixels, for augment


@dataclass
class ModelConfig:
    width: int = 32
    depth: int = 2
    dropout: float = 0.25
    hidden: int = 128  # units in the fully connected layer before the classifier
    # Conv layers in the first stage, at full 28x28 resolution, where one costs as much as the whole
    # second stage's: 1 trains ~1.75x faster per image than 2 for the same accuracy per CPU-minute
    # (docs/training.md).
    stem_convs: int = 1
    flip_tta: bool = False  # average over the image and its mirror at eval: 2x inference cost


@dataclass
class TrainerConfig:
    max_epochs: int = 6
    lr: float = 3e-3
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    threads: int = 2  # torch intra-op threads; the build machines have 2 cores
    deterministic: bool = True
    # In deterministic mode torch also fills every new tensor with NaN, a debugging aid that exposes
    # reads of uninitialised memory; it changes no result and cost ~15% of each step (docs/profiling.md).
    fill_uninitialized_memory: bool = False
    limit_train_batches: float = 1.0
    limit_val_batches: float = 1.0
    fast_dev_run: bool = False
    log_every_n_steps: int = 50
    progress_bar: bool = True
    # Where and how many processes: trainer=ddp sets these (docs/training.md, "Distributed training").
    accelerator: str = "cpu"  # "auto" picks a GPU when there is one
    devices: int = 1  # processes per node; under torchrun it must equal --nproc-per-node
    num_nodes: int = 1
    strategy: str = "auto"  # "ddp": gloo on CPU, NCCL on GPU
    # "auto": bf16-mixed where the hardware computes bf16 natively (AMX or AVX512-BF16 CPUs, bf16 GPUs),
    # else 32-true; the run's config.yaml records which. On the build machines bf16-mixed trains ~2x the
    # images/s of fp32 to the same test accuracy (docs/training.md). Or name one: "32-true", "bf16-mixed".
    precision: str = "auto"


@dataclass
class LoggerConfig:
    wandb: bool = True
    project: str = "fashion-serve"
    mode: str = "offline"  # WANDB_MODE, when the environment does not set one
    entity: str | None = None


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    seed: int = 42
    run_root: str = "outputs/train"
    export_dir: str | None = None  # when set, rank 0 exports the best checkpoint here after training


class ConfigValueError(StageError):
    """A config value has the right type but is out of range (Hydra checks only the type)."""

    exit_code = EXIT_USAGE


@dataclass(frozen=True)
class Range:
    """The values a number may take: from `low` to `high`, each end included unless marked open."""

    low: float
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False

    def __contains__(self, value: float) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def __str__(self) -> str:
        if self.high == math.inf:
            return f"{'>' if self.low_open else '>='} {self.low:g}"
        left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
        return f"in {left}{self.low:g}, {self.high:g}{right}"


# Checked before anything starts, so a bad override is one line naming the fix, not a traceback from
# deep inside torch or Lightning minutes into a run. data.val_size is checked against the data itself.
RANGES = {
    "data.batch_size": Range(1),
    "data.eval_batch_size": Range(1),
    "data.num_workers": Range(0),
    "data.prefetch_factor": Range(1),
    "data.max_shift": Range(0),
    "model.width": Range(1),
    "model.depth": Range(1),
    "model.hidden": Range(1),
    "model.stem_convs": Range(1, 2),
    "model.dropout": Range(0, 1, high_open=True),
    "trainer.max_epochs": Range(1),
    "trainer.lr": Range(0, low_open=True),
    "trainer.weight_decay": Range(0),
    "trainer.label_smoothing": Range(0, 1, high_open=True),
    "trainer.threads": Range(1),
    "trainer.limit_train_batches": Range(0, low_open=True),
    "trainer.limit_val_batches": Range(0),
    "trainer.log_every_n_steps": Range(1),
    "trainer.devices": Range(1),
    "trainer.num_nodes": Range(1),
}


def check_ranges(cfg: DictConfig) -> None:
    """Raise ConfigValueError naming every value outside RANGES, with its allowed range and default."""
    values = {key: OmegaConf.select(cfg, key) for key in RANGES}
    bad = [key for key, allowed in RANGES.items() if values[key] not in allowed]
    if bad:
        defaults = OmegaConf.structured(TrainConfig)
        wrong = [
            f"{key}={values[key]} (must be {RANGES[key]}; default {OmegaConf.select(defaults, key)})"
            for key in bad
        ]
        raise ConfigValueError(
            f"out of range: {', '.join(wrong)}. Fix the override on the command line, or the value in"
            " configs/ (params.yaml for the DVC pipeline)"
        )


class RunRootCheck(Callback):
    """Refuse a `run_root` that cannot be created, in one line with exit 2 (configs/train.yaml's callback).

    Hydra creates the run directory before any of the project's code runs, so a bad run_root (a path
    through a file, a read-only place) ended in Hydra's traceback."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        # run_stage prints the one line, as it does for every stage's errors.
        if code := run_stage("python -m training.train", lambda: make_run_root(config.run_root)):
            sys.exit(code)


def make_run_root(run_root: str) -> None:
    try:
        repo_path(run_root).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigValueError(
            f"run_root={run_root}: {exc.strerror}; give a directory that can be created, or leave"
            " run_root at its default (outputs/train)"
        ) from exc


def register_configs() -> None:
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)
    # ${repo:PATH} in configs/train.yaml: the run directory is found from the repository root too.
    OmegaConf.register_new_resolver("repo", lambda path: str(repo_path(path)), replace=True)

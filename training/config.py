"""Typed schema and defaults for the Hydra training config (configs/train.yaml composes onto it).

Every default lives here; the YAML groups in configs/ carry only values that differ from it. Hydra
validates every value against these dataclasses, so a typo such as `trainer.max_epoch=3` or
`model.width=wide` fails at start-up, not mid-run. Relative paths (`data.root`, `data.source_dir`,
`run_root`) are taken from the repository root (training.cli.repo_path).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from training.cli import REPO_ROOT, repo_path

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
    # the ~900 images/s the default model consumes on 2 cores, and a second was no faster.
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
    precision: str = "32-true"  # or "bf16-mixed" (docs/training.md measures both)


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


def register_configs() -> None:
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)
    # ${repo:PATH} in configs/train.yaml: the run directory is found from the repository root too.
    OmegaConf.register_new_resolver("repo", lambda path: str(repo_path(path)), replace=True)

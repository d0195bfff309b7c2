"""Typed schema for the Hydra training config (configs/train.yaml composes onto it).

Hydra validates every value against these dataclasses, so a typo such as
`trainer.max_epoch=3` or `model.width=wide` fails at start-up, not mid-run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore


@dataclass
class DataConfig:
    root: str = "data"  # processed tensors live in <root>/processed
    source_dir: str | None = None  # raw IDX .gz files; None = Debian package, then download
    val_size: int = 5000
    split_seed: int = 0
    batch_size: int = 256
    eval_batch_size: int = 1024
    num_workers: int = 0  # data is in memory; worker processes only add start-up cost
    augment: bool = False  # train-only: random horizontal flip + random shift
    max_shift: int = 2  # pixels, for augment


@dataclass
class ModelConfig:
    name: str = "fashion_cnn"
    width: int = 32
    depth: int = 2
    dropout: float = 0.25
    hidden: int = 128  # units in the fully connected layer before the classifier


@dataclass
class TrainerConfig:
    max_epochs: int = 5
    lr: float = 3e-3
    weight_decay: float = 5e-4
    label_smoothing: float = 0.0
    threads: int = 2  # torch intra-op threads; the build machines have 2 cores
    deterministic: bool = True
    limit_train_batches: float = 1.0
    limit_val_batches: float = 1.0
    fast_dev_run: bool = False
    log_every_n_steps: int = 50
    progress_bar: bool = True


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


def register_configs() -> None:
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)

"""Train the Fashion-MNIST CNN with PyTorch Lightning; config composed by Hydra from configs/.

    python -m training.train                                   # default: ~0.93 test accuracy
    python -m training.train experiment=accurate               # ~0.946, ~15 min on 2 cores
    python -m training.train trainer.max_epochs=3 model.width=48 logger=csv
    python -m training.train trainer=ddp                       # 2 processes (DDP), see docs/training.md

Each run gets outputs/train/<timestamp>/ holding the resolved config (config.yaml),
checkpoints/best.ckpt (best validation accuracy), logs/metrics.csv, history.csv (one row
per epoch: the training curves) and, unless logger=csv, an offline W&B run in wandb/.
outputs/train/latest points at the newest run; `python -m training.export` reads it from there.
With `export_dir=DIR` the run exports itself there when training ends.

The DVC pipeline's train stage loads params.yaml (rendered from configs/ by
`python -m training.params`) instead of composing configs/ itself:

    python -m training.train --config-dir . --config-name params hydra.run.dir=outputs/train/pipeline

In a distributed run (trainer=ddp, or under torchrun) every process trains on its own shard
of the data, and only global rank 0 writes anything: config, checkpoint, metrics, the W&B
run, the summary and the export.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import logging
import os
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
import torch.nn.functional as F
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, TQDMProgressBar
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassAccuracy

from handler.preprocess import PreprocessSpec, normalize
from training.checkpoint import build_net
from training.cli import EXIT_USAGE, StageError, repo_path, run_stage
from training.config import (
    CONFIG_DIR,
    ConfigValueError,
    DataConfig,
    ModelConfig,
    TrainerConfig,
    check_ranges,
    register_configs,
)
from training.data import CLASSES, MANIFEST, load_split, prepare
from training.loading import make_loader

# Lightning advertises its cloud logger (litlogger) on every fit: nothing a user of this project can act on.
logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
    lambda record: "litlogger" not in record.getMessage()
)
# Lightning 2.6 builds torch's deprecated LeafSpec on every fit; torch 2.14 warns about it each time.
# Lightning's to fix, not the user's.
warnings.filterwarnings(
    "ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning
)
HISTORY_FIELDS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc")


class SettingsError(StageError):
    """Lightning refused a trainer.* setting (strategy, accelerator, devices, precision...)."""

    exit_code = EXIT_USAGE


class FashionDataModule(L.LightningDataModule):
    """Processed uint8 tensors in memory; batches stay uint8 until the model step normalises them."""

    def __init__(self, cfg: DataConfig, seed: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.seed = seed

    def prepare_data(self) -> None:
        root = repo_path(self.cfg.root)
        manifest = root / "processed" / MANIFEST
        split = {"val_size": self.cfg.val_size, "seed": self.cfg.split_seed}
        # A split already written with these settings (by `python -m training.data`, or the DVC
        # pipeline's prepare stage, whose output this stage must not rewrite) is used as it is.
        if manifest.is_file() and json.loads(manifest.read_text()).get("split") == split:
            return
        src = repo_path(self.cfg.source_dir) if self.cfg.source_dir else None
        prepare(root, src, self.cfg.val_size, self.cfg.split_seed)

    def setup(self, stage: str | None = None) -> None:
        root = repo_path(self.cfg.root)
        self.train_set = load_split(root, "train")
        self.val_set = load_split(root, "val")

    def train_dataloader(self) -> DataLoader:
        return make_loader(self.train_set.images, self.train_set.labels, self.cfg, self.seed, train=True)

    def val_dataloader(self) -> DataLoader:
        return make_loader(self.val_set.images, self.val_set.labels, self.cfg, self.seed, train=False)


class FashionClassifier(L.LightningModule):
    """Wraps FashionCNN with the loss, metrics, optimiser and the shared normalisation."""

    def __init__(self, model: dict, trainer: dict, data: dict, preprocess: dict) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model_cfg = ModelConfig(**model)
        self.trainer_cfg = TrainerConfig(**trainer)
        self.spec = PreprocessSpec.from_meta(preprocess)
        self.net = build_net(self.model_cfg)  # its parameters under "net." (training.checkpoint)
        # Counts correct and total on each rank and sums both across ranks at epoch end, so the
        # validation accuracy of a distributed run is that of the whole validation set.
        self.val_acc = MulticlassAccuracy(num_classes=len(CLASSES), average="micro")

    def setup(self, stage: str) -> None:
        # channels_last lets oneDNN's CPU convolutions skip layout conversions: ~25% faster steps.
        # Here, before DDP wraps the model, so its gradient buckets are laid out to match.
        if stage == "fit":
            self.net.to(memory_format=torch.channels_last)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = normalize(pixels, self.spec)
        if self.training:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> torch.Tensor:
        pixels, labels = batch  # augmented by the loader (training.loading) if data.augment
        logits = self(pixels)
        loss = F.cross_entropy(logits, labels, label_smoothing=self.trainer_cfg.label_smoothing)
        acc = (logits.argmax(1) == labels).float().mean()
        # sync_dist: in a distributed run the logged figures are the mean over all ranks' batches.
        self.log_dict(
            {"train/loss": loss, "train/acc": acc}, prog_bar=True, on_step=True, on_epoch=True, sync_dist=True
        )
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], _: int) -> None:
        pixels, labels = batch
        logits = self(pixels)
        self.log("val/loss", F.cross_entropy(logits, labels), prog_bar=True, sync_dist=True)
        self.val_acc(logits, labels)
        self.log("val/acc", self.val_acc, prog_bar=True)

    def configure_optimizers(self) -> dict:
        opt = torch.optim.AdamW(
            self.parameters(), lr=self.trainer_cfg.lr, weight_decay=self.trainer_cfg.weight_decay
        )
        # One-cycle reaches a given accuracy in fewer epochs than a flat rate: cheap CPU-minutes.
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=self.trainer_cfg.lr, total_steps=self.trainer.estimated_stepping_batches
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _loggers(cfg: DictConfig, run_dir: Path) -> list[Logger]:
    # Its own subdirectory: the run dir already holds config.yaml and Hydra's files, and Lightning
    # warns about a non-empty log directory.
    loggers: list[Logger] = [CSVLogger(str(run_dir), name="logs", version="")]
    if cfg.logger.wandb:
        # Offline unless the user asked otherwise: never prompts, never needs the network.
        os.environ.setdefault("WANDB_MODE", cfg.logger.mode)
        os.environ.setdefault("WANDB_SILENT", "true")
        import wandb
        from lightning.pytorch.loggers import WandbLogger

        # The run is started here, not by WandbLogger: the logger passes W&B's deprecated `anonymous`
        # setting to wandb.init, which then warns on every run. Rank 0 only, like all other writing.
        if rank_zero_only.rank == 0:
            run = wandb.init(
                project=cfg.logger.project,
                entity=cfg.logger.entity,
                dir=str(run_dir),
                config=OmegaConf.to_container(cfg, resolve=True),
            )
            loggers.append(WandbLogger(experiment=run))
    return loggers


def epoch_history(metrics_csv: Path) -> list[dict[str, float]]:
    """One row per epoch (HISTORY_FIELDS) from Lightning's metrics.csv, whose rows are sparse."""
    columns = {
        "train/loss_epoch": "train_loss", "train/acc_epoch": "train_acc",
        "val/loss": "val_loss", "val/acc": "val_acc",
    }  # fmt: skip
    rows: dict[int, dict[str, float]] = {}
    with metrics_csv.open(newline="") as fh:
        for line in csv.DictReader(fh):
            if not line.get("epoch"):
                continue
            epoch = int(line["epoch"])
            row = rows.setdefault(epoch, {"epoch": epoch})
            row.update({name: float(line[key]) for key, name in columns.items() if line.get(key)})
    return [rows[e] for e in sorted(rows)]


def write_history(metrics_csv: Path, out: Path) -> None:
    """history.csv: the training curves the DVC pipeline plots (`dvc plots show`)."""
    with out.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=HISTORY_FIELDS)
        writer.writeheader()
        writer.writerows(epoch_history(metrics_csv))


def _point_latest(run_dir: Path) -> None:
    latest = run_dir.parent / "latest"
    tmp = run_dir.parent / f".latest.{os.getpid()}"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(run_dir.name)
    os.replace(tmp, latest)  # atomic: `latest` is never missing or half-made


# TrainerConfig fields that are L.Trainer arguments of the same name.
TRAINER_ARGS = (
    "accelerator", "devices", "num_nodes", "strategy", "precision", "max_epochs", "deterministic",
    "limit_train_batches", "limit_val_batches", "fast_dev_run", "log_every_n_steps",
)  # fmt: skip


def native_bf16(accelerator: str) -> bool:
    """Whether the device `accelerator` trains on computes bf16 in hardware: a GPU that supports it, or
    a CPU with AMX or AVX512-BF16 (oneDNN's bf16 kernels). Elsewhere torch emulates bf16."""
    if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    # Private helpers, present since torch 2.1; a torch without them is treated as having no bf16.
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def resolve_precision(precision: str, accelerator: str) -> str:
    """trainer.precision=auto: bf16-mixed where the hardware computes bf16 natively, else 32-true.

    On the 2-core build machines (AMX) bf16-mixed trains about twice the images/s of fp32, and the
    default config reaches the same test accuracy (0.9310 against 0.9312, docs/training.md). Where bf16
    is emulated it was not measured, so `auto` keeps fp32 there. Any other value is Lightning's, passed
    through.
    """
    if precision != "auto":
        return precision
    return "bf16-mixed" if native_bf16(accelerator) else "32-true"


def trainer_settings(cfg: DictConfig) -> dict[str, Any]:
    """The L.Trainer arguments cfg.trainer sets (TRAINER_ARGS), with trainer.precision=auto resolved."""
    settings = {name: cfg.trainer[name] for name in TRAINER_ARGS}
    settings["precision"] = resolve_precision(cfg.trainer.precision, cfg.trainer.accelerator)
    return settings


def _trainer(
    cfg: DictConfig, run_dir: Path, callbacks: list[Callback], max_seconds: float | None = None
) -> L.Trainer:
    settings = trainer_settings(cfg)
    for limit in ("limit_train_batches", "limit_val_batches"):
        # None is Lightning's "every batch" too; an explicit 1.0 has it log that it will use 100% of
        # the batches, on every run, which tells the user nothing.
        if settings[limit] == 1.0:
            settings[limit] = None
    return L.Trainer(
        **settings,
        enable_progress_bar=cfg.trainer.progress_bar,
        enable_model_summary=False,
        callbacks=callbacks,
        max_time=None if max_seconds is None else dt.timedelta(seconds=max_seconds),
        logger=_loggers(cfg, run_dir),
        default_root_dir=str(run_dir),
    )


def build(cfg: DictConfig) -> tuple[FashionDataModule, FashionClassifier]:
    """The data and the model of a composed config, with the threads and seeds training runs with.

    Training and `python -m training.profile` both start here, so the profile runs what training runs.
    """
    check_ranges(cfg)
    torch.set_num_threads(cfg.trainer.threads)
    torch.utils.deterministic.fill_uninitialized_memory = cfg.trainer.fill_uninitialized_memory
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = FashionDataModule(DataConfig(**cfg.data), cfg.seed)
    module = FashionClassifier(
        model=OmegaConf.to_container(cfg.model),
        trainer=OmegaConf.to_container(cfg.trainer),
        data=OmegaConf.to_container(cfg.data),
        preprocess=PreprocessSpec().to_meta(),
    )
    return datamodule, module


def train(
    cfg: DictConfig, run_dir: Path, callbacks: Sequence[Callback] = (), max_seconds: float | None = None
) -> dict:
    """Train with a composed config into run_dir; `callbacks` join the run's own. Returns a summary dict.

    training.tune passes Optuna's pruning callback, and `max_seconds`: a wall-time budget after which
    training stops. Every process of a distributed run calls this; only global rank 0 writes into run_dir.
    """
    if cfg.trainer.fast_dev_run and cfg.export_dir:
        raise ConfigValueError(
            "trainer.fast_dev_run=true runs one batch and saves no checkpoint, so export_dir has nothing to"
            " export: drop one of the two"
        )
    datamodule, module = build(cfg)
    checkpoint = ModelCheckpoint(
        dirpath=run_dir / "checkpoints", filename="best", monitor="val/acc", mode="max", save_top_k=1
    )
    callbacks = [checkpoint, *callbacks]
    if cfg.trainer.progress_bar:
        callbacks.append(TQDMProgressBar(refresh_rate=20))
    try:
        trainer = _trainer(cfg, run_dir, callbacks, max_seconds)
    # ImportError: an accelerator whose package is missing (trainer.accelerator=tpu wants torch_xla).
    except (ValueError, ImportError, MisconfigurationException) as exc:
        raise SettingsError(
            f"{exc} (set by the trainer.* overrides; configs/trainer/ holds the presets)"
        ) from exc
    if trainer.is_global_zero:  # known from here on: the Trainer has read the launcher's environment
        run_dir.mkdir(parents=True, exist_ok=True)
        # Resolved (no ${...} left, precision=auto replaced by what it chose on this machine), so export
        # and anyone reading the run see the exact values used.
        saved = OmegaConf.to_container(cfg, resolve=True)
        saved["trainer"]["precision"] = trainer.precision
        OmegaConf.save(OmegaConf.create(saved), run_dir / "config.yaml")
    t0 = time.perf_counter()
    try:
        trainer.fit(module, datamodule=datamodule)
        for logger in trainer.loggers:
            logger.finalize("success")
    finally:
        if cfg.logger.wandb:  # the run _loggers started, also when a callback stopped the fit
            import wandb

            wandb.finish()
    seconds = time.perf_counter() - t0
    best = checkpoint.best_model_score
    summary = {
        "run_dir": str(run_dir),
        "checkpoint": checkpoint.best_model_path,
        "best_val_acc": float(best) if best is not None else float("nan"),
        "epochs": trainer.current_epoch,
        "train_seconds": round(seconds, 2),
    }
    if not trainer.is_global_zero:
        return summary
    OmegaConf.save(OmegaConf.create(summary), run_dir / "summary.yaml")
    if cfg.trainer.fast_dev_run:
        # Lightning ran one batch of each loader with checkpoints and loggers off: a check that the
        # code runs, with no curves to write and no model for `latest` to point at.
        return summary
    write_history(run_dir / "logs" / "metrics.csv", run_dir / "history.csv")
    _point_latest(run_dir)
    if cfg.export_dir:
        from training.export import export  # imports this module: not at the top

        export(run_dir, repo_path(cfg.export_dir), data_root=repo_path(cfg.data.root))
    return summary


register_configs()


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    # Bad data or settings, or a path it cannot write (exit 2), or a failed export_dir export (exit 1):
    # one line, as every other stage answers them.
    if code := run_stage("python -m training.train", lambda: report(cfg, run_dir, train(cfg, run_dir))):
        sys.exit(code)


def report(cfg: DictConfig, run_dir: Path, summary: dict) -> None:
    """What a finished run prints: where it is, and the next command."""
    if rank_zero_only.rank != 0:  # the other processes of a distributed run stay quiet
        return
    if cfg.trainer.fast_dev_run:
        print(f"\nfast_dev_run: one training and one validation batch ran; nothing saved\nrun dir: {run_dir}")
        return
    next_step = (
        f"exported:   {repo_path(cfg.export_dir)}"
        if cfg.export_dir
        else f"next:       python -m training.export --run {run_dir}"
    )
    print(
        f"\nbest val acc {summary['best_val_acc']:.4f} after {summary['train_seconds']:.0f}s\n"
        f"run dir:    {run_dir}\ncheckpoint: {summary['checkpoint']}\n{next_step}"
    )


if __name__ == "__main__":
    main()

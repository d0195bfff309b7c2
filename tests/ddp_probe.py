"""One process of the distributed-training test (tests/test_ddp.py): trains through training.train
and records what this rank saw, so the test can compare the ranks.

    torchrun --standalone --nproc-per-node 2 -m tests.ddp_probe OUT [HYDRA OVERRIDES...]
    python -m tests.ddp_probe OUT trainer=ddp [HYDRA OVERRIDES...]       # Lightning starts rank 1

Rank r trains into OUT/rank<r>/run with export_dir=OUT/rank<r>/export, so anything a rank other
than 0 writes lands where the test looks for it, and saves its observations to OUT/probe/rank<r>.pt.
"""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import lightning as L
import torch
from hydra import compose, initialize_config_dir

from training.config import register_configs
from training.train import CONFIG_DIR, train


def sample_ids(pixels: torch.Tensor) -> list[str]:
    """A content hash per image: the generated images are distinct, so a hash names a sample."""
    return [hashlib.sha1(image.numpy().tobytes()).hexdigest() for image in pixels.cpu()]


class Probe(L.Callback):
    """Records the samples this rank trained and validated on, its parameters before and after,
    its own (unreduced) validation counts and the validation accuracy Lightning reports."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.seen: dict[str, list] = {"train": [], "val_pixels": [], "val_labels": []}
        self.record: dict = {}

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.record["rank"] = trainer.global_rank
        self.record["world_size"] = trainer.world_size
        self.record["params_before"] = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

    def on_train_batch_start(self, trainer: L.Trainer, pl_module, batch, batch_idx: int) -> None:
        self.seen["train"] += sample_ids(batch[0])

    def on_validation_batch_start(self, trainer: L.Trainer, pl_module, batch, batch_idx: int, *_) -> None:
        if not trainer.sanity_checking:
            self.seen["val_pixels"].append(batch[0])
            self.seen["val_labels"].append(batch[1])

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        pixels, labels = torch.cat(self.seen["val_pixels"]), torch.cat(self.seen["val_labels"])
        with torch.no_grad():
            correct = (pl_module(pixels).argmax(1) == labels).sum().item()
        self.record["val_shard"] = {"ids": sample_ids(pixels), "correct": correct, "total": len(labels)}

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.record["train_ids"] = self.seen["train"]
        self.record["params_after"] = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        self.record["reported_val_acc"] = float(trainer.callback_metrics["val/acc"])
        self.path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(self.record, self.path)


def main() -> None:
    out, overrides = Path(sys.argv[1]), sys.argv[2:]
    # torchrun sets RANK; Lightning's own launcher sets LOCAL_RANK in the processes it starts.
    rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))
    register_configs()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, f"export_dir={out / f'rank{rank}' / 'export'}"])
    train(cfg, out / f"rank{rank}" / "run", callbacks=[Probe(out / "probe" / f"rank{rank}.pt")])


if __name__ == "__main__":
    main()

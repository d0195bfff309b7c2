"""training.loading: worker settings come from the config, and batches do not depend on the worker count."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from training.config import DataConfig
from training.loading import augment, make_loader, throughput
from training.train import FashionDataModule


def epochs_of(module: FashionDataModule, epochs: int) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    loader = module.train_dataloader()
    return [list(loader) for _ in range(epochs)]


def test_augmented_batches_are_identical_for_0_and_2_workers(tiny_data_root: Path) -> None:
    """The datamodule training uses: same seed -> same batches, same flips and shifts, any worker count."""
    runs = {}
    for workers, persistent in ((0, False), (2, True), (2, False)):
        cfg = DataConfig(
            root=str(tiny_data_root), batch_size=16, augment=True,
            num_workers=workers, persistent_workers=persistent, prefetch_factor=1,
        )  # fmt: skip
        module = FashionDataModule(cfg, seed=7)
        module.setup()
        runs[(workers, persistent)] = epochs_of(module, epochs=2)
    reference = runs[(0, False)]
    first, second = reference
    assert len(first) == -(-180 // 16) and sum(len(y) for _, y in first) == 180
    assert any(not torch.equal(a[0], b[0]) for a, b in zip(first, second, strict=True)), "epochs must differ"
    plain = FashionDataModule(DataConfig(root=str(tiny_data_root), batch_size=16), seed=7)
    plain.setup()
    plain_first = epochs_of(plain, epochs=1)[0]
    assert all(torch.equal(y, py) for (_, y), (_, py) in zip(first, plain_first, strict=True)), "same order"
    assert not any(torch.equal(x, px) for (x, _), (px, _) in zip(first, plain_first, strict=True)), (
        "augmentation changed no batch"
    )
    for key, run in runs.items():
        for epoch, (got, want) in enumerate(zip(run, reference, strict=True)):
            for i, ((gx, gy), (wx, wy)) in enumerate(zip(got, want, strict=True)):
                assert torch.equal(gx, wx) and torch.equal(gy, wy), f"{key}: epoch {epoch} batch {i} differs"


def test_validation_batches_are_in_order_and_untouched(tiny_data_root: Path) -> None:
    module = FashionDataModule(DataConfig(root=str(tiny_data_root), augment=True, eval_batch_size=25), seed=0)
    module.setup()
    images = torch.cat([x for x, _ in module.val_dataloader()])
    assert torch.equal(images, module.val_set.images), "validation is neither shuffled nor augmented"


def test_seed_changes_the_batches(tiny_data_root: Path) -> None:
    cfg = DataConfig(root=str(tiny_data_root), batch_size=32, augment=True)
    a, b = (FashionDataModule(cfg, seed=s) for s in (1, 2))
    a.setup(), b.setup()
    assert not torch.equal(next(iter(a.train_dataloader()))[1], next(iter(b.train_dataloader()))[1])


@pytest.mark.parametrize("workers", [0, 2])
def test_worker_settings_reach_the_dataloader(workers: int) -> None:
    cfg = DataConfig(num_workers=workers, persistent_workers=True, prefetch_factor=3)
    loader = make_loader(torch.zeros(10, 28, 28, dtype=torch.uint8), torch.zeros(10), cfg, 0, train=True)
    assert loader.num_workers == workers
    # DataLoader refuses these two without workers, so they only apply when there are some.
    assert (loader.persistent_workers, loader.prefetch_factor) == ((True, 3) if workers else (False, None))


def test_augment_is_a_function_of_its_generator() -> None:
    x = torch.randint(0, 256, (64, 28, 28), dtype=torch.uint8)
    a = augment(x, 2, torch.Generator().manual_seed(5))
    assert torch.equal(a, augment(x, 2, torch.Generator().manual_seed(5)))
    assert not torch.equal(a, augment(x, 2, torch.Generator().manual_seed(6)))


def test_throughput_counts_every_image_once_per_epoch() -> None:
    images, labels = torch.zeros(100, 28, 28, dtype=torch.uint8), torch.zeros(100, dtype=torch.int64)
    result = throughput(images, labels, dataclasses.replace(DataConfig(), batch_size=32), epochs=2)
    assert result["images"] == 100 and result["steady_images_per_s"] > 0
